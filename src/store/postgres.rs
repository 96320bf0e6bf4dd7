//! The production backend: Postgres, shared by any number of server processes.

use async_trait::async_trait;

use super::{Budget, ConnectOptions, ConsumeOutcome, KeyPackageStore, Status, StoreError, Upload, UploadOutcome};
use crate::key_package::{Fingerprint, UserId};

/// Key packages in a Postgres database.
#[derive(Clone, Debug)]
pub struct PgStore {
    pool: sqlx::PgPool,
}

impl PgStore {
    /// Connects and applies the Postgres migrations.
    pub async fn connect(_options: &ConnectOptions) -> Result<Self, StoreError> {
        Err(StoreError::Config("the Postgres backend is not built yet".into()))
    }
}

#[async_trait]
impl KeyPackageStore for PgStore {
    async fn upload(&self, _: &UserId, _: &Upload, _: i64) -> Result<UploadOutcome, StoreError> {
        unimplemented!()
    }
    async fn consume(&self, _: &UserId, _: Budget, _: i64) -> Result<ConsumeOutcome, StoreError> {
        unimplemented!()
    }
    async fn status(&self, _: &UserId) -> Result<Status, StoreError> {
        unimplemented!()
    }
    async fn delete_all(&self, _: &UserId) -> Result<(), StoreError> {
        unimplemented!()
    }
    async fn fingerprint(&self, _: &UserId) -> Result<Option<(Fingerprint, i64)>, StoreError> {
        unimplemented!()
    }
    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
    async fn prune_budgets(&self, _: i64) -> Result<u64, StoreError> {
        unimplemented!()
    }
}
