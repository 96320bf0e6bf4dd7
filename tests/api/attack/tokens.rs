//! Hostile tokens: `alg: none`, algorithm and key confusion (HMAC keyed with a public key,
//! embedded or pointed-at keys), bad times, wrong `iss`/`aud`, ill-typed or ambiguous claims.

use jsonwebtoken::{Algorithm, EncodingKey};
use keypackage_server::wire::KeyPackageStatus;
use prost::Message;
use serde_json::{json, Value};

use crate::harness::*;

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

/// The RSA test key's public half, in the forms an attacker might key HMAC with.
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

fn p256_key() -> EncodingKey {
    EncodingKey::from_ec_pem(P256_PRIVATE_PEM.as_bytes()).expect("P-256 key")
}

/// The attacker's P-256 key, for signing.
fn attacker_p256_key() -> EncodingKey {
    EncodingKey::from_ec_pem(ATTACKER_P256_PRIVATE_PEM.as_bytes()).expect("P-256 key")
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
    let response = app.status_with(Some(&format!("Bearer {valid}"))).await;
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
    app.assert_alive().await;
}
