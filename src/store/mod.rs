//! Storage of key packages behind one domain-level trait, with an embedded SQLite and a Postgres
//! implementation. `connect` picks the backend from the database URL and applies migrations.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

pub use crate::key_package::Upload;
use crate::key_package::{Fingerprint, UserId};

pub mod conformance;
pub mod postgres;
pub mod sqlite;

/// A user's inventory as the status route reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Status {
    /// Regular packages currently held (at most 10).
    pub regular_count: u32,
    /// Whether a last-resort package is held.
    pub has_last_resort: bool,
    /// The user's current signing-key fingerprint, if one was ever sent.
    pub fingerprint: Option<Fingerprint>,
    /// Hand-outs of the current last-resort package since it was uploaded.
    pub last_resort_handouts: u64,
}

/// What an upload changed, for metrics; the caller's status after it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UploadOutcome {
    /// Packages actually stored (entries identical to held ones are skipped).
    pub stored: u32,
    /// The uploader's status after the upload.
    pub status: Status,
}

/// One handed-out key package.
#[derive(Clone, PartialEq, Eq)]
pub struct Consumed {
    /// The serialized MLSMessage.
    pub key_package: Bytes,
    /// True when this is the reusable last-resort package (which stays stored).
    pub is_last_resort: bool,
    /// The fingerprint recorded when the package was uploaded.
    pub fingerprint: Option<Fingerprint>,
}

impl std::fmt::Debug for Consumed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumed")
            .field("len", &self.key_package.len())
            .field("is_last_resort", &self.is_last_resort)
            .field("fingerprint", &self.fingerprint)
            .finish()
    }
}

/// The result of a consumption attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConsumeOutcome {
    /// A package was handed out.
    Consumed(Consumed),
    /// The target holds neither a regular nor a last-resort package.
    Empty,
    /// The target's shared consumption budget is spent; retry after this long.
    RateLimited {
        /// Time until the budget allows one more request.
        retry_after: Duration,
    },
}

/// The per-target consumption budget shared by every process on one database: a GCRA bucket
/// of `burst` requests refilling one every `interval`.
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

/// What storage knows went wrong.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be reached or did not answer in time.
    #[error("database unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    /// Any other database failure (a bug or a broken schema).
    #[error("database error: {0}")]
    Database(#[source] sqlx::Error),
    /// The configured URL or options are unusable.
    #[error("{0}")]
    Config(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::WorkerCrashed => Self::Unavailable(e),
            sqlx::Error::Database(db) if is_unavailable_code(db.code().as_deref()) => {
                Self::Unavailable(e)
            }
            _ => Self::Database(e),
        }
    }
}

/// Postgres SQLSTATEs that mean "not now" rather than "wrong": connection failures, shutdown,
/// statement and lock timeouts, sessions ended for idling in a transaction, deadlocks, and
/// SQLite's busy/locked codes.
fn is_unavailable_code(code: Option<&str>) -> bool {
    match code {
        Some(c) => {
            c.starts_with("08")
                || c.starts_with("57P")
                || c == "57014"
                || c == "53300"
                || c == "55P03"
                || c == "25P03"
                || c == "40P01"
                || c == "5"
                || c == "6"
                || c == "517"
                || c == "261"
        }
        None => false,
    }
}

/// The store's domain operations. Every method is atomic: it applies whole or not at all.
#[async_trait]
pub trait KeyPackageStore: Send + Sync + 'static {
    /// Applies a validated upload for `user`: appends regular packages in order, skips packages
    /// byte-identical to held ones, replaces the last-resort package, records the fingerprint,
    /// and trims to the 10 newest regular packages, all in one transaction.
    async fn upload(
        &self,
        user: &UserId,
        upload: &Upload,
        now_unix: i64,
    ) -> Result<UploadOutcome, StoreError>;

    /// Charges `target`'s shared budget, then hands out its oldest regular package (removing it)
    /// or, when none is left, its last-resort package (counting the hand-out), atomically.
    async fn consume(
        &self,
        target: &UserId,
        budget: Budget,
        now_ms: i64,
    ) -> Result<ConsumeOutcome, StoreError>;

    /// The user's status; zeros for a user who never uploaded.
    async fn status(&self, user: &UserId) -> Result<Status, StoreError>;

    /// Removes all of the user's packages, regular and last-resort; keeps the fingerprint.
    async fn delete_all(&self, user: &UserId) -> Result<(), StoreError>;

    /// The user's current fingerprint and the Unix time it last changed.
    async fn fingerprint(&self, user: &UserId) -> Result<Option<(Fingerprint, i64)>, StoreError>;

    /// Answers when the database is reachable.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Drops budget state that has fully refilled (it is equivalent to no state), so the table
    /// stays as small as the set of recently consumed targets.
    async fn prune_budgets(&self, now_ms: i64) -> Result<u64, StoreError>;
}

/// Connection settings common to both backends.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    /// `sqlite://…` or `postgres://…`.
    pub url: String,
    /// Upper bound on pooled connections (Postgres) or readers (SQLite).
    pub max_connections: u32,
    /// How long a request may wait for a connection before it is told the database is away.
    pub acquire_timeout: Duration,
    /// Server-side statement timeout (Postgres) / busy timeout (SQLite).
    pub statement_timeout: Duration,
}

impl ConnectOptions {
    /// Defaults suited to a small machine: a pool of 16 and 3-second bounds.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            max_connections: 16,
            acquire_timeout: Duration::from_secs(3),
            statement_timeout: Duration::from_secs(3),
        }
    }
}

/// Opens the store the URL names and applies its migrations.
pub async fn connect(
    options: &ConnectOptions,
) -> Result<std::sync::Arc<dyn KeyPackageStore>, StoreError> {
    let url = options.url.as_str();
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(std::sync::Arc::new(
            postgres::PgStore::connect(options).await?,
        ))
    } else if url.starts_with("sqlite:") {
        Ok(std::sync::Arc::new(
            sqlite::SqliteStore::connect(options).await?,
        ))
    } else {
        Err(StoreError::Config(
            "DATABASE_URL must start with sqlite: or postgres://".into(),
        ))
    }
}

/// What an upload must write, given the digests the user holds when the upload starts.
///
/// Entries identical to held packages are skipped; of the remaining regular entries only the
/// newest 10 can survive the cap, so older ones are never written at all.
pub(crate) struct UploadPlan<'a> {
    /// Regular packages to append, oldest first.
    pub regular: Vec<&'a crate::key_package::KeyPackage>,
    /// The last-resort package to store in place of the current one.
    pub last_resort: Option<&'a crate::key_package::KeyPackage>,
}

impl<'a> UploadPlan<'a> {
    /// Plans `upload` against the held regular digests and the held last-resort digest.
    pub fn new(upload: &'a Upload, held: &[Vec<u8>], held_last_resort: Option<&[u8]>) -> Self {
        let is_held = |digest: &[u8; 32]| {
            held.iter().any(|h| h.as_slice() == digest)
                || held_last_resort == Some(digest.as_slice())
        };
        let mut regular: Vec<_> = upload
            .regular
            .iter()
            .filter(|p| !is_held(p.digest()))
            .collect();
        let excess = regular
            .len()
            .saturating_sub(crate::key_package::MAX_REGULAR_PACKAGES);
        regular.drain(..excess);
        let last_resort = upload.last_resort.as_ref().filter(|p| !is_held(p.digest()));
        Self {
            regular,
            last_resort,
        }
    }

    /// Packages this plan stores.
    pub fn stored(&self) -> u32 {
        (self.regular.len() + usize::from(self.last_resort.is_some())) as u32
    }
}

/// Parses a stored fingerprint column; an empty or malformed value reads as none.
pub(crate) fn stored_fingerprint(s: Option<String>) -> Option<Fingerprint> {
    s.and_then(|s| Fingerprint::parse(&s).ok())
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
}
