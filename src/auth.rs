//! Bearer-token authentication: JWT verification with one pinned algorithm, and the
//! `AuthUser` extractor that handlers use to learn who is calling.

use std::{
    path::Path,
    sync::Arc,
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

use crate::{error::ApiError, key_package::UserId};

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
    /// The file holds a key this server cannot verify tokens with.
    #[error("{path}: {problem}")]
    Unusable {
        /// The configured path.
        path: String,
        /// What is wrong with the key.
        problem: KeyProblem,
    },
}

/// What is wrong with a PEM public key.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyProblem {
    /// Not a PEM public key of a supported type.
    #[error("holds no Ed25519, P-256 or RSA public key in PEM form")]
    Unsupported,
    /// An elliptic-curve key on another curve than P-256 (ES256 is P-256 only).
    #[error("holds an elliptic-curve key on {0}; only P-256 (ES256) is supported")]
    Curve(&'static str),
    /// An RSA key too short to be trusted.
    #[error("holds a {0}-bit RSA key; at least {MIN_RSA_BITS} bits are required")]
    WeakRsa(usize),
}

/// Shortest RSA modulus accepted (jsonwebtoken's RS256 verification refuses shorter keys).
pub const MIN_RSA_BITS: usize = 2048;

impl VerifyingKey {
    /// Loads a PEM public key, choosing EdDSA, ES256 or RS256 from its type.
    pub fn from_pem_file(path: &Path) -> Result<Self, KeyError> {
        let pem = std::fs::read(path).map_err(|source| KeyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_pem(&pem).map_err(|problem| KeyError::Unusable {
            path: path.display().to_string(),
            problem,
        })
    }

    /// Parses a PEM public key. The algorithm follows from the key's own type as its DER says,
    /// and a key no token could verify with (another curve, a short RSA modulus) is refused here
    /// rather than answering 401 to every request later.
    pub fn from_pem(pem: &[u8]) -> Result<Self, KeyProblem> {
        let (parse, algorithm): (Parser, Algorithm) = match classify_pem(pem)? {
            KeyKind::Ed25519 => (DecodingKey::from_ed_pem, Algorithm::EdDSA),
            KeyKind::P256 => (DecodingKey::from_ec_pem, Algorithm::ES256),
            KeyKind::Rsa { bits } if bits < MIN_RSA_BITS => return Err(KeyProblem::WeakRsa(bits)),
            KeyKind::Rsa { .. } => (DecodingKey::from_rsa_pem, Algorithm::RS256),
        };
        let key = parse(pem).map_err(|_| KeyProblem::Unsupported)?;
        Ok(Self::PublicKey { key, algorithm })
    }

    fn algorithm(&self) -> Algorithm {
        match self {
            Self::Secret(_) => Algorithm::HS256,
            Self::PublicKey { algorithm, .. } => *algorithm,
        }
    }
}

type Parser = fn(&[u8]) -> jsonwebtoken::errors::Result<DecodingKey>;

/// The supported public-key types.
#[derive(Debug, PartialEq, Eq)]
enum KeyKind {
    Ed25519,
    P256,
    Rsa { bits: usize },
}

// DER contents of the object identifiers that name key types and curves.
const OID_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
const OID_EC: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
const OID_ED25519: &[u8] = &[0x2b, 0x65, 0x70];
const OID_P256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const OID_P384: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x22];
const OID_P521: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x23];

/// Reads the key type (and curve or modulus size) from a `PUBLIC KEY` (SubjectPublicKeyInfo)
/// or `RSA PUBLIC KEY` (PKCS #1) PEM block.
fn classify_pem(pem: &[u8]) -> Result<KeyKind, KeyProblem> {
    let block = pem::parse(pem).map_err(|_| KeyProblem::Unsupported)?;
    let der = block.contents();
    let kind = match block.tag() {
        "RSA PUBLIC KEY" => rsa_kind(der),
        "PUBLIC KEY" => spki_kind(der)?,
        _ => None,
    };
    kind.ok_or(KeyProblem::Unsupported)
}

fn spki_kind(der: &[u8]) -> Result<Option<KeyKind>, KeyProblem> {
    let Some((0x30, spki, _)) = der_item(der) else {
        return Ok(None);
    };
    let Some((0x30, algorithm, rest)) = der_item(spki) else {
        return Ok(None);
    };
    let Some((0x03, key_bits, _)) = der_item(rest) else {
        return Ok(None);
    };
    let Some((0x06, oid, params)) = der_item(algorithm) else {
        return Ok(None);
    };
    Ok(match oid {
        OID_ED25519 => Some(KeyKind::Ed25519),
        OID_RSA => key_bits.split_first().and_then(|(_, key)| rsa_kind(key)),
        OID_EC => match der_item(params) {
            Some((0x06, OID_P256, _)) => Some(KeyKind::P256),
            Some((0x06, OID_P384, _)) => return Err(KeyProblem::Curve("P-384")),
            Some((0x06, OID_P521, _)) => return Err(KeyProblem::Curve("P-521")),
            _ => return Err(KeyProblem::Curve("an unsupported curve")),
        },
        _ => None,
    })
}

/// An `RSAPublicKey ::= SEQUENCE { modulus INTEGER, publicExponent INTEGER }`.
fn rsa_kind(der: &[u8]) -> Option<KeyKind> {
    let (0x30, key, _) = der_item(der)? else {
        return None;
    };
    let (0x02, modulus, _) = der_item(key)? else {
        return None;
    };
    let significant = modulus
        .iter()
        .position(|b| *b != 0)
        .map_or(&[][..], |at| &modulus[at..]);
    let bits = match significant.first() {
        Some(top) => (significant.len() - 1) * 8 + (8 - top.leading_zeros() as usize),
        None => 0,
    };
    Some(KeyKind::Rsa { bits })
}

/// One DER item: its tag, its contents and what follows it; `None` if truncated or malformed.
fn der_item(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 || rest.len() < count {
            return None;
        }
        let (bytes, rest) = rest.split_at(count);
        let len = bytes.iter().fold(0usize, |n, b| (n << 8) | usize::from(*b));
        (len, rest)
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
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
    /// Audience, when one is configured: one value or, as RFC 7519 allows (and Auth0 and
    /// Keycloak send), a list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<Audience>,
}

/// The `aud` claim: a string or a list of strings (RFC 7519 §4.1.3).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Audience {
    /// A single audience.
    One(String),
    /// Several audiences; the token is for each of them.
    Many(Vec<String>),
}

/// Why the `token` subcommand cannot sign.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    /// Only a shared secret can sign.
    #[error("the token subcommand needs KPS_JWT_SECRET (a public key cannot sign)")]
    NeedsSecret,
    /// `now + ttl` does not fit a JWT NumericDate.
    #[error("--ttl: {0} seconds is too far in the future")]
    TtlTooLarge(u64),
    /// The JWT library failed.
    #[error("cannot sign the token: {0}")]
    Sign(#[from] jsonwebtoken::errors::Error),
}

/// Latest `exp` the `token` subcommand writes: the largest NumericDate every JWT library reads
/// (a signed 64-bit integer).
const MAX_EXP: u64 = i64::MAX as u64;

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
    pub fn issue(&self, user: &UserId, ttl_secs: u64) -> Result<String, IssueError> {
        let VerifyingKey::Secret(secret) = &self.key else {
            return Err(IssueError::NeedsSecret);
        };
        let now = unix_now();
        let exp = now
            .checked_add(ttl_secs)
            .filter(|exp| *exp <= MAX_EXP)
            .ok_or(IssueError::TtlTooLarge(ttl_secs))?;
        let claims = Claims {
            sub: user.to_string(),
            exp,
            iat: Some(now),
            nbf: None,
            iss: self.issuer.clone(),
            aud: self.audience.clone().map(Audience::One),
        };
        Ok(jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret),
        )?)
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
pub async fn require_auth(
    State(auth): State<Arc<Authenticator>>,
    mut req: Request,
    next: Next,
) -> Response {
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
    match auth.verify(token) {
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

    fn fixture(name: &str) -> Vec<u8> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/api/fixtures")
            .join(name);
        std::fs::read(path).unwrap()
    }

    fn signed(claims: &serde_json::Value, secret: &[u8]) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            claims,
            &EncodingKey::from_secret(secret),
        )
        .unwrap()
    }

    #[test]
    fn an_audience_list_is_accepted_when_it_names_the_configured_audience() {
        let secret = b"s".repeat(32);
        let claims = |aud: serde_json::Value| serde_json::json!({ "sub": "alice", "exp": unix_now() + 60, "aud": aud });
        let list = signed(&claims(serde_json::json!(["other", "kps"])), &secret);
        let none = Authenticator::new(VerifyingKey::Secret(secret.clone()), None, None);
        assert_eq!(none.verify(&list).unwrap().as_str(), "alice");
        let kps = Authenticator::new(
            VerifyingKey::Secret(secret.clone()),
            None,
            Some("kps".into()),
        );
        assert_eq!(kps.verify(&list).unwrap().as_str(), "alice");
        let elsewhere = signed(&claims(serde_json::json!(["other", "third"])), &secret);
        assert!(
            kps.verify(&elsewhere).is_err(),
            "a list without our audience"
        );
        let single = signed(&claims(serde_json::json!("kps")), &secret);
        assert!(kps.verify(&single).is_ok());
        let junk = signed(&claims(serde_json::json!(7)), &secret);
        assert!(none.verify(&junk).is_err(), "an audience that is no string");
    }

    #[test]
    fn supported_keys_load_with_their_algorithm() {
        let algorithm = |name| VerifyingKey::from_pem(&fixture(name)).unwrap().algorithm();
        assert_eq!(algorithm("p256-public.pem"), Algorithm::ES256);
        assert_eq!(algorithm("rsa-2048-public.pem"), Algorithm::RS256);
        assert_eq!(algorithm("ed25519-public.pem"), Algorithm::EdDSA);
    }

    #[test]
    fn keys_no_token_could_verify_with_are_refused_at_load() {
        let problem = |name| VerifyingKey::from_pem(&fixture(name)).err().unwrap();
        assert_eq!(problem("p384-public.pem"), KeyProblem::Curve("P-384"));
        assert_eq!(problem("p521-public.pem"), KeyProblem::Curve("P-521"));
        assert_eq!(problem("rsa-1024-public.pem"), KeyProblem::WeakRsa(1024));
        assert_eq!(
            problem("rsa-1024-pkcs1-public.pem"),
            KeyProblem::WeakRsa(1024)
        );
        assert_eq!(
            problem("rsa-2048-test-key.pem"),
            KeyProblem::Unsupported,
            "a private key"
        );
        for junk in [
            &b""[..],
            b"-----BEGIN PUBLIC KEY-----\nMAA=\n-----END PUBLIC KEY-----\n",
        ] {
            assert_eq!(
                VerifyingKey::from_pem(junk).err(),
                Some(KeyProblem::Unsupported)
            );
        }
    }

    #[test]
    fn der_items_that_overrun_their_input_are_refused() {
        assert_eq!(der_item(&[0x30, 0x03, 1, 2]), None);
        assert_eq!(der_item(&[0x30, 0x85, 1, 1, 1, 1, 1]), None);
        assert_eq!(der_item(&[0x30, 0x81]), None);
        assert_eq!(
            der_item(&[0x02, 0x01, 7, 9]),
            Some((0x02, &[7][..], &[9][..]))
        );
    }

    #[test]
    fn a_huge_ttl_is_refused_instead_of_overflowing() {
        let alice = UserId::parse("alice").unwrap();
        let auth = secret_auth();
        assert!(matches!(
            auth.issue(&alice, u64::MAX),
            Err(IssueError::TtlTooLarge(u64::MAX))
        ));
        assert!(matches!(
            auth.issue(&alice, i64::MAX as u64),
            Err(IssueError::TtlTooLarge(_))
        ));
        assert!(auth.issue(&alice, 100 * 365 * 86_400).is_ok());
    }
}
