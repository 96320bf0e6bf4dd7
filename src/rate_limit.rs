//! The consumption budget: one GCRA [`Budget`], charged by the store in the consumption step
//! (shared by every process on one database), an in-process pre-check ([`LocalBudgets`]) that
//! refuses from memory what the shared budget would certainly refuse, and the pruning that
//! keeps both small.

use std::{
    collections::HashMap,
    hash::{BuildHasher, BuildHasherDefault, Hash, Hasher, RandomState},
    marker::PhantomData,
    sync::{Arc, Mutex},
    time::Duration,
};

use crate::{clock, key_package::UserId, store::KeyPackageStore};

/// A consumption budget: a GCRA bucket of `burst` requests refilling one every `interval`.
///
/// The state of a bucket is its theoretical arrival time `tat` (µs since the epoch): the bucket
/// is full when `tat <= now` and empty when `tat >= now + window - interval`.
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

    /// GCRA decision at `now_us` for a bucket whose stored state is `tat` (`None`: no state, a
    /// full bucket): the new `tat` to store, or the time until one more request is allowed.
    ///
    /// A stored `tat` beyond `now + window` (written by a clock that ran ahead) counts as an
    /// empty bucket, so it never locks a target out for longer than one interval.
    pub fn decide(&self, tat: Option<i64>, now_us: i64) -> Result<i64, Duration> {
        let new_tat = self.advance(tat, now_us);
        let allowed_until = now_us.saturating_add(self.window_us());
        if new_tat <= allowed_until {
            Ok(new_tat)
        } else {
            Err(Duration::from_micros((new_tat - allowed_until) as u64))
        }
    }

    /// The stored state `tat` as it must be kept at `now_us`: at most one window ahead. A row
    /// written by a clock that ran ahead is cut back to an empty bucket, which then refills
    /// normally; stores write this back when they refuse a request.
    pub fn clamp(&self, tat: i64, now_us: i64) -> i64 {
        tat.min(now_us.saturating_add(self.window_us()))
    }

    /// The state after one more request at `now_us`, whether or not the budget allows it.
    fn advance(&self, tat: Option<i64>, now_us: i64) -> i64 {
        let ceiling = now_us.saturating_add(self.window_us());
        tat.unwrap_or(now_us)
            .clamp(now_us, ceiling)
            .saturating_add(self.interval_us())
    }

    /// The refill interval in microseconds (at least 1).
    pub fn interval_us(&self) -> i64 {
        i64::try_from(self.interval.as_micros())
            .unwrap_or(i64::MAX)
            .max(1)
    }

    /// How far ahead of now a bucket's `tat` may run: `burst` intervals.
    pub fn window_us(&self) -> i64 {
        self.interval_us().saturating_mul(i64::from(self.burst))
    }
}

/// A budget refused a request: one more is allowed after `retry_after`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refused {
    /// Time until the budget allows one more request.
    pub retry_after: Duration,
    /// The stage whose budget refused.
    pub scope: Scope,
}

/// The stages of a claim's budgets, in the order they are charged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scope {
    /// The caller's own budget over all targets.
    Caller,
    /// The budget of one caller asking for one target.
    Pair,
    /// The target's budget over all callers.
    Target,
}

impl Scope {
    /// The problem member `scope` of a 429.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Caller => "caller",
            Self::Pair => "pair",
            Self::Target => "target",
        }
    }
}

/// The in-process pre-check of one [`Budget`] for many keys (targets, callers, pairs).
///
/// It only learns from requests the shared budget has already charged ([`LocalBudgets::record`])
/// or refused ([`LocalBudgets::learn`]), so its state never runs ahead of the shared one: what it
/// refuses, the shared budget would refuse too. A request that fails (5xx) is never recorded.
///
/// A key is kept as its 64-bit SipHash under a key drawn at random per process: 16 bytes of
/// entry whatever the key's length, where a caller and target pair took two heap strings. Two keys
/// share a bucket only if their hashes collide: by chance about n² / 2⁶⁵ for n keys with state
/// (3 × 10⁻⁸ for a million), and not by design, since nobody outside the process knows the key.
pub struct LocalBudgets<K> {
    budget: Budget,
    shards: Box<[Mutex<Buckets>]>,
    hasher: RandomState,
    key: PhantomData<fn(&K)>,
}

/// One shard of a [`LocalBudgets`]: a bucket's state (`tat`) by the key's hash.
type Buckets = HashMap<u64, i64, BuildHasherDefault<Prehashed>>;

/// The identity on the keys of [`Buckets`], which are hashes already.
#[derive(Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `u64` keys are hashed here; any other input still hashes, just not as the identity.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// Shards of a [`LocalBudgets`] map: enough that concurrent requests rarely share a lock.
const SHARDS: usize = 32;

impl<K: Hash> LocalBudgets<K> {
    /// An empty pre-check of `budget`.
    pub fn new(budget: Budget) -> Self {
        Self {
            budget,
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: RandomState::new(),
            key: PhantomData,
        }
    }

    /// The shard of `key`, locked, and the key's hash in it.
    fn shard(&self, key: &K) -> (std::sync::MutexGuard<'_, Buckets>, u64) {
        let hash = self.hasher.hash_one(key);
        // The map's buckets come from the low bits and its tags from the top ones, so the shard
        // takes bits from the middle.
        let index = ((hash >> 32) as usize) % self.shards.len();
        // A poisoned shard only means another request panicked while holding it; the map
        // itself is always consistent (every update is a single insert).
        let shard = self.shards[index]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        (shard, hash)
    }

    /// `Err` with the wait when, by what this process knows, the budget of `key` is spent at
    /// `now_us`.
    pub fn check(&self, key: &K, now_us: i64) -> Result<(), Duration> {
        let tat = {
            let (shard, hash) = self.shard(key);
            shard.get(&hash).copied()
        };
        self.budget.decide(tat, now_us).map(|_| ())
    }

    /// Reserves one request of `key` at `at_us` if, by what this process knows, the budget
    /// allows it; `Err` with the wait otherwise. A reservation the shared budget then does not
    /// charge is given back with [`LocalBudgets::refund`], so concurrent requests cannot all
    /// pass on one free slot, and the state stays no ahead of the shared one once settled.
    pub fn reserve(&self, key: &K, at_us: i64) -> Result<(), Duration> {
        let (mut shard, hash) = self.shard(key);
        let next = self.budget.decide(shard.get(&hash).copied(), at_us)?;
        shard.insert(hash, next);
        Ok(())
    }

    /// Gives back one reservation of `key`.
    pub fn refund(&self, key: &K) {
        let (mut shard, hash) = self.shard(key);
        if let Some(tat) = shard.get_mut(&hash) {
            *tat = tat.saturating_sub(self.budget.interval_us());
        }
    }

    /// Records a request the shared budget charged; `at_us` is when the request started, which
    /// is no later than when the database charged it.
    pub fn record(&self, key: &K, at_us: i64) {
        let (mut shard, hash) = self.shard(key);
        let tat = self.budget.advance(shard.get(&hash).copied(), at_us);
        shard.insert(hash, tat);
    }

    /// Learns from a refusal of the shared budget at `at_us` with `wait`: the bucket stays empty
    /// until then, so further requests are refused from memory.
    pub fn learn(&self, key: &K, at_us: i64, wait: Duration) {
        let wait_us = i64::try_from(wait.as_micros()).unwrap_or(i64::MAX);
        let empty_until = at_us
            .saturating_add(self.budget.window_us() - self.budget.interval_us())
            .saturating_add(wait_us);
        let (mut shard, hash) = self.shard(key);
        let tat = shard
            .get(&hash)
            .copied()
            .unwrap_or(i64::MIN)
            .max(empty_until);
        shard.insert(hash, tat);
    }

    /// Forgets keys whose bucket has refilled at `now_us` (no state is a full bucket), so memory
    /// follows the recently active keys rather than every key ever seen.
    pub fn prune(&self, now_us: i64) {
        for shard in self.shards.iter() {
            let mut shard = shard
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            shard.retain(|_, tat| *tat > now_us);
            shard.shrink_to_fit();
        }
    }

    /// Keys with state.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                s.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .len()
            })
            .sum()
    }

    /// True when no key has state.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The consumption budgets of a claim: the caller's and the pair's (`None`: off), then the
/// target's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClaimBudgets {
    /// Per caller, over all targets.
    pub caller: Option<Budget>,
    /// Per caller and target.
    pub pair: Option<Budget>,
    /// Per target, over all callers.
    pub target: Budget,
}

impl ClaimBudgets {
    /// The contract's defaults: 600 per caller, 3 per pair, 10 per target, per minute.
    pub fn defaults() -> Self {
        Self::per_minute(600, 3, 10)
    }

    /// Budgets of so many requests per minute; `0` turns the caller or pair stage off.
    pub fn per_minute(caller: u32, pair: u32, target: u32) -> Self {
        let stage = |n: u32| (n > 0).then(|| Budget::per_minute(n));
        Self {
            caller: stage(caller),
            pair: stage(pair),
            target: Budget::per_minute(target),
        }
    }
}

/// How a claim ended at the shared budgets, for the pre-check to learn from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Settled {
    /// Every enabled stage was charged (a package or a 404).
    Charged,
    /// The stage `scope` refused with this wait; no stage was charged.
    Refused(Refused),
    /// Nothing was charged (a replay, a reused key).
    Untouched,
}

/// The per-process pre-check of a claim's budgets, keyed by caller, pair and target, and the
/// idempotency keys in flight in this process.
pub struct ConsumeLimiter {
    callers: Option<LocalBudgets<UserId>>,
    pairs: Option<LocalBudgets<(UserId, UserId)>>,
    targets: LocalBudgets<UserId>,
    in_flight: Mutex<std::collections::HashSet<(UserId, String)>>,
}

impl ConsumeLimiter {
    /// A pre-check of `budgets`.
    pub fn new(budgets: ClaimBudgets) -> Self {
        Self {
            callers: budgets.caller.map(LocalBudgets::new),
            pairs: budgets.pair.map(LocalBudgets::new),
            targets: LocalBudgets::new(budgets.target),
            in_flight: Mutex::default(),
        }
    }

    /// The per-target pre-check.
    pub fn targets(&self) -> &LocalBudgets<UserId> {
        &self.targets
    }

    /// Admits `caller` asking for `target` at `at_us`, reserving one request at every stage,
    /// or refuses with the first stage (caller, pair, target) that, by what this process knows,
    /// is spent. The reservations are given back unless [`Admission::settle`] learns that the
    /// shared budgets charged the claim.
    pub fn admit(
        &self,
        caller: &UserId,
        target: &UserId,
        at_us: i64,
    ) -> Result<Admission<'_>, Refused> {
        let mut admission = Admission {
            limiter: self,
            caller: caller.clone(),
            target: target.clone(),
            reserved: [false; 3],
            kept: false,
        };
        let refused = |scope| move |retry_after| Refused { retry_after, scope };
        if let Some(callers) = &self.callers {
            callers
                .reserve(caller, at_us)
                .map_err(refused(Scope::Caller))?;
            admission.reserved[0] = true;
        }
        if let Some(pairs) = &self.pairs {
            pairs
                .reserve(&admission.pair(), at_us)
                .map_err(refused(Scope::Pair))?;
            admission.reserved[1] = true;
        }
        self.targets
            .reserve(target, at_us)
            .map_err(refused(Scope::Target))?;
        admission.reserved[2] = true;
        Ok(admission)
    }

    /// Learns how the shared budgets settled a claim that was not admitted here (one with an
    /// idempotency key) and started at `at_us`.
    pub fn observe(&self, caller: &UserId, target: &UserId, at_us: i64, settled: Settled) {
        match settled {
            Settled::Untouched => {}
            Settled::Refused(r) => self.learn(caller, target, at_us, r),
            Settled::Charged => {
                if let Some(callers) = &self.callers {
                    callers.record(caller, at_us);
                }
                if let Some(pairs) = &self.pairs {
                    pairs.record(&(caller.clone(), target.clone()), at_us);
                }
                self.targets.record(target, at_us);
            }
        }
    }

    /// Learns a refusal of the shared budget of stage `r.scope`.
    fn learn(&self, caller: &UserId, target: &UserId, at_us: i64, r: Refused) {
        match (r.scope, &self.callers, &self.pairs) {
            (Scope::Caller, Some(callers), _) => callers.learn(caller, at_us, r.retry_after),
            (Scope::Pair, _, Some(pairs)) => {
                pairs.learn(&(caller.clone(), target.clone()), at_us, r.retry_after);
            }
            (Scope::Target, _, _) => self.targets.learn(target, at_us, r.retry_after),
            // A stage this process has off (another process may have it on): nothing to keep.
            _ => {}
        }
    }

    /// Marks `(caller, key)` as in flight in this process until the guard drops; `None` when
    /// it already is (the claim is answered 409 without asking the database).
    pub fn begin_keyed(&self, caller: &UserId, key: &str) -> Option<InFlight<'_>> {
        let entry = (caller.clone(), key.to_owned());
        let inserted = self
            .in_flight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(entry.clone());
        // Lazily: a guard made and dropped here would take the lock again and free the key
        // of the claim that holds it.
        inserted.then(|| InFlight {
            limiter: self,
            entry: Some(entry),
        })
    }

    /// Forgets refilled state now.
    pub fn prune(&self) {
        let now = clock::unix_micros();
        if let Some(callers) = &self.callers {
            callers.prune(now);
        }
        if let Some(pairs) = &self.pairs {
            pairs.prune(now);
        }
        self.targets.prune(now);
    }

    /// Keys with state, over all stages.
    pub fn len(&self) -> usize {
        self.callers.as_ref().map_or(0, LocalBudgets::len)
            + self.pairs.as_ref().map_or(0, LocalBudgets::len)
            + self.targets.len()
    }

    /// True when no stage has state.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A claim admitted by [`ConsumeLimiter::admit`], holding its reservations.
pub struct Admission<'a> {
    limiter: &'a ConsumeLimiter,
    caller: UserId,
    target: UserId,
    /// Which of caller, pair and target hold a reservation.
    reserved: [bool; 3],
    /// The shared budgets charged the claim: the reservations stand.
    kept: bool,
}

impl Admission<'_> {
    fn pair(&self) -> (UserId, UserId) {
        (self.caller.clone(), self.target.clone())
    }

    /// Learns how the shared budgets settled the claim, which started at `at_us`: charged, the
    /// reservations stand; otherwise they are given back, and a refusal is learned.
    pub fn settle(mut self, at_us: i64, settled: Settled) {
        match settled {
            Settled::Charged => self.kept = true,
            Settled::Refused(r) => {
                self.give_back();
                self.limiter.learn(&self.caller, &self.target, at_us, r);
            }
            Settled::Untouched => {}
        }
    }

    fn give_back(&mut self) {
        let limiter = self.limiter;
        if std::mem::take(&mut self.reserved[0]) {
            if let Some(callers) = &limiter.callers {
                callers.refund(&self.caller);
            }
        }
        if std::mem::take(&mut self.reserved[1]) {
            if let Some(pairs) = &limiter.pairs {
                pairs.refund(&self.pair());
            }
        }
        if std::mem::take(&mut self.reserved[2]) {
            limiter.targets.refund(&self.target);
        }
    }
}

impl Drop for Admission<'_> {
    /// A claim that failed (or was never settled) was not charged: its reservations go back.
    fn drop(&mut self) {
        if !self.kept {
            self.give_back();
        }
    }
}

/// An idempotency key in flight in this process; see [`ConsumeLimiter::begin_keyed`].
pub struct InFlight<'a> {
    limiter: &'a ConsumeLimiter,
    entry: Option<(UserId, String)>,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if let Some(entry) = self.entry.take() {
            self.limiter
                .in_flight
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(&entry);
        }
    }
}

/// How often the in-process limiter forgets refilled targets.
pub const LIMITER_PRUNE_EVERY: Duration = Duration::from_secs(30);

/// How often refilled budget rows are dropped from the database.
pub const BUDGET_PRUNE_EVERY: Duration = Duration::from_secs(60);

/// Budget rows one pruning statement deletes at most, so it stays far below the statement
/// timeout and (on SQLite) holds the only writer only briefly.
pub const BUDGET_PRUNE_BATCH: u32 = 1000;

/// Prunes the in-process limiter every `every` until the runtime stops.
pub fn spawn_limiter_pruning(
    limiter: Arc<ConsumeLimiter>,
    every: Duration,
) -> tokio::task::JoinHandle<()> {
    spawn_every(every, move || {
        limiter.prune();
        std::future::ready(())
    })
}

/// Drops fully refilled consumption budgets and expired idempotency records from the database
/// every `every`, in batches of [`BUDGET_PRUNE_BATCH`], so both tables stay as small as the
/// recent claims.
pub fn spawn_budget_pruning(
    store: Arc<dyn KeyPackageStore>,
    every: Duration,
) -> tokio::task::JoinHandle<()> {
    spawn_every(every, move || {
        let store = store.clone();
        async move {
            if let Err(e) = prune_budgets(store.as_ref()).await {
                tracing::warn!(error = %e, "pruning consumption budgets failed");
            }
            if let Err(e) = prune_replays(store.as_ref()).await {
                tracing::warn!(error = %e, "pruning idempotency records failed");
            }
        }
    })
}

/// Runs `task` every `every` (the first time at once) until the runtime stops; a late tick is
/// not made up for.
fn spawn_every<F, Fut>(every: Duration, mut task: F) -> tokio::task::JoinHandle<()>
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            task().await;
        }
    })
}

/// Deletes refilled budget rows batch by batch (by the database's clock) until none is left.
pub async fn prune_budgets(store: &dyn KeyPackageStore) -> Result<u64, crate::store::StoreError> {
    in_batches(|| store.prune_budgets(None, BUDGET_PRUNE_BATCH)).await
}

/// Deletes expired idempotency records batch by batch (by the database's clock).
pub async fn prune_replays(store: &dyn KeyPackageStore) -> Result<u64, crate::store::StoreError> {
    in_batches(|| store.prune_replays(None, BUDGET_PRUNE_BATCH)).await
}

/// Runs a pruning statement of [`BUDGET_PRUNE_BATCH`] rows until a batch comes back short.
async fn in_batches<F, Fut>(mut batch: F) -> Result<u64, crate::store::StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<u64, crate::store::StoreError>>,
{
    let mut total = 0;
    loop {
        let deleted = batch().await?;
        total += deleted;
        if deleted < u64::from(BUDGET_PRUNE_BATCH) {
            return Ok(total);
        }
        // Let requests waiting for the (SQLite) writer in between batches.
        tokio::task::yield_now().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: i64 = 1_000_000;

    #[test]
    fn budget_allows_a_burst_then_one_per_interval() {
        let b = Budget::per_minute(10);
        assert_eq!(b.interval, Duration::from_secs(6));
        let mut tat = None;
        let now = 1_000 * SECOND;
        for _ in 0..10 {
            tat = Some(b.decide(tat, now).expect("within burst"));
        }
        let wait = b.decide(tat, now).unwrap_err();
        assert_eq!(wait, Duration::from_secs(6));
        assert!(b.decide(tat, now + 6 * SECOND - 1).is_err());
        let after = b.decide(tat, now + 6 * SECOND).expect("one refilled");
        assert!(b.decide(Some(after), now + 6 * SECOND).is_err());
    }

    #[test]
    fn budget_state_older_than_now_is_a_full_bucket() {
        let b = Budget::per_minute(3);
        let now = 50 * SECOND;
        let mut tat = Some(now - 1_000 * SECOND);
        for _ in 0..3 {
            tat = Some(b.decide(tat, now).unwrap());
        }
        assert!(b.decide(tat, now).is_err());
    }

    #[test]
    fn refill_intervals_below_a_millisecond_are_kept_exactly() {
        // 40 000 per minute refill one every 1.5 ms, not every 1 ms.
        let b = Budget::per_minute(40_000);
        assert_eq!(b.interval_us(), 1_500);
        let now = 7 * SECOND;
        let mut tat = None;
        for _ in 0..40_000 {
            tat = Some(b.decide(tat, now).unwrap());
        }
        assert!(
            b.decide(tat, now + 1_000).is_err(),
            "nothing refilled after 1 ms"
        );
        assert!(
            b.decide(tat, now + 1_500).is_ok(),
            "one refilled after 1.5 ms"
        );
    }

    #[test]
    fn a_tat_written_by_a_clock_far_ahead_is_clamped_to_one_window() {
        let b = Budget::per_minute(10);
        let now = 1_000 * SECOND;
        // A host whose clock runs an hour ahead charged the whole budget.
        let mut ahead = None;
        for _ in 0..10 {
            ahead = Some(b.decide(ahead, now + 3_600 * SECOND).unwrap());
        }
        // Here it reads as an empty bucket, refilling within one interval, not in an hour,
        // once the store has written the clamped state back.
        assert_eq!(b.decide(ahead, now).unwrap_err(), Duration::from_secs(6));
        let kept = b.clamp(ahead.unwrap(), now);
        assert_eq!(kept, now + 60 * SECOND);
        assert!(b.decide(Some(kept), now + 6 * SECOND).is_ok());
    }

    #[test]
    fn local_budgets_refuse_only_after_recorded_charges() {
        let local = LocalBudgets::new(Budget::per_minute(3));
        let now = 100 * SECOND;
        for _ in 0..3 {
            assert!(local.check(&"bob", now).is_ok());
            local.record(&"bob", now);
        }
        assert_eq!(
            local.check(&"bob", now).unwrap_err(),
            Duration::from_secs(20)
        );
        assert!(local.check(&"carol", now).is_ok(), "budgets are per key");
        assert!(
            local.check(&"bob", now + 20 * SECOND).is_ok(),
            "one refilled"
        );
    }

    #[test]
    fn checking_spends_nothing_so_failed_requests_cost_no_budget() {
        let local = LocalBudgets::new(Budget::per_minute(2));
        let now = 100 * SECOND;
        // Requests that were checked but failed before the shared budget charged them.
        for _ in 0..100 {
            assert!(local.check(&"bob", now).is_ok());
        }
        assert!(local.is_empty());
    }

    #[test]
    fn a_learned_refusal_is_refused_from_memory_until_its_wait_has_passed() {
        let b = Budget::per_minute(10);
        let local = LocalBudgets::new(b);
        let now = 100 * SECOND;
        local.learn(&"bob", now, Duration::from_secs(4));
        let wait = local.check(&"bob", now).unwrap_err();
        assert_eq!(wait, Duration::from_secs(4));
        assert!(local.check(&"bob", now + 4 * SECOND).is_ok());
        // Never more pessimistic than the shared state it learned from.
        let mut shared = None;
        for _ in 0..10 {
            shared = Some(b.decide(shared, now).unwrap());
        }
        let shared_wait = b.decide(shared, now).unwrap_err();
        local.learn(&"carol", now, shared_wait);
        assert_eq!(local.check(&"carol", now).unwrap_err(), shared_wait);
    }

    #[test]
    fn pruning_forgets_refilled_keys_so_memory_stays_bounded() {
        let local = LocalBudgets::new(Budget::per_minute(10));
        let now = 100 * SECOND;
        for i in 0..100_000 {
            local.record(&i, now);
        }
        assert_eq!(local.len(), 100_000);
        local.prune(now + 5 * SECOND);
        assert_eq!(local.len(), 100_000, "not refilled yet");
        local.prune(now + 6 * SECOND);
        assert!(local.is_empty());
    }
}
