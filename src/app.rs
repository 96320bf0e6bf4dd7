//! Application state, the router with its middleware stack, and the serve loop.

use std::{future::Future, sync::Arc, time::Duration};

use axum::{
    extract::{DefaultBodyLimit, Request},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    Router,
};
use tokio::net::TcpListener;
use tower_http::trace::TraceLayer;

use crate::{
    auth::Authenticator,
    error::ApiError,
    key_package::UploadPolicy,
    metrics::Metrics,
    rate_limit::{self, Budget, ClaimBudgets, ConsumeLimiter},
    routes,
    store::KeyPackageStore,
};

/// Limits and budgets the request path enforces.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// The per-target consumption budget.
    pub budget: Budget,
    /// The per-caller consumption budget, over all targets; `None`: off.
    pub caller_budget: Option<Budget>,
    /// The per-caller-and-target consumption budget; `None`: off.
    pub pair_budget: Option<Budget>,
    /// How long a claim with an `Idempotency-Key` is remembered.
    pub idempotency_ttl: Duration,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// Longest a request may take, body upload included.
    pub request_timeout: Duration,
    /// Most client connections served at once; beyond it new ones wait in the kernel backlog.
    pub max_connections: usize,
    /// What uploads must satisfy beyond v1's checks.
    pub upload: UploadPolicy,
}

impl Default for Limits {
    fn default() -> Self {
        let budgets = ClaimBudgets::defaults();
        Self {
            budget: budgets.target,
            caller_budget: budgets.caller,
            pair_budget: budgets.pair,
            idempotency_ttl: Duration::from_secs(600),
            max_body_bytes: 262_144,
            request_timeout: Duration::from_secs(10),
            max_connections: 4096,
            upload: UploadPolicy::default(),
        }
    }
}

impl Limits {
    /// The three budgets of a claim.
    pub fn claim_budgets(&self) -> ClaimBudgets {
        ClaimBudgets {
            caller: self.caller_budget,
            pair: self.pair_budget,
            target: self.budget,
        }
    }
}

/// What every handler can reach. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    /// Where key packages live.
    pub store: Arc<dyn KeyPackageStore>,
    /// Bearer-token verification.
    pub auth: Arc<Authenticator>,
    /// Prometheus metrics of this instance.
    pub metrics: Arc<Metrics>,
    /// The process-local consumption limiter.
    pub limiter: Arc<ConsumeLimiter>,
    /// Limits in force.
    pub limits: Limits,
}

impl AppState {
    /// Assembles the state; the limiter follows the limits' budgets.
    pub fn new(store: Arc<dyn KeyPackageStore>, auth: Authenticator, limits: Limits) -> Self {
        Self {
            store,
            auth: Arc::new(auth),
            metrics: Arc::new(Metrics::default()),
            limiter: Arc::new(ConsumeLimiter::new(limits.claim_budgets())),
            limits,
        }
    }
}

/// The whole HTTP application.
pub fn router(state: AppState) -> Router {
    routes::routes(state.clone())
        .fallback(|| async { ApiError::NotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(middleware::from_fn_with_state(
            state.limits.request_timeout,
            request_timeout,
        ))
        .layer(DefaultBodyLimit::max(state.limits.max_body_bytes))
        .layer(middleware::from_fn_with_state(
            state.limits.max_body_bytes,
            refuse_announced_oversize,
        ))
        .layer(middleware::from_fn_with_state(
            state.metrics.clone(),
            crate::metrics::track,
        ))
        .layer(TraceLayer::new_for_http().make_span_with(request_span))
}

/// One span per request, named by method and route template: never the query, a token or a body.
fn request_span(req: &Request) -> tracing::Span {
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or("unmatched", |p| p.as_str());
    tracing::info_span!("request", method = %req.method(), route = %route)
}

/// Cuts requests, slow bodies included, that take longer than the configured timeout.
async fn request_timeout(
    axum::extract::State(limit): axum::extract::State<Duration>,
    req: Request,
    next: Next,
) -> Response {
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(response) => response,
        Err(_) => ApiError::Timeout.into_response(),
    }
}

/// Refuses at once a request whose `Content-Length` announces more than the body limit, instead
/// of waiting (up to the request timeout) for a body that would be refused anyway.
async fn refuse_announced_oversize(
    axum::extract::State(limit): axum::extract::State<usize>,
    req: Request,
    next: Next,
) -> Response {
    let announced = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if announced.is_some_and(|length| length > limit as u64) {
        return ApiError::PayloadTooLarge.into_response();
    }
    next.run(req).await
}

/// Longest a client may take to send a request's headers (slow-loris protection).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Most bytes hyper buffers per connection while reading a request; a bound on what each of
/// up to `max_connections` clients can make the server hold (headers must fit in it).
const MAX_BUF_SIZE: usize = 128 * 1024;

/// How long to pause accepting when the process or system is out of descriptors or memory.
const EXHAUSTION_BACKOFF: Duration = Duration::from_millis(50);

/// The background work a server needs beside [`serve`]: pruning the process-local limiter and
/// the consumption budgets in the database. Started in one place (the binary's `run_server`);
/// the tasks stop when this is dropped.
pub struct BackgroundTasks(Vec<tokio::task::JoinHandle<()>>);

impl BackgroundTasks {
    /// Starts every background task for `state` on the current runtime.
    pub fn start(state: &AppState) -> Self {
        Self(vec![
            rate_limit::spawn_limiter_pruning(
                state.limiter.clone(),
                rate_limit::LIMITER_PRUNE_EVERY,
            ),
            rate_limit::spawn_budget_pruning(state.store.clone(), rate_limit::BUDGET_PRUNE_EVERY),
        ])
    }
}

impl Drop for BackgroundTasks {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// Serves `router(state)` on `listener` until `shutdown` resolves, then stops accepting and
/// waits for in-flight requests to finish.
///
/// This runs no background work: the pruners are started separately by
/// [`BackgroundTasks::start`], which the binary calls next to this.
///
/// A hand-written accept loop rather than `axum::serve`, for what that does not offer: a timer
/// on header reads (slow-loris protection), a bounded read buffer, and a cap on open
/// connections. A slot is taken before `accept`, so at the cap new clients wait in the kernel
/// backlog instead of using up the descriptors the database pool needs too.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper_util::{
        rt::{TokioIo, TokioTimer},
        server::graceful::GracefulShutdown,
        service::TowerToHyperService,
    };
    use tower::ServiceExt;

    let slots = Arc::new(tokio::sync::Semaphore::new(
        state
            .limits
            .max_connections
            .clamp(1, tokio::sync::Semaphore::MAX_PERMITS),
    ));
    let app = router(state);
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break, // never closed
            },
            () = &mut shutdown => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) if is_resource_exhaustion(&e) => {
                    // Retrying at once would spin on the same error until something frees up.
                    tracing::warn!(error = %e, "accept failed: out of resources, pausing");
                    tokio::select! {
                        () = tokio::time::sleep(EXHAUSTION_BACKOFF) => continue,
                        () = &mut shutdown => break,
                    }
                }
                Err(e) => {
                    // One client's failure (ECONNABORTED, ...): the next may be fine.
                    tracing::debug!(error = %e, "accept failed");
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone().map_request(
            |req: axum::http::Request<hyper::body::Incoming>| req.map(axum::body::Body::new),
        ));
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .max_buf_size(MAX_BUF_SIZE)
            .serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            // Held until the connection ends, then the slot frees for the next client.
            let _slot = slot;
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// Whether an accept error means the process or system ran out of descriptors, buffers or
/// memory (worth a pause), rather than one client's connection failing.
fn is_resource_exhaustion(error: &std::io::Error) -> bool {
    if error.kind() == std::io::ErrorKind::OutOfMemory {
        return true;
    }
    #[cfg(unix)]
    {
        matches!(
            error.raw_os_error(),
            Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
        )
    }
    #[cfg(not(unix))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_exhaustion_errors_pause_the_accept_loop() {
        let os = std::io::Error::from_raw_os_error;
        #[cfg(unix)]
        for code in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM] {
            assert!(is_resource_exhaustion(&os(code)), "{code}");
        }
        #[cfg(unix)]
        for code in [
            libc::ECONNABORTED,
            libc::ECONNRESET,
            libc::EPROTO,
            libc::EPERM,
        ] {
            assert!(!is_resource_exhaustion(&os(code)), "{code}");
        }
        let kind = std::io::ErrorKind::ConnectionAborted;
        assert!(!is_resource_exhaustion(&kind.into()));
    }
}
