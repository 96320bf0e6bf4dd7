//! `/api/v1/users/{user_id}/fingerprint`: a user's signing-key fingerprint for TOFU checks.

use axum::extract::State;

use super::UserPath;
use crate::{
    app::AppState,
    error::ApiError,
    wire::{Negotiated, Reply, SigningKeyFingerprint},
};

/// `GET /api/v1/users/{user_id}/fingerprint`: the current value and when it last changed.
/// Consumes nothing and is not charged to the consumption budget.
pub(crate) async fn get_fingerprint(
    State(state): State<AppState>,
    Negotiated(format): Negotiated,
    UserPath(user): UserPath,
) -> Result<Reply<SigningKeyFingerprint>, ApiError> {
    let (fingerprint, updated_at) = state
        .store
        .fingerprint(&user)
        .await?
        .ok_or(ApiError::NoFingerprint)?;
    Ok(Reply(
        format,
        SigningKeyFingerprint {
            fingerprint: fingerprint.as_str().to_owned(),
            updated_at,
        },
    ))
}
