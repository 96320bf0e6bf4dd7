//! The in-process ceiling: the server's own store (so exactly its SQL, driver and pool) called
//! in a tight loop by the same number of tasks, with no HTTP, auth or routing in between.

use std::sync::Arc;

use anyhow::{Context, Result};
use keypackage_server::{
    clock,
    key_package::{Upload, UploadPolicy, UserId},
    rate_limit::Budget,
    store::{self, Claim, ConnectOptions, ConsumeOutcome, KeyPackageStore},
};

use crate::{
    driver::{self, Control, Plan, WorkerStats},
    http::Scenario,
    report::Report,
    workload::{self, Spread},
};

/// Settings of a ceiling run.
pub(crate) struct Ceiling {
    /// Database URL (the same file or database the server uses).
    pub(crate) url: String,
    /// Pool size, as the server's `KPS_DB_MAX_CONNECTIONS`.
    pub(crate) pool: u32,
    /// Consumption budget per minute, as the server's `KPS_CONSUME_LIMIT_PER_MINUTE`.
    pub(crate) budget_per_minute: u32,
    /// Seeded users (consumption targets).
    pub(crate) users: u64,
    /// Writers (uploaders).
    pub(crate) writers: u64,
    /// Size of uploaded packages.
    pub(crate) package_size: usize,
}

/// Runs `scenario` against the store directly.
pub(crate) async fn run(ceiling: Ceiling, scenario: Scenario, plan: Plan) -> Result<Report> {
    let mut options = ConnectOptions::new(ceiling.url.clone());
    options.max_connections = ceiling.pool;
    let store = store::connect(&options).await.context("open the store")?;
    let budget = Budget::per_minute(ceiling.budget_per_minute);
    let seed = rand::random::<u64>();
    let shared = Arc::new(Shared {
        store,
        budget,
        scenario,
        targets: Spread::new(ceiling.users, seed),
        writers: Spread::new(ceiling.writers, seed),
        fingerprints: (0..ceiling.writers).map(workload::fingerprint).collect(),
        size: ceiling.package_size,
        nonce: seed,
    });
    Ok(driver::drive(plan, move |_, control| worker(shared.clone(), control)).await)
}

struct Shared {
    store: Arc<dyn KeyPackageStore>,
    budget: Budget,
    scenario: Scenario,
    targets: Spread,
    writers: Spread,
    fingerprints: Vec<String>,
    size: usize,
    nonce: u64,
}

impl Shared {
    async fn consume(&self, target: u64) -> &'static str {
        let target = UserId::parse(&workload::user_id(target)).expect("valid id");
        match self
            .store
            .consume(&Claim::new(&target, self.budget))
            .await
            .map(|c| c.outcome)
        {
            Ok(ConsumeOutcome::Consumed(_) | ConsumeOutcome::Replayed(_)) => "200",
            Ok(ConsumeOutcome::KeyReused) => "422",
            Ok(ConsumeOutcome::Empty | ConsumeOutcome::Incompatible) => "404",
            Ok(ConsumeOutcome::RateLimited { .. }) => "429",
            Err(_) => "error",
        }
    }

    async fn upload(&self, user: u64, k: u64) -> &'static str {
        let id = UserId::parse(&workload::user_id(user)).expect("valid id");
        let bytes = workload::package("up", self.nonce, k, self.size);
        let now = clock::unix_seconds();
        let upload = Upload::parse(
            [(bytes, false)],
            &self.fingerprints[user as usize],
            u64::try_from(now).unwrap_or(0),
            UploadPolicy::default(),
        )
        .expect("valid upload");
        match self.store.upload(&id, &upload, now).await {
            Ok(_) => "201",
            Err(_) => "error",
        }
    }

    async fn status(&self, user: u64) -> &'static str {
        let id = UserId::parse(&workload::user_id(user)).expect("valid id");
        match self.store.status(&id, clock::unix_seconds()).await {
            Ok(_) => "200",
            Err(_) => "error",
        }
    }
}

async fn worker(shared: Arc<Shared>, control: Arc<Control>) -> WorkerStats {
    let mut stats = WorkerStats::new();
    while let Some(k) = control.next() {
        let started = control.due(k).await;
        let (op, outcome) = match shared.scenario {
            Scenario::Consume => ("consume", shared.consume(shared.targets.at(k)).await),
            Scenario::Upload => ("upload", shared.upload(shared.writers.at(k), k).await),
            Scenario::Status => ("status", shared.status(shared.writers.at(k)).await),
            Scenario::Mixed if k % 2 == 0 => {
                ("consume", shared.consume(shared.writers.at(k / 2)).await)
            }
            Scenario::Mixed => ("upload", shared.upload(shared.writers.at(k / 2), k).await),
            Scenario::Healthz => (
                "ping",
                shared.store.ping().await.map_or("error", |()| "200"),
            ),
        };
        if control.recording() {
            stats
                .entry(op)
                .or_default()
                .record(started.elapsed(), outcome);
        }
    }
    stats
}
