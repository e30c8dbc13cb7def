//! The Prometheus registry a service registers its metrics in, and its text encoding.
//!
//! Metric names are declared once, next to the code that records them, as typed families;
//! every pipeline metric is prefixed `triage_`.

use std::sync::Arc;

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{family::Family, gauge::Gauge},
    registry::Registry,
};

/// Prefix of every metric the pipeline exports.
pub const PREFIX: &str = "triage";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildInfoLabels {
    service: String,
    version: String,
}

/// A registry being filled at start-up. Once every metric is registered it is frozen into a
/// [`MetricsHandle`] that the admin server encodes on each scrape.
pub struct MetricsRegistry {
    registry: Registry,
}

impl MetricsRegistry {
    pub fn new(service: &str) -> Self {
        let mut registry = Registry::with_prefix(PREFIX);
        let build_info = Family::<BuildInfoLabels, Gauge>::default();
        build_info
            .get_or_create(&BuildInfoLabels {
                service: service.to_owned(),
                version: env!("CARGO_PKG_VERSION").to_owned(),
            })
            .set(1);
        registry.register(
            "build_info",
            "Service name and version; always 1",
            build_info,
        );
        MetricsRegistry { registry }
    }

    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    pub fn freeze(self) -> MetricsHandle {
        MetricsHandle(Arc::new(self.registry))
    }
}

/// A read-only, shareable view of the registry.
#[derive(Clone)]
pub struct MetricsHandle(Arc<Registry>);

impl MetricsHandle {
    /// The OpenMetrics text exposition of every registered metric.
    // Writing to a String cannot fail.
    #[allow(clippy::expect_used)]
    pub fn encode(&self) -> String {
        let mut text = String::new();
        encode(&mut text, &self.0).expect("writing to a String cannot fail");
        text
    }
}
