//! The store on its own: every conformance case, then concurrency, each on a fresh database of
//! the backend this run targets (SQLite, or Postgres when `TEST_DATABASE_URL` is set).

use std::{collections::HashSet, sync::Arc, time::Duration};

use bytes::Bytes;
use keypackage_server::{
    key_package::{Upload, UploadPolicy, UserId, MAX_REGULAR_PACKAGES},
    rate_limit::Budget,
    store::{self, ConsumeOutcome, KeyPackageStore, StoreError},
};
use tokio::sync::Barrier;

use crate::harness::{connect_options, consume_at, kp, TestDb};

/// Every conformance case on a fresh SQLite file, whatever backend the run targets.
mod sqlite {
    use super::{Arc, KeyPackageStore, TestDb};

    keypackage_server::conformance_tests!(fresh_store);

    async fn fresh_store() -> Option<(TestDb, Arc<dyn KeyPackageStore>)> {
        let db = TestDb::sqlite();
        let store = db.store().await;
        Some((db, store))
    }
}

/// Every conformance case on a fresh Postgres database, when `TEST_DATABASE_URL` names one.
mod postgres {
    use super::{Arc, KeyPackageStore, TestDb};

    keypackage_server::conformance_tests!(fresh_store);

    async fn fresh_store() -> Option<(TestDb, Arc<dyn KeyPackageStore>)> {
        let db = postgres_only!()?;
        let store = db.store().await;
        Some((db, store))
    }
}

/// A budget these tests never exhaust.
const PLENTY: Budget = Budget {
    burst: 1_000_000,
    interval: Duration::from_millis(1),
};

const NOW_US: i64 = 1_700_000_000_000_000;

fn user(name: &str) -> UserId {
    UserId::parse(name).expect("valid user id")
}

fn upload_of(regular: &[String], last_resort: Option<&str>) -> Upload {
    let entries = regular
        .iter()
        .map(|tag| (Bytes::from(kp(tag)), false))
        .chain(last_resort.map(|tag| (Bytes::from(kp(tag)), true)));
    Upload::parse(entries, "", 0, UploadPolicy::default()).expect("valid upload")
}

/// Runs `consumers` consumptions of `target` at once, spread over `stores`, and returns what
/// each one got; any error fails the test.
async fn consume_concurrently(
    stores: &[Arc<dyn KeyPackageStore>],
    target: &str,
    consumers: usize,
) -> Vec<ConsumeOutcome> {
    let start = Arc::new(Barrier::new(consumers));
    let tasks: Vec<_> = (0..consumers)
        .map(|i| {
            let store = stores[i % stores.len()].clone();
            let (start, target) = (start.clone(), user(target));
            tokio::spawn(async move {
                start.wait().await;
                consume_at(&*store, &target, PLENTY, Some(NOW_US)).await
            })
        })
        .collect();
    let mut outcomes = Vec::with_capacity(consumers);
    for task in tasks {
        outcomes.push(task.await.expect("task").expect("consume must not fail"));
    }
    outcomes
}

/// Splits hand-outs into regular package bytes and the number of last-resort hand-outs,
/// checking the last-resort ones are `last_resort`.
fn split(outcomes: Vec<ConsumeOutcome>, last_resort: &str) -> (Vec<Vec<u8>>, usize) {
    let mut regular = Vec::new();
    let mut last_resort_count = 0;
    for outcome in outcomes {
        match outcome {
            ConsumeOutcome::Consumed(got) if got.is_last_resort => {
                assert_eq!(got.key_package.as_ref(), kp(last_resort).as_slice());
                last_resort_count += 1;
            }
            ConsumeOutcome::Consumed(got) => regular.push(got.key_package.to_vec()),
            other => panic!("expected a package, got {other:?}"),
        }
    }
    (regular, last_resort_count)
}

fn tags(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_consumptions_hand_out_each_regular_package_exactly_once() {
    let db = TestDb::new().await;
    let store = db.store().await;
    let packages = tags("p", 10);
    store
        .upload(&user("bob"), &upload_of(&packages, Some("lr")), 0)
        .await
        .expect("upload");

    let outcomes = consume_concurrently(std::slice::from_ref(&store), "bob", 50).await;
    let (mut regular, last_resort) = split(outcomes, "lr");

    regular.sort();
    let mut expected: Vec<Vec<u8>> = packages.iter().map(|t| kp(t)).collect();
    expected.sort();
    assert_eq!(regular, expected, "each regular package exactly once");
    assert_eq!(last_resort, 40);
    let status = store
        .status(&user("bob"), keypackage_server::clock::unix_seconds())
        .await
        .expect("status");
    assert_eq!((status.regular_count, status.last_resort_handouts), (0, 40));
    assert!(status.has_last_resort);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_uploads_by_one_user_keep_at_most_ten_whole_uploads_in_order() {
    const UPLOADS: usize = 20;
    const ENTRIES: usize = 5;
    let db = TestDb::new().await;
    let store = db.store().await;
    let start = Arc::new(Barrier::new(UPLOADS));
    let tasks: Vec<_> = (0..UPLOADS)
        .map(|i| {
            let (store, start) = (store.clone(), start.clone());
            // Every upload also carries one entry all of them share, so concurrent uploads
            // race on the duplicate check too.
            let mut entries = vec!["shared".to_owned()];
            entries.extend((0..ENTRIES).map(|j| format!("u{i:02}-{j}")));
            tokio::spawn(async move {
                start.wait().await;
                store
                    .upload(&user("bob"), &upload_of(&entries, None), 0)
                    .await
            })
        })
        .collect();
    for task in tasks {
        let outcome = task.await.expect("task").expect("upload must not fail");
        assert!(outcome.status.regular_count as usize <= MAX_REGULAR_PACKAGES);
    }
    assert_eq!(
        store
            .status(&user("bob"), keypackage_server::clock::unix_seconds())
            .await
            .expect("status")
            .regular_count as usize,
        MAX_REGULAR_PACKAGES
    );

    let mut held = Vec::new();
    loop {
        match consume_at(&*store, &user("bob"), PLENTY, Some(NOW_US))
            .await
            .expect("consume")
        {
            ConsumeOutcome::Consumed(got) => {
                held.push(String::from_utf8(got.key_package[4..].to_vec()).expect("tag"))
            }
            ConsumeOutcome::Empty => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(held.len(), MAX_REGULAR_PACKAGES);
    assert_eq!(
        held.iter().collect::<HashSet<_>>().len(),
        held.len(),
        "no package twice"
    );
    // Uploads applied one after another: each upload's entries come out together and in
    // request order (the shared entry aside, which only the first upload to see it stores).
    let mut seen_uploads = Vec::new();
    let mut previous: Option<(&str, usize)> = None;
    for tag in held.iter().filter(|t| *t != "shared") {
        let (upload, entry) = tag.split_once('-').expect("a tag from one of the uploads");
        let entry: usize = entry.parse().expect("entry index");
        assert!(
            upload.starts_with('u') && entry < ENTRIES,
            "unknown package {tag}"
        );
        match previous {
            Some((last, last_entry)) if last == upload => {
                assert_eq!(
                    entry,
                    last_entry + 1,
                    "entries of {upload} out of order: {held:?}"
                );
            }
            _ => {
                assert!(
                    !seen_uploads.contains(&upload),
                    "{upload} interleaved: {held:?}"
                );
                // Only the oldest upload still held may have lost its first entries to the cap.
                assert!(
                    seen_uploads.is_empty() || entry == 0,
                    "{upload} partly stored: {held:?}"
                );
                seen_uploads.push(upload);
            }
        }
        previous = Some((upload, entry));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_store_instances_on_one_database_never_hand_out_a_package_twice() {
    let db = TestDb::new().await;
    // Two stores with their own connection pools: two server processes, as far as the
    // database can tell.
    let stores = [db.store().await, db.store().await];
    let mut handed_out = HashSet::new();
    for round in 0..5 {
        let packages = tags(&format!("r{round}-"), 10);
        stores[round % 2]
            .upload(&user("bob"), &upload_of(&packages, Some("lr")), 0)
            .await
            .expect("upload");
        let outcomes = consume_concurrently(&stores, "bob", 20).await;
        let (regular, last_resort) = split(outcomes, "lr");
        for package in &regular {
            assert!(handed_out.insert(package.clone()), "handed out twice");
        }
        let mut regular = regular;
        regular.sort();
        let mut expected: Vec<Vec<u8>> = packages.iter().map(|t| kp(t)).collect();
        expected.sort();
        assert_eq!(
            regular, expected,
            "round {round}: each package exactly once"
        );
        assert_eq!(last_resort, 10);
    }
}

#[tokio::test]
async fn a_write_blocked_past_the_statement_timeout_fails_as_unavailable_then_recovers() {
    use sqlx::Connection;

    let db = TestDb::new().await;
    let mut options = connect_options(&db.url);
    options.statement_timeout = Duration::from_millis(300);
    let store = store::connect(&options).await.expect("open store");
    let bob = user("bob");
    store
        .upload(&bob, &upload_of(&tags("a", 1), None), 0)
        .await
        .expect("upload");

    // Another session holds the lock an upload needs, and keeps it past the timeout.
    let blocked = if db.is_postgres() {
        let mut other = sqlx::PgConnection::connect(&db.url).await.expect("connect");
        sqlx::query("BEGIN")
            .execute(&mut other)
            .await
            .expect("begin");
        sqlx::query("SELECT 1 FROM users WHERE user_id = 'bob' FOR UPDATE")
            .execute(&mut other)
            .await
            .expect("lock");
        let blocked = store.upload(&bob, &upload_of(&tags("b", 1), None), 0).await;
        sqlx::query("ROLLBACK")
            .execute(&mut other)
            .await
            .expect("rollback");
        blocked
    } else {
        let mut other = sqlx::SqliteConnection::connect(&db.url)
            .await
            .expect("connect");
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut other)
            .await
            .expect("begin");
        let blocked = store.upload(&bob, &upload_of(&tags("b", 1), None), 0).await;
        sqlx::query("ROLLBACK")
            .execute(&mut other)
            .await
            .expect("rollback");
        blocked
    };
    assert!(
        matches!(blocked, Err(StoreError::Unavailable(_))),
        "expected unavailable, got {blocked:?}"
    );

    let outcome = store
        .upload(&bob, &upload_of(&tags("b", 1), None), 0)
        .await
        .expect("the store works again once the lock is gone");
    assert_eq!(
        outcome.status.regular_count, 2,
        "the blocked upload stored nothing"
    );
}

/// Ten concurrent consumptions of a target whose budget is ten all pass, every time: the budget
/// is judged by the time each request obtained the target's lock (the database's clock on
/// Postgres), not by a time read before it waited.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_budget_lets_every_one_of_as_many_concurrent_requests_through() {
    let db = TestDb::new().await;
    let store = db.store().await;
    let budget = Budget::per_minute(10);
    for round in 0..20 {
        let target = format!("bob{round}");
        let start = Arc::new(Barrier::new(10));
        let tasks: Vec<_> = (0..10)
            .map(|_| {
                let (store, start, target) = (store.clone(), start.clone(), user(&target));
                tokio::spawn(async move {
                    start.wait().await;
                    consume_at(&*store, &target, budget, None).await
                })
            })
            .collect();
        for task in tasks {
            let outcome = task.await.expect("task").expect("consume");
            assert_eq!(
                outcome,
                ConsumeOutcome::Empty,
                "round {round}: within the budget"
            );
        }
        assert!(matches!(
            consume_at(&*store, &user(&target), budget, None)
                .await
                .unwrap(),
            ConsumeOutcome::RateLimited { .. }
        ));
    }
}

/// Pruning removes at most the batch it is given, so each statement stays short.
#[tokio::test]
async fn budget_pruning_works_in_bounded_batches() {
    let db = TestDb::new().await;
    let store = db.store().await;
    for i in 0..25 {
        consume_at(&*store, &user(&format!("t{i}")), PLENTY, Some(NOW_US))
            .await
            .unwrap();
    }
    let later = Some(NOW_US + 1_000_000);
    let batches = [
        store.prune_budgets(later, 10).await.unwrap(),
        store.prune_budgets(later, 10).await.unwrap(),
        store.prune_budgets(later, 10).await.unwrap(),
        store.prune_budgets(later, 10).await.unwrap(),
    ];
    assert_eq!(batches, [10, 10, 5, 0]);
}

/// With the database's clock, pruning keeps the budget a consumption just wrote (still live)
/// and removes one that refilled long ago.
#[tokio::test]
async fn pruning_by_the_database_clock_keeps_live_budgets() {
    let db = TestDb::new().await;
    let store = db.store().await;
    let budget = Budget::per_minute(10);
    consume_at(&*store, &user("live"), budget, None)
        .await
        .unwrap();
    let an_hour_ago = keypackage_server::clock::unix_micros() - 3_600_000_000;
    consume_at(&*store, &user("old"), budget, Some(an_hour_ago))
        .await
        .unwrap();
    assert_eq!(store.prune_budgets(None, 100).await.unwrap(), 1);
    assert_eq!(store.prune_budgets(None, 100).await.unwrap(), 0);
}

/// A session of its own on `db`, inside a transaction left open.
async fn open_transaction(db: &TestDb) -> sqlx::PgConnection {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(&db.url).await.expect("connect");
    sqlx::query("BEGIN")
        .execute(&mut conn)
        .await
        .expect("begin");
    conn
}

/// Starts a consumption of bob's that must block on a lock this test holds, and waits until
/// Postgres shows it waiting.
async fn consume_blocked_on_a_lock(
    db: &TestDb,
    store: &Arc<dyn KeyPackageStore>,
) -> tokio::task::JoinHandle<Result<ConsumeOutcome, StoreError>> {
    use sqlx::Connection;
    let consumer = {
        let store = store.clone();
        tokio::spawn(async move { consume_at(&*store, &user("bob"), PLENTY, None).await })
    };
    let mut admin = sqlx::PgConnection::connect(&db.url).await.expect("connect");
    let name = crate::pg_admin::db_name(db);
    crate::pg_admin::wait_for_lock_waiters(&mut admin, &name, 1).await;
    consumer
}

/// A package committed while a consumption waits for the target's budget lock is seen by it:
/// the pick happens after the lock, in a snapshot of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consume_that_waited_for_the_budget_lock_sees_packages_committed_meanwhile() {
    let Some(db) = postgres_only!() else { return };
    let store = db.store().await;
    store
        .upload(&user("bob"), &upload_of(&[], Some("lr")), 0)
        .await
        .unwrap();
    // Give bob a budget row, then hold its lock as a concurrent consumption would.
    consume_at(&*store, &user("bob"), PLENTY, None)
        .await
        .unwrap();
    let mut holder = open_transaction(&db).await;
    sqlx::query("SELECT 1 FROM consume_budgets WHERE scope = 0 AND subject = 'bob' FOR UPDATE")
        .execute(&mut holder)
        .await
        .unwrap();
    let consumer = consume_blocked_on_a_lock(&db, &store).await;
    store
        .upload(&user("bob"), &upload_of(&tags("new", 1), None), 0)
        .await
        .unwrap();
    sqlx::query("COMMIT").execute(&mut holder).await.unwrap();
    match consumer.await.unwrap().unwrap() {
        ConsumeOutcome::Consumed(got) => {
            assert!(!got.is_last_resort, "the last resort was handed out");
            assert_eq!(got.key_package.as_ref(), kp("new0").as_slice());
        }
        other => panic!("expected the new package, got {other:?}"),
    }
    // Only the first consumption above, which created the budget row, took the last resort.
    assert_eq!(
        store
            .status(&user("bob"), keypackage_server::clock::unix_seconds())
            .await
            .unwrap()
            .last_resort_handouts,
        1
    );
}

/// A package an upload in flight adds (it holds the user's row) is seen by a consumption that
/// would otherwise fall back to the last-resort package.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consume_waits_for_an_upload_in_flight_instead_of_handing_out_the_last_resort() {
    let Some(db) = postgres_only!() else { return };
    let store = db.store().await;
    store
        .upload(&user("bob"), &upload_of(&[], Some("lr")), 0)
        .await
        .unwrap();
    let mut upload = open_transaction(&db).await;
    sqlx::query("SELECT 1 FROM users WHERE user_id = 'bob' FOR UPDATE")
        .execute(&mut upload)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO key_packages (user_id, seq, digest, data) VALUES ('bob', 1000, sha256($1), $1)",
    )
        .bind(kp("fresh"))
        .execute(&mut upload)
        .await
        .unwrap();
    let consumer = consume_blocked_on_a_lock(&db, &store).await;
    sqlx::query("COMMIT").execute(&mut upload).await.unwrap();
    match consumer.await.unwrap().unwrap() {
        ConsumeOutcome::Consumed(got) => {
            assert!(!got.is_last_resort, "the last resort was handed out");
            assert_eq!(got.key_package.as_ref(), kp("fresh").as_slice());
        }
        other => panic!("expected the fresh package, got {other:?}"),
    }
}

/// An upload that trims the oldest packages and then rolls back leaves them the oldest: a
/// consumption meanwhile waits and then hands out the oldest, not the next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trim_that_rolls_back_does_not_break_fifo_for_a_concurrent_consume() {
    let Some(db) = postgres_only!() else { return };
    let store = db.store().await;
    store
        .upload(&user("bob"), &upload_of(&tags("p", 3), None), 0)
        .await
        .unwrap();
    let mut upload = open_transaction(&db).await;
    sqlx::query("SELECT 1 FROM users WHERE user_id = 'bob' FOR UPDATE")
        .execute(&mut upload)
        .await
        .unwrap();
    sqlx::query(
        "DELETE FROM key_packages WHERE user_id = 'bob' AND seq = \
         (SELECT min(seq) FROM key_packages WHERE user_id = 'bob')",
    )
    .execute(&mut upload)
    .await
    .unwrap();
    let consumer = consume_blocked_on_a_lock(&db, &store).await;
    sqlx::query("ROLLBACK").execute(&mut upload).await.unwrap();
    match consumer.await.unwrap().unwrap() {
        ConsumeOutcome::Consumed(got) => assert_eq!(got.key_package.as_ref(), kp("p0").as_slice()),
        other => panic!("expected the oldest package, got {other:?}"),
    }
}
