//! The closed-loop driver shared by HTTP runs and in-process ceiling runs: N workers issue
//! operations back to back; after a warm-up the driver opens a measured window, snapshots the
//! CPU time of the watched processes at both ends, and stops at the deadline or request cap.

use std::{
    collections::BTreeMap,
    future::Future,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use crate::{
    procfs::{self, CpuSnapshot},
    report::{Costs, OpStats, Report},
};

/// Shared by the driver and its workers.
pub(crate) struct Control {
    recording: AtomicBool,
    stop: AtomicBool,
    issued: AtomicU64,
    max_requests: u64,
    /// With a target rate: when operation `k` is due (`origin + k / rate`).
    pacing: Option<(Instant, f64)>,
}

impl Control {
    /// The number of the next operation, or `None` once the run is over.
    pub(crate) fn next(&self) -> Option<u64> {
        if self.stop.load(Ordering::Relaxed) {
            return None;
        }
        let k = self.issued.fetch_add(1, Ordering::Relaxed);
        if k >= self.max_requests {
            self.stop.store(true, Ordering::Relaxed);
            return None;
        }
        Some(k)
    }

    /// Waits until operation `k` is due and returns the time it was due, from which its latency
    /// counts (so a late start is charged to the server: no coordinated omission); without a
    /// target rate, returns now.
    pub(crate) async fn due(&self, k: u64) -> Instant {
        match self.pacing {
            Some((origin, rate)) => {
                let due = origin + Duration::from_secs_f64(k as f64 / rate);
                tokio::time::sleep_until(due.into()).await;
                due
            }
            None => Instant::now(),
        }
    }

    /// Whether an operation finishing now falls in the measured window.
    pub(crate) fn recording(&self) -> bool {
        self.recording.load(Ordering::Relaxed)
    }
}

/// Per-worker results: statistics by operation name.
pub(crate) type WorkerStats = BTreeMap<&'static str, OpStats>;

/// How long and how hard to run, and what to watch.
#[derive(Clone, Debug)]
pub(crate) struct Plan {
    /// Printed with every result line.
    pub(crate) label: String,
    /// Scenario name.
    pub(crate) scenario: String,
    /// Concurrent workers.
    pub(crate) connections: usize,
    /// Unmeasured time before the window opens.
    pub(crate) warmup: Duration,
    /// Length of the measured window (at most).
    pub(crate) duration: Duration,
    /// Operations issued in all, warm-up included (at most).
    pub(crate) max_requests: u64,
    /// Operations per second to issue in all (open loop, spread over the connections); `None`
    /// issues each connection's next operation as soon as the previous one answers.
    pub(crate) rate: Option<f64>,
    /// The server's pid: its CPU time and RSS are reported.
    pub(crate) server_pid: Option<u32>,
    /// Command name of the database's processes (`postgres`): their CPU time is reported.
    pub(crate) db_comm: Option<String>,
    /// Only count the backends of this database (and the shared helper processes).
    pub(crate) db_name: Option<String>,
    /// Outcomes that count as success.
    pub(crate) ok: Vec<&'static str>,
}

/// Runs `connections` workers made by `worker` under `plan` and reports the measured window.
pub(crate) async fn drive<W, F>(plan: Plan, worker: W) -> Report
where
    W: Fn(usize, Arc<Control>) -> F,
    F: Future<Output = WorkerStats> + Send + 'static,
{
    let control = Arc::new(Control {
        recording: AtomicBool::new(false),
        stop: AtomicBool::new(false),
        issued: AtomicU64::new(0),
        max_requests: plan.max_requests,
        pacing: plan.rate.map(|r| (Instant::now(), r)),
    });
    let rss_idle = plan.server_pid.and_then(procfs::rss_bytes);
    let rss_peak = Arc::new(AtomicU64::new(rss_idle.unwrap_or(0)));
    let sampler = plan.server_pid.map(|pid| {
        let peak = rss_peak.clone();
        let control = control.clone();
        tokio::spawn(async move {
            let mut last = 0;
            while !control.stop.load(Ordering::Relaxed) {
                if let Some(rss) = procfs::rss_bytes(pid) {
                    peak.fetch_max(rss, Ordering::Relaxed);
                    last = rss;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            last
        })
    });
    let handles: Vec<_> = (0..plan.connections)
        .map(|i| tokio::spawn(worker(i, control.clone())))
        .collect();

    wait_until(&control, Instant::now() + plan.warmup).await;
    let server_pids: Vec<u32> = plan.server_pid.into_iter().collect();
    let db_pids = plan
        .db_comm
        .as_deref()
        .map(|comm| procfs::database_pids(comm, plan.db_name.as_deref()))
        .unwrap_or_default();
    let server_before = CpuSnapshot::take(&server_pids);
    let db_before = CpuSnapshot::take(&db_pids);
    let client_before = procfs::own_cpu_time();
    let started = Instant::now();
    control.recording.store(true, Ordering::Relaxed);

    wait_until(&control, started + plan.duration).await;
    control.recording.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed();
    let client_cpu = procfs::own_cpu_time().saturating_sub(client_before);
    let server_cpu = CpuSnapshot::take(&server_pids).since(&server_before);
    let db_cpu = CpuSnapshot::take(&db_pids).since(&db_before);
    control.stop.store(true, Ordering::Relaxed);

    let mut ops: BTreeMap<&'static str, OpStats> = BTreeMap::new();
    for handle in handles {
        if let Ok(stats) = handle.await {
            for (name, s) in stats {
                ops.entry(name).or_default().merge(&s);
            }
        }
    }
    let rss_last = match sampler {
        Some(s) => s.await.ok(),
        None => None,
    };
    Report {
        label: plan.label,
        scenario: plan.scenario,
        connections: plan.connections,
        elapsed,
        ops,
        costs: Costs {
            server_cpu: plan.server_pid.map(|_| server_cpu),
            db_cpu: plan.db_comm.as_ref().map(|_| db_cpu),
            client_cpu,
            rss: rss_idle.map(|idle| {
                let peak = rss_peak.load(Ordering::Relaxed);
                (idle, peak, rss_last.unwrap_or(peak))
            }),
        },
        ok: plan.ok,
    }
}

/// Sleeps until `deadline` or until the workers have run out of requests.
async fn wait_until(control: &Control, deadline: Instant) {
    loop {
        let now = Instant::now();
        if now >= deadline || control.stop.load(Ordering::Relaxed) {
            return;
        }
        tokio::time::sleep((deadline - now).min(Duration::from_millis(20))).await;
    }
}
