//! The one integration-test binary: a real server on a fresh database per test.
//! Set `TEST_DATABASE_URL=postgres://…` to run every test on Postgres instead of SQLite.

mod attack;
mod auth;
mod consume;
mod crash;
mod fingerprint;
mod helpers;
mod lifecycle;
mod mls_hostile;
mod mls_interop;
mod mls_oracle;
mod model;
mod multiprocess;
mod negotiation;
mod openmls_flow;
mod ops;
mod outage;
mod process;
mod status;
mod store;
mod upload;
