//! Logs during tests: silent unless `TEST_LOG` is set, then in-process servers log through a
//! `tracing` subscriber into the test's output (`RUST_LOG` filters, `info` by default).

use std::sync::Once;

/// True when `TEST_LOG` is set (to anything).
pub(crate) fn enabled() -> bool {
    std::env::var_os("TEST_LOG").is_some()
}

/// Installs the subscriber once per test binary, when [`enabled`].
pub(crate) fn init() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        if enabled() {
            let filter = tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
            let _ = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_test_writer()
                .try_init();
        }
    });
}
