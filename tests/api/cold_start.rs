//! The real binary at its edges: simultaneous cold starts on a fresh data dir, keys refused at
//! start, `token --ttl` bounds, and a second signal during the drain.

use keypackage_server::{
    auth::{Authenticator, VerifyingKey},
    key_package::UserId,
    store,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::harness::{
    connect_options, env, is_ready_line, run_to_exit, secret_str, stderr_lines, token,
    ServerProcess, TempDir, TestDb, PATIENCE,
};

/// A token for `user` signed with `secret`.
fn token_with(secret: &[u8], user: &str) -> String {
    Authenticator::new(VerifyingKey::Secret(secret.to_vec()), None, None)
        .issue(&UserId::parse(user).unwrap(), 600)
        .unwrap()
}

#[tokio::test]
async fn two_simultaneous_cold_starts_both_become_ready_with_one_secret() {
    let mut rounds = 0;
    let mut attempts = 0;
    while rounds < 20 {
        attempts += 1;
        assert!(attempts < 40, "too many lost port races");
        let dir = TempDir::new();
        // No DATABASE_URL and no KPS_JWT_SECRET: the SQLite file and the dev secret are new.
        let vars = env(&[("KPS_DATA_DIR", &dir.path_str("data"))]);
        let servers = [ServerProcess::spawn(&vars), ServerProcess::spawn(&vars)];
        let mut ready = true;
        for server in &servers {
            if let Err(log) = server.wait_for_line(is_ready_line).await {
                // Another process took the probed port: not what this test is about.
                assert!(
                    log.contains("KPS_LISTEN_ADDR"),
                    "a cold start failed:\n{log}"
                );
                ready = false;
            }
        }
        if !ready {
            continue;
        }
        let secret = std::fs::read(dir.join("data/jwt-secret")).expect("the dev secret");
        let secret = secret.trim_ascii();
        assert_eq!(secret.len(), 64, "a whole secret");
        for server in &servers {
            server.wait_healthy().await;
            let response = server
                .client
                .get(server.url("/api/v1/key-packages"))
                .bearer_auth(token_with(secret, "alice"))
                .send()
                .await
                .expect("status request");
            assert_eq!(response.status(), 200, "{}", server.log_text());
        }
        rounds += 1;
    }
}

#[tokio::test]
async fn two_stores_opening_one_fresh_sqlite_file_at_once_both_work() {
    for _ in 0..20 {
        let db = TestDb::sqlite();
        let options = connect_options(&db.url);
        let (a, b) = tokio::join!(store::connect(&options), store::connect(&options));
        let (a, b) = (a.expect("first open"), b.expect("second open"));
        a.ping().await.expect("first answers");
        b.ping().await.expect("second answers");
    }
}

#[tokio::test]
async fn an_empty_dev_secret_left_by_a_crash_does_not_block_the_next_start() {
    let dir = TempDir::new();
    std::fs::create_dir_all(dir.join("data")).unwrap();
    std::fs::write(dir.join("data/jwt-secret"), b"").unwrap();
    let vars = env(&[("KPS_DATA_DIR", &dir.path_str("data"))]);
    let server = ServerProcess::start(&vars).await;
    let secret = std::fs::read(dir.join("data/jwt-secret")).unwrap();
    let response = server
        .client
        .get(server.url("/api/v1/key-packages"))
        .bearer_auth(token_with(secret.trim_ascii(), "alice"))
        .send()
        .await
        .expect("status request");
    assert_eq!(response.status(), 200);
}

/// Asserts that `output` is a failed start with one line on stderr naming `setting`.
fn assert_refused(output: &std::process::Output, setting: &str, what: &str) {
    assert!(!output.status.success(), "{what}: started");
    let lines = stderr_lines(output);
    assert_eq!(lines.len(), 1, "{what}: one line: {lines:?}");
    assert!(lines[0].contains(setting), "{what}: {}", lines[0]);
}

#[tokio::test]
async fn public_keys_no_token_could_verify_with_stop_the_start() {
    let dir = TempDir::new();
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/api/fixtures");
    for (file, says) in [
        ("p384-public.pem", "P-384"),
        ("p521-public.pem", "P-521"),
        ("rsa-1024-public.pem", "1024-bit"),
    ] {
        let path = fixtures.join(file).display().to_string();
        let vars = env(&[
            ("KPS_DATA_DIR", &dir.path_str("data")),
            ("KPS_JWT_PUBLIC_KEY_FILE", &path),
            ("KPS_LISTEN_ADDR", "127.0.0.1:0"),
        ]);
        let output = run_to_exit(&["serve"], &vars).await;
        assert_refused(&output, "KPS_JWT_PUBLIC_KEY_FILE", file);
        assert!(stderr_lines(&output)[0].contains(says), "{file}");
    }
}

#[tokio::test]
async fn a_huge_token_ttl_is_refused_cleanly() {
    let dir = TempDir::new();
    let vars = env(&[
        ("KPS_DATA_DIR", &dir.path_str("data")),
        ("KPS_JWT_SECRET", &secret_str()),
    ]);
    for ttl in ["18446744073709551615", "9223372036854775807"] {
        let output = run_to_exit(&["token", "alice", "--ttl", ttl], &vars).await;
        assert_refused(&output, "--ttl", ttl);
        assert!(output.stdout.is_empty());
    }
    let output = run_to_exit(&["token", "alice", "--ttl", "3153600000"], &vars).await;
    assert!(output.status.success(), "a century is fine");
}

#[tokio::test]
async fn a_second_sigterm_during_the_drain_ends_the_process_at_once() {
    let db = TestDb::new().await;
    let dir = TempDir::new();
    // The in-flight request below would hold the drain for two minutes.
    let mut server =
        ServerProcess::start_on(&db, &dir, &[("KPS_REQUEST_TIMEOUT_SECS", "120")]).await;
    let mut stream = TcpStream::connect(server.addr).await.expect("connect");
    let head = format!(
        "POST /api/v1/key-packages HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/x-protobuf\r\nContent-Length: 100\r\nExpect: 100-continue\r\n\r\n",
        token("alice")
    );
    stream.write_all(head.as_bytes()).await.expect("write");
    // `100 Continue` comes when the handler starts reading the body: the request is in flight.
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(PATIENCE, stream.read(&mut buf))
        .await
        .expect("100 Continue in time")
        .expect("read");
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 100"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    stream.write_all(&[0x0a]).await.expect("a first body byte");

    server.sigterm();
    server
        .wait_for_line(|l| l.contains("draining"))
        .await
        .expect("the drain starts");
    // Panics if the process has already exited: the drain must still be waiting.
    server.sigterm();
    let status = server.wait_exit().await;
    assert_eq!(status.code(), Some(128 + 15), "{}", server.log_text());
    server
        .wait_for_line(|l| l.contains("second SIGTERM"))
        .await
        .expect("the forced exit says why");
    drop(stream);
}
