//! `GET /api/v1/users/{user_id}/fingerprint`: the current signing-key fingerprint.

use keypackage_server::wire::SigningKeyFingerprint;

use crate::harness::*;

#[tokio::test]
async fn fingerprint_route_returns_the_current_fingerprint_and_when_it_was_set() {
    let app = spawn_app().await;
    let before = unix_now();
    app.upload("bob", &[(kp("1"), false)], &fingerprint('e'))
        .await;
    let after = unix_now();
    let response = app.fingerprint_raw("alice", "bob").await;
    assert_eq!(response.status(), 200);
    let got: SigningKeyFingerprint = decode(response).await;
    assert_eq!(got.fingerprint, fingerprint('e'));
    assert!(
        (before..=after).contains(&got.updated_at),
        "{got:?} not in {before}..={after}"
    );
}

#[tokio::test]
async fn fingerprint_route_follows_a_new_fingerprint() {
    let app = spawn_app().await;
    app.upload("bob", &[(kp("1"), false)], &fingerprint('1'))
        .await;
    app.upload("bob", &[(kp("2"), false)], &fingerprint('2'))
        .await;
    assert_eq!(
        app.fingerprint("alice", "bob").await.fingerprint,
        fingerprint('2')
    );
}

#[tokio::test]
async fn fingerprint_route_returns_404_no_fingerprint_for_a_user_who_never_sent_one() {
    let app = spawn_app().await;
    problem(
        app.fingerprint_raw("alice", "nobody").await,
        404,
        "no_fingerprint",
    )
    .await;
    app.upload("bob", &[(kp("1"), false), (kp("lr"), true)], "")
        .await;
    problem(
        app.fingerprint_raw("alice", "bob").await,
        404,
        "no_fingerprint",
    )
    .await;
}

#[tokio::test]
async fn fingerprint_route_is_not_rate_limited_and_consumes_nothing() {
    let app = spawn_app().await;
    app.upload("bob", &[(kp("1"), false)], &fingerprint('f'))
        .await;
    for _ in 0..20 {
        assert_eq!(app.fingerprint_raw("alice", "bob").await.status(), 200);
    }
    assert_eq!(app.status("bob").await.regular_count, 1);
    // Nor did the look-ups spend bob's consumption budget.
    assert_eq!(
        app.consume("alice", "bob").await.key_package_data.to_vec(),
        kp("1")
    );
    for _ in 0..9 {
        assert_eq!(app.consume_raw("alice", "bob").await.status(), 404);
    }
}

#[tokio::test]
async fn fingerprint_route_rejects_an_invalid_user_id_with_400() {
    let app = spawn_app().await;
    let too_long = "x".repeat(129);
    for id in ["a%2Fb", "%C3%A9", too_long.as_str(), "a%20b", "%FF"] {
        problem(
            app.fingerprint_raw("alice", id).await,
            400,
            "invalid_user_id",
        )
        .await;
    }
}
