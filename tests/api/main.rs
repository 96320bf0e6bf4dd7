//! The one integration-test binary: a real server on a fresh database per test.
//! Set `TEST_DATABASE_URL=postgres://…` to run every test on Postgres instead of SQLite.

mod auth;
mod consume;
mod fingerprint;
mod helpers;
mod model;
mod negotiation;
mod openmls_flow;
mod ops;
mod status;
mod store;
mod upload;
