//! The production backend: Postgres, shared by any number of server processes. Rules that must
//! hold across processes are row locks: uploads serialise on the user's `users` row,
//! consumptions on the target's budget row and on the package they take.

use std::{str::FromStr, sync::Arc};

use async_trait::async_trait;
use sqlx::{
    error::DatabaseError,
    migrate::Migrator,
    postgres::{PgArguments, PgConnectOptions, PgDatabaseError, PgPoolOptions, PgRow},
    query::{Query, QueryAs},
    Connection, FromRow, PgConnection, PgPool, Postgres, Transaction,
};

use super::{
    batch::{row_key, BatchError, Batcher, ClaimArgs, Job, Runner},
    build_status,
    checkout::{Checkout, Lease},
    micros, not_after_key, now_key, Claim, ConnectError, ConnectOptions, ConsumeOutcome,
    ConsumedRow, Consumption, FactColumns, FingerprintRow, KeyPackageStore, Status, StatusRow,
    StoreError, UnreadRow, Upload, UploadOutcome,
};
use crate::{
    key_package::{Fingerprint, UserId, MAX_REGULAR_PACKAGES},
    rate_limit::{Budget, Scope},
};

/// The Postgres schema, applied at start by [`PgStore::connect`].
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations/postgres");

/// SQLSTATE classes and codes that mean "not now" rather than "wrong": the request may succeed
/// if retried later, so it is answered 503.
mod sqlstate {
    /// Class 08: connection exceptions.
    pub(super) const CONNECTION_EXCEPTION_CLASS: &str = "08";
    /// Class 57P: operator intervention (shutdown, crash recovery, terminated backend).
    pub(super) const OPERATOR_INTERVENTION_CLASS: &str = "57P";
    /// `statement_timeout` fired.
    pub(super) const QUERY_CANCELED: &str = "57014";
    /// No connection slot left.
    pub(super) const TOO_MANY_CONNECTIONS: &str = "53300";
    /// `lock_timeout` fired.
    pub(super) const LOCK_NOT_AVAILABLE: &str = "55P03";
    /// `idle_in_transaction_session_timeout` ended the session.
    pub(super) const IDLE_IN_TRANSACTION_TIMEOUT: &str = "25P03";
    /// Chosen as a deadlock victim.
    pub(super) const DEADLOCK_DETECTED: &str = "40P01";
    /// A write on a read-only session: the database failed over to a standby, or is being
    /// switched; writes work again once a primary is back.
    pub(super) const READ_ONLY_SQL_TRANSACTION: &str = "25006";
}

/// Whether a Postgres error means the database is unavailable for now (see [`sqlstate`]).
pub(super) fn is_transient(error: &dyn DatabaseError) -> bool {
    let Some(code) = error
        .try_downcast_ref::<PgDatabaseError>()
        .map(PgDatabaseError::code)
    else {
        return false;
    };
    use sqlstate::*;
    code.starts_with(CONNECTION_EXCEPTION_CLASS)
        || code.starts_with(OPERATOR_INTERVENTION_CLASS)
        || [
            QUERY_CANCELED,
            TOO_MANY_CONNECTIONS,
            LOCK_NOT_AVAILABLE,
            IDLE_IN_TRANSACTION_TIMEOUT,
            DEADLOCK_DETECTED,
            READ_ONLY_SQL_TRANSACTION,
        ]
        .contains(&code)
}

/// One upload: the `kps_upload` function of the migrations (`0008_upload_function.sql`), which
/// creates or locks the user's row (so one user's uploads run one after another, in every
/// process), records the fingerprint, removes the user's expired packages, stores the new ones
/// (skipping those held already, trimming to the newest 10, replacing the last-resort one) and
/// reads the status, in one transaction and one round trip.
///
/// $1 user, $2 fingerprint or NULL, $3 now (Unix seconds) or NULL when $2 is NULL, $4 now as a
/// `not_after` key; $5 digests, $6 bytes, $7 suites, $8 `not_after` keys and $9 refs of the
/// regular packages (oldest first), $10 the earliest of those keys (NULL if none has one);
/// $11 last-resort bytes, $12 its digest, $13 suite, $14 `not_after` key and $15 ref (or
/// NULLs); $16 the most regular packages a user holds. Rows as [`STATUS`]'s
/// ([`UploadRow`]), each with how many packages were `stored` and how many `expired` ones
/// were removed.
pub const UPLOAD: &str = "\
SELECT stored, expired, u_fingerprint AS fingerprint,
       u_last_resort_handouts AS last_resort_handouts,
       u_last_resort_digest AS last_resort_digest,
       u_last_resort_not_after AS last_resort_not_after,
       k_digest AS digest, k_cipher_suite AS cipher_suite, k_not_after AS not_after
FROM kps_upload($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)";

/// Uploads of different users at once ([`super::batch`]), with pairwise distinct users:
/// $1 users, $2 fingerprints, $3 their times, $4 now keys, $12 floors and $13..$17 the
/// last-resort columns, each an array holding upload i at index i; $7..$11 (digests, bytes,
/// suites, `not_after` keys, refs) the regular packages of all uploads one after another,
/// upload i's from index `$5[i]`, `$6[i]` of them; $18 as $16 of [`UPLOAD`]. [`UPLOAD`]'s rows,
/// each with its upload's index in `upload`.
pub const UPLOAD_BATCH: &str = "\
SELECT upload, stored, expired, u_fingerprint AS fingerprint,
       u_last_resort_handouts AS last_resort_handouts,
       u_last_resort_digest AS last_resort_digest,
       u_last_resort_not_after AS last_resort_not_after,
       k_digest AS digest, k_cipher_suite AS cipher_suite, k_not_after AS not_after
FROM kps_upload_batch($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16,
                      $17, $18)";

/// One claim: the `kps_claim` function of the migrations, which takes the caller's
/// idempotency key, charges the caller's, the pair's and the target's budgets in that order by
/// the database's clock, removes expired packages and hands out a package, in one transaction
/// and one round trip (see `migrations/postgres/0004_claims.sql` and `0005_claim_one_pass.sql`).
///
/// $1 target, $2 caller or NULL, $3 idempotency key or NULL, $4 its time to live (µs), $5 now
/// (µs) or NULL for the database's clock, $6 accepted suites or NULL for any; refill interval
/// and window (µs) of the target's ($7, $8), the caller's ($9, $10) and the pair's ($11, $12)
/// budgets, NULL for a stage that is off. One row: the `outcome`, with `wait_us` for a
/// refusal and the package ([`ConsumedRow`]) for a hand-out or a replay.
pub const CONSUME: &str = "\
SELECT outcome, wait_us, expired_removed, kp_data AS data, kp_fingerprint AS fingerprint,
       kp_is_last_resort AS is_last_resort, kp_cipher_suite AS cipher_suite,
       kp_not_after AS not_after, kp_ref AS key_package_ref
FROM kps_claim($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)";

/// Claims of different users at once ([`super::batch`]): $1..$12 as for [`CONSUME`], each an
/// array holding claim i at index i (the suites as `'{...}'` literals), with pairwise distinct
/// targets and callers. One row per claim: its index in `claim`, then the columns of
/// [`CONSUME`].
pub const CONSUME_BATCH: &str = "\
SELECT claim, outcome, wait_us, expired_removed, kp_data AS data, kp_fingerprint AS fingerprint,
       kp_is_last_resort AS is_last_resort, kp_cipher_suite AS cipher_suite,
       kp_not_after AS not_after, kp_ref AS key_package_ref
FROM kps_claim_batch($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)";

/// Up to `$1` regular packages stored by an earlier version that did not read facts
/// ([`UnreadRow`]), locked so that processes starting at once share the work.
pub const UNREAD_REGULAR: &str = "\
SELECT seq, user_id, data FROM key_packages WHERE cipher_suite IS NULL
ORDER BY user_id, seq LIMIT $1 FOR UPDATE SKIP LOCKED";

/// Up to `$1` last-resort packages stored by an earlier version that did not read facts
/// ([`UnreadRow`]), locked as [`UNREAD_REGULAR`].
pub const UNREAD_LAST_RESORT: &str = "\
SELECT NULL::bigint AS seq, user_id, last_resort AS data FROM users
WHERE last_resort IS NOT NULL AND last_resort_cipher_suite IS NULL
LIMIT $1 FOR UPDATE SKIP LOCKED";

/// First half of a delete: drops the last-resort package under the user's row lock, as uploads
/// take it, so the two never wait on each other in a cycle. $1 user.
pub const DELETE_LAST_RESORT: &str = "\
UPDATE users SET last_resort = NULL, last_resort_digest = NULL, last_resort_fingerprint = '',
    last_resort_handouts = 0
WHERE user_id = $1";

/// Second half of a delete: its snapshot includes any upload that held the lock. $1 user.
pub const DELETE_REGULAR: &str = "DELETE FROM key_packages WHERE user_id = $1";

/// The user's fingerprint and when it changed ([`FingerprintRow`]). $1 user.
pub const FINGERPRINT: &str =
    "SELECT fingerprint, fingerprint_updated_at FROM users WHERE user_id = $1";

/// Drops at most `$2` budget rows that have fully refilled by `$1` (µs, or NULL for the
/// database's clock, which hosts with skewed clocks agree on). `SKIP LOCKED`: rows being
/// charged right now are not refilled anyway, and pruners in several processes then never wait
/// on (or deadlock with) each other or consumers.
pub const PRUNE_BUDGETS: &str = "\
DELETE FROM consume_budgets WHERE (scope, subject) IN (
    SELECT scope, subject FROM consume_budgets
    WHERE tat_us <= COALESCE($1, (extract(epoch FROM clock_timestamp()) * 1000000)::bigint)
    LIMIT $2
    FOR UPDATE SKIP LOCKED)";

/// Drops at most `$2` idempotency records expired by `$1` (µs, or NULL for the database's
/// clock); `SKIP LOCKED` as [`PRUNE_BUDGETS`].
pub const PRUNE_REPLAYS: &str = "\
DELETE FROM claim_replays WHERE (caller, idem_key) IN (
    SELECT caller, idem_key FROM claim_replays
    WHERE expires_us <= COALESCE($1, (extract(epoch FROM clock_timestamp()) * 1000000)::bigint)
    LIMIT $2
    FOR UPDATE SKIP LOCKED)";

pub use super::common_sql::{SET_FACTS, SET_LAST_RESORT_FACTS, STATUS};

/// Turns the plain tables into `$n` hash partitions each, by the column every request
/// statement names one value of: `users` and `key_packages` by `user_id`, `consume_budgets` by
/// `subject`, `claim_replays` by `caller`. Tables already partitioned are left as they are, so
/// it runs once per database; rows are copied, in the transaction of the caller.
///
/// This is the distribution shape of `SCALING.md` on one server: with it, every statement of a
/// request touches one partition of each table it names (`tests/api/partitions.rs`).
const PARTITION_TABLES: &str = r#"
DO $$
DECLARE
    n int := current_setting('kps.partitions')::int;
    t record;
    i int;
BEGIN
    FOR t IN SELECT * FROM (VALUES ('users', 'user_id'), ('key_packages', 'user_id'),
                                   ('consume_budgets', 'subject'), ('claim_replays', 'caller'))
                           AS v (name, col)
    LOOP
        IF (SELECT c.relkind FROM pg_class c WHERE c.oid = t.name::regclass) = 'p' THEN
            CONTINUE;
        END IF;
        EXECUTE format('ALTER TABLE %I RENAME TO %I', t.name, t.name || '_plain');
        EXECUTE format('CREATE TABLE %I (LIKE %I INCLUDING ALL) PARTITION BY HASH (%I)',
                       t.name, t.name || '_plain', t.col);
        FOR i IN 0 .. n - 1 LOOP
            EXECUTE format('CREATE TABLE %I PARTITION OF %I FOR VALUES WITH (MODULUS %s, REMAINDER %s)',
                           t.name || '_p' || i, t.name, n, i);
        END LOOP;
        EXECUTE format('INSERT INTO %I SELECT * FROM %I', t.name, t.name || '_plain');
        EXECUTE format('DROP TABLE %I', t.name || '_plain');
    END LOOP;
END
$$"#;

/// Serialises conversions to partitions of processes that start at once.
const PARTITION_LOCK: i64 = 0x6b70_735f_7061_7274;

/// Serialises migrations of processes that start at once behind PgBouncer, where sqlx's
/// session-level lock cannot be used (see [`migrate_in_one_transaction`]).
const PGBOUNCER_MIGRATION_LOCK: i64 = 0x6b70_735f_6d69_6772;

/// One claim statement, and one upload statement, may run per this many pool connections at
/// once (at least one of each); claims and uploads beyond wait and then run in batches. An
/// eighth (2 of each with the default 16) leaves connections for reads and makes batches form
/// as soon as a few statements run at once, where the database's commits become the
/// bottleneck; for claims it measured best of 2, 4 and 8 slots (BENCHMARKS). The second slot
/// of each opens only while the first does not keep up (see `batch`). A claim never waits
/// behind another of its target or caller, nor an upload behind another of its user, so one
/// locked user holds one slot of each at most.
const CLAIM_SLOTS_PER_CONNECTION: u32 = 8;

/// The most claims one batch holds.
const MAX_CLAIM_BATCH: usize = 32;

/// The most uploads one batch holds (each carries up to 11 packages).
const MAX_UPLOAD_BATCH: usize = 16;

/// Key packages in a Postgres database.
pub struct PgStore {
    /// The request connections.
    db: Arc<Connections>,
    /// Claims, run alone or in batches ([`super::batch`]).
    claims: Arc<Batcher<Claims>>,
    /// Uploads, run alone or in batches, as claims are.
    uploads: Arc<Batcher<Uploads>>,
    /// One connection of the readiness probe's own, so a busy request pool cannot fail it.
    probe: PgPool,
}

/// Claims on the request connections.
struct Claims(Arc<Connections>);

/// Uploads on the request connections.
struct Uploads(Arc<Connections>);

/// The request connections and how statements run on them.
struct Connections {
    pool: Checkout<Postgres>,
    /// Behind PgBouncer (transaction pooling): the statement each transaction begins with,
    /// `BEGIN` plus the timeouts as `SET LOCAL`. `None` on a direct connection.
    bouncer: Option<String>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("pgbouncer", &self.db().bouncer.is_some())
            .finish_non_exhaustive()
    }
}

/// The connection one store call runs on; see [`PgStore::session`].
enum Session<'c> {
    /// A lent connection (direct to Postgres), statements in autocommit.
    Plain(&'c mut PgConnection),
    /// A transaction, committed by [`Session::finish`] (behind PgBouncer).
    Pinned(Transaction<'c, Postgres>),
}

impl Session<'_> {
    fn conn(&mut self) -> &mut PgConnection {
        match self {
            Self::Plain(conn) => conn,
            Self::Pinned(tx) => tx,
        }
    }

    /// Commits a pinned session; a plain one has nothing left to do.
    async fn finish(self) -> Result<(), StoreError> {
        if let Self::Pinned(tx) = self {
            tx.commit().await?;
        }
        Ok(())
    }
}

impl Connections {
    /// A connection for one call, given back with [`Lease::release`] once the call ended
    /// cleanly. Failing to get one means the database is unavailable.
    async fn lease(&self) -> Result<Lease<'_, Postgres>, StoreError> {
        self.pool.lease().await.map_err(StoreError::Unavailable)
    }

    /// A transaction on `conn`. Failing to begin means the database is unavailable, whatever
    /// the error says (a refusal for any reason, a connection found dead): nothing of the call
    /// has run, and a retry may well succeed.
    async fn begin<'c>(
        &self,
        conn: &'c mut PgConnection,
    ) -> Result<Transaction<'c, Postgres>, StoreError> {
        let begun = match &self.bouncer {
            None => conn.begin().await,
            Some(begin) => conn.begin_with(begin.clone()).await,
        };
        begun.map_err(StoreError::Unavailable)
    }

    /// How a call of single statements runs on `conn`: in autocommit or, behind PgBouncer, in
    /// a transaction, which is what keeps a statement's parse and execute on one server
    /// session and sets the timeouts. Errors as [`Connections::begin`].
    async fn session<'c>(&self, conn: &'c mut PgConnection) -> Result<Session<'c>, StoreError> {
        match self.bouncer {
            None => Ok(Session::Plain(conn)),
            Some(_) => self.begin(conn).await.map(Session::Pinned),
        }
    }

    /// Whether statements are prepared once per connection and cached. Not behind PgBouncer:
    /// the server session that holds a prepared statement is another client's by the next
    /// transaction, so every statement there is unnamed, parsed where it runs.
    fn persistent(&self) -> bool {
        self.bouncer.is_none()
    }

    /// A statement of this store; see [`Connections::persistent`].
    fn query<'q>(&self, sql: &'q str) -> Query<'q, Postgres, PgArguments> {
        sqlx::query(sql).persistent(self.persistent())
    }

    /// A statement returning rows of `R`; see [`Connections::persistent`].
    fn query_as<'q, R>(&self, sql: &'q str) -> QueryAs<'q, Postgres, R, PgArguments>
    where
        R: for<'r> FromRow<'r, PgRow>,
    {
        sqlx::query_as(sql).persistent(self.persistent())
    }

    /// Runs a batch statement (built with [`Connections::query`]) and returns its rows. No
    /// connection, or no transaction on it, fails the batch outright: the database is
    /// unavailable for every job alike, so running them one by one would only wait again,
    /// once per job. A statement the database refused rolled back whole.
    async fn batch_rows(
        &self,
        statement: Query<'_, Postgres, PgArguments>,
    ) -> Result<Vec<PgRow>, BatchError> {
        let mut lease = self.lease().await.map_err(BatchError::Failed)?;
        let mut session = self.session(&mut lease).await.map_err(BatchError::Failed)?;
        let rows = statement
            .fetch_all(session.conn())
            .await
            .map_err(|e| match e {
                sqlx::Error::Database(_) => BatchError::Refused(e.into()),
                e => BatchError::Failed(e.into()),
            })?;
        session.finish().await.map_err(BatchError::Failed)?;
        lease.release();
        Ok(rows)
    }
}

/// The entry for a batch row's 1-based job number `index` (as the batch functions number
/// their jobs), or a failure naming `function` when the number is out of range.
fn job_slot<'a, T>(
    slots: &'a mut [T],
    index: i32,
    function: &str,
) -> Result<&'a mut T, BatchError> {
    let jobs = slots.len();
    usize::try_from(index)
        .ok()
        .and_then(|i| i.checked_sub(1))
        .and_then(|i| slots.get_mut(i))
        .ok_or_else(|| {
            BatchError::Failed(StoreError::Database(sqlx::Error::Protocol(format!(
                "{function} returned job {index} of {jobs}"
            ))))
        })
}

#[async_trait]
impl Runner for Claims {
    type Job = ClaimArgs;
    type Row = ConsumeRow;
    const KIND: &'static str = "claim";

    async fn one(&self, claim: &ClaimArgs) -> Result<ConsumeRow, StoreError> {
        let mut lease = self.0.lease().await?;
        let mut session = self.0.session(&mut lease).await?;
        let row: ConsumeRow = self
            .0
            .query_as(CONSUME)
            .bind(claim.target.as_str())
            .bind(claim.caller.as_deref())
            .bind(claim.key.as_deref())
            .bind(claim.ttl_us)
            .bind(claim.now_us)
            .bind(claim.suites.as_deref())
            .bind(claim.target_interval_us)
            .bind(claim.target_window_us)
            .bind(claim.caller_interval_us)
            .bind(claim.caller_window_us)
            .bind(claim.pair_interval_us)
            .bind(claim.pair_window_us)
            .fetch_one(session.conn())
            .await?;
        session.finish().await?;
        lease.release();
        Ok(row)
    }

    async fn many(&self, claims: &[&ClaimArgs]) -> Result<Vec<ConsumeRow>, BatchError> {
        fn column<T>(claims: &[&ClaimArgs], f: impl Fn(&ClaimArgs) -> T) -> Vec<T> {
            claims.iter().map(|c| f(c)).collect()
        }
        let suites = column(claims, |c| {
            c.suites.as_ref().map(|suites| {
                let listed: Vec<String> = suites.iter().map(i32::to_string).collect();
                format!("{{{}}}", listed.join(","))
            })
        });
        let statement = self
            .0
            .query(CONSUME_BATCH)
            .bind(column(claims, |c| c.target.clone()))
            .bind(column(claims, |c| c.caller.clone()))
            .bind(column(claims, |c| c.key.clone()))
            .bind(column(claims, |c| c.ttl_us))
            .bind(column(claims, |c| c.now_us))
            .bind(suites)
            .bind(column(claims, |c| c.target_interval_us))
            .bind(column(claims, |c| c.target_window_us))
            .bind(column(claims, |c| c.caller_interval_us))
            .bind(column(claims, |c| c.caller_window_us))
            .bind(column(claims, |c| c.pair_interval_us))
            .bind(column(claims, |c| c.pair_window_us));
        let rows = self.0.batch_rows(statement).await?;
        let unknown = |message: String| {
            BatchError::Failed(StoreError::Database(sqlx::Error::Protocol(message)))
        };
        let mut ordered: Vec<Option<ConsumeRow>> = claims.iter().map(|_| None).collect();
        for row in &rows {
            use sqlx::Row;
            let claim: i32 = row
                .try_get("claim")
                .map_err(|e| BatchError::Failed(e.into()))?;
            let row = ConsumeRow::from_row(row).map_err(|e| BatchError::Failed(e.into()))?;
            *job_slot(&mut ordered, claim, "kps_claim_batch")? = Some(row);
        }
        ordered
            .into_iter()
            .map(|row| {
                row.ok_or_else(|| unknown("kps_claim_batch left a claim unanswered".to_owned()))
            })
            .collect()
    }
}

/// One upload's arguments, owned, so it can wait in the queue and run in another task.
struct UploadArgs {
    user: String,
    upload: Upload,
    now_unix: i64,
}

impl Job for UploadArgs {
    /// The user's.
    fn row_keys(&self) -> [Option<u64>; 2] {
        [Some(row_key(0, &self.user)), None]
    }

    /// The same user.
    fn overlaps(&self, other: &Self) -> bool {
        self.user == other.user
    }
}

/// The arguments of uploads as [`UPLOAD`] and [`UPLOAD_BATCH`] take them: one element per
/// upload, and the regular packages of all of them one after the other (upload i's from
/// `first[i]`, 1-based, `count[i]` of them).
#[derive(Default)]
struct UploadColumns<'a> {
    users: Vec<&'a str>,
    fingerprints: Vec<Option<&'a str>>,
    fingerprint_ats: Vec<Option<i64>>,
    now_keys: Vec<Vec<u8>>,
    first: Vec<i32>,
    count: Vec<i32>,
    digests: Vec<&'a [u8]>,
    data: Vec<&'a [u8]>,
    suites: Vec<i32>,
    not_after: Vec<Option<Vec<u8>>>,
    refs: Vec<Option<Vec<u8>>>,
    floors: Vec<Option<Vec<u8>>>,
    lr_data: Vec<Option<&'a [u8]>>,
    lr_digests: Vec<Option<&'a [u8]>>,
    lr_suites: Vec<Option<i32>>,
    lr_not_after: Vec<Option<Vec<u8>>>,
    lr_refs: Vec<Option<Vec<u8>>>,
}

impl<'a> UploadColumns<'a> {
    fn of(uploads: &[&'a UploadArgs]) -> Self {
        let mut columns = Self::default();
        for args in uploads {
            let upload = &args.upload;
            let fingerprint = upload.fingerprint.as_ref().map(Fingerprint::as_str);
            columns.users.push(&args.user);
            columns.fingerprints.push(fingerprint);
            columns
                .fingerprint_ats
                .push(fingerprint.map(|_| args.now_unix));
            columns.now_keys.push(now_key(args.now_unix).to_vec());
            columns.first.push(columns.digests.len() as i32 + 1);
            columns.count.push(upload.regular.len() as i32);
            for package in &upload.regular {
                let facts = FactColumns::of(package);
                columns.digests.push(package.digest());
                columns.data.push(package.bytes());
                columns.suites.push(facts.cipher_suite);
                columns.not_after.push(facts.not_after.map(Vec::from));
                columns.refs.push(facts.key_package_ref);
            }
            columns
                .floors
                .push(earliest_not_after(upload).map(Vec::from));
            let last_resort = upload.last_resort.as_ref();
            let facts = last_resort.map(FactColumns::of);
            columns
                .lr_data
                .push(last_resort.map(|p| p.bytes().as_ref()));
            columns
                .lr_digests
                .push(last_resort.map(|p| p.digest().as_slice()));
            columns
                .lr_suites
                .push(facts.as_ref().map(|f| f.cipher_suite));
            columns
                .lr_not_after
                .push(facts.as_ref().and_then(|f| f.not_after.map(Vec::from)));
            columns.lr_refs.push(facts.and_then(|f| f.key_package_ref));
        }
        columns
    }
}

#[async_trait]
impl Runner for Uploads {
    type Job = UploadArgs;
    type Row = Vec<UploadRow>;
    const KIND: &'static str = "upload";

    async fn one(&self, upload: &UploadArgs) -> Result<Vec<UploadRow>, StoreError> {
        let mut c = UploadColumns::of(&[upload]);
        let mut lease = self.0.lease().await?;
        let mut session = self.0.session(&mut lease).await?;
        let rows: Vec<UploadRow> = self
            .0
            .query_as(UPLOAD)
            .bind(c.users[0])
            .bind(c.fingerprints[0])
            .bind(c.fingerprint_ats[0])
            .bind(c.now_keys.swap_remove(0))
            .bind(c.digests)
            .bind(c.data)
            .bind(c.suites)
            .bind(c.not_after)
            .bind(c.refs)
            .bind(c.floors.swap_remove(0))
            .bind(c.lr_data[0])
            .bind(c.lr_digests[0])
            .bind(c.lr_suites[0])
            .bind(c.lr_not_after.swap_remove(0))
            .bind(c.lr_refs.swap_remove(0))
            .bind(MAX_REGULAR_PACKAGES as i32)
            .fetch_all(session.conn())
            .await?;
        session.finish().await?;
        lease.release();
        Ok(rows)
    }

    async fn many(&self, uploads: &[&UploadArgs]) -> Result<Vec<Vec<UploadRow>>, BatchError> {
        let c = UploadColumns::of(uploads);
        let statement = self
            .0
            .query(UPLOAD_BATCH)
            .bind(c.users)
            .bind(c.fingerprints)
            .bind(c.fingerprint_ats)
            .bind(c.now_keys)
            .bind(c.first)
            .bind(c.count)
            .bind(c.digests)
            .bind(c.data)
            .bind(c.suites)
            .bind(c.not_after)
            .bind(c.refs)
            .bind(c.floors)
            .bind(c.lr_data)
            .bind(c.lr_digests)
            .bind(c.lr_suites)
            .bind(c.lr_not_after)
            .bind(c.lr_refs)
            .bind(MAX_REGULAR_PACKAGES as i32);
        let rows = self.0.batch_rows(statement).await?;
        let mut grouped: Vec<Vec<UploadRow>> = uploads.iter().map(|_| Vec::new()).collect();
        for row in &rows {
            use sqlx::Row;
            let failed = |e: sqlx::Error| BatchError::Failed(e.into());
            let index: i32 = row.try_get("upload").map_err(failed)?;
            let upload_row = UploadRow::from_row(row).map_err(failed)?;
            job_slot(&mut grouped, index, "kps_upload_batch")?.push(upload_row);
        }
        if grouped.iter().any(Vec::is_empty) {
            return Err(BatchError::Failed(StoreError::Database(
                sqlx::Error::Protocol("kps_upload_batch left an upload unanswered".to_owned()),
            )));
        }
        Ok(grouped)
    }
}

/// What an upload did, from its [`UploadRow`]s.
fn upload_outcome(rows: Vec<UploadRow>, now_unix: i64) -> UploadOutcome {
    let (stored, expired) = rows.first().map_or((0, 0), |r| (r.stored, r.expired));
    UploadOutcome {
        stored: u32::try_from(stored).unwrap_or(0),
        expired_removed: u64::try_from(expired).unwrap_or(0),
        status: build_status(rows.into_iter().map(|r| r.status).collect(), now_unix),
    }
}

impl PgStore {
    /// The request connections.
    fn db(&self) -> &Connections {
        &self.db
    }

    /// Connects and applies the Postgres migrations.
    ///
    /// The first connection is opened directly so that a start-up failure reports its cause;
    /// the pool itself opens connections on demand and replaces broken ones, so the store
    /// recovers by itself when the database comes back.
    pub async fn connect(options: &ConnectOptions) -> Result<Self, ConnectError> {
        let mut base = PgConnectOptions::from_str(&options.url)
            .map_err(|e| ConnectError::Url(format!("cannot parse the Postgres URL: {e}")))?;
        if base.get_application_name().is_none() {
            base = base.application_name("keypackage-server");
        }
        if options.pgbouncer {
            // PgBouncer refuses startup parameters it does not know, and sqlx's
            // `extra_float_digits` (which only affects text-format floats) is one of them.
            base = base.extra_float_digits(None);
        }

        // Migrations run without the request timeouts: they may legitimately wait for another
        // process that is migrating the same database.
        let mut conn =
            tokio::time::timeout(options.acquire_timeout, PgConnection::connect_with(&base))
                .await
                .map_err(|_| ConnectError::TimedOut(options.acquire_timeout))?
                .map_err(ConnectError::Open)?;
        if options.pgbouncer {
            migrate_in_one_transaction(&mut conn).await?;
        } else {
            MIGRATOR.run(&mut conn).await?;
        }
        if options.postgres_partitions > 0 {
            partition_tables(&mut conn, options.postgres_partitions)
                .await
                .map_err(ConnectError::Partition)?;
        }
        let _ = conn.close().await;

        // Server-side bounds, so a request never waits on the database longer than this
        // (a lock held by a stuck client included); 0 would mean "no limit" to Postgres.
        // Behind PgBouncer a session's settings would follow the server session to whichever
        // client gets it next (and PgBouncer drops `options`), so they are set per transaction.
        let timeout_ms = options.statement_timeout.as_millis().max(1).to_string();
        let timeouts = [
            ("statement_timeout", &timeout_ms),
            ("lock_timeout", &timeout_ms),
            ("idle_in_transaction_session_timeout", &timeout_ms),
        ];
        let (pooled, bouncer) = if options.pgbouncer {
            let begin = timeouts.iter().fold("BEGIN".to_owned(), |sql, (name, ms)| {
                format!("{sql}; SET LOCAL {name} = {ms}")
            });
            (base, Some(begin))
        } else {
            (base.options(timeouts), None)
        };
        let max_connections = options.max_connections.max(1);
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(options.acquire_timeout)
            .connect_lazy_with(pooled.clone());
        let pool = Checkout::new(pool, max_connections, options.acquire_timeout);
        let probe = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(options.acquire_timeout)
            .connect_lazy_with(pooled);
        let slots = usize::try_from(max_connections / CLAIM_SLOTS_PER_CONNECTION)
            .unwrap_or(usize::MAX)
            .max(1);
        let db = Arc::new(Connections { pool, bouncer });
        Ok(Self {
            claims: Arc::new(Batcher::new(Claims(db.clone()), slots, MAX_CLAIM_BATCH)),
            uploads: Arc::new(Batcher::new(Uploads(db.clone()), slots, MAX_UPLOAD_BATCH)),
            db,
            probe,
        })
    }

    /// Batches of two claims or more run so far, and the claims they held (see
    /// [`super::batch`]).
    pub fn claim_batches(&self) -> (u64, u64) {
        self.claims.batches()
    }

    /// Claims waiting for a claim slot now.
    pub fn claims_waiting(&self) -> usize {
        self.claims.waiting()
    }

    /// Runs `claims` as one batch, as the claim queue does under load, whatever the load; they
    /// must name pairwise distinct targets and callers. For comparing batches with the same
    /// claims one by one.
    pub async fn consume_together(
        &self,
        claims: &[Claim<'_>],
    ) -> Result<Vec<Consumption>, StoreError> {
        let args: Vec<ClaimArgs> = claims.iter().map(claim_args).collect();
        let rows = self.claims.run_together(&args).await?;
        rows.into_iter().map(consumption).collect()
    }

    /// Batches of two uploads or more run so far, and the uploads they held.
    pub fn upload_batches(&self) -> (u64, u64) {
        self.uploads.batches()
    }

    /// Uploads waiting for an upload slot now.
    pub fn uploads_waiting(&self) -> usize {
        self.uploads.waiting()
    }

    /// Runs `uploads` (user, upload, now in Unix seconds) as one batch, as the upload queue
    /// does under load, whatever the load; the users must be pairwise distinct. For comparing
    /// batches with the same uploads one by one.
    pub async fn upload_together(
        &self,
        uploads: &[(&UserId, &Upload, i64)],
    ) -> Result<Vec<UploadOutcome>, StoreError> {
        let args: Vec<UploadArgs> = uploads
            .iter()
            .map(|(user, upload, now_unix)| UploadArgs {
                user: user.as_str().to_owned(),
                upload: (*upload).clone(),
                now_unix: *now_unix,
            })
            .collect();
        let rows = self.uploads.run_together(&args).await?;
        Ok(args
            .iter()
            .zip(rows)
            .map(|(args, rows)| upload_outcome(rows, args.now_unix))
            .collect())
    }

    /// Runs a pruning statement ([`PRUNE_BUDGETS`], [`PRUNE_REPLAYS`]): $1 now (µs) or NULL,
    /// $2 the most rows to drop.
    async fn prune(&self, sql: &str, now_us: Option<i64>, limit: u32) -> Result<u64, StoreError> {
        let mut lease = self.db().lease().await?;
        let mut session = self.db().session(&mut lease).await?;
        let done = self
            .db()
            .query(sql)
            .bind(now_us)
            .bind(i64::from(limit))
            .execute(session.conn())
            .await?;
        session.finish().await?;
        lease.release();
        Ok(done.rows_affected())
    }

    async fn status_in(
        &self,
        conn: &mut PgConnection,
        user: &UserId,
        now_unix: i64,
    ) -> Result<Status, StoreError> {
        let rows: Vec<StatusRow> = self
            .db()
            .query_as(STATUS)
            .bind(user.as_str())
            .bind(now_key(now_unix).as_slice())
            .fetch_all(conn)
            .await?;
        Ok(build_status(rows, now_unix))
    }
}

#[async_trait]
impl KeyPackageStore for PgStore {
    async fn upload(
        &self,
        user: &UserId,
        upload: &Upload,
        now_unix: i64,
    ) -> Result<UploadOutcome, StoreError> {
        let rows = self
            .uploads
            .submit(UploadArgs {
                user: user.as_str().to_owned(),
                upload: upload.clone(),
                now_unix,
            })
            .await?;
        Ok(upload_outcome(rows, now_unix))
    }

    async fn consume(&self, claim: &Claim<'_>) -> Result<Consumption, StoreError> {
        let row = self.claims.submit(claim_args(claim)).await?;
        consumption(row)
    }
    async fn status(&self, user: &UserId, now_unix: i64) -> Result<Status, StoreError> {
        let mut lease = self.db().lease().await?;
        let mut session = self.db().session(&mut lease).await?;
        let status = self.status_in(session.conn(), user, now_unix).await?;
        session.finish().await?;
        lease.release();
        Ok(status)
    }

    async fn read_stored_facts(&self, limit: u32) -> Result<u64, StoreError> {
        let mut lease = self.db().lease().await?;
        let mut tx = self.db().begin(&mut lease).await?;
        let mut unread: Vec<UnreadRow> = self
            .db()
            .query_as(UNREAD_REGULAR)
            .bind(i64::from(limit))
            .fetch_all(&mut *tx)
            .await?;
        let room = u64::from(limit).saturating_sub(unread.len() as u64);
        if room > 0 {
            let last_resort: Vec<UnreadRow> = self
                .db()
                .query_as(UNREAD_LAST_RESORT)
                .bind(room as i64)
                .fetch_all(&mut *tx)
                .await?;
            unread.extend(last_resort);
        }
        for row in &unread {
            let facts = FactColumns::read(&row.data);
            let query = match row.seq {
                Some(seq) => self.db().query(SET_FACTS).bind(&row.user_id).bind(seq),
                None => self
                    .db()
                    .query(SET_LAST_RESORT_FACTS)
                    .bind(row.user_id.as_str()),
            };
            query
                .bind(facts.cipher_suite)
                .bind(facts.not_after.map(Vec::from))
                .bind(facts.key_package_ref)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        lease.release();
        Ok(unread.len() as u64)
    }

    async fn delete_all(&self, user: &UserId) -> Result<(), StoreError> {
        let mut lease = self.db().lease().await?;
        let mut tx = self.db().begin(&mut lease).await?;
        for statement in [DELETE_LAST_RESORT, DELETE_REGULAR] {
            self.db()
                .query(statement)
                .bind(user.as_str())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        lease.release();
        Ok(())
    }

    async fn fingerprint(&self, user: &UserId) -> Result<Option<(Fingerprint, i64)>, StoreError> {
        let mut lease = self.db().lease().await?;
        let mut session = self.db().session(&mut lease).await?;
        let row: Option<FingerprintRow> = self
            .db()
            .query_as(FINGERPRINT)
            .bind(user.as_str())
            .fetch_optional(session.conn())
            .await?;
        session.finish().await?;
        lease.release();
        Ok(row.and_then(FingerprintRow::into_pair))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        // A simple query: one round trip, no prepared statement, fine behind PgBouncer too.
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

/// The earliest `not_after` key among the upload's regular packages, `None` if none has one.
fn earliest_not_after(upload: &Upload) -> Option<[u8; 8]> {
    upload
        .regular
        .iter()
        .filter_map(|p| p.facts().map(|f| f.not_after))
        .min()
        .map(not_after_key)
}

/// Converts plain tables to `partitions` hash partitions ([`PARTITION_TABLES`]) in one
/// transaction, after other processes doing the same.
async fn partition_tables(conn: &mut PgConnection, partitions: u16) -> Result<(), sqlx::Error> {
    let mut tx = conn.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(PARTITION_LOCK)
        .execute(&mut *tx)
        .await?;
    sqlx::query("SELECT set_config('kps.partitions', $1, true)")
        .bind(partitions.to_string())
        .execute(&mut *tx)
        .await?;
    sqlx::raw_sql(PARTITION_TABLES).execute(&mut *tx).await?;
    tx.commit().await
}

/// Applies the migrations behind PgBouncer's transaction pooling, where a server session is
/// this client's only while a transaction is open: sqlx's session-level advisory lock and the
/// statements it prepares by name would stay behind on sessions that other clients get next.
/// So everything runs in one transaction, on one server session: a transaction-scoped lock
/// serialises processes that start at once, and the named statements are deallocated before
/// the session is handed back (and before use, in case an earlier run left some).
async fn migrate_in_one_transaction(conn: &mut PgConnection) -> Result<(), ConnectError> {
    let mut tx = conn.begin().await.map_err(ConnectError::Open)?;
    sqlx::raw_sql(&format!(
        "DEALLOCATE ALL; SELECT pg_advisory_xact_lock({PGBOUNCER_MIGRATION_LOCK})"
    ))
    .execute(&mut *tx)
    .await
    .map_err(ConnectError::Open)?;
    // Inside this transaction sqlx runs each migration in a savepoint.
    let mut migrator = sqlx::migrate!("./migrations/postgres");
    migrator.set_locking(false);
    migrator.run(&mut *tx).await?;
    sqlx::raw_sql("DEALLOCATE ALL")
        .execute(&mut *tx)
        .await
        .map_err(ConnectError::Open)?;
    tx.commit().await.map_err(ConnectError::Open)
}

/// The arguments of [`CONSUME`] for `claim`.
fn claim_args(claim: &Claim<'_>) -> ClaimArgs {
    let caller = claim.caller.as_ref();
    let stage = |budget: Option<Budget>| {
        let budget = budget.filter(|_| caller.is_some());
        (
            budget.map(|b| b.interval_us()),
            budget.map(|b| b.window_us()),
        )
    };
    let (caller_interval_us, caller_window_us) = stage(caller.and_then(|c| c.budget));
    let (pair_interval_us, pair_window_us) = stage(caller.and_then(|c| c.pair_budget));
    let key = caller.and_then(|c| c.idempotency);
    ClaimArgs {
        target: claim.target.as_str().to_owned(),
        caller: caller.map(|c| c.id.as_str().to_owned()),
        key: key.map(|(k, _)| k.as_str().to_owned()),
        ttl_us: key.map_or(0, |(_, ttl)| micros(ttl)),
        now_us: claim.now_us,
        suites: (!claim.suites.is_empty())
            .then(|| claim.suites.iter().map(|&s| s.into()).collect()),
        target_interval_us: claim.budget.interval_us(),
        target_window_us: claim.budget.window_us(),
        caller_interval_us,
        caller_window_us,
        pair_interval_us,
        pair_window_us,
    }
}

/// What a claim's row means.
fn consumption(row: ConsumeRow) -> Result<Consumption, StoreError> {
    let expired_removed = u64::try_from(row.expired_removed).unwrap_or(0);
    let wait = std::time::Duration::from_micros(
        row.wait_us.and_then(|w| u64::try_from(w).ok()).unwrap_or(0),
    );
    let refused = |scope| ConsumeOutcome::RateLimited {
        retry_after: wait,
        scope,
    };
    let outcome = match (row.outcome.as_str(), row.package) {
        ("package", Some(package)) => ConsumeOutcome::Consumed(package.into()),
        ("replayed", Some(package)) => ConsumeOutcome::Replayed(package.into()),
        ("reused", _) => ConsumeOutcome::KeyReused,
        ("incompatible", _) => ConsumeOutcome::Incompatible,
        ("empty", _) => ConsumeOutcome::Empty,
        ("caller", _) => refused(Scope::Caller),
        ("pair", _) => refused(Scope::Pair),
        ("target", _) => refused(Scope::Target),
        (other, _) => {
            return Err(StoreError::Database(sqlx::Error::Protocol(format!(
                "kps_claim returned an unknown outcome {other:?}"
            ))))
        }
    };
    Ok(Consumption {
        outcome,
        expired_removed,
    })
}

/// A [`CONSUME`] row: the outcome, the wait when a budget refused, the package handed out or
/// replayed.
struct ConsumeRow {
    outcome: String,
    wait_us: Option<i64>,
    expired_removed: i64,
    package: Option<ConsumedRow>,
}

impl<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> for ConsumeRow {
    fn from_row(row: &'r sqlx::postgres::PgRow) -> Result<Self, sqlx::Error> {
        use sqlx::Row;
        let outcome = row.try_get("outcome")?;
        let wait_us = row.try_get("wait_us")?;
        let expired_removed = row.try_get("expired_removed")?;
        // The package columns are NULL together when nothing was handed out.
        let data: Option<Vec<u8>> = row.try_get("data")?;
        let package = match data {
            Some(_) => Some(ConsumedRow::from_row(row)?),
            None => None,
        };
        Ok(Self {
            outcome,
            wait_us,
            expired_removed,
            package,
        })
    }
}

/// An [`UPLOAD`] row: a row of the status query, with the counts of the upload repeated.
#[derive(sqlx::FromRow)]
struct UploadRow {
    stored: i64,
    expired: i64,
    #[sqlx(flatten)]
    status: StatusRow,
}
