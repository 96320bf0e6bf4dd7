//! The logs of an attack (at `trace`) and every error body: no token, no token claim, no
//! key-package bytes, in any spelling.

use jsonwebtoken::{Algorithm, EncodingKey};
use prost::Message;
use serde_json::json;

use crate::harness::*;

/// A recognisable byte pattern inside every key package of the log test.
const CANARY: &[u8] = b"KPS-CANARY-5e1f0c7a9b3d2846-";

/// Every spelling of `bytes` that a log line might carry: raw, hex, base64 (standard and
/// URL-safe, at each alignment) and a Rust byte-list `Debug`.
fn spellings(bytes: &[u8]) -> Vec<String> {
    let mut out = vec![
        String::from_utf8_lossy(bytes).into_owned(),
        hex::encode(bytes),
        hex::encode_upper(bytes),
        format!("{bytes:?}")
            .trim_matches(|c| c == '[' || c == ']')
            .to_owned(),
    ];
    for offset in 0..3 {
        let padded = [vec![0u8; offset], bytes.to_vec()].concat();
        let encoded = base64(&padded);
        // Drop the first and last quantum, which mix in the neighbouring bytes.
        let inner = &encoded[4..encoded.len() - 4];
        out.push(inner.to_owned());
        out.push(inner.replace('+', "-").replace('/', "_"));
    }
    out
}

/// Reads a response to the end; asserts that it is not a 5xx.
async fn record(
    what: &str,
    response: reqwest::Result<reqwest::Response>,
) -> (String, u16, Vec<u8>) {
    let response = response.unwrap_or_else(|e| panic!("{what}: {e}"));
    let status = response.status();
    let body = response.bytes().await.unwrap_or_default().to_vec();
    assert!(!status.is_server_error(), "{what}: {status}");
    (what.to_owned(), status.as_u16(), body)
}

/// The parts of a token worth looking for: itself, its payload and its signature.
fn token_spellings(token: &str) -> Vec<String> {
    let mut out = vec![token.to_owned()];
    out.extend(
        token
            .split('.')
            .skip(1)
            .filter(|part| part.len() >= 16)
            .map(str::to_owned),
    );
    out
}

#[tokio::test]
async fn logs_and_error_bodies_never_contain_tokens_or_key_package_bytes() {
    let db = TestDb::new().await;
    let dir = TempDir::new();
    let server = ServerProcess::start_on(
        &db,
        &dir,
        &[("RUST_LOG", "trace"), ("KPS_MAX_BODY_BYTES", "65536")],
    )
    .await;
    let package = |tag: &str| [kp(""), CANARY.to_vec(), tag.as_bytes().to_vec()].concat();
    let mut tokens: Vec<String> = Vec::new();
    let mut error_bodies: Vec<(String, Vec<u8>)> = Vec::new();
    let client = &server.client;
    let upload_url = server.url("/api/v1/key-packages");

    let mut results = Vec::new();

    // Valid uploads (protobuf and JSON) and consumptions, with valid tokens.
    let carol = token("carol");
    tokens.push(carol.clone());
    let request = upload_request(
        &[
            (package("regular-1"), false),
            (package("regular-2"), false),
            (package("lr"), true),
        ],
        &fingerprint('c'),
    );
    results.push(
        record(
            "upload",
            client
                .post(&upload_url)
                .bearer_auth(&carol)
                .header("content-type", "application/x-protobuf")
                .body(request.encode_to_vec())
                .send()
                .await,
        )
        .await,
    );
    let json_body =
        json!({ "entries": [{ "keyPackageData": base64(&package("json")) }] }).to_string();
    results.push(
        record(
            "json upload",
            client
                .post(&upload_url)
                .bearer_auth(&carol)
                .header("content-type", "application/json")
                .body(json_body)
                .send()
                .await,
        )
        .await,
    );
    let dave = token("dave");
    tokens.push(dave.clone());
    for i in 0..4 {
        results.push(
            record(
                &format!("consume {i}"),
                client
                    .get(server.url("/api/v1/key-packages/carol"))
                    .bearer_auth(&dave)
                    .send()
                    .await,
            )
            .await,
        );
    }

    // Invalid uploads carrying the canary.
    let invalid_bodies: Vec<(&str, &str, Vec<u8>)> = vec![
        (
            "too long",
            "application/x-protobuf",
            upload_request(
                &[
                    (package("ok"), false),
                    ([package("long"), vec![7; 16_384]].concat(), false),
                ],
                "",
            )
            .encode_to_vec(),
        ),
        (
            "bad header",
            "application/x-protobuf",
            upload_request(
                &[(
                    [b"\x00\x02\x00\x05".to_vec(), CANARY.to_vec()].concat(),
                    false,
                )],
                "",
            )
            .encode_to_vec(),
        ),
        (
            "two last resort",
            "application/x-protobuf",
            upload_request(&[(package("lr1"), true), (package("lr2"), true)], "").encode_to_vec(),
        ),
        (
            "canary fingerprint",
            "application/x-protobuf",
            upload_request(&[(package("fp"), false)], &String::from_utf8_lossy(CANARY))
                .encode_to_vec(),
        ),
        ("truncated protobuf", "application/x-protobuf", {
            let mut b = upload_request(&[(package("cut"), false)], "").encode_to_vec();
            b.truncate(b.len() - 2);
            b
        }),
        (
            "protobuf as JSON",
            "application/json",
            upload_request(&[(package("mixed"), false)], "").encode_to_vec(),
        ),
        (
            "broken JSON",
            "application/json",
            format!(
                r#"{{"entries":[{{"keyPackageData":"{}"}}"#,
                base64(&package("broken"))
            )
            .into_bytes(),
        ),
        (
            "canary as base64 text",
            "application/json",
            format!(
                r#"{{"entries":[{{"keyPackageData":"{}!"}}]}}"#,
                String::from_utf8_lossy(CANARY)
            )
            .into_bytes(),
        ),
        (
            "wrong type",
            "application/json",
            format!(
                r#"{{"entries":[{{"keyPackageData":"{}","isLastResort":"{}"}}]}}"#,
                base64(&package("type")),
                String::from_utf8_lossy(CANARY)
            )
            .into_bytes(),
        ),
        (
            "over the body limit",
            "application/x-protobuf",
            upload_request(
                &(0..6)
                    .map(|i| (package(&format!("big{i}{}", "x".repeat(16_000))), false))
                    .collect::<Vec<_>>(),
                "",
            )
            .encode_to_vec(),
        ),
        ("unsupported media type", "text/plain", package("text")),
    ];
    for (what, content_type, body) in invalid_bodies {
        results.push(
            record(
                what,
                client
                    .post(&upload_url)
                    .bearer_auth(&carol)
                    .header("content-type", content_type)
                    .body(body)
                    .send()
                    .await,
            )
            .await,
        );
    }

    // Forged, expired and misplaced tokens.
    let header = base64url(br#"{"alg":"HS256","typ":"JWT"}"#);
    let payload = base64url(claims("carol").to_string().as_bytes());
    let forged_signature = base64url(b"forged-signature-0123456789abcdef");
    let none_header = base64url(br#"{"alg":"none","typ":"JWT"}"#);
    let secret = EncodingKey::from_secret(SECRET);
    let forged = [
        format!("{header}.{payload}.{forged_signature}"),
        format!("{none_header}.{payload}."),
        sign(
            Algorithm::HS256,
            &secret,
            &json!({ "sub": "carol", "exp": unix_now() - 600 }),
        ),
        sign(
            Algorithm::HS256,
            &secret,
            &json!({ "sub": "carol", "exp": unix_now() + 600, "nbf": unix_now() + 600 }),
        ),
        sign(
            Algorithm::HS256,
            &secret,
            &json!({ "sub": "carol/../x", "exp": unix_now() + 600 }),
        ),
        sign(
            Algorithm::HS256,
            &secret,
            &json!({ "sub": "carol", "exp": "KPS-CLAIM-CANARY-3c9d1e" }),
        ),
        sign(
            Algorithm::HS256,
            &EncodingKey::from_secret(b"wrong-secret-wrong-secret-wrong"),
            &claims("carol"),
        ),
        format!(
            "{}.{payload}.{forged_signature}",
            base64url(br#"{"alg":"HS256","kid":"KPS-KID-CANARY-8f2a"}"#)
        ),
    ];
    for (i, forged) in forged.iter().enumerate() {
        tokens.push(forged.clone());
        results.push(
            record(
                &format!("forged token {i}"),
                client
                    .post(&upload_url)
                    .bearer_auth(forged)
                    .header("content-type", "application/x-protobuf")
                    .body(
                        upload_request(&[(package(&format!("forged{i}")), false)], "")
                            .encode_to_vec(),
                    )
                    .send()
                    .await,
            )
            .await,
        );
        results.push(
            record(
                &format!("forged token {i}, consume"),
                client
                    .get(server.url("/api/v1/key-packages/carol"))
                    .bearer_auth(forged)
                    .send()
                    .await,
            )
            .await,
        );
    }
    // A valid token where it does not belong: in the path, in the query, in another header.
    let eve = token("eve");
    tokens.push(eve.clone());
    results.push(
        record(
            "token as the target",
            client
                .get(server.url(&format!("/api/v1/key-packages/{eve}")))
                .bearer_auth(&dave)
                .send()
                .await,
        )
        .await,
    );
    results.push(
        record(
            "token in the query",
            client
                .get(server.url(&format!("/api/v1/key-packages?access_token={eve}")))
                .send()
                .await,
        )
        .await,
    );
    results.push(
        record(
            "token as a cookie",
            client
                .get(server.url("/api/v1/key-packages"))
                .header("cookie", format!("token={eve}"))
                .send()
                .await,
        )
        .await,
    );
    results.push(
        record(
            "token with another scheme",
            client
                .get(server.url("/api/v1/key-packages"))
                .header("authorization", format!("Basic {eve}"))
                .send()
                .await,
        )
        .await,
    );
    results.push(
        record(
            "no route",
            client
                .get(server.url(&format!("/api/v1/{eve}")))
                .bearer_auth(&eve)
                .send()
                .await,
        )
        .await,
    );

    // Every attack was answered as expected and nothing forged was stored.
    for (what, status, body) in results {
        if status >= 400 {
            error_bodies.push((what, body));
        } else {
            assert!(!what.starts_with("forged"), "{what}: {status}");
        }
    }
    let status = server.status("carol").await;
    assert_eq!((status.regular_count, status.has_last_resort), (0, true));
    assert!(error_bodies.len() >= 25, "{} errors", error_bodies.len());

    let mut server = server;
    server.sigterm();
    assert!(server.wait_exit().await.success());
    let log = server.log_text();
    assert!(
        log.contains("TRACE") || log.contains("DEBUG"),
        "RUST_LOG=trace had no effect:\n{log}"
    );

    let mut needles: Vec<(String, String)> = Vec::new();
    for spelling in spellings(CANARY) {
        needles.push(("key-package bytes".into(), spelling));
    }
    for token in &tokens {
        for spelling in token_spellings(token) {
            needles.push(("token".into(), spelling));
        }
    }
    for canary in ["KPS-CLAIM-CANARY-3c9d1e", "KPS-KID-CANARY-8f2a"] {
        needles.push(("token claim".into(), canary.to_owned()));
    }
    for (kind, needle) in &needles {
        for line in log.lines() {
            assert!(
                !line.contains(needle.as_str()),
                "the log shows a {kind} ({needle}):\n{line}"
            );
        }
        for (what, body) in &error_bodies {
            let body = String::from_utf8_lossy(body);
            assert!(
                !body.contains(needle.as_str()),
                "the {what} error shows a {kind} ({needle}): {body}"
            );
        }
    }
}
