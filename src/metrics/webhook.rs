//! The admission webhooks' metrics.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::latency_buckets;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WebhookLabels {
    pub webhook: &'static str,
    pub result: &'static str,
}

pub struct WebhookMetrics {
    requests: Family<WebhookLabels, Counter>,
    duration: Family<WebhookLabels, Histogram>,
}

impl WebhookMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let requests = Family::<WebhookLabels, Counter>::default();
        registry.register(
            "mcp_session_webhook_requests",
            "Admission requests by webhook and result",
            requests.clone(),
        );
        let duration = Family::<WebhookLabels, Histogram>::new_with_constructor(
            latency_buckets as fn() -> Histogram,
        );
        registry.register(
            "mcp_session_webhook_duration_seconds",
            "Time to answer an admission request",
            duration.clone(),
        );
        Self { requests, duration }
    }

    pub fn request(&self, webhook: &'static str, answered: bool, took: Duration) {
        let labels = WebhookLabels {
            webhook,
            result: if answered { "answered" } else { "bad_request" },
        };
        self.requests.get_or_create(&labels).inc();
        self.duration
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
    }
}
