//! The embedded backend: one SQLite file in WAL mode.
//!
//! SQLite allows one writer at a time, so every write goes through a single pooled connection
//! (several writers would only wait on each other's locks); reads use a separate small pool.
//! Write transactions start with `BEGIN IMMEDIATE`: they take the write lock up front, so a
//! second process on the same file waits for it (busy timeout) instead of failing mid-way.

use std::str::FromStr;

use async_trait::async_trait;
use sqlx::{
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous},
    Row, SqlitePool,
};

use super::{
    stored_fingerprint, Budget, ConnectOptions, ConsumeOutcome, Consumed, KeyPackageStore, Status,
    StoreError, Upload, UploadOutcome, UploadPlan,
};
use crate::key_package::{Fingerprint, UserId, MAX_REGULAR_PACKAGES};

/// Key packages in an SQLite database file.
#[derive(Clone, Debug)]
pub struct SqliteStore {
    writer: SqlitePool,
    reader: SqlitePool,
}

impl SqliteStore {
    /// Opens (creating if missing) the database and applies the SQLite migrations.
    ///
    /// Processes starting at once on one file take turns: switching a new file to WAL needs an
    /// exclusive lock that SQLite does not wait for (the busy timeout does not apply), and sqlx's
    /// SQLite migrator takes no lock, so both would apply the migrations. A lock on the database's
    /// directory serialises opening and migrating; a busy open or migration (another program on
    /// the file) is retried until the busy timeout has passed.
    pub async fn connect(options: &ConnectOptions) -> Result<Self, StoreError> {
        use std::time::Duration;
        use tokio::time::Instant;

        let base = SqliteConnectOptions::from_str(&options.url)
            .map_err(|e| StoreError::Config(format!("{e}")))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // NORMAL in WAL mode never corrupts the file; a power cut may lose the last commits.
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(options.statement_timeout)
            .pragma("temp_store", "memory");
        let is_busy = |e: &sqlx::Error| {
            e.as_database_error()
                .and_then(|e| e.code())
                .and_then(|code| code.parse::<i32>().ok())
                // SQLITE_BUSY (5) and SQLITE_LOCKED (6), with their extended codes.
                .is_some_and(|code| matches!(code & 0xff, 5 | 6))
        };
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
                    StoreError::Config(format!("cannot open {}: {e}", dir.display()))
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
                            return Err(StoreError::Config(format!(
                                "another process holds the lock on {} too long",
                                dir.display()
                            )));
                        }
                        Err(std::fs::TryLockError::Error(e)) => {
                            return Err(StoreError::Config(format!(
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
        let writer = loop {
            let opened = SqlitePoolOptions::new()
                .max_connections(1)
                .acquire_timeout(options.acquire_timeout)
                .connect_with(base.clone())
                .await;
            match opened {
                Ok(pool) => break pool,
                Err(e) if is_busy(&e) && Instant::now() < deadline => {
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                Err(e) => return Err(StoreError::Config(format!("cannot open database: {e}"))),
            }
        };
        loop {
            match sqlx::migrate!("./migrations/sqlite").run(&writer).await {
                Ok(()) => break,
                Err(sqlx::migrate::MigrateError::Execute(e))
                    if is_busy(&e) && Instant::now() < deadline =>
                {
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                Err(e) => return Err(StoreError::Config(format!("migrations failed: {e}"))),
            }
        }
        let reader = SqlitePoolOptions::new()
            .max_connections(options.max_connections.clamp(1, 8))
            .acquire_timeout(options.acquire_timeout)
            .connect_with(base.read_only(true))
            .await?;
        Ok(Self { writer, reader })
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
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        sqlx::query("INSERT INTO users (user_id) VALUES ($1) ON CONFLICT DO NOTHING")
            .bind(user.as_str())
            .execute(&mut *tx)
            .await?;
        let held_last_resort: Option<Vec<u8>> =
            sqlx::query_scalar("SELECT last_resort_digest FROM users WHERE user_id = $1")
                .bind(user.as_str())
                .fetch_one(&mut *tx)
                .await?;
        let held: Vec<Vec<u8>> =
            sqlx::query_scalar("SELECT digest FROM key_packages WHERE user_id = $1")
                .bind(user.as_str())
                .fetch_all(&mut *tx)
                .await?;
        let plan = UploadPlan::new(upload, &held, held_last_resort.as_deref());
        let fingerprint = upload.fingerprint.as_ref().map_or("", Fingerprint::as_str);

        if let Some(fp) = &upload.fingerprint {
            sqlx::query(
                "UPDATE users SET fingerprint = $2, fingerprint_updated_at = $3 \
                 WHERE user_id = $1 AND fingerprint IS NOT $2",
            )
            .bind(user.as_str())
            .bind(fp.as_str())
            .bind(now_unix)
            .execute(&mut *tx)
            .await?;
        }
        for package in &plan.regular {
            sqlx::query(
                "INSERT INTO key_packages (user_id, digest, data, fingerprint) \
                 VALUES ($1, $2, $3, $4)",
            )
            .bind(user.as_str())
            .bind(package.digest().as_slice())
            .bind(package.bytes().as_ref())
            .bind(fingerprint)
            .execute(&mut *tx)
            .await?;
        }
        if let Some(package) = plan.last_resort {
            sqlx::query(
                "UPDATE users SET last_resort = $2, last_resort_digest = $3, \
                 last_resort_fingerprint = $4, last_resort_handouts = 0 WHERE user_id = $1",
            )
            .bind(user.as_str())
            .bind(package.bytes().as_ref())
            .bind(package.digest().as_slice())
            .bind(fingerprint)
            .execute(&mut *tx)
            .await?;
        }
        if !plan.regular.is_empty() {
            sqlx::query(
                "DELETE FROM key_packages WHERE user_id = $1 AND id NOT IN \
                 (SELECT id FROM key_packages WHERE user_id = $1 ORDER BY id DESC LIMIT $2)",
            )
            .bind(user.as_str())
            .bind(MAX_REGULAR_PACKAGES as i64)
            .execute(&mut *tx)
            .await?;
        }
        let status = status_in(&mut tx, user).await?;
        tx.commit().await?;
        Ok(UploadOutcome {
            stored: plan.stored(),
            status,
        })
    }

    async fn consume(
        &self,
        target: &UserId,
        budget: Budget,
        now_ms: i64,
    ) -> Result<ConsumeOutcome, StoreError> {
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        let tat: Option<i64> =
            sqlx::query_scalar("SELECT tat FROM consume_budgets WHERE user_id = $1")
                .bind(target.as_str())
                .fetch_optional(&mut *tx)
                .await?;
        let new_tat = match budget.decide(tat, now_ms) {
            Ok(t) => t,
            Err(retry_after) => return Ok(ConsumeOutcome::RateLimited { retry_after }),
        };
        sqlx::query(
            "INSERT INTO consume_budgets (user_id, tat) VALUES ($1, $2) \
             ON CONFLICT (user_id) DO UPDATE SET tat = excluded.tat",
        )
        .bind(target.as_str())
        .bind(new_tat)
        .execute(&mut *tx)
        .await?;

        let regular = sqlx::query(
            "DELETE FROM key_packages WHERE id = \
             (SELECT id FROM key_packages WHERE user_id = $1 ORDER BY id LIMIT 1) \
             RETURNING data, fingerprint",
        )
        .bind(target.as_str())
        .fetch_optional(&mut *tx)
        .await?;
        let outcome = match regular {
            Some(row) => consumed(row, false)?,
            None => {
                let last_resort = sqlx::query(
                    "UPDATE users SET last_resort_handouts = last_resort_handouts + 1 \
                     WHERE user_id = $1 AND last_resort IS NOT NULL \
                     RETURNING last_resort, last_resort_fingerprint",
                )
                .bind(target.as_str())
                .fetch_optional(&mut *tx)
                .await?;
                match last_resort {
                    Some(row) => consumed(row, true)?,
                    None => ConsumeOutcome::Empty,
                }
            }
        };
        tx.commit().await?;
        Ok(outcome)
    }

    async fn status(&self, user: &UserId) -> Result<Status, StoreError> {
        let mut conn = self.reader.acquire().await?;
        status_in(&mut conn, user).await
    }

    async fn delete_all(&self, user: &UserId) -> Result<(), StoreError> {
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        sqlx::query("DELETE FROM key_packages WHERE user_id = $1")
            .bind(user.as_str())
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "UPDATE users SET last_resort = NULL, last_resort_digest = NULL, \
             last_resort_fingerprint = '', last_resort_handouts = 0 WHERE user_id = $1",
        )
        .bind(user.as_str())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn fingerprint(&self, user: &UserId) -> Result<Option<(Fingerprint, i64)>, StoreError> {
        let row: Option<(Option<String>, Option<i64>)> = sqlx::query_as(
            "SELECT fingerprint, fingerprint_updated_at FROM users WHERE user_id = $1",
        )
        .bind(user.as_str())
        .fetch_optional(&self.reader)
        .await?;
        Ok(row.and_then(|(fp, at)| Some((stored_fingerprint(fp)?, at.unwrap_or(0)))))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.reader).await?;
        Ok(())
    }

    async fn prune_budgets(&self, now_ms: i64) -> Result<u64, StoreError> {
        let done = sqlx::query("DELETE FROM consume_budgets WHERE tat <= $1")
            .bind(now_ms)
            .execute(&self.writer)
            .await?;
        Ok(done.rows_affected())
    }
}

fn consumed(
    row: sqlx::sqlite::SqliteRow,
    is_last_resort: bool,
) -> Result<ConsumeOutcome, StoreError> {
    let data: Vec<u8> = row.try_get(0)?;
    let fingerprint: String = row.try_get(1)?;
    Ok(ConsumeOutcome::Consumed(Consumed {
        key_package: data.into(),
        is_last_resort,
        fingerprint: stored_fingerprint(Some(fingerprint)),
    }))
}

async fn status_in(conn: &mut sqlx::SqliteConnection, user: &UserId) -> Result<Status, StoreError> {
    let row: Option<(i64, bool, Option<String>, i64)> = sqlx::query_as(
        "SELECT (SELECT count(*) FROM key_packages WHERE user_id = $1), \
                last_resort IS NOT NULL, fingerprint, last_resort_handouts \
         FROM users WHERE user_id = $1",
    )
    .bind(user.as_str())
    .fetch_optional(&mut *conn)
    .await?;
    Ok(match row {
        Some((count, has_last_resort, fingerprint, handouts)) => Status {
            regular_count: count as u32,
            has_last_resort,
            fingerprint: stored_fingerprint(fingerprint),
            last_resort_handouts: handouts as u64,
        },
        None => Status::default(),
    })
}
