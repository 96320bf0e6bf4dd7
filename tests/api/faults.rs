//! Postgres faults injected under a real server process: refused and terminated connections, a
//! restart, a read-only failover, exhausted slots and a stall mid-query. Each must answer 503
//! `service_unavailable` (never 500, never a hang), and the server must recover by itself.

use std::{
    future::Future,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use sqlx::Connection;
use tokio::time::Instant;

use crate::{
    harness::{
        fingerprint, kp, postgres_admin_url, problem, server_env, token, upload_request,
        ServerProcess, TempDir, TestDb, PROCESS_PATIENCE,
    },
    outage::{split_url, Proxy},
    pg_admin::{admin_sql, admin_url_of, db_name, lock_user_row, wait_for_lock_waiters},
    pg_cluster::PgCluster,
};

/// How long an answer may take while the database misbehaves ("a few seconds", generously).
const ANSWER_WITHIN: Duration = Duration::from_secs(10);

/// Settings for servers under load: a budget no load test can spend.
const UNLIMITED: &[(&str, &str)] = &[("KPS_CONSUME_LIMIT_PER_MINUTE", "1000000")];

/// Ends every session on database `name` except the caller's.
async fn terminate_backends(admin_url: &str, name: &str) {
    admin_sql(
        admin_url,
        &format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = '{name}' AND pid <> pg_backend_pid()"
        ),
    )
    .await;
}

/// Every data route once; each must answer 503 `service_unavailable` in time.
async fn assert_every_route_unavailable(server: &ServerProcess, what: &str) {
    for request in data_requests(server) {
        let request = request.build().expect("request");
        let route = format!("{} {}", request.method(), request.url().path());
        let response =
            server.client.execute(request).await.unwrap_or_else(|e| {
                panic!("{what}: {route}: no answer within {ANSWER_WITHIN:?}: {e}")
            });
        assert_eq!(
            response.status(),
            503,
            "{what}: {route}: {:?}",
            response.text().await
        );
    }
    assert_eq!(get_status(server, "/readyz").await, 503, "{what}: /readyz");
}

/// Upload, consume, status, delete and fingerprint requests as alice, with a deadline each.
fn data_requests(server: &ServerProcess) -> Vec<reqwest::RequestBuilder> {
    let body = prost::Message::encode_to_vec(&upload_request(&[(kp("during"), false)], ""));
    [
        server
            .client
            .post(server.url("/api/v1/key-packages"))
            .header("content-type", "application/x-protobuf")
            .body(body),
        server.client.get(server.url("/api/v1/key-packages/bob")),
        server.client.get(server.url("/api/v1/key-packages")),
        server.client.delete(server.url("/api/v1/key-packages")),
        server
            .client
            .get(server.url("/api/v1/users/bob/fingerprint")),
    ]
    .into_iter()
    .map(|r| r.bearer_auth(token("alice")).timeout(ANSWER_WITHIN))
    .collect()
}

/// GETs `path` as alice; the answer must come within [`ANSWER_WITHIN`].
async fn get_status(server: &ServerProcess, path: &str) -> u16 {
    server
        .client
        .get(server.url(path))
        .bearer_auth(token("alice"))
        .timeout(ANSWER_WITHIN)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {path}: no answer within {ANSWER_WITHIN:?}: {e}"))
        .status()
        .as_u16()
}

/// Polls (bounded, no restart) until the server is ready and serves uploads and reads again.
async fn assert_recovers(server: &ServerProcess, what: &str) {
    let deadline = Instant::now() + PROCESS_PATIENCE;
    loop {
        let ready = get_status(server, "/readyz").await == 200;
        let uploaded = ready
            && server
                .upload_raw("carol", &upload_request(&[(kp(what), false)], ""))
                .await
                .status()
                == 201;
        if uploaded {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: never served again; log:\n{}",
            server.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(server.status("carol").await.regular_count >= 1);
    assert_eq!(get_status(server, "/api/v1/key-packages/carol").await, 200);
}

/// Runs a bounded mixed load (uploads, consumes, status reads) from several workers, fires
/// `fault` once some requests have been answered, and returns every status seen. Workers go
/// on until the fault has finished and then a little longer, so requests straddle it.
async fn under_load(server: &ServerProcess, fault: impl Future<Output = ()>) -> Vec<u16> {
    const WORKERS: usize = 4;
    const AFTER_FAULT: usize = 15;
    const AT_MOST: usize = 2_000;
    let answered = Arc::new(AtomicUsize::new(0));
    let fault_done = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(tokio::sync::Notify::new());
    let mut workers = Vec::new();
    for w in 0..WORKERS {
        let (client, base) = (server.client.clone(), server.base.clone());
        let (answered, fault_done, progress) =
            (answered.clone(), fault_done.clone(), progress.clone());
        workers.push(tokio::spawn(async move {
            let user = format!("load{w}");
            let mut statuses = Vec::new();
            let mut after = 0;
            for i in 0..AT_MOST {
                let request = match i % 3 {
                    0 => client
                        .post(format!("{base}/api/v1/key-packages"))
                        .header("content-type", "application/x-protobuf")
                        .body(prost::Message::encode_to_vec(&upload_request(
                            &[(kp(&format!("{w}-{i}")), false)],
                            "",
                        ))),
                    1 => client.get(format!("{base}/api/v1/key-packages/{user}")),
                    _ => client.get(format!("{base}/api/v1/key-packages")),
                };
                let response = request
                    .bearer_auth(token(&user))
                    .timeout(ANSWER_WITHIN)
                    .send()
                    .await
                    .unwrap_or_else(|e| panic!("no answer within {ANSWER_WITHIN:?}: {e}"));
                statuses.push(response.status().as_u16());
                answered.fetch_add(1, Ordering::SeqCst);
                progress.notify_waiters();
                if fault_done.load(Ordering::SeqCst) {
                    after += 1;
                    if after >= AFTER_FAULT {
                        break;
                    }
                }
            }
            statuses
        }));
    }
    // Fault once the load is flowing.
    while answered.load(Ordering::SeqCst) < 20 {
        let notified = progress.notified();
        if answered.load(Ordering::SeqCst) >= 20 {
            break;
        }
        let _ = tokio::time::timeout(ANSWER_WITHIN, notified).await;
    }
    fault.await;
    fault_done.store(true, Ordering::SeqCst);
    let mut all = Vec::new();
    for worker in workers {
        all.extend(worker.await.expect("load worker"));
    }
    all
}

/// Every status must be a success, a normal "nothing there", or 503.
fn assert_only_success_or_503(statuses: &[u16], what: &str) {
    let unexpected: Vec<_> = statuses
        .iter()
        .filter(|s| ![200, 201, 204, 404, 503].contains(*s))
        .collect();
    assert!(
        unexpected.is_empty(),
        "{what}: unexpected statuses {unexpected:?} among {} answers",
        statuses.len()
    );
}

/// A server process on `db` with a budget load tests cannot spend.
async fn server_on(db: &TestDb, dir: &TempDir) -> ServerProcess {
    ServerProcess::start_on(db, dir, UNLIMITED).await
}

#[tokio::test]
async fn a_refused_connection_answers_503_and_the_server_recovers() {
    let Some(db) = postgres_only!("refused connection") else {
        return;
    };
    let (prefix, upstream, path) = split_url(&db.url);
    let proxy = Proxy::start(upstream).await;
    let dir = TempDir::new();
    let mut vars = server_env(&db, &dir);
    vars.insert(
        "DATABASE_URL".into(),
        Some(format!("{prefix}{}{path}", proxy.addr)),
    );
    let server = ServerProcess::start(&vars).await;
    server.upload("bob", &[(kp("before"), false)], "").await;

    proxy.cut();
    assert_every_route_unavailable(&server, "connection refused").await;

    proxy.restore();
    assert_recovers(&server, "after refusal").await;
}

#[tokio::test]
async fn a_database_that_stops_accepting_connections_answers_503_and_recovers() {
    let Some(db) = postgres_only!("database not accepting connections") else {
        return;
    };
    let (admin, name) = (admin_url_of(&db), db_name(&db));
    let dir = TempDir::new();
    let server = server_on(&db, &dir).await;
    server.upload("bob", &[(kp("before"), false)], "").await;

    // New sessions now fail with SQLSTATE 55000, which no list of "unavailable" codes names.
    admin_sql(
        &admin,
        &format!("ALTER DATABASE {name} ALLOW_CONNECTIONS false"),
    )
    .await;
    terminate_backends(&admin, &name).await;
    assert_every_route_unavailable(&server, "not accepting connections").await;

    admin_sql(
        &admin,
        &format!("ALTER DATABASE {name} ALLOW_CONNECTIONS true"),
    )
    .await;
    assert_recovers(&server, "after allow_connections").await;
}

#[tokio::test]
async fn backends_terminated_mid_load_answer_503_never_500_and_the_server_recovers() {
    let Some(db) = postgres_only!("backends terminated mid-load") else {
        return;
    };
    let (admin, name) = (admin_url_of(&db), db_name(&db));
    let dir = TempDir::new();
    let server = server_on(&db, &dir).await;
    let statuses = under_load(&server, async {
        for _ in 0..5 {
            terminate_backends(&admin, &name).await;
        }
    })
    .await;
    assert_only_success_or_503(&statuses, "backends terminated");
    assert_recovers(&server, "after termination").await;
}

#[tokio::test]
async fn a_postgres_restart_mid_load_answers_503_never_500_and_the_server_recovers() {
    if postgres_admin_url().is_none() {
        eprintln!("postgres restart: skipped, needs TEST_DATABASE_URL=postgres://…");
        return;
    }
    let Some(cluster) = PgCluster::start("postgres restart", &[]) else {
        return;
    };
    let db = TestDb::postgres(&cluster.admin_url()).await;
    let dir = TempDir::new();
    let server = server_on(&db, &dir).await;
    let cluster = Arc::new(cluster);
    let restarting = cluster.clone();
    let statuses = under_load(&server, async move {
        tokio::task::spawn_blocking(move || restarting.restart())
            .await
            .expect("restart");
    })
    .await;
    assert_only_success_or_503(&statuses, "postgres restart");
    assert_recovers(&server, "after restart").await;
    drop(server);
    drop(db);
}

#[tokio::test]
async fn a_read_only_database_refuses_writes_with_503_and_still_serves_reads() {
    let Some(db) = postgres_only!("read-only database") else {
        return;
    };
    let (admin, name) = (admin_url_of(&db), db_name(&db));
    let dir = TempDir::new();
    let server = server_on(&db, &dir).await;
    let response = server
        .upload_raw(
            "bob",
            &upload_request(&[(kp("before"), false)], &fingerprint('b')),
        )
        .await;
    assert_eq!(response.status(), 201);

    // What a failover to a standby looks like from here: sessions end, new ones are read-only.
    admin_sql(
        &admin,
        &format!("ALTER DATABASE {name} SET default_transaction_read_only = on"),
    )
    .await;
    terminate_backends(&admin, &name).await;

    let upload = server
        .upload_raw("bob", &upload_request(&[(kp("during"), false)], ""))
        .await;
    problem(upload, 503, "service_unavailable").await;
    let consume = server.consume_raw("alice", "bob").await;
    problem(consume, 503, "service_unavailable").await;
    let delete = server
        .client
        .delete(server.url("/api/v1/key-packages"))
        .bearer_auth(token("bob"))
        .send()
        .await
        .expect("delete");
    problem(delete, 503, "service_unavailable").await;

    assert_eq!(server.status("bob").await.regular_count, 1, "reads go on");
    assert_eq!(
        get_status(&server, "/api/v1/users/bob/fingerprint").await,
        200
    );
    assert_eq!(get_status(&server, "/readyz").await, 200);

    admin_sql(
        &admin,
        &format!("ALTER DATABASE {name} RESET default_transaction_read_only"),
    )
    .await;
    terminate_backends(&admin, &name).await;
    assert_recovers(&server, "after read-only").await;
}

#[tokio::test]
async fn exhausted_connection_slots_answer_503_and_the_server_recovers() {
    if postgres_admin_url().is_none() {
        eprintln!("exhausted slots: skipped, needs TEST_DATABASE_URL=postgres://…");
        return;
    }
    // Few slots and none reserved, so the test can take every one of them.
    let Some(cluster) = PgCluster::start(
        "exhausted slots",
        &["max_connections = 6", "superuser_reserved_connections = 0"],
    ) else {
        return;
    };
    let db = TestDb::postgres(&cluster.admin_url()).await;
    let (admin, name) = (cluster.admin_url(), db_name(&db));
    let dir = TempDir::new();
    let server = server_on(&db, &dir).await;
    server.upload("bob", &[(kp("before"), false)], "").await;

    terminate_backends(&admin, &name).await;
    let mut hogs = Vec::new();
    while let Ok(conn) = sqlx::PgConnection::connect(&admin).await {
        hogs.push(conn);
        assert!(hogs.len() <= 6, "more sessions than max_connections");
    }
    assert_every_route_unavailable(&server, "no free slot").await;

    for conn in hogs {
        let _ = conn.close().await;
    }
    assert_recovers(&server, "after slots freed").await;
    drop(server);
    drop(db);
}

#[tokio::test]
async fn a_stall_after_the_query_was_sent_answers_503_before_the_request_timeout() {
    let Some(db) = postgres_only!("stall mid-query") else {
        return;
    };
    let name = db_name(&db);
    let (prefix, upstream, path) = split_url(&db.url);
    let proxy = Proxy::start(upstream).await;
    let dir = TempDir::new();
    let mut vars = server_env(&db, &dir);
    vars.insert(
        "DATABASE_URL".into(),
        Some(format!("{prefix}{}{path}", proxy.addr)),
    );
    let server = ServerProcess::start(&vars).await;
    server.upload("bob", &[(kp("before"), false)], "").await;

    // Park an upload inside the database (on bob's row lock), then freeze the network: the
    // query is sent, and no answer, not even Postgres's own lock timeout, can come back.
    let mut holder = lock_user_row(&db.url, "bob").await;
    let mut admin = sqlx::PgConnection::connect(&db.url).await.expect("connect");
    let upload = tokio::spawn({
        let (client, url) = (server.client.clone(), server.url("/api/v1/key-packages"));
        async move {
            client
                .post(url)
                .bearer_auth(token("bob"))
                .header("content-type", "application/x-protobuf")
                .body(prost::Message::encode_to_vec(&upload_request(
                    &[(kp("stalled"), false)],
                    "",
                )))
                .timeout(Duration::from_secs(20))
                .send()
                .await
        }
    });
    wait_for_lock_waiters(&mut admin, &name, 1).await;
    proxy.stall();

    let response = upload.await.expect("upload task").expect("an answer");
    // 408 would mean only the request timeout cut it; the store's own deadline must come first.
    problem(response, 503, "service_unavailable").await;

    sqlx::raw_sql("ROLLBACK")
        .execute(&mut holder)
        .await
        .expect("release");
    proxy.restore();
    assert_recovers(&server, "after stall").await;
}
