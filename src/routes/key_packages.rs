//! `/api/v1/key-packages`: upload, status, delete, and consumption of another user's package.

use axum::{extract::State, http::StatusCode};

use super::{SuiteQuery, UserPath};
use crate::{
    app::AppState,
    auth::AuthUser,
    clock,
    error::ApiError,
    key_package::{Fingerprint, Upload},
    store::{Claim, ConsumeOutcome, Status},
    wire::{
        CipherSuiteCount, KeyPackageResponse, KeyPackageStatus, Negotiated, Reply,
        UploadKeyPackagesRequest, Wire,
    },
};

/// `POST /api/v1/key-packages`: validates the whole request, then stores it atomically.
pub(crate) async fn upload_key_packages(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Negotiated(format): Negotiated,
    Wire(request): Wire<UploadKeyPackagesRequest>,
) -> Result<(StatusCode, Reply<KeyPackageStatus>), ApiError> {
    let entries = request
        .entries
        .into_iter()
        .map(|e| (e.key_package_data, e.is_last_resort));
    let now = clock::unix_seconds();
    let upload = match Upload::parse(
        entries,
        &request.signing_key_fingerprint,
        u64::try_from(now).unwrap_or(0),
        state.limits.upload,
    ) {
        Ok(upload) => upload,
        Err(refused) => {
            state.metrics.upload_refused(refused.code());
            return Err(refused.into());
        }
    };
    let outcome = state.store.upload(&user, &upload, now).await?;
    state.metrics.uploaded.inc_by(u64::from(outcome.stored));
    state
        .metrics
        .expired_removed
        .inc_by(outcome.expired_removed);
    tracing::info!(
        user = %user,
        stored = outcome.stored,
        regular_count = outcome.status.regular_count,
        "key packages uploaded"
    );
    Ok((
        StatusCode::CREATED,
        Reply(format, status_message(outcome.status)),
    ))
}

/// `GET /api/v1/key-packages`: the caller's own inventory.
pub(crate) async fn key_package_status(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Negotiated(format): Negotiated,
) -> Result<Reply<KeyPackageStatus>, ApiError> {
    let status = state.store.status(&user, clock::unix_seconds()).await?;
    Ok(Reply(format, status_message(status)))
}

/// `DELETE /api/v1/key-packages`: drops all of the caller's packages, keeps the fingerprint.
pub(crate) async fn delete_key_packages(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
) -> Result<StatusCode, ApiError> {
    state.store.delete_all(&user).await?;
    tracing::info!(user = %user, "key packages deleted");
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /api/v1/key-packages/{user_id}`: hands out the target's oldest servable regular package
/// of the requested suites, or its last-resort one, charging the target's consumption budget.
///
/// The in-process pre-check refuses from memory what the shared budget would refuse; it learns
/// only from outcomes the store reached, so a request that fails (5xx) costs no budget at all.
pub(crate) async fn consume_key_package(
    State(state): State<AppState>,
    AuthUser(caller): AuthUser,
    Negotiated(format): Negotiated,
    UserPath(target): UserPath,
    SuiteQuery(suites): SuiteQuery,
) -> Result<Reply<KeyPackageResponse>, ApiError> {
    let started = clock::unix_micros();
    let local = state.limiter.targets();
    local.check(&target, started)?;
    let claim = Claim {
        suites: &suites,
        ..Claim::new(&target, state.limits.budget)
    };
    let consumption = state.store.consume(&claim).await?;
    state
        .metrics
        .expired_removed
        .inc_by(consumption.expired_removed);
    let package = match consumption.outcome {
        ConsumeOutcome::RateLimited { retry_after } => {
            local.learn(&target, started, retry_after);
            return Err(ApiError::RateLimited { retry_after });
        }
        ConsumeOutcome::Empty => {
            local.record(&target, started);
            return Err(ApiError::NoKeyPackage);
        }
        ConsumeOutcome::Incompatible => {
            local.record(&target, started);
            return Err(ApiError::NoCompatibleKeyPackage);
        }
        ConsumeOutcome::Consumed(package) => {
            local.record(&target, started);
            package
        }
    };
    if package.is_last_resort {
        state.metrics.last_resort_handouts.inc();
    } else {
        state.metrics.consumed.inc();
    }
    let facts = package.facts;
    tracing::info!(
        caller = %caller,
        target = %target,
        last_resort = package.is_last_resort,
        cipher_suite = facts.as_ref().map_or(0, |f| f.cipher_suite),
        "key package handed out"
    );
    Ok(Reply(
        format,
        KeyPackageResponse {
            key_package_data: package.key_package,
            is_last_resort: package.is_last_resort,
            signing_key_fingerprint: fingerprint_text(package.fingerprint),
            key_package_ref: facts
                .as_ref()
                .map(|f| f.key_package_ref.clone())
                .unwrap_or_default(),
            cipher_suite: facts.as_ref().map_or(0, |f| u32::from(f.cipher_suite)),
            not_after: facts.as_ref().map_or(0, |f| f.not_after),
        },
    ))
}

fn status_message(status: Status) -> KeyPackageStatus {
    KeyPackageStatus {
        regular_count: status.regular_count,
        has_last_resort: status.has_last_resort,
        signing_key_fingerprint: fingerprint_text(status.fingerprint),
        last_resort_handouts: status.last_resort_handouts,
        cipher_suites: status
            .cipher_suites
            .into_iter()
            .map(|(suite, count)| CipherSuiteCount {
                cipher_suite: suite.into(),
                regular_count: count,
            })
            .collect(),
        next_expiry: status.next_expiry,
        last_resort_not_after: status.last_resort_not_after,
        inventory_digest: status.inventory_digest.into(),
    }
}

fn fingerprint_text(fingerprint: Option<Fingerprint>) -> String {
    fingerprint
        .map(|f| f.as_str().to_owned())
        .unwrap_or_default()
}
