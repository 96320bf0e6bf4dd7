//! Seeding users and key packages: straight into the database for large populations (a tight
//! transaction on SQLite, `generate_series` on Postgres), or through the HTTP API.

use std::{
    net::SocketAddr,
    str::FromStr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Instant,
};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{
    client::conn::http1,
    header::{self, HeaderValue},
    Method, Request,
};
use hyper_util::rt::TokioIo;
use keypackage_server::{
    auth::{Authenticator, VerifyingKey},
    key_package::UserId,
    store::{self, Backend, ConnectOptions},
    wire::{KeyPackageEntry, UploadKeyPackagesRequest},
};
use prost::Message;
use sqlx::{
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous},
    Connection, QueryBuilder, Sqlite,
};

use crate::workload::{self, digest, fingerprint, package, user_id};

/// What to seed.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Population {
    /// First user index.
    pub(crate) start: u64,
    /// Users to create.
    pub(crate) users: u64,
    /// Regular packages per user.
    pub(crate) packages: u32,
    /// Whether each user also gets a last-resort package.
    pub(crate) last_resort: bool,
    /// Bytes per package.
    pub(crate) size: usize,
}

/// Seeds directly into the database `url` names, creating the schema first.
pub(crate) async fn seed_sql(url: &str, population: Population) -> Result<()> {
    // The server's own migrations, so the schema is exactly what it expects.
    drop(
        store::connect(&ConnectOptions::new(url))
            .await
            .context("open the database")?,
    );
    let started = Instant::now();
    match Backend::from_url(url)? {
        Backend::Sqlite => seed_sqlite(url, population).await?,
        Backend::Postgres => seed_postgres(url, population).await?,
    }
    eprintln!(
        "seeded users {}..{} with {} packages each in {:.1} s",
        population.start,
        population.start + population.users,
        population.packages,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

async fn seed_sqlite(url: &str, p: Population) -> Result<()> {
    let options = SqliteConnectOptions::from_str(url)?
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal);
    let mut conn = sqlx::SqliteConnection::connect_with(&options).await?;
    // Commit every few thousand users so the WAL stays small; rows per statement stay well
    // under SQLite's bound-parameter limit.
    const USERS_PER_TX: u64 = 5_000;
    const ROWS_PER_STATEMENT: usize = 500;
    let end = p.start + p.users;
    let mut first = p.start;
    while first < end {
        let last = (first + USERS_PER_TX).min(end);
        let mut tx = conn.begin().await?;
        let users: Vec<u64> = (first..last).collect();
        for chunk in users.chunks(ROWS_PER_STATEMENT) {
            let mut q = QueryBuilder::<Sqlite>::new(
                "INSERT INTO users (user_id, fingerprint, fingerprint_updated_at, last_resort, \
                 last_resort_digest, last_resort_fingerprint, last_resort_cipher_suite) ",
            );
            q.push_values(chunk, |mut row, &i| {
                let fp = fingerprint(i);
                let lr = p.last_resort.then(|| package("last", i, 0, p.size));
                row.push_bind(user_id(i))
                    .push_bind(fp.clone())
                    .push_bind(1_700_000_000_i64)
                    .push_bind(lr.as_ref().map(|b| b.to_vec()))
                    .push_bind(lr.as_ref().map(|b| digest(b).to_vec()))
                    .push_bind(if p.last_resort { fp } else { String::new() })
                    // Read as the server would store it: opaque (suite 0), so the server
                    // has nothing to backfill at start.
                    .push_bind(p.last_resort.then_some(0_i64));
            });
            q.build().execute(&mut *tx).await?;
        }
        let rows: Vec<(u64, u32)> = users
            .iter()
            .flat_map(|&i| (0..p.packages).map(move |j| (i, j)))
            .collect();
        for chunk in rows.chunks(ROWS_PER_STATEMENT) {
            let mut q = QueryBuilder::<Sqlite>::new(
                "INSERT INTO key_packages (user_id, digest, data, fingerprint, cipher_suite) ",
            );
            q.push_values(chunk, |mut row, &(i, j)| {
                let data = package("seed", i, u64::from(j), p.size);
                row.push_bind(user_id(i))
                    .push_bind(digest(&data).to_vec())
                    .push_bind(data.to_vec())
                    .push_bind(fingerprint(i))
                    .push_bind(0_i64);
            });
            q.build().execute(&mut *tx).await?;
        }
        tx.commit().await?;
        first = last;
        if (first - p.start) % 100_000 == 0 {
            eprintln!("  {} users seeded", first - p.start);
        }
    }
    sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
        .execute(&mut conn)
        .await?;
    // No ANALYZE: the server never runs it, and with statistics present the bundled SQLite
    // (built with STAT4) re-prepares every statement whose plan may depend on bound values.
    Ok(())
}

/// Package bytes and fingerprints are computed by Postgres itself (`sha256`, `md5`), so the
/// load generator ships no data; each user's packages are numbered 1.. in package order, like
/// uploads, and its next position follows them. The packages are opaque, and stored as the
/// server stores opaque ones (suite 0), so the server has nothing to backfill at start.
const PG_SEED_USERS: &str = "\
INSERT INTO users (user_id, fingerprint, fingerprint_updated_at, last_resort, last_resort_digest,
                   last_resort_fingerprint, next_seq, last_resort_cipher_suite)
SELECT 'u' || i, fp, 1700000000, lr, sha256(lr), CASE WHEN lr IS NULL THEN '' ELSE fp END, $5 + 1,
       CASE WHEN lr IS NULL THEN NULL ELSE 0 END
FROM (
    SELECT i,
           encode(sha256(convert_to('fingerprint:' || i, 'UTF8')), 'hex') AS fp,
           CASE WHEN $3 THEN substring('\\x00010005'::bytea
                || convert_to('last:' || i || ':0:', 'UTF8')
                || decode(repeat(md5('last' || i), ($4 / 16) + 1), 'hex') FROM 1 FOR $4)
           END AS lr
    FROM generate_series($1::bigint, $2::bigint) AS i
) AS s";

const PG_SEED_PACKAGES: &str = "\
INSERT INTO key_packages (user_id, seq, digest, data, fingerprint, cipher_suite)
SELECT 'u' || i, j + 1, sha256(data), data,
       encode(sha256(convert_to('fingerprint:' || i, 'UTF8')), 'hex'), 0
FROM (
    SELECT i, j, substring('\\x00010005'::bytea
                || convert_to('seed:' || i || ':' || j || ':', 'UTF8')
                || decode(repeat(md5(i || ':' || j), ($4 / 16) + 1), 'hex') FROM 1 FOR $4) AS data
    FROM generate_series($1::bigint, $2::bigint) AS i,
         generate_series(0, $3 - 1) AS j
    ORDER BY i, j
) AS s";

async fn seed_postgres(url: &str, p: Population) -> Result<()> {
    let mut conn = sqlx::PgConnection::connect(url).await?;
    const USERS_PER_STATEMENT: u64 = 100_000;
    let end = p.start + p.users;
    let mut first = p.start;
    let size = i32::try_from(p.size.max(64)).context("package size")?;
    while first < end {
        let last = (first + USERS_PER_STATEMENT).min(end);
        let mut tx = conn.begin().await?;
        sqlx::query(PG_SEED_USERS)
            .bind(first as i64)
            .bind(last as i64 - 1)
            .bind(p.last_resort)
            .bind(size)
            .bind(i64::from(p.packages))
            .execute(&mut *tx)
            .await?;
        sqlx::query(PG_SEED_PACKAGES)
            .bind(first as i64)
            .bind(last as i64 - 1)
            .bind(p.packages as i32)
            .bind(size)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        first = last;
        eprintln!("  {} users seeded", first - p.start);
    }
    sqlx::query("VACUUM ANALYZE users")
        .execute(&mut conn)
        .await?;
    sqlx::query("VACUUM ANALYZE key_packages")
        .execute(&mut conn)
        .await?;
    sqlx::query("ANALYZE consume_budgets")
        .execute(&mut conn)
        .await?;
    Ok(())
}

/// Seeds through the HTTP API: each user uploads its packages in one request with its own
/// token, `connections` users at a time.
pub(crate) async fn seed_http(
    addr: SocketAddr,
    secret: &str,
    population: Population,
    connections: usize,
) -> Result<()> {
    let auth = Arc::new(Authenticator::new(
        VerifyingKey::Secret(secret.as_bytes().to_vec()),
        None,
        None,
    ));
    let next = Arc::new(AtomicU64::new(population.start));
    let end = population.start + population.users;
    let started = Instant::now();
    let workers: Vec<_> = (0..connections)
        .map(|_| {
            let (auth, next) = (auth.clone(), next.clone());
            tokio::spawn(async move {
                let stream = tokio::net::TcpStream::connect(addr).await?;
                stream.set_nodelay(true)?;
                let (mut sender, conn) =
                    http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream)).await?;
                tokio::spawn(conn);
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= end {
                        return anyhow::Ok(());
                    }
                    let user = UserId::parse(&user_id(i))?;
                    let token = auth.issue(&user, 3600).map_err(anyhow::Error::msg)?;
                    let mut entries: Vec<KeyPackageEntry> = (0..population.packages)
                        .map(|j| KeyPackageEntry {
                            key_package_data: package("seed", i, u64::from(j), population.size),
                            is_last_resort: false,
                        })
                        .collect();
                    if population.last_resort {
                        entries.push(KeyPackageEntry {
                            key_package_data: package("last", i, 0, population.size),
                            is_last_resort: true,
                        });
                    }
                    let body = UploadKeyPackagesRequest {
                        entries,
                        signing_key_fingerprint: workload::fingerprint(i),
                    }
                    .encode_to_vec();
                    let req = Request::builder()
                        .method(Method::POST)
                        .uri("/api/v1/key-packages")
                        .header(header::HOST, "127.0.0.1")
                        .header(header::AUTHORIZATION, format!("Bearer {token}"))
                        .header(
                            header::CONTENT_TYPE,
                            HeaderValue::from_static("application/x-protobuf"),
                        )
                        .body(Full::new(Bytes::from(body)))?;
                    sender.ready().await?;
                    let response = sender.send_request(req).await?;
                    let status = response.status();
                    response.into_body().collect().await?;
                    if status.as_u16() != 201 {
                        bail!("seeding {}: HTTP {status}", user.as_str());
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.await??;
    }
    eprintln!(
        "seeded {} users over HTTP in {:.1} s",
        population.users,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
