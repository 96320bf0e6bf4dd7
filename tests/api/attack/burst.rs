//! A burst of ten thousand distinct targets: every one answered, no limiter state left behind.

use std::{
    collections::HashSet,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use keypackage_server::{app::Limits, rate_limit::Budget};

use crate::harness::*;

#[tokio::test]
async fn ten_thousand_distinct_targets_in_a_burst_are_answered_and_leave_no_limiter_state() {
    const TARGETS: usize = 10_000;
    const CONCURRENCY: usize = 64;
    // A budget whose one-request debt refills within a millisecond, so that every bucket is
    // stale right after the burst and pruning must forget it (as the unit test of the limiter
    // does). The burst gives a 1 s window: with a 10 ms one, a target asked twice at once could
    // be refused when the request stamped later reaches the database first.
    let app = spawn_app_with(AppOptions {
        limits: Limits {
            budget: Budget {
                burst: 1000,
                interval: Duration::from_millis(1),
            },
            ..v1_limits()
        },
        ..AppOptions::default()
    })
    .await;
    app.upload("bob", &[(kp("bob-lr"), true)], "").await;

    let mut targets = HashSet::new();
    while targets.len() < TARGETS {
        targets.insert(format!("t{:016x}", rand::random::<u64>()));
    }
    // Every tenth target is asked again under a percent-encoded alias: the same bucket.
    let mut paths: Vec<(String, u16)> = Vec::new();
    for (i, target) in targets.iter().enumerate() {
        paths.push((target.clone(), 404));
        if i % 10 == 0 {
            paths.push((format!("%74{}", &target[1..]), 404));
        }
        if i % 100 == 0 {
            paths.push(("bob".into(), 200));
            paths.push((format!("{target}%00"), 400));
        }
    }
    let paths = Arc::new(paths);
    let next = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let slowest = Arc::new(Mutex::new(Duration::ZERO));
    let caller = token("alice");
    let mut workers = Vec::new();
    for _ in 0..CONCURRENCY {
        let (paths, next, failures, slowest) = (
            paths.clone(),
            next.clone(),
            failures.clone(),
            slowest.clone(),
        );
        let (client, base, caller) = (app.client.clone(), app.base.clone(), caller.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((target, expected)) = paths.get(i) else {
                    return;
                };
                let started = Instant::now();
                let response = client
                    .get(format!("{base}/api/v1/key-packages/{target}"))
                    .bearer_auth(&caller)
                    .timeout(Duration::from_secs(30))
                    .send()
                    .await;
                let elapsed = started.elapsed();
                {
                    let mut slowest = slowest.lock().unwrap();
                    *slowest = (*slowest).max(elapsed);
                }
                let status = response.as_ref().map(|r| r.status().as_u16());
                if status.as_ref().ok() != Some(expected) {
                    failures
                        .lock()
                        .unwrap()
                        .push(format!("{target}: {status:?}, expected {expected}"));
                }
            }
        }));
    }
    for worker in workers {
        worker.await.unwrap();
    }
    let failures = std::mem::take(&mut *failures.lock().unwrap());
    assert!(
        failures.is_empty(),
        "{} failures, first: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    let slowest = *slowest.lock().unwrap();
    assert!(
        slowest < Duration::from_secs(5),
        "a request took {slowest:?}"
    );

    // No more buckets than distinct valid targets (aliases share one, invalid ids make none),
    let limiter = app.state.limiter.targets();
    assert!(limiter.len() <= TARGETS + 1, "{} buckets", limiter.len());
    // and once they have refilled, pruning forgets them all.
    let deadline = Instant::now() + PATIENCE;
    loop {
        app.state.limiter.prune();
        if limiter.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} buckets left after pruning",
            limiter.len()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        app.consume("carol", "bob").await.key_package_data.to_vec(),
        kp("bob-lr")
    );
}
