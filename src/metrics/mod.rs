//! Prometheus metrics of the operator process, with the names fixed in DESIGN.md: each part
//! (the controller, the webhooks, the listeners) registers its own, and one registry encodes them.

mod controller;
mod webhook;

use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

pub use self::controller::ControllerMetrics;
pub use self::webhook::WebhookMetrics;
use crate::serve::ListenerMetrics;

fn latency_buckets() -> Histogram {
    // 100 µs .. ~13 s
    Histogram::new(exponential_buckets(0.0001, 2.0, 18))
}

pub struct Metrics {
    registry: Registry,
    pub controller: ControllerMetrics,
    pub webhook: WebhookMetrics,
    /// The webhook's and the metrics port's connections.
    pub listeners: ListenerMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let controller = ControllerMetrics::register(&mut registry);
        let webhook = WebhookMetrics::register(&mut registry);
        let listeners = ListenerMetrics::default();
        listeners.register(&mut registry, "mcp_operator");
        Self {
            registry,
            controller,
            webhook,
            listeners,
        }
    }
}

impl Metrics {
    /// Prometheus text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::store::SessionCounts;

    #[test]
    fn series_come_and_go_with_policies_and_pods() {
        let metrics = Metrics::default();
        let counts = SessionCounts {
            total: 5,
            active: 4,
            draining: 1,
            ..Default::default()
        };
        metrics.controller.set_sessions(
            "prod",
            "api",
            &counts,
            &[("api-0".into(), 3), ("api-1".into(), 1)],
        );
        let text = metrics.encode();
        assert!(
            text.contains(r#"mcp_sessions{namespace="prod",policy="api",state="active"} 4"#),
            "{text}"
        );
        assert!(
            text.contains(r#"mcp_sessions_per_pod{namespace="prod",policy="api",pod="api-1"} 1"#),
            "{text}"
        );
        metrics
            .controller
            .set_sessions("prod", "api", &counts, &[("api-0".into(), 3)]);
        assert!(
            !metrics.encode().contains(r#"pod="api-1""#),
            "vanished pod's series removed"
        );
        metrics.controller.forget_policy("prod", "api");
        let text = metrics.encode();
        assert!(!text.contains(r#"policy="api""#), "{text}");
        metrics
            .controller
            .reconciled("ok", Duration::from_millis(3));
        assert!(
            metrics
                .encode()
                .contains(r#"mcp_session_operator_reconciles_total{result="ok"} 1"#)
        );
    }
}
