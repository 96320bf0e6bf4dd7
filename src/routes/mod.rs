//! The route table, on one screen. Each resource's handlers live in their own module.

use axum::{
    extract::{FromRequestParts, Path},
    http::request::Parts,
    middleware,
    routing::get,
    Router,
};

use crate::{app::AppState, auth::require_auth, error::ApiError, key_package::UserId};

mod health;
mod key_packages;
mod users;

/// Every route of the v1 API and the operational endpoints.
pub fn routes(state: AppState) -> Router {
    let api = Router::new()
        .route(
            "/api/v1/key-packages",
            get(key_packages::key_package_status)
                .post(key_packages::upload_key_packages)
                .delete(key_packages::delete_key_packages),
        )
        .route(
            "/api/v1/key-packages/{user_id}",
            get(key_packages::consume_key_package),
        )
        .route(
            "/api/v1/users/{user_id}/fingerprint",
            get(users::get_fingerprint),
        )
        .route_layer(middleware::from_fn_with_state(state.clone(), require_auth));
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .merge(api)
        .with_state(state)
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
