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
    metrics::Metrics,
    rate_limit::{self, Budget, ConsumeLimiter},
    routes,
    store::KeyPackageStore,
};

/// Limits and budgets the request path enforces.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// The per-target consumption budget.
    pub budget: Budget,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// Longest a request may take, body upload included.
    pub request_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            budget: Budget::per_minute(10),
            max_body_bytes: 262_144,
            request_timeout: Duration::from_secs(10),
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
    /// Assembles the state; the limiter follows `limits.budget`.
    pub fn new(store: Arc<dyn KeyPackageStore>, auth: Authenticator, limits: Limits) -> Self {
        Self {
            store,
            auth: Arc::new(auth),
            metrics: Arc::new(Metrics::default()),
            limiter: Arc::new(ConsumeLimiter::new(limits.budget)),
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
            state.clone(),
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

/// Serves `router(state)` on `listener` until `shutdown` resolves, then stops accepting and
/// waits for in-flight requests to finish.
///
/// A hand-rolled accept loop rather than `axum::serve`, to bound header reads with a timer
/// and to set `TCP_NODELAY` on every connection.
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

    let pruning =
        rate_limit::spawn_limiter_pruning(state.limiter.clone(), rate_limit::LIMITER_PRUNE_EVERY);
    let budgets =
        rate_limit::spawn_budget_pruning(state.store.clone(), rate_limit::BUDGET_PRUNE_EVERY);
    let app = router(state);
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Typically EMFILE: back off instead of spinning on the error.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
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
            .serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    pruning.abort();
    budgets.abort();
    Ok(())
}
