//! The `keypackage-server` binary: parse configuration, set up logging, then serve or print a token.

use std::process::ExitCode;

use clap::Parser;
use keypackage_server::{
    app::{self, AppState},
    config::{describe_clap_error, Cli, Command, Config},
    key_package::UserId,
    store,
};
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => return fail(describe_clap_error(&e)),
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => run_server(cli.config),
        Command::Token { user_id, ttl } => print_token(&cli.config, &user_id, ttl),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => fail(message),
    }
}

fn fail(message: String) -> ExitCode {
    eprintln!("keypackage-server: {message}");
    ExitCode::FAILURE
}

fn print_token(config: &Config, user_id: &str, ttl: u64) -> Result<(), String> {
    let user = UserId::parse(user_id).map_err(|e| format!("USER_ID: {e}"))?;
    let auth = config.authenticator().map_err(|e| e.to_string())?;
    let token = auth.issue(&user, ttl)?;
    #[allow(clippy::print_stdout)]
    {
        println!("{token}");
    }
    Ok(())
}

fn run_server(config: Config) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    runtime.block_on(async move {
        let auth = config.authenticator().map_err(|e| e.to_string())?;
        let options = config.connect_options().map_err(|e| e.to_string())?;
        let listener = TcpListener::bind(&config.listen_addr)
            .await
            .map_err(|e| format!("KPS_LISTEN_ADDR: cannot bind {}: {e}", config.listen_addr))?;
        let store = store::connect(&options)
            .await
            .map_err(|e| format!("DATABASE_URL: {e}"))?;
        let state = AppState::new(store, auth, config.limits());
        let addr = listener
            .local_addr()
            .map_err(|e| format!("KPS_LISTEN_ADDR: {e}"))?;
        let shutdown = shutdown_signal()?;
        tracing::info!(%addr, backend = backend_name(&options.url), "ready to serve");
        app::serve(listener, state, shutdown)
            .await
            .map_err(|e| format!("server error: {e}"))?;
        tracing::info!("shut down cleanly");
        Ok(())
    })
}

fn backend_name(url: &str) -> &'static str {
    if url.starts_with("sqlite:") {
        "sqlite"
    } else {
        "postgres"
    }
}

/// Starts listening for SIGINT and SIGTERM at once, and resolves when either arrives.
///
/// Registering before the ready line matters: a signal that arrives between that line and the
/// first poll of a lazily registered listener would otherwise kill the process or be lost.
#[cfg(unix)]
fn shutdown_signal() -> Result<impl std::future::Future<Output = ()> + Send + 'static, String> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut interrupt =
        signal(SignalKind::interrupt()).map_err(|e| format!("cannot listen for SIGINT: {e}"))?;
    let mut terminate =
        signal(SignalKind::terminate()).map_err(|e| format!("cannot listen for SIGTERM: {e}"))?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {},
            _ = terminate.recv() => {},
        }
        tracing::info!("shutdown signal received, draining in-flight requests");
    })
}

/// Resolves on Ctrl-C.
#[cfg(not(unix))]
fn shutdown_signal() -> Result<impl std::future::Future<Output = ()> + Send + 'static, String> {
    Ok(async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
        tracing::info!("shutdown signal received, draining in-flight requests");
    })
}
