//! The server behind PgBouncer in transaction pooling mode (`KPS_DB_PGBOUNCER=true`): every
//! route works from several processes at once, and the per-transaction timeouts are in force.

use std::{path::Path, process::Stdio, time::Duration};

use tokio::time::Instant;

use crate::{
    harness::{
        fingerprint, kp, problem, server_env, token, upload_request, ServerProcess, TempDir,
        TestDb, PROCESS_PATIENCE,
    },
    outage::split_url,
    pg_admin::{db_name, lock_user_row, wait_for_lock_waiters},
};

/// Debian's pgbouncer binary.
const PGBOUNCER: &str = "/usr/sbin/pgbouncer";

/// A pgbouncer of the test's own on a free port, in front of `upstream`; killed when dropped.
struct PgBouncer {
    port: u16,
    child: tokio::process::Child,
    _dir: TempDir,
}

impl PgBouncer {
    /// Starts pgbouncer in transaction mode with a pool of `pool_size` server connections per
    /// database, trusting every user (as the Postgres behind it does); `None` (with a note)
    /// where pgbouncer is not installed.
    async fn start(upstream: &str, pool_size: u32, test: &str) -> Option<Self> {
        if !Path::new(PGBOUNCER).exists() {
            eprintln!("{test}: skipped, needs {PGBOUNCER} (apt-get install pgbouncer)");
            return None;
        }
        let (host, port) = upstream.rsplit_once(':').expect("host:port");
        let dir = TempDir::new();
        let listen = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        // No ignore_startup_parameters: in PgBouncer mode the server sends none it would refuse.
        let ini = format!(
            "[databases]\n* = host={host} port={port}\n\n[pgbouncer]\n\
             listen_addr = 127.0.0.1\nlisten_port = {listen}\nunix_socket_dir =\n\
             auth_type = trust\nauth_file = {}\npool_mode = transaction\n\
             default_pool_size = {pool_size}\nmax_client_conn = 200\n",
            dir.path_str("users.txt")
        );
        std::fs::write(dir.join("users.txt"), "\"postgres\" \"\"\n").expect("users.txt");
        std::fs::write(dir.join("pgbouncer.ini"), ini).expect("pgbouncer.ini");
        // pgbouncer refuses to run as root; -u makes it drop to postgres, which must read these.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let mut cmd = tokio::process::Command::new(PGBOUNCER);
        if is_root() {
            cmd.args(["-u", "postgres"]);
        }
        let child = cmd
            .arg(dir.join("pgbouncer.ini"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn pgbouncer");
        let bouncer = Self {
            port: listen,
            child,
            _dir: dir,
        };
        let deadline = Instant::now() + PROCESS_PATIENCE;
        while tokio::net::TcpStream::connect(("127.0.0.1", listen))
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "pgbouncer never listened");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Some(bouncer)
    }

    /// `db`'s URL, through this pgbouncer.
    fn url_for(&self, db: &TestDb) -> String {
        let (prefix, _, path) = split_url(&db.url);
        format!("{prefix}127.0.0.1:{}{path}", self.port)
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

/// A server on `db` through `bouncer` in PgBouncer mode.
async fn server_behind(bouncer: &PgBouncer, db: &TestDb, dir: &TempDir) -> ServerProcess {
    let mut vars = server_env(db, dir);
    vars.insert("DATABASE_URL".into(), Some(bouncer.url_for(db)));
    vars.insert("KPS_DB_PGBOUNCER".into(), Some("true".into()));
    vars.insert("KPS_DB_MAX_CONNECTIONS".into(), Some("4".into()));
    vars.insert(
        "KPS_CONSUME_LIMIT_PER_MINUTE".into(),
        Some("1000000".into()),
    );
    ServerProcess::start(&vars).await
}

#[tokio::test]
async fn behind_pgbouncer_in_transaction_mode_every_route_works_from_two_processes() {
    let Some(db) = postgres_only!("pgbouncer") else {
        return;
    };
    let (_, upstream, _) = split_url(&db.url);
    // Two server connections for eight client connections: statements of different clients
    // interleave on the same server sessions, as in production.
    let Some(bouncer) = PgBouncer::start(&upstream, 2, "pgbouncer").await else {
        return;
    };
    let (dir_a, dir_b) = (TempDir::new(), TempDir::new());
    let a = server_behind(&bouncer, &db, &dir_a).await;
    // The second start runs the migration check again through the same server sessions.
    let b = server_behind(&bouncer, &db, &dir_b).await;

    let mut uploads = Vec::new();
    for i in 0..16 {
        let server = if i % 2 == 0 { &a } else { &b };
        let (client, url) = (server.client.clone(), server.url("/api/v1/key-packages"));
        uploads.push(tokio::spawn(async move {
            let user = format!("user{}", i % 4);
            client
                .post(url)
                .bearer_auth(token(&user))
                .header("content-type", "application/x-protobuf")
                .body(prost::Message::encode_to_vec(&upload_request(
                    &[(kp(&format!("p{i}")), false), (kp(&format!("lr{i}")), true)],
                    &fingerprint('c'),
                )))
                .send()
                .await
                .expect("upload")
                .status()
        }));
    }
    for upload in uploads {
        assert_eq!(upload.await.expect("upload task"), 201);
    }
    for user in ["user0", "user1", "user2", "user3"] {
        assert_eq!(a.status(user).await.regular_count, 4, "{user} on a");
        assert_eq!(b.status(user).await.regular_count, 4, "{user} on b");
    }
    for _ in 0..4 {
        let response = b.consume_raw("alice", "user0").await;
        assert_eq!(response.status(), 200);
    }
    let last_resort = a.consume_raw("alice", "user0").await;
    assert_eq!(last_resort.status(), 200, "the last-resort package");
    for server in [&a, &b] {
        let ready = server
            .client
            .get(server.url("/readyz"))
            .send()
            .await
            .expect("readyz");
        assert_eq!(ready.status(), 200);
        let fp = server
            .client
            .get(server.url("/api/v1/users/user1/fingerprint"))
            .bearer_auth(token("alice"))
            .send()
            .await
            .expect("fingerprint");
        assert_eq!(fp.status(), 200);
    }
    let deleted = a
        .client
        .delete(a.url("/api/v1/key-packages"))
        .bearer_auth(token("user2"))
        .send()
        .await
        .expect("delete");
    assert_eq!(deleted.status(), 204);
    assert_eq!(b.status("user2").await.regular_count, 0);
}

#[tokio::test]
async fn behind_pgbouncer_the_postgres_timeouts_still_cut_a_blocked_upload() {
    let Some(db) = postgres_only!("pgbouncer timeouts") else {
        return;
    };
    let (_, upstream, _) = split_url(&db.url);
    let Some(bouncer) = PgBouncer::start(&upstream, 4, "pgbouncer timeouts").await else {
        return;
    };
    let dir = TempDir::new();
    let server = server_behind(&bouncer, &db, &dir).await;
    server.upload("bob", &[(kp("before"), false)], "").await;

    // Another session (straight to Postgres) holds bob's row lock; the upload waits for it
    // until the timeouts set in its transaction (lock or statement, both 3 s) cancel the wait
    // inside Postgres, before the server's own 5 s deadline would.
    let mut holder = lock_user_row(&db.url, "bob").await;
    let mut admin: sqlx::PgConnection = sqlx::Connection::connect(&db.url).await.expect("connect");
    let upload = tokio::spawn({
        let (client, url) = (server.client.clone(), server.url("/api/v1/key-packages"));
        async move {
            client
                .post(url)
                .bearer_auth(token("bob"))
                .header("content-type", "application/x-protobuf")
                .body(prost::Message::encode_to_vec(&upload_request(
                    &[(kp("blocked"), false)],
                    "",
                )))
                .send()
                .await
                .expect("upload")
        }
    });
    wait_for_lock_waiters(&mut admin, &db_name(&db), 1).await;
    problem(
        upload.await.expect("upload task"),
        503,
        "service_unavailable",
    )
    .await;
    // The log line may follow the response: lines are written by a thread of their own.
    if let Err(log) = server
        .wait_for_line(|l| l.contains("canceling statement due to"))
        .await
    {
        panic!(
            "Postgres itself cancelled the wait (its lock or statement timeout), not only the \
             server's own deadline; log:\n{log}"
        );
    }
    sqlx::raw_sql("ROLLBACK")
        .execute(&mut holder)
        .await
        .expect("release");
    assert_eq!(server.status("bob").await.regular_count, 1);
}

/// Every conformance case on the store in PgBouncer mode, through a pgbouncer of its own with
/// fewer server connections than the store has clients.
mod conformance {
    use std::sync::Arc;

    use keypackage_server::store::{self, KeyPackageStore};

    use super::PgBouncer;
    use crate::{
        harness::{connect_options, TestDb},
        outage::split_url,
    };

    keypackage_server::conformance_tests!(fresh_store);

    async fn fresh_store() -> Option<((PgBouncer, TestDb), Arc<dyn KeyPackageStore>)> {
        let db = postgres_only!()?;
        let (_, upstream, _) = split_url(&db.url);
        let bouncer = PgBouncer::start(&upstream, 2, "pgbouncer conformance").await?;
        let mut options = connect_options(&bouncer.url_for(&db));
        options.pgbouncer = true;
        let store = store::connect(&options)
            .await
            .expect("open store behind pgbouncer");
        Some(((bouncer, db), store))
    }
}
