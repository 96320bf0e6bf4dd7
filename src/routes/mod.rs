//! The route table, on one screen. Each resource's handlers live in their own module.

use axum::{
    extract::{FromRequestParts, Path, Request},
    http::{header, request::Parts, HeaderValue, Method},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
    Router,
};

use crate::{
    app::AppState,
    auth::require_auth,
    error::ApiError,
    key_package::{IdempotencyKey, InvalidIdempotencyKey, UserId},
};

mod health;
mod key_packages;
mod users;

/// Every route of the v1 API and the operational endpoints.
///
/// Layer order matters on the consumption route. `require_auth` is a `route_layer` of the whole
/// API, so it runs outside (before) every per-route layer and the handler: an unauthenticated
/// request is refused before any budget is checked and never charges one. Inside it, `get_only`
/// lets only a GET reach the consuming handler (which checks and charges the budgets).
pub fn routes(state: AppState) -> Router {
    // The explicit fallback keeps `method_not_allowed_fallback` from replacing it, which would
    // put it outside `get_only` (and answer `Allow: GET,HEAD`).
    let consume = get(key_packages::consume_key_package)
        .fallback(|| async { refuse_all_but_get() })
        .layer(middleware::from_fn(get_only));
    let api = Router::new()
        .route(
            "/api/v1/key-packages",
            get(key_packages::key_package_status)
                .post(key_packages::upload_key_packages)
                .delete(key_packages::delete_key_packages),
        )
        .route("/api/v1/key-packages/{user_id}", consume.clone())
        // The empty user id: the same route, so it is refused as `invalid_user_id` (400)
        // after authentication, like any other unusable id, rather than as an unknown path.
        .route("/api/v1/key-packages/", consume)
        .route(
            "/api/v1/users/{user_id}/fingerprint",
            get(users::get_fingerprint),
        )
        .route_layer(middleware::from_fn_with_state(
            state.auth.clone(),
            require_auth,
        ));
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .merge(api)
        .with_state(state)
}

/// Lets only GET through: 405 with `Allow: GET` for anything else, HEAD included.
///
/// axum answers HEAD with a route's GET handler; on a route whose GET changes state (the
/// consumption) that would hand out a package nobody receives.
async fn get_only(req: Request, next: Next) -> Response {
    if req.method() == Method::GET {
        return next.run(req).await;
    }
    refuse_all_but_get()
}

/// 405 `method_not_allowed` with `Allow: GET`.
fn refuse_all_but_get() -> Response {
    let mut response = ApiError::MethodNotAllowed.into_response();
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("GET"));
    response
}

/// The `ciphersuite` query parameters of a consumption, each validated (any other value is
/// 400 `invalid_cipher_suite`); other parameters are ignored. Empty: any package qualifies.
pub struct SuiteQuery(pub Vec<u16>);

impl<S: Send + Sync> FromRequestParts<S> for SuiteQuery {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let query = parts.uri.query().unwrap_or("");
        let mut suites = form_urlencoded::parse(query.as_bytes())
            .filter(|(name, _)| name == "ciphersuite")
            .map(|(_, value)| {
                crate::key_package::parse_cipher_suite(&value).ok_or(ApiError::InvalidCipherSuite)
            })
            .collect::<Result<Vec<u16>, _>>()?;
        suites.sort_unstable();
        suites.dedup();
        Ok(Self(suites))
    }
}

/// The `Idempotency-Key` header of a claim, validated: absent, or 1–255 characters
/// `0x21`–`0x7E` (anything else, a repeated header included, is 400 `invalid_idempotency_key`).
pub struct IdempotencyHeader(pub Option<IdempotencyKey>);

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyHeader {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let mut values = parts.headers.get_all("idempotency-key").iter();
        let Some(value) = values.next() else {
            return Ok(Self(None));
        };
        if values.next().is_some() {
            return Err(InvalidIdempotencyKey.into());
        }
        Ok(Self(Some(IdempotencyKey::parse(value.as_bytes())?)))
    }
}

/// A `{user_id}` path parameter, validated; anything else is 400 `invalid_user_id`.
pub struct UserPath(pub UserId);

impl<S: Send + Sync> FromRequestParts<S> for UserPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|_| ApiError::InvalidUserId(crate::key_package::InvalidUserId))?;
        Ok(Self(UserId::parse(&raw)?))
    }
}
