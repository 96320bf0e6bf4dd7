//! The embedded backend: one SQLite file in WAL mode.
//!
//! SQLite allows one writer at a time, so every write goes through a single pooled connection
//! (several writers would only wait on each other's locks); reads use a separate small pool.
//! Write transactions start with `BEGIN IMMEDIATE`: they take the write lock up front, so a
//! second process on the same file waits for it (busy timeout) instead of failing mid-way.

use std::str::FromStr;

use async_trait::async_trait;
use sqlx::{
    error::DatabaseError,
    migrate::Migrator,
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous},
    Connection, Sqlite, SqliteConnection,
};

use super::{
    build_status,
    checkout::{Checkout, Lease},
    group_commit::GroupCommit,
    micros, now_key, Claim, ConnectError, ConnectOptions, ConsumeOutcome, ConsumedRow, Consumption,
    FactColumns, FingerprintRow, KeyPackageStore, Status, StatusRow, StoreError, UnreadRow, Upload,
    UploadOutcome, UploadPlan,
};
use crate::{
    clock,
    key_package::{Fingerprint, UserId, MAX_REGULAR_PACKAGES},
    rate_limit::{Budget, Scope},
};

/// The SQLite schema, applied at start by [`SqliteStore::connect`].
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations/sqlite");

/// SQLite primary result codes that mean "not now": another connection or process holds the
/// lock. Extended codes (`SQLITE_BUSY_SNAPSHOT`, …) carry the primary code in their low byte.
mod code {
    /// `SQLITE_BUSY`.
    pub(super) const BUSY: i32 = 5;
    /// `SQLITE_LOCKED`.
    pub(super) const LOCKED: i32 = 6;
}

/// Whether an SQLite error means the database is busy for now (see [`code`]).
pub(super) fn is_transient(error: &dyn DatabaseError) -> bool {
    let Some(error) = error.try_downcast_ref::<sqlx::sqlite::SqliteError>() else {
        return false;
    };
    error
        .code()
        .and_then(|c| c.parse::<i32>().ok())
        .is_some_and(|c| matches!(c & 0xff, code::BUSY | code::LOCKED))
}

/// Creates the user's row if it is new (inside the write transaction). $1 user.
pub const CREATE_USER: &str = "INSERT INTO users (user_id) VALUES ($1) ON CONFLICT DO NOTHING";

/// The digest of the held last-resort package. $1 user.
pub const HELD_LAST_RESORT: &str = "SELECT last_resort_digest FROM users WHERE user_id = $1";

/// Digests of the user's regular packages. $1 user.
pub const HELD_DIGESTS: &str = "SELECT digest FROM key_packages WHERE user_id = $1";

/// Removes the user's expired regular packages. $1 user, $2 now as a `not_after` key.
pub const DROP_EXPIRED: &str = "DELETE FROM key_packages WHERE user_id = $1 AND not_after <= $2";

/// Records a new fingerprint, stamping the time only when the value changes.
/// $1 user, $2 fingerprint, $3 now (Unix seconds).
pub const SET_FINGERPRINT: &str = "\
UPDATE users SET fingerprint = $2, fingerprint_updated_at = $3
WHERE user_id = $1 AND fingerprint IS NOT $2";

/// Appends one regular package; the rowid grows with upload order (FIFO).
/// $1 user, $2 digest, $3 bytes, $4 fingerprint ('' for none), $5 suite, $6 `not_after` key,
/// $7 ref.
pub const INSERT_PACKAGE: &str = "\
INSERT INTO key_packages
    (user_id, digest, data, fingerprint, cipher_suite, not_after, key_package_ref)
VALUES ($1, $2, $3, $4, $5, $6, $7)";

/// Replaces the last-resort package and resets its hand-out count.
/// $1 user, $2 bytes, $3 digest, $4 fingerprint ('' for none), $5 suite, $6 `not_after` key,
/// $7 ref.
pub const REPLACE_LAST_RESORT: &str = "\
UPDATE users SET last_resort = $2, last_resort_digest = $3, last_resort_fingerprint = $4,
    last_resort_handouts = 0, last_resort_cipher_suite = $5, last_resort_not_after = $6,
    last_resort_ref = $7
WHERE user_id = $1";

/// Keeps the user's `$2` newest regular packages. $1 user, $2 how many.
pub const TRIM: &str = "\
DELETE FROM key_packages WHERE user_id = $1 AND seq NOT IN
    (SELECT seq FROM key_packages WHERE user_id = $1 ORDER BY seq DESC LIMIT $2)";

/// A budget's stored state (GCRA `tat`, µs). $1 scope (0 target, 1 caller, 2 pair), $2 subject.
pub const BUDGET_TAT: &str = "SELECT tat_us FROM consume_budgets WHERE scope = $1 AND subject = $2";

/// Stores a budget's new state. $1 scope, $2 subject, $3 new `tat` (µs).
pub const CHARGE_BUDGET: &str = "\
INSERT INTO consume_budgets (scope, subject, tat_us) VALUES ($1, $2, $3)
ON CONFLICT (scope, subject) DO UPDATE SET tat_us = excluded.tat_us";

/// The unexpired record of the caller's key ([`ReplayRow`]). $1 caller, $2 key, $3 now (µs).
pub const REPLAY: &str = "\
SELECT target, data, fingerprint, is_last_resort, cipher_suite, not_after, key_package_ref
FROM claim_replays WHERE caller = $1 AND idem_key = $2 AND expires_us > $3";

/// Remembers what a claim with a key handed out, replacing an expired record of the key.
/// $1 caller, $2 key, $3 target, $4 expiry (µs), then the package: $5 bytes, $6 fingerprint,
/// $7 last-resort flag, $8 suite, $9 `not_after` key, $10 ref.
pub const REMEMBER: &str = "\
INSERT OR REPLACE INTO claim_replays (caller, idem_key, target, expires_us, data, fingerprint,
    is_last_resort, cipher_suite, not_after, key_package_ref)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)";

/// Removes and returns the target's oldest regular package of the accepted suites
/// ([`ConsumedRow`]), once [`DROP_EXPIRED`] has run. $1 target, $2 the suites as a JSON array,
/// or NULL for any package. A range scan of `key_packages_user_fifo` over the target's rows,
/// which uploads keep at 10 at most.
pub const TAKE_OLDEST: &str = "\
DELETE FROM key_packages WHERE seq =
    (SELECT seq FROM key_packages WHERE user_id = $1
       AND ($2 IS NULL OR cipher_suite IN (SELECT value FROM json_each($2)))
     ORDER BY seq LIMIT 1)
RETURNING data, fingerprint, false AS is_last_resort, cipher_suite, not_after, key_package_ref";

/// Counts a hand-out of the last-resort package, if it has not expired and is of an accepted
/// suite, and returns it ([`ConsumedRow`]). $1 target, $2 suites as for [`TAKE_OLDEST`], $3 now
/// as a `not_after` key.
pub const HAND_OUT_LAST_RESORT: &str = "\
UPDATE users SET last_resort_handouts = last_resort_handouts + 1
WHERE user_id = $1 AND last_resort IS NOT NULL
  AND (last_resort_not_after IS NULL OR last_resort_not_after > $3)
  AND ($2 IS NULL OR last_resort_cipher_suite IN (SELECT value FROM json_each($2)))
RETURNING last_resort AS data, last_resort_fingerprint AS fingerprint, true AS is_last_resort,
    last_resort_cipher_suite AS cipher_suite, last_resort_not_after AS not_after,
    last_resort_ref AS key_package_ref";

/// Whether the target holds anything servable, once [`DROP_EXPIRED`] has run. $1 target, $2 now
/// as a `not_after` key.
pub const SERVABLE: &str = "\
SELECT EXISTS (SELECT 1 FROM key_packages WHERE user_id = $1)
    OR EXISTS (SELECT 1 FROM users WHERE user_id = $1 AND last_resort IS NOT NULL
               AND (last_resort_not_after IS NULL OR last_resort_not_after > $2))";

/// Up to `$1` regular packages stored by an earlier version that did not read facts
/// ([`UnreadRow`]).
pub const UNREAD_REGULAR: &str = "\
SELECT seq, user_id, data FROM key_packages WHERE cipher_suite IS NULL ORDER BY seq LIMIT $1";

/// Up to `$1` last-resort packages stored by an earlier version that did not read facts
/// ([`UnreadRow`]).
pub const UNREAD_LAST_RESORT: &str = "\
SELECT NULL AS seq, user_id, last_resort AS data FROM users
WHERE last_resort IS NOT NULL AND last_resort_cipher_suite IS NULL LIMIT $1";

/// Drops every regular package of the user. $1 user.
pub const DELETE_REGULAR: &str = "DELETE FROM key_packages WHERE user_id = $1";

/// Drops the user's last-resort package. $1 user.
pub const DELETE_LAST_RESORT: &str = "\
UPDATE users SET last_resort = NULL, last_resort_digest = NULL, last_resort_fingerprint = '',
    last_resort_handouts = 0
WHERE user_id = $1";

/// The user's fingerprint and when it changed ([`FingerprintRow`]). $1 user.
pub const FINGERPRINT: &str =
    "SELECT fingerprint, fingerprint_updated_at FROM users WHERE user_id = $1";

/// Drops at most `$2` budget rows that have fully refilled by `$1` (µs).
pub const PRUNE_BUDGETS: &str = "\
DELETE FROM consume_budgets WHERE (scope, subject) IN
    (SELECT scope, subject FROM consume_budgets WHERE tat_us <= $1 LIMIT $2)";

/// Drops at most `$2` idempotency records expired by `$1` (µs).
pub const PRUNE_REPLAYS: &str = "\
DELETE FROM claim_replays WHERE (caller, idem_key) IN
    (SELECT caller, idem_key FROM claim_replays WHERE expires_us <= $1 LIMIT $2)";

pub use super::common_sql::{SET_FACTS, SET_LAST_RESORT_FACTS, STATUS};

/// How SQLite syncs commits to disk (`KPS_SQLITE_SYNCHRONOUS`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Synchronous {
    /// Every commit is on disk before it is acknowledged (the default).
    #[default]
    Full,
    /// Commits since the last WAL sync may be lost on power loss (not on a process crash).
    Normal,
}

/// Key packages in an SQLite database file.
pub struct SqliteStore {
    /// The one writing connection, whose calls commit in groups.
    writer: GroupCommit,
    /// Read-only connections for requests.
    reader: Checkout<Sqlite>,
    /// A read-only connection of the readiness probe's own, so that it never waits behind
    /// request traffic.
    probe: sqlx::SqlitePool,
    /// Dropped with the store, which ends [`checkpoint_wal`].
    _stop_checkpoints: tokio::sync::oneshot::Sender<()>,
}

/// How often [`checkpoint_wal`] copies the write-ahead log into the database file. At a few
/// thousand writes per second the log holds a few megabytes between checkpoints.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// Checkpoints the write-ahead log every [`CHECKPOINT_EVERY`] on `conn`, a connection of its
/// own, until `stop` resolves (the store was dropped). A passive checkpoint takes no lock that
/// requests wait for: it copies the committed pages to the database file and syncs it beside
/// the writer, and the writer starts the log over at its next commit once everything in it is
/// copied. So the page copies and the database file's fsync leave the request path (the
/// writer runs with `wal_autocheckpoint = 0`). A log that grew long anyway is emptied by a
/// truncating checkpoint ([`checkpoint`]).
async fn checkpoint_wal(mut conn: SqliteConnection, mut stop: tokio::sync::oneshot::Receiver<()>) {
    let mut every = tokio::time::interval(CHECKPOINT_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = every.tick() => {}
        }
        if let Err(e) = checkpoint(&mut conn).await {
            tracing::warn!(error = %e, "checkpoint of the SQLite write-ahead log failed");
        }
    }
    let _ = conn.close().await;
}

/// The write-ahead log's length, in frames, beyond which [`checkpoint`] starts it over. Under
/// sustained writes the log is never found fully copied with no reader on it, so the writer
/// never starts it over by itself: the file grew by gigabytes in a long benchmark run, and its
/// index, mapped by every connection, with it. 8 192 frames are 32 MiB of 4 KiB pages.
pub(crate) const WAL_RESTART_FRAMES: i64 = 8_192;

/// One passive checkpoint, then, once the log holds [`WAL_RESTART_FRAMES`] or more, a
/// truncating one, which waits (up to the busy timeout) for the readers and the writer in
/// flight, holds new writers back meanwhile, and empties the file. Through sqlx's boxed
/// executor futures (the generic `execute` futures are not provably `Send` inside
/// `tokio::spawn`).
pub(crate) async fn checkpoint(conn: &mut SqliteConnection) -> Result<(), sqlx::Error> {
    use sqlx::{Executor, Row};
    let passive = conn.fetch_one("PRAGMA wal_checkpoint(PASSIVE)").await?;
    let frames: i64 = passive.try_get(1)?;
    if frames >= WAL_RESTART_FRAMES {
        let started = std::time::Instant::now();
        let truncated = conn.fetch_one("PRAGMA wal_checkpoint(TRUNCATE)").await?;
        let busy: i64 = truncated.try_get(0)?;
        let took_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        if busy != 0 {
            tracing::debug!(
                frames,
                took_ms,
                "write-ahead log busy, truncating it at a later checkpoint"
            );
        } else {
            tracing::debug!(frames, took_ms, "write-ahead log truncated");
        }
    }
    Ok(())
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens (creating if missing) the database and applies the SQLite migrations.
    ///
    /// Processes starting at once on one file take turns: switching a new file to WAL needs an
    /// exclusive lock that SQLite does not wait for (the busy timeout does not apply), and sqlx's
    /// SQLite migrator takes no lock, so both would apply the migrations. A lock on the database's
    /// directory serialises opening and migrating; a busy open or migration (another program on
    /// the file) is retried until the busy timeout has passed.
    pub async fn connect(options: &ConnectOptions) -> Result<Self, ConnectError> {
        use std::time::Duration;
        use tokio::time::Instant;

        let base = SqliteConnectOptions::from_str(&options.url)
            .map_err(|e| ConnectError::Url(e.to_string()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL syncs the WAL at every commit: a hand-out answered 200 survives a power cut,
            // so no package is ever handed out twice. NORMAL (an opt-out) may lose the last
            // commits on power loss, though it never corrupts the file.
            .synchronous(match options.sqlite_synchronous {
                Synchronous::Full => SqliteSynchronous::Full,
                Synchronous::Normal => SqliteSynchronous::Normal,
            })
            .busy_timeout(options.statement_timeout)
            .pragma("temp_store", "memory");
        let is_busy = |e: &sqlx::Error| e.as_database_error().is_some_and(is_transient);
        const RETRY_PAUSE: Duration = Duration::from_millis(10);

        // In-memory databases (`sqlite::memory:`, `mode=memory`) have no file to share.
        let filename = base.get_filename();
        let in_memory = options.url.contains(":memory:")
            || options.url.contains("mode=memory")
            || filename.to_string_lossy().starts_with("file:");
        // The directory, not a lock file: nothing is left beside the database.
        let lock_dir = (cfg!(unix) && !in_memory).then(|| {
            filename
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(std::path::Path::new("."))
                .to_owned()
        });
        // Held until the end of this function; closing the handle releases the lock.
        let _lock = match &lock_dir {
            Some(dir) => {
                let handle = std::fs::File::open(dir).map_err(|e| {
                    ConnectError::Lock(format!("cannot open {}: {e}", dir.display()))
                })?;
                // Long enough for another process's migrations; never forever.
                let deadline =
                    Instant::now() + options.statement_timeout.max(Duration::from_secs(30));
                loop {
                    match handle.try_lock() {
                        Ok(()) => break,
                        Err(std::fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                            tokio::time::sleep(RETRY_PAUSE).await;
                        }
                        Err(std::fs::TryLockError::WouldBlock) => {
                            return Err(ConnectError::Lock(format!(
                                "another process holds the lock on {} too long",
                                dir.display()
                            )));
                        }
                        Err(std::fs::TryLockError::Error(e)) => {
                            return Err(ConnectError::Lock(format!(
                                "cannot lock {}: {e}",
                                dir.display()
                            )));
                        }
                    }
                }
                Some(handle)
            }
            None => None,
        };

        let deadline = Instant::now() + options.statement_timeout;
        // A file's checkpoints run on a connection of their own (see [`checkpoint_wal`]), not
        // inside whichever request's commit crosses SQLite's automatic threshold.
        let writing = if in_memory {
            base.clone()
        } else {
            base.clone().pragma("wal_autocheckpoint", "0")
        };
        let writer = loop {
            let opened = SqlitePoolOptions::new()
                .max_connections(1)
                .acquire_timeout(options.acquire_timeout)
                .connect_with(writing.clone())
                .await;
            match opened {
                Ok(pool) => break pool,
                Err(e) if is_busy(&e) && Instant::now() < deadline => {
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                Err(e) => return Err(ConnectError::Open(e)),
            }
        };
        loop {
            match MIGRATOR.run(&writer).await {
                Ok(()) => break,
                Err(sqlx::migrate::MigrateError::Execute(e))
                    if is_busy(&e) && Instant::now() < deadline =>
                {
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
        // The writer's one connection leaves the pool it was opened with, for good.
        let writer = writer.acquire().await.map_err(ConnectError::Open)?.detach();
        let readers = options.max_connections.clamp(1, 8);
        let reader = SqlitePoolOptions::new()
            .max_connections(readers)
            .acquire_timeout(options.acquire_timeout)
            .connect_with(base.clone().read_only(true))
            .await
            .map_err(ConnectError::Open)?;
        let probe = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(options.acquire_timeout)
            .connect_with(base.clone().read_only(true))
            .await
            .map_err(ConnectError::Open)?;
        let (stop_checkpoints, stopped) = tokio::sync::oneshot::channel();
        if !in_memory {
            // sqlx would log every truncating checkpoint of a large file as a WARN "slow
            // statement"; `checkpoint` logs what it did itself.
            let quiet = sqlx::ConnectOptions::disable_statement_logging(base.clone());
            let conn = SqliteConnection::connect_with(&quiet)
                .await
                .map_err(ConnectError::Open)?;
            tokio::spawn(checkpoint_wal(conn, stopped));
        }
        Ok(Self {
            writer: GroupCommit::new(writer),
            reader: Checkout::new(reader, readers, options.acquire_timeout),
            probe,
            _stop_checkpoints: stop_checkpoints,
        })
    }

    /// A connection lent by `checkout`, given back with [`Lease::release`] once the call
    /// ended cleanly; failing to get one means the database is unavailable.
    async fn acquire(checkout: &Checkout<Sqlite>) -> Result<Lease<'_, Sqlite>, StoreError> {
        checkout.lease().await.map_err(StoreError::Unavailable)
    }
}

#[async_trait]
impl KeyPackageStore for SqliteStore {
    async fn upload(
        &self,
        user: &UserId,
        upload: &Upload,
        now_unix: i64,
    ) -> Result<UploadOutcome, StoreError> {
        let mut tx = self.writer.turn().await?;
        sqlx::query(CREATE_USER)
            .bind(user.as_str())
            .execute(&mut *tx)
            .await?;
        let held_last_resort: Option<Vec<u8>> = sqlx::query_scalar(HELD_LAST_RESORT)
            .bind(user.as_str())
            .fetch_one(&mut *tx)
            .await?;
        let expired = sqlx::query(DROP_EXPIRED)
            .bind(user.as_str())
            .bind(now_key(now_unix).as_slice())
            .execute(&mut *tx)
            .await?
            .rows_affected();
        let held: Vec<Vec<u8>> = sqlx::query_scalar(HELD_DIGESTS)
            .bind(user.as_str())
            .fetch_all(&mut *tx)
            .await?;
        let plan = UploadPlan::new(upload, &held, held_last_resort.as_deref());
        let fingerprint = upload.fingerprint.as_ref().map_or("", Fingerprint::as_str);

        if let Some(fp) = &upload.fingerprint {
            sqlx::query(SET_FINGERPRINT)
                .bind(user.as_str())
                .bind(fp.as_str())
                .bind(now_unix)
                .execute(&mut *tx)
                .await?;
        }
        for package in &plan.regular {
            let facts = FactColumns::of(package);
            sqlx::query(INSERT_PACKAGE)
                .bind(user.as_str())
                .bind(package.digest().as_slice())
                .bind(package.bytes().as_ref())
                .bind(fingerprint)
                .bind(facts.cipher_suite)
                .bind(facts.not_after.map(Vec::from))
                .bind(facts.key_package_ref)
                .execute(&mut *tx)
                .await?;
        }
        if let Some(package) = plan.last_resort {
            let facts = FactColumns::of(package);
            sqlx::query(REPLACE_LAST_RESORT)
                .bind(user.as_str())
                .bind(package.bytes().as_ref())
                .bind(package.digest().as_slice())
                .bind(fingerprint)
                .bind(facts.cipher_suite)
                .bind(facts.not_after.map(Vec::from))
                .bind(facts.key_package_ref)
                .execute(&mut *tx)
                .await?;
        }
        if !plan.regular.is_empty() {
            sqlx::query(TRIM)
                .bind(user.as_str())
                .bind(MAX_REGULAR_PACKAGES as i64)
                .execute(&mut *tx)
                .await?;
        }
        let status = status_in(&mut tx, user, now_unix).await?;
        tx.commit().await?;
        Ok(UploadOutcome {
            stored: plan.stored(),
            expired_removed: expired,
            status,
        })
    }

    async fn consume(&self, claim: &Claim<'_>) -> Result<Consumption, StoreError> {
        let target = claim.target;
        let suites = (!claim.suites.is_empty())
            .then(|| serde_json::to_string(claim.suites).expect("a list of numbers"));
        let caller = claim.caller.as_ref();
        let key = caller.and_then(|c| c.idempotency.map(|(k, ttl)| (c.id, k, ttl)));
        let mut tx = self.writer.turn().await?;
        // Read under the write lock, so requests that waited for it are judged by when they
        // got it, in the order they got it.
        let now_us = claim.now_us.unwrap_or_else(clock::unix_micros);
        let now = now_key(now_us.div_euclid(1_000_000));
        let untouched = |outcome| Consumption {
            outcome,
            expired_removed: 0,
        };

        if let Some((caller, key, _)) = key {
            let replay: Option<ReplayRow> = sqlx::query_as(REPLAY)
                .bind(caller.as_str())
                .bind(key.as_str())
                .bind(now_us)
                .fetch_optional(&mut *tx)
                .await?;
            if let Some(replay) = replay {
                tx.commit().await?;
                return Ok(untouched(if replay.target == target.as_str() {
                    ConsumeOutcome::Replayed(replay.package.into())
                } else {
                    ConsumeOutcome::KeyReused
                }));
            }
        }

        // The stages in order; the first refusal answers, and a refused claim is charged at no
        // stage. Once every stage passes, all are charged.
        let stages = [
            (
                Scope::Caller,
                caller.and_then(|c| c.budget),
                caller.map(|c| c.id.as_str().to_owned()),
            ),
            (
                Scope::Pair,
                caller.and_then(|c| c.pair_budget),
                caller.map(|c| pair_subject(c.id, target)),
            ),
            (
                Scope::Target,
                Some(claim.budget),
                Some(target.as_str().to_owned()),
            ),
        ];
        let mut charges = Vec::with_capacity(stages.len());
        for (scope, budget, subject) in stages {
            let (Some(budget), Some(subject)) = (budget, subject) else {
                continue;
            };
            match judge(&mut tx, scope, &subject, budget, now_us).await? {
                Ok(next_tat) => charges.push((scope, subject, next_tat)),
                Err(retry_after) => {
                    tx.commit().await?;
                    return Ok(untouched(ConsumeOutcome::RateLimited {
                        retry_after,
                        scope,
                    }));
                }
            }
        }
        for (scope, subject, next_tat) in charges {
            sqlx::query(CHARGE_BUDGET)
                .bind(scope_number(scope))
                .bind(subject)
                .bind(next_tat)
                .execute(&mut *tx)
                .await?;
        }

        let expired_removed = sqlx::query(DROP_EXPIRED)
            .bind(target.as_str())
            .bind(now.as_slice())
            .execute(&mut *tx)
            .await?
            .rows_affected();
        let mut package: Option<ConsumedRow> = sqlx::query_as(TAKE_OLDEST)
            .bind(target.as_str())
            .bind(suites.as_deref())
            .fetch_optional(&mut *tx)
            .await?;
        if package.is_none() {
            package = sqlx::query_as(HAND_OUT_LAST_RESORT)
                .bind(target.as_str())
                .bind(suites.as_deref())
                .bind(now.as_slice())
                .fetch_optional(&mut *tx)
                .await?;
        }
        let outcome = match package {
            Some(package) => {
                if let Some((caller, key, ttl)) = key {
                    sqlx::query(REMEMBER)
                        .bind(caller.as_str())
                        .bind(key.as_str())
                        .bind(target.as_str())
                        .bind(now_us.saturating_add(micros(ttl)))
                        .bind(package.data.as_slice())
                        .bind(package.fingerprint.as_deref().unwrap_or(""))
                        .bind(package.is_last_resort)
                        .bind(package.cipher_suite)
                        .bind(package.not_after.as_deref())
                        .bind(package.key_package_ref.as_deref())
                        .execute(&mut *tx)
                        .await?;
                }
                ConsumeOutcome::Consumed(package.into())
            }
            None => {
                let servable: bool = sqlx::query_scalar(SERVABLE)
                    .bind(target.as_str())
                    .bind(now.as_slice())
                    .fetch_one(&mut *tx)
                    .await?;
                if servable {
                    ConsumeOutcome::Incompatible
                } else {
                    ConsumeOutcome::Empty
                }
            }
        };
        tx.commit().await?;
        Ok(Consumption {
            outcome,
            expired_removed,
        })
    }

    async fn status(&self, user: &UserId, now_unix: i64) -> Result<Status, StoreError> {
        let mut conn = Self::acquire(&self.reader).await?;
        let status = status_in(&mut conn, user, now_unix).await?;
        conn.release();
        Ok(status)
    }

    async fn read_stored_facts(&self, limit: u32) -> Result<u64, StoreError> {
        let mut tx = self.writer.turn().await?;
        let mut unread: Vec<UnreadRow> = sqlx::query_as(UNREAD_REGULAR)
            .bind(i64::from(limit))
            .fetch_all(&mut *tx)
            .await?;
        let room = u64::from(limit).saturating_sub(unread.len() as u64);
        if room > 0 {
            let last_resort: Vec<UnreadRow> = sqlx::query_as(UNREAD_LAST_RESORT)
                .bind(room as i64)
                .fetch_all(&mut *tx)
                .await?;
            unread.extend(last_resort);
        }
        for row in &unread {
            let facts = FactColumns::read(&row.data);
            let query = match row.seq {
                Some(seq) => sqlx::query(SET_FACTS).bind(&row.user_id).bind(seq),
                None => sqlx::query(SET_LAST_RESORT_FACTS).bind(row.user_id.as_str()),
            };
            query
                .bind(facts.cipher_suite)
                .bind(facts.not_after.map(Vec::from))
                .bind(facts.key_package_ref)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(unread.len() as u64)
    }

    async fn delete_all(&self, user: &UserId) -> Result<(), StoreError> {
        let mut tx = self.writer.turn().await?;
        for statement in [DELETE_REGULAR, DELETE_LAST_RESORT] {
            sqlx::query(statement)
                .bind(user.as_str())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn fingerprint(&self, user: &UserId) -> Result<Option<(Fingerprint, i64)>, StoreError> {
        let mut conn = Self::acquire(&self.reader).await?;
        let row: Option<FingerprintRow> = sqlx::query_as(FINGERPRINT)
            .bind(user.as_str())
            .fetch_optional(&mut *conn)
            .await?;
        conn.release();
        Ok(row.and_then(FingerprintRow::into_pair))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::raw_sql("SELECT 1").execute(&self.probe).await?;
        Ok(())
    }

    async fn prune_budgets(&self, now_us: Option<i64>, limit: u32) -> Result<u64, StoreError> {
        self.prune(PRUNE_BUDGETS, now_us, limit).await
    }

    async fn prune_replays(&self, now_us: Option<i64>, limit: u32) -> Result<u64, StoreError> {
        self.prune(PRUNE_REPLAYS, now_us, limit).await
    }
}

impl SqliteStore {
    /// Runs a pruning statement ([`PRUNE_BUDGETS`], [`PRUNE_REPLAYS`]): $1 now (µs), $2 the
    /// most rows to drop.
    async fn prune(&self, sql: &str, now_us: Option<i64>, limit: u32) -> Result<u64, StoreError> {
        let mut tx = self.writer.turn().await?;
        let done = sqlx::query(sql)
            .bind(now_us.unwrap_or_else(clock::unix_micros))
            .bind(i64::from(limit))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(done.rows_affected())
    }
}

/// The number a scope has in `consume_budgets`.
fn scope_number(scope: Scope) -> i64 {
    match scope {
        Scope::Target => 0,
        Scope::Caller => 1,
        Scope::Pair => 2,
    }
}

/// The subject of a pair's budget: caller, a space, target (user ids hold no spaces).
pub(crate) fn pair_subject(caller: &UserId, target: &UserId) -> String {
    format!("{caller} {target}")
}

/// Judges one more request on the budget (`scope`, `subject`) at `now_us` inside the write
/// transaction, charging nothing: `Ok` with the state to store if the claim goes ahead, `Err`
/// with the wait when it refuses (a state written by a clock that ran ahead is cut back then).
async fn judge(
    tx: &mut sqlx::SqliteConnection,
    scope: Scope,
    subject: &str,
    budget: Budget,
    now_us: i64,
) -> Result<Result<i64, std::time::Duration>, StoreError> {
    let tat: Option<i64> = sqlx::query_scalar(BUDGET_TAT)
        .bind(scope_number(scope))
        .bind(subject)
        .fetch_optional(&mut *tx)
        .await?;
    let decided = budget.decide(tat, now_us);
    // Cut back a state written by a clock that ran ahead, so it refills from now.
    let clamped = tat
        .map(|t| budget.clamp(t, now_us))
        .filter(|&c| Some(c) < tat);
    if let (Err(_), Some(clamped)) = (decided, clamped) {
        sqlx::query(CHARGE_BUDGET)
            .bind(scope_number(scope))
            .bind(subject)
            .bind(clamped)
            .execute(&mut *tx)
            .await?;
    }
    Ok(decided)
}

/// A [`REPLAY`] row.
#[derive(sqlx::FromRow)]
struct ReplayRow {
    target: String,
    #[sqlx(flatten)]
    package: ConsumedRow,
}

async fn status_in(
    conn: &mut sqlx::SqliteConnection,
    user: &UserId,
    now_unix: i64,
) -> Result<Status, StoreError> {
    let rows: Vec<StatusRow> = sqlx::query_as(STATUS)
        .bind(user.as_str())
        .bind(now_key(now_unix).as_slice())
        .fetch_all(&mut *conn)
        .await?;
    Ok(build_status(rows, now_unix))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A log longer than [`WAL_RESTART_FRAMES`] is emptied by the next checkpoint; a shorter
    /// one is only copied, keeping its file for the writer to start over.
    #[tokio::test]
    async fn a_long_write_ahead_log_is_truncated_by_the_checkpoint() {
        use sqlx::{sqlite::SqliteConnectOptions, ConnectOptions as _, Executor};
        let dir = std::env::temp_dir().join(format!("kps-wal-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("wal.db");
        let mut conn = SqliteConnectOptions::new()
            .filename(&file)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(sqlx::sqlite::SqliteSynchronous::Off)
            .pragma("wal_autocheckpoint", "0")
            .connect()
            .await
            .expect("open");
        conn.execute("CREATE TABLE t (v INTEGER)")
            .await
            .expect("table");
        let wal = dir.join("wal.db-wal");
        let wal_len = || std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
        // One frame per commit at least: short of the limit, the file stays.
        for _ in 0..100 {
            conn.execute("INSERT INTO t VALUES (1)")
                .await
                .expect("insert");
        }
        checkpoint(&mut conn).await.expect("checkpoint");
        assert!(wal_len() > 0);
        for _ in 0..WAL_RESTART_FRAMES {
            conn.execute("INSERT INTO t VALUES (1)")
                .await
                .expect("insert");
        }
        checkpoint(&mut conn).await.expect("checkpoint");
        assert_eq!(wal_len(), 0);
        drop(conn);
        let _ = std::fs::remove_dir_all(&dir);
    }

    async fn synchronous_of(options: &ConnectOptions) -> i64 {
        let store = SqliteStore::connect(options).await.expect("open");
        let mut writer = store.writer.turn().await.expect("the writer");
        sqlx::query_scalar("PRAGMA synchronous")
            .fetch_one(&mut *writer)
            .await
            .expect("pragma")
    }

    #[tokio::test]
    async fn commits_are_durable_by_default_and_normal_only_when_asked() {
        let dir = std::env::temp_dir().join(format!("kps-sync-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut options = ConnectOptions::new(format!("sqlite://{}", dir.join("a.db").display()));
        // SQLite's numbering: 1 = NORMAL, 2 = FULL.
        assert_eq!(synchronous_of(&options).await, 2);
        options.sqlite_synchronous = Synchronous::Normal;
        assert_eq!(synchronous_of(&options).await, 1);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn ping_answers_while_every_request_connection_is_held() {
        let dir = std::env::temp_dir().join(format!("kps-probe-{:016x}", rand::random::<u64>()));
        let mut options =
            ConnectOptions::new(format!("sqlite://{}", dir.join("db.sqlite").display()));
        std::fs::create_dir_all(&dir).unwrap();
        options.max_connections = 1;
        let store = SqliteStore::connect(&options).await.unwrap();
        let _writing = store.writer.turn().await.unwrap();
        let _reading = store.reader.lease().await.unwrap();
        store
            .ping()
            .await
            .expect("the probe has a connection of its own");
        drop((_writing, _reading));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
