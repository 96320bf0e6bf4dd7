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
    rate_limit::Budget,
    store::ConnectOptions,
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
    /// `DATABASE_URL` points at PgBouncer in transaction pooling mode: unnamed statements only,
    /// and the timeouts set inside each transaction instead of at connect.
    #[arg(long, env = "KPS_DB_PGBOUNCER", default_value_t = false, num_args = 0..=1,
          default_missing_value = "true", action = clap::ArgAction::Set,
          value_parser = clap::builder::BoolishValueParser::new(), global = true)]
    pub db_pgbouncer: bool,
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

impl Config {
    /// The request-path limits.
    pub fn limits(&self) -> Limits {
        Limits {
            budget: Budget::per_minute(self.consume_limit_per_minute),
            max_body_bytes: usize::try_from(self.max_body_bytes).unwrap_or(usize::MAX),
            request_timeout: Duration::from_secs(self.request_timeout_secs),
        }
    }

    /// The database to use: `DATABASE_URL`, or `data.db` in the data dir (created with it).
    pub fn connect_options(&self) -> Result<ConnectOptions, ConfigError> {
        let url = match &self.database_url {
            Some(url) if url.trim().is_empty() => {
                return Err(config_error("DATABASE_URL", "is empty"));
            }
            Some(url) => url.clone(),
            None => {
                self.ensure_data_dir()?;
                format!("sqlite://{}", self.data_dir.join("data.db").display())
            }
        };
        if !(url.starts_with("sqlite:")
            || url.starts_with("postgres://")
            || url.starts_with("postgresql://"))
        {
            return Err(config_error(
                "DATABASE_URL",
                "must start with sqlite: or postgres://",
            ));
        }
        if let Some(path) = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
        {
            let path = path.split('?').next().unwrap_or("");
            if let Some(parent) = Path::new(path)
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
            {
                std::fs::create_dir_all(parent).map_err(|e| {
                    config_error(
                        "DATABASE_URL",
                        format!("cannot create {}: {e}", parent.display()),
                    )
                })?;
            }
        }
        if self.db_pgbouncer && url.starts_with("sqlite:") {
            return Err(config_error(
                "KPS_DB_PGBOUNCER",
                "applies only to a postgres:// DATABASE_URL",
            ));
        }
        let mut options = ConnectOptions::new(url);
        options.max_connections = self.db_max_connections;
        options.pgbouncer = self.db_pgbouncer;
        Ok(options)
    }

    /// The token verifier: a PEM public key, the configured secret, or a generated dev secret.
    pub fn authenticator(&self) -> Result<Authenticator, ConfigError> {
        let key = match (&self.jwt_secret, &self.jwt_public_key_file) {
            (Some(_), Some(_)) => {
                return Err(config_error(
                    "KPS_JWT_SECRET",
                    "set either KPS_JWT_SECRET or KPS_JWT_PUBLIC_KEY_FILE, not both",
                ));
            }
            (Some(secret), None) if secret.is_empty() => {
                return Err(config_error("KPS_JWT_SECRET", "is empty"));
            }
            (Some(secret), None) => {
                if secret.len() < 32 {
                    tracing::warn!("KPS_JWT_SECRET is shorter than 32 bytes; use a longer secret");
                }
                VerifyingKey::Secret(secret.as_bytes().to_vec())
            }
            (None, Some(path)) => VerifyingKey::from_pem_file(path)
                .map_err(|e| config_error("KPS_JWT_PUBLIC_KEY_FILE", e.to_string()))?,
            (None, None) => VerifyingKey::Secret(self.dev_secret()?),
        };
        let non_empty = |v: &Option<String>| v.clone().filter(|s| !s.is_empty());
        Ok(Authenticator::new(
            key,
            non_empty(&self.jwt_issuer),
            non_empty(&self.jwt_audience),
        ))
    }

    fn ensure_data_dir(&self) -> Result<(), ConfigError> {
        std::fs::create_dir_all(&self.data_dir).map_err(|e| {
            config_error(
                "KPS_DATA_DIR",
                format!("cannot create {}: {e}", self.data_dir.display()),
            )
        })
    }

    /// Reads the development secret from the data dir, generating it (mode 0600) on first use.
    fn dev_secret(&self) -> Result<Vec<u8>, ConfigError> {
        self.ensure_data_dir()?;
        let path = self.data_dir.join(DEV_SECRET_FILE);
        let unreadable =
            |e: std::io::Error| config_error("KPS_DATA_DIR", format!("{}: {e}", path.display()));
        match std::fs::read_to_string(&path) {
            Ok(secret) if !secret.trim().is_empty() => {
                tracing::warn!(
                    path = %path.display(),
                    "KPS_JWT_SECRET is not set: using the generated development secret; \
                     set KPS_JWT_SECRET or KPS_JWT_PUBLIC_KEY_FILE in production"
                );
                return Ok(secret.trim().as_bytes().to_vec());
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(unreadable(e)),
        }
        let secret = hex::encode(rand::random::<[u8; 32]>());
        let mut file = open_private(&path).map_err(unreadable)?;
        file.write_all(secret.as_bytes()).map_err(unreadable)?;
        tracing::warn!(
            path = %path.display(),
            "KPS_JWT_SECRET is not set: GENERATED A DEVELOPMENT SECRET; tokens signed with it \
             are only for trying the server. Set KPS_JWT_SECRET or KPS_JWT_PUBLIC_KEY_FILE \
             in production"
        );
        Ok(secret.into_bytes())
    }
}

#[cfg(unix)]
fn open_private(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

#[cfg(not(unix))]
fn open_private(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
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

    #[test]
    fn dev_secret_is_generated_once_with_mode_0600() {
        let dir = std::env::temp_dir().join(format!("kps-config-{}", rand::random::<u64>()));
        let c = config(&["--data-dir", dir.to_str().unwrap()]);
        let first = c.dev_secret().unwrap();
        assert_eq!(
            c.dev_secret().unwrap(),
            first,
            "the same secret on the next start"
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.join(DEV_SECRET_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::remove_dir_all(dir).unwrap();
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
    fn secret_and_public_key_together_are_refused() {
        let c = config(&["--jwt-secret", "s", "--jwt-public-key-file", "/nonexistent"]);
        let err = c.authenticator().err().unwrap();
        assert_eq!(err.setting, "KPS_JWT_SECRET");
    }

    #[test]
    fn unusable_values_are_reported_by_environment_name() {
        let err = Cli::try_parse_from(["keypackage-server", "--consume-limit-per-minute", "0"])
            .unwrap_err();
        let line = describe_clap_error(&err);
        assert!(line.starts_with("KPS_CONSUME_LIMIT_PER_MINUTE: "), "{line}");
        assert!(!line.contains('\n'));
        let c = config(&["--db-pgbouncer", "yes", "--database-url", "sqlite://x.db"]);
        assert_eq!(c.connect_options().unwrap_err().setting, "KPS_DB_PGBOUNCER");
        let c = config(&["--database-url", "mysql://x"]);
        assert_eq!(c.connect_options().unwrap_err().setting, "DATABASE_URL");
    }
}
