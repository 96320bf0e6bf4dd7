//! Group commit of claims and uploads on Postgres (`store::batch`): a batch hands out (or
//! stores) exactly what its claims (or uploads) would one by one, they queue only while every
//! slot of their kind is busy, and a batch the database refuses is run again one by one.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use keypackage_server::{
    key_package::{IdempotencyKey, Upload, UploadPolicy, UserId},
    rate_limit::Budget,
    store::{postgres::PgStore, Caller, Claim, ConsumeOutcome, KeyPackageStore, StoreError},
};
use rand::{rngs::StdRng, seq::SliceRandom, Rng, SeedableRng};
use sqlx::Connection;

use crate::harness::{connect_options, kp, TestDb};

const NOW_US: i64 = 1_700_000_000_000_000;

fn user(name: &str) -> UserId {
    UserId::parse(name).expect("valid user id")
}

fn upload_of(prefix: &str, n: usize, last_resort: bool) -> Upload {
    let entries = (0..n)
        .map(|i| (Bytes::from(kp(&format!("{prefix}-{i}"))), false))
        .chain(last_resort.then(|| (Bytes::from(kp(&format!("{prefix}-lr"))), true)));
    Upload::parse(entries, "", 0, UploadPolicy::default()).expect("valid upload")
}

/// `n` per minute, in bursts of `burst`.
fn per_minute(n: u32, burst: u32) -> Budget {
    Budget {
        burst,
        interval: Duration::from_secs(60) / n,
    }
}

async fn pg_store(db: &TestDb, max_connections: u32) -> PgStore {
    let mut options = connect_options(&db.url);
    options.max_connections = max_connections;
    options.statement_timeout = Duration::from_secs(2);
    PgStore::connect(&options).await.expect("open store")
}

/// The package bytes a hand-out carries, or the outcome's name.
fn summary(outcome: &ConsumeOutcome) -> String {
    match outcome {
        ConsumeOutcome::Consumed(got) | ConsumeOutcome::Replayed(got) => format!(
            "{}{} {:?}",
            if matches!(outcome, ConsumeOutcome::Replayed(_)) {
                "replayed"
            } else {
                "package"
            },
            if got.is_last_resort {
                " (last resort)"
            } else {
                ""
            },
            String::from_utf8_lossy(&got.key_package[4..])
        ),
        other => format!("{other:?}"),
    }
}

/// One claim of a round: its target, caller, key and accepted suites.
struct Planned {
    target: UserId,
    caller: Option<UserId>,
    key: Option<IdempotencyKey>,
    suites: &'static [u16],
}

/// Random rounds of claims with pairwise distinct targets and callers, every budget stage on
/// and tight, keys reused across rounds, suite filters, inventories running dry: each round runs
/// one by one on one database and as one batch on another, and every outcome, every refusal's
/// wait and the inventories left must agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_hands_out_exactly_what_its_claims_would_one_by_one() {
    let Some(one_db) = postgres_only!() else {
        return;
    };
    let Some(batch_db) = postgres_only!() else {
        return;
    };
    let one = pg_store(&one_db, 4).await;
    let batch = pg_store(&batch_db, 4).await;
    let targets: Vec<UserId> = (0..8).map(|i| user(&format!("t{i}"))).collect();
    let callers: Vec<UserId> = (0..6).map(|i| user(&format!("c{i}"))).collect();
    for (i, target) in targets.iter().enumerate().skip(1) {
        let upload = upload_of(target.as_str(), 1 + i % 4, i % 3 != 0);
        for store in [&one, &batch] {
            store.upload(target, &upload, 0).await.expect("upload");
        }
    }
    let keys: Vec<IdempotencyKey> = ["k0", "k1"]
        .iter()
        .map(|k| IdempotencyKey::parse(k.as_bytes()).expect("valid key"))
        .collect();
    let target_budget = per_minute(5, 3);
    let caller_budget = per_minute(4, 3);
    let pair_budget = per_minute(2, 2);
    let mut rng = StdRng::seed_from_u64(7);
    let mut batched_claims = 0;
    for round in 0..40_i64 {
        if round % 8 == 7 {
            // Fresh packages now and then, so hand-outs keep coming.
            for target in &targets[1..] {
                let upload = upload_of(&format!("{}-{round}", target.as_str()), 3, false);
                for store in [&one, &batch] {
                    store.upload(target, &upload, 0).await.expect("upload");
                }
            }
        }
        let mut shuffled_targets = targets.clone();
        shuffled_targets.shuffle(&mut rng);
        let mut shuffled_callers: Vec<Option<UserId>> = callers.iter().cloned().map(Some).collect();
        shuffled_callers.extend([None, None]);
        shuffled_callers.shuffle(&mut rng);
        let size = rng.gen_range(2..=targets.len());
        let plan: Vec<Planned> = shuffled_targets
            .into_iter()
            .zip(shuffled_callers)
            .take(size)
            .map(|(target, caller)| Planned {
                key: caller
                    .as_ref()
                    .filter(|_| rng.gen_bool(0.5))
                    .map(|_| keys[rng.gen_range(0..keys.len())].clone()),
                suites: [&[][..], &[][..], &[1], &[0, 1]][rng.gen_range(0..4)],
                target,
                caller,
            })
            .collect();
        let now_us = Some(NOW_US + round * 5_000_000);
        let claims: Vec<Claim<'_>> = plan
            .iter()
            .map(|p| Claim {
                target: &p.target,
                budget: target_budget,
                caller: p.caller.as_ref().map(|id| Caller {
                    id,
                    budget: Some(caller_budget),
                    pair_budget: Some(pair_budget),
                    idempotency: p.key.as_ref().map(|k| (k, Duration::from_secs(30))),
                }),
                suites: p.suites,
                now_us,
            })
            .collect();
        let mut expected = Vec::new();
        for claim in &claims {
            let got = one.consume(claim).await.expect("claim alone");
            expected.push((summary(&got.outcome), got.expired_removed));
        }
        let together = batch.consume_together(&claims).await.expect("batch");
        let got: Vec<_> = together
            .iter()
            .map(|c| (summary(&c.outcome), c.expired_removed))
            .collect();
        assert_eq!(got, expected, "round {round}");
        batched_claims += claims.len();
    }
    for target in &targets {
        let (left_one, left_batch) = (
            one.status(target, 0).await.expect("status"),
            batch.status(target, 0).await.expect("status"),
        );
        assert_eq!(
            format!("{left_batch:?}"),
            format!("{left_one:?}"),
            "{target:?}"
        );
    }
    assert!(batched_claims > 100);
}

/// The claims of `targets`, each by a caller of its own (`{callers}{i}`), spawned at once.
fn spawn_claims(
    store: &Arc<PgStore>,
    targets: &[String],
    callers: &str,
) -> Vec<tokio::task::JoinHandle<Result<ConsumeOutcome, StoreError>>> {
    targets
        .iter()
        .enumerate()
        .map(|(i, target)| {
            let (store, target, caller) =
                (store.clone(), user(target), user(&format!("{callers}{i}")));
            tokio::spawn(async move {
                let claim = Claim {
                    caller: Some(Caller {
                        id: &caller,
                        budget: Some(per_minute(600, 600)),
                        pair_budget: Some(per_minute(3, 3)),
                        idempotency: None,
                    }),
                    ..Claim::new(&target, per_minute(10, 10))
                };
                store.consume(&claim).await.map(|c| c.outcome)
            })
        })
        .collect()
}

/// Waits until `n` claims wait for a slot.
async fn wait_for_queue(store: &PgStore, n: usize) {
    wait_for_waiting(n, "claims", || store.claims_waiting()).await;
}

/// Polls (bounded) until `waiting()` jobs (`what`) are queued, `n` or more.
async fn wait_for_waiting(n: usize, what: &str, waiting: impl Fn() -> usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while waiting() < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} {what} queued, expected {n}",
            waiting()
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Polls (bounded) until a session of `db` waits for a lock.
async fn wait_for_lock_waiter(db: &TestDb) {
    let mut admin = sqlx::PgConnection::connect(&db.url).await.expect("connect");
    let name = crate::pg_admin::db_name(db);
    crate::pg_admin::wait_for_lock_waiters(&mut admin, &name, 1).await;
}

async fn package_of(task: tokio::task::JoinHandle<Result<ConsumeOutcome, StoreError>>) -> String {
    match task.await.expect("task").expect("claim") {
        ConsumeOutcome::Consumed(got) => {
            String::from_utf8_lossy(&got.key_package[4..]).into_owned()
        }
        other => panic!("expected a package, got {other:?}"),
    }
}

/// With the one claim slot (4 connections) held by a claim waiting for a lock, claims queue;
/// once it ends, the queue runs as one batch of every claim with a target and caller of its
/// own, plus the first of a hot target, and the rest of the hot target's run one at a time.
/// Each claim gets its target's oldest package, the hot target's claims its first five.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_queued_behind_a_busy_slot_run_as_one_batch() {
    let Some(db) = postgres_only!() else { return };
    let store = Arc::new(pg_store(&db, 4).await);
    let cold: Vec<String> = (0..20).map(|i| format!("u{i}")).collect();
    for name in cold
        .iter()
        .chain(["bob".to_owned(), "hot".to_owned()].iter())
    {
        store
            .upload(&user(name), &upload_of(name, 5, true), 0)
            .await
            .expect("upload");
    }
    let mut lock = crate::pg_admin::lock_user_row(&db.url, "bob").await;
    let blocked = spawn_claims(&store, &["bob".to_owned()], "c0-");
    wait_for_lock_waiter(&db).await;

    let mut queued: Vec<String> = cold.clone();
    queued.extend(std::iter::repeat_n("hot".to_owned(), 5));
    let tasks = spawn_claims(&store, &queued, "c1-");
    wait_for_queue(&store, queued.len()).await;
    assert_eq!(store.claim_batches(), (0, 0));
    sqlx::query("COMMIT")
        .execute(&mut lock)
        .await
        .expect("commit");

    for task in blocked {
        assert_eq!(package_of(task).await, "bob-0");
    }
    let mut hot = Vec::new();
    for (target, task) in queued.iter().zip(tasks) {
        let got = package_of(task).await;
        if target == "hot" {
            hot.push(got);
        } else {
            assert_eq!(got, format!("{target}-0"));
        }
    }
    hot.sort();
    assert_eq!(hot, (0..5).map(|i| format!("hot-{i}")).collect::<Vec<_>>());
    assert_eq!(store.claim_batches(), (1, 21));
    assert_eq!(store.claims_waiting(), 0);
}

/// A batch that fails in the database (here one claim waits past the lock timeout for a row a
/// stuck transaction holds) rolls back whole and runs again claim by claim: every other claim
/// gets its package, the stuck one fails as unavailable and takes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_batch_runs_again_claim_by_claim() {
    let Some(db) = postgres_only!() else { return };
    let store = Arc::new(pg_store(&db, 4).await);
    let names: Vec<String> = (0..6).map(|i| format!("u{i}")).collect();
    for name in names.iter().chain(["bob".to_owned()].iter()) {
        store
            .upload(&user(name), &upload_of(name, 2, false), 0)
            .await
            .expect("upload");
    }
    let mut bob = crate::pg_admin::lock_user_row(&db.url, "bob").await;
    let stuck = crate::pg_admin::lock_user_row(&db.url, "u3").await;
    let blocked = spawn_claims(&store, &["bob".to_owned()], "c2-");
    wait_for_lock_waiter(&db).await;
    let tasks = spawn_claims(&store, &names, "c3-");
    wait_for_queue(&store, names.len()).await;
    sqlx::query("COMMIT")
        .execute(&mut bob)
        .await
        .expect("commit");
    for task in blocked {
        assert_eq!(package_of(task).await, "bob-0");
    }
    for (name, task) in names.iter().zip(tasks) {
        if name == "u3" {
            let error = task.await.expect("task").expect_err("u3 is locked");
            assert!(matches!(error, StoreError::Unavailable(_)), "{error:?}");
        } else {
            assert_eq!(package_of(task).await, format!("{name}-0"));
        }
    }
    assert_eq!(
        store.claim_batches(),
        (0, 0),
        "the refused batch counts as none"
    );
    drop(stuck);
    let left = store.status(&user("u3"), 0).await.expect("status");
    assert_eq!(left.regular_count, 2);
}

/// With two claim slots (16 connections), claims of a target whose row a stuck transaction
/// holds take one slot at most: the first waits for the lock, the others queue behind it, and
/// claims of other targets go on in the other slot meanwhile, which opens once the stuck
/// statement has run for the batcher's stall time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_target_holds_one_claim_slot_at_most() {
    let Some(db) = postgres_only!() else { return };
    let store = Arc::new(pg_store(&db, 16).await);
    let cold: Vec<String> = (0..10).map(|i| format!("u{i}")).collect();
    for name in cold.iter().chain(["bob".to_owned()].iter()) {
        store
            .upload(&user(name), &upload_of(name, 3, false), 0)
            .await
            .expect("upload");
    }
    let mut lock = crate::pg_admin::lock_user_row(&db.url, "bob").await;
    let first = spawn_claims(&store, &["bob".to_owned()], "c4-");
    wait_for_lock_waiter(&db).await;
    let more = spawn_claims(&store, &["bob".to_owned(), "bob".to_owned()], "c5-");
    wait_for_queue(&store, 2).await;

    for (name, task) in cold.iter().zip(spawn_claims(&store, &cold, "c6-")) {
        assert_eq!(package_of(task).await, format!("{name}-0"));
    }
    assert!(
        first.iter().chain(&more).all(|task| !task.is_finished()),
        "bob's claims still wait for the lock"
    );
    sqlx::query("COMMIT")
        .execute(&mut lock)
        .await
        .expect("commit");
    let mut bob = Vec::new();
    for task in first.into_iter().chain(more) {
        bob.push(package_of(task).await);
    }
    bob.sort();
    assert_eq!(bob, ["bob-0", "bob-1", "bob-2"]);
}

/// Random rounds of uploads of pairwise distinct users: packages held already (regular or last
/// resort) sent again, more than ten at once, last-resort replacements, fingerprints sent or
/// not, readable packages of several suites expiring between rounds beside opaque ones. Each
/// round runs one by one on one database and as one batch on another; every outcome (stored,
/// expired, the status with its inventory digest, so FIFO order too) must agree, and so must
/// what the users' packages then hand out, oldest first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_batch_stores_exactly_what_its_uploads_would_one_by_one() {
    let Some(one_db) = postgres_only!() else {
        return;
    };
    let Some(batch_db) = postgres_only!() else {
        return;
    };
    let one = pg_store(&one_db, 4).await;
    let batch = pg_store(&batch_db, 4).await;
    let users: Vec<UserId> = (0..7).map(|i| user(&format!("w{i}"))).collect();
    let key = [9_u8; 32];
    let fingerprint = keypackage_server::key_package::Fingerprint::of_public_key(&key);
    const START: u64 = 1_700_000_000;
    let mut rng = StdRng::seed_from_u64(11);
    let mut uploads_batched = 0;
    for round in 0..30_u64 {
        let now = START + round * 100;
        let mut shuffled = users.clone();
        shuffled.shuffle(&mut rng);
        let size = rng.gen_range(2..=users.len());
        let mut planned: Vec<(UserId, Upload)> = Vec::new();
        for who in shuffled.into_iter().take(size) {
            // Tags repeat across rounds, so entries identical to held packages come up; a
            // package's bytes follow from its tag, its lifetime and its suite.
            let package = |rng: &mut StdRng| -> Bytes {
                let tag = format!("{}-{}", who.as_str(), rng.gen_range(0..16));
                Bytes::from(match rng.gen_range(0..4) {
                    0 => kp(&tag),
                    1 => crate::harness::readable_kp_of_suite(
                        2,
                        &tag,
                        &key,
                        now + 50 * rng.gen_range(1..8),
                    ),
                    _ => crate::harness::readable_kp(&tag, &key, 0, now + 50 * rng.gen_range(1..8)),
                })
            };
            let regular = rng.gen_range(0..=13);
            let mut entries: Vec<(Bytes, bool)> =
                (0..regular).map(|_| (package(&mut rng), false)).collect();
            if regular == 0 || rng.gen_bool(0.4) {
                entries.push((package(&mut rng), true));
            }
            let sent = if rng.gen_bool(0.6) {
                fingerprint.as_str()
            } else {
                ""
            };
            let upload =
                Upload::parse(entries, sent, now, UploadPolicy::default()).expect("valid upload");
            planned.push((who, upload));
        }
        let mut expected = Vec::new();
        for (who, upload) in &planned {
            expected.push(one.upload(who, upload, now as i64).await.expect("alone"));
        }
        let together: Vec<(&UserId, &Upload, i64)> = planned
            .iter()
            .map(|(who, upload)| (who, upload, now as i64))
            .collect();
        let got = batch.upload_together(&together).await.expect("batch");
        assert_eq!(got, expected, "round {round}");
        uploads_batched += planned.len();
    }
    assert!(uploads_batched > 80);
    let end = START + 30 * 100;
    for who in &users {
        let mut handed = [Vec::new(), Vec::new()];
        for (store, handed) in [&one, &batch].into_iter().zip(&mut handed) {
            loop {
                let claim = Claim {
                    now_us: Some(end as i64 * 1_000_000),
                    ..Claim::new(who, per_minute(600, 600))
                };
                match store.consume(&claim).await.expect("claim").outcome {
                    ConsumeOutcome::Consumed(got) if !got.is_last_resort => {
                        handed.push(got.key_package)
                    }
                    other => {
                        handed.push(Bytes::from(summary(&other)));
                        break;
                    }
                }
            }
        }
        assert_eq!(handed[1], handed[0], "{who:?} hands out the same packages");
    }
}

/// With the one upload slot (4 connections) held by an upload waiting for its user's row,
/// uploads of other users queue, and a second upload of the held user queues behind them (it
/// may not run beside the first). Once the first ends, all eleven run as one batch, and the
/// held user's packages keep the order of the two uploads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_queued_behind_a_busy_slot_run_as_one_batch() {
    let Some(db) = postgres_only!() else { return };
    let store = Arc::new(pg_store(&db, 4).await);
    store
        .upload(&user("bob"), &upload_of("bob-old", 1, false), 0)
        .await
        .expect("upload");
    let upload = |name: String, prefix: String| {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .upload(&user(&name), &upload_of(&prefix, 2, true), 0)
                .await
        })
    };
    let mut lock = crate::pg_admin::lock_user_row(&db.url, "bob").await;
    let blocked = upload("bob".to_owned(), "bob-a".to_owned());
    wait_for_lock_waiter(&db).await;

    let others: Vec<_> = (0..10)
        .map(|i| upload(format!("w{i}"), format!("w{i}")))
        .collect();
    wait_for_waiting(10, "uploads", || store.uploads_waiting()).await;
    let second = upload("bob".to_owned(), "bob-b".to_owned());
    wait_for_waiting(11, "uploads", || store.uploads_waiting()).await;
    assert_eq!(store.upload_batches(), (0, 0));
    sqlx::query("COMMIT")
        .execute(&mut lock)
        .await
        .expect("commit");

    assert_eq!(blocked.await.expect("task").expect("upload").stored, 3);
    for task in others {
        let outcome = task.await.expect("task").expect("upload");
        assert_eq!((outcome.stored, outcome.status.regular_count), (3, 2));
    }
    assert_eq!(second.await.expect("task").expect("upload").stored, 3);
    assert_eq!(store.upload_batches(), (1, 11));
    assert_eq!(store.uploads_waiting(), 0);
    let mut handed = Vec::new();
    for _ in 0..5 {
        let got = store
            .consume(&Claim::new(&user("bob"), per_minute(600, 600)))
            .await
            .expect("claim");
        match got.outcome {
            ConsumeOutcome::Consumed(got) => {
                handed.push(String::from_utf8_lossy(&got.key_package[4..]).into_owned())
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        handed,
        ["bob-old-0", "bob-a-0", "bob-a-1", "bob-b-0", "bob-b-1"],
        "bob's uploads kept their order"
    );
}
