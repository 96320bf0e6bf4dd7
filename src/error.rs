//! The errors clients see, rendered as RFC 9457 problem details (`application/problem+json`).
//!
//! Each variant's doc names its status. Handlers return `Result<_, ApiError>` and use `?`;
//! storage failures convert through `From<StoreError>`, logged here and shown generically.

use std::time::Duration;

use axum::{
    http::{header, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
};

use crate::{
    key_package::{InvalidUpload, InvalidUserId},
    rate_limit::Scope,
    store::StoreError,
};

/// Everything a request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400 `invalid_key_package`, with the offending `entry_index`.
    #[error("entry {index}: {reason}")]
    InvalidKeyPackage {
        /// Position of the entry in the request.
        index: usize,
        /// Why it is not a key package.
        reason: String,
    },
    /// 400 `empty_upload`, `multiple_last_resort`, `invalid_fingerprint`, or, with the offending
    /// `entry_index`, `invalid_lifetime`, `fingerprint_mismatch` or `invalid_key_package` (an
    /// opaque entry when readable ones are required).
    #[error(transparent)]
    InvalidUpload(InvalidUpload),
    /// 400 `invalid_user_id`: a path user id outside the allowed alphabet or length.
    #[error(transparent)]
    InvalidUserId(#[from] InvalidUserId),
    /// 400 `malformed_body`: the body does not decode as the expected message.
    #[error("the body is not a valid {0} message")]
    MalformedBody(&'static str),
    /// 401 `unauthorized`, with `WWW-Authenticate: Bearer`.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// 400 `invalid_idempotency_key`: an `Idempotency-Key` that is not 1–255 visible ASCII
    /// characters.
    #[error(transparent)]
    InvalidIdempotencyKey(#[from] crate::key_package::InvalidIdempotencyKey),
    /// 409 `idempotency_in_progress`: a claim with the same key is being answered right now.
    #[error("a request with this Idempotency-Key is in progress; retry shortly")]
    IdempotencyInProgress,
    /// 422 `idempotency_key_reused`: the key was used for another target.
    #[error("this Idempotency-Key was used for another user's key package")]
    IdempotencyKeyReused,
    /// 400 `invalid_cipher_suite`: a `ciphersuite` query value that is not a number 1–65535.
    #[error("ciphersuite must be a decimal or 0x-prefixed hex number from 1 to 65535")]
    InvalidCipherSuite,
    /// 404 `no_key_package`: the target holds no package that can be handed out.
    #[error("the user has no key package")]
    NoKeyPackage,
    /// 404 `no_compatible_key_package`: the target holds packages, none of the requested suites.
    #[error("the user has no key package of the requested cipher suites")]
    NoCompatibleKeyPackage,
    /// 404 `no_fingerprint`: the user never sent a fingerprint.
    #[error("the user has no signing-key fingerprint")]
    NoFingerprint,
    /// 404 `not_found`: no such route.
    #[error("no such resource")]
    NotFound,
    /// 405 `method_not_allowed`.
    #[error("method not allowed on this resource")]
    MethodNotAllowed,
    /// 413 `body_too_large`.
    #[error("the request body exceeds the configured limit")]
    PayloadTooLarge,
    /// 415 `unsupported_media_type`.
    #[error("send application/x-protobuf or application/json")]
    UnsupportedMediaType,
    /// 429 `rate_limited`, with `Retry-After` in whole seconds and the refusing `scope`.
    #[error("{}", rate_limited_detail(*scope))]
    RateLimited {
        /// Time until one more request is allowed.
        retry_after: Duration,
        /// The budget that refused: the caller's, the caller→target pair's or the target's.
        scope: Scope,
    },
    /// 408 `request_timeout`: the request took longer than the server allows.
    #[error("the request took too long")]
    Timeout,
    /// 503 `service_unavailable`: the database is unreachable or too slow.
    #[error("the service is temporarily unavailable")]
    Unavailable,
    /// 500 `internal_error`: details are logged, never sent.
    #[error("internal error")]
    Internal,
}

impl ApiError {
    /// The HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::InvalidKeyPackage { .. }
            | Self::InvalidUpload(_)
            | Self::InvalidUserId(_)
            | Self::MalformedBody(_)
            | Self::InvalidCipherSuite
            | Self::InvalidIdempotencyKey(_) => StatusCode::BAD_REQUEST,
            Self::IdempotencyInProgress => StatusCode::CONFLICT,
            Self::IdempotencyKeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::NoKeyPackage
            | Self::NoCompatibleKeyPackage
            | Self::NoFingerprint
            | Self::NotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Timeout => StatusCode::REQUEST_TIMEOUT,
            Self::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable snake_case code clients match on.
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidKeyPackage { .. } => "invalid_key_package",
            Self::InvalidUpload(e) => e.code(),
            Self::InvalidUserId(_) => "invalid_user_id",
            Self::MalformedBody(_) => "malformed_body",
            Self::Unauthorized(_) => "unauthorized",
            Self::InvalidCipherSuite => "invalid_cipher_suite",
            Self::InvalidIdempotencyKey(_) => "invalid_idempotency_key",
            Self::IdempotencyInProgress => "idempotency_in_progress",
            Self::IdempotencyKeyReused => "idempotency_key_reused",
            Self::NoKeyPackage => "no_key_package",
            Self::NoCompatibleKeyPackage => "no_compatible_key_package",
            Self::NoFingerprint => "no_fingerprint",
            Self::NotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::PayloadTooLarge => "body_too_large",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::RateLimited { .. } => "rate_limited",
            Self::Timeout => "request_timeout",
            Self::Unavailable => "service_unavailable",
            Self::Internal => "internal_error",
        }
    }
}

impl From<InvalidUpload> for ApiError {
    fn from(e: InvalidUpload) -> Self {
        match e {
            InvalidUpload::KeyPackage { index, reason } => Self::InvalidKeyPackage {
                index,
                reason: reason.to_string(),
            },
            other => Self::InvalidUpload(other),
        }
    }
}

impl From<crate::rate_limit::Refused> for ApiError {
    fn from(refused: crate::rate_limit::Refused) -> Self {
        Self::RateLimited {
            retry_after: refused.retry_after,
            scope: refused.scope,
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(source) => {
                tracing::warn!(error = %source, "database unavailable");
                Self::Unavailable
            }
            other => {
                tracing::error!(error = %other, "storage failure");
                Self::Internal
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut body = serde_json::json!({
            "type": "about:blank",
            "title": status.canonical_reason().unwrap_or("Error"),
            "status": status.as_u16(),
            "detail": self.to_string(),
            "code": self.code(),
        });
        let entry_index = match &self {
            Self::InvalidKeyPackage { index, .. } => Some(*index),
            Self::InvalidUpload(e) => e.entry_index(),
            _ => None,
        };
        if let Some(index) = entry_index {
            body["entry_index"] = index.into();
        }
        if let Self::RateLimited { scope, .. } = &self {
            body["scope"] = scope.as_str().into();
        }
        let mut response = (status, body.to_string()).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        match &self {
            Self::Unauthorized(_) => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            Self::RateLimited { retry_after, .. } => {
                headers.insert(header::RETRY_AFTER, retry_after_secs(*retry_after).into());
            }
            // The rest of the body is never read, so the connection cannot carry another
            // request: say so, or a keep-alive client would send its next request into it.
            Self::PayloadTooLarge | Self::Timeout => {
                headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        response
    }
}

/// What a 429 says, by the budget that refused.
fn rate_limited_detail(scope: Scope) -> &'static str {
    match scope {
        Scope::Caller => "too many key packages requested by this caller; retry later",
        Scope::Pair => "too many key packages of this user requested by this caller; retry later",
        Scope::Target => "too many key packages requested for this user; retry later",
    }
}

/// Whole seconds to wait, rounded up so a client that waits that long is let through.
pub fn retry_after_secs(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(6000)), 6);
        assert_eq!(retry_after_secs(Duration::from_millis(6001)), 7);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
    }
}
