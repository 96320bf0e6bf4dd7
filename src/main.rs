//! The `keypackage-server` binary: parse configuration, set up logging, then serve or print a token.

use std::process::ExitCode;

use clap::Parser;
use keypackage_server::{
    app::{self, AppState, BackgroundTasks},
    auth::IssueError,
    config::{describe_clap_error, Cli, Command, Config, ConfigError},
    key_package::{InvalidUserId, UserId},
    store::{self, Backend, ConnectError},
};
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

/// Everything that stops the binary, each with the setting or step it concerns.
#[derive(Debug, thiserror::Error)]
enum Failure {
    /// A setting is unusable (the message names it).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The `token` subcommand's user id.
    #[error("USER_ID: {0}")]
    UserId(#[from] InvalidUserId),
    /// The `token` subcommand cannot sign.
    #[error(transparent)]
    Issue(#[from] IssueError),
    /// The async runtime did not start.
    #[error("cannot start the runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// The listen address cannot be bound.
    #[error("KPS_LISTEN_ADDR: cannot bind {addr}: {source}")]
    Bind {
        /// The configured address.
        addr: String,
        /// Why binding failed.
        source: std::io::Error,
    },
    /// The bound socket has no address.
    #[error("KPS_LISTEN_ADDR: {0}")]
    LocalAddr(#[source] std::io::Error),
    /// The database cannot be opened or migrated.
    #[error("DATABASE_URL: {0}")]
    Store(#[from] ConnectError),
    /// A signal handler cannot be installed.
    #[error("cannot listen for {signal}: {source}")]
    Signal {
        /// The signal's name.
        signal: &'static str,
        /// Why installing failed.
        source: std::io::Error,
    },
    /// The accept loop failed.
    #[error("server error: {0}")]
    Serve(#[source] std::io::Error),
    /// A second signal arrived while draining: in-flight requests were cut.
    #[error("second {0} while draining: exited without waiting for in-flight requests")]
    Forced(Signal),
}

impl Failure {
    /// The exit status: 128 + the signal number after a forced stop (what a shell reports for
    /// a process that signal killed, so supervisors see it was not a clean exit), else 1.
    fn exit_code(&self) -> ExitCode {
        match self {
            Self::Forced(signal) => ExitCode::from(128 + signal.number()),
            _ => ExitCode::FAILURE,
        }
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("keypackage-server: {}", describe_clap_error(&e));
            return ExitCode::FAILURE;
        }
    };
    // Log lines are written to stderr by a thread of their own, in batches: a request never
    // makes a write(2) of its own, nor waits on a slow reader of stderr unless the queue of
    // lines is full (then it waits; lines are never dropped). Dropping the guard writes what
    // is still queued.
    let (writer, flush_on_exit) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .thread_name("keypackage-server-log")
        .finish(std::io::BufWriter::new(std::io::stderr()));
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(writer)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => run_server(cli.config),
        Command::Token { user_id, ttl } => print_token(&cli.config, &user_id, ttl),
    };
    drop(flush_on_exit);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("keypackage-server: {failure}");
            failure.exit_code()
        }
    }
}

fn print_token(config: &Config, user_id: &str, ttl: u64) -> Result<(), Failure> {
    let user = UserId::parse(user_id)?;
    let auth = config.authenticator(config.load_verifying_key()?);
    let token = auth.issue(&user, ttl)?;
    #[allow(clippy::print_stdout)]
    {
        println!("{token}");
    }
    Ok(())
}

fn run_server(config: Config) -> Result<(), Failure> {
    raise_descriptor_limit();
    // Settings are checked before anything touches the file system or the network.
    let options = config.connect_options()?;
    config.key_source()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(Failure::Runtime)?;
    let result = runtime.block_on(async move {
        let auth = config.authenticator(config.load_verifying_key()?);
        config.create_directories()?;
        let listener = TcpListener::bind(&config.listen_addr)
            .await
            .map_err(|source| Failure::Bind {
                addr: config.listen_addr.clone(),
                source,
            })?;
        let store = store::connect(&options).await?;
        let state = AppState::new(store, auth, config.limits());
        let addr = listener.local_addr().map_err(Failure::LocalAddr)?;
        let mut signals = Signals::register()?;
        let _background = BackgroundTasks::start(&state);
        let (drain, drain_requested) = tokio::sync::oneshot::channel::<()>();
        let server = app::serve(listener, state, async move {
            let _ = drain_requested.await;
        });
        let mut server = std::pin::pin!(server);
        tracing::info!(%addr, backend = Backend::from_url(&options.url).map_or("unknown", Backend::name), "ready to serve");
        tokio::select! {
            result = &mut server => return result.map_err(Failure::Serve),
            signal = signals.next() => {
                tracing::info!(%signal, "shutdown signal received, draining in-flight requests");
                let _ = drain.send(());
            }
        }
        tokio::select! {
            result = &mut server => result.map_err(Failure::Serve)?,
            signal = signals.next() => return Err(Failure::Forced(signal)),
        }
        tracing::info!("shut down cleanly");
        Ok(())
    });
    if matches!(result, Err(Failure::Forced(_))) {
        // Do not wait for whatever the cut requests were doing.
        runtime.shutdown_background();
    }
    result
}

/// Raises the soft limit on open files to the hard limit: each client connection and each
/// database connection takes a descriptor, and the usual soft default (1024) is below
/// `KPS_MAX_CONNECTIONS`.
fn raise_descriptor_limit() {
    #[cfg(unix)]
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::debug!(limit, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
}

/// A shutdown signal.
#[derive(Clone, Copy, Debug)]
enum Signal {
    Interrupt,
    Terminate,
}

impl Signal {
    fn number(self) -> u8 {
        match self {
            Self::Interrupt => 2,
            Self::Terminate => 15,
        }
    }
}

impl std::fmt::Display for Signal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Interrupt => "SIGINT",
            Self::Terminate => "SIGTERM",
        })
    }
}

/// SIGINT and SIGTERM, listened for from before the ready line: a signal that arrived between
/// that line and the first poll of a lazily registered listener would otherwise kill the
/// process or be lost. The first starts the drain; a second one ends the process at once.
struct Signals {
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
}

impl Signals {
    #[cfg(unix)]
    fn register() -> Result<Self, Failure> {
        use tokio::signal::unix::{signal, SignalKind};
        let listen = |kind, name| {
            signal(kind).map_err(|source| Failure::Signal {
                signal: name,
                source,
            })
        };
        Ok(Self {
            interrupt: listen(SignalKind::interrupt(), "SIGINT")?,
            terminate: listen(SignalKind::terminate(), "SIGTERM")?,
        })
    }

    #[cfg(not(unix))]
    fn register() -> Result<Self, Failure> {
        Ok(Self {})
    }

    /// The next signal.
    #[cfg(unix)]
    async fn next(&mut self) -> Signal {
        tokio::select! {
            _ = self.interrupt.recv() => Signal::Interrupt,
            _ = self.terminate.recv() => Signal::Terminate,
        }
    }

    /// The next Ctrl-C.
    #[cfg(not(unix))]
    async fn next(&mut self) -> Signal {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
        Signal::Interrupt
    }
}
