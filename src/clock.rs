//! Wall-clock time as the server records it. Budgets shared by several processes take their
//! time from the database instead (see `store`); this clock serves everything else.

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch.
pub fn unix_seconds() -> i64 {
    unix_micros() / 1_000_000
}

/// Milliseconds since the Unix epoch.
pub fn unix_millis() -> i64 {
    unix_micros() / 1_000
}

/// Microseconds since the Unix epoch.
pub fn unix_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}
