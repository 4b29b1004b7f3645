//! Prometheus metrics on `admin_listen` (design.md §9): requests by label, operation and
//! outcome, a latency histogram, pending requests (read from the shared database, so every
//! replica reports the fleet's number) and upstream errors.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub label: String,
    pub operation: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    pub label: String,
    pub operation: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    pub label: String,
    pub kind: String,
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub latency: Family<OpLabels, Histogram>,
    pub pending: Gauge,
    pub upstream_errors: Family<UpstreamLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("enroll_gateway");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register("requests", "EST requests by label, operation and outcome", requests.clone());
        let latency = Family::<OpLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.005, 2.0, 14))
        });
        registry.register("request_duration_seconds", "EST request latency", latency.clone());
        let pending = Gauge::default();
        registry.register(
            "pending_requests",
            "requests waiting for the vendor (whole database)",
            pending.clone(),
        );
        let upstream_errors = Family::<UpstreamLabels, Counter>::default();
        registry.register("upstream_errors", "upstream calls that failed, by kind", upstream_errors.clone());
        Self { registry, requests, latency, pending, upstream_errors }
    }

    pub fn request(&self, label: &str, operation: &str, outcome: &str, seconds: f64) {
        self.requests
            .get_or_create(&RequestLabels {
                label: label.into(),
                operation: operation.into(),
                outcome: outcome.into(),
            })
            .inc();
        self.latency
            .get_or_create(&OpLabels { label: label.into(), operation: operation.into() })
            .observe(seconds);
    }

    pub fn upstream_error(&self, label: &str, kind: &str) {
        self.upstream_errors.get_or_create(&UpstreamLabels { label: label.into(), kind: kind.into() }).inc();
    }

    /// The OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String");
        out
    }
}
