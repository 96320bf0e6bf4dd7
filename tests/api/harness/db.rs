//! One database per test: a fresh SQLite file, or a fresh database on the Postgres server
//! `TEST_DATABASE_URL` names; removed when dropped.

use std::{path::PathBuf, sync::Arc};

use keypackage_server::store::{self, Backend, ConnectOptions, KeyPackageStore};

/// `TEST_DATABASE_URL` when it names a Postgres server: tests then run on Postgres.
pub(crate) fn postgres_admin_url() -> Option<String> {
    std::env::var("TEST_DATABASE_URL")
        .ok()
        .filter(|u| matches!(Backend::from_url(u), Ok(Backend::Postgres)))
}

/// Store options for `url`: with `TEST_POSTGRES_PARTITIONS=N` and a Postgres URL, the
/// partitioned schema variant (`KPS_POSTGRES_PARTITIONS`), so the whole suite can run on it.
pub(crate) fn connect_options(url: &str) -> ConnectOptions {
    let mut options = ConnectOptions::new(url);
    if matches!(Backend::from_url(url), Ok(Backend::Postgres)) {
        options.postgres_partitions = test_partitions();
    }
    options
}

/// `TEST_POSTGRES_PARTITIONS`, or 0 (plain tables).
pub(crate) fn test_partitions() -> u16 {
    std::env::var("TEST_POSTGRES_PARTITIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A database of its own for one test, removed when dropped.
pub(crate) struct TestDb {
    /// URL the server should use.
    pub(crate) url: String,
    cleanup: Cleanup,
}

enum Cleanup {
    Dir(PathBuf),
    Postgres { admin_url: String, name: String },
}

fn unique_name(prefix: &str) -> String {
    format!(
        "{prefix}_{}_{:016x}",
        std::process::id(),
        rand::random::<u64>()
    )
}

impl TestDb {
    /// A fresh, empty database on the backend this test run targets.
    pub(crate) async fn new() -> Self {
        match postgres_admin_url() {
            Some(admin_url) => Self::postgres(&admin_url).await,
            None => Self::sqlite(),
        }
    }

    /// A fresh SQLite file in a temporary directory.
    pub(crate) fn sqlite() -> Self {
        let dir = std::env::temp_dir().join(unique_name("kps_test"));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        Self {
            url: format!("sqlite://{}", dir.join("test.db").display()),
            cleanup: Cleanup::Dir(dir),
        }
    }

    /// A fresh database on the Postgres server `admin_url` points at.
    pub(crate) async fn postgres(admin_url: &str) -> Self {
        use sqlx::Connection;
        let name = unique_name("kps_test");
        let mut conn = sqlx::PgConnection::connect(admin_url)
            .await
            .expect("connect to TEST_DATABASE_URL");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .expect("create test database");
        let base = admin_url.rsplit_once('/').map_or(admin_url, |(b, _)| b);
        Self {
            url: format!("{base}/{name}"),
            cleanup: Cleanup::Postgres {
                admin_url: admin_url.to_owned(),
                name,
            },
        }
    }

    /// True when this database is Postgres.
    pub(crate) fn is_postgres(&self) -> bool {
        matches!(self.cleanup, Cleanup::Postgres { .. })
    }

    /// Opens the store on this database (applying migrations).
    pub(crate) async fn store(&self) -> Arc<dyn KeyPackageStore> {
        store::connect(&connect_options(&self.url))
            .await
            .expect("open store")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        match &self.cleanup {
            Cleanup::Dir(dir) => {
                let _ = std::fs::remove_dir_all(dir);
            }
            Cleanup::Postgres { admin_url, name } => {
                let (admin_url, name) = (admin_url.clone(), name.clone());
                // Drop runs inside the test's runtime; use a thread with its own.
                let _ = std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("runtime");
                    rt.block_on(async move {
                        use sqlx::Connection;
                        if let Ok(mut conn) = sqlx::PgConnection::connect(&admin_url).await {
                            let _ = sqlx::query(&format!(
                                "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                            ))
                            .execute(&mut conn)
                            .await;
                        }
                    });
                })
                .join();
            }
        }
    }
}

/// A fresh Postgres database for a Postgres-only test, or `None` (with a "skipped" note naming
/// `test`) when the run targets SQLite. Called through [`postgres_only!`](crate::postgres_only).
pub(crate) async fn postgres_db(test: &str) -> Option<TestDb> {
    match postgres_admin_url() {
        Some(admin) => Some(TestDb::postgres(&admin).await),
        None => {
            eprintln!("{test}: skipped, needs TEST_DATABASE_URL=postgres://…");
            None
        }
    }
}
