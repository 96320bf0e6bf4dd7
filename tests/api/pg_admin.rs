//! Postgres-side tools for fault and pooling tests: the admin URL and name of a test database,
//! one-off admin statements, and a user's row lock held open to park uploads inside Postgres.

use std::time::Duration;

use sqlx::Connection;
use tokio::time::Instant;

use crate::harness::{TestDb, PROCESS_PATIENCE};

/// The database name at the end of a test database's URL.
pub(crate) fn db_name(db: &TestDb) -> String {
    let last = db.url.rsplit('/').next().expect("a path");
    last.split('?').next().unwrap_or(last).to_owned()
}

/// The URL of database `postgres` on the server `db` lives on (trust auth, superuser).
pub(crate) fn admin_url_of(db: &TestDb) -> String {
    let base = db.url.rsplit_once('/').expect("a path").0;
    format!("{base}/postgres")
}

/// Runs one statement on a fresh admin connection.
pub(crate) async fn admin_sql(admin_url: &str, statement: &str) {
    let mut conn = sqlx::PgConnection::connect(admin_url)
        .await
        .expect("admin connection");
    sqlx::raw_sql(statement)
        .execute(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("{statement}: {e}"));
    let _ = conn.close().await;
}

/// Sessions on database `name` waiting for a lock.
pub(crate) async fn lock_waiters(admin: &mut sqlx::PgConnection, name: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND wait_event_type = 'Lock'",
    )
    .bind(name)
    .fetch_one(admin)
    .await
    .expect("count lock waiters")
}

/// Polls (bounded) until `n` sessions on database `name` wait for a lock.
pub(crate) async fn wait_for_lock_waiters(admin: &mut sqlx::PgConnection, name: &str, n: i64) {
    let deadline = Instant::now() + PROCESS_PATIENCE;
    while lock_waiters(admin, name).await < n {
        assert!(
            Instant::now() < deadline,
            "{n} sessions never waited on the lock"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Takes `user`'s row lock (the one uploads take first) in a transaction left open.
pub(crate) async fn lock_user_row(url: &str, user: &str) -> sqlx::PgConnection {
    let mut conn = sqlx::PgConnection::connect(url).await.expect("connect");
    sqlx::raw_sql(&format!(
        "BEGIN; SELECT user_id FROM users WHERE user_id = '{user}' FOR UPDATE"
    ))
    .execute(&mut conn)
    .await
    .expect("lock the user row");
    conn
}
