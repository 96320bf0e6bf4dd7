//! Claims that are fair and safe to retry (consume rules 10 and 11): the caller's, the pair's
//! and the target's budgets in that order, `scope` in the 429, and `Idempotency-Key` replays,
//! over HTTP, across two processes, and against a flood from one token.

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc,
};

use async_trait::async_trait;
use keypackage_server::{
    app::Limits,
    key_package::{Fingerprint, UserId},
    rate_limit::{ClaimBudgets, Scope},
    store::{
        Caller, Claim, ConsumeOutcome, Consumption, KeyPackageStore, Status, StoreError, Upload,
        UploadOutcome,
    },
    wire::KeyPackageResponse,
};

use crate::harness::*;

fn limits(caller: u32, pair: u32, target: u32) -> Limits {
    let budgets = ClaimBudgets::per_minute(caller, pair, target);
    Limits {
        budget: budgets.target,
        caller_budget: budgets.caller,
        pair_budget: budgets.pair,
        ..v1_limits()
    }
}

async fn spawn_with(limits: Limits) -> TestApp {
    spawn_app_with(AppOptions {
        limits,
        ..AppOptions::default()
    })
    .await
}

/// Bob with `n` regular packages and a last-resort one.
async fn bob_with(app: &ApiClient, n: usize) {
    let mut entries: Vec<_> = (0..n).map(|i| (kp(&format!("b{i}")), false)).collect();
    entries.push((kp("blr"), true));
    app.upload("bob", &entries, "").await;
}

/// GETs bob's package as `caller`, with `key` as `Idempotency-Key` and JSON if `json`.
async fn claim(
    app: &ApiClient,
    caller: &str,
    target: &str,
    key: Option<&str>,
    json: bool,
) -> reqwest::Response {
    let mut request = app
        .client
        .get(app.url(&format!("/api/v1/key-packages/{target}")))
        .bearer_auth(token(caller));
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    if json {
        request = request.header("accept", "application/json");
    }
    request.send().await.expect("request")
}

/// Expects a 429 from `scope` with a `Retry-After` of `secs` (a second or two less when the
/// requests before it took that long).
async fn assert_refused(response: reqwest::Response, scope: &str, secs: u64) {
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let body = problem(response, 429, "rate_limited").await;
    assert_eq!(body["scope"], scope, "{body}");
    let retry_after = retry_after.expect("Retry-After");
    assert!(
        (secs.saturating_sub(2).max(1)..=secs).contains(&retry_after),
        "Retry-After {retry_after}, expected {secs}: {body}"
    );
}

/// Each stage refuses with its own `scope` and wait, in the order caller, pair, target; a
/// refused request is charged nowhere.
#[tokio::test]
async fn a_429_names_the_stage_that_refused_with_its_retry_after() {
    let app = spawn_with(limits(3, 1, 2)).await;
    bob_with(&app, 5).await;
    assert_eq!(claim(&app, "alice", "bob", None, false).await.status(), 200);
    assert_refused(claim(&app, "alice", "bob", None, false).await, "pair", 60).await;
    assert_eq!(claim(&app, "carol", "bob", None, false).await.status(), 200);
    assert_refused(claim(&app, "dave", "bob", None, false).await, "target", 30).await;
    // alice's pair refusal did not cost her own budget: bob, erin and frank make her three.
    for target in ["erin", "frank"] {
        assert_eq!(
            claim(&app, "alice", target, None, false).await.status(),
            404
        );
    }
    assert_refused(
        claim(&app, "alice", "gina", None, false).await,
        "caller",
        20,
    )
    .await;
}

/// The defaults: 600 per caller, 3 per pair, 10 per target; one account takes three of bob's
/// ten, and other callers still get packages.
#[tokio::test]
async fn with_the_defaults_one_caller_takes_three_and_others_still_get_packages() {
    let app = spawn_with(Limits::default()).await;
    bob_with(&app, 10).await;
    for _ in 0..3 {
        assert_eq!(
            claim(&app, "mallory", "bob", None, false).await.status(),
            200
        );
    }
    for _ in 0..5 {
        assert_refused(claim(&app, "mallory", "bob", None, false).await, "pair", 20).await;
    }
    for i in 0..7 {
        let got: KeyPackageResponse =
            decode(claim(&app, &format!("inviter{i}"), "bob", None, false).await).await;
        assert!(!got.is_last_resort, "inviter {i} got a regular package");
    }
}

/// `Idempotency-Key` values outside 1–255 characters `0x21`–`0x7E`, or sent twice, are 400
/// `invalid_idempotency_key` and charge nothing.
#[tokio::test]
async fn an_invalid_idempotency_key_is_400_and_charges_nothing() {
    let app = spawn_with(limits(600, 3, 1)).await;
    bob_with(&app, 2).await;
    let long = "k".repeat(256);
    for bad in ["", "a b", long.as_str(), "tab\there"] {
        let response = claim(&app, "alice", "bob", Some(bad), false).await;
        problem(response, 400, "invalid_idempotency_key").await;
    }
    let non_ascii = app
        .client
        .get(app.url("/api/v1/key-packages/bob"))
        .bearer_auth(token("alice"))
        .header(
            "idempotency-key",
            reqwest::header::HeaderValue::from_bytes(b"caf\xe9").unwrap(),
        )
        .send()
        .await
        .unwrap();
    problem(non_ascii, 400, "invalid_idempotency_key").await;
    let twice = app
        .client
        .get(app.url("/api/v1/key-packages/bob"))
        .bearer_auth(token("alice"))
        .header("idempotency-key", "one")
        .header("idempotency-key", "two")
        .send()
        .await
        .unwrap();
    problem(twice, 400, "invalid_idempotency_key").await;
    let max = "~".repeat(255);
    assert_eq!(
        claim(&app, "alice", "bob", Some(&max), false)
            .await
            .status(),
        200
    );
    assert_refused(claim(&app, "carol", "bob", None, false).await, "target", 60).await;
}

/// A retry with the key gets the same package and facts, in the format it asks for, marked
/// `Idempotent-Replayed: true`; nothing more is consumed or charged.
#[tokio::test]
async fn a_retry_with_the_key_replays_the_package_in_its_own_format() {
    let app = spawn_with(limits(600, 3, 2)).await;
    let key_pair = [3u8; 32];
    let now = keypackage_server::clock::unix_seconds() as u64;
    let package = readable_kp("p", &key_pair, 0, now + 3_600);
    app.upload(
        "bob",
        &[(package.clone(), false), (kp("other"), false)],
        Fingerprint::of_public_key(&key_pair).as_str(),
    )
    .await;
    let first = claim(&app, "alice", "bob", Some("retry-1"), false).await;
    assert_eq!(first.status(), 200);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first: KeyPackageResponse = decode(first).await;
    assert_eq!(first.key_package_data.to_vec(), package);

    for _ in 0..3 {
        let again = claim(&app, "alice", "bob", Some("retry-1"), false).await;
        assert_eq!(
            again
                .headers()
                .get("idempotent-replayed")
                .map(|v| v.as_bytes()),
            Some(&b"true"[..])
        );
        let again: KeyPackageResponse = decode(again).await;
        assert_eq!(again, first);
    }
    let json = claim(&app, "alice", "bob", Some("retry-1"), true).await;
    assert_eq!(json.headers()["idempotent-replayed"], "true");
    assert_eq!(json.headers()["content-type"], "application/json");
    let json: serde_json::Value = json.json().await.unwrap();
    assert_eq!(json["keyPackageData"], base64(&package), "{json}");
    assert_eq!(
        json["keyPackageRef"],
        base64(&first.key_package_ref),
        "{json}"
    );
    assert_eq!(
        json["signingKeyFingerprint"], first.signing_key_fingerprint,
        "{json}"
    );

    let status = app.status("bob").await;
    assert_eq!(status.regular_count, 1, "one package handed out");
    // The replays charged nothing: the target's budget of two has one left.
    assert_eq!(claim(&app, "carol", "bob", None, false).await.status(), 200);
    assert_refused(claim(&app, "dave", "bob", None, false).await, "target", 30).await;
}

/// The same key for another target is 422 `idempotency_key_reused` and charges nothing; keys
/// are per caller; a 404 is not remembered.
#[tokio::test]
async fn a_key_is_the_callers_own_and_only_hand_outs_are_remembered() {
    let app = spawn_with(limits(2, 3, 10)).await;
    let response = claim(&app, "alice", "bob", Some("k"), false).await;
    problem(response, 404, "no_key_package").await;
    bob_with(&app, 2).await;
    let got: KeyPackageResponse = decode(claim(&app, "alice", "bob", Some("k"), false).await).await;
    assert_eq!(
        got.key_package_data.to_vec(),
        kp("b0"),
        "the 404 was not replayed"
    );
    let response = claim(&app, "alice", "carol", Some("k"), false).await;
    problem(response, 422, "idempotency_key_reused").await;
    let theirs: KeyPackageResponse =
        decode(claim(&app, "erin", "bob", Some("k"), false).await).await;
    assert_eq!(
        theirs.key_package_data.to_vec(),
        kp("b1"),
        "erin's key is her own"
    );
    // alice spent two of two (the 404 and the hand-out); the 422 was not charged, so her
    // third request is refused by her budget, not earlier.
    assert_refused(
        claim(&app, "alice", "frank", None, false).await,
        "caller",
        30,
    )
    .await;
}

/// Fifty concurrent claims with one key hand out one package: each gets it (replayed) or 409.
#[tokio::test]
async fn fifty_concurrent_claims_with_one_key_hand_out_exactly_one_package() {
    let app = spawn_with(limits(600, 3, 10)).await;
    bob_with(&app, 10).await;
    let mut requests = tokio::task::JoinSet::new();
    for _ in 0..50 {
        let api = app.api.clone();
        requests.spawn(async move {
            let response = claim(&api, "alice", "bob", Some("once"), false).await;
            let status = response.status().as_u16();
            (status, response.bytes().await.unwrap())
        });
    }
    let mut packages = std::collections::HashSet::new();
    let mut ok = 0;
    while let Some(result) = requests.join_next().await {
        let (status, body) = result.unwrap();
        match status {
            200 => {
                ok += 1;
                let got: KeyPackageResponse = prost::Message::decode(body).unwrap();
                packages.insert(got.key_package_data.to_vec());
            }
            409 => {
                let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
                assert_eq!(body["code"], "idempotency_in_progress", "{body}");
            }
            other => panic!("unexpected {other}: {body:?}"),
        }
    }
    assert!(ok >= 1);
    assert_eq!(packages.len(), 1, "every 200 carries the same package");
    assert_eq!(
        app.status("bob").await.regular_count,
        9,
        "exactly one consumed"
    );
}

/// A store that counts the calls that reach it.
struct Counting {
    inner: Arc<dyn KeyPackageStore>,
    consumes: AtomicU64,
}

#[async_trait]
impl KeyPackageStore for Counting {
    async fn upload(&self, u: &UserId, up: &Upload, now: i64) -> Result<UploadOutcome, StoreError> {
        self.inner.upload(u, up, now).await
    }
    async fn consume(&self, claim: &Claim<'_>) -> Result<Consumption, StoreError> {
        self.consumes.fetch_add(1, Ordering::Relaxed);
        self.inner.consume(claim).await
    }
    async fn status(&self, user: &UserId, now: i64) -> Result<Status, StoreError> {
        self.inner.status(user, now).await
    }
    async fn delete_all(&self, user: &UserId) -> Result<(), StoreError> {
        self.inner.delete_all(user).await
    }
    async fn fingerprint(&self, user: &UserId) -> Result<Option<(Fingerprint, i64)>, StoreError> {
        self.inner.fingerprint(user).await
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }
    async fn prune_budgets(&self, now: Option<i64>, limit: u32) -> Result<u64, StoreError> {
        self.inner.prune_budgets(now, limit).await
    }
    async fn prune_replays(&self, now: Option<i64>, limit: u32) -> Result<u64, StoreError> {
        self.inner.prune_replays(now, limit).await
    }
    async fn read_stored_facts(&self, limit: u32) -> Result<u64, StoreError> {
        self.inner.read_stored_facts(limit).await
    }
}

/// One token asking for 100 000 distinct targets is refused from memory once its budget is
/// spent: the store sees little more than the budget's worth of claims, and another client's
/// uploads meanwhile all succeed.
#[tokio::test]
async fn a_flood_of_distinct_targets_from_one_token_is_refused_from_memory() {
    let db = TestDb::new().await;
    let store = Arc::new(Counting {
        inner: db.store().await,
        consumes: AtomicU64::new(0),
    });
    let app = spawn_app_with_store(
        db,
        store.clone(),
        AppOptions {
            limits: Limits::default(),
            ..AppOptions::default()
        },
    )
    .await;
    const TARGETS: usize = 100_000;
    const CONCURRENCY: usize = 32;
    let next = Arc::new(AtomicU64::new(0));
    let mut flood = tokio::task::JoinSet::new();
    for _ in 0..CONCURRENCY {
        let (api, next) = (app.api.clone(), next.clone());
        flood.spawn(async move {
            let mut refused = 0u64;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                if i >= TARGETS {
                    return refused;
                }
                let response = claim(&api, "mallory", &format!("ghost{i}"), None, false).await;
                match response.status().as_u16() {
                    404 => {}
                    429 => refused += 1,
                    other => panic!("unexpected {other}"),
                }
            }
        });
    }
    let uploads = {
        let api = app.api.clone();
        tokio::spawn(async move {
            for i in 0..50 {
                let response = api
                    .upload_raw("bob", &upload_request(&[(kp(&format!("u{i}")), false)], ""))
                    .await;
                assert_eq!(response.status(), 201, "upload {i}");
            }
        })
    };
    let mut refused = 0;
    while let Some(n) = flood.join_next().await {
        refused += n.unwrap();
    }
    uploads.await.unwrap();
    let reached = store.consumes.load(Ordering::Relaxed);
    // 600 per minute: the burst, plus what refills while the flood runs (10 per second), plus
    // the requests in flight when the budget ran out.
    assert!(
        reached < 600 + 1_000 + CONCURRENCY as u64,
        "{reached} claims reached the store"
    );
    assert!(
        refused >= TARGETS as u64 - reached,
        "every claim the store did not see was refused"
    );
}

/// On the store, with its clock stepped: one caller polling bob at full speed for a minute
/// takes at most its pair's share, and ten other callers each still get a package.
#[tokio::test]
async fn a_caller_polling_one_target_for_a_minute_takes_at_most_its_pair_share() {
    let db = TestDb::new().await;
    let store = db.store().await;
    let bob = UserId::parse("bob").unwrap();
    let entries: Vec<_> = (0..10)
        .map(|i| (kp(&format!("b{i}")).into(), false))
        .chain([(kp("blr").into(), true)])
        .collect();
    let upload = Upload::parse(entries, "", 0, Default::default()).unwrap();
    store.upload(&bob, &upload, 0).await.unwrap();
    let budgets = ClaimBudgets::defaults();
    let start_us = keypackage_server::clock::unix_micros();
    let ask = |who: UserId, at_us: i64| {
        let (store, bob) = (store.clone(), bob.clone());
        async move {
            store
                .consume(&Claim {
                    caller: Some(Caller {
                        id: &who,
                        budget: budgets.caller,
                        pair_budget: budgets.pair,
                        idempotency: None,
                    }),
                    now_us: Some(at_us),
                    ..Claim::new(&bob, budgets.target)
                })
                .await
                .unwrap()
                .outcome
        }
    };
    let mallory = UserId::parse("mallory").unwrap();
    let mut taken = 0;
    // Every 100 ms for 60 s: 600 requests, within mallory's own budget.
    for step in 0..600 {
        match ask(mallory.clone(), start_us + step * 100_000).await {
            ConsumeOutcome::Consumed(_) => taken += 1,
            ConsumeOutcome::RateLimited { scope, .. } => assert_eq!(scope, Scope::Pair),
            other => panic!("unexpected {other:?}"),
        }
    }
    // Three at once, then one every 20 s: at 20 s and 40 s.
    assert_eq!(taken, 5, "mallory's pair share of one minute");
    // The target's budget of ten has room for ten more a minute after the start: the five
    // regular packages left, then the last-resort one.
    for i in 0..10 {
        let inviter = UserId::parse(&format!("inviter{i}")).unwrap();
        let got = ask(inviter, start_us + 60_000_000).await;
        assert!(
            matches!(got, ConsumeOutcome::Consumed(ref c) if c.is_last_resort == (i >= 5)),
            "inviter {i}: {got:?}"
        );
    }
}

/// Two processes on one database share every stage: with the defaults, alice's pair budget
/// of three spans both; with `0` she gets v1's whole target budget.
#[tokio::test]
async fn the_stages_and_their_defaults_are_shared_by_two_processes() {
    let db = TestDb::new().await;
    let dir = TempDir::new();
    let mut vars = server_env(&db, &dir);
    vars.insert("KPS_CONSUME_LIMIT_PER_CALLER_PER_MINUTE".into(), None);
    vars.insert("KPS_CONSUME_LIMIT_PER_PAIR_PER_MINUTE".into(), None);
    let first = ServerProcess::start(&vars).await;
    let second = ServerProcess::start(&vars).await;
    bob_with(&first.api, 10).await;
    for (i, server) in [&first, &second, &first].iter().enumerate() {
        assert_eq!(
            claim(&server.api, "alice", "bob", None, false)
                .await
                .status(),
            200,
            "{i}"
        );
    }
    assert_refused(
        claim(&second.api, "alice", "bob", None, false).await,
        "pair",
        20,
    )
    .await;
    assert_refused(
        claim(&first.api, "alice", "bob", None, false).await,
        "pair",
        20,
    )
    .await;
    for i in 0..7 {
        let server = if i % 2 == 0 { &first } else { &second };
        assert_eq!(
            claim(&server.api, &format!("c{i}"), "bob", None, false)
                .await
                .status(),
            200
        );
    }
    assert_refused(
        claim(&second.api, "c9", "bob", None, false).await,
        "target",
        6,
    )
    .await;
    drop((first, second));

    let mut off = vars.clone();
    off.insert(
        "KPS_CONSUME_LIMIT_PER_CALLER_PER_MINUTE".into(),
        Some("0".into()),
    );
    off.insert(
        "KPS_CONSUME_LIMIT_PER_PAIR_PER_MINUTE".into(),
        Some("0".into()),
    );
    off.insert("KPS_CONSUME_LIMIT_PER_MINUTE".into(), Some("4".into()));
    let first = ServerProcess::start(&off).await;
    let second = ServerProcess::start(&off).await;
    for i in 0..4 {
        let server = if i % 2 == 0 { &first } else { &second };
        assert_eq!(
            claim(&server.api, "alice", "erin", None, false)
                .await
                .status(),
            404
        );
    }
    assert_refused(
        claim(&first.api, "alice", "erin", None, false).await,
        "target",
        15,
    )
    .await;
}
