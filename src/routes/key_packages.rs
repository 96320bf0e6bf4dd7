//! `/api/v1/key-packages`: upload, status, delete, and consumption of another user's package.

use axum::{
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
};

use super::{IdempotencyHeader, SuiteQuery, UserPath};
use crate::{
    app::AppState,
    auth::AuthUser,
    clock,
    error::ApiError,
    key_package::{Fingerprint, Upload},
    rate_limit::{Refused, Settled},
    store::{Caller, Claim, ConsumeOutcome, Status},
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
/// of the requested suites, or its last-resort one, charging the caller's, the pair's and the
/// target's budgets in that order; with an `Idempotency-Key`, a retry replays the package.
///
/// The in-process pre-check refuses from memory what the shared budgets would refuse; it learns
/// only from outcomes the store reached, so a request that fails (5xx) costs no budget at all.
/// A claim with a key skips it: it may be the retry of one already answered, which charges
/// nothing and which only the database knows about.
pub(crate) async fn consume_key_package(
    State(state): State<AppState>,
    AuthUser(caller): AuthUser,
    Negotiated(format): Negotiated,
    UserPath(target): UserPath,
    SuiteQuery(suites): SuiteQuery,
    IdempotencyHeader(key): IdempotencyHeader,
) -> Result<Response, ApiError> {
    let started = clock::unix_micros();
    let limits = &state.limits;
    let limiter = &state.limiter;
    let (_in_flight, admission) = match &key {
        Some(key) => (
            Some(
                limiter
                    .begin_keyed(&caller, key.as_str())
                    .ok_or(ApiError::IdempotencyInProgress)?,
            ),
            None,
        ),
        None => (None, Some(limiter.admit(&caller, &target, started)?)),
    };
    let claim = Claim {
        suites: &suites,
        caller: Some(Caller {
            id: &caller,
            budget: limits.caller_budget,
            pair_budget: limits.pair_budget,
            idempotency: key.as_ref().map(|k| (k, limits.idempotency_ttl)),
        }),
        ..Claim::new(&target, limits.budget)
    };
    let consumption = state.store.consume(&claim).await?;
    state
        .metrics
        .expired_removed
        .inc_by(consumption.expired_removed);
    let settled = match &consumption.outcome {
        ConsumeOutcome::RateLimited { retry_after, scope } => Settled::Refused(Refused {
            retry_after: *retry_after,
            scope: *scope,
        }),
        ConsumeOutcome::Replayed(_) | ConsumeOutcome::KeyReused => Settled::Untouched,
        _ => Settled::Charged,
    };
    match admission {
        Some(admission) => admission.settle(started, settled),
        None => limiter.observe(&caller, &target, started, settled),
    }
    let (package, replayed) = match consumption.outcome {
        ConsumeOutcome::RateLimited { retry_after, scope } => {
            return Err(ApiError::RateLimited { retry_after, scope })
        }
        ConsumeOutcome::Empty => return Err(ApiError::NoKeyPackage),
        ConsumeOutcome::Incompatible => return Err(ApiError::NoCompatibleKeyPackage),
        ConsumeOutcome::KeyReused => return Err(ApiError::IdempotencyKeyReused),
        ConsumeOutcome::Consumed(package) => (package, false),
        ConsumeOutcome::Replayed(package) => (package, true),
    };
    if replayed {
        // Nothing was handed out again; the first answer was counted.
    } else if package.is_last_resort {
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
        replayed,
        "key package handed out"
    );
    let reply = Reply(
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
    );
    Ok(if replayed {
        ([(IDEMPOTENT_REPLAYED, "true")], reply).into_response()
    } else {
        reply.into_response()
    })
}

/// The header that marks a replayed claim.
const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";

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
