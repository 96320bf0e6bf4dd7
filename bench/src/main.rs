//! `kps-bench`: seeds users and key packages, drives a running keypackage-server over HTTP with
//! many keep-alive connections, and runs the server's own store in-process as the ceiling.
//!
//! Every run reports requests/s, p50/p99/p999 latency, outcomes by status, and the CPU time per
//! request of the server (`--server-pid`), the database (`--db-comm postgres`) and itself.

use std::{sync::Arc, time::Duration};

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use hyper::header::HeaderValue;

mod ceiling;
mod driver;
mod http;
mod pgbench;
mod procfs;
mod reader;
mod report;
mod seed;
mod workload;

use http::Scenario;

/// Load generator for keypackage-server.
#[derive(Debug, Parser)]
#[command(name = "kps-bench", version, about)]
struct Cli {
    /// Runtime worker threads of the load generator.
    #[arg(long, default_value_t = 2, global = true)]
    threads: usize,
    /// What the key packages seeded and uploaded are.
    #[arg(long, value_enum, default_value_t, global = true)]
    package_kind: workload::Packages,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create users and their key packages, directly in the database or over HTTP.
    Seed(SeedArgs),
    /// Drive a running server over HTTP with one scenario.
    Run {
        /// What to send.
        #[arg(value_enum)]
        scenario: Scenario,
        /// The server, on a loopback address.
        #[arg(long, env = "KPS_BENCH_URL", default_value = "http://127.0.0.1:8080")]
        url: String,
        /// The server's HS256 secret (`KPS_JWT_SECRET`); tokens are signed before the run.
        #[arg(long, env = "KPS_JWT_SECRET", hide_env_values = true)]
        secret: String,
        /// Per-request timeout in seconds.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
        #[command(flatten)]
        load: LoadArgs,
    },
    /// The ceiling: the server's own store called in a tight loop in-process, same SQL, same
    /// pool, same concurrency, no HTTP.
    #[command(alias = "sqlite-ceiling")]
    Ceiling {
        /// What to do.
        #[arg(value_enum)]
        scenario: Scenario,
        /// The database the server uses.
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        database_url: String,
        /// Pool size, as the server's KPS_DB_MAX_CONNECTIONS.
        #[arg(long, env = "KPS_DB_MAX_CONNECTIONS", default_value_t = 16)]
        pool: u32,
        /// Budget per target, as the server's KPS_CONSUME_LIMIT_PER_MINUTE.
        #[arg(long, env = "KPS_CONSUME_LIMIT_PER_MINUTE", default_value_t = 10)]
        budget_per_minute: u32,
        #[command(flatten)]
        load: LoadArgs,
    },
    /// Write pgbench scripts with exactly the SQL of the Postgres store.
    PgbenchScripts(PgbenchArgs),
    /// Time the RFC 9420 key-package reader on a typical openmls package and a 16 KiB one.
    Reader {
        /// Reads per timed round (the best of five rounds is reported).
        #[arg(long, default_value_t = 20_000)]
        iterations: u32,
    },
    /// Run a command (e.g. pgbench) and print the CPU time the database used meanwhile.
    Cpu {
        /// Command name of the database processes.
        #[arg(long, default_value = "postgres")]
        db_comm: String,
        /// Count only the backends of this database (plus shared helper processes).
        #[arg(long)]
        db_name: Option<String>,
        /// The command and its arguments.
        #[arg(trailing_var_arg = true, required = true)]
        command: Vec<String>,
    },
}

/// Where the pgbench scripts come from and go.
#[derive(Debug, Args)]
struct PgbenchArgs {
    /// Directory to write consume.sql, upload.sql and mixed.sql into.
    #[arg(long)]
    out: std::path::PathBuf,
    /// Bytes per uploaded package.
    #[arg(long, default_value_t = 256)]
    size: usize,
}

#[derive(Debug, Args)]
struct SeedArgs {
    /// Seed straight into this database (schema created by the server's migrations).
    #[arg(
        long,
        env = "DATABASE_URL",
        hide_env_values = true,
        conflicts_with = "url"
    )]
    database_url: Option<String>,
    /// Seed through this server's HTTP API instead.
    #[arg(long)]
    url: Option<String>,
    /// The server's HS256 secret, for seeding over HTTP.
    #[arg(long, env = "KPS_JWT_SECRET", hide_env_values = true)]
    secret: Option<String>,
    /// Users to create.
    #[arg(long, default_value_t = 100_000)]
    users: u64,
    /// Index of the first user (to grow an existing population).
    #[arg(long, default_value_t = 0)]
    start: u64,
    /// Regular packages per user.
    #[arg(long, default_value_t = 10)]
    packages: u32,
    /// Bytes per package (a real KeyPackage with X25519/Ed25519 is about 300).
    #[arg(long, default_value_t = 256)]
    size: usize,
    /// Give users no last-resort package.
    #[arg(long)]
    no_last_resort: bool,
    /// Concurrent uploads when seeding over HTTP.
    #[arg(long, default_value_t = 16)]
    connections: usize,
}

#[derive(Debug, Args)]
struct LoadArgs {
    /// Concurrent connections (HTTP) or tasks (ceiling).
    #[arg(long, short = 'c', default_value_t = 16)]
    connections: usize,
    /// Measured seconds.
    #[arg(long, short = 'd', default_value_t = 20.0)]
    duration: f64,
    /// Unmeasured seconds before the measurement.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Cap on requests issued, warm-up included.
    #[arg(long, default_value_t = 5_000_000)]
    max_requests: u64,
    /// Issue this many requests per second in all (open loop; latency counts from when each
    /// request was due). Default: closed loop, each connection as fast as it is answered.
    #[arg(long)]
    rate: Option<f64>,
    /// Seeded users; consumption targets are scattered over all of them.
    #[arg(long, default_value_t = 100_000)]
    users: u64,
    /// Users that upload and ask for their status (and the targets of `mixed`); at most
    /// `--users`, default min(users, 100000). Each needs a pre-signed token.
    #[arg(long)]
    writers: Option<u64>,
    /// Bytes per uploaded package.
    #[arg(long, default_value_t = 256)]
    size: usize,
    /// Label printed with the results.
    #[arg(long, default_value = "run")]
    label: String,
    /// Pid of the server: its CPU time per request and its RSS are reported.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Command name of the database processes (e.g. `postgres`): their CPU time is reported.
    #[arg(long)]
    db_comm: Option<String>,
    /// With `--db-comm postgres`: count only the backends of this database (plus the shared
    /// WAL writer, checkpointer, ...), not those of other databases on the same server.
    #[arg(long)]
    db_name: Option<String>,
}

impl LoadArgs {
    fn writers(&self) -> u64 {
        self.writers.unwrap_or(100_000).clamp(1, self.users.max(1))
    }

    fn plan(&self, scenario: Scenario) -> Plan {
        Plan {
            label: self.label.clone(),
            scenario: scenario.name().into(),
            connections: self.connections.clamp(1, 4096),
            warmup: Duration::from_secs_f64(self.warmup.clamp(0.0, 600.0)),
            duration: Duration::from_secs_f64(self.duration.clamp(0.1, 3600.0)),
            max_requests: self.max_requests.min(100_000_000),
            rate: self.rate.filter(|r| *r > 0.0),
            server_pid: self.server_pid,
            db_comm: self.db_comm.clone(),
            db_name: self.db_name.clone(),
            ok: vec!["200", "201", "204"],
        }
    }
}

use driver::Plan;

fn main() -> Result<()> {
    let cli = Cli::parse();
    workload::use_packages(cli.package_kind);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.threads.max(1))
        .enable_all()
        .build()?;
    runtime.block_on(run(cli.command))
}

async fn run(command: Command) -> Result<()> {
    match command {
        Command::Seed(args) => {
            let population = seed::Population {
                start: args.start,
                users: args.users,
                packages: args.packages,
                last_resort: !args.no_last_resort,
                size: args.size,
            };
            match (&args.database_url, &args.url) {
                (_, Some(url)) => {
                    let secret = args
                        .secret
                        .as_deref()
                        .context("--secret is needed over HTTP")?;
                    seed::seed_http(
                        http::loopback_addr(url)?,
                        secret,
                        population,
                        args.connections,
                    )
                    .await
                }
                (Some(db), None) => seed::seed_sql(db, population).await,
                (None, None) => anyhow::bail!("give --database-url or --url"),
            }
        }
        Command::Run {
            scenario,
            url,
            secret,
            timeout,
            load,
        } => {
            let addr = http::loopback_addr(&url)?;
            let writers = load.writers();
            let signing = std::time::Instant::now();
            let tokens = workload::bearer_tokens(&secret, writers, 6 * 3600)?;
            eprintln!(
                "signed {} tokens in {:.2} s",
                tokens.len(),
                signing.elapsed().as_secs_f64()
            );
            let seed = rand::random::<u64>();
            let workload = Arc::new(http::Workload {
                scenario,
                targets: workload::Spread::new(load.users, seed),
                writers: workload::Spread::new(writers, seed),
                tokens,
                fingerprints: (0..writers).map(workload::fingerprint).collect(),
                package_size: load.size,
                nonce: seed,
                host: HeaderValue::from_str(&addr.to_string())?,
            });
            let timeout = Duration::from_secs(timeout.max(1));
            let report = driver::drive(load.plan(scenario), move |_, control| {
                http::worker(addr, workload.clone(), control, timeout)
            })
            .await;
            report.print();
            Ok(())
        }
        Command::Cpu {
            db_comm,
            db_name,
            command,
        } => {
            let started = std::time::Instant::now();
            let mut child = tokio::process::Command::new(&command[0])
                .args(&command[1..])
                .spawn()?;
            // Backends come and go with the command's connections: sample every 100 ms and
            // count each process from its first sighting (from zero if it started meanwhile).
            let baseline =
                procfs::CpuSnapshot::take(&procfs::database_pids(&db_comm, db_name.as_deref()));
            let mut usage = procfs::CpuUsage::new(baseline);
            let status = loop {
                tokio::select! {
                    status = child.wait() => break status?,
                    () = tokio::time::sleep(Duration::from_millis(100)) => {
                        usage.sample(&procfs::database_pids(&db_comm, db_name.as_deref()));
                    }
                }
            };
            #[allow(clippy::print_stdout)]
            {
                println!(
                    "CPU db_cpu_s={:.3} wall_s={:.3} status={}",
                    usage.total().as_secs_f64(),
                    started.elapsed().as_secs_f64(),
                    status.code().unwrap_or(-1)
                );
            }
            anyhow::ensure!(status.success(), "{} failed", command[0]);
            Ok(())
        }
        Command::Reader { iterations } => reader::run(iterations),
        Command::PgbenchScripts(args) => pgbench::write_scripts(&args.out, args.size),
        Command::Ceiling {
            scenario,
            database_url,
            pool,
            budget_per_minute,
            load,
        } => {
            let settings = ceiling::Ceiling {
                url: database_url,
                pool,
                budget_per_minute,
                users: load.users,
                writers: load.writers(),
                package_size: load.size,
            };
            let mut plan = load.plan(scenario);
            plan.label = format!("{}-ceiling", plan.label);
            let report = ceiling::run(settings, scenario, plan).await?;
            report.print();
            Ok(())
        }
    }
}
