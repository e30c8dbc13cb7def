//! Logs, traces and the metrics registry, started once per process.
//!
//! Spans are always created with an OpenTelemetry context, so trace context flows through Kafka
//! headers even when nothing is exported; the OTLP/HTTP exporter is added when
//! `telemetry.otlp_endpoint` is set.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::{
    Resource,
    trace::{Sampler, SdkTracerProvider},
};
use tracing_subscriber::{
    EnvFilter, Layer as _, filter, layer::SubscriberExt, util::SubscriberInitExt,
};

use crate::config::{LogFormat, TelemetryConfig};

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("could not build the OTLP exporter for {endpoint}: {reason}")]
    Exporter { endpoint: String, reason: String },
    #[error("a global tracing subscriber is already installed")]
    AlreadyInstalled,
}

/// Flushes buffered spans when dropped; keep it alive until the service exits.
#[must_use = "dropping the guard stops span export"]
pub struct TelemetryGuard {
    provider: SdkTracerProvider,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        let provider = self.provider.clone();
        // The exporter's blocking HTTP client must not be shut down on an async thread.
        let _ = std::thread::spawn(move || provider.shutdown()).join();
    }
}

/// Installs the global subscriber (JSON or pretty logs, filtered by `RUST_LOG` or
/// `telemetry.log_level`), the OpenTelemetry layer, and the W3C trace-context propagator.
pub fn init(
    service: &'static str,
    config: &TelemetryConfig,
) -> Result<TelemetryGuard, TelemetryError> {
    let provider = tracer_provider(service, config)?;
    let otel_layer = tracing_opentelemetry::layer().with_tracer(provider.tracer(service));
    // OpenTelemetry's own diagnostics are noise at INFO (and repeat the `message` key in JSON).
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new(format!(
            "{},opentelemetry=warn,opentelemetry_sdk=warn",
            config.log_level
        ))
    });
    let registry = tracing_subscriber::registry().with(filter).with(otel_layer);
    let installed = match config.log_format {
        // JSON lines carry no span fields, so the layer is shown events only: otherwise it
        // formats and stores the fields of every span, which cost a tenth of the worker's CPU.
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_span_list(false)
                    .with_writer(std::io::stderr)
                    .with_filter(filter::filter_fn(|metadata| metadata.is_event())),
            )
            .try_init(),
        LogFormat::Pretty => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .compact()
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
    installed.map_err(|_| TelemetryError::AlreadyInstalled)?;
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    opentelemetry::global::set_tracer_provider(provider.clone());
    Ok(TelemetryGuard { provider })
}

/// A tracer provider for `service`, exporting over OTLP/HTTP when an endpoint is configured.
pub fn tracer_provider(
    service: &'static str,
    config: &TelemetryConfig,
) -> Result<SdkTracerProvider, TelemetryError> {
    let sampler = Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
        config.trace_sample_ratio,
    )));
    let resource = Resource::builder().with_service_name(service).build();
    let mut builder = SdkTracerProvider::builder()
        .with_sampler(sampler)
        .with_resource(resource);
    if let Some(endpoint) = config.otlp_endpoint.clone() {
        // The exporter's blocking HTTP client panics when built on an async thread.
        let built = std::thread::spawn({
            let endpoint = endpoint.clone();
            move || {
                opentelemetry_otlp::SpanExporter::builder()
                    .with_http()
                    .with_endpoint(endpoint)
                    .build()
            }
        })
        .join()
        .map_err(|_| "building the exporter panicked".to_owned())
        .and_then(|built| built.map_err(|e| e.to_string()));
        let exporter = built.map_err(|reason| TelemetryError::Exporter { endpoint, reason })?;
        builder = builder.with_batch_exporter(exporter);
    }
    Ok(builder.build())
}
