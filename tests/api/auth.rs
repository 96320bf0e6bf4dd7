//! Bearer tokens: every `/api/v1` route needs one; anything but a valid token of the configured
//! key and algorithm, with `exp` and a valid `sub` (and `iss`/`aud` when configured), is a 401.

use jsonwebtoken::{Algorithm, EncodingKey};
use keypackage_server::auth::{Authenticator, VerifyingKey};
use prost::Message;
use serde_json::{json, Value};

use crate::harness::*;

/// A fixed Ed25519 test key pair (generated with `openssl genpkey -algorithm ed25519`).
const ED25519_PRIVATE_PEM: &str = "-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VwBCIEIGLrXELVtFWW1lHqiZN+ll+D9+KIgSZvpE+hwJ4svqKv
-----END PRIVATE KEY-----
";
const ED25519_PUBLIC_PEM: &str = "-----BEGIN PUBLIC KEY-----
MCowBQYDK2VwAyEAQ4dxIuOyvT7lDdnjYV7/rz0UmOPaFD0beSJF8itB0UQ=
-----END PUBLIC KEY-----
";
/// The same public key as DER (SubjectPublicKeyInfo), hex.
const ED25519_PUBLIC_DER_HEX: &str =
    "302a300506032b657003210043877122e3b2bd3ee50dd9e3615effaf3d1498e3da143d1b792245f22b41d144";
/// Another Ed25519 private key, which the server does not trust.
const OTHER_ED25519_PRIVATE_PEM: &str = "-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VwBCIEIJThb1sWR/92YqSoEfcJbShpznV0CjGB/WBc+UjGe+od
-----END PRIVATE KEY-----
";

/// Signs `claims` as EdDSA with the fixed test key.
fn eddsa(claims: &Value) -> String {
    let key = EncodingKey::from_ed_pem(ED25519_PRIVATE_PEM.as_bytes()).expect("Ed25519 key");
    sign(Algorithm::EdDSA, &key, claims)
}

/// An unsigned token (`alg: none`) carrying `claims`.
fn unsigned(claims: &Value) -> String {
    let header = base64url(br#"{"alg":"none","typ":"JWT"}"#);
    let payload = base64url(claims.to_string().as_bytes());
    format!("{header}.{payload}.")
}

#[tokio::test]
async fn every_api_route_requires_a_bearer_token() {
    let app = spawn_app().await;
    app.upload("bob", &[(kp("1"), false)], &fingerprint('a'))
        .await;
    let body = upload_request(&[(kp("2"), false)], "").encode_to_vec();
    let requests = [
        app.client.get(app.url("/api/v1/key-packages")),
        app.client
            .post(app.url("/api/v1/key-packages"))
            .header("content-type", "application/x-protobuf")
            .body(body),
        app.client.delete(app.url("/api/v1/key-packages")),
        app.client.get(app.url("/api/v1/key-packages/bob")),
        app.client.get(app.url("/api/v1/users/bob/fingerprint")),
    ];
    for request in requests {
        let response = request.send().await.expect("request");
        let what = format!("{}", response.url());
        assert_unauthorized(response, &what).await;
    }
    // Nothing was uploaded, consumed or deleted.
    assert_eq!(app.status("bob").await.regular_count, 1);
}

#[tokio::test]
async fn a_missing_or_non_bearer_authorization_header_is_refused() {
    let app = spawn_app().await;
    let valid = token("bob");
    assert_unauthorized(app.status_with(None).await, "no header").await;
    for header in [
        String::new(),
        "Bearer".to_owned(),
        "Bearer ".to_owned(),
        valid.clone(),
        format!("Basic {valid}"),
        format!("Token {valid}"),
        "Basic Ym9iOnNlY3JldA==".to_owned(),
        format!("Bearer{valid}"),
    ] {
        assert_unauthorized(app.status_with(Some(&header)).await, &header).await;
    }
    assert_accepted(&app, &valid, "a valid token").await;
}

#[tokio::test]
async fn a_garbage_token_is_refused() {
    let app = spawn_app().await;
    for garbage in [
        "garbage",
        "a.b.c",
        "....",
        "eyJhbGciOiJIUzI1NiJ9..",
        &"x".repeat(4000),
    ] {
        assert_refused(&app, garbage, garbage).await;
    }
}

#[tokio::test]
async fn a_token_signed_with_another_key_is_refused() {
    let app = spawn_app().await;
    let other = EncodingKey::from_secret(b"another-secret-0123456789abcdef-0123456789");
    assert_refused(
        &app,
        &sign(Algorithm::HS256, &other, &claims("bob")),
        "other secret",
    )
    .await;
}

#[tokio::test]
async fn a_token_whose_payload_was_altered_is_refused() {
    let app = spawn_app().await;
    let genuine = hs256(&claims("bob"));
    let parts: Vec<&str> = genuine.split('.').collect();
    let forged_payload = base64url(claims("alice").to_string().as_bytes());
    let forged = format!("{}.{forged_payload}.{}", parts[0], parts[2]);
    assert_refused(&app, &forged, "payload swapped under a valid signature").await;
}

#[tokio::test]
async fn tokens_of_another_algorithm_than_hs256_are_refused() {
    let app = spawn_app().await;
    let secret = EncodingKey::from_secret(SECRET);
    for algorithm in [Algorithm::HS384, Algorithm::HS512] {
        let token = sign(algorithm, &secret, &claims("bob"));
        assert_refused(
            &app,
            &token,
            &format!("{algorithm:?} with the right secret"),
        )
        .await;
    }
    assert_refused(
        &app,
        &sign(Algorithm::RS256, &rsa_key(), &claims("bob")),
        "RS256",
    )
    .await;
    assert_refused(&app, &eddsa(&claims("bob")), "EdDSA").await;
}

#[tokio::test]
async fn a_token_without_sub_or_exp_is_refused() {
    let app = spawn_app().await;
    let no_sub = json!({ "exp": unix_now() + 3600 });
    assert_refused(&app, &hs256(&no_sub), "no sub").await;
    let no_exp = json!({ "sub": "bob" });
    assert_refused(&app, &hs256(&no_exp), "no exp").await;
    let null_sub = json!({ "sub": null, "exp": unix_now() + 3600 });
    assert_refused(&app, &hs256(&null_sub), "null sub").await;
}

#[tokio::test]
async fn a_token_whose_sub_is_not_a_valid_user_id_is_refused() {
    let app = spawn_app().await;
    let too_long = "x".repeat(129);
    for sub in [
        "",
        "bob/eve",
        "bob eve",
        "bøb",
        "bob%2F",
        "a,b",
        too_long.as_str(),
    ] {
        assert_refused(&app, &hs256(&claims(sub)), &format!("sub {sub:?}")).await;
    }
    assert_accepted(
        &app,
        &hs256(&claims("AZaz09._~@:+-")),
        "every allowed character",
    )
    .await;
    assert_accepted(&app, &hs256(&claims(&"x".repeat(128))), "128 characters").await;
}

#[tokio::test]
async fn the_token_subject_is_the_caller() {
    let app = spawn_app().await;
    let response = app
        .client
        .post(app.url("/api/v1/key-packages"))
        .bearer_auth(hs256(&claims("carol")))
        .header("content-type", "application/x-protobuf")
        .body(upload_request(&[(kp("c"), false)], "").encode_to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    assert_eq!(app.status("carol").await.regular_count, 1);
    assert_eq!(
        app.consume("alice", "carol")
            .await
            .key_package_data
            .to_vec(),
        kp("c")
    );
}

/// A server that verifies tokens with the fixed Ed25519 public key.
async fn spawn_eddsa_app() -> TestApp {
    spawn_public_key_app(ED25519_PUBLIC_PEM, None, None).await
}

#[tokio::test]
async fn with_a_public_key_configured_eddsa_tokens_verify() {
    let app = spawn_eddsa_app().await;
    assert_accepted(&app, &eddsa(&claims("bob")), "EdDSA").await;
    let other = EncodingKey::from_ed_pem(OTHER_ED25519_PRIVATE_PEM.as_bytes()).unwrap();
    assert_refused(
        &app,
        &sign(Algorithm::EdDSA, &other, &claims("bob")),
        "other key",
    )
    .await;
    let expired = json!({ "sub": "bob", "exp": unix_now() - 600 });
    assert_refused(&app, &eddsa(&expired), "expired").await;
    assert_refused(&app, &unsigned(&claims("bob")), "alg none").await;
}

#[tokio::test]
async fn with_a_public_key_configured_hs256_tokens_signed_with_the_public_key_are_refused() {
    let app = spawn_eddsa_app().await;
    let der = hex::decode(ED25519_PUBLIC_DER_HEX).unwrap();
    let raw = der[der.len() - 32..].to_vec();
    for (what, bytes) in [
        ("PEM text", ED25519_PUBLIC_PEM.as_bytes().to_vec()),
        (
            "PEM text without newline",
            ED25519_PUBLIC_PEM.trim_end().as_bytes().to_vec(),
        ),
        ("DER", der),
        ("raw key", raw),
    ] {
        for algorithm in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
            let token = sign(algorithm, &EncodingKey::from_secret(&bytes), &claims("bob"));
            assert_refused(
                &app,
                &token,
                &format!("{algorithm:?} keyed with the {what}"),
            )
            .await;
        }
    }
    assert_refused(&app, &token("bob"), "HS256 with the test secret").await;
}

/// A server that requires `iss` and `aud`.
async fn spawn_strict_app() -> TestApp {
    spawn_app_with(AppOptions {
        auth: Authenticator::new(
            VerifyingKey::Secret(SECRET.to_vec()),
            Some("https://idp.example".into()),
            Some("keypackage-server".into()),
        ),
        ..AppOptions::default()
    })
    .await
}

#[tokio::test]
async fn with_issuer_and_audience_configured_matching_tokens_verify() {
    let app = spawn_strict_app().await;
    let mut good = claims("bob");
    good["iss"] = "https://idp.example".into();
    good["aud"] = "keypackage-server".into();
    assert_accepted(&app, &hs256(&good), "matching iss and aud").await;
}

#[tokio::test]
async fn with_issuer_and_audience_configured_a_wrong_or_missing_one_is_refused() {
    let app = spawn_strict_app().await;
    let with = |iss: Option<&str>, aud: Option<&str>| {
        let mut c = claims("bob");
        if let Some(iss) = iss {
            c["iss"] = iss.into();
        }
        if let Some(aud) = aud {
            c["aud"] = aud.into();
        }
        hs256(&c)
    };
    let iss = Some("https://idp.example");
    let aud = Some("keypackage-server");
    let cases = [
        ("no iss", with(None, aud)),
        ("wrong iss", with(Some("https://evil.example"), aud)),
        (
            "iss differing in case",
            with(Some("https://IDP.example"), aud),
        ),
        ("no aud", with(iss, None)),
        ("wrong aud", with(iss, Some("another-service"))),
        ("neither", with(None, None)),
        (
            "swapped",
            with(Some("keypackage-server"), Some("https://idp.example")),
        ),
    ];
    for (what, token) in cases {
        assert_refused(&app, &token, what).await;
    }
    assert_refused(&app, &token("bob"), "a token without iss and aud").await;
}
