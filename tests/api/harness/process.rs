//! The real binary as a child process: spawned with environment variables on a free port,
//! awaited until it logs readiness and answers `/healthz`, signalled, and killed when dropped;
//! its stderr is kept for the test and echoed when `TEST_LOG` is set.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    ops::Deref,
    path::{Path, PathBuf},
    process::{ExitStatus, Output, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
    sync::watch,
    time::Instant,
};

use super::{test_log, ApiClient, TestDb, SECRET};

/// The binary under test, built by cargo for this test run.
pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_keypackage-server");

/// How long a process may take to start, stop or answer; generous for a loaded machine.
pub(crate) const PROCESS_PATIENCE: Duration = Duration::from_secs(30);

/// Environment variables for the child; `None` removes one that the base would set.
pub(crate) type Env = BTreeMap<String, Option<String>>;

/// The test secret as the `KPS_JWT_SECRET` value.
pub(crate) fn secret_str() -> String {
    String::from_utf8(SECRET.to_vec()).expect("the test secret is ASCII")
}

/// A temporary directory, removed when dropped.
pub(crate) struct TempDir(pub PathBuf);

impl TempDir {
    /// A fresh, existing, empty directory.
    pub(crate) fn new() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "kps_proc_{}_{:016x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        Self(dir)
    }

    /// `path` inside the directory.
    pub(crate) fn join(&self, path: impl AsRef<Path>) -> PathBuf {
        self.0.join(path)
    }

    /// The path as a string, for environment variables.
    pub(crate) fn path_str(&self, path: impl AsRef<Path>) -> String {
        self.join(path).display().to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Builds an [`Env`] from pairs.
pub(crate) fn env(pairs: &[(&str, &str)]) -> Env {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), Some((*v).to_owned())))
        .collect()
}

/// The usual environment for a server on `db`: the test secret, a data dir of its own.
pub(crate) fn server_env(db: &TestDb, data_dir: &TempDir) -> Env {
    let partitions = if db.is_postgres() {
        super::test_partitions()
    } else {
        0
    };
    let mut vars = env(&[("KPS_POSTGRES_PARTITIONS", &partitions.to_string())]);
    vars.extend(env(&[
        ("DATABASE_URL", &db.url),
        ("KPS_JWT_SECRET", &secret_str()),
        ("KPS_DATA_DIR", &data_dir.path_str("data")),
        // v1's consumption budget alone, as `v1_limits` gives the in-process server; the
        // tests of the per-caller stages set their own values.
        ("KPS_CONSUME_LIMIT_PER_CALLER_PER_MINUTE", "0"),
        ("KPS_CONSUME_LIMIT_PER_PAIR_PER_MINUTE", "0"),
    ]));
    vars
}

/// A command for the binary with none of the test runner's own settings leaking in: every
/// `KPS_*`, `DATABASE_URL` and `RUST_LOG` is removed, logs are at `info`, then `vars` apply.
pub(crate) fn command(vars: &Env) -> Command {
    let mut cmd = Command::new(BIN);
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("KPS_") || key == "DATABASE_URL" || key == "RUST_LOG" {
            cmd.env_remove(key.as_ref());
        }
    }
    cmd.env("RUST_LOG", "info").env("NO_COLOR", "1");
    for (key, value) in vars {
        match value {
            Some(value) => cmd.env(key, value),
            None => cmd.env_remove(key),
        };
    }
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    cmd
}

/// Runs the binary with `args` to completion (bounded by [`PROCESS_PATIENCE`]).
pub(crate) async fn run_to_exit(args: &[&str], vars: &Env) -> Output {
    let child = command(vars)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn keypackage-server");
    tokio::time::timeout(PROCESS_PATIENCE, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("`keypackage-server {}` did not exit", args.join(" ")))
        .expect("wait for keypackage-server")
}

/// The non-empty lines of a child's stderr.
pub(crate) fn stderr_lines(output: &Output) -> Vec<String> {
    String::from_utf8_lossy(&output.stderr)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect()
}

/// True when `line` contains the word "ready" (not "readyz" or "readiness").
pub(crate) fn is_ready_line(line: &str) -> bool {
    line.split(|c: char| !c.is_ascii_alphanumeric())
        .any(|word| word.eq_ignore_ascii_case("ready"))
}

/// Every line the child wrote to stderr, and whether stderr is closed (the child is gone).
struct Log {
    lines: Mutex<Vec<String>>,
    closed: watch::Receiver<bool>,
}

/// A running `keypackage-server serve`, killed when dropped.
pub(crate) struct ServerProcess {
    /// The typed client for this server (also reached through `Deref`).
    pub(crate) api: ApiClient,
    /// The address it listens on.
    pub(crate) addr: SocketAddr,
    child: Child,
    pid: u32,
    log: Arc<Log>,
}

/// A port nobody listens on right now (the child may still lose it to a race: see `start`).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a probe port")
        .port()
}

impl ServerProcess {
    /// Spawns the server with `vars` on a free port and returns at once, without waiting.
    pub(crate) fn spawn(vars: &Env) -> Self {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut vars = vars.clone();
        vars.insert("KPS_LISTEN_ADDR".into(), Some(addr.to_string()));
        let mut child = command(&vars)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn keypackage-server");
        let pid = child.id().expect("a running child has a pid");
        let stderr = child.stderr.take().expect("piped stderr");
        let (closed_tx, closed) = watch::channel(false);
        let log = Arc::new(Log {
            lines: Mutex::new(Vec::new()),
            closed,
        });
        let sink = log.clone();
        let echo = test_log::enabled();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if echo {
                    eprintln!("[server {pid}] {line}");
                }
                sink.lines.lock().expect("log lock").push(line);
                closed_tx.send_modify(|_| {});
            }
            closed_tx.send_replace(true);
        });
        Self {
            api: ApiClient::new(format!("http://{addr}")),
            addr,
            child,
            pid,
            log,
        }
    }

    /// Starts the server with `vars` and waits until it is ready and `/healthz` answers.
    pub(crate) async fn start(vars: &Env) -> Self {
        let server = Self::spawn_ready(vars).await;
        server.wait_healthy().await;
        server
    }

    /// Starts the server with `vars` and returns as soon as it logs its ready line.
    ///
    /// The port is picked free just before the spawn; should another process take it in
    /// between, the child exits naming `KPS_LISTEN_ADDR` and we try again on another port.
    pub(crate) async fn spawn_ready(vars: &Env) -> Self {
        let mut attempts = 0;
        loop {
            attempts += 1;
            let mut server = Self::spawn(vars);
            match server.wait_for_line(is_ready_line).await {
                Ok(_) => return server,
                Err(log) if attempts < 5 && log.contains("KPS_LISTEN_ADDR") => continue,
                Err(log) => {
                    let status = server.child.try_wait().ok().flatten();
                    panic!("the server did not become ready (exit: {status:?}); its log:\n{log}")
                }
            }
        }
    }

    /// Starts a server on `db` with the usual settings plus `extra`.
    pub(crate) async fn start_on(db: &TestDb, data_dir: &TempDir, extra: &[(&str, &str)]) -> Self {
        let mut vars = server_env(db, data_dir);
        vars.extend(env(extra));
        Self::start(&vars).await
    }

    /// Waits (bounded) for a stderr line matching `want`; `Err(log)` if the child closes
    /// stderr (exits) first or the deadline passes.
    pub(crate) async fn wait_for_line(
        &self,
        want: impl Fn(&str) -> bool,
    ) -> Result<String, String> {
        let deadline = Instant::now() + PROCESS_PATIENCE;
        let mut closed = self.log.closed.clone();
        loop {
            // Mark the current state seen before looking, so no line can slip past unnoticed.
            let is_closed = *closed.borrow_and_update();
            if let Some(line) = self.lines().into_iter().find(|l| want(l)) {
                return Ok(line);
            }
            if is_closed {
                return Err(self.log_text());
            }
            match tokio::time::timeout_at(deadline, closed.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return Err(self.log_text()),
            }
        }
    }

    /// Polls `/healthz` until it answers 200 (bounded).
    pub(crate) async fn wait_healthy(&self) {
        let deadline = Instant::now() + PROCESS_PATIENCE;
        loop {
            let answer = self
                .client
                .get(self.url("/healthz"))
                .timeout(Duration::from_secs(2))
                .send()
                .await;
            if matches!(&answer, Ok(r) if r.status() == 200) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "/healthz never answered 200 (last: {answer:?}); log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Everything the child has written to stderr so far.
    pub(crate) fn lines(&self) -> Vec<String> {
        self.log.lines.lock().expect("log lock").clone()
    }

    /// The log as one text, for failure messages.
    pub(crate) fn log_text(&self) -> String {
        self.lines().join("\n")
    }

    /// Sends `signal` (`TERM`, `INT`, `KILL`) with kill(1); the child must still be running.
    pub(crate) fn signal(&mut self, signal: &str) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "the server exited before SIG{signal} ({status}); log:\n{}",
                self.log_text()
            );
        }
        let sent = std::process::Command::new("kill")
            .args(["-s", signal, &self.pid.to_string()])
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -s {signal} {} failed", self.pid);
    }

    /// SIGTERM.
    pub(crate) fn sigterm(&mut self) {
        self.signal("TERM");
    }

    /// SIGKILL, then waits for the process to be gone.
    pub(crate) async fn kill(&mut self) {
        let _ = self.child.start_kill();
        self.wait_exit().await;
    }

    /// Waits (bounded) for the process to exit and returns its status.
    pub(crate) async fn wait_exit(&mut self) -> ExitStatus {
        match tokio::time::timeout(PROCESS_PATIENCE, self.child.wait()).await {
            Ok(status) => status.expect("wait for the server"),
            Err(_) => panic!("the server did not exit; log:\n{}", self.log_text()),
        }
    }
}

impl Deref for ServerProcess {
    type Target = ApiClient;

    fn deref(&self) -> &ApiClient {
        &self.api
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        if std::thread::panicking() {
            eprintln!(
                "--- log of server pid {} ---\n{}",
                self.pid,
                self.log_text()
            );
        }
    }
}
