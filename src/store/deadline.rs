//! A client-side deadline on every store call, whatever the backend: a database that stops
//! answering after a query was sent (a frozen host, a partition) costs a request this long at
//! most, and reads as unavailable, instead of holding it until the request timeout.

use std::{future::Future, time::Duration};

use async_trait::async_trait;

use super::{Claim, Consumption, KeyPackageStore, Status, StoreError, Upload, UploadOutcome};
use crate::key_package::{Fingerprint, UserId};

/// Wraps a store so that each call gives up after `limit` with [`StoreError::Unavailable`].
///
/// A call cut short is dropped: its connection goes back to the pool, which tests it and
/// discards it if the conversation was left half-way; an open transaction rolls back.
pub(crate) struct Deadline<S> {
    inner: S,
    limit: Duration,
}

impl<S> Deadline<S> {
    /// `inner`, with every call bounded by `limit`.
    pub(crate) fn new(inner: S, limit: Duration) -> Self {
        Self { inner, limit }
    }

    async fn within<T>(
        &self,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.limit, call).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Unavailable(sqlx::Error::Io(
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no answer from the database within {:?}", self.limit),
                ),
            ))),
        }
    }
}

#[async_trait]
impl<S: KeyPackageStore> KeyPackageStore for Deadline<S> {
    async fn upload(
        &self,
        user: &UserId,
        upload: &Upload,
        now_unix: i64,
    ) -> Result<UploadOutcome, StoreError> {
        self.within(self.inner.upload(user, upload, now_unix)).await
    }

    async fn consume(&self, claim: &Claim<'_>) -> Result<Consumption, StoreError> {
        self.within(self.inner.consume(claim)).await
    }

    async fn status(&self, user: &UserId, now_unix: i64) -> Result<Status, StoreError> {
        self.within(self.inner.status(user, now_unix)).await
    }

    async fn read_stored_facts(&self, limit: u32) -> Result<u64, StoreError> {
        self.within(self.inner.read_stored_facts(limit)).await
    }

    async fn delete_all(&self, user: &UserId) -> Result<(), StoreError> {
        self.within(self.inner.delete_all(user)).await
    }

    async fn fingerprint(&self, user: &UserId) -> Result<Option<(Fingerprint, i64)>, StoreError> {
        self.within(self.inner.fingerprint(user)).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.within(self.inner.ping()).await
    }

    async fn prune_budgets(&self, now_us: Option<i64>, limit: u32) -> Result<u64, StoreError> {
        self.within(self.inner.prune_budgets(now_us, limit)).await
    }

    async fn prune_replays(&self, now_us: Option<i64>, limit: u32) -> Result<u64, StoreError> {
        self.within(self.inner.prune_replays(now_us, limit)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A database that took the query and never answers.
    struct Silent;

    #[async_trait]
    impl KeyPackageStore for Silent {
        async fn upload(
            &self,
            _: &UserId,
            _: &Upload,
            _: i64,
        ) -> Result<UploadOutcome, StoreError> {
            std::future::pending().await
        }
        async fn consume(&self, _: &Claim<'_>) -> Result<Consumption, StoreError> {
            std::future::pending().await
        }
        async fn status(&self, _: &UserId, _: i64) -> Result<Status, StoreError> {
            std::future::pending().await
        }
        async fn read_stored_facts(&self, _: u32) -> Result<u64, StoreError> {
            std::future::pending().await
        }
        async fn delete_all(&self, _: &UserId) -> Result<(), StoreError> {
            std::future::pending().await
        }
        async fn fingerprint(&self, _: &UserId) -> Result<Option<(Fingerprint, i64)>, StoreError> {
            std::future::pending().await
        }
        async fn ping(&self) -> Result<(), StoreError> {
            std::future::pending().await
        }
        async fn prune_budgets(&self, _: Option<i64>, _: u32) -> Result<u64, StoreError> {
            std::future::pending().await
        }
        async fn prune_replays(&self, _: Option<i64>, _: u32) -> Result<u64, StoreError> {
            std::future::pending().await
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_without_an_answer_is_unavailable_after_the_limit() {
        let store = Deadline::new(Silent, Duration::from_secs(5));
        let user = UserId::parse("bob").unwrap();
        let started = tokio::time::Instant::now();
        assert!(matches!(
            store.status(&user, 0).await,
            Err(StoreError::Unavailable(_))
        ));
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        assert!(matches!(
            store.ping().await,
            Err(StoreError::Unavailable(_))
        ));
    }
}
