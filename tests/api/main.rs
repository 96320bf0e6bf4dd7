//! The one integration-test binary: a real server on a fresh database per test.
//! Set `TEST_DATABASE_URL=postgres://…` to run every test on Postgres instead of SQLite, and
//! `TEST_LOG=1` to see the servers' logs.

#[macro_use]
mod harness;

mod attack;
mod auth;
mod backfill;
mod batches;
mod claims;
mod cold_start;
mod consume;
mod consume_v11;
mod crash;
mod edges;
mod faults;
mod fingerprint;
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
mod partitions;
mod pg_admin;
mod pg_cluster;
mod pg_tls;
mod pgbouncer;
mod readiness;
mod status;
mod store;
mod upload;
mod upload_v11;
