//! The binary's life as an operator sees it: the `token` subcommand, the data dir, start-up
//! errors, the ready line, and graceful shutdown on SIGTERM and SIGINT.

use std::time::Duration;

use prost::Message;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
    time::Instant,
};

use crate::harness::*;

/// Runs `keypackage-server token <user> --ttl <ttl>` and returns the printed token.
async fn issue_token(vars: &Env, user: &str, ttl: &str) -> String {
    let output = run_to_exit(&["token", user, "--ttl", ttl], vars).await;
    assert!(
        output.status.success(),
        "token failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout).expect("utf-8 token");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "one line on stdout: {stdout:?}");
    lines[0].trim().to_owned()
}

/// GET of the caller's status with `bearer`; returns the HTTP status.
async fn status_with(server: &ServerProcess, bearer: &str) -> u16 {
    let authorization = format!("Bearer {bearer}");
    let response = server.status_with(Some(&authorization)).await;
    response.status().as_u16()
}

#[tokio::test]
async fn token_subcommand_prints_a_token_the_running_server_accepts() {
    let db = TestDb::new().await;
    let dir = TempDir::new();
    let vars = server_env(&db, &dir);
    let server = ServerProcess::start(&vars).await;

    let issued = issue_token(&vars, "alice", "60").await;
    assert_eq!(status_with(&server, &issued).await, 200);

    let claims = jsonwebtoken::decode::<serde_json::Value>(
        &issued,
        &jsonwebtoken::DecodingKey::from_secret(secret_str().as_bytes()),
        &jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256),
    )
    .expect("an HS256 token signed with KPS_JWT_SECRET")
    .claims;
    assert_eq!(claims["sub"], "alice");
    let exp = claims["exp"].as_u64().expect("exp");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    assert!(
        exp > now && exp <= now + 60,
        "exp {exp} is within --ttl 60 of now {now}"
    );
}

#[tokio::test]
async fn without_a_secret_a_private_dev_secret_is_generated_once_and_reused() {
    use std::os::unix::fs::PermissionsExt;

    let db = TestDb::new().await;
    let dir = TempDir::new();
    let data_dir = dir.join("data");
    let vars = env(&[
        ("DATABASE_URL", &db.url),
        ("KPS_DATA_DIR", &data_dir.display().to_string()),
    ]);
    let mut server = ServerProcess::start(&vars).await;
    assert!(
        server.lines().iter().any(|l| l.contains("KPS_JWT_SECRET")),
        "a loud warning names KPS_JWT_SECRET:\n{}",
        server.log_text()
    );

    // The database lives elsewhere, so the data dir holds the generated secret alone.
    let files: Vec<_> = std::fs::read_dir(&data_dir)
        .expect("the data dir exists")
        .map(|e| e.expect("dir entry").path())
        .collect();
    assert_eq!(files.len(), 1, "only the secret in the data dir: {files:?}");
    let secret_file = &files[0];
    let mode = std::fs::metadata(secret_file)
        .expect("stat")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the secret is private to its owner");
    let secret = std::fs::read(secret_file).expect("read secret");

    let issued = issue_token(&vars, "alice", "600").await;
    assert_eq!(status_with(&server, &issued).await, 200);
    assert_eq!(
        status_with(&server, &token("alice")).await,
        401,
        "a token signed with another secret is refused"
    );

    server.sigterm();
    assert!(server.wait_exit().await.success());
    let server = ServerProcess::start(&vars).await;
    assert_eq!(
        std::fs::read(secret_file).expect("read secret"),
        secret,
        "the same secret"
    );
    assert_eq!(
        status_with(&server, &issued).await,
        200,
        "a token from before the restart still verifies"
    );
}

#[tokio::test]
async fn server_creates_a_missing_data_dir_and_its_sqlite_database() {
    let dir = TempDir::new();
    let data_dir = dir.join("not/yet/there");
    let vars = env(&[
        ("KPS_JWT_SECRET", &secret_str()),
        ("KPS_DATA_DIR", &data_dir.display().to_string()),
    ]);
    let mut server = ServerProcess::start(&vars).await;
    assert!(data_dir.is_dir(), "KPS_DATA_DIR was created");
    server.upload("alice", &[(kp("kept"), false)], "").await;
    server.sigterm();
    assert!(server.wait_exit().await.success());

    let files = std::fs::read_dir(&data_dir).expect("read data dir").count();
    assert!(files > 0, "the embedded database lives in the data dir");
    let server = ServerProcess::start(&vars).await;
    assert_eq!(
        server.status("alice").await.regular_count,
        1,
        "the data survived a restart"
    );

    // An explicit SQLite URL whose file and parent directories do not exist yet.
    let db_file = dir.join("elsewhere/deeper/kps.db");
    let vars = env(&[
        ("KPS_JWT_SECRET", &secret_str()),
        ("KPS_DATA_DIR", &dir.path_str("unused")),
        ("DATABASE_URL", &format!("sqlite://{}", db_file.display())),
    ]);
    let server = ServerProcess::start(&vars).await;
    assert!(db_file.is_file(), "the SQLite file was created");
    server.upload("bob", &[(kp("kept"), false)], "").await;
}

#[tokio::test]
async fn unusable_settings_stop_start_up_with_one_line_naming_the_setting() {
    let dir = TempDir::new();
    let garbage_key = dir.join("garbage.pem");
    std::fs::write(
        &garbage_key,
        "-----BEGIN PUBLIC KEY-----\nnot a key\n-----END PUBLIC KEY-----\n",
    )
    .expect("write key file");
    let a_file = dir.join("a-file");
    std::fs::write(&a_file, "").expect("write file");
    let garbage_key = garbage_key.display().to_string();
    let missing_key = dir.path_str("missing.pem");
    let under_a_file = a_file.join("data").display().to_string();
    let secret = secret_str();
    let base = env(&[
        ("KPS_JWT_SECRET", &secret),
        ("KPS_DATA_DIR", &dir.path_str("data")),
        (
            "DATABASE_URL",
            &format!("sqlite://{}", dir.path_str("kps.db")),
        ),
    ]);
    // Variables to set (`None`: unset), and the names the error line must contain.
    type Settings<'a> = Vec<(&'a str, Option<&'a str>)>;
    let cases: Vec<(Settings, Vec<&str>)> = vec![
        (
            vec![("KPS_JWT_PUBLIC_KEY_FILE", Some(&missing_key))],
            vec!["KPS_JWT_SECRET", "KPS_JWT_PUBLIC_KEY_FILE"],
        ),
        (
            vec![("KPS_CONSUME_LIMIT_PER_MINUTE", Some("abc"))],
            vec!["KPS_CONSUME_LIMIT_PER_MINUTE"],
        ),
        (
            vec![("KPS_CONSUME_LIMIT_PER_MINUTE", Some("0"))],
            vec!["KPS_CONSUME_LIMIT_PER_MINUTE"],
        ),
        (
            vec![("KPS_CONSUME_LIMIT_PER_MINUTE", Some("-5"))],
            vec!["KPS_CONSUME_LIMIT_PER_MINUTE"],
        ),
        (
            vec![("KPS_MAX_BODY_BYTES", Some("abc"))],
            vec!["KPS_MAX_BODY_BYTES"],
        ),
        (
            vec![("KPS_MAX_BODY_BYTES", Some("0"))],
            vec!["KPS_MAX_BODY_BYTES"],
        ),
        (
            vec![("DATABASE_URL", Some("mysql://localhost/kps"))],
            vec!["DATABASE_URL"],
        ),
        (
            vec![("KPS_LISTEN_ADDR", Some("nowhere"))],
            vec!["KPS_LISTEN_ADDR"],
        ),
        (
            vec![
                ("KPS_JWT_SECRET", None),
                ("KPS_JWT_PUBLIC_KEY_FILE", Some(&missing_key)),
            ],
            vec!["KPS_JWT_PUBLIC_KEY_FILE"],
        ),
        (
            vec![
                ("KPS_JWT_SECRET", None),
                ("KPS_JWT_PUBLIC_KEY_FILE", Some(&garbage_key)),
            ],
            vec!["KPS_JWT_PUBLIC_KEY_FILE"],
        ),
        (
            vec![
                ("KPS_JWT_SECRET", None),
                ("KPS_DATA_DIR", Some(&under_a_file)),
            ],
            vec!["KPS_DATA_DIR"],
        ),
    ];
    for (settings, names) in cases {
        let mut vars = base.clone();
        for (key, value) in &settings {
            vars.insert((*key).to_owned(), value.map(str::to_owned));
        }
        let output = run_to_exit(&["serve"], &vars).await;
        let lines = stderr_lines(&output);
        assert!(
            !output.status.success(),
            "{settings:?} must stop start-up; log: {lines:?}"
        );
        assert_eq!(
            lines.len(),
            1,
            "{settings:?}: one line on stderr, got {lines:?}"
        );
        for name in names {
            assert!(
                lines[0].contains(name),
                "{settings:?}: {:?} names {name}",
                lines[0]
            );
        }
    }
}

#[tokio::test]
async fn logs_one_ready_line_and_healthz_answers_from_then_on() {
    let db = TestDb::new().await;
    let dir = TempDir::new();
    let vars = server_env(&db, &dir);
    let mut server = ServerProcess::spawn_ready(&vars).await;
    // No retry: once the ready line is out, /healthz must answer.
    let health = server
        .client
        .get(server.url("/healthz"))
        .send()
        .await
        .expect("healthz");
    assert_eq!(health.status(), 200);
    let ready = server
        .client
        .get(server.url("/readyz"))
        .send()
        .await
        .expect("readyz");
    assert_eq!(ready.status(), 200);
    server.upload("alice", &[(kp("one"), false)], "").await;
    let health = server
        .client
        .get(server.url("/healthz"))
        .send()
        .await
        .expect("healthz");
    assert_eq!(health.status(), 200);

    server.sigterm();
    assert!(server.wait_exit().await.success());
    let ready_lines: Vec<_> = server
        .lines()
        .into_iter()
        .filter(|l| is_ready_line(l))
        .collect();
    assert_eq!(
        ready_lines.len(),
        1,
        "exactly one ready line: {ready_lines:?}"
    );
}

#[tokio::test]
async fn a_signal_right_after_the_ready_line_exits_0() {
    // A signal that lands before the server listens for it kills the process or is lost; the
    // window is small, so take several shots at it.
    let db = TestDb::new().await;
    let dir = TempDir::new();
    let vars = server_env(&db, &dir);
    for attempt in 0..10 {
        let mut server = ServerProcess::spawn_ready(&vars).await;
        let signal = if attempt % 2 == 0 { "TERM" } else { "INT" };
        server.signal(signal);
        let status = server.wait_exit().await;
        assert_eq!(
            status.code(),
            Some(0),
            "SIG{signal} at once after ready: {status}"
        );
    }
}

#[tokio::test]
async fn sigterm_lets_an_in_flight_upload_finish_then_exits_0() {
    shutdown_finishes_in_flight_requests("TERM").await;
}

#[tokio::test]
async fn sigint_lets_an_in_flight_upload_finish_then_exits_0() {
    shutdown_finishes_in_flight_requests("INT").await;
}

/// Starts an upload whose body arrives slowly, signals the server once it is reading that body,
/// waits until it refuses new connections, then sends the rest: the upload must still succeed.
async fn shutdown_finishes_in_flight_requests(signal: &str) {
    let db = TestDb::new().await;
    let dir = TempDir::new();
    let vars = server_env(&db, &dir);
    let mut server = ServerProcess::start(&vars).await;

    let entries = [
        (kp("slow-1"), false),
        (kp("slow-2"), false),
        (kp("slow-3"), false),
    ];
    let body = upload_request(&entries, "").encode_to_vec();
    let (head, tail) = body.split_at(body.len() / 2);
    let mut stream = BufReader::new(TcpStream::connect(server.addr).await.expect("connect"));
    let headers = format!(
        "POST /api/v1/key-packages HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/x-protobuf\r\nContent-Length: {}\r\n\
         Expect: 100-continue\r\n\r\n",
        server.addr,
        token("alice"),
        body.len()
    );
    stream
        .write_all(headers.as_bytes())
        .await
        .expect("send headers");
    // `100 Continue` comes when the handler starts reading the body: the request is in flight.
    let interim = read_head(&mut stream).await;
    assert!(
        interim.starts_with("HTTP/1.1 100"),
        "expected 100 Continue, got {interim:?}"
    );
    stream.write_all(head).await.expect("send half the body");
    stream.flush().await.expect("flush");

    server.signal(signal);
    let deadline = Instant::now() + PROCESS_PATIENCE;
    while TcpStream::connect(server.addr).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "the server kept accepting after SIG{signal}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    stream
        .write_all(tail)
        .await
        .expect("send the rest of the body");
    stream.flush().await.expect("flush");
    let mut response = Vec::new();
    tokio::time::timeout(PROCESS_PATIENCE, stream.read_to_end(&mut response))
        .await
        .expect("the response arrives")
        .expect("read the response");
    let response = String::from_utf8_lossy(&response);
    assert!(
        response.starts_with("HTTP/1.1 201"),
        "the in-flight upload completed: {response:?}"
    );

    let status = server.wait_exit().await;
    assert_eq!(
        status.code(),
        Some(0),
        "exit 0 after SIG{signal}; log:\n{}",
        server.log_text()
    );

    let server = ServerProcess::start(&vars).await;
    assert_eq!(
        server.status("alice").await.regular_count,
        3,
        "the upload was stored"
    );
}

/// Reads one response head (status line and headers) and returns it.
async fn read_head(stream: &mut BufReader<TcpStream>) -> String {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        let read = tokio::time::timeout(PROCESS_PATIENCE, stream.read_line(&mut line))
            .await
            .expect("the server answers")
            .expect("read");
        assert!(read > 0, "connection closed after {head:?}");
        if line == "\r\n" {
            return head;
        }
        head.push_str(&line);
    }
}
