//! Postgres-side tools for fault and pooling tests: the admin URL and name of a test database,
//! one-off admin statements, and a user's row lock held open to park uploads inside Postgres.

use crate::harness::TestDb;

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
