//! The partitioned schema variant (`KPS_POSTGRES_PARTITIONS`): the tables hash-partitioned by
//! the user (or caller, or budget subject) each row belongs to, the shape a distributed
//! Postgres shards by. Every statement a request runs must touch one partition per key it
//! names; these tests run the store's own statements in a transaction and read which
//! partitions it scanned or wrote (`pg_stat_xact_user_tables`: the counts of the session not
//! yet reported, so each checked transaction runs on a new connection).

use std::collections::BTreeSet;

use bytes::Bytes;
use keypackage_server::{
    key_package::{UploadPolicy, UserId},
    store::{self, postgres, ConnectOptions, Upload},
};
use sqlx::{Connection, PgConnection};

use crate::harness::*;

fn user(name: &str) -> UserId {
    UserId::parse(name).expect("valid user id")
}

/// Regular packages `{prefix}0..n`, and a last-resort one of tag `last_resort`.
fn upload_of(prefix: &str, n: usize, last_resort: Option<&str>) -> Upload {
    let entries = (0..n)
        .map(|i| (Bytes::from(kp(&format!("{prefix}{i}"))), false))
        .chain(last_resort.map(|tag| (Bytes::from(kp(tag)), true)));
    Upload::parse(entries, "", 0, UploadPolicy::default()).expect("valid upload")
}

/// Partitions per table in these tests.
const PARTITIONS: u16 = 16;

/// The partition of `table` that holds key `key` (its `_pN` suffix).
async fn partition_of(conn: &mut PgConnection, table: &str, key: &str) -> String {
    let n: i32 = sqlx::query_scalar(
        "SELECT i FROM generate_series(0, $3 - 1) AS i
         WHERE satisfies_hash_partition($1::regclass, $3, i, $2::text)",
    )
    .bind(table)
    .bind(key)
    .bind(i32::from(PARTITIONS))
    .fetch_one(&mut *conn)
    .await
    .expect("partition of a key");
    format!("{table}_p{n}")
}

/// Partitions the current transaction has scanned or written.
async fn touched(conn: &mut PgConnection) -> BTreeSet<String> {
    sqlx::query_scalar::<_, String>(
        "SELECT relname::text FROM pg_stat_xact_user_tables
         WHERE seq_scan + COALESCE(idx_scan, 0) + n_tup_ins + n_tup_upd + n_tup_del > 0",
    )
    .fetch_all(&mut *conn)
    .await
    .expect("transaction statistics")
    .into_iter()
    .collect()
}

/// A store on a fresh partitioned database, and a connection of the test's own to it.
async fn partitioned() -> Option<(
    TestDb,
    std::sync::Arc<dyn store::KeyPackageStore>,
    PgConnection,
)> {
    let db = postgres_only!("partitions")?;
    let mut options = ConnectOptions::new(db.url.clone());
    options.postgres_partitions = PARTITIONS;
    let store = store::connect(&options).await.expect("open store");
    let conn = PgConnection::connect(&db.url).await.expect("connect");
    Some((db, store, conn))
}

#[tokio::test]
async fn the_variant_partitions_every_table_and_keeps_what_was_stored() {
    let Some(db) = postgres_only!() else { return };
    // Stored on plain tables first, then converted at the next start.
    let plain = db.store().await;
    let app_user = user("bob");
    plain
        .upload(&app_user, &upload_of("kept", 3, None), 0)
        .await
        .unwrap();
    drop(plain);
    let mut options = ConnectOptions::new(db.url.clone());
    options.postgres_partitions = PARTITIONS;
    let store = store::connect(&options).await.expect("convert at start");
    // A second start finds the tables partitioned and changes nothing.
    let again = store::connect(&options).await.expect("start again");
    drop(again);

    let mut conn = PgConnection::connect(&db.url).await.unwrap();
    for table in ["users", "key_packages", "consume_budgets", "claim_replays"] {
        let (kind, parts): (String, i64) = sqlx::query_as(
            "SELECT c.relkind::text, (SELECT count(*) FROM pg_inherits i WHERE i.inhparent = c.oid)
             FROM pg_class c WHERE c.oid = $1::regclass",
        )
        .bind(table)
        .fetch_one(&mut conn)
        .await
        .unwrap();
        assert_eq!(
            (kind.as_str(), parts),
            ("p", i64::from(PARTITIONS)),
            "{table}"
        );
    }
    let status = store.status(&app_user, 0).await.unwrap();
    assert_eq!(
        status.regular_count, 3,
        "the packages survived the conversion"
    );
    let first = store
        .consume(&keypackage_server::store::Claim::new(
            &app_user,
            keypackage_server::rate_limit::Budget::per_minute(10),
        ))
        .await
        .unwrap();
    match first.outcome {
        store::ConsumeOutcome::Consumed(c) => {
            assert_eq!(c.key_package.as_ref(), kp("kept0").as_slice(), "FIFO kept")
        }
        other => panic!("{other:?}"),
    }
}

/// An upload (lock, sweep, write and status, in one statement) touches the uploader's
/// partition of `users` and of `key_packages`, and nothing else.
#[tokio::test]
async fn an_upload_touches_only_the_uploaders_partitions() {
    let Some((db, store, mut conn)) = partitioned().await else {
        return;
    };
    store
        .upload(&user("bob"), &upload_of("old", 9, None), 0)
        .await
        .unwrap();
    let users = partition_of(&mut conn, "users", "bob").await;
    let packages = partition_of(&mut conn, "key_packages", "bob").await;

    let mut conn = PgConnection::connect(&db.url).await.unwrap();
    let mut tx = conn.begin().await.unwrap();
    let new = [kp("new0"), kp("new1")];
    let digests: Vec<Vec<u8>> = new
        .iter()
        .map(|p| <sha2::Sha256 as sha2::Digest>::digest(p).to_vec())
        .collect();
    let now = 0_u64.to_be_bytes();
    let rows: Vec<(i64, Option<Vec<u8>>)> = sqlx::query_as(&format!(
        "SELECT stored, digest FROM ({}) AS upload",
        postgres::UPLOAD
    ))
    .bind("bob")
    .bind(Option::<&str>::None)
    .bind(Option::<i64>::None)
    .bind(now.as_slice())
    .bind(digests)
    .bind(new.to_vec())
    .bind(vec![0_i32; 2])
    .bind(vec![Option::<Vec<u8>>::None; 2])
    .bind(vec![Option::<Vec<u8>>::None; 2])
    .bind(Option::<Vec<u8>>::None)
    .bind(Option::<Vec<u8>>::None)
    .bind(Option::<Vec<u8>>::None)
    .bind(Option::<i32>::None)
    .bind(Option::<Vec<u8>>::None)
    .bind(Option::<Vec<u8>>::None)
    .bind(10_i32)
    .fetch_all(&mut *tx)
    .await
    .unwrap();
    assert_eq!(rows[0].0, 2, "both new packages stored");
    assert_eq!(rows.len(), 10, "the status lists the 10 packages held");
    sqlx::query(postgres::FINGERPRINT)
        .bind("bob")
        .fetch_all(&mut *tx)
        .await
        .unwrap();
    let got = touched(&mut tx).await;
    assert_eq!(got, BTreeSet::from([users, packages]));
    tx.commit().await.unwrap();
    assert_eq!(
        store.status(&user("bob"), 0).await.unwrap().regular_count,
        10
    );
}

/// A claim with every stage and a key touches the target's partitions of `users` and
/// `key_packages`, one partition of `consume_budgets` per budget it charges (caller, pair,
/// target) and the caller's partition of `claim_replays`; a delete, the target's only.
#[tokio::test]
async fn a_claim_and_a_delete_touch_only_the_partitions_of_their_keys() {
    let Some((db, store, _)) = partitioned().await else {
        return;
    };
    store
        .upload(&user("bob"), &upload_of("p", 3, Some("lr")), 0)
        .await
        .unwrap();
    let budget = |per_minute: i64| (60_000_000 / per_minute, 60_000_000);
    let (ti, tw) = budget(10);
    let (ci, cw) = budget(600);
    let (pi, pw) = budget(3);
    for key in [None, Some("k1")] {
        let mut conn = PgConnection::connect(&db.url).await.unwrap();
        let mut tx = conn.begin().await.unwrap();
        let outcome: String = sqlx::query_scalar(postgres::CONSUME)
            .bind("bob")
            .bind(Some("alice"))
            .bind(key)
            .bind(600_000_000_i64)
            .bind(Option::<i64>::None)
            .bind(Option::<Vec<i32>>::None)
            .bind(ti)
            .bind(tw)
            .bind(Some(ci))
            .bind(Some(cw))
            .bind(Some(pi))
            .bind(Some(pw))
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        assert_eq!(outcome, "package");
        let got = touched(&mut tx).await;
        let mut allowed = BTreeSet::from([
            partition_of(&mut tx, "users", "bob").await,
            partition_of(&mut tx, "key_packages", "bob").await,
            partition_of(&mut tx, "consume_budgets", "bob").await,
            partition_of(&mut tx, "consume_budgets", "alice").await,
            partition_of(&mut tx, "consume_budgets", "alice bob").await,
        ]);
        if key.is_some() {
            allowed.insert(partition_of(&mut tx, "claim_replays", "alice").await);
        }
        assert!(
            got.is_subset(&allowed),
            "claim (key {key:?}) touched {got:?}, allowed {allowed:?}"
        );
        assert!(
            got.contains(&partition_of(&mut tx, "key_packages", "bob").await),
            "the claim took a package: {got:?}"
        );
        tx.commit().await.unwrap();
    }

    let mut conn = PgConnection::connect(&db.url).await.unwrap();
    let mut tx = conn.begin().await.unwrap();
    for statement in [postgres::DELETE_LAST_RESORT, postgres::DELETE_REGULAR] {
        sqlx::query(statement)
            .bind("bob")
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    let got = touched(&mut tx).await;
    let allowed = BTreeSet::from([
        partition_of(&mut tx, "users", "bob").await,
        partition_of(&mut tx, "key_packages", "bob").await,
    ]);
    assert_eq!(got, allowed, "delete");
    tx.commit().await.unwrap();
}
