//! Group commit for SQLite's single writer.
//!
//! A durable SQLite commit (`synchronous=FULL`) syncs the write-ahead log: a few hundred µs of
//! waiting on the disk, during which the file's one write lock is held and nothing else can
//! be written. So writes that arrive together share one transaction and one sync. Each call
//! takes a [`Turn`]: the writer's connection, inside the transaction that is open (or a new
//! one), within a savepoint of its own. Its statements run in its own future, as they would
//! in a transaction of its own; a call that fails rolls back to its savepoint, undoing only
//! its own writes. A call that succeeds waits until a committer task has committed the
//! transaction, and only then answers: nothing is acknowledged before it is durable, and
//! calls are applied in the order they took the lock, as one writer would apply them.
//!
//! The committer queues for the lock like any call (the lock is fair): calls that queued
//! before it join the open transaction, so under load a transaction carries as many calls as
//! arrive during one commit, and a lone call commits at once.

use std::{
    ops::{Deref, DerefMut},
    sync::Arc,
};

use sqlx::{Executor, SqliteConnection};
use tokio::sync::{oneshot, watch, Mutex, MutexGuard, Notify};

use super::StoreError;

/// How a transaction ended, as the calls in it learn it.
type Outcome = Option<Result<(), String>>;

/// The writer's connection and the transaction open on it.
pub(super) struct GroupCommit {
    inner: Arc<Inner>,
    /// Dropped with the store, which ends the committer task.
    _stop: oneshot::Sender<()>,
}

struct Inner {
    state: Mutex<State>,
    /// Signalled when a call left work to commit.
    pending: Notify,
}

struct State {
    conn: SqliteConnection,
    /// The open transaction's outcome, sent once it is committed or rolled back.
    open: Option<watch::Sender<Outcome>>,
    /// A call was dropped inside its savepoint (a cancelled request): undo its writes first.
    abandoned: bool,
}

impl GroupCommit {
    /// Takes over `conn` and starts the committer task.
    pub(super) fn new(conn: SqliteConnection) -> Self {
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                conn,
                open: None,
                abandoned: false,
            }),
            pending: Notify::new(),
        });
        let (stop, stopped) = oneshot::channel();
        tokio::spawn(commit_batches(inner.clone(), stopped));
        Self { inner, _stop: stop }
    }

    /// The writer's connection for one call, inside a transaction holding the file's write
    /// lock, within a savepoint of the call's own. Failing to begin means the database is
    /// unavailable for now (another process holds the lock beyond the busy timeout).
    pub(super) async fn turn(&self) -> Result<Turn<'_>, StoreError> {
        let mut state = self.inner.state.lock().await;
        state.recover().await;
        if state.open.is_none() {
            state
                .conn
                .execute("BEGIN IMMEDIATE")
                .await
                .map_err(StoreError::Unavailable)?;
            state.open = Some(watch::channel(None).0);
        }
        if let Err(e) = state.conn.execute("SAVEPOINT call").await {
            // The transaction is still open, and the committer ends it.
            self.inner.pending.notify_one();
            return Err(e.into());
        }
        state.abandoned = true;
        Ok(Turn {
            state: Some(state),
            inner: &self.inner,
        })
    }
}

impl State {
    /// Undoes what a dropped call left in its savepoint; if even that fails, rolls back the
    /// whole transaction, which then fails for every call in it.
    async fn recover(&mut self) {
        if !self.abandoned {
            return;
        }
        self.abandoned = false;
        let undone = self.conn.execute("ROLLBACK TO call; RELEASE call").await;
        if let Err(e) = undone {
            tracing::warn!(error = %e, "cannot undo an abandoned write; rolling back");
            self.end("ROLLBACK", Some(e.to_string())).await;
        }
    }

    /// Ends the open transaction with `sql` and tells its calls; `failed` overrides success.
    async fn end(&mut self, sql: &str, failed: Option<String>) {
        let Some(open) = self.open.take() else {
            return;
        };
        let ended = self.conn.execute(sql).await;
        let outcome = match (failed, ended) {
            (Some(reason), _) => Err(reason),
            (None, Ok(_)) => Ok(()),
            (None, Err(e)) => {
                // A failed COMMIT may leave the transaction open: end it.
                let _ = self.conn.execute("ROLLBACK").await;
                Err(e.to_string())
            }
        };
        let _ = open.send(Some(outcome));
    }
}

/// One call's share of the open transaction; see [`GroupCommit::turn`]. Dropped without
/// [`Turn::commit`], its writes are undone.
pub(super) struct Turn<'a> {
    state: Option<MutexGuard<'a, State>>,
    inner: &'a Inner,
}

impl Turn<'_> {
    /// Keeps this call's writes and waits until the transaction holding them is committed.
    pub(super) async fn commit(mut self) -> Result<(), StoreError> {
        let mut state = self
            .state
            .take()
            .expect("a turn holds the lock until it ends");
        let kept = state.conn.execute("RELEASE call").await;
        if let Err(e) = kept {
            // Left abandoned: the next holder of the lock undoes it.
            drop(state);
            self.inner.pending.notify_one();
            return Err(e.into());
        }
        state.abandoned = false;
        let mut done = state
            .open
            .as_ref()
            .expect("a turn runs inside an open transaction")
            .subscribe();
        drop(state);
        self.inner.pending.notify_one();
        let outcome = done
            .wait_for(Option::is_some)
            .await
            .map(|o| o.clone())
            .unwrap_or(Some(Err("the writer stopped".to_owned())));
        let reason = match outcome {
            Some(Ok(())) => return Ok(()),
            Some(Err(reason)) => reason,
            None => "no outcome".to_owned(),
        };
        Err(StoreError::Unavailable(sqlx::Error::Protocol(format!(
            "the transaction did not commit: {reason}"
        ))))
    }

    fn state(&self) -> &MutexGuard<'_, State> {
        self.state
            .as_ref()
            .expect("a turn holds the lock until it ends")
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        if self.state.take().is_some() {
            // `abandoned` is still set: the next holder of the lock rolls this call back,
            // and the committer ends the transaction if nobody else comes.
            self.inner.pending.notify_one();
        }
    }
}

impl Deref for Turn<'_> {
    type Target = SqliteConnection;

    fn deref(&self) -> &SqliteConnection {
        &self.state().conn
    }
}

impl DerefMut for Turn<'_> {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        &mut self
            .state
            .as_mut()
            .expect("a turn holds the lock until it ends")
            .conn
    }
}

/// Commits the open transaction whenever a call left work in it, until `stop` resolves.
async fn commit_batches(inner: Arc<Inner>, mut stop: oneshot::Receiver<()>) {
    loop {
        let notified = inner.pending.notified();
        tokio::select! {
            _ = &mut stop => break,
            () = notified => {}
        }
        let mut state = inner.state.lock().await;
        state.recover().await;
        state.end("COMMIT", None).await;
    }
    let mut state = inner.state.lock().await;
    state.recover().await;
    state.end("COMMIT", None).await;
}

#[cfg(test)]
mod tests {
    use sqlx::Connection;

    use super::*;

    async fn writer() -> (GroupCommit, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("kps-group-{:016x}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let url = format!("sqlite://{}?mode=rwc", dir.join("db.sqlite").display());
        let mut conn = SqliteConnection::connect(&url).await.unwrap();
        conn.execute("PRAGMA journal_mode = WAL; CREATE TABLE t (x INTEGER)")
            .await
            .unwrap();
        (GroupCommit::new(conn), dir)
    }

    async fn rows(group: &GroupCommit) -> Vec<i64> {
        let mut turn = group.turn().await.unwrap();
        let rows = sqlx::query_scalar("SELECT x FROM t ORDER BY x")
            .fetch_all(&mut *turn)
            .await
            .unwrap();
        turn.commit().await.unwrap();
        rows
    }

    #[tokio::test]
    async fn a_committed_call_is_kept_and_a_dropped_one_is_undone_alone() {
        let (group, dir) = writer().await;
        let mut kept = group.turn().await.unwrap();
        kept.execute("INSERT INTO t VALUES (1)").await.unwrap();
        kept.commit().await.unwrap();

        let mut dropped = group.turn().await.unwrap();
        dropped.execute("INSERT INTO t VALUES (2)").await.unwrap();
        drop(dropped);

        assert_eq!(rows(&group).await, vec![1]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn calls_that_queue_together_all_commit_in_lock_order() {
        let (group, dir) = writer().await;
        // Holding the lock, this call makes the others queue behind it.
        let mut first = group.turn().await.unwrap();
        first.execute("INSERT INTO t VALUES (0)").await.unwrap();
        let others = (1..=5).map(|i| {
            let group = &group;
            async move {
                let mut turn = group.turn().await.unwrap();
                sqlx::query("INSERT INTO t VALUES ($1)")
                    .bind(i)
                    .execute(&mut *turn)
                    .await
                    .unwrap();
                // Inside the shared transaction: every earlier call's row is visible.
                let seen: i64 = sqlx::query_scalar("SELECT count(*) FROM t")
                    .fetch_one(&mut *turn)
                    .await
                    .unwrap();
                turn.commit().await.unwrap();
                seen
            }
        });
        let joined = async {
            let (seen, ()) = tokio::join!(futures::future::join_all(others), async {
                tokio::task::yield_now().await;
                first.commit().await.unwrap();
            });
            seen
        };
        let seen = joined.await;
        assert_eq!(rows(&group).await, vec![0, 1, 2, 3, 4, 5]);
        // The calls saw one another's uncommitted rows in lock order: one transaction.
        assert_eq!(seen, vec![2, 3, 4, 5, 6]);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
