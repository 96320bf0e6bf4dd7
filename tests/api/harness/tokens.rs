//! Bearer tokens: the test secret and keys, signing and forging JWTs byte by byte, and the
//! checks of what the server answers to a token.

use jsonwebtoken::{Algorithm, EncodingKey};
use keypackage_server::{
    auth::{Authenticator, VerifyingKey},
    key_package::UserId,
};
use serde_json::{json, Value};

use super::{base64, problem, ApiClient};

/// The HS256 secret every test server uses.
pub(crate) const SECRET: &[u8] = b"test-secret-0123456789abcdef-0123456789";

/// The RSA test key (PKCS#1), for RS256 and PS256 tokens.
pub(crate) const RSA_PRIVATE_PEM: &str = include_str!("../fixtures/rsa-2048-test-key.pem");

/// Signs an HS256 token with [`SECRET`] for `user`, valid for an hour.
pub(crate) fn token(user: &str) -> String {
    let auth = Authenticator::new(VerifyingKey::Secret(SECRET.to_vec()), None, None);
    auth.issue(&UserId::parse(user).expect("valid user id"), 3600)
        .expect("sign")
}

/// Seconds since the Unix epoch, by the test's clock.
pub(crate) fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

/// Base64url without padding, as JWTs encode their segments.
pub(crate) fn base64url(bytes: &[u8]) -> String {
    base64(bytes)
        .trim_end_matches('=')
        .replace('+', "-")
        .replace('/', "_")
}

/// Claims of a token for `sub` that expires in an hour.
pub(crate) fn claims(sub: &str) -> Value {
    json!({ "sub": sub, "exp": unix_now() + 3600, "iat": unix_now() })
}

/// A token with exactly this header and payload JSON, signed with `algorithm` and `key`.
pub(crate) fn forge(
    header: &Value,
    payload: &Value,
    algorithm: Algorithm,
    key: &EncodingKey,
) -> String {
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
pub(crate) fn sign(algorithm: Algorithm, key: &EncodingKey, payload: &Value) -> String {
    let header = json!({ "alg": format!("{algorithm:?}"), "typ": "JWT" });
    forge(&header, payload, algorithm, key)
}

/// Signs `payload` as HS256 with the test servers' secret.
pub(crate) fn hs256(payload: &Value) -> String {
    sign(Algorithm::HS256, &EncodingKey::from_secret(SECRET), payload)
}

/// The RSA test key for signing.
pub(crate) fn rsa_key() -> EncodingKey {
    EncodingKey::from_rsa_pem(RSA_PRIVATE_PEM.as_bytes()).expect("RSA key")
}

/// Asserts a 401 `unauthorized` problem with `WWW-Authenticate: Bearer`.
pub(crate) async fn assert_unauthorized(response: reqwest::Response, what: &str) {
    assert_eq!(response.status(), 401, "{what}");
    let challenge = response
        .headers()
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    assert!(challenge.starts_with("Bearer"), "{what}: {challenge:?}");
    problem(response, 401, "unauthorized").await;
}

/// Asserts that `token` is refused with 401 on the status route.
pub(crate) async fn assert_refused(api: &ApiClient, token: &str, what: &str) {
    let response = api.status_with(Some(&format!("Bearer {token}"))).await;
    assert_unauthorized(response, what).await;
}

/// Asserts that `token` is accepted, so the refusals around it are about what they vary.
pub(crate) async fn assert_accepted(api: &ApiClient, token: &str, what: &str) {
    let response = api.status_with(Some(&format!("Bearer {token}"))).await;
    assert_eq!(
        response.status(),
        200,
        "{what}: {:?}",
        response.text().await
    );
}
