//! Storage of key packages behind one domain-level trait, with an embedded SQLite and a Postgres
//! implementation; [`connect`] picks the backend from the database URL and applies migrations.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

pub use crate::key_package::Upload;
use crate::{
    key_package::{Fingerprint, UserId},
    rate_limit::Budget,
};

#[cfg(any(test, feature = "conformance"))]
pub mod conformance;
mod deadline;
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

/// What storage knows went wrong while serving a request.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be reached or did not answer in time: retry later (503).
    #[error("database unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    /// Any other database failure: a bug or a broken schema (500).
    #[error("database error: {0}")]
    Database(#[source] sqlx::Error),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        let transient = match &e {
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::WorkerCrashed => true,
            sqlx::Error::Database(db) => {
                postgres::is_transient(db.as_ref()) || sqlite::is_transient(db.as_ref())
            }
            _ => false,
        };
        if transient {
            Self::Unavailable(e)
        } else {
            Self::Database(e)
        }
    }
}

/// Why the store could not be opened at start-up.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The URL names no supported backend, or does not parse.
    #[error("{0}")]
    Url(String),
    /// The database did not answer, or refused the connection.
    #[error("cannot open the database: {0}")]
    Open(#[source] sqlx::Error),
    /// No answer within the acquire timeout.
    #[error("no answer from the database within {0:?}")]
    TimedOut(Duration),
    /// Another process kept the database's start-up lock, or it could not be taken.
    #[error("{0}")]
    Lock(String),
    /// Applying the migrations failed.
    #[error("migrations failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// The storage backends, as a database URL names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// `sqlite:…`: the embedded file.
    Sqlite,
    /// `postgres://…` or `postgresql://…`.
    Postgres,
}

impl Backend {
    /// The backend `url` names; anything else is a [`ConnectError::Url`].
    pub fn from_url(url: &str) -> Result<Self, ConnectError> {
        if url.starts_with("sqlite:") {
            Ok(Self::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Self::Postgres)
        } else {
            Err(ConnectError::Url(
                "must start with sqlite: or postgres://".into(),
            ))
        }
    }

    /// The backend's name, for logs.
    pub fn name(self) -> &'static str {
        match self {
            Self::Sqlite => "sqlite",
            Self::Postgres => "postgres",
        }
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
    ///
    /// `now_us` is the budget's clock in µs since the epoch; `None` (the server's case) means the
    /// database's own clock, read once the target's budget is locked, which every process
    /// sharing the database agrees on.
    async fn consume(
        &self,
        target: &UserId,
        budget: Budget,
        now_us: Option<i64>,
    ) -> Result<ConsumeOutcome, StoreError>;

    /// The user's status; zeros for a user who never uploaded.
    async fn status(&self, user: &UserId) -> Result<Status, StoreError>;

    /// Removes all of the user's packages, regular and last-resort; keeps the fingerprint.
    async fn delete_all(&self, user: &UserId) -> Result<(), StoreError>;

    /// The user's current fingerprint and the Unix time it last changed.
    async fn fingerprint(&self, user: &UserId) -> Result<Option<(Fingerprint, i64)>, StoreError>;

    /// Answers when the database is reachable.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Drops at most `limit` budget rows that have fully refilled at `now_us` (`None`: by the
    /// database's clock), which are equivalent to no state; returns how many it dropped.
    async fn prune_budgets(&self, now_us: Option<i64>, limit: u32) -> Result<u64, StoreError>;
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
    /// How SQLite syncs commits (ignored by Postgres).
    pub sqlite_synchronous: sqlite::Synchronous,
    /// Longest any one store call may take, waiting for a connection included; past it the
    /// call is abandoned as unavailable, even if the database never answers.
    pub call_timeout: Duration,
    /// Postgres behind PgBouncer in transaction pooling mode: unnamed statements only, every
    /// call inside a transaction that sets the timeouts itself, no startup `options`.
    pub pgbouncer: bool,
}

impl ConnectOptions {
    /// Defaults suited to a small machine: a pool of 16, 3-second bounds on waiting for a
    /// connection and on statements, and 5 seconds for a whole call.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            max_connections: 16,
            acquire_timeout: Duration::from_secs(3),
            statement_timeout: Duration::from_secs(3),
            sqlite_synchronous: sqlite::Synchronous::default(),
            call_timeout: Duration::from_secs(5),
            pgbouncer: false,
        }
    }
}

/// Opens the store the URL names and applies its migrations. Every call on the store is
/// bounded by [`ConnectOptions::call_timeout`].
pub async fn connect(
    options: &ConnectOptions,
) -> Result<std::sync::Arc<dyn KeyPackageStore>, ConnectError> {
    use deadline::Deadline;
    let limit = options.call_timeout;
    Ok(match Backend::from_url(&options.url)? {
        Backend::Postgres => std::sync::Arc::new(Deadline::new(
            postgres::PgStore::connect(options).await?,
            limit,
        )),
        Backend::Sqlite => std::sync::Arc::new(Deadline::new(
            sqlite::SqliteStore::connect(options).await?,
            limit,
        )),
    })
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
    pub(crate) fn new(
        upload: &'a Upload,
        held: &[Vec<u8>],
        held_last_resort: Option<&[u8]>,
    ) -> Self {
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
    pub(crate) fn stored(&self) -> u32 {
        (self.regular.len() + usize::from(self.last_resort.is_some())) as u32
    }
}

/// Parses a stored fingerprint column; an empty or malformed value reads as none.
pub(crate) fn stored_fingerprint(s: Option<String>) -> Option<Fingerprint> {
    s.and_then(|s| Fingerprint::parse(&s).ok())
}

/// A user's row as both backends' status queries return it.
#[derive(sqlx::FromRow)]
pub(crate) struct StatusRow {
    regular_count: i64,
    has_last_resort: bool,
    fingerprint: Option<String>,
    last_resort_handouts: i64,
}

impl From<StatusRow> for Status {
    fn from(row: StatusRow) -> Self {
        Self {
            regular_count: u32::try_from(row.regular_count).unwrap_or(u32::MAX),
            has_last_resort: row.has_last_resort,
            fingerprint: stored_fingerprint(row.fingerprint),
            last_resort_handouts: u64::try_from(row.last_resort_handouts).unwrap_or(0),
        }
    }
}

/// A handed-out package as both backends' consume queries return it.
#[derive(sqlx::FromRow)]
pub(crate) struct ConsumedRow {
    data: Vec<u8>,
    fingerprint: Option<String>,
    is_last_resort: bool,
}

impl From<ConsumedRow> for Consumed {
    fn from(row: ConsumedRow) -> Self {
        Self {
            key_package: row.data.into(),
            is_last_resort: row.is_last_resort,
            fingerprint: stored_fingerprint(row.fingerprint),
        }
    }
}

/// A user's current fingerprint and when it last changed, as both backends return it.
#[derive(sqlx::FromRow)]
pub(crate) struct FingerprintRow {
    fingerprint: Option<String>,
    fingerprint_updated_at: Option<i64>,
}

impl FingerprintRow {
    /// The fingerprint and its Unix time, or `None` if the user never sent one.
    pub(crate) fn into_pair(self) -> Option<(Fingerprint, i64)> {
        Some((
            stored_fingerprint(self.fingerprint)?,
            self.fingerprint_updated_at.unwrap_or(0),
        ))
    }
}
