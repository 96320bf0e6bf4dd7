//! Connections kept checked out of a sqlx pool between calls.
//!
//! sqlx 0.8 tests every connection it takes back with a round trip to the database (the
//! release ping of `PoolConnection`, which cannot be turned off), and by default every
//! connection it lends (`test_before_acquire`). On a consume that is two round trips beside
//! the one that does the work: about a fifth of the server's CPU and of the database's. A
//! [`Checkout`] lends connections from a free list of its own instead, and gives a connection
//! back to the sqlx pool only when a call did not end cleanly (an error, a cancelled request):
//! then the pool's release ping flushes a pending rollback or discards a broken connection.
//!
//! The sqlx pool still opens connections, bounds their number and times out; the checkout's
//! semaphore has the same number of permits, so a caller holding a permit always finds a
//! connection on the free list or room in the pool.

use std::{
    ops::{Deref, DerefMut},
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

use sqlx::{pool::PoolConnection, Connection, Database, Pool};
use tokio::sync::{Semaphore, SemaphorePermit};

/// A connection idle on the free list for longer than this is tested (one round trip) before
/// it is lent again: the database may have closed it meanwhile (a restart, an idle timeout).
/// Connections in use are never idle that long; at a request rate low enough for them to be,
/// the round trip costs nothing that matters.
pub(super) const TEST_AFTER_IDLE: Duration = Duration::from_secs(5);

/// A free list of connections in front of a sqlx [`Pool`].
pub(super) struct Checkout<DB: Database> {
    pool: Pool<DB>,
    permits: Semaphore,
    idle: Mutex<Vec<Idle<DB>>>,
    acquire_timeout: Duration,
}

/// A connection on the free list, and since when.
struct Idle<DB: Database> {
    conn: PoolConnection<DB>,
    since: Instant,
}

impl<DB: Database> Checkout<DB> {
    /// Lends at most `max_connections` connections of `pool` at once (the pool's own bound),
    /// each within `acquire_timeout`.
    pub(super) fn new(pool: Pool<DB>, max_connections: u32, acquire_timeout: Duration) -> Self {
        Self {
            pool,
            permits: Semaphore::new(max_connections.max(1) as usize),
            idle: Mutex::new(Vec::new()),
            acquire_timeout,
        }
    }

    /// A connection: the most recently returned one (tested first if it was idle for long),
    /// or else one from the pool. Fails with `PoolTimedOut` after the acquire timeout.
    pub(super) async fn lease(&self) -> Result<Lease<'_, DB>, sqlx::Error> {
        let deadline = tokio::time::Instant::now() + self.acquire_timeout;
        let permit = tokio::time::timeout_at(deadline, self.permits.acquire())
            .await
            .map_err(|_| sqlx::Error::PoolTimedOut)?
            .map_err(|_| sqlx::Error::PoolClosed)?;
        while let Some(Idle { mut conn, since }) = self.pop_idle() {
            if since.elapsed() < TEST_AFTER_IDLE || conn.ping().await.is_ok() {
                return Ok(Lease::new(conn, self, permit));
            }
            // Broken: closing it gives its place in the pool back.
            conn.close_on_drop();
        }
        let conn = tokio::time::timeout_at(deadline, self.pool.acquire())
            .await
            .map_err(|_| sqlx::Error::PoolTimedOut)??;
        Ok(Lease::new(conn, self, permit))
    }

    /// How many connections are idle on the free list.
    #[cfg(test)]
    fn idle_count(&self) -> usize {
        self.lock_idle().len()
    }

    fn pop_idle(&self) -> Option<Idle<DB>> {
        self.lock_idle().pop()
    }

    fn lock_idle(&self) -> std::sync::MutexGuard<'_, Vec<Idle<DB>>> {
        // The list is valid whatever a panicking holder was doing: pushes and pops only.
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Gives every idle connection back to the pool, which tests each and discards the broken
    /// ones: after one call failed, the others may be on connections that died the same way.
    fn return_idle(&self) {
        let idle = std::mem::take(&mut *self.lock_idle());
        drop(idle);
    }
}

impl<DB: Database> Drop for Checkout<DB> {
    fn drop(&mut self) {
        let idle = std::mem::take(self.idle.get_mut().unwrap_or_else(PoisonError::into_inner));
        if tokio::runtime::Handle::try_current().is_err() {
            // The pool takes a connection back in a task of its own, which needs a runtime;
            // without one (a store dropped after its runtime), close them here.
            for Idle { conn, .. } in idle {
                drop(conn.detach());
            }
        }
    }
}

/// A lent connection. [`Lease::release`] puts it back on the free list once a call ended
/// cleanly (its statement ran, its transaction committed); dropped without that, it goes back
/// to the sqlx pool, which flushes what is pending on it or discards it.
pub(super) struct Lease<'a, DB: Database> {
    conn: Option<PoolConnection<DB>>,
    home: &'a Checkout<DB>,
    _permit: SemaphorePermit<'a>,
}

impl<'a, DB: Database> Lease<'a, DB> {
    fn new(conn: PoolConnection<DB>, home: &'a Checkout<DB>, permit: SemaphorePermit<'a>) -> Self {
        Self {
            conn: Some(conn),
            home,
            _permit: permit,
        }
    }

    /// Puts the connection back on the free list for the next call.
    pub(super) fn release(mut self) {
        if let Some(conn) = self.conn.take() {
            self.home.lock_idle().push(Idle {
                conn,
                since: Instant::now(),
            });
        }
    }

    fn conn(&self) -> &PoolConnection<DB> {
        // `conn` is `None` only inside `release` and `drop`, which consume the lease.
        self.conn
            .as_ref()
            .expect("a lease holds its connection until it ends")
    }
}

impl<DB: Database> Drop for Lease<'_, DB> {
    fn drop(&mut self) {
        if self.conn.is_some() {
            self.home.return_idle();
        }
    }
}

impl<DB: Database> Deref for Lease<'_, DB> {
    type Target = DB::Connection;

    fn deref(&self) -> &DB::Connection {
        self.conn()
    }
}

impl<DB: Database> DerefMut for Lease<'_, DB> {
    fn deref_mut(&mut self) -> &mut DB::Connection {
        self.conn
            .as_mut()
            .expect("a lease holds its connection until it ends")
    }
}

#[cfg(test)]
mod tests {
    use sqlx::{sqlite::SqlitePoolOptions, Executor, Sqlite};

    use super::*;

    async fn checkout(max: u32) -> Checkout<Sqlite> {
        let pool = SqlitePoolOptions::new()
            .max_connections(max)
            .connect_lazy("sqlite::memory:")
            .expect("an in-memory pool");
        Checkout::new(pool, max, Duration::from_millis(200))
    }

    #[tokio::test]
    async fn a_released_connection_is_lent_again_and_a_dropped_one_goes_back_to_the_pool() {
        let checkout = checkout(2).await;
        let mut lease = checkout.lease().await.unwrap();
        // Per-connection state shows which connection comes back.
        lease.execute("CREATE TEMP TABLE mark (x)").await.unwrap();
        lease.release();
        assert_eq!(checkout.idle_count(), 1);

        let mut again = checkout.lease().await.unwrap();
        again.execute("SELECT x FROM mark").await.unwrap();
        assert_eq!(checkout.idle_count(), 0);
        drop(again);
        assert_eq!(
            checkout.idle_count(),
            0,
            "a lease that did not end cleanly is not kept"
        );
    }

    #[tokio::test]
    async fn a_failed_call_gives_every_idle_connection_back_to_the_pool() {
        let checkout = checkout(3).await;
        let first = checkout.lease().await.unwrap();
        let second = checkout.lease().await.unwrap();
        let failed = checkout.lease().await.unwrap();
        first.release();
        second.release();
        assert_eq!(checkout.idle_count(), 2);
        drop(failed);
        assert_eq!(checkout.idle_count(), 0);
    }

    #[tokio::test]
    async fn leases_are_bounded_by_the_pool_size_and_time_out() {
        let checkout = checkout(1).await;
        let held = checkout.lease().await.unwrap();
        let waited = checkout.lease().await.err();
        assert!(
            matches!(waited, Some(sqlx::Error::PoolTimedOut)),
            "{waited:?}"
        );
        held.release();
        checkout.lease().await.unwrap().release();
    }
}
