//! Backend-agnostic cases every store must pass.
