//! `/readyz` does not queue behind request traffic: with every request connection held, the
//! probe still answers from a connection of its own.

use std::time::Duration;

use keypackage_server::store;

use crate::{
    harness::{
        connect_options, kp, postgres_admin_url, spawn_app_with_store, token, upload_request,
        TestDb,
    },
    pg_admin::{db_name, lock_user_row, wait_for_lock_waiters},
};

#[tokio::test]
async fn readyz_answers_200_while_every_request_connection_is_held() {
    if postgres_admin_url().is_none() {
        eprintln!("readiness under a full pool: skipped, needs TEST_DATABASE_URL=postgres://…");
        return;
    }
    let db = TestDb::new().await;
    let (name, url) = (db_name(&db), db.url.clone());
    // Two request connections, and bounds long enough that they stay held while we look.
    let mut options = connect_options(&url);
    options.max_connections = 2;
    options.statement_timeout = Duration::from_secs(60);
    options.call_timeout = Duration::from_secs(60);
    let store = store::connect(&options).await.expect("open store");
    let app = spawn_app_with_store(db, store, Default::default()).await;
    app.upload("bob", &[(kp("before"), false)], "").await;

    // Both request connections wait, inside Postgres, for bob's row lock: an upload of bob's
    // and a claim of one of his packages (uploads of one user queue behind each other, in the
    // process, without taking a second connection).
    let mut holder = lock_user_row(&url, "bob").await;
    let mut admin: sqlx::PgConnection = sqlx::Connection::connect(&url).await.expect("connect");
    let (client, upload_url) = (app.client.clone(), app.url("/api/v1/key-packages"));
    let upload = tokio::spawn(async move {
        client
            .post(upload_url)
            .bearer_auth(token("bob"))
            .header("content-type", "application/x-protobuf")
            .body(prost::Message::encode_to_vec(&upload_request(
                &[(kp("blocked"), false)],
                "",
            )))
            .send()
            .await
            .expect("upload")
            .status()
    });
    let (client, claim_url) = (app.client.clone(), app.url("/api/v1/key-packages/bob"));
    let claim = tokio::spawn(async move {
        client
            .get(claim_url)
            .bearer_auth(token("alice"))
            .send()
            .await
            .expect("claim")
            .status()
    });
    wait_for_lock_waiters(&mut admin, &name, 2).await;

    let status = app
        .client
        .get(app.url("/api/v1/key-packages"))
        .bearer_auth(token("carol"))
        .send()
        .await
        .expect("status");
    assert_eq!(status.status(), 503, "the request pool is exhausted");
    let ready = app
        .client
        .get(app.url("/readyz"))
        .send()
        .await
        .expect("readyz");
    assert_eq!(ready.status(), 200, "readiness has a connection of its own");

    sqlx::raw_sql("ROLLBACK")
        .execute(&mut holder)
        .await
        .expect("release");
    assert_eq!(upload.await.expect("upload task"), 201);
    assert_eq!(claim.await.expect("claim task"), 200);
}
