//! Slow clients: a trickled body or header is cut by its timeout while others are served.

use std::time::{Duration, Instant};

use keypackage_server::wire::KeyPackageStatus;
use prost::Message;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::harness::*;

#[tokio::test]
async fn a_slow_body_is_cut_by_the_request_timeout_while_others_are_served() {
    let app = spawn_limited_app(262_144).await;
    app.upload("bob", &[(kp("lr"), true)], "").await;
    let body = upload_request(&[(kp("slow"), false)], "").encode_to_vec();
    let head = raw_request(
        "POST",
        b"/api/v1/key-packages",
        &[
            bearer_line("mallory"),
            b"Content-Type: application/x-protobuf".to_vec(),
            format!("Content-Length: {}", body.len() + 1000).into_bytes(),
        ],
        b"",
    );
    let stream = TcpStream::connect(app.addr()).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    let started = Instant::now();
    writer.write_all(&head).await.unwrap();
    writer.write_all(&body).await.unwrap();
    // Then a byte every 100 ms: about 100 s for the whole body, far past the 2 s timeout.
    let trickle = tokio::spawn(async move {
        let mut sent = 0;
        while sent < 1000 && writer.write_all(b"\0").await.is_ok() {
            sent += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        sent
    });

    // Meanwhile the server serves everyone else.
    for i in 0..5 {
        assert_eq!(app.status("alice").await, KeyPackageStatus::default());
        let response = app.consume_raw("alice", "bob").await;
        assert_eq!(response.status(), 200, "request {i}");
    }

    let reply = tokio::time::timeout(Duration::from_secs(2 + 5), read_reply(&mut reader))
        .await
        .expect("the slow body was not cut within the request timeout and 5 s");
    let elapsed = started.elapsed();
    // A 408 problem, or (should the reset overtake it) a closed connection.
    if let Reply::Response { status, .. } = &reply {
        assert_eq!(*status, 408, "{reply:?}");
        assert_eq!(
            reply.code().as_deref(),
            Some("request_timeout"),
            "{reply:?}"
        );
    }
    assert!(
        elapsed >= Duration::from_secs(2),
        "cut before the timeout: {elapsed:?}"
    );
    // The connection is closed afterwards: the trickle cannot keep it.
    let closed = tokio::time::timeout(PATIENCE, async {
        let mut chunk = [0u8; 1024];
        loop {
            match reader.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the connection stayed open after the timeout"
    );
    let sent = trickle.await.unwrap();
    assert!(sent < 1000, "the server read the whole slow body");
    assert_eq!(app.status("mallory").await, KeyPackageStatus::default());
}

#[tokio::test]
async fn slow_or_silent_headers_are_cut_by_the_header_read_timeout() {
    let app = spawn_app().await;
    let started = Instant::now();
    // One connection sends its head a byte every 200 ms (about 40 s in all), one sends
    // nothing, and one sends half a request line.
    let trickling = TcpStream::connect(app.addr()).await.unwrap();
    let (mut trickle_reader, mut trickle_writer) = trickling.into_split();
    let head = format!(
        "GET /api/v1/key-packages HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\r\n",
        token("mallory")
    );
    assert!(head.len() > 200);
    let trickle = tokio::spawn(async move {
        for byte in head.bytes() {
            if trickle_writer.write_all(&[byte]).await.is_err() {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        true
    });
    let mut silent = TcpStream::connect(app.addr()).await.unwrap();
    let mut partial = TcpStream::connect(app.addr()).await.unwrap();
    partial.write_all(b"GET /healthz HT").await.unwrap();

    // Others are served meanwhile.
    app.assert_alive().await;

    // The header-read timeout is 10 s; allow 5 s more for a loaded machine.
    let deadline = tokio::time::Instant::from_std(started) + Duration::from_secs(15);
    let replies = [
        (
            "trickling headers",
            tokio::time::timeout_at(deadline, read_reply(&mut trickle_reader)).await,
        ),
        (
            "silent connection",
            tokio::time::timeout_at(deadline, read_reply(&mut silent)).await,
        ),
        (
            "half a request line",
            tokio::time::timeout_at(deadline, read_reply(&mut partial)).await,
        ),
    ];
    for (what, reply) in replies {
        let reply =
            reply.unwrap_or_else(|_| panic!("{what}: still open after {:?}", started.elapsed()));
        assert!(
            matches!(reply, Reply::Closed) || reply.status() == Some(408),
            "{what}: {reply:?}"
        );
    }
    assert!(!trickle.await.unwrap(), "the whole trickled head was read");
    app.assert_alive().await;
}
