//! `GET /api/v1/key-packages/{user_id}`, v1.1 rules: suites asked for with `?ciphersuite=`,
//! expired packages never handed out, the facts returned beside each package, and the status
//! fields that describe what is servable.

use std::sync::Arc;

use async_trait::async_trait;
use keypackage_server::{
    app::Limits,
    key_package::{Fingerprint, UserId},
    mls_codec,
    rate_limit::Budget,
    store::{Claim, Consumption, KeyPackageStore, Status, StoreError, Upload, UploadOutcome},
    wire::KeyPackageResponse,
};
use sha2::{Digest, Sha256};

use crate::harness::*;

const KEY: &[u8] = &[7; 32];

fn unix_now() -> u64 {
    keypackage_server::clock::unix_seconds() as u64
}

/// A readable package of `suite`, valid for a day.
fn of_suite(suite: u16, tag: &str) -> Vec<u8> {
    readable_kp_of_suite(suite, tag, KEY, unix_now() + 86_400)
}

async fn spawn_with_budget(per_minute: u32) -> TestApp {
    spawn_app_with(AppOptions {
        limits: Limits {
            budget: Budget::per_minute(per_minute),
            ..v1_limits()
        },
        ..AppOptions::default()
    })
    .await
}

async fn decode_response(response: reqwest::Response) -> KeyPackageResponse {
    assert_eq!(response.status(), 200, "expected a package");
    decode(response).await
}

/// Values that are not a suite number are refused with 400 before the budget is charged: a
/// budget of one still lets the next valid request through.
#[tokio::test]
async fn a_malformed_ciphersuite_is_refused_before_the_budget_and_not_charged() {
    let app = spawn_with_budget(1).await;
    app.upload("bob", &[(of_suite(1, "a"), false)], "").await;
    for bad in [
        "0", "65536", "0x0", "0x10000", "abc", "0x", "", "-1", "%2B1", "1.0", "0X1", "1e2",
    ] {
        let response = app
            .consume_query("alice", "bob", &format!("ciphersuite={bad}"), false)
            .await;
        problem(response, 400, "invalid_cipher_suite").await;
    }
    // One bad value among good ones spoils the request.
    let response = app
        .consume_query("alice", "bob", "ciphersuite=1&ciphersuite=x", false)
        .await;
    problem(response, 400, "invalid_cipher_suite").await;

    let got = decode_response(app.consume_raw("alice", "bob").await).await;
    assert_eq!(got.cipher_suite, 1);
    problem(app.consume_raw("alice", "bob").await, 429, "rate_limited").await;
}

/// `?ciphersuite=` in decimal or hex, repeated, with unknown parameters ignored: FIFO among
/// the packages of those suites.
#[tokio::test]
async fn the_ciphersuite_parameter_selects_the_oldest_package_of_those_suites() {
    let app = spawn_app().await;
    let (a1, b3, c2, d1) = (
        of_suite(1, "a1"),
        of_suite(3, "b3"),
        of_suite(2, "c2"),
        of_suite(1, "d1"),
    );
    let entries: Vec<_> = [&a1, &b3, &c2, &d1].map(|p| (p.clone(), false)).to_vec();
    app.upload("bob", &entries, "").await;

    let pick = |query: &'static str| {
        let app = &app;
        async move {
            decode_response(app.consume_query("alice", "bob", query, false).await)
                .await
                .key_package_data
                .to_vec()
        }
    };
    assert_eq!(pick("ciphersuite=0x0003").await, b3);
    assert_eq!(pick("utm=x&ciphersuite=2&ciphersuite=0x3").await, c2);
    assert_eq!(pick("ciphersuite=3&ciphersuite=1").await, a1);
    assert_eq!(pick("other=1").await, d1);
}

/// 404 `no_compatible_key_package` while something servable is held; `no_key_package` once
/// nothing is. Both are charged.
#[tokio::test]
async fn nothing_of_the_requested_suites_is_404_no_compatible_key_package_and_charged() {
    let app = spawn_with_budget(2).await;
    app.upload("bob", &[(kp("opaque"), false)], "").await;
    let response = app
        .consume_query("alice", "bob", "ciphersuite=1", false)
        .await;
    problem(response, 404, "no_compatible_key_package").await;
    app.consume("alice", "bob").await;
    problem(app.consume_raw("alice", "bob").await, 429, "rate_limited").await;

    let app = spawn_with_budget(2).await;
    let response = app
        .consume_query("alice", "carol", "ciphersuite=1", false)
        .await;
    problem(response, 404, "no_key_package").await;
    problem(
        app.consume_raw("alice", "carol").await,
        404,
        "no_key_package",
    )
    .await;
    problem(app.consume_raw("alice", "carol").await, 429, "rate_limited").await;
}

/// The response carries the package's ref, suite and `not_after`, in protobuf and in JSON; an
/// opaque package carries empty/zero facts.
#[tokio::test]
async fn a_handed_out_package_carries_its_ref_suite_and_not_after() {
    let app = spawn_app().await;
    let package = of_suite(3, "p");
    let facts = mls_codec::read(&package).expect("readable");
    let entries = [
        (package.clone(), false),
        (kp("opaque"), false),
        (of_suite(1, "q"), false),
    ];
    app.upload("bob", &entries, "").await;

    let got = decode_response(app.consume_raw("alice", "bob").await).await;
    assert_eq!(got.key_package_data.to_vec(), package);
    assert_eq!(Some(got.key_package_ref.to_vec()), facts.key_package_ref);
    assert_eq!((got.cipher_suite, got.not_after), (3, facts.not_after));

    let opaque = decode_response(app.consume_raw("alice", "bob").await).await;
    assert_eq!(
        (
            opaque.key_package_ref.len(),
            opaque.cipher_suite,
            opaque.not_after
        ),
        (0, 0, 0)
    );

    let json: serde_json::Value = app
        .consume_query("alice", "bob", "", true)
        .await
        .json()
        .await
        .expect("json");
    let q = mls_codec::read(&of_suite(1, "q")).unwrap();
    assert_eq!(json["cipherSuite"], 1, "{json}");
    assert_eq!(
        json["notAfter"],
        q.not_after.to_string(),
        "uint64 is a string in JSON"
    );
    assert_eq!(
        json["keyPackageRef"],
        base64(&q.key_package_ref.unwrap()),
        "{json}"
    );
}

/// The status: per-suite counts (opaque under 0, ascending), the earliest expiry, the
/// last-resort lifetime and the inventory digest, in protobuf and JSON.
#[tokio::test]
async fn the_status_describes_suites_expiry_and_the_inventory_digest() {
    let app = spawn_app().await;
    let now = unix_now();
    let p3 = readable_kp_of_suite(3, "p3", KEY, now + 500);
    let p1 = readable_kp_of_suite(1, "p1", KEY, now + 300);
    let opaque = kp("o");
    let lr = readable_kp_of_suite(2, "lr", KEY, now + 900);
    let entries = [
        (p3.clone(), false),
        (p1.clone(), false),
        (opaque.clone(), false),
        (lr.clone(), true),
    ];
    let after_upload = app.upload("bob", &entries, "").await;
    let status = app.status("bob").await;
    assert_eq!(after_upload, status);
    let counts: Vec<(u32, u32)> = status
        .cipher_suites
        .iter()
        .map(|c| (c.cipher_suite, c.regular_count))
        .collect();
    assert_eq!(counts, vec![(0, 1), (1, 1), (3, 1)]);
    assert_eq!(status.next_expiry, now + 300);
    assert_eq!(status.last_resort_not_after, now + 900);
    let mut outer = Sha256::new();
    for part in [&p3, &p1, &opaque, &lr] {
        outer.update(Sha256::digest(part));
    }
    assert_eq!(status.inventory_digest.to_vec(), outer.finalize().to_vec());

    let json: serde_json::Value = app
        .client
        .get(app.url("/api/v1/key-packages"))
        .bearer_auth(token("bob"))
        .header("accept", "application/json")
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("json");
    assert_eq!(json["cipherSuites"][2]["cipherSuite"], 3, "{json}");
    assert_eq!(json["cipherSuites"][2]["regularCount"], 1, "{json}");
    assert_eq!(json["nextExpiry"], (now + 300).to_string(), "{json}");
    assert_eq!(
        json["inventoryDigest"],
        base64(&status.inventory_digest),
        "{json}"
    );

    app.delete_all("bob").await;
    let empty = app.status("bob").await;
    assert!(empty.inventory_digest.is_empty() && empty.cipher_suites.is_empty());
    assert_eq!((empty.next_expiry, empty.last_resort_not_after), (0, 0));
}

/// A store whose consumptions and statuses run a day ahead of the real clock, so that the
/// server meets packages that have expired since they were uploaded.
struct DayAhead(Arc<dyn KeyPackageStore>);

const DAY_US: i64 = 86_400 * 1_000_000;

#[async_trait]
impl KeyPackageStore for DayAhead {
    async fn upload(
        &self,
        user: &UserId,
        upload: &Upload,
        now: i64,
    ) -> Result<UploadOutcome, StoreError> {
        self.0.upload(user, upload, now).await
    }
    async fn consume(&self, claim: &Claim<'_>) -> Result<Consumption, StoreError> {
        let ahead = keypackage_server::clock::unix_micros() + DAY_US;
        self.0
            .consume(&Claim {
                now_us: Some(ahead),
                ..*claim
            })
            .await
    }
    async fn status(&self, user: &UserId, now_unix: i64) -> Result<Status, StoreError> {
        self.0.status(user, now_unix + 86_400).await
    }
    async fn delete_all(&self, user: &UserId) -> Result<(), StoreError> {
        self.0.delete_all(user).await
    }
    async fn fingerprint(&self, user: &UserId) -> Result<Option<(Fingerprint, i64)>, StoreError> {
        self.0.fingerprint(user).await
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.0.ping().await
    }
    async fn prune_budgets(&self, now_us: Option<i64>, limit: u32) -> Result<u64, StoreError> {
        self.0.prune_budgets(now_us, limit).await
    }
    async fn prune_replays(&self, now_us: Option<i64>, limit: u32) -> Result<u64, StoreError> {
        self.0.prune_replays(now_us, limit).await
    }
    async fn read_stored_facts(&self, limit: u32) -> Result<u64, StoreError> {
        self.0.read_stored_facts(limit).await
    }
}

/// Packages that have expired are neither counted nor handed out, the last-resort one
/// included, and their removal is counted in `/metrics`.
#[tokio::test]
async fn expired_packages_are_never_handed_out_and_their_removal_is_counted() {
    let db = TestDb::new().await;
    let store = Arc::new(DayAhead(db.store().await));
    let app = spawn_app_with_store(db, store, AppOptions::default()).await;
    let now = unix_now();
    let entries = [
        (readable_kp_of_suite(1, "soon", KEY, now + 3_600), false),
        (readable_kp_of_suite(1, "soon2", KEY, now + 3_600), false),
        (
            readable_kp_of_suite(1, "late", KEY, now + 3 * 86_400),
            false,
        ),
        (readable_kp_of_suite(1, "lr", KEY, now + 3_600), true),
    ];
    app.upload("bob", &entries, "").await;
    let status = app.status("bob").await;
    assert_eq!((status.regular_count, status.has_last_resort), (1, false));

    let got = app.consume("alice", "bob").await;
    assert_eq!(got.key_package_data.to_vec(), entries[2].0);
    problem(app.consume_raw("alice", "bob").await, 404, "no_key_package").await;
    let metrics = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains("kps_expired_key_packages_removed_total 2"),
        "{metrics}"
    );
}
