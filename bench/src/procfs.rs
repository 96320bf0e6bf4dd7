//! Reading other processes' CPU time and memory from `/proc`, so a run can report what each
//! request cost the server (and the database) rather than only how long it took.

use std::{fs, sync::OnceLock, time::Duration};

/// Clock ticks per second of `/proc/<pid>/stat` times (`getconf CLK_TCK`, 100 on Linux/x86).
fn ticks_per_second() -> u64 {
    static TICKS: OnceLock<u64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .filter(|&t| t > 0)
            .unwrap_or(100)
    })
}

/// User plus system CPU time a process has used so far; `None` when it is gone.
pub(crate) fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces; the fields after the last ')' are fixed.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state), so utime (14) and stime (15) are at 11 and 12.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let ticks = ticks_per_second();
    Some(Duration::from_micros((utime + stime) * 1_000_000 / ticks))
}

/// CPU time of this process.
pub(crate) fn own_cpu_time() -> Duration {
    cpu_time(std::process::id()).unwrap_or_default()
}

/// Resident set size in bytes.
pub(crate) fn rss_bytes(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The database's processes: those whose command name is `comm` (e.g. `postgres`) and, when
/// `database` is given, either serve that database (a backend's title names it) or serve no
/// client at all (the WAL writer, checkpointer and other shared helpers), so that backends of
/// other databases on the same server are not counted.
pub(crate) fn database_pids(comm: &str, database: Option<&str>) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim_end() == comm)
        })
        .filter(|pid| {
            let Some(database) = database else {
                return true;
            };
            let title = fs::read(format!("/proc/{pid}/cmdline"))
                .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
                .unwrap_or_default();
            let is_backend = title.contains('(') || title.contains("[local]");
            title.split_whitespace().any(|w| w == database) || !is_backend
        })
        .collect()
}

/// CPU time of a set of processes, remembered per pid so that a later reading can be
/// compared with this one over the processes present both times.
#[derive(Clone, Debug, Default)]
pub(crate) struct CpuSnapshot(Vec<(u32, Duration)>);

impl CpuSnapshot {
    /// Reads the CPU time of each pid that still exists.
    pub(crate) fn take(pids: &[u32]) -> Self {
        Self(
            pids.iter()
                .filter_map(|&p| Some((p, cpu_time(p)?)))
                .collect(),
        )
    }

    /// CPU used since `earlier` by the processes present in both snapshots.
    pub(crate) fn since(&self, earlier: &Self) -> Duration {
        self.0
            .iter()
            .filter_map(|(pid, now)| {
                let (_, then) = earlier.0.iter().find(|(p, _)| p == pid)?;
                Some(now.saturating_sub(*then))
            })
            .sum()
    }
}

/// CPU used by a changing set of processes, sampled repeatedly: processes present at the start
/// count from their baseline, later ones from zero, and each keeps its last sampled value after
/// it exits.
#[derive(Debug)]
pub(crate) struct CpuUsage {
    baseline: CpuSnapshot,
    last: Vec<(u32, Duration)>,
}

impl CpuUsage {
    /// Starts counting from `baseline`.
    pub(crate) fn new(baseline: CpuSnapshot) -> Self {
        Self {
            baseline,
            last: Vec::new(),
        }
    }

    /// Records the current CPU time of `pids`.
    pub(crate) fn sample(&mut self, pids: &[u32]) {
        for &pid in pids {
            let Some(now) = cpu_time(pid) else { continue };
            match self.last.iter_mut().find(|(p, _)| *p == pid) {
                Some((_, t)) => *t = now,
                None => self.last.push((pid, now)),
            }
        }
    }

    /// CPU used since the baseline.
    pub(crate) fn total(&self) -> Duration {
        self.last
            .iter()
            .map(|(pid, now)| {
                let base = self
                    .baseline
                    .0
                    .iter()
                    .find(|(p, _)| p == pid)
                    .map_or(Duration::ZERO, |(_, t)| *t);
                now.saturating_sub(base)
            })
            .sum()
    }
}
