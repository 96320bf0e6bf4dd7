//! The one integration-test binary: a real server on a fresh database per test.
//! Set `TEST_DATABASE_URL=postgres://…` to run every test on Postgres instead of SQLite.

mod helpers;
mod smoke;
mod model;
