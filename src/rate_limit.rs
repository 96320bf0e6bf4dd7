//! The per-target consumption limiter: a tower-governor layer keyed by the target user id in
//! the path. It is each process's cheap local shield; the budget shared by all processes on one
//! database is charged by the store in the consumption transaction.

use std::{sync::Arc, time::Duration};

use axum::{
    body::Body,
    http::{Request, Response},
    response::IntoResponse,
};
use governor::middleware::NoOpMiddleware;
use tower_governor::{
    governor::{GovernorConfig, GovernorConfigBuilder},
    key_extractor::KeyExtractor,
    GovernorError, GovernorLayer,
};

use crate::{error::ApiError, key_package::UserId, store::Budget};

/// Path prefix of the consumption route; the rest of the path is the target user id.
const CONSUME_PREFIX: &str = "/api/v1/key-packages/";

/// Keys the limiter by the (validated) target user id of a consumption request.
#[derive(Clone, Copy, Debug, Default)]
pub struct TargetUser;

impl KeyExtractor for TargetUser {
    type Key = UserId;

    fn extract<T>(&self, req: &Request<T>) -> Result<Self::Key, GovernorError> {
        let segment = req
            .uri()
            .path()
            .strip_prefix(CONSUME_PREFIX)
            .ok_or(GovernorError::UnableToExtractKey)?;
        target_user(segment).ok_or(GovernorError::Other {
            code: axum::http::StatusCode::BAD_REQUEST,
            msg: None,
            headers: None,
        })
    }
}

/// The user id a raw path segment names, percent-decoded as the router decodes it.
pub fn target_user(segment: &str) -> Option<UserId> {
    let decoded = percent_encoding::percent_decode_str(segment)
        .decode_utf8()
        .ok()?;
    UserId::parse(&decoded).ok()
}

/// The limiter's shared state, for the cleanup task and for tests.
pub type Limiter = tower_governor::governor::SharedRateLimiter<UserId, NoOpMiddleware>;

/// The configured layer and a handle to its state.
pub struct ConsumeLimiter {
    config: Arc<GovernorConfig<TargetUser, NoOpMiddleware>>,
}

impl ConsumeLimiter {
    /// A bucket of `budget.burst` requests per target, refilling one every `budget.interval`.
    pub fn new(budget: Budget) -> Self {
        let config = GovernorConfigBuilder::default()
            .key_extractor(TargetUser)
            .period(budget.interval.max(Duration::from_nanos(1)))
            .burst_size(budget.burst.max(1))
            .methods(vec![axum::http::Method::GET])
            .error_handler(error_response)
            .finish()
            .map(Arc::new)
            .unwrap_or_else(|| unreachable!("period and burst are non-zero"));
        Self { config }
    }

    /// The tower layer to put on the consumption route.
    pub fn layer(&self) -> GovernorLayer<TargetUser, NoOpMiddleware> {
        GovernorLayer {
            config: self.config.clone(),
        }
    }

    /// The keyed limiter state.
    pub fn limiter(&self) -> &Limiter {
        self.config.limiter()
    }

    /// Forgets targets whose bucket has refilled, so memory follows the recently active set
    /// rather than every target ever asked for.
    pub fn prune(&self) {
        let limiter = self.limiter();
        limiter.retain_recent();
        limiter.shrink_to_fit();
    }

    /// Prunes every `every` until the runtime stops.
    pub fn spawn_pruning(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        let config = self.config.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let limiter = config.limiter();
                limiter.retain_recent();
                limiter.shrink_to_fit();
            }
        })
    }
}

fn error_response(error: GovernorError) -> Response<Body> {
    match error {
        GovernorError::TooManyRequests { wait_time, .. } => ApiError::RateLimited {
            // governor truncates to whole seconds; the true wait is below wait_time + 1.
            retry_after: Duration::from_secs(wait_time + 1),
        },
        GovernorError::Other { .. } => ApiError::InvalidUserId(crate::key_package::InvalidUserId),
        GovernorError::UnableToExtractKey => ApiError::NotFound,
    }
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_user_is_percent_decoded_and_validated() {
        assert_eq!(target_user("alice").unwrap().as_str(), "alice");
        assert_eq!(target_user("a%40b").unwrap().as_str(), "a@b");
        assert!(target_user("a%2Fb").is_none());
        assert!(target_user("a%00").is_none());
        assert!(target_user("%FF").is_none());
        assert!(target_user("").is_none());
    }

    #[test]
    fn limiter_allows_the_budget_then_refuses() {
        let limiter = ConsumeLimiter::new(Budget::per_minute(10));
        let bob = UserId::parse("bob").unwrap();
        for _ in 0..10 {
            assert!(limiter.limiter().check_key(&bob).is_ok());
        }
        assert!(limiter.limiter().check_key(&bob).is_err());
        let carol = UserId::parse("carol").unwrap();
        assert!(
            limiter.limiter().check_key(&carol).is_ok(),
            "budgets are per target"
        );
    }

    #[test]
    fn pruning_forgets_refilled_targets_so_memory_stays_bounded() {
        // One request per target refills after 1 ms, so every key is stale soon after.
        let limiter = ConsumeLimiter::new(Budget {
            burst: 10,
            interval: Duration::from_micros(100),
        });
        for i in 0..100_000 {
            let user = UserId::parse(&format!("user{i}")).unwrap();
            limiter.limiter().check_key(&user).unwrap();
        }
        assert_eq!(limiter.limiter().len(), 100_000);
        // Wait out the refill of the last key (100 µs); not a race, just elapsed time.
        std::thread::sleep(Duration::from_millis(5));
        limiter.prune();
        assert_eq!(limiter.limiter().len(), 0);
    }
}
