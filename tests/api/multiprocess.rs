//! Two server processes on one Postgres database: every package is handed out once, whichever
//! process serves the request, and the consumption budget is one budget, not one per process.

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use tokio::{task::JoinSet, time::Instant};

use crate::harness::*;

/// A test package as text, for failure messages.
fn readable(package: &[u8]) -> String {
    String::from_utf8_lossy(&package[4..]).into_owned()
}

/// Starts two servers on `db` at the same time (so both apply migrations at once).
async fn start_pair(db: &TestDb, dir: &TempDir, extra: &[(&str, &str)]) -> [ServerProcess; 2] {
    let mut settings = vec![("KPS_DB_MAX_CONNECTIONS", "8")];
    settings.extend_from_slice(extra);
    let (a, b) = tokio::join!(
        ServerProcess::start_on(db, dir, &settings),
        ServerProcess::start_on(db, dir, &settings)
    );
    [a, b]
}

/// One consume request's answer: status, body bytes (if 200) and whether it was last-resort.
struct Answer {
    status: u16,
    package: Option<(Vec<u8>, bool)>,
    retry_after: Option<String>,
}

/// Consumes one of `target`'s packages as `caller` through `server`.
async fn consume(base: String, client: reqwest::Client, caller: String, target: String) -> Answer {
    use prost::Message;
    let response = client
        .get(format!("{base}/api/v1/key-packages/{target}"))
        .bearer_auth(crate::harness::token(&caller))
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .expect("consume request");
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = response.bytes().await.expect("body");
    let package = (status == 200).then(|| {
        let message = keypackage_server::wire::KeyPackageResponse::decode(body).expect("decodes");
        (message.key_package_data.to_vec(), message.is_last_resort)
    });
    Answer {
        status,
        package,
        retry_after,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_hand_out_every_package_exactly_once() {
    const USERS: usize = 12;
    const EXTRA: usize = 3;
    let Some(db) = postgres_only!() else {
        return;
    };
    let dir = TempDir::new();
    let servers = start_pair(&db, &dir, &[("KPS_CONSUME_LIMIT_PER_MINUTE", "1000000")]).await;

    let mut uploaded = HashSet::new();
    for u in 0..USERS {
        let user = format!("user{u}");
        let mut entries: Vec<_> = (0..10)
            .map(|i| (kp(&format!("{user}-regular-{i}")), false))
            .collect();
        entries.push((kp(&format!("{user}-last-resort")), true));
        uploaded.extend(entries[..10].iter().map(|(data, _)| data.clone()));
        let status = servers[u % 2].upload(&user, &entries, "").await;
        assert_eq!(status.regular_count, 10);
    }

    // Every regular package plus EXTRA more per user, all at once, alternating processes.
    let mut requests = JoinSet::new();
    for round in 0..10 + EXTRA {
        for u in 0..USERS {
            let server = &servers[(round + u) % 2];
            requests.spawn(consume(
                server.base.clone(),
                server.client.clone(),
                format!("caller{round}"),
                format!("user{u}"),
            ));
        }
    }
    let mut handed_out = Vec::new();
    let mut last_resort = 0;
    while let Some(answer) = requests.join_next().await {
        let answer = answer.expect("request task");
        assert_eq!(answer.status, 200, "every request gets a package");
        match answer.package.expect("a package") {
            (_, true) => last_resort += 1,
            (data, false) => handed_out.push(data),
        }
    }
    let distinct: HashSet<_> = handed_out.iter().cloned().collect();
    assert_eq!(
        distinct.len(),
        handed_out.len(),
        "a package was handed out twice"
    );
    let mut missing: Vec<_> = uploaded
        .difference(&distinct)
        .map(|p| readable(p))
        .collect();
    missing.sort();
    assert!(
        missing.is_empty(),
        "every regular package is handed out before any last-resort one; never handed out: \
         {missing:?}"
    );
    assert_eq!(
        last_resort,
        USERS * EXTRA,
        "the rest got the last-resort package"
    );
    for u in 0..USERS {
        let status = servers[u % 2].status(&format!("user{u}")).await;
        assert_eq!(status.regular_count, 0);
        assert!(status.has_last_resort);
        assert_eq!(
            status.last_resort_handouts, EXTRA as u64,
            "user{u}: hand-outs counted once each"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consumption_budget_is_shared_by_both_processes() {
    const REQUESTS: usize = 30;
    const BUDGET: usize = 10;
    let Some(db) = postgres_only!() else {
        return;
    };
    let dir = TempDir::new();
    // The default budget: 10 at once, one more every 6 s.
    let servers = start_pair(&db, &dir, &[]).await;
    let mut entries: Vec<_> = (0..10).map(|i| (kp(&format!("bob-{i}")), false)).collect();
    entries.push((kp("bob-last-resort"), true));
    servers[0].upload("bob", &entries, "").await;

    let started = Instant::now();
    let mut requests = JoinSet::new();
    for i in 0..REQUESTS {
        let server = &servers[i % 2];
        requests.spawn(consume(
            server.base.clone(),
            server.client.clone(),
            format!("caller{i}"),
            "bob".into(),
        ));
    }
    let mut granted = Vec::new();
    let mut statuses: HashMap<u16, usize> = HashMap::new();
    while let Some(answer) = requests.join_next().await {
        let answer = answer.expect("request task");
        *statuses.entry(answer.status).or_default() += 1;
        match answer.status {
            429 => {
                let wait: u64 = answer
                    .retry_after
                    .as_deref()
                    .and_then(|v| v.parse().ok())
                    .expect("429 carries Retry-After in whole seconds");
                assert!(wait >= 1);
            }
            200 => granted.push(answer.package.expect("a package")),
            other => panic!("unexpected status {other}"),
        }
    }
    // The bucket refills one request per 6 s; a burst slower than that may earn one more each.
    let refills = (started.elapsed().as_secs() / 6) as usize;
    assert!(
        granted.len() >= BUDGET && granted.len() <= BUDGET + refills,
        "{} of {REQUESTS} requests passed over both processes ({statuses:?}); the shared \
         budget allows {BUDGET} (+{refills} refilled), each process's own limiter would allow 20",
        granted.len()
    );
    let distinct: HashSet<_> = granted.iter().filter(|(_, lr)| !lr).collect();
    assert_eq!(
        distinct.len(),
        granted.iter().filter(|(_, lr)| !lr).count(),
        "a package was handed out twice"
    );
}
