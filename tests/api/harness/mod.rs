//! The test harness. `db`: a fresh database per test; `app`: the server in-process; `process`:
//! the real binary as a child; `client`: the one typed API client both of them dereference to;
//! `raw`: hand-written HTTP/1.1; `tokens`: signing and forging JWTs; `wire`: bodies and answers.

mod app;
mod client;
mod db;
mod process;
mod raw;
mod test_log;
mod tokens;
mod wire;

use std::time::Duration;

pub(crate) use app::*;
pub(crate) use client::*;
pub(crate) use db::*;
pub(crate) use process::*;
pub(crate) use raw::*;
pub(crate) use tokens::*;
pub(crate) use wire::*;

/// Waits no longer than this for anything in tests.
pub(crate) const PATIENCE: Duration = Duration::from_secs(10);

/// A fresh Postgres database for a test that only makes sense on Postgres, or `None` after
/// printing a "skipped" note when the run targets SQLite:
/// `let Some(db) = postgres_only!() else { return };` (or `postgres_only!(name)` to name the
/// case in the note).
macro_rules! postgres_only {
    () => {{
        fn here() {}
        let name = std::any::type_name_of_val(&here);
        let name = name.trim_end_matches("::here");
        let name = name.trim_end_matches("::{{closure}}");
        $crate::harness::postgres_db(name).await
    }};
    ($name:expr) => {
        $crate::harness::postgres_db(&$name).await
    };
}

/// One consumption of any package of `target` by the clock `now_us` (`None`: the database's),
/// as the v1 tests ask for it.
pub(crate) async fn consume_at(
    store: &dyn keypackage_server::store::KeyPackageStore,
    target: &keypackage_server::key_package::UserId,
    budget: keypackage_server::rate_limit::Budget,
    now_us: Option<i64>,
) -> Result<keypackage_server::store::ConsumeOutcome, keypackage_server::store::StoreError> {
    use keypackage_server::store::Claim;
    store
        .consume(&Claim {
            now_us,
            ..Claim::new(target, budget)
        })
        .await
        .map(|c| c.outcome)
}
