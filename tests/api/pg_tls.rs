//! TLS to Postgres: `sslmode` from `DATABASE_URL` is honoured (the local server has SSL on with
//! a self-signed `localhost` certificate), and an unverifiable server stops start-up.

use sqlx::Connection;

use crate::{
    harness::{kp, run_to_exit, server_env, stderr_lines, ServerProcess, TempDir},
    pg_admin::admin_url_of,
};

/// The certificate Debian's Postgres serves by default (self-signed, for `localhost`).
const SNAKEOIL_CERT: &str = "/etc/ssl/certs/ssl-cert-snakeoil.pem";

/// True when the server `admin_url` names has SSL on; otherwise the test notes why it skips.
async fn ssl_is_on(admin_url: &str, test: &str) -> bool {
    let mut conn = sqlx::PgConnection::connect(admin_url)
        .await
        .expect("admin connection");
    let ssl: String = sqlx::query_scalar("SHOW ssl")
        .fetch_one(&mut conn)
        .await
        .expect("SHOW ssl");
    if ssl != "on" {
        eprintln!("{test}: skipped, the Postgres server has ssl = {ssl}");
    }
    ssl == "on"
}

/// For every session of database `name`: (sessions, how many of them are encrypted).
async fn encrypted_sessions(admin_url: &str, name: &str) -> (i64, i64) {
    let mut conn = sqlx::PgConnection::connect(admin_url)
        .await
        .expect("admin connection");
    sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE s.ssl) \
         FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
         WHERE a.datname = $1 AND a.application_name = 'keypackage-server'",
    )
    .bind(name)
    .fetch_one(&mut conn)
    .await
    .expect("pg_stat_ssl")
}

#[tokio::test]
async fn sslmode_require_encrypts_every_session_of_the_server() {
    let Some(db) = postgres_only!("sslmode=require") else {
        return;
    };
    let admin = admin_url_of(&db);
    if !ssl_is_on(&admin, "sslmode=require").await {
        return;
    }
    let dir = TempDir::new();
    let mut vars = server_env(&db, &dir);
    vars.insert(
        "DATABASE_URL".into(),
        Some(format!("{}?sslmode=require", db.url)),
    );
    let server = ServerProcess::start(&vars).await;
    server.upload("bob", &[(kp("over tls"), false)], "").await;
    assert_eq!(server.status("bob").await.regular_count, 1);

    let (sessions, encrypted) = encrypted_sessions(&admin, &crate::pg_admin::db_name(&db)).await;
    assert!(sessions >= 1, "the server holds pooled sessions");
    assert_eq!(encrypted, sessions, "every session of the server is TLS");
}

#[tokio::test]
async fn sslmode_verify_full_checks_the_certificate_against_sslrootcert() {
    let Some(db) = postgres_only!("sslmode=verify-full") else {
        return;
    };
    let admin = admin_url_of(&db);
    if !ssl_is_on(&admin, "sslmode=verify-full").await
        || !std::path::Path::new(SNAKEOIL_CERT).exists()
    {
        return;
    }
    // The certificate names `localhost`, so connect by that name.
    let url = db.url.replacen("127.0.0.1", "localhost", 1);
    let dir = TempDir::new();
    let mut vars = server_env(&db, &dir);
    vars.insert(
        "DATABASE_URL".into(),
        Some(format!(
            "{url}?sslmode=verify-full&sslrootcert={SNAKEOIL_CERT}"
        )),
    );
    let server = ServerProcess::start(&vars).await;
    server.upload("bob", &[(kp("verified"), false)], "").await;
    let (sessions, encrypted) = encrypted_sessions(&admin, &crate::pg_admin::db_name(&db)).await;
    assert!(sessions >= 1 && encrypted == sessions);
}

#[tokio::test]
async fn sslmode_verify_full_without_a_trusted_root_stops_start_up_naming_database_url() {
    let Some(db) = postgres_only!("sslmode=verify-full, untrusted") else {
        return;
    };
    if !ssl_is_on(&admin_url_of(&db), "sslmode=verify-full, untrusted").await {
        return;
    }
    let url = db.url.replacen("127.0.0.1", "localhost", 1);
    let dir = TempDir::new();
    let mut vars = server_env(&db, &dir);
    vars.insert(
        "DATABASE_URL".into(),
        Some(format!("{url}?sslmode=verify-full")),
    );
    let output = run_to_exit(&["serve"], &vars).await;
    assert!(!output.status.success(), "start-up must fail");
    let lines = stderr_lines(&output);
    let last = lines.last().expect("an error line");
    assert!(
        last.starts_with("keypackage-server: DATABASE_URL: "),
        "one line naming the setting: {lines:?}"
    );
    assert!(
        last.to_lowercase().contains("certificate"),
        "says what is wrong: {last}"
    );
}
