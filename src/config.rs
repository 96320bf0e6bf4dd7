//! Command line and environment configuration, and the checks that turn it into settings.
//!
//! Every flag mirrors an environment variable; an unusable setting stops start-up with one line
//! that names it.

use std::{
    io::Write,
    path::{Path, PathBuf},
    time::Duration,
};

use clap::{Args, Parser, Subcommand};

use crate::{
    app::Limits,
    auth::{Authenticator, VerifyingKey},
    key_package::UploadPolicy,
    rate_limit::ClaimBudgets,
    store::{sqlite::Synchronous, Backend, ConnectOptions},
};

/// Stores and hands out MLS key packages.
#[derive(Debug, Parser)]
#[command(name = "keypackage-server", version, about)]
pub struct Cli {
    /// What to do; `serve` when omitted.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Settings shared by every subcommand.
    #[command(flatten)]
    pub config: Config,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server (the default).
    Serve,
    /// Print a bearer token for USER_ID, signed with the configured HS256 secret.
    Token {
        /// The user the token speaks for.
        user_id: String,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
    },
}

/// Server settings.
#[derive(Clone, Debug, Args)]
pub struct Config {
    /// Address to bind.
    #[arg(
        long,
        env = "KPS_LISTEN_ADDR",
        default_value = "127.0.0.1:8080",
        global = true
    )]
    pub listen_addr: String,
    /// `sqlite://…` (embedded) or `postgres://…`; default: an SQLite file under the data dir.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, global = true)]
    pub database_url: Option<String>,
    /// Where the embedded database and a generated development secret live.
    #[arg(long, env = "KPS_DATA_DIR", default_value = "./data", global = true)]
    pub data_dir: PathBuf,
    /// HS256 secret for bearer tokens; default: generated once into the data dir.
    #[arg(long, env = "KPS_JWT_SECRET", hide_env_values = true, global = true)]
    pub jwt_secret: Option<String>,
    /// PEM public key (Ed25519, P-256 or RSA) to verify tokens with, instead of a secret.
    #[arg(long, env = "KPS_JWT_PUBLIC_KEY_FILE", global = true)]
    pub jwt_public_key_file: Option<PathBuf>,
    /// Required `iss` claim.
    #[arg(long, env = "KPS_JWT_ISSUER", global = true)]
    pub jwt_issuer: Option<String>,
    /// Required `aud` claim.
    #[arg(long, env = "KPS_JWT_AUDIENCE", global = true)]
    pub jwt_audience: Option<String>,
    /// Key packages any one user hands out per minute, across all callers.
    #[arg(long, env = "KPS_CONSUME_LIMIT_PER_MINUTE", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000), global = true)]
    pub consume_limit_per_minute: u32,
    /// Consumption requests any one caller makes per minute, over all targets; 0: no limit.
    #[arg(long, env = "KPS_CONSUME_LIMIT_PER_CALLER_PER_MINUTE", default_value_t = 600,
          value_parser = clap::value_parser!(u32).range(0..=1_000_000), global = true)]
    pub consume_limit_per_caller_per_minute: u32,
    /// Consumption requests one caller makes per minute for one target; 0: no limit.
    #[arg(long, env = "KPS_CONSUME_LIMIT_PER_PAIR_PER_MINUTE", default_value_t = 3,
          value_parser = clap::value_parser!(u32).range(0..=1_000_000), global = true)]
    pub consume_limit_per_pair_per_minute: u32,
    /// How long a claim with an `Idempotency-Key` is remembered for its retries, in seconds.
    #[arg(long, env = "KPS_IDEMPOTENCY_TTL_SECS", default_value_t = 600,
          value_parser = clap::value_parser!(u64).range(1..=604_800), global = true)]
    pub idempotency_ttl_secs: u64,
    /// Largest accepted request body, in bytes.
    #[arg(long, env = "KPS_MAX_BODY_BYTES", default_value_t = 262_144,
          value_parser = clap::value_parser!(u64).range(16..=67_108_864), global = true)]
    pub max_body_bytes: u64,
    /// Longest a request may take, in seconds (slow uploads included).
    #[arg(long, env = "KPS_REQUEST_TIMEOUT_SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=3600), global = true)]
    pub request_timeout_secs: u64,
    /// Largest number of database connections.
    #[arg(long, env = "KPS_DB_MAX_CONNECTIONS", default_value_t = 16,
          value_parser = clap::value_parser!(u32).range(1..=1000), global = true)]
    pub db_max_connections: u32,
    /// Most client connections served at once; beyond it new ones wait in the kernel backlog.
    #[arg(long, env = "KPS_MAX_CONNECTIONS", default_value_t = 4096,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000), global = true)]
    pub max_connections: u32,
    /// `DATABASE_URL` points at PgBouncer in transaction pooling mode: unnamed statements only,
    /// and the timeouts set inside each transaction instead of at connect.
    #[arg(long, env = "KPS_DB_PGBOUNCER", default_value_t = false, num_args = 0..=1,
          default_missing_value = "true", action = clap::ArgAction::Set,
          value_parser = clap::builder::BoolishValueParser::new(), global = true)]
    pub db_pgbouncer: bool,
    /// Hash-partition the Postgres tables by user into this many partitions each, converting
    /// plain tables at start (once; existing rows are copied); 0 keeps plain tables.
    #[arg(long, env = "KPS_POSTGRES_PARTITIONS", default_value_t = 0,
          value_parser = clap::value_parser!(u16).range(0..=1024), global = true)]
    pub postgres_partitions: u16,
    /// How the embedded SQLite database syncs commits: `full` (every acknowledged write survives
    /// a power cut) or `normal` (faster; the last commits may be lost on power loss).
    #[arg(long, env = "KPS_SQLITE_SYNCHRONOUS", value_enum, default_value_t = SqliteSynchronous::Full,
          global = true)]
    pub sqlite_synchronous: SqliteSynchronous,
    /// Refuse uploaded entries the server cannot read as RFC 9420 KeyPackages (400
    /// `invalid_key_package`) instead of storing them opaque.
    #[arg(long, env = "KPS_REQUIRE_READABLE_KEY_PACKAGES", default_value_t = false, num_args = 0..=1,
          default_missing_value = "true", action = clap::ArgAction::Set,
          value_parser = clap::builder::BoolishValueParser::new(), global = true)]
    pub require_readable_key_packages: bool,
    /// Longest accepted key-package lifetime, in seconds: a readable package whose `not_after`
    /// lies further ahead is refused (400 `invalid_lifetime`); unset: no limit.
    #[arg(long, env = "KPS_MAX_KEY_PACKAGE_LIFETIME_SECS",
          value_parser = clap::value_parser!(u64).range(1..), global = true)]
    pub max_key_package_lifetime_secs: Option<u64>,
}

/// Values of `KPS_SQLITE_SYNCHRONOUS`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SqliteSynchronous {
    /// Every acknowledged commit is on disk (the default).
    Full,
    /// Commits since the last WAL sync may be lost on power loss.
    Normal,
}

/// A configuration problem, shown as one line naming the setting.
#[derive(Debug, thiserror::Error)]
#[error("{setting}: {message}")]
pub struct ConfigError {
    /// The environment variable at fault.
    pub setting: &'static str,
    /// What is wrong with it.
    pub message: String,
}

fn config_error(setting: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        setting,
        message: message.into(),
    }
}

/// Name of the generated development secret inside the data dir.
const DEV_SECRET_FILE: &str = "jwt-secret";

/// Where the key that verifies bearer tokens comes from, as configured (nothing read yet).
#[derive(Clone, Copy, Debug)]
pub enum KeySource<'a> {
    /// `KPS_JWT_SECRET`.
    Secret(&'a str),
    /// `KPS_JWT_PUBLIC_KEY_FILE`.
    PublicKeyFile(&'a Path),
    /// Neither: the development secret in the data dir.
    DevSecret(&'a Path),
}

impl Config {
    /// The request-path limits.
    pub fn limits(&self) -> Limits {
        let budgets = ClaimBudgets::per_minute(
            self.consume_limit_per_caller_per_minute,
            self.consume_limit_per_pair_per_minute,
            self.consume_limit_per_minute,
        );
        Limits {
            budget: budgets.target,
            caller_budget: budgets.caller,
            pair_budget: budgets.pair,
            idempotency_ttl: Duration::from_secs(self.idempotency_ttl_secs),
            max_body_bytes: usize::try_from(self.max_body_bytes).unwrap_or(usize::MAX),
            request_timeout: Duration::from_secs(self.request_timeout_secs),
            max_connections: usize::try_from(self.max_connections).unwrap_or(usize::MAX),
            upload: UploadPolicy {
                require_readable: self.require_readable_key_packages,
                max_lifetime_secs: self.max_key_package_lifetime_secs,
            },
        }
    }

    /// The database to use: `DATABASE_URL`, or `data.db` in the data dir. Checks the settings
    /// only; [`Config::create_directories`] makes the directories it needs.
    pub fn connect_options(&self) -> Result<ConnectOptions, ConfigError> {
        let url = self.database_url()?;
        if self.db_pgbouncer && Backend::from_url(&url).ok() != Some(Backend::Postgres) {
            return Err(config_error(
                "KPS_DB_PGBOUNCER",
                "applies only to a postgres:// DATABASE_URL",
            ));
        }
        if self.postgres_partitions > 0 && Backend::from_url(&url).ok() != Some(Backend::Postgres) {
            return Err(config_error(
                "KPS_POSTGRES_PARTITIONS",
                "applies only to a postgres:// DATABASE_URL",
            ));
        }
        let mut options = ConnectOptions::new(url);
        options.max_connections = self.db_max_connections;
        options.pgbouncer = self.db_pgbouncer;
        options.postgres_partitions = self.postgres_partitions;
        options.sqlite_synchronous = match self.sqlite_synchronous {
            SqliteSynchronous::Full => Synchronous::Full,
            SqliteSynchronous::Normal => Synchronous::Normal,
        };
        Ok(options)
    }

    fn database_url(&self) -> Result<String, ConfigError> {
        let url = match &self.database_url {
            Some(url) if url.trim().is_empty() => {
                return Err(config_error("DATABASE_URL", "is empty"));
            }
            Some(url) => url.clone(),
            None => format!("sqlite://{}", self.data_dir.join("data.db").display()),
        };
        Backend::from_url(&url).map_err(|e| config_error("DATABASE_URL", e.to_string()))?;
        Ok(url)
    }

    /// Creates the data dir when the default database lives in it, and the parent directory of
    /// an SQLite database file (SQLite creates the file, not its directory).
    pub fn create_directories(&self) -> Result<(), ConfigError> {
        if self.database_url.is_none() {
            create_dir(&self.data_dir, "KPS_DATA_DIR")?;
        }
        let url = self.database_url()?;
        if let Some(parent) = sqlite_path(&url)
            .and_then(Path::parent)
            .filter(|p| !p.as_os_str().is_empty())
        {
            create_dir(parent, "DATABASE_URL")?;
        }
        Ok(())
    }

    /// Which key verifies tokens; refuses a secret and a public key together.
    pub fn key_source(&self) -> Result<KeySource<'_>, ConfigError> {
        match (&self.jwt_secret, &self.jwt_public_key_file) {
            (Some(_), Some(_)) => Err(config_error(
                "KPS_JWT_SECRET",
                "set either KPS_JWT_SECRET or KPS_JWT_PUBLIC_KEY_FILE, not both",
            )),
            (Some(secret), None) if secret.is_empty() => {
                Err(config_error("KPS_JWT_SECRET", "is empty"))
            }
            (Some(secret), None) => Ok(KeySource::Secret(secret)),
            (None, Some(path)) => Ok(KeySource::PublicKeyFile(path)),
            (None, None) => Ok(KeySource::DevSecret(&self.data_dir)),
        }
    }

    /// Reads the key [`Config::key_source`] names: the PEM file, or the development secret,
    /// which this creates on first use.
    pub fn load_verifying_key(&self) -> Result<VerifyingKey, ConfigError> {
        match self.key_source()? {
            KeySource::Secret(secret) => {
                if secret.len() < 32 {
                    tracing::warn!("KPS_JWT_SECRET is shorter than 32 bytes; use a longer secret");
                }
                Ok(VerifyingKey::Secret(secret.as_bytes().to_vec()))
            }
            KeySource::PublicKeyFile(path) => VerifyingKey::from_pem_file(path)
                .map_err(|e| config_error("KPS_JWT_PUBLIC_KEY_FILE", e.to_string())),
            KeySource::DevSecret(dir) => load_or_create_dev_secret(dir).map(VerifyingKey::Secret),
        }
    }

    /// The token verifier for `key`, with the configured issuer and audience.
    pub fn authenticator(&self, key: VerifyingKey) -> Authenticator {
        let non_empty = |v: &Option<String>| v.clone().filter(|s| !s.is_empty());
        Authenticator::new(
            key,
            non_empty(&self.jwt_issuer),
            non_empty(&self.jwt_audience),
        )
    }
}

/// The file an `sqlite:` URL names, without its query; `None` for other URLs.
fn sqlite_path(url: &str) -> Option<&Path> {
    let path = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    Some(Path::new(path.split('?').next().unwrap_or("")))
}

fn create_dir(dir: &Path, setting: &'static str) -> Result<(), ConfigError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| config_error(setting, format!("cannot create {}: {e}", dir.display())))
}

/// Reads the development secret from `data_dir`, generating it (mode 0600) on first use.
///
/// Processes starting at once on a fresh directory take turns through a lock on it, and the
/// secret is written to a temporary file, synced, then linked into place, so that every process
/// ends up with the same secret and a crash never leaves a partial one. A file left empty (by an
/// older version interrupted mid-write) held no usable secret and is replaced.
pub fn load_or_create_dev_secret(data_dir: &Path) -> Result<Vec<u8>, ConfigError> {
    create_dir(data_dir, "KPS_DATA_DIR")?;
    let path = data_dir.join(DEV_SECRET_FILE);
    let failed = |at: &Path, e: std::io::Error| {
        config_error("KPS_DATA_DIR", format!("{}: {e}", at.display()))
    };
    // Held until this returns; closing the file releases the lock.
    let _lock = lock_dir(data_dir).map_err(|e| failed(data_dir, e))?;
    let existing = match std::fs::read(&path) {
        Ok(bytes) => Some(bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(failed(&path, e)),
    };
    if let Some(secret) = existing.as_deref().map(<[u8]>::trim_ascii) {
        if !secret.is_empty() {
            tracing::warn!(
                path = %path.display(),
                "KPS_JWT_SECRET is not set: using the generated development secret; \
                 set KPS_JWT_SECRET or KPS_JWT_PUBLIC_KEY_FILE in production"
            );
            return Ok(secret.to_vec());
        }
        tracing::warn!(path = %path.display(), "the development secret file is empty; replacing it");
    }

    let secret = hex::encode(rand::random::<[u8; 32]>());
    let temp = data_dir.join(format!(
        ".{DEV_SECRET_FILE}.{}.{:016x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    let written = open_private(&temp, true).and_then(|mut file| {
        file.write_all(secret.as_bytes())?;
        file.sync_all()
    });
    // A link fails if the name exists, so a process that does not take the lock (an older
    // version) cannot be overwritten; the empty file is the one case to replace outright.
    let placed = written.and_then(|()| match existing {
        None => std::fs::hard_link(&temp, &path),
        Some(_) => std::fs::rename(&temp, &path),
    });
    let _ = std::fs::remove_file(&temp);
    match placed {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let theirs = std::fs::read(&path).map_err(|e| failed(&path, e))?;
            let theirs = theirs.trim_ascii();
            if theirs.is_empty() {
                return Err(failed(&path, e));
            }
            return Ok(theirs.to_vec());
        }
        Err(e) => return Err(failed(&path, e)),
    }
    // Make the new name durable too, not only the file's contents.
    if let Ok(dir) = std::fs::File::open(data_dir) {
        let _ = dir.sync_all();
    }
    tracing::warn!(
        path = %path.display(),
        "KPS_JWT_SECRET is not set: GENERATED A DEVELOPMENT SECRET; tokens signed with it \
         are only for trying the server. Set KPS_JWT_SECRET or KPS_JWT_PUBLIC_KEY_FILE \
         in production"
    );
    Ok(secret.into_bytes())
}

/// Takes an exclusive lock on the directory itself, so that processes creating the development
/// secret at the same time take turns without leaving a lock file behind.
#[cfg(unix)]
fn lock_dir(dir: &Path) -> std::io::Result<std::fs::File> {
    let handle = std::fs::File::open(dir)?;
    handle.lock()?;
    Ok(handle)
}

/// Takes an exclusive lock on a lock file in `dir` (directories cannot be locked here).
#[cfg(not(unix))]
fn lock_dir(dir: &Path) -> std::io::Result<std::fs::File> {
    let handle = open_private(&dir.join("jwt-secret.lock"), false)?;
    handle.lock()?;
    Ok(handle)
}

/// Opens `path` for writing with mode 0600; `new` insists on creating it.
#[cfg(unix)]
fn open_private(path: &Path, new: bool) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).mode(0o600);
    if new {
        options.create_new(true);
    } else {
        options.create(true);
    }
    options.open(path)
}

/// Opens `path` for writing; `new` insists on creating it.
#[cfg(not(unix))]
fn open_private(path: &Path, new: bool) -> std::io::Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true);
    if new {
        options.create_new(true);
    } else {
        options.create(true);
    }
    options.open(path)
}

/// A clap error as one line naming the environment variable behind the offending flag.
pub fn describe_clap_error(error: &clap::Error) -> String {
    use clap::{error::ContextKind, CommandFactory};
    let arg = error.get(ContextKind::InvalidArg).map(|a| a.to_string());
    let command = Cli::command();
    let env = arg.as_deref().and_then(|arg| {
        command
            .get_arguments()
            .find(|a| {
                a.get_long()
                    .is_some_and(|l| arg.starts_with(&format!("--{l}")))
            })
            .and_then(|a| a.get_env())
            .map(|e| e.to_string_lossy().into_owned())
    });
    let text = error.to_string();
    let first = text
        .lines()
        .next()
        .unwrap_or("invalid arguments")
        .trim_start_matches("error: ");
    match env {
        Some(env) => format!("{env}: {first}"),
        None => first.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(args: &[&str]) -> Config {
        let mut argv = vec!["keypackage-server"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).unwrap().config
    }

    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            Self(std::env::temp_dir().join(format!("kps-config-{:016x}", rand::random::<u64>())))
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn dev_secret_is_generated_once_with_mode_0600() {
        let dir = TempDir::new();
        let first = load_or_create_dev_secret(&dir.0).unwrap();
        assert_eq!(first.len(), 64);
        assert_eq!(
            load_or_create_dev_secret(&dir.0).unwrap(),
            first,
            "the same secret on the next start"
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.0.join(DEV_SECRET_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let mut names: Vec<String> = std::fs::read_dir(&dir.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [DEV_SECRET_FILE],
            "no temporary or lock file is left"
        );
    }

    #[test]
    fn an_empty_dev_secret_file_left_by_a_crash_is_replaced() {
        let dir = TempDir::new();
        std::fs::create_dir_all(&dir.0).unwrap();
        std::fs::write(dir.0.join(DEV_SECRET_FILE), b"").unwrap();
        let secret = load_or_create_dev_secret(&dir.0).unwrap();
        assert_eq!(secret.len(), 64);
        assert_eq!(std::fs::read(dir.0.join(DEV_SECRET_FILE)).unwrap(), secret);
        std::fs::write(dir.0.join(DEV_SECRET_FILE), b" \n").unwrap();
        let again = load_or_create_dev_secret(&dir.0).unwrap();
        assert_eq!(std::fs::read(dir.0.join(DEV_SECRET_FILE)).unwrap(), again);
    }

    #[test]
    fn simultaneous_first_starts_agree_on_one_dev_secret() {
        for _ in 0..20 {
            let dir = TempDir::new();
            let barrier = std::sync::Barrier::new(4);
            let secrets: Vec<Vec<u8>> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..4)
                    .map(|_| {
                        s.spawn(|| {
                            barrier.wait();
                            load_or_create_dev_secret(&dir.0).unwrap()
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let on_disk = std::fs::read(dir.0.join(DEV_SECRET_FILE)).unwrap();
            assert!(secrets.iter().all(|s| *s == on_disk), "one secret for all");
        }
    }

    #[test]
    fn settings_getters_touch_no_files() {
        let dir = TempDir::new();
        let db_parent = dir.0.join("db");
        let url = format!("sqlite://{}", db_parent.join("x.db").display());
        let with_url = config(&[
            "--data-dir",
            dir.0.to_str().unwrap(),
            "--database-url",
            &url,
        ]);
        with_url.connect_options().unwrap();
        let default = config(&["--data-dir", dir.0.to_str().unwrap()]);
        assert!(default.connect_options().unwrap().url.ends_with("data.db"));
        assert!(matches!(
            default.key_source().unwrap(),
            KeySource::DevSecret(_)
        ));
        assert!(!dir.0.exists(), "getters created nothing");
        with_url.create_directories().unwrap();
        assert!(
            db_parent.is_dir(),
            "the SQLite parent directory is an explicit step"
        );
        assert!(!dir.0.join(DEV_SECRET_FILE).exists());
    }

    #[test]
    fn pgbouncer_mode_is_off_unless_asked_for() {
        let url = ["--database-url", "postgres://db/kps"];
        assert!(!config(&url).connect_options().unwrap().pgbouncer);
        for on in [
            &["--db-pgbouncer"][..],
            &["--db-pgbouncer", "true"],
            &["--db-pgbouncer=1"],
        ] {
            let c = config(&[&url[..], on].concat());
            assert!(c.connect_options().unwrap().pgbouncer, "{on:?}");
        }
        let c = config(&[&url[..], &["--db-pgbouncer", "false"]].concat());
        assert!(!c.connect_options().unwrap().pgbouncer);
    }

    #[test]
    fn upload_policy_defaults_to_v1_and_follows_its_settings() {
        assert_eq!(config(&[]).limits().upload, UploadPolicy::default());
        let c = config(&[
            "--require-readable-key-packages",
            "--max-key-package-lifetime-secs",
            "18446744073709551615",
        ]);
        assert_eq!(
            c.limits().upload,
            UploadPolicy {
                require_readable: true,
                max_lifetime_secs: Some(u64::MAX),
            }
        );
        let c = config(&["--require-readable-key-packages", "false"]);
        assert!(!c.limits().upload.require_readable);
        let err =
            Cli::try_parse_from(["keypackage-server", "--max-key-package-lifetime-secs", "0"])
                .unwrap_err();
        assert!(describe_clap_error(&err).starts_with("KPS_MAX_KEY_PACKAGE_LIFETIME_SECS: "));
    }

    #[test]
    fn claim_limits_default_to_the_contract_and_zero_turns_the_caller_stages_off() {
        let limits = config(&[]).limits();
        assert_eq!(
            limits.claim_budgets(),
            crate::rate_limit::ClaimBudgets::per_minute(600, 3, 10)
        );
        assert_eq!(limits.idempotency_ttl, Duration::from_secs(600));
        let off = config(&[
            "--consume-limit-per-caller-per-minute",
            "0",
            "--consume-limit-per-pair-per-minute",
            "0",
            "--idempotency-ttl-secs",
            "5",
        ])
        .limits();
        assert_eq!((off.caller_budget, off.pair_budget), (None, None));
        assert_eq!(off.idempotency_ttl, Duration::from_secs(5));
        let err =
            Cli::try_parse_from(["keypackage-server", "--idempotency-ttl-secs", "0"]).unwrap_err();
        assert!(describe_clap_error(&err).starts_with("KPS_IDEMPOTENCY_TTL_SECS: "));
    }

    #[test]
    fn secret_and_public_key_together_are_refused() {
        let c = config(&["--jwt-secret", "s", "--jwt-public-key-file", "/nonexistent"]);
        let err = c.key_source().err().unwrap();
        assert_eq!(err.setting, "KPS_JWT_SECRET");
    }

    #[test]
    fn unusable_values_are_reported_by_environment_name() {
        let err = Cli::try_parse_from(["keypackage-server", "--consume-limit-per-minute", "0"])
            .unwrap_err();
        let line = describe_clap_error(&err);
        assert!(line.starts_with("KPS_CONSUME_LIMIT_PER_MINUTE: "), "{line}");
        assert!(!line.contains('\n'));
        let err = Cli::try_parse_from(["keypackage-server", "--max-connections", "0"]).unwrap_err();
        assert!(describe_clap_error(&err).starts_with("KPS_MAX_CONNECTIONS: "));
        let c = config(&["--db-pgbouncer", "yes", "--database-url", "sqlite://x.db"]);
        assert_eq!(c.connect_options().unwrap_err().setting, "KPS_DB_PGBOUNCER");
        let c = config(&["--database-url", "mysql://x"]);
        assert_eq!(c.connect_options().unwrap_err().setting, "DATABASE_URL");
    }
}
