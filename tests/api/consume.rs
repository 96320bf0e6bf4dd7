//! `GET /api/v1/key-packages/{user_id}`: FIFO hand-out, the last-resort fallback, user-id
//! validation and the per-target consumption budget, on one server and on two processes
//! sharing a database.

use std::{collections::HashSet, time::Duration};

use keypackage_server::{
    app::Limits, key_package::UserId, rate_limit::Budget, store::ConsumeOutcome,
    wire::KeyPackageResponse,
};
use prost::Message;

use crate::harness::*;

/// Asserts a 429 `rate_limited` with a whole-seconds `Retry-After` no longer than one refill
/// interval (6 s at the default budget, plus rounding up).
async fn assert_rate_limited(response: reqwest::Response) {
    let retry_after = response
        .headers()
        .get("retry-after")
        .expect("Retry-After on a 429")
        .to_str()
        .expect("ASCII")
        .to_owned();
    problem(response, 429, "rate_limited").await;
    let seconds: u64 = retry_after
        .parse()
        .unwrap_or_else(|_| panic!("Retry-After is whole seconds, got {retry_after:?}"));
    assert!((1..=7).contains(&seconds), "Retry-After: {seconds}");
}

/// Consumes `target` `n` times as `caller` and returns the statuses.
async fn consume_statuses(app: &ApiClient, caller: &str, target: &str, n: usize) -> Vec<u16> {
    let mut statuses = Vec::with_capacity(n);
    for _ in 0..n {
        statuses.push(app.consume_raw(caller, target).await.status().as_u16());
    }
    statuses
}

#[tokio::test]
async fn consume_hands_out_the_oldest_regular_package_first() {
    let app = spawn_app().await;
    app.upload(
        "bob",
        &[(kp("1"), false), (kp("2"), false), (kp("lr"), true)],
        "",
    )
    .await;
    app.upload("bob", &[(kp("3"), false)], "").await;
    for expected in ["1", "2", "3"] {
        let got = app.consume("alice", "bob").await;
        assert_eq!(got.key_package_data.to_vec(), kp(expected));
        assert!(!got.is_last_resort);
    }
}

#[tokio::test]
async fn consume_removes_the_package_it_hands_out() {
    let app = spawn_app().await;
    app.upload("bob", &[(kp("1"), false), (kp("2"), false)], "")
        .await;
    app.consume("alice", "bob").await;
    assert_eq!(app.status("bob").await.regular_count, 1);
    let second = app.consume("carol", "bob").await;
    assert_eq!(
        second.key_package_data.to_vec(),
        kp("2"),
        "the first is gone for every caller"
    );
    assert_eq!(app.status("bob").await.regular_count, 0);
    problem(app.consume_raw("alice", "bob").await, 404, "no_key_package").await;
}

#[tokio::test]
async fn consume_falls_back_to_the_last_resort_package_without_removing_it_and_counts_handouts() {
    let app = spawn_app().await;
    app.upload("bob", &[(kp("r1"), false), (kp("lr"), true)], "")
        .await;
    assert!(!app.consume("alice", "bob").await.is_last_resort);
    assert_eq!(
        app.status("bob").await.last_resort_handouts,
        0,
        "regular hand-outs don't count"
    );
    for handouts in 1..=3 {
        let got = app.consume("alice", "bob").await;
        assert!(got.is_last_resort);
        assert_eq!(got.key_package_data.to_vec(), kp("lr"));
        let status = app.status("bob").await;
        assert!(status.has_last_resort, "the last-resort package stays");
        assert_eq!(status.last_resort_handouts, handouts);
    }
}

#[tokio::test]
async fn a_new_last_resort_package_resets_the_handout_count() {
    let app = spawn_app().await;
    app.upload("bob", &[(kp("lr-1"), true)], "").await;
    app.consume("alice", "bob").await;
    app.consume("alice", "bob").await;
    assert_eq!(app.status("bob").await.last_resort_handouts, 2);
    let status = app.upload("bob", &[(kp("lr-2"), true)], "").await;
    assert_eq!(status.last_resort_handouts, 0);
    app.consume("alice", "bob").await;
    assert_eq!(app.status("bob").await.last_resort_handouts, 1);
}

#[tokio::test]
async fn consume_returns_404_no_key_package_when_nothing_is_left() {
    let app = spawn_app().await;
    app.upload("bob", &[(kp("only"), false)], "").await;
    app.consume("alice", "bob").await;
    problem(app.consume_raw("alice", "bob").await, 404, "no_key_package").await;
}

#[tokio::test]
async fn consume_returns_404_no_key_package_for_a_user_who_never_uploaded() {
    let app = spawn_app().await;
    problem(
        app.consume_raw("alice", "nobody").await,
        404,
        "no_key_package",
    )
    .await;
}

#[tokio::test]
async fn consume_returns_the_fingerprint_recorded_when_the_package_was_uploaded() {
    let app = spawn_app().await;
    app.upload("bob", &[(kp("1"), false)], &fingerprint('1'))
        .await;
    app.upload("bob", &[(kp("2"), false)], &fingerprint('2'))
        .await;
    assert_eq!(
        app.consume("alice", "bob").await.signing_key_fingerprint,
        fingerprint('1')
    );
    assert_eq!(
        app.consume("alice", "bob").await.signing_key_fingerprint,
        fingerprint('2')
    );
}

#[tokio::test]
async fn consume_accepts_every_character_of_the_user_id_alphabet_and_128_characters() {
    let app = spawn_app().await;
    let longest = "x".repeat(128);
    // ("." and ".." themselves are valid ids too, but URL clients resolve them as dot segments.)
    for id in ["AZaz09._~@:+-", "...", "a..b", longest.as_str()] {
        app.upload(id, &[(kp(id), false)], "").await;
        let got = app.consume("alice", id).await;
        assert_eq!(got.key_package_data.to_vec(), kp(id), "{id}");
    }
    // Percent-encoded characters of the alphabet name the same user.
    app.upload("bob", &[(kp("b"), false)], "").await;
    let got = app.consume("alice", "%62%6Fb").await;
    assert_eq!(got.key_package_data.to_vec(), kp("b"));
}

#[tokio::test]
async fn consume_rejects_a_path_user_id_outside_the_alphabet_with_400_invalid_user_id() {
    let app = spawn_app().await;
    let too_long = "x".repeat(129);
    let invalid = [
        "a%2Fb",
        "%2F",
        "..%2F..%2Fetc%2Fpasswd",
        "%2E%2E%2Fbob",
        "..%5Cbob",
        too_long.as_str(),
        "%C3%A9",
        "b%C3%B6b",
        "%F0%9F%94%91",
        "%FF",
        "a%20b",
        "a%00",
        "a%0Ab",
        "a%3Fb",
        "a%23b",
        "a%2Cb",
        "a%25b",
        "a*b",
        "a!b",
        "a$b",
        "a'b",
        "a(b)",
        "a;b",
        "a=b",
    ];
    for id in invalid {
        let response = app.consume_raw("alice", id).await;
        let body = problem(response, 400, "invalid_user_id").await;
        assert!(body["detail"].is_string(), "{id}: {body}");
    }
}

#[tokio::test]
async fn consume_allows_10_requests_per_target_then_returns_429_with_retry_after() {
    let app = spawn_app().await;
    app.upload("bob", &[(kp("lr"), true)], "").await;
    assert_eq!(
        consume_statuses(&app, "alice", "bob", 10).await,
        vec![200; 10]
    );
    assert_rate_limited(app.consume_raw("alice", "bob").await).await;
    assert_eq!(
        app.status("bob").await.last_resort_handouts,
        10,
        "the 429 handed nothing out"
    );
}

#[tokio::test]
async fn every_consume_request_counts_against_the_budget_whatever_its_outcome() {
    let app = spawn_app().await;
    app.upload("bob", &[(kp("1"), false), (kp("2"), false)], "")
        .await;
    let statuses = consume_statuses(&app, "alice", "bob", 10).await;
    assert_eq!(statuses, [200, 200, 404, 404, 404, 404, 404, 404, 404, 404]);
    assert_rate_limited(app.consume_raw("alice", "bob").await).await;
}

#[tokio::test]
async fn the_budget_of_a_target_is_shared_by_all_callers() {
    let app = spawn_app().await;
    for i in 0..10 {
        let caller = format!("caller{i}");
        assert_eq!(app.consume_raw(&caller, "bob").await.status(), 404);
    }
    assert_rate_limited(app.consume_raw("someone-else", "bob").await).await;
}

#[tokio::test]
async fn a_spent_budget_leaves_other_targets_unaffected() {
    let app = spawn_app().await;
    app.upload("carol", &[(kp("c"), false)], "").await;
    consume_statuses(&app, "alice", "bob", 10).await;
    assert_rate_limited(app.consume_raw("alice", "bob").await).await;
    let got = app.consume("alice", "carol").await;
    assert_eq!(got.key_package_data.to_vec(), kp("c"));
    assert_eq!(
        consume_statuses(&app, "alice", "carol", 9).await,
        vec![404; 9]
    );
}

#[tokio::test]
async fn percent_encoded_spellings_of_a_target_share_its_budget() {
    let app = spawn_app().await;
    consume_statuses(&app, "alice", "bob", 5).await;
    assert_eq!(
        consume_statuses(&app, "alice", "%62ob", 5).await,
        vec![404; 5]
    );
    assert_rate_limited(app.consume_raw("alice", "b%6F%62").await).await;
}

#[tokio::test]
async fn unauthenticated_consume_requests_never_touch_the_budget() {
    let app = spawn_app().await;
    for _ in 0..15 {
        let no_token = app
            .client
            .get(app.url("/api/v1/key-packages/bob"))
            .send()
            .await
            .unwrap();
        assert_eq!(no_token.status(), 401);
        let bad_token = app
            .client
            .get(app.url("/api/v1/key-packages/bob"))
            .bearer_auth("not-a-token")
            .send()
            .await
            .unwrap();
        assert_eq!(bad_token.status(), 401);
    }
    assert_eq!(
        app.state.limiter.targets().len(),
        0,
        "no local bucket was created"
    );
    assert_eq!(
        consume_statuses(&app, "alice", "bob", 10).await,
        vec![404; 10]
    );
    assert_rate_limited(app.consume_raw("alice", "bob").await).await;
}

#[tokio::test]
async fn consume_requests_with_an_invalid_user_id_never_touch_any_budget() {
    let app = spawn_app().await;
    let too_long = "b".repeat(129);
    for _ in 0..11 {
        for id in ["bob%2F", "bob%00", too_long.as_str(), "b%C3%B6b"] {
            assert_eq!(app.consume_raw("alice", id).await.status(), 400, "{id}");
        }
    }
    assert_eq!(
        app.state.limiter.targets().len(),
        0,
        "no local bucket was created"
    );
    assert_eq!(
        consume_statuses(&app, "alice", "bob", 10).await,
        vec![404; 10]
    );
}

#[tokio::test]
async fn a_rate_limited_request_hands_nothing_out() {
    let app = spawn_app_with(AppOptions {
        limits: Limits {
            budget: Budget {
                burst: 2,
                interval: Duration::from_secs(3600),
            },
            ..v1_limits()
        },
        ..AppOptions::default()
    })
    .await;
    let entries: Vec<_> = (1..=5).map(|i| (kp(&i.to_string()), false)).collect();
    app.upload("bob", &entries, "").await;
    assert_eq!(consume_statuses(&app, "alice", "bob", 2).await, [200, 200]);
    let response = app.consume_raw("alice", "bob").await;
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    problem(response, 429, "rate_limited").await;
    assert!(
        (3000..=3601).contains(&retry_after),
        "Retry-After {retry_after} for a 1 h refill"
    );
    assert_eq!(app.status("bob").await.regular_count, 3);
}

#[tokio::test]
async fn the_budget_follows_the_configured_limit() {
    let app = spawn_app_with(AppOptions {
        limits: Limits {
            budget: Budget::per_minute(3),
            ..v1_limits()
        },
        ..AppOptions::default()
    })
    .await;
    assert_eq!(
        consume_statuses(&app, "alice", "bob", 3).await,
        [404, 404, 404]
    );
    let response = app.consume_raw("alice", "bob").await;
    assert_eq!(response.status(), 429);
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (1..=21).contains(&retry_after),
        "one request refills every 20 s: {retry_after}"
    );
}

#[tokio::test]
async fn the_shared_budget_refills_one_request_per_interval() {
    // Another process spent bob's whole budget 6 s ago (explicit times, no waiting): exactly
    // one request has refilled since. Charged before this server starts, so that its start-up
    // pruning of refilled budgets sees the state as it would be in real time.
    let db = TestDb::new().await;
    let other_process = db.store().await;
    let bob = UserId::parse("bob").unwrap();
    let budget = Budget::per_minute(10);
    let six_seconds_ago = Some(keypackage_server::clock::unix_micros() - 6_000_000);
    for _ in 0..10 {
        let outcome = consume_at(&*other_process, &bob, budget, six_seconds_ago)
            .await
            .unwrap();
        assert_eq!(outcome, ConsumeOutcome::Empty);
    }
    let refused = consume_at(&*other_process, &bob, budget, six_seconds_ago)
        .await
        .unwrap();
    assert!(
        matches!(refused, ConsumeOutcome::RateLimited { .. }),
        "{refused:?}"
    );

    let app = spawn_app_on(db, AppOptions::default()).await;
    problem(app.consume_raw("alice", "bob").await, 404, "no_key_package").await;
    assert_rate_limited(app.consume_raw("alice", "bob").await).await;
}

#[tokio::test]
async fn the_budget_is_shared_by_server_processes_on_one_database() {
    let TwoProcesses { first, second, .. } = &two_processes(None).await;
    assert_eq!(
        consume_statuses(first, "alice", "bob", 5).await,
        vec![404; 5]
    );
    assert_eq!(
        consume_statuses(second, "alice", "bob", 5).await,
        vec![404; 5]
    );
    assert_rate_limited(first.consume_raw("alice", "bob").await).await;
    assert_rate_limited(second.consume_raw("alice", "bob").await).await;
}

/// Two server processes on one database; the servers go first when dropped,
/// then the data directory and the database.
struct TwoProcesses {
    first: ServerProcess,
    second: ServerProcess,
    _dir: TempDir,
    _db: TestDb,
}

/// Starts [`TwoProcesses`], each with `KPS_CONSUME_LIMIT_PER_MINUTE` set to `limit` (or the
/// default when `None`).
async fn two_processes(limit: Option<&str>) -> TwoProcesses {
    let db = TestDb::new().await;
    let dir = TempDir::new();
    let settings: Vec<_> = limit
        .map(|limit| ("KPS_CONSUME_LIMIT_PER_MINUTE", limit))
        .into_iter()
        .collect();
    // One after the other: the first applies the migrations, which two processes racing on a
    // fresh SQLite file cannot do at once.
    let first = ServerProcess::start_on(&db, &dir, &settings).await;
    let second = ServerProcess::start_on(&db, &dir, &settings).await;
    TwoProcesses {
        first,
        second,
        _dir: dir,
        _db: db,
    }
}

/// Sends 30 concurrent consumption requests for bob, alternating between the two processes,
/// and returns each status with its body.
async fn consume_concurrently(first: &ApiClient, second: &ApiClient) -> Vec<(u16, bytes::Bytes)> {
    let mut requests = tokio::task::JoinSet::new();
    for i in 0..30 {
        let app = if i % 2 == 0 { first } else { second };
        let request = app
            .client
            .get(app.url("/api/v1/key-packages/bob"))
            .bearer_auth(token(if i % 3 == 0 { "alice" } else { "carol" }));
        requests.spawn(async move {
            let response = request.send().await.expect("request");
            let status = response.status().as_u16();
            (status, response.bytes().await.expect("body"))
        });
    }
    let mut results = Vec::new();
    while let Some(joined) = requests.join_next().await {
        results.push(joined.expect("task"));
    }
    results
}

#[tokio::test]
async fn a_regular_package_is_handed_out_at_most_once_under_concurrency_across_processes() {
    let TwoProcesses { first, second, .. } = &two_processes(Some("1000")).await;
    let entries: Vec<_> = (0..10).map(|i| (kp(&format!("p{i}")), false)).collect();
    first.upload("bob", &entries, "").await;

    let mut handed_out = HashSet::new();
    for (status, body) in consume_concurrently(first, second).await {
        match status {
            200 => {
                let got = KeyPackageResponse::decode(body).expect("protobuf");
                assert!(
                    handed_out.insert(got.key_package_data.to_vec()),
                    "handed out twice"
                );
            }
            // A refused request must not lose a package; that is checked below.
            404 | 503 => {}
            other => panic!("unexpected status {other}: {body:?}"),
        }
    }
    let left = first.status("bob").await.regular_count as usize;
    assert_eq!(
        handed_out.len() + left,
        10,
        "every package is either handed out or still held"
    );
}

#[tokio::test]
async fn concurrent_consumers_on_two_processes_all_get_an_answer() {
    let TwoProcesses { first, second, .. } = &two_processes(Some("1000")).await;
    let entries: Vec<_> = (0..10).map(|i| (kp(&format!("p{i}")), false)).collect();
    first.upload("bob", &entries, "").await;
    let statuses: Vec<u16> = consume_concurrently(first, second)
        .await
        .into_iter()
        .map(|(status, _)| status)
        .collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        10,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 404).count(),
        20,
        "{statuses:?}"
    );
}
