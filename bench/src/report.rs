//! Latency histograms and outcome counts per operation, merged across workers and printed
//! both for people and as one `RESULT` line per operation for scripts.

use std::{collections::BTreeMap, fmt::Write as _, time::Duration};

use hdrhistogram::Histogram;

/// What one kind of operation did during the measured window.
#[derive(Clone)]
pub(crate) struct OpStats {
    /// Latency in microseconds.
    pub(crate) latency: Histogram<u64>,
    /// Outcomes by name (HTTP status, or `io`/`timeout` for transport failures).
    pub(crate) outcomes: BTreeMap<String, u64>,
}

impl Default for OpStats {
    fn default() -> Self {
        Self {
            // 1 µs … 60 s at 3 significant figures.
            latency: Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds"),
            outcomes: BTreeMap::new(),
        }
    }
}

impl OpStats {
    /// Records one finished operation.
    pub(crate) fn record(&mut self, latency: Duration, outcome: &str) {
        let micros = (latency.as_micros() as u64).clamp(1, 60_000_000);
        self.latency.saturating_record(micros);
        match self.outcomes.get_mut(outcome) {
            Some(n) => *n += 1,
            None => {
                self.outcomes.insert(outcome.to_owned(), 1);
            }
        }
    }

    /// Folds another worker's numbers into these.
    pub(crate) fn merge(&mut self, other: &Self) {
        let _ = self.latency.add(&other.latency);
        for (k, v) in &other.outcomes {
            *self.outcomes.entry(k.clone()).or_default() += v;
        }
    }

    /// Operations recorded.
    pub(crate) fn count(&self) -> u64 {
        self.latency.len()
    }

    /// Operations whose outcome is not in `ok`.
    pub(crate) fn errors(&self, ok: &[&str]) -> u64 {
        self.outcomes
            .iter()
            .filter(|(k, _)| !ok.contains(&k.as_str()))
            .map(|(_, v)| v)
            .sum()
    }

    fn quantile_ms(&self, q: f64) -> f64 {
        self.latency.value_at_quantile(q) as f64 / 1000.0
    }
}

/// CPU and memory observed over the measured window.
#[derive(Clone, Debug, Default)]
pub(crate) struct Costs {
    /// CPU used by the server process, if its pid was given.
    pub(crate) server_cpu: Option<Duration>,
    /// CPU used by the database processes, if their name was given.
    pub(crate) db_cpu: Option<Duration>,
    /// CPU used by this load generator.
    pub(crate) client_cpu: Duration,
    /// Server RSS before the load started, and its peak and last value during it.
    pub(crate) rss: Option<(u64, u64, u64)>,
}

/// Everything one run measured.
pub(crate) struct Report {
    /// Free-form label printed with every result line.
    pub(crate) label: String,
    /// Scenario name.
    pub(crate) scenario: String,
    /// Concurrent connections or tasks.
    pub(crate) connections: usize,
    /// Length of the measured window.
    pub(crate) elapsed: Duration,
    /// Per operation kind.
    pub(crate) ops: BTreeMap<&'static str, OpStats>,
    /// What the window cost.
    pub(crate) costs: Costs,
    /// Outcomes that count as success.
    pub(crate) ok: Vec<&'static str>,
}

impl Report {
    /// Prints the human-readable table and the `RESULT` lines.
    pub(crate) fn print(&self) {
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        let total: u64 = self.ops.values().map(OpStats::count).sum();
        let mut out = String::new();
        let _ = writeln!(
            out,
            "== {} {} | {} connections | {:.1} s measured | {} operations, {:.0}/s",
            self.label,
            self.scenario,
            self.connections,
            secs,
            total,
            total as f64 / secs
        );
        let per_request = |cpu: Duration| cpu.as_secs_f64() * 1e6 / (total.max(1) as f64);
        let mut costs = String::new();
        if let Some(cpu) = self.costs.server_cpu {
            let _ = write!(
                costs,
                " server_cpu_us={:.1} server_cores={:.2}",
                per_request(cpu),
                cpu.as_secs_f64() / secs
            );
        }
        if let Some(cpu) = self.costs.db_cpu {
            let _ = write!(
                costs,
                " db_cpu_us={:.1} db_cores={:.2}",
                per_request(cpu),
                cpu.as_secs_f64() / secs
            );
        }
        let _ = write!(
            costs,
            " client_cpu_us={:.1} client_cores={:.2}",
            per_request(self.costs.client_cpu),
            self.costs.client_cpu.as_secs_f64() / secs
        );
        if let Some((idle, peak, last)) = self.costs.rss {
            let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
            let _ = write!(
                costs,
                " rss_idle_mib={:.1} rss_peak_mib={:.1} rss_end_mib={:.1}",
                mib(idle),
                mib(peak),
                mib(last)
            );
        }
        for (name, op) in &self.ops {
            let outcomes: Vec<String> = op
                .outcomes
                .iter()
                .map(|(k, v)| format!("{k}:{v}"))
                .collect();
            let _ = writeln!(
                out,
                "   {name:<8} {:>9.0}/s  p50 {:>7.2} ms  p99 {:>7.2} ms  p999 {:>7.2} ms  max {:>8.2} ms  [{}]",
                op.count() as f64 / secs,
                op.quantile_ms(0.5),
                op.quantile_ms(0.99),
                op.quantile_ms(0.999),
                op.latency.max() as f64 / 1000.0,
                outcomes.join(" ")
            );
        }
        let _ = writeln!(out, "   costs per operation:{costs}");
        for (name, op) in &self.ops {
            let outcomes: Vec<String> = op
                .outcomes
                .iter()
                .map(|(k, v)| format!("{k}:{v}"))
                .collect();
            let _ = writeln!(
                out,
                "RESULT label={} scenario={} op={name} conns={} rps={:.1} p50_ms={:.3} p99_ms={:.3} p999_ms={:.3} max_ms={:.3} count={} errors={} outcomes={}{costs}",
                self.label,
                self.scenario,
                self.connections,
                op.count() as f64 / secs,
                op.quantile_ms(0.5),
                op.quantile_ms(0.99),
                op.quantile_ms(0.999),
                op.latency.max() as f64 / 1000.0,
                op.count(),
                op.errors(&self.ok),
                outcomes.join(",")
            );
        }
        let _ = writeln!(
            out,
            "RESULT label={} scenario={} op=all conns={} rps={:.1} count={total}{costs}",
            self.label,
            self.scenario,
            self.connections,
            total as f64 / secs
        );
        // The report is this program's output.
        #[allow(clippy::print_stdout)]
        {
            print!("{out}");
        }
    }
}
