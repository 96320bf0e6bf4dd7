//! Hostile bodies: sizes at the limit, lying `Content-Length`, chunked uploads, deep or huge
//! JSON, odd protobuf fields and floods of entries; at most ten packages are ever stored.

use std::time::{Duration, Instant};

use keypackage_server::wire::KeyPackageStatus;
use prost::Message;
use serde_json::{json, Value};
use tokio::{io::AsyncWriteExt, net::TcpStream};

use crate::harness::*;

/// Appends a varint.
fn varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// A valid upload of one package, padded with an unknown field to exactly `len` bytes.
fn upload_of_exactly(len: usize, tag: &str) -> Vec<u8> {
    let mut body = upload_request(&[(kp(tag), false)], "").encode_to_vec();
    let room = len - body.len();
    // Field 15, wire type 2 (length-delimited): tag byte, length varint, filler.
    for header_len in 2..=4 {
        let filler = room - header_len;
        let mut field = vec![0x7a];
        varint(&mut field, filler as u64);
        if field.len() == header_len {
            field.resize(header_len + filler, b'.');
            body.extend_from_slice(&field);
            assert_eq!(body.len(), len);
            return body;
        }
    }
    unreachable!("no padding fits {len} bytes");
}

/// POSTs `body` as `user` with the chunked transfer encoding (no `Content-Length`).
async fn post_chunked(app: &TestApp, user: &str, body: &[u8]) -> Reply {
    let mut chunked = Vec::new();
    for chunk in body.chunks(1000) {
        chunked.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        chunked.extend_from_slice(chunk);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let headers = [
        bearer_line(user),
        b"Content-Type: application/x-protobuf".to_vec(),
        b"Transfer-Encoding: chunked".to_vec(),
    ];
    exchange(
        app,
        &raw_request("POST", b"/api/v1/key-packages", &headers, &chunked),
    )
    .await
}

#[tokio::test]
async fn a_body_of_exactly_the_limit_is_accepted_and_one_byte_more_is_413() {
    const LIMIT: usize = 4096;
    let app = spawn_limited_app(LIMIT).await;
    let content_type = Some("application/x-protobuf");

    let fits = upload_of_exactly(LIMIT, "fits");
    assert_eq!(
        app.upload_body("bob", content_type, fits).await.status(),
        201
    );
    let over = upload_of_exactly(LIMIT + 1, "over");
    problem(
        app.upload_body("bob", content_type, over.clone()).await,
        413,
        "body_too_large",
    )
    .await;
    assert_eq!(app.status("bob").await.regular_count, 1);

    // The same without Content-Length: the limit holds while the body streams in.
    let fits = upload_of_exactly(LIMIT, "chunked-fits");
    assert_eq!(post_chunked(&app, "bob", &fits).await.status(), Some(201));
    let reply = post_chunked(&app, "bob", &upload_of_exactly(LIMIT + 1, "chunked-over")).await;
    assert_eq!(
        (reply.status(), reply.code().as_deref()),
        (Some(413), Some("body_too_large"))
    );
    assert_eq!(app.status("bob").await.regular_count, 2);

    // JSON, padded with whitespace to the byte.
    let json = |tag: &str, len: usize| {
        let mut s = format!(
            r#"{{"entries":[{{"keyPackageData":"{}"}}]}}"#,
            base64(&kp(tag))
        );
        s.push_str(&" ".repeat(len - s.len()));
        s
    };
    let response = app
        .upload_body("bob", Some("application/json"), json("j-fits", LIMIT))
        .await;
    assert_eq!(response.status(), 201);
    let response = app
        .upload_body("bob", Some("application/json"), json("j-over", LIMIT + 1))
        .await;
    problem(response, 413, "body_too_large").await;
    assert_eq!(app.status("bob").await.regular_count, 3);
    app.assert_alive().await;
}

#[tokio::test]
async fn the_key_package_size_limit_holds_at_the_boundary_in_json_too() {
    let app = spawn_app().await;
    let json = |packages: &[Vec<u8>]| {
        let entries: Vec<Value> = packages
            .iter()
            .map(|p| json!({ "keyPackageData": base64(p) }))
            .collect();
        json!({ "entries": entries }).to_string()
    };
    let response = app
        .upload_body(
            "bob",
            Some("application/json"),
            json(&[kp_of_len(16_384, 1)]),
        )
        .await;
    assert_eq!(response.status(), 201);
    let response = app
        .upload_body(
            "bob",
            Some("application/json"),
            json(&[kp_of_len(16_384, 2), kp_of_len(16_385, 3)]),
        )
        .await;
    let body = problem(response, 400, "invalid_key_package").await;
    assert_eq!(body["entry_index"], 1);
    assert_eq!(app.status("bob").await.regular_count, 1);
}

#[tokio::test]
async fn a_lying_content_length_is_answered_with_a_4xx_and_stores_nothing() {
    let app = spawn_limited_app(4096).await;
    let body = upload_request(&[(kp("lie"), false)], "").encode_to_vec();
    let with_length = |length: &str| {
        vec![
            bearer_line("bob"),
            b"Content-Type: application/x-protobuf".to_vec(),
            format!("Content-Length: {length}").into_bytes(),
        ]
    };
    let path = b"/api/v1/key-packages".as_slice();

    // Announces more than it sends, then waits: the request timeout answers, and closes.
    let started = Instant::now();
    let request = keep_alive(raw_request("POST", path, &with_length("1000"), &body));
    let mut stream = TcpStream::connect(app.addr()).await.unwrap();
    stream.write_all(&request).await.unwrap();
    let reply = tokio::time::timeout(PATIENCE, read_reply(&mut stream))
        .await
        .unwrap();
    assert_closes(&reply, &mut stream, "408").await;
    assert_eq!(
        (reply.status(), reply.code().as_deref()),
        (Some(408), Some("request_timeout"))
    );
    assert!(
        started.elapsed() < Duration::from_secs(2 + 5),
        "{:?}",
        started.elapsed()
    );

    // Announces more than it sends, then closes its side: the body is incomplete.
    let mut stream = TcpStream::connect(app.addr()).await.unwrap();
    stream
        .write_all(&raw_request("POST", path, &with_length("1000"), &body))
        .await
        .unwrap();
    stream.shutdown().await.unwrap();
    let reply = tokio::time::timeout(PATIENCE, read_reply(&mut stream))
        .await
        .unwrap();
    assert_4xx(&reply, true, "truncated body");

    // Announces less than it sends: the rest is not a request.
    let reply = exchange(&app, &raw_request("POST", path, &with_length("5"), &body)).await;
    assert_eq!(
        (reply.status(), reply.code().as_deref()),
        (Some(400), Some("malformed_body"))
    );

    // Announces more than the limit: refused without waiting for it.
    let started = Instant::now();
    for length in ["4097", "1000000000"] {
        let request = keep_alive(raw_request("POST", path, &with_length(length), &body));
        let mut stream = TcpStream::connect(app.addr()).await.unwrap();
        stream.write_all(&request).await.unwrap();
        let reply = tokio::time::timeout(PATIENCE, read_reply(&mut stream))
            .await
            .unwrap();
        assert_eq!(
            (reply.status(), reply.code().as_deref()),
            (Some(413), Some("body_too_large")),
            "Content-Length: {length}"
        );
        assert_closes(
            &reply,
            &mut stream,
            &format!("413 for Content-Length: {length}"),
        )
        .await;
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    // Unparseable, conflicting or combined framing: the HTTP layer refuses it.
    let mut framings = vec![
        with_length("18446744073709551615"),
        with_length("abc"),
        with_length("-1"),
        with_length("18446744073709551616"),
        with_length("1 2"),
    ];
    let mut twice = with_length(&body.len().to_string());
    twice.push(b"Content-Length: 4".to_vec());
    framings.push(twice);
    for headers in framings {
        let reply = exchange(&app, &raw_request("POST", path, &headers, &body)).await;
        assert_4xx(
            &reply,
            true,
            &format!("{:?}", String::from_utf8_lossy(&headers[2])),
        );
    }
    let mut both = with_length("4");
    both.push(b"Transfer-Encoding: chunked".to_vec());
    let chunked = [
        format!("{:x}\r\n", body.len()).as_bytes(),
        &body,
        b"\r\n0\r\n\r\n",
    ]
    .concat();
    let reply = exchange(&app, &raw_request("POST", path, &both, &chunked)).await;
    // RFC 9112 §6.3: Transfer-Encoding overrides Content-Length; refusing is fine too.
    assert!(
        matches!(reply.status(), Some(201) | Some(400..=499) | None),
        "Content-Length and Transfer-Encoding: {reply:?}"
    );
    let stored = app.status("bob").await.regular_count;
    assert_eq!(stored, u32::from(reply.status() == Some(201)));
    app.assert_alive().await;
}

#[tokio::test]
async fn deeply_nested_or_huge_json_is_refused_without_harm() {
    let app = spawn_app().await;
    let depth = 20_000;
    let nested = |inner: &str| format!("{}{inner}{}", "[".repeat(depth), "]".repeat(depth));
    let bodies = [
        ("nested entries", format!(r#"{{"entries":{}}}"#, nested(""))),
        (
            "nested unknown field",
            format!(r#"{{"x":{},"entries":[]}}"#, nested("1")),
        ),
        (
            "nested objects",
            format!("{}{}", r#"{"a":"#.repeat(depth), "}".repeat(depth)),
        ),
        (
            "huge exponent",
            r#"{"entries":[{"isLastResort":1e999999999}]}"#.to_owned(),
        ),
        (
            "huge integer",
            format!(
                r#"{{"entries":[{{"isLastResort":{}}}]}}"#,
                "9".repeat(100_000)
            ),
        ),
        (
            "lone surrogate",
            r#"{"signingKeyFingerprint":"\ud800"}"#.to_owned(),
        ),
        (
            "raw control character",
            "{\"signingKeyFingerprint\":\"\0\"}".to_owned(),
        ),
    ];
    let mut bodies: Vec<(&str, Vec<u8>)> = bodies
        .into_iter()
        .map(|(what, body)| (what, body.into_bytes()))
        .collect();
    bodies.push((
        "invalid UTF-8",
        b"{\"signingKeyFingerprint\":\"\xc3\x28\"}".to_vec(),
    ));
    for (what, body) in bodies {
        let response = app.upload_body("bob", Some("application/json"), body).await;
        assert_eq!(response.status(), 400, "{what}");
        problem(response, 400, "malformed_body").await;
    }
    // Large but well-formed: validated without echoing anything back.
    let huge_fingerprint = "f".repeat(200_000);
    let body = json!({
        "entries": [{ "keyPackageData": base64(&kp("ok")) }],
        "signingKeyFingerprint": huge_fingerprint,
    })
    .to_string();
    let response = app.upload_body("bob", Some("application/json"), body).await;
    let problem_body = problem(response, 400, "invalid_fingerprint").await;
    assert!(problem_body.to_string().len() < 1000, "{problem_body}");
    let many_empty = format!(r#"{{"entries":[{}{{}}]}}"#, "{},".repeat(80_000));
    let response = app
        .upload_body("bob", Some("application/json"), many_empty)
        .await;
    let problem_body = problem(response, 400, "invalid_key_package").await;
    assert_eq!(problem_body["entry_index"], 0);
    assert_eq!(app.status("bob").await, KeyPackageStatus::default());
    app.assert_alive().await;
}

#[tokio::test]
async fn unknown_protobuf_fields_are_skipped_and_malformed_ones_refused() {
    let app = spawn_app().await;
    // An entry with unknown fields of every wire type before and after its known ones.
    let unknown: &[u8] = &[
        0x78, 0x96, 0x01, // field 15, varint 150
        0x79, 1, 2, 3, 4, 5, 6, 7, 8, // field 15, fixed64
        0x7a, 0x03, b'a', b'b', b'c', // field 15, length-delimited
        0x7d, 1, 2, 3, 4, // field 15, fixed32
        0x7b, 0x08, 0x01, 0x7c, // field 15, group { field 1 varint 1 }
    ];
    let package = kp("unknown-fields");
    let mut entry = unknown.to_vec();
    entry.push(0x0a);
    varint(&mut entry, package.len() as u64);
    entry.extend_from_slice(&package);
    entry.extend_from_slice(unknown);
    let mut body = unknown.to_vec();
    body.push(0x0a);
    varint(&mut body, entry.len() as u64);
    body.extend_from_slice(&entry);
    body.extend_from_slice(unknown);
    let response = app
        .upload_body("bob", Some("application/x-protobuf"), body)
        .await;
    assert_eq!(response.status(), 201);
    let after: KeyPackageStatus = decode(response).await;
    assert_eq!(after.regular_count, 1);
    assert_eq!(
        app.consume("alice", "bob").await.key_package_data.to_vec(),
        package
    );
    let upload = app.upload("bob", &[(kp("held"), false)], "").await;

    let valid = upload_request(&[(kp("x"), false)], "").encode_to_vec();
    let with = |suffix: &[u8]| [valid.as_slice(), suffix].concat();
    let deep_groups = vec![0x7b; 100_000]; // start group 15, never ended
    let bodies: Vec<(&str, Vec<u8>)> = vec![
        (
            "varint of 11 bytes",
            with(&[
                0x78, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
            ]),
        ),
        (
            "varint over 64 bits",
            with(&[
                0x78, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f,
            ]),
        ),
        (
            "length over 64 bits",
            with(&[
                0x7a, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f,
            ]),
        ),
        (
            "length 2^63",
            with(&[
                0x7a, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01,
            ]),
        ),
        ("length past the end", with(&[0x7a, 0xff, 0xff, 0x03, b'a'])),
        (
            "entry length 2^32",
            [&[0x0a, 0x80, 0x80, 0x80, 0x80, 0x10][..], &valid].concat(),
        ),
        ("tag of field 0", with(&[0x00, 0x01])),
        ("wire type 6", with(&[0x7e, 0x01])),
        ("wire type 7", with(&[0x7f, 0x01])),
        (
            "tag over 32 bits",
            with(&[0xff, 0xff, 0xff, 0xff, 0xff, 0x01, 0x00]),
        ),
        ("unterminated group", with(&[0x7b, 0x08, 0x01])),
        ("mismatched end group", with(&[0x7b, 0x08, 0x01, 0x74])),
        ("stray end group", with(&[0x7c])),
        ("100 000 nested groups", with(&deep_groups)),
        ("entries as a varint", with(&[0x08, 0x01])),
        ("fingerprint not UTF-8", with(&[0x12, 0x02, 0xc3, 0x28])),
        ("truncated fixed64", with(&[0x79, 1, 2, 3])),
    ];
    for (what, body) in bodies {
        let response = app
            .upload_body("bob", Some("application/x-protobuf"), body)
            .await;
        assert_eq!(response.status(), 400, "{what}");
        problem(response, 400, "malformed_body").await;
    }
    assert_eq!(
        app.status("bob").await,
        upload,
        "a malformed body changed something"
    );
    app.assert_alive().await;
}

#[tokio::test]
async fn bodies_full_of_huge_or_many_entries_store_at_most_ten_packages() {
    let app = spawn_app().await;
    // 15 maximal packages: under the default 256 KiB body limit.
    let big: Vec<(Vec<u8>, bool)> = (0..15u8).map(|i| (kp_of_len(16_384, i), false)).collect();
    let request = upload_request(&big, "");
    assert!(request.encoded_len() < 262_144);
    let response = app.upload_raw("bob", &request).await;
    assert_eq!(response.status(), 201);
    let status: KeyPackageStatus = decode(response).await;
    assert_eq!(status.regular_count, 10);

    // As many tiny distinct packages as fit: still answered promptly, still ten kept.
    let tiny: Vec<(Vec<u8>, bool)> = (0..20_000u32)
        .map(|i| {
            let mut p = kp("");
            p.extend_from_slice(&i.to_be_bytes());
            (p, false)
        })
        .collect();
    let request = upload_request(&tiny, "");
    assert!(request.encoded_len() < 262_144);
    let started = Instant::now();
    let response = app.upload_raw("carol", &request).await;
    assert_eq!(response.status(), 201);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    let status: KeyPackageStatus = decode(response).await;
    assert_eq!(status.regular_count, 10);
    let first = app
        .consume("alice", "carol")
        .await
        .key_package_data
        .to_vec();
    assert_eq!(first, tiny[20_000 - 10].0, "the ten newest are kept");

    // A repeated field: the last fingerprint counts, and a huge invalid one is refused.
    let mut body = upload_request(&[(kp("fp"), false)], &fingerprint('a')).encode_to_vec();
    body.push(0x12);
    varint(&mut body, 200_000);
    body.extend(std::iter::repeat_n(b'f', 200_000));
    let response = app
        .upload_body("dave", Some("application/x-protobuf"), body)
        .await;
    let problem_body = problem(response, 400, "invalid_fingerprint").await;
    assert!(problem_body.to_string().len() < 1000, "{problem_body}");
    assert_eq!(app.status("dave").await, KeyPackageStatus::default());
}
