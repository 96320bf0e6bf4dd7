//! Edges of the HTTP layer: methods on the consume route, the empty target id, bounded metric
//! labels, the connection cap and audience lists in tokens.

use std::{process::Stdio, time::Duration};

use keypackage_server::{
    app::Limits,
    auth::{Authenticator, VerifyingKey},
    rate_limit::Budget,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::harness::{
    command, kp, problem, server_env, spawn_app, spawn_app_with, token, unix_now, v1_limits,
    AppOptions, TempDir, TestDb, PATIENCE, PROCESS_PATIENCE, SECRET,
};

#[tokio::test]
async fn head_on_the_consume_route_is_405_with_allow_get_and_consumes_nothing() {
    // A budget of one: a HEAD that charged it would make the GET below a 429.
    let app = spawn_app_with(AppOptions {
        limits: Limits {
            budget: Budget::per_minute(1),
            ..v1_limits()
        },
        ..AppOptions::default()
    })
    .await;
    app.upload("bob", &[(kp("only"), false)], "").await;
    let head = app
        .client
        .head(app.url("/api/v1/key-packages/bob"))
        .bearer_auth(token("alice"))
        .send()
        .await
        .expect("request");
    assert_eq!(head.status(), 405);
    assert_eq!(head.headers()["allow"], "GET");
    for method in ["PUT", "PATCH", "POST", "DELETE", "OPTIONS", "X-CONSUME"] {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let response = app
            .client
            .request(method.clone(), app.url("/api/v1/key-packages/bob"))
            .bearer_auth(token("alice"))
            .send()
            .await
            .expect("request");
        assert_eq!(
            response.headers().get("allow").map(|v| v.to_owned()),
            Some("GET".parse().unwrap()),
            "{method}"
        );
        problem(response, 405, "method_not_allowed").await;
    }
    assert_eq!(
        app.status("bob").await.regular_count,
        1,
        "the package is still there"
    );
    app.assert_hands_out("bob", &[kp("only")]).await;
}

#[tokio::test]
async fn an_empty_target_id_is_400_invalid_user_id_and_401_without_a_token() {
    let app = spawn_app().await;
    problem(app.consume_raw("alice", "").await, 400, "invalid_user_id").await;
    let anonymous = app
        .client
        .get(app.url("/api/v1/key-packages/"))
        .send()
        .await
        .expect("request");
    assert_eq!(anonymous.headers()["www-authenticate"], "Bearer");
    problem(anonymous, 401, "unauthorized").await;
}

/// Non-comment lines of the Prometheus exposition: one per series (and bucket).
async fn series(client: &reqwest::Client, base: &str) -> usize {
    let text = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .count()
}

/// Resident set size of process `pid`, in bytes.
fn rss_bytes(pid: u32) -> u64 {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).expect("read statm");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("statm resident field");
    pages * 4096
}

/// Sends `count` token-less requests, each with its own method name and path, from 4 clients.
async fn distinct_requests(base: &str, from: usize, count: usize) {
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..4 {
        let base = base.to_owned();
        tasks.spawn(async move {
            let client = reqwest::Client::new();
            for i in (from + worker..from + count).step_by(4) {
                let method = reqwest::Method::from_bytes(format!("M{i}").as_bytes()).unwrap();
                let path = match i % 3 {
                    0 => format!("/nothing/here/{i}"),
                    1 => format!("/api/v1/key-packages/user{i}"),
                    _ => format!("/api/v1/users/user{i}/fingerprint"),
                };
                let response = client
                    .request(method, format!("{base}{path}"))
                    .send()
                    .await
                    .expect("request");
                assert!(response.status().is_client_error());
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("client task");
    }
}

#[tokio::test]
async fn requests_with_new_methods_and_paths_add_no_metric_series_and_no_memory() {
    // The real binary, so that its memory is its own (this process runs other tests at once).
    let db = TestDb::new().await;
    let dir = TempDir::new();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("probe a port")
        .port();
    let mut vars = server_env(&db, &dir);
    vars.insert("KPS_LISTEN_ADDR".into(), Some(format!("127.0.0.1:{port}")));
    vars.insert("RUST_LOG".into(), Some("error".into()));
    let mut child = command(&vars)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the server");
    let pid = child.id().expect("a pid");
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + PROCESS_PATIENCE;
    while !matches!(client.get(format!("{base}/healthz")).send().await, Ok(r) if r.status() == 200)
    {
        assert!(
            child.try_wait().expect("wait").is_none(),
            "the server exited"
        );
        assert!(tokio::time::Instant::now() < deadline, "never healthy");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Warm up: every label combination these requests can produce, allocator pools, buffers.
    distinct_requests(&base, 0, 2_000).await;
    series(&client, &base).await;
    let before = series(&client, &base).await;
    let rss_before = rss_bytes(pid);
    distinct_requests(&base, 2_000, 10_000).await;
    let after = series(&client, &base).await;
    let rss_after = rss_bytes(pid);
    let _ = child.start_kill();
    assert_eq!(after, before, "10 000 new methods and paths added series");
    let growth = rss_after.saturating_sub(rss_before);
    assert!(growth < 2 << 20, "RSS grew by {growth} bytes");
}

/// Sends a `/healthz` request on `stream` and reads the whole answer.
async fn healthz(stream: &mut TcpStream) -> String {
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .expect("write");
    read_healthz(stream).await
}

/// Reads a `/healthz` answer (its body is `ok\n`).
async fn read_healthz(stream: &mut TcpStream) -> String {
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    while !answer.ends_with(b"ok\n") {
        let n = stream.read(&mut buf).await.expect("read");
        assert!(n > 0, "closed before answering");
        answer.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn beyond_the_connection_cap_a_client_waits_until_a_slot_frees() {
    let app = spawn_app_with(AppOptions {
        limits: Limits {
            max_connections: 2,
            ..v1_limits()
        },
        ..AppOptions::default()
    })
    .await;
    let addr = app.base.trim_start_matches("http://").to_owned();
    // Two served connections, then idle: both slots are taken.
    let mut first = TcpStream::connect(&addr).await.expect("connect");
    assert!(healthz(&mut first).await.starts_with("HTTP/1.1 200"));
    let mut second = TcpStream::connect(&addr).await.expect("connect");
    assert!(healthz(&mut second).await.starts_with("HTTP/1.1 200"));

    let mut third = TcpStream::connect(&addr)
        .await
        .expect("the kernel backlog accepts");
    third
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .expect("write");
    let mut byte = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_millis(500), third.read(&mut byte)).await;
    assert!(early.is_err(), "answered beyond the cap: {early:?}");

    drop(first);
    let answer = tokio::time::timeout(PATIENCE, read_healthz(&mut third))
        .await
        .expect("answered once a slot freed");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(healthz(&mut second).await.starts_with("HTTP/1.1 200"));
}

#[tokio::test]
async fn a_token_whose_audience_is_a_list_is_accepted() {
    let sign = |aud: serde_json::Value| {
        let claims = serde_json::json!({ "sub": "alice", "exp": unix_now() + 600, "aud": aud });
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(SECRET),
        )
        .unwrap()
    };
    let list = sign(serde_json::json!(["account", "kps"]));
    let status = |app: &crate::harness::TestApp, token: String| {
        let request = app
            .client
            .get(app.url("/api/v1/key-packages"))
            .bearer_auth(token);
        async move { request.send().await.expect("request").status() }
    };
    let open = spawn_app().await;
    assert_eq!(
        status(&open, list.clone()).await,
        200,
        "no audience configured"
    );
    let strict = spawn_app_with(AppOptions {
        auth: Authenticator::new(
            VerifyingKey::Secret(SECRET.to_vec()),
            None,
            Some("kps".into()),
        ),
        ..AppOptions::default()
    })
    .await;
    assert_eq!(
        status(&strict, list).await,
        200,
        "the list names our audience"
    );
    let elsewhere = sign(serde_json::json!(["account", "other"]));
    assert_eq!(status(&strict, elsewhere).await, 401);
}
