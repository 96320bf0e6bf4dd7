//! `POST /api/v1/key-packages`, v1.1 rules: readable entries are judged on their lifetime and
//! signature key, opaque ones can be refused, and nothing of a refused request is stored.

use keypackage_server::{app::Limits, key_package::Fingerprint, key_package::UploadPolicy};

use crate::harness::*;
use crate::mls_oracle::with_openmls;

/// Bob's signature public key, and its fingerprint as clients send it.
const KEY: &[u8] = &[7; 32];

fn key_fingerprint() -> String {
    Fingerprint::of_public_key(KEY).as_str().to_owned()
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
}

/// A package valid from a minute ago for a day.
fn fresh(tag: &str) -> Vec<u8> {
    let now = unix_now();
    readable_kp(tag, KEY, now - 60, now + 86_400)
}

async fn spawn_with_policy(upload: UploadPolicy) -> TestApp {
    spawn_app_with(AppOptions {
        limits: Limits {
            upload,
            ..v1_limits()
        },
        ..AppOptions::default()
    })
    .await
}

/// Uploads `entries` for bob (regular), expects 400 `code` at `index`, and checks that bob
/// still holds nothing.
async fn assert_refused(
    app: &TestApp,
    entries: &[Vec<u8>],
    fingerprint: &str,
    code: &str,
    index: usize,
) {
    let entries: Vec<_> = entries.iter().map(|e| (e.clone(), false)).collect();
    let response = app
        .upload_raw("bob", &upload_request(&entries, fingerprint))
        .await;
    let body = problem(response, 400, code).await;
    assert_eq!(body["entry_index"], index, "{body}");
    let status = app.status("bob").await;
    assert_eq!(status.regular_count, 0, "nothing stored");
    assert!(!status.has_last_resort);
    assert_eq!(
        status.signing_key_fingerprint, "",
        "no fingerprint recorded"
    );
}

async fn metrics_text(app: &TestApp) -> String {
    let response = app.client.get(app.url("/metrics")).send().await.unwrap();
    response.text().await.unwrap()
}

#[tokio::test]
async fn upload_refuses_an_expired_package_with_invalid_lifetime_and_its_index() {
    let app = spawn_app().await;
    let now = unix_now();
    let expired = readable_kp("expired", KEY, now - 3600, now - 1);
    assert_refused(&app, &[fresh("ok"), expired], "", "invalid_lifetime", 1).await;
}

#[tokio::test]
async fn upload_refuses_not_before_after_not_after_with_invalid_lifetime() {
    let app = spawn_app().await;
    let now = unix_now();
    let inverted = readable_kp("inverted", KEY, now + 200, now + 100);
    assert_refused(&app, &[inverted], "", "invalid_lifetime", 0).await;
}

#[tokio::test]
async fn upload_accepts_not_before_exactly_300_seconds_ahead_and_refuses_later_ones() {
    let app = spawn_app().await;
    let now = unix_now();
    // The server's clock is at or past `now`, so now + 300 is within its skew allowance.
    let edge = readable_kp("edge", KEY, now + 300, now + 3600);
    let status = app.upload("bob", &[(edge.clone(), false)], "").await;
    assert_eq!(status.regular_count, 1);
    app.assert_hands_out("bob", &[edge]).await;
    let later = readable_kp("later", KEY, now + 400, now + 3600);
    assert_refused(&app, &[later], "", "invalid_lifetime", 0).await;
}

#[tokio::test]
async fn upload_refuses_a_lifetime_beyond_the_configured_maximum() {
    let app = spawn_with_policy(UploadPolicy {
        max_lifetime_secs: Some(3600),
        ..UploadPolicy::default()
    })
    .await;
    let now = unix_now();
    let long = readable_kp("long", KEY, now - 60, now + 7200);
    assert_refused(
        &app,
        &[fresh_short(now), long.clone()],
        "",
        "invalid_lifetime",
        1,
    )
    .await;
    let status = app.upload("bob", &[(fresh_short(now), false)], "").await;
    assert_eq!(status.regular_count, 1, "within the maximum");

    let unlimited = spawn_app().await;
    let status = unlimited.upload("bob", &[(long, false)], "").await;
    assert_eq!(status.regular_count, 1, "no maximum by default");
}

/// A package that ends within the hour.
fn fresh_short(now: u64) -> Vec<u8> {
    readable_kp("short", KEY, now - 60, now + 3000)
}

#[tokio::test]
async fn u64_max_lifetimes_are_accepted_without_a_maximum_and_refused_with_one() {
    let forever = readable_kp("forever", KEY, 0, u64::MAX);
    let app = spawn_app().await;
    let status = app.upload("bob", &[(forever.clone(), false)], "").await;
    assert_eq!(status.regular_count, 1);
    app.assert_hands_out("bob", std::slice::from_ref(&forever))
        .await;

    let capped = spawn_with_policy(UploadPolicy {
        max_lifetime_secs: Some(86_400),
        ..UploadPolicy::default()
    })
    .await;
    assert_refused(
        &capped,
        std::slice::from_ref(&forever),
        "",
        "invalid_lifetime",
        0,
    )
    .await;

    // A maximum of u64::MAX seconds cannot overflow `now + max`: it saturates.
    let huge = spawn_with_policy(UploadPolicy {
        max_lifetime_secs: Some(u64::MAX),
        ..UploadPolicy::default()
    })
    .await;
    assert_eq!(
        huge.upload("bob", &[(forever, false)], "")
            .await
            .regular_count,
        1
    );
    assert_eq!(huge.delete_all("bob").await.status(), 204);
    let late = readable_kp("late", KEY, u64::MAX, u64::MAX);
    assert_refused(&huge, &[late], "", "invalid_lifetime", 0).await;
}

#[tokio::test]
async fn upload_refuses_the_first_entry_signed_by_another_key_with_fingerprint_mismatch() {
    let app = spawn_app().await;
    let now = unix_now();
    let stranger = |tag| readable_kp(tag, &[8; 32], now - 60, now + 3600);
    assert_refused(
        &app,
        &[fresh("ours"), kp("opaque"), stranger("s1"), stranger("s2")],
        &key_fingerprint(),
        "fingerprint_mismatch",
        2,
    )
    .await;
    // Without a fingerprint in the request, nothing is compared.
    let status = app.upload("bob", &[(stranger("s1"), false)], "").await;
    assert_eq!(status.regular_count, 1);
}

#[tokio::test]
async fn a_readable_package_with_the_matching_fingerprint_is_accepted() {
    let app = spawn_app().await;
    let package = fresh("ours");
    let status = app
        .upload(
            "bob",
            &[(package.clone(), false), (kp("opaque"), true)],
            &key_fingerprint(),
        )
        .await;
    assert_eq!((status.regular_count, status.has_last_resort), (1, true));
    assert_eq!(status.signing_key_fingerprint, key_fingerprint());
    app.assert_hands_out("bob", &[package]).await;
}

#[tokio::test]
async fn a_real_openmls_package_with_its_signers_fingerprint_is_accepted() {
    let app = spawn_app().await;
    let member = with_openmls::Member::basic(with_openmls::SUITES[0], b"bob");
    let (_, bytes) = member.key_package(Default::default());
    let fingerprint = Fingerprint::of_public_key(member.signer.public());
    let status = app
        .upload("bob", &[(bytes.clone(), false)], fingerprint.as_str())
        .await;
    assert_eq!(status.regular_count, 1);
    assert_refused(
        &spawn_app().await,
        &[bytes],
        &key_fingerprint(),
        "fingerprint_mismatch",
        0,
    )
    .await;
}

#[tokio::test]
async fn opaque_packages_are_accepted_by_default_and_refused_when_readable_ones_are_required() {
    let app = spawn_app().await;
    let status = app.upload("bob", &[(kp("opaque"), false)], "").await;
    assert_eq!(status.regular_count, 1);

    let strict = spawn_with_policy(UploadPolicy {
        require_readable: true,
        ..UploadPolicy::default()
    })
    .await;
    assert_refused(
        &strict,
        &[fresh("ok"), kp("opaque")],
        "",
        "invalid_key_package",
        1,
    )
    .await;
    let status = strict.upload("bob", &[(fresh("ok"), false)], "").await;
    assert_eq!(status.regular_count, 1, "readable packages still pass");
}

#[tokio::test]
async fn a_refused_upload_leaves_what_was_held_and_the_fingerprint_alone() {
    let app = spawn_app().await;
    let held = fresh("held");
    app.upload("bob", &[(held.clone(), false)], &key_fingerprint())
        .await;
    let before = app.status("bob").await;
    let now = unix_now();
    let expired = readable_kp("expired", KEY, 0, now - 1);
    let response = app
        .upload_raw(
            "bob",
            &upload_request(&[(fresh("new"), false), (expired, true)], &fingerprint('b')),
        )
        .await;
    // The fingerprint `b` does not match the first entry, which is reported before entry 1.
    let body = problem(response, 400, "fingerprint_mismatch").await;
    assert_eq!(body["entry_index"], 0, "{body}");
    assert_eq!(app.status("bob").await, before);
    assert_eq!(
        app.fingerprint("bob", "bob").await.fingerprint,
        key_fingerprint()
    );
    app.assert_hands_out("bob", &[held]).await;
}

#[tokio::test]
async fn refused_uploads_are_counted_by_error_code() {
    let app = spawn_app().await;
    let now = unix_now();
    let expired = readable_kp("expired", KEY, 0, now - 1);
    assert_refused(
        &app,
        std::slice::from_ref(&expired),
        "",
        "invalid_lifetime",
        0,
    )
    .await;
    assert_refused(&app, &[expired], "", "invalid_lifetime", 0).await;
    let stranger = readable_kp("s", &[8; 32], 0, now + 3600);
    assert_refused(
        &app,
        &[stranger],
        &key_fingerprint(),
        "fingerprint_mismatch",
        0,
    )
    .await;
    assert_refused(&app, &[vec![0, 1]], "", "invalid_key_package", 0).await;
    app.upload("bob", &[(fresh("ok"), false)], "").await;

    let text = metrics_text(&app).await;
    let count = |reason: &str| {
        let series = format!(r#"kps_key_package_uploads_refused_total{{reason="{reason}"}} "#);
        text.lines()
            .find_map(|l| l.strip_prefix(series.as_str()))
            .map(|v| v.trim().to_owned())
    };
    assert_eq!(count("invalid_lifetime").as_deref(), Some("2"), "{text}");
    assert_eq!(
        count("fingerprint_mismatch").as_deref(),
        Some("1"),
        "{text}"
    );
    assert_eq!(count("invalid_key_package").as_deref(), Some("1"), "{text}");
    assert_eq!(count("empty_upload"), None, "no series before a refusal");
}

#[tokio::test]
async fn the_binary_reads_both_upload_settings_from_the_environment() {
    let db = TestDb::new().await;
    let dir = TempDir::new();
    let server = ServerProcess::start_on(
        &db,
        &dir,
        &[
            ("KPS_REQUIRE_READABLE_KEY_PACKAGES", "true"),
            ("KPS_MAX_KEY_PACKAGE_LIFETIME_SECS", "3600"),
        ],
    )
    .await;
    let response = server
        .api
        .upload_raw("bob", &upload_request(&[(kp("opaque"), false)], ""))
        .await;
    let body = problem(response, 400, "invalid_key_package").await;
    assert_eq!(body["entry_index"], 0, "{body}");
    let now = unix_now();
    let long = readable_kp("long", KEY, now - 60, now + 7200);
    let response = server
        .api
        .upload_raw("bob", &upload_request(&[(long, false)], ""))
        .await;
    let body = problem(response, 400, "invalid_lifetime").await;
    assert_eq!(body["entry_index"], 0, "{body}");
    let status = server
        .api
        .upload("bob", &[(fresh_short(now), false)], "")
        .await;
    assert_eq!(status.regular_count, 1);
}
