//! Operational endpoints, unknown routes and methods, and behaviour while the database is away.

use std::sync::{
    atomic::{AtomicBool, Ordering},
    Arc,
};

use async_trait::async_trait;
use keypackage_server::{
    key_package::{Fingerprint, UserId},
    rate_limit::Budget,
    store::{Claim, Consumption, KeyPackageStore, Status, StoreError, Upload, UploadOutcome},
};

use crate::harness::*;

#[tokio::test]
async fn healthz_answers_200_without_a_token() {
    let app = spawn_app().await;
    let response = app.client.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn readyz_answers_200_when_the_database_answers() {
    let app = spawn_app().await;
    let response = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(response.status(), 200);
}

/// The value of the sample of `metrics` whose name and labels start with `series`.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(series))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .reduce(|a, b| a + b)
}

#[tokio::test]
async fn metrics_count_requests_and_the_domain_events() {
    let app = spawn_app_with(AppOptions {
        limits: keypackage_server::app::Limits {
            budget: Budget::per_minute(3),
            ..Default::default()
        },
        ..AppOptions::default()
    })
    .await;
    app.upload(
        "bob",
        &[(kp("1"), false), (kp("2"), false), (kp("lr"), true)],
        "",
    )
    .await;
    app.consume("alice", "bob").await;
    app.consume("alice", "bob").await;
    app.consume("alice", "bob").await;
    assert_eq!(app.consume_raw("alice", "bob").await.status(), 429);

    let response = app.client.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        content_type.starts_with("application/openmetrics-text")
            || content_type.starts_with("text/plain")
    );
    let text = response.text().await.unwrap();

    let consume_200 = r#"kps_http_requests_total{method="GET",route="/api/v1/key-packages/{user_id}",status="200"}"#;
    let consume_429 = r#"kps_http_requests_total{method="GET",route="/api/v1/key-packages/{user_id}",status="429"}"#;
    let upload_201 =
        r#"kps_http_requests_total{method="POST",route="/api/v1/key-packages",status="201"}"#;
    assert_eq!(sample(&text, consume_200), Some(3.0), "{text}");
    assert_eq!(sample(&text, consume_429), Some(1.0), "{text}");
    assert_eq!(sample(&text, upload_201), Some(1.0), "{text}");
    assert_eq!(
        sample(&text, "kps_key_packages_uploaded_total"),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "kps_key_packages_consumed_total"),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "kps_last_resort_handouts_total"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "kps_rate_limited_requests_total"),
        Some(1.0),
        "{text}"
    );
    assert!(text.contains("kps_http_request_duration_seconds"), "{text}");
    assert!(
        !text.contains("route=\"/api/v1/key-packages/bob\""),
        "labels are route templates"
    );
}

#[tokio::test]
async fn an_unknown_route_returns_404_problem_json() {
    let app = spawn_app().await;
    for path in [
        "/",
        "/nope",
        "/api/v1",
        "/api/v1/unknown",
        "/api/v2/key-packages",
        "/api/v1/key-packages/bob/extra",
    ] {
        let response = app
            .client
            .get(app.url(path))
            .bearer_auth(token("alice"))
            .send()
            .await
            .unwrap();
        problem(response, 404, "not_found").await;
    }
}

#[tokio::test]
async fn a_wrong_method_returns_405_problem_json() {
    let app = spawn_app().await;
    let requests = [
        app.client.delete(app.url("/healthz")),
        app.client.post(app.url("/readyz")),
        app.client.post(app.url("/metrics")),
        app.client
            .put(app.url("/api/v1/key-packages"))
            .bearer_auth(token("bob")),
        app.client
            .patch(app.url("/api/v1/key-packages"))
            .bearer_auth(token("bob")),
        app.client
            .post(app.url("/api/v1/key-packages/bob"))
            .bearer_auth(token("alice")),
        app.client
            .delete(app.url("/api/v1/key-packages/bob"))
            .bearer_auth(token("alice")),
        app.client
            .post(app.url("/api/v1/users/bob/fingerprint"))
            .bearer_auth(token("alice")),
    ];
    for request in requests {
        let response = request.send().await.unwrap();
        problem(response, 405, "method_not_allowed").await;
    }
}

/// A store whose database can be switched off and on again.
struct Switchable {
    inner: Arc<dyn KeyPackageStore>,
    down: Arc<AtomicBool>,
}

impl Switchable {
    fn check(&self) -> Result<(), StoreError> {
        if self.down.load(Ordering::SeqCst) {
            Err(StoreError::Unavailable(sqlx::Error::PoolTimedOut))
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl KeyPackageStore for Switchable {
    async fn upload(
        &self,
        user: &UserId,
        upload: &Upload,
        now: i64,
    ) -> Result<UploadOutcome, StoreError> {
        self.check()?;
        self.inner.upload(user, upload, now).await
    }
    async fn consume(&self, claim: &Claim<'_>) -> Result<Consumption, StoreError> {
        self.check()?;
        self.inner.consume(claim).await
    }
    async fn status(&self, user: &UserId, now_unix: i64) -> Result<Status, StoreError> {
        self.check()?;
        self.inner.status(user, now_unix).await
    }
    async fn read_stored_facts(&self, limit: u32) -> Result<u64, StoreError> {
        self.check()?;
        self.inner.read_stored_facts(limit).await
    }
    async fn delete_all(&self, user: &UserId) -> Result<(), StoreError> {
        self.check()?;
        self.inner.delete_all(user).await
    }
    async fn fingerprint(&self, user: &UserId) -> Result<Option<(Fingerprint, i64)>, StoreError> {
        self.check()?;
        self.inner.fingerprint(user).await
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.check()?;
        self.inner.ping().await
    }
    async fn prune_budgets(&self, now_us: Option<i64>, limit: u32) -> Result<u64, StoreError> {
        self.check()?;
        self.inner.prune_budgets(now_us, limit).await
    }
    async fn prune_replays(&self, now_us: Option<i64>, limit: u32) -> Result<u64, StoreError> {
        self.check()?;
        self.inner.prune_replays(now_us, limit).await
    }
}

#[tokio::test]
async fn while_the_database_is_away_requests_get_503_and_the_server_recovers() {
    let db = TestDb::new().await;
    let down = Arc::new(AtomicBool::new(false));
    let store = Arc::new(Switchable {
        inner: db.store().await,
        down: down.clone(),
    });
    let app = spawn_app_with_store(db, store, AppOptions::default()).await;
    app.upload(
        "bob",
        &[(kp("1"), false), (kp("2"), false)],
        &fingerprint('a'),
    )
    .await;

    down.store(true, Ordering::SeqCst);
    let readyz = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(readyz.status(), 503);
    let healthz = app.client.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(
        healthz.status(),
        200,
        "liveness does not depend on the database"
    );
    problem(
        app.consume_raw("alice", "bob").await,
        503,
        "service_unavailable",
    )
    .await;
    problem(
        app.fingerprint_raw("alice", "bob").await,
        503,
        "service_unavailable",
    )
    .await;
    problem(app.delete_all("bob").await, 503, "service_unavailable").await;
    let upload = app
        .upload_raw("bob", &upload_request(&[(kp("3"), false)], ""))
        .await;
    problem(upload, 503, "service_unavailable").await;

    down.store(false, Ordering::SeqCst);
    let readyz = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(readyz.status(), 200);
    assert_eq!(
        app.status("bob").await.regular_count,
        2,
        "nothing changed while away"
    );
    assert_eq!(
        app.consume("alice", "bob").await.key_package_data.to_vec(),
        kp("1")
    );
}

/// Requests that fail with 503 spend no budget, in this process's pre-check or in the shared
/// budget: once the database is back, the target's whole budget is there.
#[tokio::test]
async fn requests_that_fail_while_the_database_is_away_spend_no_budget() {
    let db = TestDb::new().await;
    let down = Arc::new(AtomicBool::new(false));
    let store = Arc::new(Switchable {
        inner: db.store().await,
        down: down.clone(),
    });
    let app = spawn_app_with_store(
        db,
        store,
        AppOptions {
            limits: keypackage_server::app::Limits {
                budget: Budget::per_minute(2),
                ..Default::default()
            },
            ..AppOptions::default()
        },
    )
    .await;
    app.upload("bob", &[(kp("1"), false), (kp("2"), false)], "")
        .await;
    down.store(true, Ordering::SeqCst);
    for _ in 0..5 {
        problem(
            app.consume_raw("alice", "bob").await,
            503,
            "service_unavailable",
        )
        .await;
    }
    down.store(false, Ordering::SeqCst);
    app.assert_hands_out("bob", &[kp("1"), kp("2")]).await;
    problem(app.consume_raw("alice", "bob").await, 429, "rate_limited").await;
}
