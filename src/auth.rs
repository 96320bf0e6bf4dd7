//! Bearer-token authentication: JWT verification with one pinned algorithm, and the
//! `AuthUser` extractor that handlers use to learn who is calling.

use std::{
    path::Path,
    time::{SystemTime, UNIX_EPOCH},
};

use axum::{
    extract::{FromRequestParts, Request, State},
    http::{header, request::Parts},
    middleware::Next,
    response::{IntoResponse, Response},
};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::{app::AppState, error::ApiError, key_package::UserId};

/// Longest `Authorization` header considered; anything longer is refused unread.
const MAX_AUTHORIZATION_LEN: usize = 8 * 1024;

/// The authenticated caller, placed in request extensions by [`require_auth`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthUser(pub UserId);

/// The key material tokens are checked against.
#[derive(Clone)]
pub enum VerifyingKey {
    /// A shared HS256 secret (which can also sign, for the `token` subcommand).
    Secret(Vec<u8>),
    /// A PEM public key; the algorithm follows from the key type.
    PublicKey {
        /// The parsed key.
        key: DecodingKey,
        /// EdDSA, ES256 or RS256.
        algorithm: Algorithm,
    },
}

/// Why a configured key is unusable.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The PEM file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The configured path.
        path: String,
        /// The I/O failure.
        source: std::io::Error,
    },
    /// The file holds no Ed25519, P-256 or RSA public key in PEM form.
    #[error("{0} holds no Ed25519, P-256 or RSA public key in PEM form")]
    Unsupported(String),
}

impl VerifyingKey {
    /// Loads a PEM public key, choosing EdDSA, ES256 or RS256 from its type.
    pub fn from_pem_file(path: &Path) -> Result<Self, KeyError> {
        let pem = std::fs::read(path).map_err(|source| KeyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_pem(&pem).ok_or_else(|| KeyError::Unsupported(path.display().to_string()))
    }

    /// Parses a PEM public key; `None` when it is none of the supported types.
    pub fn from_pem(pem: &[u8]) -> Option<Self> {
        type Parser = fn(&[u8]) -> jsonwebtoken::errors::Result<DecodingKey>;
        let candidates: [(Parser, Algorithm); 3] = [
            (DecodingKey::from_ed_pem, Algorithm::EdDSA),
            (DecodingKey::from_ec_pem, Algorithm::ES256),
            (DecodingKey::from_rsa_pem, Algorithm::RS256),
        ];
        candidates.into_iter().find_map(|(parse, algorithm)| {
            parse(pem)
                .ok()
                .map(|key| Self::PublicKey { key, algorithm })
        })
    }

    fn algorithm(&self) -> Algorithm {
        match self {
            Self::Secret(_) => Algorithm::HS256,
            Self::PublicKey { algorithm, .. } => *algorithm,
        }
    }
}

/// Claims this server reads and the `token` subcommand writes.
#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    /// The user id.
    pub sub: String,
    /// Expiry, Unix seconds.
    pub exp: u64,
    /// Issue time, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    /// Not before, Unix seconds. Declared so that a malformed `nbf` is refused: the JWT library
    /// only checks an `nbf` that parses, and would otherwise ignore `"nbf": "tomorrow"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// Issuer, when one is configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// Audience, when one is configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
}

/// Verifies bearer tokens: configured key, pinned algorithm, `exp` and `sub` required.
#[derive(Clone)]
pub struct Authenticator {
    key: VerifyingKey,
    decoding: DecodingKey,
    validation: Validation,
    issuer: Option<String>,
    audience: Option<String>,
}

impl Authenticator {
    /// Builds a verifier; `issuer` and `audience`, when set, are required to match.
    pub fn new(key: VerifyingKey, issuer: Option<String>, audience: Option<String>) -> Self {
        let mut validation = Validation::new(key.algorithm());
        let mut required = vec!["exp", "sub"];
        required.extend(issuer.as_ref().map(|_| "iss"));
        required.extend(audience.as_ref().map(|_| "aud"));
        validation.set_required_spec_claims(&required);
        validation.leeway = 5;
        validation.validate_nbf = true;
        match &issuer {
            Some(iss) => validation.set_issuer(&[iss]),
            None => validation.iss = None,
        }
        match &audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        let decoding = match &key {
            VerifyingKey::Secret(secret) => DecodingKey::from_secret(secret),
            VerifyingKey::PublicKey { key, .. } => key.clone(),
        };
        Self {
            key,
            decoding,
            validation,
            issuer,
            audience,
        }
    }

    /// Checks a token and returns the user it speaks for.
    pub fn verify(&self, token: &str) -> Result<UserId, ApiError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| {
                tracing::debug!(reason = refusal_reason(e.kind()), "token refused");
                ApiError::Unauthorized("the bearer token is invalid or expired")
            })?;
        UserId::parse(&data.claims.sub)
            .map_err(|_| ApiError::Unauthorized("the token's subject is not a valid user id"))
    }

    /// Signs a token for `user` valid for `ttl_secs`; only possible with a shared secret.
    pub fn issue(&self, user: &UserId, ttl_secs: u64) -> Result<String, String> {
        let VerifyingKey::Secret(secret) = &self.key else {
            return Err(
                "the token subcommand needs KPS_JWT_SECRET (a public key cannot sign)".into(),
            );
        };
        let now = unix_now();
        let claims = Claims {
            sub: user.to_string(),
            exp: now + ttl_secs,
            iat: Some(now),
            nbf: None,
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
        };
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret),
        )
        .map_err(|e| e.to_string())
    }
}

/// Why a token was refused, for the log. Never the error itself: its JSON, UTF-8 and base64
/// variants quote parts of the token (claim values, decoded bytes).
fn refusal_reason(kind: &jsonwebtoken::errors::ErrorKind) -> &'static str {
    use jsonwebtoken::errors::ErrorKind as K;
    match kind {
        K::InvalidToken => "malformed token",
        K::InvalidSignature => "bad signature",
        K::InvalidAlgorithm | K::InvalidAlgorithmName | K::MissingAlgorithm => "wrong algorithm",
        K::MissingRequiredClaim(_) => "missing claim",
        K::ExpiredSignature => "expired",
        K::ImmatureSignature => "not yet valid",
        K::InvalidIssuer => "wrong issuer",
        K::InvalidAudience => "wrong audience",
        K::InvalidSubject => "wrong subject",
        K::Base64(_) => "bad base64",
        K::Json(_) => "bad JSON or claim type",
        K::Utf8(_) => "bad UTF-8",
        _ => "unusable token",
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Middleware for `/api/v1`: verifies the bearer token and stores the [`AuthUser`].
/// More than one `Authorization` field is refused: which one counts would be ambiguous, and a
/// proxy in front might pick another one than this server.
pub async fn require_auth(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let mut values = req.headers().get_all(header::AUTHORIZATION).iter();
    let token = values
        .next()
        .filter(|_| values.next().is_none())
        .filter(|v| v.len() <= MAX_AUTHORIZATION_LEN)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token);
    let Some(token) = token else {
        return ApiError::Unauthorized("a bearer token is required").into_response();
    };
    match state.auth.verify(token) {
        Ok(user) => {
            req.extensions_mut().insert(AuthUser(user));
            next.run(req).await
        }
        Err(e) => e.into_response(),
    }
}

/// The token of a `Bearer` credential (scheme case-insensitive).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

impl<S: Send + Sync> FromRequestParts<S> for AuthUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<AuthUser>()
            .cloned()
            .ok_or(ApiError::Unauthorized("a bearer token is required"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret_auth() -> Authenticator {
        Authenticator::new(
            VerifyingKey::Secret(b"0123456789abcdef0123456789abcdef".to_vec()),
            None,
            None,
        )
    }

    #[test]
    fn issued_tokens_verify_and_name_their_user() {
        let auth = secret_auth();
        let alice = UserId::parse("alice").unwrap();
        let token = auth.issue(&alice, 60).unwrap();
        assert_eq!(auth.verify(&token).unwrap(), alice);
    }

    #[test]
    fn tokens_from_another_secret_are_refused() {
        let other =
            Authenticator::new(VerifyingKey::Secret(b"another secret".to_vec()), None, None);
        let token = other.issue(&UserId::parse("alice").unwrap(), 60).unwrap();
        assert!(secret_auth().verify(&token).is_err());
    }

    #[test]
    fn bearer_scheme_is_case_insensitive_and_needs_a_token() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer   abc "), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer "), None);
        assert_eq!(bearer_token("Bearer"), None);
    }

    #[test]
    fn issuer_and_audience_are_enforced_when_configured() {
        let secret = VerifyingKey::Secret(b"s".repeat(32));
        let strict = Authenticator::new(secret.clone(), Some("idp".into()), Some("kps".into()));
        let alice = UserId::parse("alice").unwrap();
        assert!(strict.verify(&strict.issue(&alice, 60).unwrap()).is_ok());
        let loose = Authenticator::new(secret.clone(), None, None);
        assert!(strict.verify(&loose.issue(&alice, 60).unwrap()).is_err());
        let wrong = Authenticator::new(secret, Some("other".into()), Some("kps".into()));
        assert!(strict.verify(&wrong.issue(&alice, 60).unwrap()).is_err());
    }
}
