//! A private Postgres cluster for tests that restart or starve the database: initdb into a
//! temporary directory, a free port, started and stopped with pg_ctl, removed when dropped.
//! The shared server on 5432 is never touched.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

/// Where Debian installs the Postgres 15 server binaries.
const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// A running private cluster, stopped and deleted when dropped.
pub(crate) struct PgCluster {
    dir: PathBuf,
    /// The port it listens on (127.0.0.1).
    pub(crate) port: u16,
}

/// Runs a server binary as user postgres when we are root (Postgres refuses to run as root).
fn pg_command(binary: &str) -> Command {
    let path = Path::new(PG_BIN).join(binary);
    if is_root() {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--"]).arg(path);
        cmd
    } else {
        Command::new(path)
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

fn run(mut cmd: Command, what: &str) {
    let output = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        output.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

impl PgCluster {
    /// A fresh cluster with trust authentication and `settings` (`name = value` lines) added to
    /// its postgresql.conf, started; `None` (with a note) where the server binaries are missing.
    pub(crate) fn start(test: &str, settings: &[&str]) -> Option<Self> {
        if !Path::new(PG_BIN).join("initdb").exists() {
            eprintln!("{test}: skipped, needs the Postgres server binaries in {PG_BIN}");
            return None;
        }
        let dir = std::env::temp_dir().join(format!(
            "kps_pg_{}_{:016x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&dir).expect("create cluster dir");
        if is_root() {
            run(
                {
                    let mut c = Command::new("chown");
                    c.args(["postgres:postgres"]).arg(&dir);
                    c
                },
                "chown the cluster dir",
            );
        }
        let data = dir.join("data");
        let mut initdb = pg_command("initdb");
        initdb
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
            .arg(&data);
        run(initdb, "initdb");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut conf = format!(
            "\nport = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             fsync = off\n",
            dir.display()
        );
        for setting in settings {
            conf.push_str(setting);
            conf.push('\n');
        }
        // Appended as root: the file stays owned by postgres, and stays readable by it.
        use std::io::Write;
        std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .and_then(|mut f| f.write_all(conf.as_bytes()))
            .expect("write postgresql.conf");
        let cluster = Self { dir, port };
        cluster.pg_ctl(&["start", "-w", "-l"], true);
        Some(cluster)
    }

    fn pg_ctl(&self, args: &[&str], with_log: bool) {
        let mut cmd = pg_command("pg_ctl");
        cmd.arg("-D").arg(self.dir.join("data"));
        cmd.args(args);
        if with_log {
            cmd.arg(self.dir.join("log"));
        }
        run(cmd, &format!("pg_ctl {}", args[0]));
    }

    /// The superuser URL of database `postgres` on this cluster.
    pub(crate) fn admin_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Restarts the server (fast shutdown: sessions are cut), waiting until it accepts again.
    pub(crate) fn restart(&self) {
        self.pg_ctl(&["restart", "-w", "-m", "fast", "-l"], true);
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let mut cmd = pg_command("pg_ctl");
        cmd.arg("-D")
            .arg(self.dir.join("data"))
            .args(["stop", "-w", "-m", "immediate"]);
        let _ = cmd.output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
