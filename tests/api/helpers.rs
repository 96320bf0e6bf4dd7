//! The test harness: a fresh database per test (SQLite file, or a new Postgres database when
//! `TEST_DATABASE_URL` names a Postgres server), and an in-process server with typed helpers.

#![allow(dead_code)]

use std::{path::PathBuf, sync::Arc, time::Duration};

use keypackage_server::{
    app::{self, AppState, Limits},
    auth::{Authenticator, VerifyingKey},
    store::{self, ConnectOptions, KeyPackageStore},
    wire::{KeyPackageResponse, KeyPackageStatus, SigningKeyFingerprint, UploadKeyPackagesRequest},
};
use prost::Message;
use tokio::net::TcpListener;

/// The HS256 secret every test server uses.
pub const SECRET: &[u8] = b"test-secret-0123456789abcdef-0123456789";

/// `TEST_DATABASE_URL` when it names a Postgres server: tests then run on Postgres.
pub fn postgres_admin_url() -> Option<String> {
    std::env::var("TEST_DATABASE_URL")
        .ok()
        .filter(|u| u.starts_with("postgres://") || u.starts_with("postgresql://"))
}

/// A database of its own for one test, removed when dropped.
pub struct TestDb {
    /// URL the server should use.
    pub url: String,
    cleanup: Cleanup,
}

enum Cleanup {
    /// Another handle owns the database and removes it.
    Borrowed,
    Dir(PathBuf),
    Postgres {
        admin_url: String,
        name: String,
    },
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
    pub async fn new() -> Self {
        match postgres_admin_url() {
            Some(admin_url) => Self::postgres(&admin_url).await,
            None => Self::sqlite(),
        }
    }

    /// A fresh SQLite file in a temporary directory.
    pub fn sqlite() -> Self {
        let dir = std::env::temp_dir().join(unique_name("kps_test"));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        Self {
            url: format!("sqlite://{}", dir.join("test.db").display()),
            cleanup: Cleanup::Dir(dir),
        }
    }

    /// A fresh database on the Postgres server `admin_url` points at.
    pub async fn postgres(admin_url: &str) -> Self {
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

    /// A second handle on the same database (for a second server process); it removes nothing
    /// when dropped, so drop it before or with the original.
    pub fn share(&self) -> Self {
        Self {
            url: self.url.clone(),
            cleanup: Cleanup::Borrowed,
        }
    }

    /// True when this database is Postgres.
    pub fn is_postgres(&self) -> bool {
        matches!(self.cleanup, Cleanup::Postgres { .. })
    }

    /// Opens the store on this database (applying migrations).
    pub async fn store(&self) -> Arc<dyn KeyPackageStore> {
        store::connect(&ConnectOptions::new(self.url.clone()))
            .await
            .expect("open store")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        match &self.cleanup {
            Cleanup::Borrowed => {}
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

/// A running in-process server and a client for it.
pub struct TestApp {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// A plain HTTP client.
    pub client: reqwest::Client,
    /// The server's state (store, metrics, limiter).
    pub state: AppState,
    /// The database; dropped (and removed) with the app.
    pub db: TestDb,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

/// Options for [`spawn_app_with`].
#[derive(Clone)]
pub struct AppOptions {
    /// Request-path limits.
    pub limits: Limits,
    /// Token verification; HS256 with [`SECRET`] by default.
    pub auth: Authenticator,
}

impl Default for AppOptions {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            auth: Authenticator::new(VerifyingKey::Secret(SECRET.to_vec()), None, None),
        }
    }
}

/// A server with the default settings on a fresh database.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(AppOptions::default()).await
}

/// A server with `options` on a fresh database.
pub async fn spawn_app_with(options: AppOptions) -> TestApp {
    let db = TestDb::new().await;
    spawn_app_on(db, options).await
}

/// A server with `options` on the given database.
pub async fn spawn_app_on(db: TestDb, options: AppOptions) -> TestApp {
    let store = db.store().await;
    spawn_app_with_store(db, store, options).await
}

/// A server with `options` in front of `store` (for instance a wrapper that simulates an
/// outage); `db` is kept alive with the app.
pub async fn spawn_app_with_store(
    db: TestDb,
    store: Arc<dyn KeyPackageStore>,
    options: AppOptions,
) -> TestApp {
    let state = AppState::new(store, options.auth, options.limits);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app::serve(listener, state.clone(), async move {
        let _ = rx.await;
    }));
    TestApp {
        base,
        client: reqwest::Client::new(),
        state,
        db,
        shutdown: Some(tx),
        server: Some(server),
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }
}

/// Key-package bytes with a valid MLS header and a distinguishing tail.
pub fn kp(tag: &str) -> Vec<u8> {
    let mut v = vec![0x00, 0x01, 0x00, 0x05];
    v.extend_from_slice(tag.as_bytes());
    v
}

/// A valid fingerprint made from one hex digit.
pub fn fingerprint(digit: char) -> String {
    std::iter::repeat_n(digit, 64).collect()
}

/// Signs an HS256 token with [`SECRET`] for `user`, valid for an hour.
pub fn token(user: &str) -> String {
    let auth = Authenticator::new(VerifyingKey::Secret(SECRET.to_vec()), None, None);
    auth.issue(
        &keypackage_server::key_package::UserId::parse(user).expect("valid user id"),
        3600,
    )
    .expect("sign")
}

/// An upload request from `(bytes, is_last_resort)` entries.
pub fn upload_request(entries: &[(Vec<u8>, bool)], fingerprint: &str) -> UploadKeyPackagesRequest {
    UploadKeyPackagesRequest {
        entries: entries
            .iter()
            .map(
                |(data, last_resort)| keypackage_server::wire::KeyPackageEntry {
                    key_package_data: data.clone().into(),
                    is_last_resort: *last_resort,
                },
            )
            .collect(),
        signing_key_fingerprint: fingerprint.to_owned(),
    }
}

impl TestApp {
    /// An absolute URL for `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// POSTs a protobuf upload as `user`.
    pub async fn upload_raw(
        &self,
        user: &str,
        request: &UploadKeyPackagesRequest,
    ) -> reqwest::Response {
        self.client
            .post(self.url("/api/v1/key-packages"))
            .bearer_auth(token(user))
            .header("content-type", "application/x-protobuf")
            .body(request.encode_to_vec())
            .send()
            .await
            .expect("request")
    }

    /// POSTs `body` to the upload route as `user` with the given `Content-Type` (none if `None`).
    pub async fn upload_body(
        &self,
        user: &str,
        content_type: Option<&str>,
        body: impl Into<reqwest::Body>,
    ) -> reqwest::Response {
        let mut request = self
            .client
            .post(self.url("/api/v1/key-packages"))
            .bearer_auth(token(user))
            .body(body);
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        request.send().await.expect("request")
    }

    /// Uploads entries as `user`, expecting 201, and returns the status.
    pub async fn upload(
        &self,
        user: &str,
        entries: &[(Vec<u8>, bool)],
        fingerprint: &str,
    ) -> KeyPackageStatus {
        let response = self
            .upload_raw(user, &upload_request(entries, fingerprint))
            .await;
        assert_eq!(
            response.status(),
            201,
            "upload failed: {:?}",
            response.text().await
        );
        decode(response).await
    }

    /// GETs `/api/v1/key-packages/{target}` as `caller`.
    pub async fn consume_raw(&self, caller: &str, target: &str) -> reqwest::Response {
        self.client
            .get(self.url(&format!("/api/v1/key-packages/{target}")))
            .bearer_auth(token(caller))
            .send()
            .await
            .expect("request")
    }

    /// Consumes one of `target`'s packages as `caller`, expecting 200.
    pub async fn consume(&self, caller: &str, target: &str) -> KeyPackageResponse {
        let response = self.consume_raw(caller, target).await;
        assert_eq!(
            response.status(),
            200,
            "consume failed: {:?}",
            response.text().await
        );
        decode(response).await
    }

    /// Consumes `target`'s packages as "alice", expecting exactly `expected`, in this order.
    pub async fn assert_hands_out(&self, target: &str, expected: &[Vec<u8>]) {
        for (i, want) in expected.iter().enumerate() {
            let got = self
                .consume("alice", target)
                .await
                .key_package_data
                .to_vec();
            assert_eq!(&got, want, "hand-out {i} of {target}");
        }
    }

    /// The caller's own status.
    pub async fn status(&self, user: &str) -> KeyPackageStatus {
        let response = self
            .client
            .get(self.url("/api/v1/key-packages"))
            .bearer_auth(token(user))
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), 200);
        decode(response).await
    }

    /// GETs `user`'s fingerprint as `caller`.
    pub async fn fingerprint_raw(&self, caller: &str, user: &str) -> reqwest::Response {
        self.client
            .get(self.url(&format!("/api/v1/users/{user}/fingerprint")))
            .bearer_auth(token(caller))
            .send()
            .await
            .expect("request")
    }

    /// `user`'s fingerprint, expecting 200.
    pub async fn fingerprint(&self, caller: &str, user: &str) -> SigningKeyFingerprint {
        let response = self.fingerprint_raw(caller, user).await;
        assert_eq!(response.status(), 200);
        decode(response).await
    }

    /// DELETEs the caller's packages.
    pub async fn delete_all(&self, user: &str) -> reqwest::Response {
        self.client
            .delete(self.url("/api/v1/key-packages"))
            .bearer_auth(token(user))
            .send()
            .await
            .expect("request")
    }
}

/// Decodes a protobuf response body.
pub async fn decode<T: Message + Default>(response: reqwest::Response) -> T {
    let ct = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    assert_eq!(ct, "application/x-protobuf", "expected a protobuf body");
    T::decode(response.bytes().await.expect("body")).expect("decodes")
}

/// A problem+json error body, checked for its required members; returns it.
pub async fn problem(response: reqwest::Response, status: u16, code: &str) -> serde_json::Value {
    assert_eq!(response.status(), status, "status");
    assert_eq!(
        response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/problem+json")
    );
    let body: serde_json::Value = response.json().await.expect("json body");
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["status"], status, "{body}");
    assert!(
        body["title"].is_string() && body["detail"].is_string(),
        "{body}"
    );
    body
}

/// Standard base64 with padding, written out here so JSON tests don't trust the server's codec.
pub fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Seconds since the Unix epoch, by the test's clock.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

/// Waits no longer than this for anything in tests.
pub const PATIENCE: Duration = Duration::from_secs(10);
