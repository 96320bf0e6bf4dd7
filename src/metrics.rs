//! Prometheus metrics: requests and latency per route and status, and the domain counters.

use std::time::Instant;

use axum::{
    extract::{MatchedPath, Request, State},
    middleware::Next,
    response::Response,
};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        histogram::{exponential_buckets, Histogram},
    },
    registry::Registry,
};

/// Labels of the per-request metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: String,
    route: String,
    status: u16,
}

/// Labels of the latency histogram.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    method: String,
    route: String,
}

fn latency_histogram() -> Histogram {
    // 0.25 ms … ~4 s
    Histogram::new(exponential_buckets(0.000_25, 2.0, 15))
}

/// All metrics of one server instance (no global registry, so tests can run many servers).
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Family<RouteLabels, Histogram, fn() -> Histogram>,
    /// Key packages stored by uploads.
    pub uploaded: Counter,
    /// Regular key packages handed out (and removed).
    pub consumed: Counter,
    /// Last-resort key packages handed out.
    pub last_resort_handouts: Counter,
    /// Consumption requests refused by the budget.
    pub rate_limited: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("kps");
        let requests = Family::<RequestLabels, Counter>::default();
        let latency: Family<RouteLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram);
        let uploaded = Counter::default();
        let consumed = Counter::default();
        let last_resort_handouts = Counter::default();
        let rate_limited = Counter::default();
        registry.register(
            "http_requests",
            "HTTP requests by route and status",
            requests.clone(),
        );
        registry.register_with_unit(
            "http_request_duration",
            "HTTP request latency by route",
            prometheus_client::registry::Unit::Seconds,
            latency.clone(),
        );
        registry.register(
            "key_packages_uploaded",
            "Key packages stored",
            uploaded.clone(),
        );
        registry.register(
            "key_packages_consumed",
            "Regular key packages handed out",
            consumed.clone(),
        );
        registry.register(
            "last_resort_handouts",
            "Last-resort key packages handed out",
            last_resort_handouts.clone(),
        );
        registry.register(
            "rate_limited_requests",
            "Consumption requests refused by the per-target budget",
            rate_limited.clone(),
        );
        Self {
            registry,
            requests,
            latency,
            uploaded,
            consumed,
            last_resort_handouts,
            rate_limited,
        }
    }
}

impl Metrics {
    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "metrics did not encode");
        }
        out
    }
}

/// Middleware counting every routed request and its latency under its route template.
pub async fn track(
    State(state): State<crate::app::AppState>,
    req: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let method = req.method().as_str().to_owned();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str)
        .to_owned();
    let response = next.run(req).await;
    let status = response.status().as_u16();
    let metrics = &state.metrics;
    if status == 429 {
        metrics.rate_limited.inc();
    }
    metrics
        .latency
        .get_or_create(&RouteLabels {
            method: method.clone(),
            route: route.clone(),
        })
        .observe(started.elapsed().as_secs_f64());
    metrics
        .requests
        .get_or_create(&RequestLabels {
            method,
            route,
            status,
        })
        .inc();
    response
}
