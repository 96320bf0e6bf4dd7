//! keypackage-server stores MLS (RFC 9420) key packages and hands them out, one per request,
//! so that users can be added to groups while offline.
//!
//! - [`key_package`]: domain types parsed at the edge (`UserId`, `Fingerprint`, `KeyPackage`).
//! - [`mls_codec`]: the RFC 9420 KeyPackage reader (structure only, no cryptography) and its facts.
//! - [`wire`]: the protobuf messages and protobuf/JSON negotiation.
//! - [`store`]: the storage trait with SQLite and Postgres backends and their conformance suite.
//! - [`auth`]: bearer tokens; [`rate_limit`]: the consumption budget (GCRA), its in-process
//!   pre-check and pruning.
//! - [`app`], [`routes`], [`error`], [`metrics`]: the HTTP application.
//! - [`config`]: settings from flags and environment; [`clock`]: wall-clock time as stored.

pub mod app;
pub mod auth;
pub mod clock;
pub mod config;
pub mod error;
pub mod key_package;
pub mod metrics;
pub mod mls_codec;
pub mod rate_limit;
pub mod routes;
pub mod store;
pub mod wire;
