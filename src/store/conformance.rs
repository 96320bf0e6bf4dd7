//! Backend-agnostic cases every [`KeyPackageStore`] must pass: the store rules of the contract.
//!
//! Each case expects a fresh, empty store and panics on the first broken rule. The list of
//! cases is written once, in [`conformance_tests!`](crate::conformance_tests), which expands
//! into one `#[tokio::test]` per case for a backend's test module; cases are private, so one
//! left out of the list fails the build as dead code.

use std::{future::Future, pin::Pin, time::Duration};

use bytes::Bytes;

use super::{Claim, ConsumeOutcome, Consumed, KeyPackageStore, Status};
use crate::{
    key_package::{Fingerprint, Upload, UploadPolicy, UserId, MAX_REGULAR_PACKAGES},
    rate_limit::Budget,
};

/// Expands into one `#[tokio::test]` per conformance case. `$fresh` is an async fn returning
/// `Option<(guard, Arc<dyn KeyPackageStore>)>` on a fresh, empty database (`None` skips the
/// case, e.g. when the backend is not configured); the guard lives until the case ends.
///
/// ```ignore
/// mod sqlite {
///     keypackage_server::conformance_tests!(crate::fresh_sqlite_store);
/// }
/// ```
#[macro_export]
macro_rules! conformance_tests {
    ($fresh:path) => {
        $crate::conformance_tests!(@list tests $fresh);
    };
    (@list $($mode:tt)*) => {
        $crate::conformance_tests!(@expand [$($mode)*]
            status_of_an_unknown_user_is_zeros,
            regular_packages_are_handed_out_oldest_first,
            one_upload_of_fifteen_keeps_the_newest_ten,
            successive_uploads_keep_the_newest_ten,
            last_resort_is_handed_out_when_no_regular_is_left_and_never_removed,
            last_resort_handouts_count_only_last_resort_hand_outs,
            replacing_the_last_resort_resets_its_handouts,
            entry_identical_to_a_held_regular_package_is_skipped,
            entry_identical_to_the_held_last_resort_is_skipped,
            last_resort_entry_identical_to_a_held_regular_package_is_skipped,
            retried_upload_changes_nothing,
            fingerprint_is_recorded_with_each_package,
            fingerprint_updated_at_changes_only_with_the_value,
            delete_all_removes_every_package_and_keeps_the_fingerprint,
            users_are_isolated,
            budget_allows_a_burst_then_rate_limits_until_refilled,
            rate_limited_and_empty_requests_hand_out_nothing_but_charge_the_budget,
            budgets_are_per_target,
            a_budget_spent_by_a_clock_that_ran_ahead_locks_the_target_one_interval_at_most,
            prune_budgets_removes_only_refilled_state,
            expired_regular_packages_are_skipped_and_removed_by_the_next_consume,
            each_package_is_removed_by_the_first_claim_after_it_expires,
            an_expired_last_resort_package_is_not_handed_out,
            expired_packages_go_before_the_cap_trims_servable_ones,
            a_suite_filter_serves_the_oldest_package_of_the_requested_suites,
            no_package_of_the_requested_suites_is_incompatible_and_charged,
            the_last_resort_package_qualifies_only_for_its_suite,
            a_handed_out_package_carries_its_facts,
            lifetimes_beyond_i64_compare_as_u64,
            the_status_describes_the_servable_inventory,
            claim_stages_are_judged_in_order_and_a_refusal_charges_no_stage,
            claim_stages_that_are_off_refuse_nothing,
            a_keyed_claim_replays_its_package_and_charges_nothing,
            a_key_belongs_to_its_caller_and_its_first_target,
            only_hand_outs_are_remembered_and_only_for_their_time_to_live
        );
    };
    (@expand [table] $($case:ident),* $(,)?) => {
        /// Every case with its name.
        const CASES: &[(&str, Case)] = &[$((stringify!($case), |store| Box::pin($case(store)))),*];
    };
    (@expand [tests $fresh:path] $($case:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $case() {
                let Some((_guard, store)) = $fresh().await else {
                    return;
                };
                $crate::store::conformance::run(stringify!($case), store.as_ref()).await;
            }
        )*
    };
}

/// One conformance case, boxed so that all of them fit in one list.
type Case = for<'a> fn(&'a dyn KeyPackageStore) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

crate::conformance_tests!(@list table);

/// Runs the case called `name` on `store`; an unknown name is a bug in the caller.
pub async fn run(name: &str, store: &dyn KeyPackageStore) {
    let Some((_, case)) = CASES.iter().find(|(n, _)| *n == name) else {
        panic!("no conformance case named {name}");
    };
    case(store).await;
}

/// A fixed "now" for the budget, in ms since the epoch; cases advance it explicitly.
const NOW_MS: i64 = 1_700_000_000_000;

/// A fixed "now" for uploads, in Unix seconds.
const NOW_UNIX: i64 = 1_700_000_000;

/// A budget no case exhausts unless it means to.
const PLENTY: Budget = Budget {
    burst: 1_000_000,
    interval: Duration::from_millis(1),
};

/// Key-package bytes: the MLS header and a tag that tells packages apart.
fn package(tag: &str) -> Bytes {
    let mut bytes = vec![0x00, 0x01, 0x00, 0x05];
    bytes.extend_from_slice(tag.as_bytes());
    bytes.into()
}

fn user(name: &str) -> UserId {
    UserId::parse(name).expect("valid user id")
}

fn fingerprint(digit: char) -> Fingerprint {
    Fingerprint::parse(&digit.to_string().repeat(64)).expect("valid fingerprint")
}

/// An upload of regular packages tagged `regular` and, optionally, a last-resort package.
fn upload(
    regular: &[&str],
    last_resort: Option<&str>,
    fingerprint: Option<&Fingerprint>,
) -> Upload {
    let entries = regular
        .iter()
        .map(|tag| (package(tag), false))
        .chain(last_resort.map(|tag| (package(tag), true)));
    // Synthetic packages are opaque: neither the time nor the policy bears on them.
    Upload::parse(
        entries,
        fingerprint.map_or("", Fingerprint::as_str),
        0,
        UploadPolicy::default(),
    )
    .expect("valid upload")
}

/// Tags `prefix0`, `prefix1`, … for `range`.
fn tags(prefix: &str, range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("{prefix}{i}")).collect()
}

fn strs(tags: &[String]) -> Vec<&str> {
    tags.iter().map(String::as_str).collect()
}

async fn put(store: &dyn KeyPackageStore, who: &str, upload: &Upload) -> super::UploadOutcome {
    store
        .upload(&user(who), upload, NOW_UNIX)
        .await
        .expect("upload")
}

/// Prunes every refilled budget row at `now_ms`, in one call.
async fn prune(store: &dyn KeyPackageStore, now_ms: i64) -> u64 {
    store
        .prune_budgets(Some(now_ms * 1_000), u32::MAX)
        .await
        .expect("prune")
}

async fn status(store: &dyn KeyPackageStore, who: &str) -> Status {
    store.status(&user(who), NOW_UNIX).await.expect("status")
}

async fn consume(store: &dyn KeyPackageStore, who: &str) -> ConsumeOutcome {
    consume_with(store, who, PLENTY, NOW_MS).await
}

async fn consume_with(
    store: &dyn KeyPackageStore,
    who: &str,
    budget: Budget,
    now_ms: i64,
) -> ConsumeOutcome {
    let target = user(who);
    store
        .consume(&Claim {
            now_us: Some(now_ms * 1_000),
            ..Claim::new(&target, budget)
        })
        .await
        .expect("consume")
        .outcome
}

fn is_rate_limited(outcome: &ConsumeOutcome) -> bool {
    matches!(outcome, ConsumeOutcome::RateLimited { .. })
}

/// Consumes one package, which must be handed out.
async fn take(store: &dyn KeyPackageStore, who: &str) -> Consumed {
    match consume(store, who).await {
        ConsumeOutcome::Consumed(c) => c,
        other => panic!("expected a package for {who}, got {other:?}"),
    }
}

/// Consumes `expected.len()` packages, which must be the regular packages tagged `expected`,
/// in that order.
async fn take_regular(store: &dyn KeyPackageStore, who: &str, expected: &[&str]) {
    for tag in expected {
        let got = take(store, who).await;
        assert!(
            !got.is_last_resort,
            "expected regular {tag:?}, got the last-resort package"
        );
        assert_eq!(got.key_package, package(tag), "expected regular {tag:?}");
    }
}

/// Consumes one package, which must be the last-resort package tagged `tag`.
async fn take_last_resort(store: &dyn KeyPackageStore, who: &str, tag: &str) {
    take_last_resort_with(store, who, PLENTY, NOW_MS, tag).await;
}

async fn take_last_resort_with(
    store: &dyn KeyPackageStore,
    who: &str,
    budget: Budget,
    now_ms: i64,
    tag: &str,
) {
    match consume_with(store, who, budget, now_ms).await {
        ConsumeOutcome::Consumed(got) => {
            assert!(
                got.is_last_resort,
                "expected the last-resort package, got a regular one"
            );
            assert_eq!(
                got.key_package,
                package(tag),
                "expected last-resort {tag:?}"
            );
        }
        other => panic!("expected last-resort {tag:?} for {who}, got {other:?}"),
    }
}

async fn assert_empty(store: &dyn KeyPackageStore, who: &str) {
    assert_eq!(
        consume(store, who).await,
        ConsumeOutcome::Empty,
        "{who} should hold nothing"
    );
}

/// A user who never uploaded has zero counts, no fingerprint, and nothing to hand out.
async fn status_of_an_unknown_user_is_zeros(store: &dyn KeyPackageStore) {
    assert_eq!(status(store, "nobody").await, Status::default());
    assert_eq!(
        store
            .fingerprint(&user("nobody"))
            .await
            .expect("fingerprint"),
        None
    );
    assert_empty(store, "nobody").await;
    store
        .delete_all(&user("nobody"))
        .await
        .expect("delete_all of nobody");
    assert_eq!(status(store, "nobody").await, Status::default());
}

/// Regular packages come out oldest first: request order within an upload, upload order
/// across uploads; each is removed as it is handed out.
async fn regular_packages_are_handed_out_oldest_first(store: &dyn KeyPackageStore) {
    put(store, "bob", &upload(&["a", "b", "c"], None, None)).await;
    put(store, "bob", &upload(&["d", "e"], None, None)).await;
    assert_eq!(status(store, "bob").await.regular_count, 5);
    take_regular(store, "bob", &["a", "b"]).await;
    assert_eq!(status(store, "bob").await.regular_count, 3);
    take_regular(store, "bob", &["c", "d", "e"]).await;
    assert_empty(store, "bob").await;
}

/// One upload of 15 regular entries keeps its 10 newest (the last 10 of the request); the
/// last-resort package does not count towards the cap.
async fn one_upload_of_fifteen_keeps_the_newest_ten(store: &dyn KeyPackageStore) {
    let all = tags("p", 0..15);
    let outcome = put(store, "bob", &upload(&strs(&all), Some("lr"), None)).await;
    assert_eq!(outcome.status.regular_count, MAX_REGULAR_PACKAGES as u32);
    assert!(outcome.status.has_last_resort);
    assert_eq!(status(store, "bob").await, outcome.status);
    take_regular(store, "bob", &strs(&all[5..])).await;
    take_last_resort(store, "bob", "lr").await;
}

/// Successive uploads append and then drop the oldest packages until 10 remain.
async fn successive_uploads_keep_the_newest_ten(store: &dyn KeyPackageStore) {
    let all = tags("p", 0..16);
    put(store, "bob", &upload(&strs(&all[0..6]), None, None)).await;
    let outcome = put(store, "bob", &upload(&strs(&all[6..12]), None, None)).await;
    assert_eq!(outcome.status.regular_count, 10, "p0 and p1 dropped");
    take_regular(store, "bob", &strs(&all[2..4])).await;
    assert_eq!(status(store, "bob").await.regular_count, 8);
    let outcome = put(store, "bob", &upload(&strs(&all[12..16]), None, None)).await;
    assert_eq!(outcome.status.regular_count, 10, "p4 and p5 dropped");
    take_regular(store, "bob", &strs(&all[6..16])).await;
    assert_empty(store, "bob").await;
}

/// With no regular package left the last-resort package is handed out, flagged as such, as
/// often as asked, and stays stored.
async fn last_resort_is_handed_out_when_no_regular_is_left_and_never_removed(
    store: &dyn KeyPackageStore,
) {
    put(store, "bob", &upload(&["r1"], Some("lr"), None)).await;
    take_regular(store, "bob", &["r1"]).await;
    for _ in 0..3 {
        take_last_resort(store, "bob", "lr").await;
    }
    let after = status(store, "bob").await;
    assert_eq!(after.regular_count, 0);
    assert!(
        after.has_last_resort,
        "the last-resort package is never removed by consumption"
    );

    // New regular packages take precedence again.
    put(store, "bob", &upload(&["r2"], None, None)).await;
    take_regular(store, "bob", &["r2"]).await;
    take_last_resort(store, "bob", "lr").await;
}

/// `last_resort_handouts` counts hand-outs of the last-resort package only.
async fn last_resort_handouts_count_only_last_resort_hand_outs(store: &dyn KeyPackageStore) {
    put(store, "bob", &upload(&["r1", "r2"], Some("lr"), None)).await;
    assert_eq!(status(store, "bob").await.last_resort_handouts, 0);
    take_regular(store, "bob", &["r1", "r2"]).await;
    assert_eq!(status(store, "bob").await.last_resort_handouts, 0);
    for expected in 1..=3 {
        take_last_resort(store, "bob", "lr").await;
        assert_eq!(status(store, "bob").await.last_resort_handouts, expected);
    }
    // An upload of regular packages alone keeps the count: the last-resort package is the same.
    put(store, "bob", &upload(&["r3"], None, None)).await;
    assert_eq!(status(store, "bob").await.last_resort_handouts, 3);
}

/// A new last-resort package replaces the held one and starts its hand-out count at 0.
async fn replacing_the_last_resort_resets_its_handouts(store: &dyn KeyPackageStore) {
    put(store, "bob", &upload(&[], Some("lr1"), None)).await;
    take_last_resort(store, "bob", "lr1").await;
    take_last_resort(store, "bob", "lr1").await;
    assert_eq!(status(store, "bob").await.last_resort_handouts, 2);

    let outcome = put(store, "bob", &upload(&[], Some("lr2"), None)).await;
    assert_eq!(outcome.stored, 1);
    assert_eq!(outcome.status.last_resort_handouts, 0);
    assert!(outcome.status.has_last_resort);
    take_last_resort(store, "bob", "lr2").await;
    assert_eq!(status(store, "bob").await.last_resort_handouts, 1);
}

/// A regular entry byte-identical to a held regular package (or to an earlier entry of the
/// same request) is skipped: it is neither stored twice nor moved to the back of the queue.
async fn entry_identical_to_a_held_regular_package_is_skipped(store: &dyn KeyPackageStore) {
    let first = put(store, "bob", &upload(&["a", "b", "a"], None, None)).await;
    assert_eq!(first.stored, 2);
    assert_eq!(first.status.regular_count, 2);
    let second = put(store, "bob", &upload(&["b", "c", "a"], None, None)).await;
    assert_eq!(second.stored, 1, "only c is new");
    assert_eq!(second.status.regular_count, 3);
    take_regular(store, "bob", &["a", "b", "c"]).await;
    assert_empty(store, "bob").await;
}

/// An entry byte-identical to the held last-resort package is skipped, whether it comes as a
/// last-resort entry (the hand-out count is kept) or as a regular one (it is not stored).
async fn entry_identical_to_the_held_last_resort_is_skipped(store: &dyn KeyPackageStore) {
    put(store, "bob", &upload(&[], Some("lr"), None)).await;
    take_last_resort(store, "bob", "lr").await;

    let again = put(store, "bob", &upload(&[], Some("lr"), None)).await;
    assert_eq!(again.stored, 0);
    assert_eq!(
        again.status.last_resort_handouts, 1,
        "re-sending it is not a replacement"
    );

    let as_regular = put(store, "bob", &upload(&["lr", "r1"], None, None)).await;
    assert_eq!(as_regular.stored, 1, "only r1 is new");
    assert_eq!(as_regular.status.regular_count, 1);
    take_regular(store, "bob", &["r1"]).await;
    take_last_resort(store, "bob", "lr").await;
}

/// A last-resort entry byte-identical to a held regular package is skipped: the regular one
/// stays, and no last-resort package appears.
async fn last_resort_entry_identical_to_a_held_regular_package_is_skipped(
    store: &dyn KeyPackageStore,
) {
    put(store, "bob", &upload(&["a"], None, None)).await;
    let outcome = put(store, "bob", &upload(&[], Some("a"), None)).await;
    assert_eq!(outcome.stored, 0);
    assert!(!outcome.status.has_last_resort);
    assert_eq!(outcome.status.regular_count, 1);
    take_regular(store, "bob", &["a"]).await;
    assert_empty(store, "bob").await;
}

/// Repeating an upload changes nothing: same status, same fingerprint time, and every
/// package is still handed out exactly once.
async fn retried_upload_changes_nothing(store: &dyn KeyPackageStore) {
    let fp = fingerprint('a');
    let request = upload(&["a", "b", "c"], Some("lr"), Some(&fp));
    let first = store
        .upload(&user("bob"), &request, NOW_UNIX)
        .await
        .expect("upload");
    assert_eq!(first.stored, 4);
    let retry = store
        .upload(&user("bob"), &request, NOW_UNIX + 60)
        .await
        .expect("retry");
    assert_eq!(retry.stored, 0);
    assert_eq!(retry.status, first.status);
    assert_eq!(status(store, "bob").await, first.status);
    assert_eq!(
        store.fingerprint(&user("bob")).await.expect("fingerprint"),
        Some((fp, NOW_UNIX))
    );
    take_regular(store, "bob", &["a", "b", "c"]).await;
    take_last_resort(store, "bob", "lr").await;
    assert_eq!(status(store, "bob").await.last_resort_handouts, 1);
}

/// Each package carries the fingerprint sent with its upload: a package uploaded without one
/// comes back without one, even after a later upload set a fingerprint.
async fn fingerprint_is_recorded_with_each_package(store: &dyn KeyPackageStore) {
    let (x, y) = (fingerprint('1'), fingerprint('2'));
    put(store, "bob", &upload(&["plain"], None, None)).await;
    put(store, "bob", &upload(&["x1"], Some("lr"), Some(&x))).await;
    put(store, "bob", &upload(&["y1"], None, Some(&y))).await;
    put(store, "bob", &upload(&["plain2"], None, None)).await;

    let expected = [
        ("plain", None),
        ("x1", Some(&x)),
        ("y1", Some(&y)),
        ("plain2", None),
    ];
    for (tag, fp) in expected {
        let got = take(store, "bob").await;
        assert_eq!(got.key_package, package(tag));
        assert_eq!(got.fingerprint.as_ref(), fp, "fingerprint of {tag}");
    }
    let last = take(store, "bob").await;
    assert!(last.is_last_resort);
    assert_eq!(
        last.fingerprint.as_ref(),
        Some(&x),
        "the last-resort package keeps its own"
    );
    assert_eq!(
        status(store, "bob").await.fingerprint,
        Some(y),
        "current is the latest sent"
    );
}

/// The current fingerprint is the last one sent; its time changes only when the value does,
/// and an upload without a fingerprint keeps it.
async fn fingerprint_updated_at_changes_only_with_the_value(store: &dyn KeyPackageStore) {
    let bob = user("bob");
    let (x, y) = (fingerprint('d'), fingerprint('e'));
    store
        .upload(&bob, &upload(&["a"], None, None), 100)
        .await
        .expect("upload");
    assert_eq!(store.fingerprint(&bob).await.expect("fingerprint"), None);

    store
        .upload(&bob, &upload(&["b"], None, Some(&x)), 200)
        .await
        .expect("upload");
    assert_eq!(
        store.fingerprint(&bob).await.expect("fingerprint"),
        Some((x.clone(), 200))
    );

    store
        .upload(&bob, &upload(&["c"], None, Some(&x)), 300)
        .await
        .expect("upload");
    store
        .upload(&bob, &upload(&["d"], None, None), 400)
        .await
        .expect("upload");
    assert_eq!(
        store.fingerprint(&bob).await.expect("fingerprint"),
        Some((x.clone(), 200))
    );
    assert_eq!(status(store, "bob").await.fingerprint, Some(x));

    // Set even when every entry is skipped as already held.
    store
        .upload(&bob, &upload(&["a"], None, Some(&y)), 500)
        .await
        .expect("upload");
    assert_eq!(
        store.fingerprint(&bob).await.expect("fingerprint"),
        Some((y.clone(), 500))
    );
    assert_eq!(status(store, "bob").await.fingerprint, Some(y));
}

/// `delete_all` removes the regular and the last-resort packages and resets the hand-out
/// count; the fingerprint and its time stay. Deleted packages no longer count as held.
async fn delete_all_removes_every_package_and_keeps_the_fingerprint(store: &dyn KeyPackageStore) {
    let fp = fingerprint('c');
    put(store, "bob", &upload(&["a", "b"], Some("lr"), Some(&fp))).await;
    take_regular(store, "bob", &["a", "b"]).await;
    take_last_resort(store, "bob", "lr").await;
    put(store, "bob", &upload(&["c"], None, None)).await;

    store.delete_all(&user("bob")).await.expect("delete_all");
    assert_eq!(
        status(store, "bob").await,
        Status {
            fingerprint: Some(fp.clone()),
            ..Status::default()
        }
    );
    assert_eq!(
        store.fingerprint(&user("bob")).await.expect("fingerprint"),
        Some((fp, NOW_UNIX))
    );
    assert_empty(store, "bob").await;

    let again = put(store, "bob", &upload(&["c"], Some("lr"), None)).await;
    assert_eq!(again.stored, 2, "deleted packages are not held any more");
    assert_eq!(again.status.last_resort_handouts, 0);
}

/// One user's packages, budget and deletions never touch another's; identical bytes held by
/// two users are two packages.
async fn users_are_isolated(store: &dyn KeyPackageStore) {
    let (x, y) = (fingerprint('a'), fingerprint('b'));
    put(
        store,
        "alice",
        &upload(&["shared", "a1"], Some("alr"), Some(&x)),
    )
    .await;
    let bob = put(store, "bob", &upload(&["shared", "b1"], None, Some(&y))).await;
    assert_eq!(
        bob.stored, 2,
        "alice's copy does not make bob's a duplicate"
    );

    let got = take(store, "bob").await;
    assert_eq!(
        (got.key_package, got.fingerprint),
        (package("shared"), Some(y.clone()))
    );
    take_regular(store, "bob", &["b1"]).await;
    assert_empty(store, "bob").await;

    store.delete_all(&user("bob")).await.expect("delete_all");
    let alice = status(store, "alice").await;
    assert_eq!(
        (
            alice.regular_count,
            alice.has_last_resort,
            alice.fingerprint,
            alice.last_resort_handouts
        ),
        (2, true, Some(x), 0)
    );
    assert_eq!(status(store, "bob").await.fingerprint, Some(y));
    take_regular(store, "alice", &["shared", "a1"]).await;
    take_last_resort(store, "alice", "alr").await;
}

/// The budget allows a burst of `burst` consumptions, then refuses with the time until one
/// more is allowed, and refills one per interval (fully after `burst` intervals).
async fn budget_allows_a_burst_then_rate_limits_until_refilled(store: &dyn KeyPackageStore) {
    let budget = Budget::per_minute(10);
    let all = tags("p", 0..10);
    put(store, "bob", &upload(&strs(&all), Some("lr"), None)).await;
    let limited = |ms: u64| ConsumeOutcome::RateLimited {
        retry_after: Duration::from_millis(ms),
        scope: crate::rate_limit::Scope::Target,
    };

    for tag in &all {
        match consume_with(store, "bob", budget, NOW_MS).await {
            ConsumeOutcome::Consumed(got) => assert_eq!(got.key_package, package(tag)),
            other => panic!("within the burst, got {other:?}"),
        }
    }
    assert_eq!(
        consume_with(store, "bob", budget, NOW_MS).await,
        limited(6_000)
    );
    assert_eq!(
        consume_with(store, "bob", budget, NOW_MS + 5_999).await,
        limited(1)
    );
    assert!(matches!(
        consume_with(store, "bob", budget, NOW_MS + 6_000).await,
        ConsumeOutcome::Consumed(Consumed {
            is_last_resort: true,
            ..
        })
    ));
    assert_eq!(
        consume_with(store, "bob", budget, NOW_MS + 6_000).await,
        limited(6_000)
    );

    // A minute after the last allowed request the bucket is full again.
    let later = NOW_MS + 66_000;
    for _ in 0..10 {
        take_last_resort_with(store, "bob", budget, later, "lr").await;
    }
    assert_eq!(
        consume_with(store, "bob", budget, later).await,
        limited(6_000)
    );
}

/// A refused request hands out nothing and counts no hand-out; a request that finds nothing
/// still takes its share of the budget.
async fn rate_limited_and_empty_requests_hand_out_nothing_but_charge_the_budget(
    store: &dyn KeyPackageStore,
) {
    let budget = Budget::per_minute(3);
    for _ in 0..3 {
        assert_eq!(
            consume_with(store, "carol", budget, NOW_MS).await,
            ConsumeOutcome::Empty
        );
    }
    assert!(is_rate_limited(
        &consume_with(store, "carol", budget, NOW_MS).await
    ));

    put(store, "bob", &upload(&["a"], Some("lr"), None)).await;
    for _ in 0..3 {
        let got = consume_with(store, "bob", budget, NOW_MS).await;
        assert!(
            matches!(got, ConsumeOutcome::Consumed(_)),
            "within the burst: {got:?}"
        );
    }
    let spent = status(store, "bob").await;
    assert_eq!((spent.regular_count, spent.last_resort_handouts), (0, 2));
    put(store, "bob", &upload(&["b"], None, None)).await;
    for _ in 0..3 {
        assert!(is_rate_limited(
            &consume_with(store, "bob", budget, NOW_MS).await
        ));
    }
    let after = status(store, "bob").await;
    assert_eq!(
        (after.regular_count, after.last_resort_handouts),
        (1, 2),
        "nothing handed out"
    );
    // The refusals did not extend the wait: one interval later one request is allowed.
    match consume_with(store, "bob", budget, NOW_MS + 20_000).await {
        ConsumeOutcome::Consumed(got) => assert_eq!(got.key_package, package("b")),
        other => panic!("refilled one request, got {other:?}"),
    }
}

/// Each target has its own budget, whoever asks.
async fn budgets_are_per_target(store: &dyn KeyPackageStore) {
    let budget = Budget::per_minute(2);
    put(store, "alice", &upload(&[], Some("alr"), None)).await;
    put(store, "bob", &upload(&[], Some("blr"), None)).await;
    for _ in 0..2 {
        assert!(!is_rate_limited(
            &consume_with(store, "alice", budget, NOW_MS).await
        ));
    }
    assert!(is_rate_limited(
        &consume_with(store, "alice", budget, NOW_MS).await
    ));
    for _ in 0..2 {
        take_last_resort_with(store, "bob", budget, NOW_MS, "blr").await;
    }
    assert!(is_rate_limited(
        &consume_with(store, "bob", budget, NOW_MS).await
    ));
}

/// A burst spent at a time an hour ahead (a host whose clock ran ahead) leaves a stored tat
/// far ahead of now; the next claim at the true time cuts it back to now + window, so the target
/// waits one refill interval, not an hour.
async fn a_budget_spent_by_a_clock_that_ran_ahead_locks_the_target_one_interval_at_most(
    store: &dyn KeyPackageStore,
) {
    let budget = Budget::per_minute(10);
    put(store, "bob", &upload(&[], Some("lr"), None)).await;
    let ahead = NOW_MS + 3_600_000;
    for _ in 0..10 {
        take_last_resort_with(store, "bob", budget, ahead, "lr").await;
    }
    assert_eq!(
        consume_with(store, "bob", budget, NOW_MS).await,
        ConsumeOutcome::RateLimited {
            retry_after: Duration::from_millis(6_000),
            scope: crate::rate_limit::Scope::Target,
        }
    );
    take_last_resort_with(store, "bob", budget, NOW_MS + 6_000, "lr").await;
    assert!(is_rate_limited(
        &consume_with(store, "bob", budget, NOW_MS + 6_000).await
    ));
}

/// Pruning drops only budgets that have fully refilled; a partly spent budget survives and
/// keeps limiting.
async fn prune_budgets_removes_only_refilled_state(store: &dyn KeyPackageStore) {
    let budget = Budget::per_minute(10);
    for _ in 0..10 {
        assert!(!is_rate_limited(
            &consume_with(store, "alice", budget, NOW_MS).await
        ));
    }
    assert!(!is_rate_limited(
        &consume_with(store, "bob", budget, NOW_MS).await
    ));

    assert_eq!(prune(store, NOW_MS).await, 0, "nothing refilled yet");
    // Bob's single request has refilled after one interval; alice's burst has not.
    assert_eq!(prune(store, NOW_MS + 6_000).await, 1);
    assert!(!is_rate_limited(
        &consume_with(store, "alice", budget, NOW_MS + 6_000).await
    ));
    assert!(
        is_rate_limited(&consume_with(store, "alice", budget, NOW_MS + 6_000).await),
        "alice's state survived the prune"
    );
    for _ in 0..10 {
        assert!(!is_rate_limited(
            &consume_with(store, "bob", budget, NOW_MS + 6_000).await
        ));
    }
    assert_eq!(prune(store, NOW_MS + 66_000).await, 2);
    assert_eq!(prune(store, NOW_MS + 66_000).await, 0);
}

// ---- v1.1: facts, expiry and suites -------------------------------------------------------

/// A readable package of `suite` whose lifetime ends at `not_after`, told apart by `tag`.
fn readable(tag: &str, suite: u16, not_after: u64) -> Bytes {
    let sig = Sha256Tag::of(tag);
    crate::mls_codec::sample_key_package_of_suite(suite, tag.as_bytes(), &sig.0, 0, not_after)
        .into()
}

/// A signature key per tag, so that fingerprints differ between packages.
struct Sha256Tag([u8; 32]);

impl Sha256Tag {
    fn of(tag: &str) -> Self {
        use sha2::Digest;
        Self(sha2::Sha256::digest(tag.as_bytes()).into())
    }
}

/// An upload of these entries (`true`: last-resort), validated at [`NOW_UNIX`].
fn upload_at_now(entries: Vec<(Bytes, bool)>) -> Upload {
    Upload::parse(entries, "", NOW_UNIX as u64, UploadPolicy::default()).expect("valid upload")
}

/// [`NOW_UNIX`] plus `secs`, as a lifetime.
fn later(secs: u64) -> u64 {
    NOW_UNIX as u64 + secs
}

async fn status_at(store: &dyn KeyPackageStore, who: &str, now_unix: i64) -> Status {
    store.status(&user(who), now_unix).await.expect("status")
}

/// Consumes for `who` at `now_unix` (seconds), accepting `suites` (empty: any).
async fn claim(
    store: &dyn KeyPackageStore,
    who: &str,
    suites: &[u16],
    now_unix: i64,
) -> super::Consumption {
    let target = user(who);
    store
        .consume(&Claim {
            suites,
            now_us: Some(now_unix * 1_000_000),
            ..Claim::new(&target, PLENTY)
        })
        .await
        .expect("consume")
}

/// The bytes of a handed-out package; panics on any other outcome.
fn bytes_of(outcome: ConsumeOutcome) -> Bytes {
    match outcome {
        ConsumeOutcome::Consumed(c) => c.key_package,
        other => panic!("expected a package, got {other:?}"),
    }
}

/// An expired regular package is skipped and removed by the next consumption; the one after it
/// is handed out. Until then no status counts it.
async fn expired_regular_packages_are_skipped_and_removed_by_the_next_consume(
    store: &dyn KeyPackageStore,
) {
    let short = readable("short", 1, later(10));
    let long = readable("long", 1, later(1_000));
    put(
        store,
        "bob",
        &upload_at_now(vec![(short.clone(), false), (long.clone(), false)]),
    )
    .await;
    assert_eq!(status_at(store, "bob", NOW_UNIX + 9).await.regular_count, 2);
    // not_after is the last second of the lifetime that no longer counts: expired at equality.
    assert_eq!(
        status_at(store, "bob", NOW_UNIX + 10).await.regular_count,
        1
    );

    let got = claim(store, "bob", &[], NOW_UNIX + 10).await;
    assert_eq!(got.expired_removed, 1, "the expired package was removed");
    assert_eq!(bytes_of(got.outcome), long);
    let after = claim(store, "bob", &[], NOW_UNIX + 10).await;
    assert_eq!(
        (after.outcome, after.expired_removed),
        (ConsumeOutcome::Empty, 0)
    );
}

/// However the lifetimes of a user's packages interleave with upload order and hand-outs, the
/// first claim after a package's `not_after` removes it (a backend may keep a floor of the
/// lifetimes to skip the sweep; uploads must lower it and the sweep must make it exact).
async fn each_package_is_removed_by_the_first_claim_after_it_expires(store: &dyn KeyPackageStore) {
    let [a, b, c, d, e] = [10, 1_000, 20, 30, 40].map(|secs| readable("x", 1, later(secs)));
    put(store, "bob", &upload_at_now(vec![(b.clone(), false)])).await;
    put(
        store,
        "bob",
        &upload_at_now(vec![(a, false), (c, false), (d.clone(), false)]),
    )
    .await;
    let outcome = |c: super::Consumption| (c.expired_removed, bytes_of(c.outcome));
    // a expired (the second upload lowered what the first had set); b is the oldest left.
    assert_eq!(
        outcome(claim(store, "bob", &[], NOW_UNIX + 15).await),
        (1, b)
    );
    // c expired, then d is served.
    assert_eq!(
        outcome(claim(store, "bob", &[], NOW_UNIX + 25).await),
        (1, d)
    );
    put(store, "bob", &upload_at_now(vec![(e, false)])).await;
    let last = claim(store, "bob", &[], NOW_UNIX + 50).await;
    assert_eq!(
        (last.outcome, last.expired_removed),
        (ConsumeOutcome::Empty, 1)
    );
}

/// An expired last-resort package is never handed out nor counted, and the target reads as
/// holding nothing.
async fn an_expired_last_resort_package_is_not_handed_out(store: &dyn KeyPackageStore) {
    let lr = readable("lr", 1, later(10));
    put(store, "bob", &upload_at_now(vec![(lr.clone(), true)])).await;
    let before = status_at(store, "bob", NOW_UNIX + 9).await;
    assert!(before.has_last_resort);
    assert_eq!(before.last_resort_not_after, later(10));
    assert_eq!(
        bytes_of(claim(store, "bob", &[], NOW_UNIX + 9).await.outcome),
        lr
    );

    assert_eq!(
        claim(store, "bob", &[], NOW_UNIX + 10).await.outcome,
        ConsumeOutcome::Empty
    );
    let after = status_at(store, "bob", NOW_UNIX + 10).await;
    assert!(!after.has_last_resort);
    assert_eq!(
        (
            after.last_resort_not_after,
            after.inventory_digest.len(),
            after.last_resort_handouts
        ),
        (0, 0, 1),
        "nothing servable, and the refused hand-out was not counted"
    );
}

/// Expired packages are removed by their owner's next upload, and do not count toward the cap:
/// they go before any servable package is trimmed.
async fn expired_packages_go_before_the_cap_trims_servable_ones(store: &dyn KeyPackageStore) {
    let long: Vec<Bytes> = (0..5)
        .map(|i| readable(&format!("long{i}"), 1, later(1_000)))
        .collect();
    let short: Vec<Bytes> = (0..5)
        .map(|i| readable(&format!("short{i}"), 1, later(10)))
        .collect();
    let held = long
        .iter()
        .chain(&short)
        .map(|b| (b.clone(), false))
        .collect();
    put(store, "bob", &upload_at_now(held)).await;
    assert_eq!(status(store, "bob").await.regular_count, 10);

    let fresh: Vec<Bytes> = (0..3)
        .map(|i| readable(&format!("new{i}"), 1, later(2_000)))
        .collect();
    let entries: Vec<_> = fresh.iter().map(|b| (b.clone(), false)).collect();
    let upload = Upload::parse(entries, "", later(20), UploadPolicy::default()).expect("valid");
    let outcome = store
        .upload(&user("bob"), &upload, NOW_UNIX + 20)
        .await
        .expect("upload");
    assert_eq!(outcome.expired_removed, 5);
    assert_eq!(
        outcome.status.regular_count, 8,
        "the five long-lived packages survive beside the three new ones"
    );
    for expected in long.iter().chain(&fresh) {
        assert_eq!(
            &bytes_of(claim(store, "bob", &[], NOW_UNIX + 20).await.outcome),
            expected
        );
    }
}

/// With suites asked for, only readable packages of those suites qualify, oldest first; without,
/// every servable package does, opaque ones included.
async fn a_suite_filter_serves_the_oldest_package_of_the_requested_suites(
    store: &dyn KeyPackageStore,
) {
    let a1 = readable("a1", 1, later(1_000));
    let b3 = readable("b3", 3, later(1_000));
    let opaque = package("opaque");
    let c1 = readable("c1", 1, later(1_000));
    let d2 = readable("d2", 2, later(1_000));
    let entries = [&a1, &b3, &opaque, &c1, &d2]
        .map(|b| (b.clone(), false))
        .to_vec();
    put(store, "bob", &upload_at_now(entries)).await;

    assert_eq!(
        bytes_of(claim(store, "bob", &[3], NOW_UNIX).await.outcome),
        b3
    );
    assert_eq!(
        bytes_of(claim(store, "bob", &[2, 3], NOW_UNIX).await.outcome),
        d2
    );
    assert_eq!(
        bytes_of(claim(store, "bob", &[1, 7], NOW_UNIX).await.outcome),
        a1
    );
    assert_eq!(
        bytes_of(claim(store, "bob", &[], NOW_UNIX).await.outcome),
        opaque
    );
    assert_eq!(
        bytes_of(claim(store, "bob", &[], NOW_UNIX).await.outcome),
        c1
    );
}

/// Nothing of the requested suites: `Incompatible` while anything servable is held (an opaque
/// package too), `Empty` once nothing is; both are charged to the budget.
async fn no_package_of_the_requested_suites_is_incompatible_and_charged(
    store: &dyn KeyPackageStore,
) {
    let one = Budget::per_minute(1);
    let target = user("bob");
    let ask = |suites: &'static [u16], now_s: i64| {
        let target = &target;
        async move {
            store
                .consume(&Claim {
                    suites,
                    now_us: Some(now_s * 1_000_000),
                    ..Claim::new(target, one)
                })
                .await
                .expect("consume")
                .outcome
        }
    };
    put(
        store,
        "bob",
        &upload_at_now(vec![(package("opaque"), false)]),
    )
    .await;
    assert_eq!(ask(&[1], NOW_UNIX).await, ConsumeOutcome::Incompatible);
    assert!(
        is_rate_limited(&ask(&[], NOW_UNIX).await),
        "the refusal was charged"
    );

    store.delete_all(&target).await.expect("delete");
    assert_eq!(ask(&[1], NOW_UNIX + 60).await, ConsumeOutcome::Empty);
    assert!(
        is_rate_limited(&ask(&[], NOW_UNIX + 60).await),
        "the 404 was charged"
    );

    // An expired package is nothing servable either.
    let lr = readable("lr", 1, later(150));
    put(store, "bob", &upload_at_now(vec![(lr, true)])).await;
    assert_eq!(
        ask(&[2], NOW_UNIX + 120).await,
        ConsumeOutcome::Incompatible
    );
    assert_eq!(ask(&[2], NOW_UNIX + 180).await, ConsumeOutcome::Empty);
}

/// The last-resort package qualifies for a suite filter only by its own suite.
async fn the_last_resort_package_qualifies_only_for_its_suite(store: &dyn KeyPackageStore) {
    let lr = readable("lr", 2, later(1_000));
    put(
        store,
        "bob",
        &upload_at_now(vec![
            (lr.clone(), true),
            (readable("r", 1, later(1_000)), false),
        ]),
    )
    .await;
    match claim(store, "bob", &[2], NOW_UNIX).await.outcome {
        ConsumeOutcome::Consumed(c) => {
            assert!(c.is_last_resort, "no regular package is of suite 2");
            assert_eq!(
                (c.key_package, c.facts.map(|f| f.cipher_suite)),
                (lr.clone(), Some(2))
            );
        }
        other => panic!("expected the last-resort package, got {other:?}"),
    }
    take_regular_facts(store, "bob", &[1]).await;
    assert_eq!(
        claim(store, "bob", &[1], NOW_UNIX).await.outcome,
        ConsumeOutcome::Incompatible
    );
    assert_eq!(
        bytes_of(claim(store, "bob", &[2], NOW_UNIX).await.outcome),
        lr
    );
}

/// Takes one package per listed suite, checking each hands out a package of that suite.
async fn take_regular_facts(store: &dyn KeyPackageStore, who: &str, suites: &[u16]) {
    for &suite in suites {
        match claim(store, who, &[suite], NOW_UNIX).await.outcome {
            ConsumeOutcome::Consumed(c) => {
                assert!(!c.is_last_resort);
                assert_eq!(c.facts.map(|f| f.cipher_suite), Some(suite));
            }
            other => panic!("expected a package of suite {suite}, got {other:?}"),
        }
    }
}

/// A handed-out package carries the facts read at upload: suite, `not_after` and the
/// KeyPackageRef; an opaque one carries none.
async fn a_handed_out_package_carries_its_facts(store: &dyn KeyPackageStore) {
    let bytes = readable("kp", 1, later(1_000));
    let facts = crate::mls_codec::read(&bytes).expect("readable");
    put(
        store,
        "bob",
        &upload_at_now(vec![(bytes.clone(), false), (package("o"), false)]),
    )
    .await;
    match claim(store, "bob", &[], NOW_UNIX).await.outcome {
        ConsumeOutcome::Consumed(c) => {
            let stored = c.facts.expect("facts of a readable package");
            assert_eq!(stored.cipher_suite, 1);
            assert_eq!(stored.not_after, later(1_000));
            assert_eq!(Some(stored.key_package_ref.to_vec()), facts.key_package_ref);
            assert_eq!(stored.key_package_ref.len(), 32, "SHA-256 for suite 1");
        }
        other => panic!("expected the readable package, got {other:?}"),
    }
    match claim(store, "bob", &[], NOW_UNIX).await.outcome {
        ConsumeOutcome::Consumed(c) => assert_eq!(c.facts, None),
        other => panic!("expected the opaque package, got {other:?}"),
    }
}

/// Lifetimes compare as u64 over their whole range: past i64::MAX nothing wraps to "expired".
async fn lifetimes_beyond_i64_compare_as_u64(store: &dyn KeyPackageStore) {
    let max = readable("max", 1, u64::MAX);
    let top = readable("top", 1, (1 << 63) + 1);
    let entries = vec![(max.clone(), false), (top.clone(), false)];
    put(store, "bob", &upload_at_now(entries)).await;
    let held = status_at(store, "bob", i64::MAX).await;
    assert_eq!(
        held.regular_count, 2,
        "neither has expired, even at i64::MAX"
    );
    assert_eq!(held.next_expiry, (1 << 63) + 1);
    assert_eq!(
        bytes_of(claim(store, "bob", &[], NOW_UNIX).await.outcome),
        max
    );
}

/// The status counts servable packages per suite (opaque under 0, ascending), the earliest
/// expiry, the last-resort lifetime and the inventory digest, exactly as the contract defines
/// them.
async fn the_status_describes_the_servable_inventory(store: &dyn KeyPackageStore) {
    use sha2::{Digest, Sha256};
    let p3 = readable("p3", 3, later(500));
    let p1 = readable("p1", 1, later(300));
    let opaque = package("o");
    let gone = readable("gone", 1, later(5));
    let lr = readable("lr", 2, later(900));
    let entries = vec![
        (p3.clone(), false),
        (gone.clone(), false),
        (p1.clone(), false),
        (opaque.clone(), false),
        (lr.clone(), true),
    ];
    put(store, "bob", &upload_at_now(entries)).await;

    let got = status_at(store, "bob", NOW_UNIX + 5).await;
    let digest = |parts: &[&Bytes]| {
        let mut outer = Sha256::new();
        for part in parts {
            outer.update(Sha256::digest(part));
        }
        outer.finalize().to_vec()
    };
    assert_eq!(got.regular_count, 3);
    assert!(got.has_last_resort);
    assert_eq!(got.cipher_suites, vec![(0, 1), (1, 1), (3, 1)]);
    assert_eq!(got.next_expiry, later(300));
    assert_eq!(got.last_resort_not_after, later(900));
    assert_eq!(got.inventory_digest, digest(&[&p3, &p1, &opaque, &lr]));

    // Before `gone` expired it was part of all of it.
    let earlier = status_at(store, "bob", NOW_UNIX).await;
    assert_eq!(earlier.cipher_suites, vec![(0, 1), (1, 2), (3, 1)]);
    assert_eq!(earlier.next_expiry, later(5));
    assert_eq!(
        earlier.inventory_digest,
        digest(&[&p3, &gone, &p1, &opaque, &lr])
    );

    // Only opaque packages: no expiry to report.
    store.delete_all(&user("bob")).await.expect("delete");
    put(store, "bob", &upload_at_now(vec![(opaque.clone(), false)])).await;
    let opaque_only = status(store, "bob").await;
    assert_eq!(
        (opaque_only.next_expiry, opaque_only.last_resort_not_after),
        (0, 0)
    );
    assert_eq!(opaque_only.inventory_digest, digest(&[&opaque]));
    store.delete_all(&user("bob")).await.expect("delete");
    assert!(status(store, "bob").await.inventory_digest.is_empty());
}

// ---- v1.1: fair and idempotent claims ----------------------------------------------------

/// A claim by `caller` for `target` at `now_s` (seconds) with these stage budgets and key.
async fn claim_by(
    store: &dyn KeyPackageStore,
    caller: &str,
    target: &str,
    budgets: crate::rate_limit::ClaimBudgets,
    key: Option<&str>,
    now_s: i64,
) -> ConsumeOutcome {
    let (caller, target) = (user(caller), user(target));
    let key = key.map(|k| crate::key_package::IdempotencyKey::parse(k.as_bytes()).expect("key"));
    store
        .consume(&Claim {
            caller: Some(super::Caller {
                id: &caller,
                budget: budgets.caller,
                pair_budget: budgets.pair,
                idempotency: key.as_ref().map(|k| (k, Duration::from_secs(60))),
            }),
            now_us: Some(now_s * 1_000_000),
            ..Claim::new(&target, budgets.target)
        })
        .await
        .expect("consume")
        .outcome
}

fn refused_by(outcome: &ConsumeOutcome) -> Option<crate::rate_limit::Scope> {
    match outcome {
        ConsumeOutcome::RateLimited { scope, .. } => Some(*scope),
        _ => None,
    }
}

/// The caller's budget, then the pair's, then the target's: the first that refuses answers,
/// and a refused claim is charged at no stage, after it or before it.
async fn claim_stages_are_judged_in_order_and_a_refusal_charges_no_stage(
    store: &dyn KeyPackageStore,
) {
    use crate::rate_limit::{ClaimBudgets, Scope};
    let budgets = ClaimBudgets::per_minute(3, 1, 2);
    for who in ["bob", "erin"] {
        let tags = tags(who, 0..5);
        put(store, who, &upload(&strs(&tags), None, None)).await;
    }
    let at = NOW_UNIX;
    let first = claim_by(store, "alice", "bob", budgets, None, at).await;
    assert!(matches!(first, ConsumeOutcome::Consumed(_)), "{first:?}");
    let again = claim_by(store, "alice", "bob", budgets, None, at).await;
    assert_eq!(refused_by(&again), Some(Scope::Pair));
    // The pair refusal did not charge bob's budget: carol still gets the second of two.
    let carol = claim_by(store, "carol", "bob", budgets, None, at).await;
    assert!(matches!(carol, ConsumeOutcome::Consumed(_)), "{carol:?}");
    let dave = claim_by(store, "dave", "bob", budgets, None, at).await;
    assert_eq!(refused_by(&dave), Some(Scope::Target));
    // Nor alice's own budget: bob, erin and an empty frank make her three.
    let erin = claim_by(store, "alice", "erin", budgets, None, at).await;
    assert!(matches!(erin, ConsumeOutcome::Consumed(_)), "{erin:?}");
    let frank = claim_by(store, "alice", "frank", budgets, None, at).await;
    assert_eq!(frank, ConsumeOutcome::Empty);
    let gina = claim_by(store, "alice", "gina", budgets, None, at).await;
    assert_eq!(refused_by(&gina), Some(Scope::Caller));
    assert_eq!(
        gina,
        ConsumeOutcome::RateLimited {
            retry_after: Duration::from_secs(20),
            scope: Scope::Caller
        },
        "one of three per minute refills every 20 s"
    );
    assert_eq!(
        status(store, "bob").await.regular_count,
        3,
        "two handed out"
    );
}

/// Stages that are off charge and refuse nothing: only the target's budget counts.
async fn claim_stages_that_are_off_refuse_nothing(store: &dyn KeyPackageStore) {
    use crate::rate_limit::{ClaimBudgets, Scope};
    let budgets = ClaimBudgets::per_minute(0, 0, 4);
    for i in 0..4 {
        let got = claim_by(store, "alice", "bob", budgets, None, NOW_UNIX).await;
        assert_eq!(got, ConsumeOutcome::Empty, "claim {i}");
    }
    let fifth = claim_by(store, "alice", "bob", budgets, None, NOW_UNIX).await;
    assert_eq!(refused_by(&fifth), Some(Scope::Target));
}

/// A claim with a key that handed out a package replays it for the same caller and target:
/// the same package and facts, nothing consumed, no budget charged, the last-resort hand-out
/// not counted again.
async fn a_keyed_claim_replays_its_package_and_charges_nothing(store: &dyn KeyPackageStore) {
    use crate::rate_limit::ClaimBudgets;
    let budgets = ClaimBudgets::per_minute(600, 3, 2);
    let lr = readable("lr", 1, later(1_000));
    put(
        store,
        "bob",
        &upload_at_now(vec![(readable("a", 1, later(1_000)), false), (lr, true)]),
    )
    .await;
    let first = claim_by(store, "alice", "bob", budgets, Some("k1"), NOW_UNIX).await;
    let ConsumeOutcome::Consumed(package) = first else {
        panic!("expected a package, got {first:?}");
    };
    for _ in 0..5 {
        assert_eq!(
            claim_by(store, "alice", "bob", budgets, Some("k1"), NOW_UNIX).await,
            ConsumeOutcome::Replayed(package.clone())
        );
    }
    // Neither the pair's budget (3) nor the target's (2) was charged by the replays.
    let lr_claim = claim_by(store, "alice", "bob", budgets, Some("k2"), NOW_UNIX).await;
    let ConsumeOutcome::Consumed(lr_package) = lr_claim else {
        panic!("expected the last-resort package, got {lr_claim:?}");
    };
    assert!(lr_package.is_last_resort);
    assert_eq!(status(store, "bob").await.last_resort_handouts, 1);
    assert_eq!(
        claim_by(store, "alice", "bob", budgets, Some("k2"), NOW_UNIX).await,
        ConsumeOutcome::Replayed(lr_package)
    );
    let after = status(store, "bob").await;
    assert_eq!((after.regular_count, after.last_resort_handouts), (0, 1));
    let spent = claim_by(store, "carol", "bob", budgets, None, NOW_UNIX).await;
    assert_eq!(
        refused_by(&spent),
        Some(crate::rate_limit::Scope::Target),
        "two claims charged the target, the replays none"
    );
}

/// A key belongs to its caller and its first target: another target is `KeyReused` (charging
/// nothing), another caller's same key is a claim of its own.
async fn a_key_belongs_to_its_caller_and_its_first_target(store: &dyn KeyPackageStore) {
    use crate::rate_limit::ClaimBudgets;
    let budgets = ClaimBudgets::per_minute(2, 3, 10);
    put(store, "bob", &upload(&["b1", "b2"], None, None)).await;
    put(store, "erin", &upload(&["e1"], None, None)).await;
    let got = claim_by(store, "alice", "bob", budgets, Some("same"), NOW_UNIX).await;
    assert!(matches!(got, ConsumeOutcome::Consumed(_)));
    for _ in 0..3 {
        assert_eq!(
            claim_by(store, "alice", "erin", budgets, Some("same"), NOW_UNIX).await,
            ConsumeOutcome::KeyReused
        );
    }
    // Not charged: alice's budget of two still has one left.
    let erin = claim_by(store, "alice", "erin", budgets, None, NOW_UNIX).await;
    assert_eq!(bytes_of(erin), package("e1"));
    let carol = claim_by(store, "carol", "bob", budgets, Some("same"), NOW_UNIX).await;
    assert_eq!(bytes_of(carol), package("b2"), "carol's key is her own");
}

/// Only hand-outs are remembered: a 404 or a refusal with a key leaves the key free, and a
/// remembered key is free again once its time to live has passed (then pruned).
async fn only_hand_outs_are_remembered_and_only_for_their_time_to_live(
    store: &dyn KeyPackageStore,
) {
    use crate::rate_limit::{ClaimBudgets, Scope};
    let budgets = ClaimBudgets::per_minute(600, 1, 10);
    let empty = claim_by(store, "alice", "bob", budgets, Some("k"), NOW_UNIX).await;
    assert_eq!(empty, ConsumeOutcome::Empty);
    put(store, "bob", &upload(&["b1", "b2", "b3"], None, None)).await;
    let refused = claim_by(store, "alice", "bob", budgets, Some("k"), NOW_UNIX).await;
    assert_eq!(
        refused_by(&refused),
        Some(Scope::Pair),
        "the 404 took the pair's one"
    );
    let later = NOW_UNIX + 60;
    let first = claim_by(store, "alice", "bob", budgets, Some("k"), later).await;
    assert_eq!(
        bytes_of(first),
        package("b1"),
        "neither the 404 nor the 429 was replayed"
    );
    assert!(matches!(
        claim_by(store, "alice", "bob", budgets, Some("k"), later + 59).await,
        ConsumeOutcome::Replayed(_)
    ));
    assert_eq!(
        store
            .prune_replays(Some((later + 59) * 1_000_000), 100)
            .await
            .unwrap(),
        0,
        "not expired yet"
    );
    let expired = claim_by(store, "alice", "bob", budgets, Some("k"), later + 60).await;
    assert_eq!(
        bytes_of(expired),
        package("b2"),
        "the key is free after its 60 s"
    );
    put(store, "bob", &upload(&["b4"], None, None)).await;
    let other = claim_by(store, "alice", "bob", budgets, Some("k2"), later + 120).await;
    assert!(matches!(other, ConsumeOutcome::Consumed(_)));
    assert_eq!(
        store
            .prune_replays(Some((later + 180) * 1_000_000), 100)
            .await
            .unwrap(),
        2
    );
    assert_eq!(
        store
            .prune_replays(Some((later + 180) * 1_000_000), 100)
            .await
            .unwrap(),
        0
    );
}
