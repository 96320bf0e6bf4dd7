//! Group commit for claims and uploads: under load, statements that would wait for one another
//! run together, as one statement in one transaction, so they share a round trip and a WAL
//! flush. One [`Batcher`] serves one kind of [`Job`]; the text below speaks of claims, and
//! holds for uploads alike (an upload owns its user's row where a claim owns its target's and
//! its caller's).
//!
//! At most `slots` claim statements run at once. A claim that finds none running (and the
//! queue empty) runs alone at once, so a lone claim never waits for company; any other queues.
//! As a statement ends, its slot takes the queue's oldest claims with pairwise distinct targets
//! and callers, none shared with a claim still running (up to `max_batch`), and runs them as
//! one batch in a task of its own, which a caller hanging up cannot cancel.
//!
//! One statement at a time makes the largest batches, and the fewest commits per claim, as
//! long as it keeps up; a further slot opens only when it does not: when half a batch of
//! claims (`max_batch / 2`) waits, or when every running statement has run for [`STALL`] (a
//! claim that waits that long checks), so a target whose rows a stuck transaction holds stalls
//! one slot, not every claim. A slot whose statement ends while another runs closes again
//! unless one of those holds.
//!
//! Claims of one batch share no row, so the batch hands out exactly what they would one after
//! the other; a claim whose target or caller is taken waits for a later batch,
//! in its place in the queue (FIFO per target holds), and a target whose rows are locked holds
//! one slot at most while the other claims go on.
//!
//! A batch the database rejects (an error it reported, so the transaction rolled back and
//! nothing of it took effect) is run again claim by claim, so one bad claim cannot fail the
//! others. Any other failure leaves the batch's outcome unknown: every claim of it fails as
//! unavailable, as a lone claim would.

use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::{Duration, Instant},
};

use async_trait::async_trait;
use tokio::sync::oneshot;

use super::StoreError;

/// One claim's arguments, owned, so it can wait in the queue and run in another task.
#[derive(Clone, Debug)]
pub(super) struct ClaimArgs {
    pub(super) target: String,
    pub(super) caller: Option<String>,
    pub(super) key: Option<String>,
    pub(super) ttl_us: i64,
    pub(super) now_us: Option<i64>,
    /// The accepted suites; `None`: any.
    pub(super) suites: Option<Vec<i32>>,
    pub(super) target_interval_us: i64,
    pub(super) target_window_us: i64,
    pub(super) caller_interval_us: Option<i64>,
    pub(super) caller_window_us: Option<i64>,
    pub(super) pair_interval_us: Option<i64>,
    pub(super) pair_window_us: Option<i64>,
}

/// What a [`Batcher`] runs: a claim, an upload.
pub(super) trait Job: Send + Sync + 'static {
    /// Hashes of the rows the job owns; a collision only makes a job wait for the next slot.
    fn row_keys(&self) -> [Option<u64>; 2];

    /// Whether the two jobs would touch a common row.
    fn overlaps(&self, other: &Self) -> bool;
}

/// A row key of [`Job::row_keys`]: `id` of kind `kind`.
pub(super) fn row_key(kind: u8, id: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (kind, id).hash(&mut hasher);
    hasher.finish()
}

impl Job for ClaimArgs {
    /// The target's and, if any, the caller's.
    fn row_keys(&self) -> [Option<u64>; 2] {
        [
            Some(row_key(0, &self.target)),
            self.caller.as_deref().map(|c| row_key(1, c)),
        ]
    }

    /// The same target, or the same caller (whose budget and idempotency records they would
    /// share).
    fn overlaps(&self, other: &Self) -> bool {
        self.target == other.target || (self.caller.is_some() && self.caller == other.caller)
    }
}

/// How a batch failed.
#[derive(Debug)]
pub(super) enum BatchError {
    /// The database refused it and nothing of it took effect: its claims run again one by one.
    Refused(StoreError),
    /// It may have taken effect, or the database is unavailable to all its claims alike: each
    /// claim fails as unavailable.
    Failed(StoreError),
}

/// Runs jobs on the database: one alone, or a batch of jobs that share no row.
#[async_trait]
pub(super) trait Runner: Send + Sync + 'static {
    /// What it runs.
    type Job: Job;
    /// What the job's statement returns.
    type Row: Send + 'static;
    /// The job's name in logs and errors.
    const KIND: &'static str;

    /// Runs one job in a statement of its own.
    async fn one(&self, job: &Self::Job) -> Result<Self::Row, StoreError>;

    /// Runs `jobs`, which share no row, in one statement; one row per job, in order.
    async fn many(&self, jobs: &[&Self::Job]) -> Result<Vec<Self::Row>, BatchError>;
}

/// A queued job and where its outcome goes.
struct Waiter<J, T> {
    job: J,
    reply: oneshot::Sender<Result<T, StoreError>>,
}

/// A claim that has waited this long while every running statement has run at least as long
/// opens another slot (if any is left).
const STALL: Duration = Duration::from_millis(5);

struct Queue<J, T> {
    /// When each claim statement running (alone or as a batch) started: at most `slots`.
    started: Vec<Instant>,
    /// The [`RowKeys`] of every claim running: a claim sharing a target or caller with one of
    /// them waits, so one target whose rows are locked (an upload in flight, a stuck
    /// transaction) holds one slot at most, never all of them.
    busy: Vec<u64>,
    waiting: VecDeque<Waiter<J, T>>,
}

impl<J: Job, T> Queue<J, T> {
    fn is_busy(&self, claim: &J) -> bool {
        claim
            .row_keys()
            .into_iter()
            .flatten()
            .any(|k| self.busy.contains(&k))
    }

    fn mark_busy(&mut self, claims: &[&J]) -> Vec<u64> {
        let keys: Vec<u64> = claims.iter().flat_map(|c| c.row_keys()).flatten().collect();
        self.busy.extend_from_slice(&keys);
        keys
    }

    fn mark_done(&mut self, keys: &[u64]) {
        for key in keys {
            if let Some(i) = self.busy.iter().position(|k| k == key) {
                self.busy.swap_remove(i);
            }
        }
    }

    /// Whether another statement may start now, of at most `slots`: none runs, or the running
    /// ones do not keep up (`widen_at` claims wait, or every one has run for [`STALL`]).
    fn may_start(&self, slots: usize, widen_at: usize, now: Instant) -> bool {
        self.started.is_empty()
            || (self.started.len() < slots
                && (self.waiting.len() >= widen_at
                    || self
                        .started
                        .iter()
                        .all(|s| now.saturating_duration_since(*s) >= STALL)))
    }

    /// Counts a statement of `claims` as running from `now`; returns their row keys.
    fn start(&mut self, claims: &[&J], now: Instant) -> Vec<u64> {
        self.started.push(now);
        self.mark_busy(claims)
    }

    /// A statement (its row keys, its start) has ended.
    fn end(&mut self, keys: &[u64], started: Instant) {
        self.mark_done(keys);
        if let Some(i) = self.started.iter().position(|s| *s == started) {
            self.started.swap_remove(i);
        }
    }
}

/// Claims run alone while slots are free, and in batches once they queue.
pub(super) struct Batcher<R: Runner> {
    runner: R,
    slots: usize,
    max_batch: usize,
    /// Claims waiting that open another slot.
    widen_at: usize,
    queue: Mutex<Queue<R::Job, R::Row>>,
    batches: AtomicU64,
    batched: AtomicU64,
}

impl<R: Runner> Batcher<R> {
    /// At most `slots` claim statements at once, batches of at most `max_batch` claims.
    pub(super) fn new(runner: R, slots: usize, max_batch: usize) -> Self {
        Self {
            runner,
            slots: slots.max(1),
            max_batch: max_batch.max(1),
            widen_at: (max_batch / 2).max(1),
            queue: Mutex::new(Queue {
                started: Vec::new(),
                busy: Vec::new(),
                waiting: VecDeque::new(),
            }),
            batches: AtomicU64::new(0),
            batched: AtomicU64::new(0),
        }
    }

    /// Runs `jobs` as one batch whatever the load, for comparing a batch with the same jobs
    /// one by one; they must share no row.
    pub(super) async fn run_together(&self, jobs: &[R::Job]) -> Result<Vec<R::Row>, StoreError> {
        for (i, job) in jobs.iter().enumerate() {
            if jobs[..i].iter().any(|earlier| earlier.overlaps(job)) {
                return Err(StoreError::Database(sqlx::Error::Protocol(format!(
                    "{} {i} shares a row with an earlier one",
                    R::KIND
                ))));
            }
        }
        let refs: Vec<&R::Job> = jobs.iter().collect();
        self.runner.many(&refs).await.map_err(|e| match e {
            BatchError::Refused(e) | BatchError::Failed(e) => e,
        })
    }

    /// Batches of two claims or more run so far, and the claims they held.
    pub(super) fn batches(&self) -> (u64, u64) {
        (
            self.batches.load(Ordering::Relaxed),
            self.batched.load(Ordering::Relaxed),
        )
    }

    /// Claims waiting for a slot now.
    pub(super) fn waiting(&self) -> usize {
        self.lock().waiting.len()
    }

    fn lock(&self) -> MutexGuard<'_, Queue<R::Job, R::Row>> {
        // The queue's invariants hold between statements, so a panic elsewhere leaves it usable.
        self.queue
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs `claim`: at once if nothing runs, else in a batch once a slot takes it.
    pub(super) async fn submit(self: &Arc<Self>, claim: R::Job) -> Result<R::Row, StoreError> {
        let now = Instant::now();
        let queued = {
            let mut queue = self.lock();
            if queue.started.is_empty() && queue.waiting.is_empty() {
                let keys = queue.start(&[&claim], now);
                Ok((claim, keys))
            } else {
                let (reply, outcome) = oneshot::channel();
                queue.waiting.push_back(Waiter { job: claim, reply });
                Err((outcome, self.widen(&mut queue, now)))
            }
        };
        let mut outcome = match queued {
            Ok((claim, keys)) => {
                let _slot = Slot(self.clone(), keys, now);
                return self.runner.one(&claim).await;
            }
            Err((outcome, batch)) => {
                self.spawn(batch);
                outcome
            }
        };
        loop {
            match tokio::time::timeout(STALL, &mut outcome).await {
                Ok(answer) => return answer.unwrap_or_else(|_| Err(lost(R::KIND))),
                // Every running statement may be stuck: open another slot if none has ended
                // meanwhile.
                Err(_) => {
                    let batch = self.widen(&mut self.lock(), Instant::now());
                    self.spawn(batch);
                }
            }
        }
    }

    /// A batch for another slot, if one may start now and the queue holds claims it may run.
    fn widen(&self, queue: &mut Queue<R::Job, R::Row>, now: Instant) -> Option<Started<R>> {
        if !queue.may_start(self.slots, self.widen_at, now) {
            return None;
        }
        let batch = take_batch(queue, self.max_batch);
        if batch.is_empty() {
            return None;
        }
        let claims: Vec<&R::Job> = batch.iter().map(|w| &w.job).collect();
        let keys = queue.start(&claims, now);
        Some((batch, keys, now))
    }

    /// A statement (its row keys, its start) has ended: its slot takes the next batch, or
    /// closes when nothing it may run waits or the other slots keep up.
    fn hand_on(self: &Arc<Self>, done: &[u64], started: Instant) {
        let batch = {
            let mut queue = self.lock();
            queue.end(done, started);
            self.widen(&mut queue, Instant::now())
        };
        self.spawn(batch);
    }

    /// Runs a started batch, if any, in a task of its own; call it without the queue's lock.
    fn spawn(self: &Arc<Self>, batch: Option<Started<R>>) {
        let Some((batch, keys, started)) = batch else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                let this = self.clone();
                runtime.spawn(async move {
                    let _slot = Slot(this.clone(), keys, started);
                    this.run(batch).await;
                });
            }
            // Only when the store is dropped outside a runtime: nobody is left to answer.
            Err(_) => {
                for waiter in batch {
                    let _ = waiter.reply.send(Err(lost(R::KIND)));
                }
                self.lock().end(&keys, started);
            }
        }
    }

    /// Runs a batch and answers each of its claims.
    async fn run(&self, mut batch: Vec<Waiter<R::Job, R::Row>>) {
        if batch.len() == 1 {
            let waiter = batch.remove(0);
            let _ = waiter.reply.send(self.runner.one(&waiter.job).await);
            return;
        }
        let claims: Vec<&R::Job> = batch.iter().map(|w| &w.job).collect();
        let outcome = self.runner.many(&claims).await;
        drop(claims);
        match outcome {
            Ok(rows) => {
                self.batches.fetch_add(1, Ordering::Relaxed);
                self.batched
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                for (waiter, row) in batch.into_iter().zip(rows) {
                    let _ = waiter.reply.send(Ok(row));
                }
            }
            Err(BatchError::Refused(error)) => {
                tracing::warn!(kind = R::KIND, jobs = batch.len(), %error, "batch refused; running its statements one by one");
                for waiter in batch {
                    let _ = waiter.reply.send(self.runner.one(&waiter.job).await);
                }
            }
            Err(BatchError::Failed(error)) => {
                let message = error.to_string();
                let mut first = Some(error);
                for waiter in batch {
                    let error = first.take().unwrap_or_else(|| {
                        StoreError::Unavailable(sqlx::Error::Protocol(format!(
                            "the {} batch failed: {message}",
                            R::KIND
                        )))
                    });
                    let _ = waiter.reply.send(Err(error));
                }
            }
        }
    }
}

/// A batch that counts as running: its waiters, their row keys, its start.
type Started<R> = (
    Vec<Waiter<<R as Runner>::Job, <R as Runner>::Row>>,
    Vec<u64>,
    Instant,
);

/// Holds a slot for claims of these row keys, since a start; dropping it (the claims answered,
/// cancelled or panicked) hands the slot on.
struct Slot<R: Runner>(Arc<Batcher<R>>, Vec<u64>, Instant);

impl<R: Runner> Drop for Slot<R> {
    fn drop(&mut self) {
        self.0.hand_on(&self.1, self.2);
    }
}

/// Claims [`take_batch`] looks at, at most, so a deep queue of one hot target costs bounded
/// work to pass over.
const LOOK_AHEAD: usize = 1024;

/// The queue's oldest claims that share no row with each other or with a running claim, up to
/// `max`; claims whose caller stopped waiting (a deadline, a hang-up) are dropped unrun.
fn take_batch<J: Job, T>(queue: &mut Queue<J, T>, max: usize) -> Vec<Waiter<J, T>> {
    let mut batch: Vec<Waiter<J, T>> = Vec::new();
    let mut i = 0;
    let mut looked = 0;
    while i < queue.waiting.len() && batch.len() < max && looked < LOOK_AHEAD {
        looked += 1;
        let claim = &queue.waiting[i].job;
        if queue.waiting[i].reply.is_closed() {
            queue.waiting.remove(i);
        } else if queue.is_busy(claim) || batch.iter().any(|b| b.job.overlaps(claim)) {
            i += 1;
        } else if let Some(waiter) = queue.waiting.remove(i) {
            batch.push(waiter);
        }
    }
    batch
}

/// The answer of a job (of kind `kind`) whose batch ended without answering it.
fn lost(kind: &str) -> StoreError {
    StoreError::Unavailable(sqlx::Error::Protocol(format!(
        "the {kind}'s batch ended without an outcome"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(target: &str, caller: Option<&str>) -> ClaimArgs {
        ClaimArgs {
            target: target.to_owned(),
            caller: caller.map(str::to_owned),
            key: None,
            ttl_us: 0,
            now_us: None,
            suites: None,
            target_interval_us: 1,
            target_window_us: 1,
            caller_interval_us: None,
            caller_window_us: None,
            pair_interval_us: None,
            pair_window_us: None,
        }
    }

    type Outcome = oneshot::Receiver<Result<(), StoreError>>;

    fn queue(claims: &[(&str, Option<&str>)]) -> (Queue<ClaimArgs, ()>, Vec<Outcome>) {
        let mut waiting = VecDeque::new();
        let mut outcomes = Vec::new();
        for &(target, caller) in claims {
            let (reply, outcome) = oneshot::channel();
            waiting.push_back(Waiter {
                job: claim(target, caller),
                reply,
            });
            outcomes.push(outcome);
        }
        let queue = Queue {
            started: Vec::new(),
            busy: Vec::new(),
            waiting,
        };
        (queue, outcomes)
    }

    fn targets<T>(waiters: &[Waiter<ClaimArgs, T>]) -> Vec<&str> {
        waiters.iter().map(|w| w.job.target.as_str()).collect()
    }

    #[test]
    fn a_batch_takes_the_oldest_claims_that_share_no_target_or_caller() {
        let (mut queue, _outcomes) = queue(&[
            ("a", Some("x")),
            ("a", Some("y")),
            ("b", Some("x")),
            ("c", None),
            ("d", None),
            ("e", Some("y")),
        ]);
        let batch = take_batch(&mut queue, 10);
        assert_eq!(targets(&batch), ["a", "c", "d", "e"]);
        // The rest keep their order for the next batch, which again takes what it can.
        assert_eq!(targets(queue.waiting.make_contiguous()), ["a", "b"]);
        let batch = take_batch(&mut queue, 10);
        assert_eq!(targets(&batch), ["a", "b"]);
        assert!(queue.waiting.is_empty());
    }

    #[test]
    fn a_batch_stops_at_its_size_and_skips_claims_nobody_waits_for() {
        let (mut queue, mut outcomes) =
            queue(&[("a", None), ("b", None), ("c", None), ("d", None)]);
        outcomes.remove(1);
        let batch = take_batch(&mut queue, 2);
        assert_eq!(targets(&batch), ["a", "c"]);
        assert_eq!(targets(queue.waiting.make_contiguous()), ["d"]);
    }

    #[test]
    fn claims_of_a_target_or_caller_already_running_wait_until_it_ends() {
        let (mut queue, _outcomes) = queue(&[("a", None), ("b", Some("x")), ("c", None)]);
        let running = [claim("a", None), claim("z", Some("x"))];
        let keys = queue.mark_busy(&[&running[0], &running[1]]);
        assert_eq!(targets(&take_batch(&mut queue, 10)), ["c"]);
        queue.mark_done(&keys);
        assert!(queue.busy.is_empty());
        assert_eq!(targets(&take_batch(&mut queue, 10)), ["a", "b"]);
    }

    #[test]
    fn another_slot_opens_only_while_the_running_statements_do_not_keep_up() {
        let (mut queue, _outcomes) = queue(&[("a", None), ("b", None), ("c", None)]);
        let t0 = Instant::now();
        let soon = t0 + STALL / 2;
        assert!(queue.may_start(2, 4, soon), "nothing runs: one starts");
        let z = queue.start(&[&claim("z", None)], t0);
        assert!(!queue.may_start(2, 4, soon), "one runs and keeps up");
        assert!(
            queue.may_start(2, 4, t0 + STALL),
            "the running one has run for STALL"
        );
        assert!(
            queue.may_start(2, 3, soon),
            "a batch's worth of claims waits"
        );
        queue.start(&[&claim("y", None)], soon);
        assert!(!queue.may_start(2, 1, t0 + STALL * 9), "every slot runs");
        assert!(
            !queue.may_start(3, 4, t0 + STALL),
            "the second has run for less than STALL"
        );
        assert!(
            queue.may_start(3, 4, soon + STALL),
            "both have run for STALL"
        );
        queue.end(&z, t0);
        assert_eq!(queue.started, [soon]);
        assert_eq!(queue.busy, [row_key(0, "y")], "z's row is free again");
        assert!(!queue.may_start(2, 4, t0 + STALL), "what is left keeps up");
    }

    #[test]
    fn a_queue_of_one_hot_target_is_passed_over_in_bounded_steps() {
        let mut claims = vec![("hot", None); LOOK_AHEAD + 10];
        claims.push(("cold", None));
        let (mut queue, _outcomes) = queue(&claims);
        let batch = take_batch(&mut queue, 4);
        // One hot claim, then hot ones looked at and left up to the bound; the cold one is
        // beyond it.
        assert_eq!(targets(&batch), ["hot"]);
        assert_eq!(queue.waiting.len(), LOOK_AHEAD + 10);
    }
}
