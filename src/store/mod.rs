//! Storage of key packages behind one domain-level trait, with an embedded SQLite and a Postgres
//! implementation; [`connect`] picks the backend from the database URL and applies migrations.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

pub use crate::key_package::Upload;
use crate::{
    key_package::{Fingerprint, IdempotencyKey, UserId},
    rate_limit::{Budget, Scope},
};

mod batch;
mod checkout;
#[cfg(any(test, feature = "conformance"))]
pub mod conformance;
mod deadline;
mod group_commit;
pub mod postgres;
pub mod sqlite;

/// A user's inventory as the status route reports it. Only servable packages count: expired
/// ones are neither counted nor digested.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Status {
    /// Servable regular packages currently held (at most 10).
    pub regular_count: u32,
    /// Whether a servable last-resort package is held.
    pub has_last_resort: bool,
    /// The user's current signing-key fingerprint, if one was ever sent.
    pub fingerprint: Option<Fingerprint>,
    /// Hand-outs of the current last-resort package since it was uploaded.
    pub last_resort_handouts: u64,
    /// Servable regular packages per cipher suite, ascending by suite; opaque ones under 0.
    pub cipher_suites: Vec<(u16, u32)>,
    /// The earliest `not_after` among servable regular packages; 0 if none is readable.
    pub next_expiry: u64,
    /// The servable last-resort package's `not_after`; 0 if none, or opaque.
    pub last_resort_not_after: u64,
    /// SHA-256 over the SHA-256 of each servable package's bytes, regular oldest first, then
    /// the last-resort one; empty when nothing servable is held.
    pub inventory_digest: Vec<u8>,
}

/// What an upload changed, for metrics; the caller's status after it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UploadOutcome {
    /// Packages actually stored (entries identical to held ones are skipped).
    pub stored: u32,
    /// Expired regular packages the upload removed.
    pub expired_removed: u64,
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
    /// The package's facts as read at upload; `None` for an opaque package.
    pub facts: Option<StoredFacts>,
}

impl std::fmt::Debug for Consumed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumed")
            .field("len", &self.key_package.len())
            .field("is_last_resort", &self.is_last_resort)
            .field("fingerprint", &self.fingerprint)
            .field("facts", &self.facts)
            .finish()
    }
}

/// The facts storage keeps beside a readable package, as the consume response carries them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredFacts {
    /// The package's cipher suite (never 0: suite 0 stands for "opaque" in storage).
    pub cipher_suite: u16,
    /// The leaf's `lifetime.not_after`, Unix seconds.
    pub not_after: u64,
    /// The KeyPackageRef; empty for suites whose hash the reader does not know.
    pub key_package_ref: Bytes,
}

/// One consumption request as storage sees it.
#[derive(Clone, Copy, Debug)]
pub struct Claim<'a> {
    /// Whose package is asked for.
    pub target: &'a UserId,
    /// The target's shared budget.
    pub budget: Budget,
    /// Who asks, with the caller's own budgets and key; `None`: only the target's budget.
    pub caller: Option<Caller<'a>>,
    /// The cipher suites the inviter accepts; empty: any package, opaque ones included.
    pub suites: &'a [u16],
    /// The clock in µs since the epoch for the budget and for expiry; `None` (the server's
    /// case) means the database's own clock, read once the target's budget is locked, which
    /// every process sharing the database agrees on.
    pub now_us: Option<i64>,
}

impl<'a> Claim<'a> {
    /// A claim for any package of `target`, by the database's clock, of nobody in particular.
    pub fn new(target: &'a UserId, budget: Budget) -> Self {
        Self {
            target,
            budget,
            caller: None,
            suites: &[],
            now_us: None,
        }
    }
}

/// The caller of a claim: its budgets, charged before the target's, and its idempotency key.
#[derive(Clone, Copy, Debug)]
pub struct Caller<'a> {
    /// The caller.
    pub id: &'a UserId,
    /// The caller's own budget over all targets; `None`: off.
    pub budget: Option<Budget>,
    /// The budget of this caller asking for this target; `None`: off.
    pub pair_budget: Option<Budget>,
    /// The claim's `Idempotency-Key` and how long its outcome is remembered.
    pub idempotency: Option<(&'a IdempotencyKey, Duration)>,
}

/// What a consumption did: its outcome, and the expired packages it removed on the way.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Consumption {
    /// What the client is told.
    pub outcome: ConsumeOutcome,
    /// Expired regular packages of the target that the consumption removed.
    pub expired_removed: u64,
}

/// The result of a consumption attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConsumeOutcome {
    /// A package was handed out.
    Consumed(Consumed),
    /// The target holds nothing that can be handed out at all.
    Empty,
    /// The target holds servable packages, but none of the requested cipher suites.
    Incompatible,
    /// A budget is spent (the first refusing stage: caller, pair or target); retry after
    /// this long. Stages after it were not charged.
    RateLimited {
        /// Time until the budget allows one more request.
        retry_after: Duration,
        /// The stage that refused.
        scope: Scope,
    },
    /// The caller's key was used for this target within its time to live: the package handed
    /// out then, again; nothing was consumed or charged.
    Replayed(Consumed),
    /// The caller's key was used for another target within its time to live; nothing charged.
    KeyReused,
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
    /// Converting the Postgres tables to partitions (`KPS_POSTGRES_PARTITIONS`) failed.
    #[error("partitioning the tables failed: {0}")]
    Partition(#[source] sqlx::Error),
    /// Applying the migrations failed.
    #[error("migrations failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// Reading the facts of packages an earlier version stored failed (the next start resumes).
    #[error("reading the facts of stored key packages failed: {0}")]
    Backfill(#[source] StoreError),
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
    /// Applies a validated upload for `user`: removes its expired regular packages, appends
    /// regular packages in order, skips packages byte-identical to held ones, replaces the
    /// last-resort package, records the fingerprint, and trims to the 10 newest regular
    /// packages, all in one transaction. `now_unix` decides what has expired.
    async fn upload(
        &self,
        user: &UserId,
        upload: &Upload,
        now_unix: i64,
    ) -> Result<UploadOutcome, StoreError>;

    /// Charges the target's shared budget, removes its expired regular packages, then hands out
    /// its oldest servable regular package of the claim's suites (removing it) or, when none
    /// is left, its last-resort package if that qualifies (counting the hand-out), atomically.
    async fn consume(&self, claim: &Claim<'_>) -> Result<Consumption, StoreError>;

    /// The user's status at `now_unix`; zeros for a user who never uploaded.
    async fn status(&self, user: &UserId, now_unix: i64) -> Result<Status, StoreError>;

    /// Reads the facts of at most `limit` packages stored by a version that did not read them
    /// (one transaction); returns how many it read. See [`backfill_facts`].
    async fn read_stored_facts(&self, limit: u32) -> Result<u64, StoreError>;

    /// Removes all of the user's packages, regular and last-resort; keeps the fingerprint.
    async fn delete_all(&self, user: &UserId) -> Result<(), StoreError>;

    /// The user's current fingerprint and the Unix time it last changed.
    async fn fingerprint(&self, user: &UserId) -> Result<Option<(Fingerprint, i64)>, StoreError>;

    /// Answers when the database is reachable.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Drops at most `limit` budget rows that have fully refilled at `now_us` (`None`: by the
    /// database's clock), which are equivalent to no state; returns how many it dropped.
    async fn prune_budgets(&self, now_us: Option<i64>, limit: u32) -> Result<u64, StoreError>;

    /// Drops at most `limit` idempotency records expired at `now_us` (`None`: by the
    /// database's clock); returns how many it dropped.
    async fn prune_replays(&self, now_us: Option<i64>, limit: u32) -> Result<u64, StoreError>;
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
    /// Postgres tables hash-partitioned by user into this many partitions each (the shape a
    /// distributed Postgres shards by; see `SCALING.md`); plain tables are converted at start.
    /// 0: plain tables, as they are.
    pub postgres_partitions: u16,
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
            postgres_partitions: 0,
        }
    }
}

/// Opens the store the URL names, applies its migrations and reads the facts of packages an
/// earlier version stored ([`backfill_facts`]). Every call on the store is bounded by
/// [`ConnectOptions::call_timeout`].
pub async fn connect(
    options: &ConnectOptions,
) -> Result<std::sync::Arc<dyn KeyPackageStore>, ConnectError> {
    use deadline::Deadline;
    let limit = options.call_timeout;
    let store: std::sync::Arc<dyn KeyPackageStore> = match Backend::from_url(&options.url)? {
        Backend::Postgres => std::sync::Arc::new(Deadline::new(
            postgres::PgStore::connect(options).await?,
            limit,
        )),
        Backend::Sqlite => std::sync::Arc::new(Deadline::new(
            sqlite::SqliteStore::connect(options).await?,
            limit,
        )),
    };
    let read = backfill_facts(store.as_ref(), BACKFILL_BATCH)
        .await
        .map_err(ConnectError::Backfill)?;
    if read > 0 {
        tracing::info!(
            packages = read,
            "read the facts of key packages stored by an earlier version"
        );
    }
    Ok(store)
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

/// Statements both backends issue word for word (each backend re-exports them beside its own).
pub mod common_sql {
    /// The user's status ([`StatusRow`](super::StatusRow): the user's row joined with each
    /// servable regular package, oldest first), inside or outside a transaction. $1 user, $2
    /// now as a `not_after` key.
    pub const STATUS: &str = "\
    SELECT u.fingerprint, u.last_resort_handouts, u.last_resort_digest, u.last_resort_not_after,
           k.digest, k.cipher_suite, k.not_after
    FROM users u
    LEFT JOIN key_packages k
        ON k.user_id = u.user_id AND (k.not_after IS NULL OR k.not_after > $2)
    WHERE u.user_id = $1
    ORDER BY k.seq";

    /// Records the facts read from a regular package. $1 user, $2 its `seq`, $3 suite, $4
    /// `not_after` key, $5 ref.
    pub const SET_FACTS: &str = "\
    UPDATE key_packages SET cipher_suite = $3, not_after = $4, key_package_ref = $5
    WHERE user_id = $1 AND seq = $2";

    /// Records the facts read from a last-resort package. $1 user, $2 suite, $3 `not_after` key,
    /// $4 ref.
    pub const SET_LAST_RESORT_FACTS: &str = "\
    UPDATE users SET last_resort_cipher_suite = $2, last_resort_not_after = $3, last_resort_ref = $4
    WHERE user_id = $1";
}

/// How many packages one backfill transaction reads (see [`backfill_facts`]).
pub const BACKFILL_BATCH: u32 = 500;

/// Reads the facts of every package stored by a version that did not read them, in
/// transactions of `batch` packages; returns how many it read. Each batch commits on its own
/// and marks what it read, so a crash loses at most one batch of work and the next start
/// resumes where this one stopped.
pub async fn backfill_facts(store: &dyn KeyPackageStore, batch: u32) -> Result<u64, StoreError> {
    let batch = batch.max(1);
    let mut total = 0;
    loop {
        let read = store.read_stored_facts(batch).await?;
        total += read;
        if read < u64::from(batch) {
            return Ok(total);
        }
    }
}

/// A `not_after` as storage keeps it: 8 big-endian bytes, which compare (bytewise, in both
/// databases) as the u64 does, for every u64 (a signed BIGINT cannot hold them all).
pub(crate) fn not_after_key(not_after: u64) -> [u8; 8] {
    not_after.to_be_bytes()
}

/// A duration in whole µs, saturating.
pub(crate) fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// A Unix time as a `not_after` key, for comparisons with stored lifetimes.
pub(crate) fn now_key(now_unix: i64) -> [u8; 8] {
    not_after_key(u64::try_from(now_unix).unwrap_or(0))
}

/// The inverse of [`not_after_key`]; anything but 8 bytes reads as `None`.
pub(crate) fn not_after_of(key: Option<&[u8]>) -> Option<u64> {
    key.and_then(|k| <[u8; 8]>::try_from(k).ok())
        .map(u64::from_be_bytes)
}

/// The fact columns of one package: suite (0 = opaque), `not_after` key and ref (NULL when
/// opaque or, for the ref, when the suite's hash is unknown).
pub(crate) struct FactColumns {
    pub(crate) cipher_suite: i32,
    pub(crate) not_after: Option<[u8; 8]>,
    pub(crate) key_package_ref: Option<Vec<u8>>,
}

impl FactColumns {
    /// The columns of a validated package.
    pub(crate) fn of(package: &crate::key_package::KeyPackage) -> Self {
        Self::from_read(package.facts())
    }

    /// The columns of bytes stored by an earlier version, read now.
    pub(crate) fn read(bytes: &[u8]) -> Self {
        Self::from_read(crate::mls_codec::read(bytes).ok().as_ref())
    }

    fn from_read(facts: Option<&crate::mls_codec::KeyPackageFacts>) -> Self {
        match facts {
            Some(f) => Self {
                cipher_suite: i32::from(f.cipher_suite),
                not_after: Some(not_after_key(f.not_after)),
                key_package_ref: f.key_package_ref.clone(),
            },
            None => Self {
                cipher_suite: 0,
                not_after: None,
                key_package_ref: None,
            },
        }
    }
}

/// One row of both backends' status query: the user's row joined with each servable regular
/// package, oldest first (package columns NULL when none is held).
#[derive(sqlx::FromRow)]
pub(crate) struct StatusRow {
    fingerprint: Option<String>,
    last_resort_handouts: i64,
    last_resort_digest: Option<Vec<u8>>,
    last_resort_not_after: Option<Vec<u8>>,
    digest: Option<Vec<u8>>,
    cipher_suite: Option<i32>,
    not_after: Option<Vec<u8>>,
}

/// The suite a stored `cipher_suite` column stands for in a status: 0 for opaque packages and
/// for packages an earlier version stored that are not read yet.
fn suite_of(column: Option<i32>) -> u16 {
    column.and_then(|s| u16::try_from(s).ok()).unwrap_or(0)
}

/// Builds a status from the rows of the status query, at `now_unix`.
pub(crate) fn build_status(rows: Vec<StatusRow>, now_unix: i64) -> Status {
    use sha2::{Digest, Sha256};
    let Some(user) = rows.first() else {
        return Status::default();
    };
    let now = u64::try_from(now_unix).unwrap_or(0);
    let last_resort_not_after = not_after_of(user.last_resort_not_after.as_deref());
    let last_resort = user
        .last_resort_digest
        .as_ref()
        .filter(|_| last_resort_not_after.is_none_or(|t| t > now));
    let held: Vec<&StatusRow> = rows.iter().filter(|r| r.digest.is_some()).collect();
    let mut suites = std::collections::BTreeMap::<u16, u32>::new();
    for row in &held {
        *suites.entry(suite_of(row.cipher_suite)).or_default() += 1;
    }
    let inventory_digest = if held.is_empty() && last_resort.is_none() {
        Vec::new()
    } else {
        let mut hasher = Sha256::new();
        for digest in held
            .iter()
            .filter_map(|r| r.digest.as_ref())
            .chain(last_resort)
        {
            hasher.update(digest);
        }
        hasher.finalize().to_vec()
    };
    Status {
        regular_count: held.len() as u32,
        has_last_resort: last_resort.is_some(),
        fingerprint: stored_fingerprint(user.fingerprint.clone()),
        last_resort_handouts: u64::try_from(user.last_resort_handouts).unwrap_or(0),
        cipher_suites: suites.into_iter().collect(),
        next_expiry: held
            .iter()
            .filter_map(|r| not_after_of(r.not_after.as_deref()))
            .min()
            .unwrap_or(0),
        last_resort_not_after: last_resort.and(last_resort_not_after).unwrap_or(0),
        inventory_digest,
    }
}

/// A handed-out package as both backends' consume queries return it.
#[derive(sqlx::FromRow)]
pub(crate) struct ConsumedRow {
    pub(crate) data: Vec<u8>,
    pub(crate) fingerprint: Option<String>,
    pub(crate) is_last_resort: bool,
    pub(crate) cipher_suite: Option<i32>,
    pub(crate) not_after: Option<Vec<u8>>,
    pub(crate) key_package_ref: Option<Vec<u8>>,
}

impl From<ConsumedRow> for Consumed {
    fn from(row: ConsumedRow) -> Self {
        let suite = suite_of(row.cipher_suite);
        let not_after = not_after_of(row.not_after.as_deref());
        Self {
            key_package: row.data.into(),
            is_last_resort: row.is_last_resort,
            fingerprint: stored_fingerprint(row.fingerprint),
            facts: match (suite, not_after) {
                (1.., Some(not_after)) => Some(StoredFacts {
                    cipher_suite: suite,
                    not_after,
                    key_package_ref: row.key_package_ref.unwrap_or_default().into(),
                }),
                _ => None,
            },
        }
    }
}

/// A package an earlier version stored without facts: where it is, and its bytes.
#[derive(sqlx::FromRow)]
pub(crate) struct UnreadRow {
    /// The regular package's `seq`, or NULL for a user's last-resort package.
    pub(crate) seq: Option<i64>,
    pub(crate) user_id: String,
    pub(crate) data: Vec<u8>,
}

/// A user's current fingerprint and when it changed, as both backends return it.
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
