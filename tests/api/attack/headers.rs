//! Hostile `Authorization` headers: oversized, malformed, non-UTF-8 or repeated, each
//! refused with a 401 (or a 4xx from the HTTP layer) while the server keeps serving.

use keypackage_server::wire::KeyPackageStatus;
use prost::Message;

use crate::harness::*;

#[tokio::test]
async fn oversized_authorization_headers_are_refused_and_the_server_keeps_serving() {
    let app = spawn_app().await;
    let valid = token("bob");
    // Just over the server's own cap, and far over it, padded around a valid token.
    for size in [8 * 1024 + 1, 64 * 1024] {
        // Spaces between scheme and token count (trailing ones are not part of the value).
        let padded = format!("Bearer{}{valid}", " ".repeat(size - valid.len() - 6));
        assert_eq!(padded.len(), size);
        assert_unauthorized(
            app.status_with(Some(&padded)).await,
            &format!("{size} bytes"),
        )
        .await;
        let junk = format!("Bearer {}", "A".repeat(size - 7));
        assert_unauthorized(app.status_with(Some(&junk)).await, &format!("{size} junk")).await;
    }
    // Bigger than the HTTP layer reads: 431 or a closed connection, and never 5xx.
    for size in [512 * 1024, 1024 * 1024] {
        let header = format!("Authorization: Bearer {}", "A".repeat(size)).into_bytes();
        let request = raw_request("GET", b"/api/v1/key-packages", &[header], b"");
        let reply = exchange(&app, &request).await;
        assert_4xx(&reply, true, &format!("{size}-byte Authorization"));
        app.assert_alive().await;
    }
    // Too many header lines.
    let mut headers: Vec<Vec<u8>> = (0..500)
        .map(|i| format!("X-Pad-{i}: {i}").into_bytes())
        .collect();
    headers.push(bearer_line("bob"));
    let reply = exchange(
        &app,
        &raw_request("GET", b"/api/v1/key-packages", &headers, b""),
    )
    .await;
    assert_4xx(&reply, true, "500 header lines");
    app.assert_alive().await;
}

#[tokio::test]
async fn malformed_authorization_headers_are_refused() {
    let app = spawn_app().await;
    let valid = token("bob");
    let alice = token("alice");
    let values: Vec<(String, Vec<u8>)> = vec![
        ("non-UTF-8 token".into(), b"Bearer \xff\xfe\xfd".to_vec()),
        (
            "non-UTF-8 after a valid token".into(),
            [format!("Bearer {valid}").as_bytes(), b"\xc3\x28"].concat(),
        ),
        ("Bearer alone".into(), b"Bearer".to_vec()),
        (
            "Bearer and spaces".into(),
            format!("Bearer{}", " ".repeat(100)).into_bytes(),
        ),
        ("spaces only".into(), " ".repeat(100).into_bytes()),
        (
            "tab instead of space".into(),
            format!("Bearer\t{valid}").into_bytes(),
        ),
        (
            "two tokens".into(),
            format!("Bearer {valid} {alice}").into_bytes(),
        ),
        (
            "two tokens, comma".into(),
            format!("Bearer {valid},{alice}").into_bytes(),
        ),
        (
            "two credentials".into(),
            format!("Bearer {valid}, Bearer {alice}").into_bytes(),
        ),
        (
            "Bearer twice".into(),
            format!("Bearer Bearer {valid}").into_bytes(),
        ),
        (
            "quoted token".into(),
            format!("Bearer \"{valid}\"").into_bytes(),
        ),
        (
            "token68 padding".into(),
            format!("Bearer {valid}==").into_bytes(),
        ),
        (
            "token in a parameter".into(),
            format!("Bearer token=\"{valid}\"").into_bytes(),
        ),
        ("dots only".into(), b"Bearer ...".to_vec()),
        (
            "leading dot".into(),
            format!("Bearer .{valid}").into_bytes(),
        ),
    ];
    for (what, value) in values {
        let value = reqwest::header::HeaderValue::from_bytes(&value).expect("a sendable value");
        let response = app
            .client
            .get(app.url("/api/v1/key-packages"))
            .header("authorization", value)
            .send()
            .await
            .expect("request");
        assert_unauthorized(response, &what).await;
    }
    // Bytes an HTTP client refuses to send: the HTTP layer answers 400 or closes.
    for (what, value) in [
        (
            "NUL",
            [
                b"Authorization: Bearer ".as_slice(),
                valid.as_bytes(),
                b"\0",
            ]
            .concat(),
        ),
        (
            "CR",
            [
                b"Authorization: Bearer ".as_slice(),
                valid.as_bytes(),
                b"\rX: y",
            ]
            .concat(),
        ),
        (
            "folded",
            [b"Authorization: Bearer\r\n ".as_slice(), valid.as_bytes()].concat(),
        ),
    ] {
        let reply = exchange(
            &app,
            &raw_request("GET", b"/api/v1/key-packages", &[value], b""),
        )
        .await;
        assert_4xx(&reply, true, what);
    }
    app.assert_alive().await;
}

#[tokio::test]
async fn a_repeated_authorization_header_is_refused_whatever_its_order() {
    let app = spawn_app().await;
    let (bob, alice) = (token("bob"), token("alice"));
    for (what, first, second) in [
        (
            "two valid tokens",
            format!("Bearer {bob}"),
            format!("Bearer {alice}"),
        ),
        (
            "valid then garbage",
            format!("Bearer {bob}"),
            "Bearer garbage".to_owned(),
        ),
        (
            "garbage then valid",
            "Bearer garbage".to_owned(),
            format!("Bearer {bob}"),
        ),
        (
            "the same token twice",
            format!("Bearer {bob}"),
            format!("Bearer {bob}"),
        ),
    ] {
        let response = app
            .client
            .post(app.url("/api/v1/key-packages"))
            .header("authorization", &first)
            .header("authorization", &second)
            .header("content-type", "application/x-protobuf")
            .body(upload_request(&[(kp(what), false)], "").encode_to_vec())
            .send()
            .await
            .expect("request");
        assert_unauthorized(response, what).await;
    }
    assert_eq!(app.status("bob").await, KeyPackageStatus::default());
    assert_eq!(app.status("alice").await, KeyPackageStatus::default());
}
