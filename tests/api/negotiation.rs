//! Content negotiation: proto3 JSON request bodies, `Accept`-driven response encoding, and
//! problem+json for every error.

use keypackage_server::wire::KeyPackageStatus;
use serde_json::{json, Value};

use crate::harness::*;

/// GETs `path` as `user` with the given `Accept` header.
async fn get_accepting(
    app: &TestApp,
    path: &str,
    user: &str,
    accept: Option<&str>,
) -> reqwest::Response {
    let mut request = app.client.get(app.url(path)).bearer_auth(token(user));
    if let Some(accept) = accept {
        request = request.header("accept", accept);
    }
    request.send().await.expect("request")
}

fn content_type(response: &reqwest::Response) -> String {
    response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

/// A JSON body from a response, checking it is labelled `application/json`.
async fn json_body(response: reqwest::Response) -> Value {
    let ct = content_type(&response);
    assert!(ct.starts_with("application/json"), "content type {ct:?}");
    response.json().await.expect("JSON")
}

#[tokio::test]
async fn upload_accepts_proto3_json_with_lower_camel_case_names_and_base64_bytes() {
    let app = spawn_app().await;
    let body = json!({
        "entries": [
            { "keyPackageData": base64(&kp("r1")) },
            { "keyPackageData": base64(&kp("r2")), "isLastResort": false },
            { "keyPackageData": base64(&kp("lr!")), "isLastResort": true },
        ],
        "signingKeyFingerprint": fingerprint('a'),
    });
    let response = app
        .upload_body("bob", Some("application/json"), body.to_string())
        .await;
    assert_eq!(response.status(), 201, "{:?}", response.text().await);
    let status: KeyPackageStatus = decode(response).await;
    assert_eq!(status.regular_count, 2);
    assert!(status.has_last_resort);
    assert_eq!(status.signing_key_fingerprint, fingerprint('a'));
    app.assert_hands_out("bob", &[kp("r1"), kp("r2"), kp("lr!")])
        .await;
}

#[tokio::test]
async fn upload_accepts_proto3_json_with_snake_case_names() {
    let app = spawn_app().await;
    let body = json!({
        "entries": [
            { "key_package_data": base64(&kp("r1")) },
            { "key_package_data": base64(&kp("lr")), "is_last_resort": true },
        ],
        "signing_key_fingerprint": fingerprint('b'),
    });
    let response = app
        .upload_body("bob", Some("application/json"), body.to_string())
        .await;
    assert_eq!(response.status(), 201, "{:?}", response.text().await);
    let status = app.status("bob").await;
    assert_eq!(status.regular_count, 1);
    assert!(status.has_last_resort);
    assert_eq!(status.signing_key_fingerprint, fingerprint('b'));
}

#[tokio::test]
async fn json_uploads_are_validated_like_protobuf_ones() {
    let app = spawn_app().await;
    let bad_entry = json!({ "entries": [
        { "keyPackageData": base64(&kp("ok")) },
        { "keyPackageData": base64(&[0x00, 0x01, 0x00, 0x02, 0x00]) },
    ]});
    let response = app
        .upload_body("bob", Some("application/json"), bad_entry.to_string())
        .await;
    let problem_body = problem(response, 400, "invalid_key_package").await;
    assert_eq!(problem_body["entry_index"], 1);
    for (body, code) in [
        (json!({}), "empty_upload"),
        (json!({ "entries": [] }), "empty_upload"),
        (
            json!({ "entries": [
                { "keyPackageData": base64(&kp("a")), "isLastResort": true },
                { "keyPackageData": base64(&kp("b")), "isLastResort": true },
            ]}),
            "multiple_last_resort",
        ),
        (
            json!({ "entries": [{ "keyPackageData": base64(&kp("a")) }],
                    "signingKeyFingerprint": fingerprint('A') }),
            "invalid_fingerprint",
        ),
    ] {
        let response = app
            .upload_body("bob", Some("application/json"), body.to_string())
            .await;
        problem(response, 400, code).await;
    }
    assert_eq!(app.status("bob").await, KeyPackageStatus::default());
}

#[tokio::test]
async fn responses_are_protobuf_by_default_even_for_a_json_request() {
    let app = spawn_app().await;
    let body = json!({ "entries": [{ "keyPackageData": base64(&kp("r1")) }] });
    let response = app
        .upload_body("bob", Some("application/json"), body.to_string())
        .await;
    assert_eq!(response.status(), 201);
    let status: KeyPackageStatus = decode(response).await;
    assert_eq!(status.regular_count, 1);
    for accept in [
        None,
        Some("*/*"),
        Some("application/x-protobuf"),
        Some("text/html"),
    ] {
        let response = get_accepting(&app, "/api/v1/key-packages", "bob", accept).await;
        assert_eq!(response.status(), 200);
        assert_eq!(
            content_type(&response),
            "application/x-protobuf",
            "Accept {accept:?}"
        );
    }
}

#[tokio::test]
async fn accept_application_json_gives_proto3_json_responses() {
    let app = spawn_app().await;
    app.upload(
        "bob",
        &[(kp("r1"), false), (kp("lr"), true)],
        &fingerprint('c'),
    )
    .await;

    let response = get_accepting(
        &app,
        "/api/v1/key-packages/bob",
        "alice",
        Some("application/json"),
    )
    .await;
    assert_eq!(response.status(), 200);
    let consumed = json_body(response).await;
    assert_eq!(consumed["keyPackageData"], base64(&kp("r1")), "{consumed}");
    assert_eq!(
        consumed["signingKeyFingerprint"],
        fingerprint('c'),
        "{consumed}"
    );
    assert_ne!(consumed["isLastResort"], true, "{consumed}");

    let response = get_accepting(
        &app,
        "/api/v1/key-packages/bob",
        "alice",
        Some("application/json"),
    )
    .await;
    let fallback = json_body(response).await;
    assert_eq!(fallback["keyPackageData"], base64(&kp("lr")), "{fallback}");
    assert_eq!(fallback["isLastResort"], true, "{fallback}");

    let response = get_accepting(
        &app,
        "/api/v1/key-packages",
        "bob",
        Some("application/json"),
    )
    .await;
    let status = json_body(response).await;
    assert_eq!(status["hasLastResort"], true, "{status}");
    assert_eq!(
        status["signingKeyFingerprint"],
        fingerprint('c'),
        "{status}"
    );
    // uint64 is a JSON string in the canonical mapping.
    assert_eq!(status["lastResortHandouts"], "1", "{status}");
    assert!(
        status.get("regularCount").is_none_or(|c| c == 0),
        "{status}"
    );
}

#[tokio::test]
async fn json_responses_encode_64_bit_integers_as_strings() {
    let app = spawn_app().await;
    app.upload("bob", &[(kp("r1"), false)], &fingerprint('d'))
        .await;
    let response = get_accepting(
        &app,
        "/api/v1/users/bob/fingerprint",
        "alice",
        Some("application/json"),
    )
    .await;
    let body = json_body(response).await;
    assert_eq!(body["fingerprint"], fingerprint('d'), "{body}");
    let updated_at = body["updatedAt"]
        .as_str()
        .unwrap_or_else(|| panic!("a string: {body}"));
    let updated_at: i64 = updated_at.parse().expect("decimal");
    assert!((updated_at - unix_now()).abs() < 3600, "{updated_at}");

    // The upload answer too: a status with a uint32 (a number) and a uint64 (a string).
    let response = app
        .client
        .post(app.url("/api/v1/key-packages"))
        .bearer_auth(token("bob"))
        .header("content-type", "application/json")
        .header("accept", "application/json")
        .body(json!({ "entries": [{ "keyPackageData": base64(&kp("r2")) }] }).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let status = json_body(response).await;
    assert_eq!(status["regularCount"], 2, "{status}");
}

#[tokio::test]
async fn accept_weights_decide_between_json_and_protobuf() {
    let app = spawn_app().await;
    let cases = [
        ("application/json", "application/json"),
        ("application/json, */*;q=0.1", "application/json"),
        (
            "application/x-protobuf;q=0.5, application/json",
            "application/json",
        ),
        (
            "application/json;q=0.5, application/x-protobuf",
            "application/x-protobuf",
        ),
        (
            "application/json;q=0.5, application/protobuf",
            "application/x-protobuf",
        ),
        ("application/json;q=0", "application/x-protobuf"),
    ];
    for (accept, expected) in cases {
        let response = get_accepting(&app, "/api/v1/key-packages", "bob", Some(accept)).await;
        assert_eq!(response.status(), 200);
        assert!(
            content_type(&response).starts_with(expected),
            "Accept {accept}"
        );
        if expected == "application/x-protobuf" {
            let _: KeyPackageStatus = decode(response).await;
        } else {
            json_body(response).await;
        }
    }
}

#[tokio::test]
async fn errors_are_problem_json_whatever_the_accept_header() {
    let app = spawn_app().await;
    for accept in [
        None,
        Some("application/x-protobuf"),
        Some("application/json"),
        Some("text/html"),
    ] {
        let response = get_accepting(&app, "/api/v1/key-packages/nobody", "alice", accept).await;
        problem(response, 404, "no_key_package").await;
        let response = get_accepting(&app, "/api/v1/key-packages/a%2Fb", "alice", accept).await;
        problem(response, 400, "invalid_user_id").await;
        let mut request = app.client.get(app.url("/api/v1/key-packages"));
        if let Some(accept) = accept {
            request = request.header("accept", accept);
        }
        problem(request.send().await.unwrap(), 401, "unauthorized").await;
    }
    let response = app
        .client
        .post(app.url("/api/v1/key-packages"))
        .bearer_auth(token("bob"))
        .header("content-type", "application/json")
        .header("accept", "application/x-protobuf")
        .body("{")
        .send()
        .await
        .unwrap();
    problem(response, 400, "malformed_body").await;
}

#[tokio::test]
async fn a_protobuf_response_decodes_as_the_contract_message() {
    let app = spawn_app().await;
    app.upload("bob", &[(kp("r1"), false)], &fingerprint('e'))
        .await;
    let response = get_accepting(&app, "/api/v1/key-packages/bob", "alice", None).await;
    let bytes = response.bytes().await.unwrap();
    // key_package_data = 1 (bytes), signing_key_fingerprint = 3 (string); is_last_resort is false.
    let mut expected = vec![0x0a, kp("r1").len() as u8];
    expected.extend_from_slice(&kp("r1"));
    expected.extend_from_slice(&[0x1a, 64]);
    expected.extend_from_slice(fingerprint('e').as_bytes());
    assert_eq!(bytes.to_vec(), expected);
}

#[tokio::test]
async fn a_hand_encoded_protobuf_upload_uses_the_contract_field_numbers() {
    let app = spawn_app().await;
    // KeyPackageEntry { key_package_data = 1; is_last_resort = 2 }
    let entry = |data: &[u8], last_resort: bool| {
        let mut e = vec![0x0a, data.len() as u8];
        e.extend_from_slice(data);
        if last_resort {
            e.extend_from_slice(&[0x10, 0x01]);
        }
        e
    };
    // UploadKeyPackagesRequest { repeated entries = 1; signing_key_fingerprint = 2 }
    let mut body = Vec::new();
    for e in [entry(&kp("r1"), false), entry(&kp("lr"), true)] {
        body.push(0x0a);
        body.push(e.len() as u8);
        body.extend_from_slice(&e);
    }
    body.extend_from_slice(&[0x12, 64]);
    body.extend_from_slice(fingerprint('f').as_bytes());
    let response = app
        .upload_body("bob", Some("application/x-protobuf"), body)
        .await;
    assert_eq!(response.status(), 201);
    app.consume("alice", "bob").await;
    app.consume("alice", "bob").await;

    // KeyPackageStatus { regular_count = 1; has_last_resort = 2; signing_key_fingerprint = 3;
    // last_resort_handouts = 4; …; inventory_digest = 8 }: here 0 (omitted), true, "fff…", 1,
    // SHA-256 of SHA-256 of the last-resort package (no regular package left, no suites, and
    // the opaque packages have no expiry).
    let response = get_accepting(&app, "/api/v1/key-packages", "bob", None).await;
    let mut expected = vec![0x10, 0x01, 0x1a, 64];
    expected.extend_from_slice(fingerprint('f').as_bytes());
    expected.extend_from_slice(&[0x20, 0x01, 0x42, 32]);
    {
        use sha2::{Digest, Sha256};
        expected.extend_from_slice(&Sha256::digest(Sha256::digest(kp("lr"))));
    }
    assert_eq!(response.bytes().await.unwrap().to_vec(), expected);
}

#[tokio::test]
async fn json_uploads_accept_url_safe_and_unpadded_base64() {
    let app = spawn_app().await;
    let first = [0x00, 0x01, 0x00, 0x05, 0xfb, 0xef, 0xff, 0xff, 0xfe, 0x01];
    let second = [0x00, 0x01, 0x00, 0x05, 0xfb, 0xef, 0xff, 0xff, 0xfe, 0x02];
    let standard = base64(&first);
    assert!(standard.contains('+') && standard.contains('/') && standard.ends_with("=="));
    let url_safe = base64(&first)
        .trim_end_matches('=')
        .replace('+', "-")
        .replace('/', "_");
    let unpadded = base64(&second).trim_end_matches('=').to_owned();
    for encoded in [url_safe, unpadded] {
        let body = json!({ "entries": [{ "keyPackageData": encoded }] });
        let response = app
            .upload_body("bob", Some("application/json"), body.to_string())
            .await;
        assert_eq!(
            response.status(),
            201,
            "{encoded}: {:?}",
            response.text().await
        );
    }
    app.assert_hands_out("bob", &[first.to_vec(), second.to_vec()])
        .await;
}
