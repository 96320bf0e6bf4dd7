//! Upgrading a deployment: packages stored by a version that did not read key packages get
//! their facts at the next start, in batches that commit one by one.

use std::path::{Path, PathBuf};

use keypackage_server::{
    key_package::UserId,
    mls_codec,
    store::{self, Claim, ConsumeOutcome},
};
use sha2::{Digest, Sha256};

use crate::harness::{consume_at, kp, readable_kp, TestDb};

const BUDGET: keypackage_server::rate_limit::Budget = keypackage_server::rate_limit::Budget {
    burst: 1_000,
    interval: std::time::Duration::from_millis(1),
};

fn unix_now() -> u64 {
    keypackage_server::clock::unix_seconds() as u64
}

/// The migrations of `backend` up to and including `version`, as a directory of their own.
fn migrations_until(backend: &str, version: u32) -> PathBuf {
    let source = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("migrations")
        .join(backend);
    let dir = std::env::temp_dir().join(format!(
        "kps-migrations-{backend}-{version}-{:016x}",
        rand::random::<u64>()
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    for entry in std::fs::read_dir(source).expect("migrations") {
        let path = entry.expect("entry").path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let number: u32 = name[..4].parse().expect("numbered migration");
        if number <= version {
            std::fs::copy(&path, dir.join(&name)).expect("copy");
        }
    }
    dir
}

/// What v1 wrote: rows without facts. $1 user, $2 digest, $3 bytes.
const V1_PACKAGE: &str = "INSERT INTO key_packages (user_id, digest, data) VALUES ($1, $2, $3)";
const V1_USER: &str = "INSERT INTO users (user_id, last_resort, last_resort_digest) \
                       VALUES ($1, $2, $3)";

/// Builds the v1 schema (migrations 1–2) on `db` and stores `regular` and `last_resort` for
/// `user` as v1 did.
async fn store_as_v1(db: &TestDb, user: &str, regular: &[Vec<u8>], last_resort: &[u8]) {
    use sqlx::{migrate::Migrator, Connection};
    let backend = if db.is_postgres() {
        "postgres"
    } else {
        "sqlite"
    };
    let dir = migrations_until(backend, 2);
    let migrator = Migrator::new(dir.as_path()).await.expect("v1 migrations");
    let digest = |b: &[u8]| Sha256::digest(b).to_vec();
    macro_rules! write_v1 {
        ($conn:expr) => {{
            let mut conn = $conn;
            migrator.run(&mut conn).await.expect("migrate to v1");
            sqlx::query(V1_USER)
                .bind(user)
                .bind(last_resort)
                .bind(digest(last_resort))
                .execute(&mut conn)
                .await
                .expect("v1 user");
            for package in regular {
                sqlx::query(V1_PACKAGE)
                    .bind(user)
                    .bind(digest(package))
                    .bind(package.as_slice())
                    .execute(&mut conn)
                    .await
                    .expect("v1 package");
            }
        }};
    }
    if db.is_postgres() {
        write_v1!(sqlx::PgConnection::connect(&db.url).await.expect("connect"));
    } else {
        let options: sqlx::sqlite::SqliteConnectOptions = db.url.parse().expect("url");
        write_v1!(
            sqlx::SqliteConnection::connect_with(&options.create_if_missing(true))
                .await
                .expect("connect")
        );
    }
    std::fs::remove_dir_all(dir).expect("cleanup");
}

/// After the upgrade every package of v1 carries its facts: an expired one is never handed
/// out, suites filter, refs come back, and opaque packages stay servable as before.
#[tokio::test]
async fn packages_stored_by_v1_get_their_facts_at_the_next_start() {
    let db = TestDb::new().await;
    let now = unix_now();
    let key = [9u8; 32];
    let expired = readable_kp("expired", &key, 0, now - 1);
    let live = readable_kp("live", &key, 0, now + 3_600);
    let opaque = kp("opaque");
    let last_resort = readable_kp("lr", &key, 0, now + 7_200);
    store_as_v1(
        &db,
        "bob",
        &[expired, live.clone(), opaque.clone()],
        &last_resort,
    )
    .await;

    let store = db.store().await;
    let bob = UserId::parse("bob").unwrap();
    let status = store.status(&bob, now as i64).await.expect("status");
    assert_eq!(
        status.regular_count, 2,
        "the expired package is not counted"
    );
    assert_eq!(status.cipher_suites, vec![(0, 1), (1, 1)]);
    assert_eq!(status.next_expiry, now + 3_600);
    assert_eq!(status.last_resort_not_after, now + 7_200);

    match consume_at(&*store, &bob, BUDGET, None)
        .await
        .expect("consume")
    {
        ConsumeOutcome::Consumed(c) => {
            assert_eq!(c.key_package.as_ref(), live.as_slice());
            let facts = c.facts.expect("facts read at start");
            let read = mls_codec::read(&live).unwrap();
            assert_eq!(Some(facts.key_package_ref.to_vec()), read.key_package_ref);
            assert_eq!(facts.not_after, now + 3_600);
        }
        other => panic!("expected the live package, got {other:?}"),
    }
    let filtered = store
        .consume(&Claim {
            suites: &[1],
            ..Claim::new(&bob, BUDGET)
        })
        .await
        .expect("consume");
    match filtered.outcome {
        ConsumeOutcome::Consumed(c) => {
            assert!(
                c.is_last_resort,
                "the opaque package does not qualify for suite 1"
            );
            assert_eq!(c.key_package.as_ref(), last_resort.as_slice());
        }
        other => panic!("expected the last-resort package, got {other:?}"),
    }
    match consume_at(&*store, &bob, BUDGET, None)
        .await
        .expect("consume")
    {
        ConsumeOutcome::Consumed(c) => {
            assert_eq!(c.key_package.as_ref(), opaque.as_slice());
            assert_eq!(c.facts, None);
        }
        other => panic!("expected the opaque package, got {other:?}"),
    }
}

/// The backfill works in batches that each commit: after a batch, what it read stays read,
/// and the next call goes on with the rest (as a restart after a crash would).
#[tokio::test]
async fn the_backfill_reads_in_batches_and_resumes() {
    let db = TestDb::new().await;
    let now = unix_now();
    let key = [5u8; 32];
    let packages: Vec<Vec<u8>> = (0..5)
        .map(|i| readable_kp(&format!("p{i}"), &key, 0, now + 3_600))
        .collect();
    let last_resort = readable_kp("lr", &key, 0, now + 3_600);
    store_as_v1(&db, "bob", &packages, &last_resort).await;

    // Opening the store reads everything once; a second v1 writer (a process not yet upgraded)
    // may add rows later, which the next start reads.
    let store = db.store().await;
    assert_eq!(
        store.read_stored_facts(2).await.unwrap(),
        0,
        "all read at start"
    );
    let bob = UserId::parse("bob").unwrap();
    let unread = {
        use sqlx::Connection;
        let sql = "UPDATE key_packages SET cipher_suite = NULL, not_after = NULL";
        if db.is_postgres() {
            let mut c = sqlx::PgConnection::connect(&db.url).await.unwrap();
            sqlx::query(sql)
                .execute(&mut c)
                .await
                .unwrap()
                .rows_affected()
        } else {
            let mut c = sqlx::SqliteConnection::connect(&db.url).await.unwrap();
            sqlx::query(sql)
                .execute(&mut c)
                .await
                .unwrap()
                .rows_affected()
        }
    };
    assert_eq!(unread, 5);
    let suites = |s: store::Status| s.cipher_suites;
    assert_eq!(
        suites(store.status(&bob, now as i64).await.unwrap()),
        vec![(0, 5)],
        "unread packages count as opaque"
    );
    assert_eq!(store.read_stored_facts(2).await.unwrap(), 2);
    assert_eq!(
        suites(store.status(&bob, now as i64).await.unwrap()),
        vec![(0, 3), (1, 2)],
        "the first batch committed"
    );
    assert_eq!(store::backfill_facts(&*store, 2).await.unwrap(), 3);
    assert_eq!(
        suites(store.status(&bob, now as i64).await.unwrap()),
        vec![(1, 5)]
    );
}
