//! `GET /api/v1/key-packages` (the caller's own status) and `DELETE /api/v1/key-packages`.

use keypackage_server::wire::KeyPackageStatus;

use crate::harness::*;

#[tokio::test]
async fn status_of_a_caller_who_never_uploaded_is_all_zeros() {
    let app = spawn_app().await;
    assert_eq!(app.status("newcomer").await, KeyPackageStatus::default());
}

#[tokio::test]
async fn status_reports_counts_last_resort_fingerprint_and_handouts() {
    let app = spawn_app().await;
    app.upload(
        "bob",
        &[(kp("1"), false), (kp("2"), false), (kp("lr"), true)],
        &fingerprint('c'),
    )
    .await;
    app.consume("alice", "bob").await;
    assert_eq!(
        v1_status(&app.status("bob").await),
        (1, true, fingerprint('c'), 0)
    );
    app.consume("alice", "bob").await;
    app.consume("alice", "bob").await;
    assert_eq!(
        v1_status(&app.status("bob").await),
        (0, true, fingerprint('c'), 1)
    );
}

#[tokio::test]
async fn status_is_the_callers_own() {
    let app = spawn_app().await;
    app.upload(
        "bob",
        &[(kp("1"), false), (kp("lr"), true)],
        &fingerprint('b'),
    )
    .await;
    app.upload("alice", &[(kp("a"), false)], "").await;
    let alice = app.status("alice").await;
    assert_eq!(alice.regular_count, 1);
    assert!(!alice.has_last_resort);
    assert_eq!(alice.signing_key_fingerprint, "");
}

#[tokio::test]
async fn status_does_not_consume_anything() {
    let app = spawn_app().await;
    app.upload("bob", &[(kp("1"), false)], "").await;
    for _ in 0..20 {
        assert_eq!(app.status("bob").await.regular_count, 1);
    }
    assert_eq!(
        app.consume("alice", "bob").await.key_package_data.to_vec(),
        kp("1")
    );
}

#[tokio::test]
async fn delete_returns_204_and_removes_regular_and_last_resort_packages() {
    let app = spawn_app().await;
    app.upload(
        "bob",
        &[(kp("1"), false), (kp("2"), false), (kp("lr"), true)],
        "",
    )
    .await;
    let response = app.delete_all("bob").await;
    assert_eq!(response.status(), 204);
    assert!(response.bytes().await.unwrap().is_empty());
    let status = app.status("bob").await;
    assert_eq!(status.regular_count, 0);
    assert!(!status.has_last_resort);
    problem(app.consume_raw("alice", "bob").await, 404, "no_key_package").await;
}

#[tokio::test]
async fn delete_keeps_the_fingerprint() {
    let app = spawn_app().await;
    app.upload(
        "bob",
        &[(kp("1"), false), (kp("lr"), true)],
        &fingerprint('d'),
    )
    .await;
    let before = app.fingerprint("alice", "bob").await;
    assert_eq!(app.delete_all("bob").await.status(), 204);
    assert_eq!(app.fingerprint("alice", "bob").await, before);
    assert_eq!(
        app.status("bob").await.signing_key_fingerprint,
        fingerprint('d')
    );
}

#[tokio::test]
async fn delete_with_nothing_stored_returns_204() {
    let app = spawn_app().await;
    assert_eq!(app.delete_all("nobody").await.status(), 204);
    assert_eq!(app.status("nobody").await, KeyPackageStatus::default());
}

#[tokio::test]
async fn delete_removes_only_the_callers_packages() {
    let app = spawn_app().await;
    app.upload("bob", &[(kp("b"), false)], "").await;
    app.upload("carol", &[(kp("c"), false), (kp("c-lr"), true)], "")
        .await;
    assert_eq!(app.delete_all("bob").await.status(), 204);
    let carol = app.status("carol").await;
    assert_eq!(carol.regular_count, 1);
    assert!(carol.has_last_resort);
}

#[tokio::test]
async fn uploads_after_a_delete_start_afresh() {
    let app = spawn_app().await;
    app.upload("bob", &[(kp("1"), false), (kp("lr"), true)], "")
        .await;
    app.consume("alice", "bob").await;
    app.consume("alice", "bob").await;
    app.delete_all("bob").await;
    // The same bytes are accepted again: nothing is held any more.
    let status = app
        .upload("bob", &[(kp("1"), false), (kp("lr"), true)], "")
        .await;
    assert_eq!(status.regular_count, 1);
    assert!(status.has_last_resort);
    assert_eq!(status.last_resort_handouts, 0);
}
