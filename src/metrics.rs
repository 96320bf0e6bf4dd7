//! Prometheus metrics: requests and latency per route and status, and the domain counters.
//! Every label value comes from a small fixed set, so no request can add a series.

use std::{sync::Arc, time::Instant};

use axum::{
    extract::{MatchedPath, Request, State},
    http::Method,
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
    method: &'static str,
    route: String,
    status: u16,
}

/// Labels of the latency histogram.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    method: &'static str,
    route: String,
}

/// Labels of the refused-upload counter: `reason` is an upload error code (a fixed set).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    reason: &'static str,
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
    /// Expired regular key packages removed (by consumptions and uploads).
    pub expired_removed: Counter,
    refused: Family<RefusalLabels, Counter>,
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
        let expired_removed = Counter::default();
        let refused = Family::<RefusalLabels, Counter>::default();
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
        registry.register(
            "expired_key_packages_removed",
            "Expired regular key packages removed, never handed out",
            expired_removed.clone(),
        );
        registry.register(
            "key_package_uploads_refused",
            "Uploads refused before anything was stored, by error code",
            refused.clone(),
        );
        Self {
            registry,
            requests,
            latency,
            uploaded,
            consumed,
            last_resort_handouts,
            rate_limited,
            expired_removed,
            refused,
        }
    }
}

impl Metrics {
    /// Counts one upload refused with error code `reason` (one of the upload error codes).
    pub fn upload_refused(&self, reason: &'static str) {
        self.refused.get_or_create(&RefusalLabels { reason }).inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "metrics did not encode");
        }
        out
    }
}

/// The `route` label of a request that matched no route.
const UNMATCHED: &str = "unmatched";

/// The `method` label: hyper accepts any token as a method, so an unbounded label would let
/// anyone without a token add series (and memory) forever; every other method is `OTHER`.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        _ => "OTHER",
    }
}

/// Middleware counting every request and its latency under its route template (a fixed set:
/// the route table's, or `unmatched`), its method label and its status.
pub async fn track(State(metrics): State<Arc<Metrics>>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = method_label(req.method());
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or(UNMATCHED, MatchedPath::as_str)
        .to_owned();
    let response = next.run(req).await;
    let status = response.status().as_u16();
    if status == 429 {
        metrics.rate_limited.inc();
    }
    metrics
        .latency
        .get_or_create(&RouteLabels {
            method,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_outside_the_api_share_one_label() {
        for (method, label) in [
            (Method::GET, "GET"),
            (Method::POST, "POST"),
            (Method::DELETE, "DELETE"),
            (Method::HEAD, "HEAD"),
            (Method::PUT, "OTHER"),
            (Method::from_bytes(b"X-ANYTHING").unwrap(), "OTHER"),
        ] {
            assert_eq!(method_label(&method), label);
        }
    }
}
