//! The attack suite: hostile tokens, `Authorization` headers, path user ids and bodies, slow
//! clients, a burst of distinct targets, and the logs of it all. Every answer must be a 4xx (or
//! the connection closed by the HTTP layer), never a 5xx or a panic, the server must keep
//! serving, and nothing of an attack may be stored, consumed or written to the logs.

use std::{
    collections::HashSet,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use jsonwebtoken::{Algorithm, EncodingKey};
use keypackage_server::{
    app::Limits,
    auth::{Authenticator, VerifyingKey},
    key_package::UserId,
    rate_limit::Budget,
    wire::KeyPackageStatus,
};
use prost::Message;
use serde_json::{json, Value};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::{
    helpers::*,
    process::{ServerProcess, TempDir},
};

// ---------------------------------------------------------------------------------------------
// Keys

/// A fixed P-256 test key pair (`openssl ecparam -name prime256v1 -genkey`, PKCS#8).
const P256_PRIVATE_PEM: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgRcVDZlsxxgS5vRyy
iL8u3RVHneXB/D49VCyBUQTked6hRANCAASANfudXojJGvOnfBk5NZhvby7lVMI3
ITnHWxOrrxdtrI+3zjpljfEqFCOvd32GF2fDNTiYj6+6HDAbz/Mij2rN
-----END PRIVATE KEY-----
";
const P256_PUBLIC_PEM: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEgDX7nV6IyRrzp3wZOTWYb28u5VTC
NyE5x1sTq68XbayPt846ZY3xKhQjr3d9hhdnwzU4mI+vuhwwG8/zIo9qzQ==
-----END PUBLIC KEY-----
";
/// The same public key as DER (SubjectPublicKeyInfo), hex; its last 65 bytes are the point.
const P256_PUBLIC_DER_HEX: &str =
    "3059301306072a8648ce3d020106082a8648ce3d030107034200048035fb9d5e\
88c91af3a77c193935986f6f2ee554c2372139c75b13abaf176dac8fb7ce3a658df12a1423af777d861767c33538988f\
afba1c301bcff3228f6acd";
/// An attacker's P-256 key pair, which the server does not trust.
const ATTACKER_P256_PRIVATE_PEM: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgt47fXt5DTjg/yxSu
nIR6n5yiuTWKK0tjt/t4FgyJ1fGhRANCAATjxn6EH22PYYpGUsKqlIrYM1guSr6G
VbcoyW2UoeRL1c4I8TL3VGcaCJxTrDzJUpribs0+s/RK/7o0IQLxEYZT
-----END PRIVATE KEY-----
";
const ATTACKER_P256_PUBLIC_DER_HEX: &str = "3059301306072a8648ce3d020106082a8648ce3d030107034200\
04e3c67e841f6d8f618a4652c2aa948ad833582e4abe8655b728c96d94a1e44bd5ce08f132f754671a089c53ac3cc952\
9ae26ecd3eb3f44affba342102f1118653";

/// The RSA test key (PKCS#1) and its public half in the forms an attacker might key HMAC with.
const RSA_PRIVATE_PEM: &str = include_str!("fixtures/rsa-2048-test-key.pem");
const RSA_PUBLIC_PEM: &str = "-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAutNOZQiBZhFVO8P8QQez
pPYmaGZ29I7aMGaLyKE7vgEWKZanixC5gViOptjiZJuPHkHgelKnV+B6enCoNgE8
JYyFA59iyQEozTtrjrNj13hvDlzV57ID9f1PyDTO7cKp3JFAm+lkDNMQp0Pbqjlt
AzZtlY3KqLYSJvXtaPpySK91euXeDF/fhNpCvodiCrJc+L834MqmKr0ok7cCNRsc
p9akU6s61/FpvNOlxY8il32MMiFVOYXk+7dpOoCxd8Ex8Zi2zO9VVWv1jQcMs7KS
/kfSxaWkAgqrKr1FgsCwRUKNvu8oUN4rx4v67L4olYWfrr9Sm3XE6MMVrOzwnN/j
EwIDAQAB
-----END PUBLIC KEY-----
";
const RSA_PUBLIC_PKCS1_PEM: &str = "-----BEGIN RSA PUBLIC KEY-----
MIIBCgKCAQEAutNOZQiBZhFVO8P8QQezpPYmaGZ29I7aMGaLyKE7vgEWKZanixC5
gViOptjiZJuPHkHgelKnV+B6enCoNgE8JYyFA59iyQEozTtrjrNj13hvDlzV57ID
9f1PyDTO7cKp3JFAm+lkDNMQp0PbqjltAzZtlY3KqLYSJvXtaPpySK91euXeDF/f
hNpCvodiCrJc+L834MqmKr0ok7cCNRscp9akU6s61/FpvNOlxY8il32MMiFVOYXk
+7dpOoCxd8Ex8Zi2zO9VVWv1jQcMs7KS/kfSxaWkAgqrKr1FgsCwRUKNvu8oUN4r
x4v67L4olYWfrr9Sm3XE6MMVrOzwnN/jEwIDAQAB
-----END RSA PUBLIC KEY-----
";
/// The RSA public key as SubjectPublicKeyInfo DER, hex; the PKCS#1 DER starts at `3082010a`.
const RSA_PUBLIC_DER_HEX: &str =
    "30820122300d06092a864886f70d01010105000382010f003082010a0282010100\
bad34e6508816611553bc3fc4107b3a4f626686676f48eda30668bc8a13bbe01162996a78b10b981588ea6d8e2649b8f\
1e41e07a52a757e07a7a70a836013c258c85039f62c90128cd3b6b8eb363d7786f0e5cd5e7b203f5fd4fc834ceedc2a9\
dc91409be9640cd310a743dbaa396d03366d958dcaa8b61226f5ed68fa7248af757ae5de0c5fdf84da42be87620ab25c\
f8bf37e0caa62abd2893b702351b1ca7d6a453ab3ad7f169bcd3a5c58f22977d8c3221553985e4fbb7693a80b177c131\
f198b6ccef55556bf58d070cb3b292fe47d2c5a5a4020aab2abd4582c0b045428dbeef2850de2bc78bfaecbe2895859f\
aebf529b75c4e8c315acecf09cdfe3130203010001";

// ---------------------------------------------------------------------------------------------
// Tokens

/// Base64url without padding, as JWTs encode their segments.
fn base64url(bytes: &[u8]) -> String {
    base64(bytes)
        .trim_end_matches('=')
        .replace('+', "-")
        .replace('/', "_")
}

/// Claims of a token for `sub` that expires in an hour.
fn claims(sub: &str) -> Value {
    json!({ "sub": sub, "exp": unix_now() + 3600, "iat": unix_now() })
}

/// A token with exactly this header and payload JSON, signed with `algorithm` and `key`.
fn forge(header: &Value, payload: &Value, algorithm: Algorithm, key: &EncodingKey) -> String {
    let message = format!(
        "{}.{}",
        base64url(header.to_string().as_bytes()),
        base64url(payload.to_string().as_bytes())
    );
    let signature =
        jsonwebtoken::crypto::sign(message.as_bytes(), key, algorithm).expect("sign the token");
    format!("{message}.{signature}")
}

/// A standard token (`{"alg": …, "typ": "JWT"}`) carrying `payload`.
fn sign(algorithm: Algorithm, key: &EncodingKey, payload: &Value) -> String {
    let header = json!({ "alg": format!("{algorithm:?}"), "typ": "JWT" });
    forge(&header, payload, algorithm, key)
}

fn hs256(payload: &Value) -> String {
    sign(Algorithm::HS256, &EncodingKey::from_secret(SECRET), payload)
}

fn p256_key() -> EncodingKey {
    EncodingKey::from_ec_pem(P256_PRIVATE_PEM.as_bytes()).expect("P-256 key")
}

fn attacker_p256_key() -> EncodingKey {
    EncodingKey::from_ec_pem(ATTACKER_P256_PRIVATE_PEM.as_bytes()).expect("P-256 key")
}

fn rsa_key() -> EncodingKey {
    EncodingKey::from_rsa_pem(RSA_PRIVATE_PEM.as_bytes()).expect("RSA key")
}

/// A server that verifies tokens with `public_pem`, requiring `iss`/`aud` when given.
async fn spawn_public_key_app(
    public_pem: &str,
    issuer: Option<&str>,
    audience: Option<&str>,
) -> TestApp {
    let key = VerifyingKey::from_pem(public_pem.as_bytes()).expect("a supported public key");
    spawn_app_with(AppOptions {
        auth: Authenticator::new(key, issuer.map(Into::into), audience.map(Into::into)),
        ..AppOptions::default()
    })
    .await
}

/// GETs the caller's own status with this `Authorization` value.
async fn status_with(app: &TestApp, authorization: &str) -> reqwest::Response {
    app.client
        .get(app.url("/api/v1/key-packages"))
        .header("authorization", authorization)
        .send()
        .await
        .expect("request")
}

/// Asserts a 401 `unauthorized` problem with `WWW-Authenticate: Bearer`.
async fn assert_unauthorized(response: reqwest::Response, what: &str) {
    assert_eq!(response.status(), 401, "{what}");
    let challenge = response
        .headers()
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    assert!(challenge.starts_with("Bearer"), "{what}: {challenge:?}");
    problem(response, 401, "unauthorized").await;
}

/// Asserts that `token` is refused with 401 on the status route and, as a token for an upload,
/// stores nothing.
async fn assert_refused(app: &TestApp, token: &str, what: &str) {
    assert_unauthorized(status_with(app, &format!("Bearer {token}")).await, what).await;
}

/// Asserts that `token` is accepted, so the refusals around it are about what they vary.
async fn assert_accepted(app: &TestApp, token: &str, what: &str) {
    let response = status_with(app, &format!("Bearer {token}")).await;
    assert_eq!(
        response.status(),
        200,
        "{what}: {:?}",
        response.text().await
    );
}

/// Uploads one package with `token`, expecting 401, and checks with `valid` (a token the server
/// accepts for the same user) that nothing was stored.
async fn assert_upload_refused(app: &TestApp, token: &str, valid: &str, what: &str) {
    let response = app
        .client
        .post(app.url("/api/v1/key-packages"))
        .bearer_auth(token)
        .header("content-type", "application/x-protobuf")
        .body(upload_request(&[(kp("forged"), false)], "").encode_to_vec())
        .send()
        .await
        .expect("request");
    assert_unauthorized(response, what).await;
    let response = status_with(app, &format!("Bearer {valid}")).await;
    assert_eq!(response.status(), 200, "{what}: the valid token");
    let status: KeyPackageStatus = decode(response).await;
    assert_eq!(status, KeyPackageStatus::default(), "{what}: stored");
}

/// `alg: none` tokens in several spellings and shapes, for `sub`.
fn alg_none_tokens(sub: &str, genuine: &str) -> Vec<(String, String)> {
    let payload = base64url(claims(sub).to_string().as_bytes());
    let genuine_signature = genuine.rsplit('.').next().unwrap_or_default();
    let mut tokens = Vec::new();
    for alg in ["none", "None", "NONE", "nOnE", "none ", ""] {
        let header = base64url(json!({ "alg": alg, "typ": "JWT" }).to_string().as_bytes());
        for (shape, token) in [
            ("trailing dot", format!("{header}.{payload}.")),
            ("two segments", format!("{header}.{payload}")),
            (
                "genuine signature",
                format!("{header}.{payload}.{genuine_signature}"),
            ),
            ("junk signature", format!("{header}.{payload}.AAAA")),
        ] {
            tokens.push((format!("alg {alg:?}, {shape}"), token));
        }
    }
    let no_alg = base64url(br#"{"typ":"JWT"}"#);
    tokens.push(("no alg".into(), format!("{no_alg}.{payload}.")));
    tokens
}

#[tokio::test]
async fn alg_none_is_refused_in_every_spelling_and_shape_whatever_key_is_configured() {
    let hmac = spawn_app().await;
    let genuine = hs256(&claims("bob"));
    assert_accepted(&hmac, &genuine, "genuine HS256").await;
    for (what, token) in alg_none_tokens("bob", &genuine) {
        assert_refused(&hmac, &token, &what).await;
    }
    assert_upload_refused(
        &hmac,
        &alg_none_tokens("bob", &genuine)[0].1,
        &genuine,
        "alg none",
    )
    .await;

    let ec = spawn_public_key_app(P256_PUBLIC_PEM, None, None).await;
    let genuine = sign(Algorithm::ES256, &p256_key(), &claims("bob"));
    assert_accepted(&ec, &genuine, "genuine ES256").await;
    for (what, token) in alg_none_tokens("bob", &genuine) {
        assert_refused(&ec, &token, &format!("ES256 server: {what}")).await;
    }
}

/// HMAC keys an attacker can derive from a public key: its PEM and DER encodings, and more.
fn hmac_keys_from_public_key(forms: &[(&str, Vec<u8>)]) -> Vec<(String, Vec<u8>)> {
    let mut keys = Vec::new();
    for (what, bytes) in forms {
        keys.push(((*what).to_owned(), bytes.clone()));
        if let Ok(text) = std::str::from_utf8(bytes) {
            keys.push((
                format!("{what} without trailing newline"),
                text.trim_end().as_bytes().to_vec(),
            ));
            keys.push((
                format!("{what} with CRLF"),
                text.replace('\n', "\r\n").into_bytes(),
            ));
        }
    }
    keys
}

/// Asserts that HS256/384/512 tokens keyed with any of `keys` are refused by `app`.
async fn assert_hmac_confusion_refused(app: &TestApp, keys: &[(String, Vec<u8>)]) {
    for (what, bytes) in keys {
        for algorithm in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
            let token = sign(algorithm, &EncodingKey::from_secret(bytes), &claims("bob"));
            assert_refused(app, &token, &format!("{algorithm:?} keyed with the {what}")).await;
        }
    }
}

#[tokio::test]
async fn with_a_p256_key_configured_only_es256_tokens_of_that_key_verify() {
    let app = spawn_public_key_app(P256_PUBLIC_PEM, None, None).await;
    assert_accepted(
        &app,
        &sign(Algorithm::ES256, &p256_key(), &claims("bob")),
        "ES256",
    )
    .await;

    let der = hex::decode(P256_PUBLIC_DER_HEX).unwrap();
    let point = der[der.len() - 65..].to_vec();
    let keys = hmac_keys_from_public_key(&[
        ("PEM", P256_PUBLIC_PEM.as_bytes().to_vec()),
        ("DER", der.clone()),
        ("uncompressed point", point.clone()),
        ("point without its 04 prefix", point[1..].to_vec()),
        ("hex DER", P256_PUBLIC_DER_HEX.as_bytes().to_vec()),
    ]);
    assert_hmac_confusion_refused(&app, &keys).await;

    // Another P-256 key, and the same claims under other algorithms.
    assert_refused(
        &app,
        &sign(Algorithm::ES256, &attacker_p256_key(), &claims("bob")),
        "ES256 by another key",
    )
    .await;
    assert_refused(
        &app,
        &sign(Algorithm::RS256, &rsa_key(), &claims("bob")),
        "RS256",
    )
    .await;
    assert_refused(&app, &hs256(&claims("bob")), "HS256 with the test secret").await;

    // The attacker's key embedded in the header (`jwk`), or pointed at (`jku`, `x5u`, `kid`).
    let attacker = hex::decode(ATTACKER_P256_PUBLIC_DER_HEX).unwrap();
    let (x, y) = attacker[attacker.len() - 64..].split_at(32);
    let embedded = [
        json!({ "alg": "ES256", "typ": "JWT",
                "jwk": { "kty": "EC", "crv": "P-256", "x": base64url(x), "y": base64url(y) } }),
        json!({ "alg": "ES256", "typ": "JWT", "jku": "https://attacker.example/jwks.json" }),
        json!({ "alg": "ES256", "typ": "JWT", "x5u": "https://attacker.example/cert.pem" }),
        json!({ "alg": "ES256", "typ": "JWT", "kid": "../../../../dev/null" }),
    ];
    for header in embedded {
        let token = forge(
            &header,
            &claims("bob"),
            Algorithm::ES256,
            &attacker_p256_key(),
        );
        assert_refused(&app, &token, &format!("attacker key via {header}")).await;
    }
    let confused = forge(
        &json!({ "alg": "HS256", "typ": "JWT" }),
        &claims("bob"),
        Algorithm::HS256,
        &EncodingKey::from_secret(P256_PUBLIC_PEM.as_bytes()),
    );
    assert_upload_refused(
        &app,
        &confused,
        &sign(Algorithm::ES256, &p256_key(), &claims("bob")),
        "HS256 keyed with the PEM",
    )
    .await;
}

#[tokio::test]
async fn with_an_rsa_key_configured_only_rs256_tokens_of_that_key_verify() {
    let app = spawn_public_key_app(RSA_PUBLIC_PEM, None, None).await;
    assert_accepted(
        &app,
        &sign(Algorithm::RS256, &rsa_key(), &claims("bob")),
        "RS256",
    )
    .await;

    let spki = hex::decode(RSA_PUBLIC_DER_HEX).unwrap();
    let pkcs1_at = RSA_PUBLIC_DER_HEX.find("3082010a").unwrap() / 2;
    let keys = hmac_keys_from_public_key(&[
        ("SPKI PEM", RSA_PUBLIC_PEM.as_bytes().to_vec()),
        ("PKCS#1 PEM", RSA_PUBLIC_PKCS1_PEM.as_bytes().to_vec()),
        ("SPKI DER", spki.clone()),
        ("PKCS#1 DER", spki[pkcs1_at..].to_vec()),
    ]);
    assert_hmac_confusion_refused(&app, &keys).await;

    // The same RSA key under any other RSA algorithm: the algorithm is pinned, not the key type.
    for algorithm in [
        Algorithm::RS384,
        Algorithm::RS512,
        Algorithm::PS256,
        Algorithm::PS384,
        Algorithm::PS512,
    ] {
        let token = sign(algorithm, &rsa_key(), &claims("bob"));
        assert_refused(&app, &token, &format!("{algorithm:?} with the right key")).await;
    }
    // An RS256 header over a PS256 signature, and the reverse.
    let ps_signed = forge(
        &json!({ "alg": "RS256", "typ": "JWT" }),
        &claims("bob"),
        Algorithm::PS256,
        &rsa_key(),
    );
    assert_refused(&app, &ps_signed, "RS256 header, PS256 signature").await;
    assert_refused(
        &app,
        &sign(Algorithm::ES256, &p256_key(), &claims("bob")),
        "ES256",
    )
    .await;
    let confused = sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(RSA_PUBLIC_PEM.as_bytes()),
        &claims("bob"),
    );
    assert_upload_refused(
        &app,
        &confused,
        &sign(Algorithm::RS256, &rsa_key(), &claims("bob")),
        "HS256 keyed with the PEM",
    )
    .await;
}

#[tokio::test]
async fn expired_and_not_yet_valid_tokens_are_refused_for_every_key_type() {
    let now = unix_now();
    let timed = |exp: i64, nbf: Option<i64>| {
        let mut c = json!({ "sub": "bob", "exp": exp, "iat": now });
        if let Some(nbf) = nbf {
            c["nbf"] = nbf.into();
        }
        c
    };
    let refused = [
        ("expired a minute ago", timed(now - 60, None)),
        ("expired a day ago", timed(now - 86_400, None)),
        ("expired at the epoch", timed(0, None)),
        ("not valid for an hour", timed(now + 7200, Some(now + 3600))),
        ("not valid for a minute", timed(now + 7200, Some(now + 60))),
        (
            "not valid for a century",
            timed(now + 7200, Some(now + 3_155_760_000)),
        ),
        ("expired and not yet valid", timed(now - 60, Some(now + 60))),
    ];
    let valid = timed(now + 3600, Some(now - 10));
    let hmac = spawn_app().await;
    let ec = spawn_public_key_app(P256_PUBLIC_PEM, None, None).await;
    let rsa = spawn_public_key_app(RSA_PUBLIC_PEM, None, None).await;
    let cases: [(&TestApp, Algorithm, EncodingKey); 3] = [
        (&hmac, Algorithm::HS256, EncodingKey::from_secret(SECRET)),
        (&ec, Algorithm::ES256, p256_key()),
        (&rsa, Algorithm::RS256, rsa_key()),
    ];
    for (app, algorithm, key) in &cases {
        assert_accepted(app, &sign(*algorithm, key, &valid), "nbf in the past").await;
        for (what, payload) in &refused {
            let token = sign(*algorithm, key, payload);
            assert_refused(app, &token, &format!("{algorithm:?}: {what}")).await;
        }
        let expired = sign(*algorithm, key, &refused[0].1);
        assert_upload_refused(app, &expired, &sign(*algorithm, key, &valid), "expired").await;
    }
}

#[tokio::test]
async fn with_a_public_key_and_issuer_and_audience_configured_a_wrong_one_is_refused() {
    let app = spawn_public_key_app(P256_PUBLIC_PEM, Some("https://idp.example"), Some("kps")).await;
    let with = |iss: Value, aud: Value| {
        let mut c = claims("bob");
        if !iss.is_null() {
            c["iss"] = iss;
        }
        if !aud.is_null() {
            c["aud"] = aud;
        }
        sign(Algorithm::ES256, &p256_key(), &c)
    };
    assert_accepted(
        &app,
        &with(json!("https://idp.example"), json!("kps")),
        "matching",
    )
    .await;
    for (what, iss, aud) in [
        ("no iss", Value::Null, json!("kps")),
        ("wrong iss", json!("https://evil.example"), json!("kps")),
        (
            "iss with a trailing slash",
            json!("https://idp.example/"),
            json!("kps"),
        ),
        (
            "iss as a list",
            json!(["https://idp.example"]),
            json!("kps"),
        ),
        ("iss as a number", json!(1), json!("kps")),
        ("no aud", json!("https://idp.example"), Value::Null),
        ("wrong aud", json!("https://idp.example"), json!("other")),
        (
            "aud list without ours",
            json!("https://idp.example"),
            json!(["a", "b"]),
        ),
        ("empty aud list", json!("https://idp.example"), json!([])),
        ("aud as a number", json!("https://idp.example"), json!(7)),
    ] {
        assert_refused(&app, &with(iss, aud), what).await;
    }
}

#[tokio::test]
async fn tokens_with_ill_typed_or_ambiguous_claims_are_refused() {
    let app = spawn_app().await;
    let exp = unix_now() + 3600;
    let payloads = [
        json!({ "sub": "bob", "exp": exp.to_string() }),
        json!({ "sub": "bob", "exp": 1e300 }),
        json!({ "sub": "bob", "exp": -1 }),
        json!({ "sub": "bob", "exp": null }),
        json!({ "sub": "bob", "exp": [exp] }),
        json!({ "sub": 42, "exp": exp }),
        json!({ "sub": ["bob"], "exp": exp }),
        json!({ "sub": { "id": "bob" }, "exp": exp }),
        json!({ "sub": "bob", "exp": exp, "nbf": "tomorrow" }),
        json!("bob"),
        json!([]),
        json!(null),
    ];
    for payload in payloads {
        assert_refused(&app, &hs256(&payload), &payload.to_string()).await;
    }
    // A payload naming two subjects: whichever one a parser picks, refuse it.
    let header = base64url(br#"{"alg":"HS256","typ":"JWT"}"#);
    let payload = base64url(format!(r#"{{"sub":"alice","sub":"bob","exp":{exp}}}"#).as_bytes());
    let message = format!("{header}.{payload}");
    let signature = jsonwebtoken::crypto::sign(
        message.as_bytes(),
        &EncodingKey::from_secret(SECRET),
        Algorithm::HS256,
    )
    .unwrap();
    assert_refused(&app, &format!("{message}.{signature}"), "duplicate sub").await;
    // Headers that are not a JOSE header.
    for header in [
        json!([]),
        json!("HS256"),
        json!({ "alg": 256 }),
        json!({ "alg": ["HS256"] }),
    ] {
        let message = format!(
            "{}.{}",
            base64url(header.to_string().as_bytes()),
            base64url(claims("bob").to_string().as_bytes())
        );
        let signature = jsonwebtoken::crypto::sign(
            message.as_bytes(),
            &EncodingKey::from_secret(SECRET),
            Algorithm::HS256,
        )
        .unwrap();
        assert_refused(&app, &format!("{message}.{signature}"), &header.to_string()).await;
    }
    assert_alive(&app).await;
}

// ---------------------------------------------------------------------------------------------
// Raw HTTP, for what a well-behaved client refuses to send

/// What came back on a raw connection.
#[derive(Debug)]
enum Reply {
    /// A complete response.
    Response {
        status: u16,
        head: String,
        body: Vec<u8>,
    },
    /// The connection was closed or reset without a complete response.
    Closed,
}

impl Reply {
    fn status(&self) -> Option<u16> {
        match self {
            Self::Response { status, .. } => Some(*status),
            Self::Closed => None,
        }
    }

    /// The problem `code` of a problem+json response.
    fn code(&self) -> Option<String> {
        match self {
            Self::Response { head, body, .. }
                if head
                    .to_ascii_lowercase()
                    .contains("content-type: application/problem+json") =>
            {
                let body: Value = serde_json::from_slice(body).ok()?;
                body["code"].as_str().map(str::to_owned)
            }
            _ => None,
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Reads one response (head and `Content-Length` body) or until the connection ends.
async fn read_reply(stream: &mut (impl AsyncRead + Unpin)) -> Reply {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let length = head.lines().find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse::<usize>().ok())?
            });
            if let Some(length) = length {
                if buf.len() >= end + 4 + length {
                    let body = buf[end + 4..end + 4 + length].to_vec();
                    let status = status_of(&head);
                    return Reply::Response { status, head, body };
                }
            }
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    match find(&buf, b"\r\n\r\n") {
        Some(end) => {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            Reply::Response {
                status: status_of(&head),
                head,
                body: buf[end + 4..].to_vec(),
            }
        }
        None => Reply::Closed,
    }
}

/// The status code of a response head (0 if it has none).
fn status_of(head: &str) -> u16 {
    head.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Sends `request` on a new connection and reads the reply (bounded by [`PATIENCE`]).
async fn exchange(app: &TestApp, request: &[u8]) -> Reply {
    let mut stream = TcpStream::connect(addr(app)).await.expect("connect");
    // The server may answer and close before it has read everything (431, 413): not an error.
    let _ = stream.write_all(request).await;
    tokio::time::timeout(PATIENCE, read_reply(&mut stream))
        .await
        .expect("the server neither answered nor closed the connection")
}

fn addr(app: &TestApp) -> &str {
    app.base.trim_start_matches("http://")
}

/// A request with these raw bytes as its target and extra header lines.
fn raw_request(method: &str, target: &[u8], headers: &[Vec<u8>], body: &[u8]) -> Vec<u8> {
    let mut request = format!("{method} ").into_bytes();
    request.extend_from_slice(target);
    request.extend_from_slice(b" HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for header in headers {
        request.extend_from_slice(header);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"\r\n");
    request.extend_from_slice(body);
    request
}

fn bearer_line(user: &str) -> Vec<u8> {
    format!("Authorization: Bearer {}", token(user)).into_bytes()
}

/// `request` without its `Connection: close`.
fn keep_alive(request: Vec<u8>) -> Vec<u8> {
    let at = find(&request, b"Connection: close\r\n").expect("a raw request");
    [&request[..at], &request[at + 19..]].concat()
}

/// Asserts that `reply` announces `Connection: close` and that the server then closes `stream`.
async fn assert_closes(reply: &Reply, stream: &mut TcpStream, what: &str) {
    let Reply::Response { head, .. } = reply else {
        panic!("{what}: no response");
    };
    assert!(
        head.to_ascii_lowercase().contains("\r\nconnection: close"),
        "{what}: a connection whose request body was not read must not be reused: {head}"
    );
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(PATIENCE, stream.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "{what}: the connection stayed open");
}

/// Asserts that the server still serves a normal request.
async fn assert_alive(app: &TestApp) {
    let response = app
        .client
        .get(app.url("/api/v1/key-packages"))
        .bearer_auth(token("alive-check"))
        .timeout(PATIENCE)
        .send()
        .await
        .expect("the server still answers");
    assert_eq!(response.status(), 200);
}

/// Asserts a 4xx reply, or a connection the HTTP layer closed without answering when
/// `may_close`; never a 5xx.
fn assert_4xx(reply: &Reply, may_close: bool, what: &str) {
    match reply.status() {
        Some(status) => assert!((400..500).contains(&status), "{what}: {reply:?}"),
        None => assert!(
            may_close,
            "{what}: the connection was closed without an answer"
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// Authorization headers

#[tokio::test]
async fn oversized_authorization_headers_are_refused_and_the_server_keeps_serving() {
    let app = spawn_app().await;
    let valid = token("bob");
    // Just over the server's own cap, and far over it, padded around a valid token.
    for size in [8 * 1024 + 1, 64 * 1024] {
        // Spaces between scheme and token count (trailing ones are not part of the value).
        let padded = format!("Bearer{}{valid}", " ".repeat(size - valid.len() - 6));
        assert_eq!(padded.len(), size);
        assert_unauthorized(status_with(&app, &padded).await, &format!("{size} bytes")).await;
        let junk = format!("Bearer {}", "A".repeat(size - 7));
        assert_unauthorized(status_with(&app, &junk).await, &format!("{size} junk")).await;
    }
    // Bigger than the HTTP layer reads: 431 or a closed connection, and never 5xx.
    for size in [512 * 1024, 1024 * 1024] {
        let header = format!("Authorization: Bearer {}", "A".repeat(size)).into_bytes();
        let request = raw_request("GET", b"/api/v1/key-packages", &[header], b"");
        let reply = exchange(&app, &request).await;
        assert_4xx(&reply, true, &format!("{size}-byte Authorization"));
        assert_alive(&app).await;
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
    assert_alive(&app).await;
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
    assert_alive(&app).await;
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

// ---------------------------------------------------------------------------------------------
// Path user ids

#[tokio::test]
async fn hostile_path_user_ids_are_refused_and_touch_no_real_user() {
    let app = spawn_app().await;
    let packages: Vec<Vec<u8>> = (0..10).map(|i| kp(&format!("bob-{i}"))).collect();
    let mut entries: Vec<(Vec<u8>, bool)> = packages.iter().map(|p| (p.clone(), false)).collect();
    entries.push((kp("bob-lr"), true));
    let before = app.upload("bob", &entries, &fingerprint('b')).await;

    let long = "b".repeat(129);
    let encoded_long = "%62".repeat(129);
    let ids: Vec<Vec<u8>> = [
        b"".as_slice(),
        b"/",
        b"bob/",
        b"/bob",
        b"bob/..",
        b"bob/.",
        b"bob/../bob",
        b"..",
        b".",
        b"../bob",
        b"./bob",
        b"%2E%2E",
        b"%2e%2e%2Fbob",
        b"..%2Fbob",
        b"bob%2F..",
        b"bob%2F",
        b"%2Fbob",
        b"bob%5C..",
        b"bob%00",
        b"%00bob",
        b"bob\0",
        b"bob%01",
        b"bob%1F",
        b"bob%7F",
        b"bob%0D%0AX-Injected:%201",
        b"bob%09",
        b"bob%20",
        b"bob\x01",
        b"bob\x7f",
        b"bob\t",
        b"b%C3%A9b",
        b"b\xc3\xa9b",
        b"bob%C0%AF",
        b"bob%E2%80%8B",
        b"%EF%BC%A2ob",
        b"bob%FF",
        b"bob\xff",
        b"bob%",
        b"bob%2",
        b"bob%zz",
        b"bob;x=1",
        long.as_bytes(),
        encoded_long.as_bytes(),
    ]
    .iter()
    .map(|id| id.to_vec())
    .collect();

    let auth = bearer_line("alice");
    for id in &ids {
        // What the id names once the router has split the path and percent-decoded it.
        let splits = id.is_empty() || id.contains(&b'/');
        let decoded = percent_encoding::percent_decode(id).decode_utf8().ok();
        let names_a_valid_id = decoded.is_some_and(|d| UserId::parse(&d).is_ok());
        let routes = [
            [b"/api/v1/key-packages/".as_slice(), id].concat(),
            [b"/api/v1/users/".as_slice(), id, b"/fingerprint"].concat(),
        ];
        for target in routes {
            let what = String::from_utf8_lossy(&target).into_owned();
            let reply = exchange(
                &app,
                &raw_request("GET", &target, std::slice::from_ref(&auth), b""),
            )
            .await;
            let got = (reply.status(), reply.code());
            let expected = match got {
                // No such route (or, for an empty segment, an empty id).
                (Some(404), Some(code)) if splits => code == "not_found",
                (Some(400), Some(code)) if id.is_empty() => code == "invalid_user_id",
                // A valid id, such as "..", of a user who has nothing.
                (Some(404), Some(code)) if names_a_valid_id => {
                    code == "no_key_package" || code == "no_fingerprint"
                }
                // The app refusing the id, or the HTTP layer refusing the request line.
                (Some(400), Some(code)) => {
                    !splits && !names_a_valid_id && code == "invalid_user_id"
                }
                (Some(400), None) => !names_a_valid_id,
                _ => false,
            };
            assert!(expected, "{what:?}: {reply:?}");
        }
    }
    assert_eq!(
        app.status("bob").await,
        before,
        "an attack changed bob's packages"
    );
    assert_eq!(
        app.fingerprint("alice", "bob").await.fingerprint,
        fingerprint('b')
    );
    // Bob's budget is untouched: all ten of his packages can still be had, in order.
    for package in &packages {
        assert_eq!(
            &app.consume("carol", "bob").await.key_package_data.to_vec(),
            package
        );
    }
    assert_alive(&app).await;
}

// ---------------------------------------------------------------------------------------------
// Bodies

/// A server with a small body limit and a short request timeout.
async fn spawn_limited_app(max_body_bytes: usize) -> TestApp {
    spawn_app_with(AppOptions {
        limits: Limits {
            max_body_bytes,
            request_timeout: Duration::from_secs(2),
            ..Limits::default()
        },
        ..AppOptions::default()
    })
    .await
}

/// A protobuf key package of exactly `len` bytes.
fn kp_of_len(len: usize, fill: u8) -> Vec<u8> {
    let mut v = kp("");
    v.resize(len, fill);
    v
}

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
    assert_alive(&app).await;
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
    let mut stream = TcpStream::connect(addr(&app)).await.unwrap();
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
    let mut stream = TcpStream::connect(addr(&app)).await.unwrap();
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
        let mut stream = TcpStream::connect(addr(&app)).await.unwrap();
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
    assert_alive(&app).await;
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
    assert_alive(&app).await;
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
    assert_alive(&app).await;
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

// ---------------------------------------------------------------------------------------------
// Slow clients

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
    let stream = TcpStream::connect(addr(&app)).await.unwrap();
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
    let trickling = TcpStream::connect(addr(&app)).await.unwrap();
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
    let mut silent = TcpStream::connect(addr(&app)).await.unwrap();
    let mut partial = TcpStream::connect(addr(&app)).await.unwrap();
    partial.write_all(b"GET /healthz HT").await.unwrap();

    // Others are served meanwhile.
    assert_alive(&app).await;

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
    assert_alive(&app).await;
}

// ---------------------------------------------------------------------------------------------
// A burst of distinct targets

#[tokio::test]
async fn ten_thousand_distinct_targets_in_a_burst_are_answered_and_leave_no_limiter_state() {
    const TARGETS: usize = 10_000;
    const CONCURRENCY: usize = 64;
    // A budget whose one-request debt refills within a millisecond, so that every bucket is
    // stale right after the burst and pruning must forget it (as the unit test of the limiter
    // does). The burst gives a 1 s window: with a 10 ms one, a target asked twice at once could
    // be refused when the request stamped later reaches the database first.
    let app = spawn_app_with(AppOptions {
        limits: Limits {
            budget: Budget {
                burst: 1000,
                interval: Duration::from_millis(1),
            },
            ..Limits::default()
        },
        ..AppOptions::default()
    })
    .await;
    app.upload("bob", &[(kp("bob-lr"), true)], "").await;

    let mut targets = HashSet::new();
    while targets.len() < TARGETS {
        targets.insert(format!("t{:016x}", rand::random::<u64>()));
    }
    // Every tenth target is asked again under a percent-encoded alias: the same bucket.
    let mut paths: Vec<(String, u16)> = Vec::new();
    for (i, target) in targets.iter().enumerate() {
        paths.push((target.clone(), 404));
        if i % 10 == 0 {
            paths.push((format!("%74{}", &target[1..]), 404));
        }
        if i % 100 == 0 {
            paths.push(("bob".into(), 200));
            paths.push((format!("{target}%00"), 400));
        }
    }
    let paths = Arc::new(paths);
    let next = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let slowest = Arc::new(Mutex::new(Duration::ZERO));
    let caller = token("alice");
    let mut workers = Vec::new();
    for _ in 0..CONCURRENCY {
        let (paths, next, failures, slowest) = (
            paths.clone(),
            next.clone(),
            failures.clone(),
            slowest.clone(),
        );
        let (client, base, caller) = (app.client.clone(), app.base.clone(), caller.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((target, expected)) = paths.get(i) else {
                    return;
                };
                let started = Instant::now();
                let response = client
                    .get(format!("{base}/api/v1/key-packages/{target}"))
                    .bearer_auth(&caller)
                    .timeout(Duration::from_secs(30))
                    .send()
                    .await;
                let elapsed = started.elapsed();
                {
                    let mut slowest = slowest.lock().unwrap();
                    *slowest = (*slowest).max(elapsed);
                }
                let status = response.as_ref().map(|r| r.status().as_u16());
                if status.as_ref().ok() != Some(expected) {
                    failures
                        .lock()
                        .unwrap()
                        .push(format!("{target}: {status:?}, expected {expected}"));
                }
            }
        }));
    }
    for worker in workers {
        worker.await.unwrap();
    }
    let failures = std::mem::take(&mut *failures.lock().unwrap());
    assert!(
        failures.is_empty(),
        "{} failures, first: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    let slowest = *slowest.lock().unwrap();
    assert!(
        slowest < Duration::from_secs(5),
        "a request took {slowest:?}"
    );

    // No more buckets than distinct valid targets (aliases share one, invalid ids make none),
    let limiter = app.state.limiter.limiter();
    assert!(limiter.len() <= TARGETS + 1, "{} buckets", limiter.len());
    // and once they have refilled, pruning forgets them all.
    let deadline = Instant::now() + PATIENCE;
    loop {
        app.state.limiter.prune();
        if limiter.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} buckets left after pruning",
            limiter.len()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        app.consume("carol", "bob").await.key_package_data.to_vec(),
        kp("bob-lr")
    );
}

// ---------------------------------------------------------------------------------------------
// Logs

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
