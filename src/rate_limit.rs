//! The consumption budget: one GCRA [`Budget`], charged by the store in the consumption
//! transaction (shared by every process on one database), a per-process tower-governor pre-check
//! keyed by the target user id in the path, and the pruning that keeps both small.

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

use crate::{clock, error::ApiError, key_package::UserId, store::KeyPackageStore};

/// A per-target consumption budget: a GCRA bucket of `burst` requests refilling one every
/// `interval`. The store charges it atomically with the hand-out; [`ConsumeLimiter`] applies
/// the same budget in memory first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    /// Requests allowed at once when the bucket is full.
    pub burst: u32,
    /// Time to refill one request.
    pub interval: Duration,
}

impl Budget {
    /// A budget of `per_minute` requests per minute, all of them available at once.
    pub fn per_minute(per_minute: u32) -> Self {
        let per_minute = per_minute.max(1);
        Self {
            burst: per_minute,
            interval: Duration::from_secs(60) / per_minute,
        }
    }

    /// GCRA decision. `tat` is the stored theoretical arrival time (ms since the epoch, or `None`
    /// if the target has no state); returns the new `tat` to store, or the time to wait.
    pub fn decide(&self, tat: Option<i64>, now_ms: i64) -> Result<i64, Duration> {
        let interval = self.interval_ms();
        let new_tat = tat.unwrap_or(now_ms).max(now_ms) + interval;
        let allowed_until = now_ms + self.window_ms();
        if new_tat <= allowed_until {
            Ok(new_tat)
        } else {
            Err(Duration::from_millis((new_tat - allowed_until) as u64))
        }
    }

    /// The refill interval in milliseconds (at least 1).
    pub fn interval_ms(&self) -> i64 {
        (self.interval.as_millis() as i64).max(1)
    }

    /// How far ahead of now a target's `tat` may run: `burst` intervals.
    pub fn window_ms(&self) -> i64 {
        self.interval_ms() * i64::from(self.burst)
    }
}

/// How often the in-process limiter forgets refilled targets.
pub const LIMITER_PRUNE_EVERY: Duration = Duration::from_secs(30);

/// How often refilled budget rows are dropped from the database.
pub const BUDGET_PRUNE_EVERY: Duration = Duration::from_secs(60);

/// Drops fully refilled consumption budgets from the database every `every`, so the table stays
/// as small as the set of recently consumed targets.
pub fn spawn_budget_pruning(
    store: std::sync::Arc<dyn KeyPackageStore>,
    every: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = store.prune_budgets(clock::unix_millis()).await {
                tracing::warn!(error = %e, "pruning consumption budgets failed");
            }
        }
    })
}

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
        prune(self.limiter());
    }

    /// Prunes every `every` until the runtime stops.
    pub fn spawn_pruning(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        let config = self.config.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                prune(config.limiter());
            }
        })
    }
}

fn prune(limiter: &Limiter) {
    limiter.retain_recent();
    limiter.shrink_to_fit();
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
    fn budget_allows_a_burst_then_one_per_interval() {
        let b = Budget::per_minute(10);
        assert_eq!(b.interval, Duration::from_secs(6));
        let mut tat = None;
        let now = 1_000_000;
        for _ in 0..10 {
            tat = Some(b.decide(tat, now).expect("within burst"));
        }
        let wait = b.decide(tat, now).unwrap_err();
        assert_eq!(wait, Duration::from_secs(6));
        assert!(b.decide(tat, now + 5_999).is_err());
        let after = b.decide(tat, now + 6_000).expect("one refilled");
        assert!(b.decide(Some(after), now + 6_000).is_err());
    }

    #[test]
    fn budget_state_older_than_now_is_a_full_bucket() {
        let b = Budget::per_minute(3);
        let now = 50_000;
        let mut tat = Some(now - 1_000_000);
        for _ in 0..3 {
            tat = Some(b.decide(tat, now).unwrap());
        }
        assert!(b.decide(tat, now).is_err());
    }

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
