//! The in-process server: the app's own `serve` on `127.0.0.1:0` over a fresh database, shut
//! down when dropped, spoken to through the shared [`ApiClient`].

use std::{ops::Deref, sync::Arc, time::Duration};

use keypackage_server::{
    app::{self, AppState, Limits},
    auth::{Authenticator, VerifyingKey},
    store::KeyPackageStore,
};
use tokio::net::TcpListener;

use super::{test_log, ApiClient, TestDb, SECRET};

/// A running in-process server and a client for it.
pub(crate) struct TestApp {
    /// The typed client for this server (also reached through `Deref`).
    pub(crate) api: ApiClient,
    /// The server's state (store, metrics, limiter).
    pub(crate) state: AppState,
    /// The database; dropped (and removed) with the app.
    _db: TestDb,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

/// Options for [`spawn_app_with`].
#[derive(Clone)]
pub(crate) struct AppOptions {
    /// Request-path limits.
    pub(crate) limits: Limits,
    /// Token verification; HS256 with [`SECRET`] by default.
    pub(crate) auth: Authenticator,
}

/// The server's default limits with the per-caller and per-pair stages off, as
/// `KPS_CONSUME_LIMIT_PER_CALLER_PER_MINUTE=0` and `KPS_CONSUME_LIMIT_PER_PAIR_PER_MINUTE=0`
/// configure them: v1's consumption budget, which the v1 tests exercise on their own.
pub(crate) fn v1_limits() -> Limits {
    Limits {
        caller_budget: None,
        pair_budget: None,
        ..Limits::default()
    }
}

impl Default for AppOptions {
    fn default() -> Self {
        Self {
            limits: v1_limits(),
            auth: Authenticator::new(VerifyingKey::Secret(SECRET.to_vec()), None, None),
        }
    }
}

/// A server with the default settings on a fresh database.
pub(crate) async fn spawn_app() -> TestApp {
    spawn_app_with(AppOptions::default()).await
}

/// A server with `options` on a fresh database.
pub(crate) async fn spawn_app_with(options: AppOptions) -> TestApp {
    let db = TestDb::new().await;
    spawn_app_on(db, options).await
}

/// A server with `options` on the given database.
pub(crate) async fn spawn_app_on(db: TestDb, options: AppOptions) -> TestApp {
    let store = db.store().await;
    spawn_app_with_store(db, store, options).await
}

/// A server with `options` in front of `store` (for instance a wrapper that simulates an
/// outage); `db` is kept alive with the app.
pub(crate) async fn spawn_app_with_store(
    db: TestDb,
    store: Arc<dyn KeyPackageStore>,
    options: AppOptions,
) -> TestApp {
    test_log::init();
    let state = AppState::new(store, options.auth, options.limits);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app::serve(listener, state.clone(), async move {
        let _ = rx.await;
    }));
    TestApp {
        api: ApiClient::new(base),
        state,
        _db: db,
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

impl Deref for TestApp {
    type Target = ApiClient;

    fn deref(&self) -> &ApiClient {
        &self.api
    }
}

/// A server that verifies tokens with `public_pem`, requiring `iss`/`aud` when given.
pub(crate) async fn spawn_public_key_app(
    public_pem: &str,
    issuer: Option<&str>,
    audience: Option<&str>,
) -> TestApp {
    let key = VerifyingKey::from_pem(public_pem.as_bytes()).expect("a supported public key");
    spawn_app_with(AppOptions {
        auth: Authenticator::new(key, issuer.map(Into::into), audience.map(Into::into)),
        ..AppOptions::default()
    })
    .await
}

/// A server with a small body limit and a short request timeout.
pub(crate) async fn spawn_limited_app(max_body_bytes: usize) -> TestApp {
    spawn_app_with(AppOptions {
        limits: Limits {
            max_body_bytes,
            request_timeout: Duration::from_secs(2),
            ..v1_limits()
        },
        ..AppOptions::default()
    })
    .await
}
