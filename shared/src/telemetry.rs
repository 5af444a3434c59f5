//! Structured logs and trace context for service processes.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::{EnvFilter, layer::SubscriberExt, util::SubscriberInitExt};

/// Installs the global subscriber: an env filter (`RUST_LOG`, default
/// `info`), JSON or human logs, and an OpenTelemetry layer so every span has
/// a W3C trace ID that travels in NATS headers. Spans are not exported
/// anywhere yet; the IDs still link logs across services.
pub fn init(service: &'static str, json: bool) {
    init_with_default(service, json, "info");
}

/// Same, with `default_filter` when `RUST_LOG` is unset.
pub fn init_with_default(service: &'static str, json: bool, default_filter: &str) {
    let provider = SdkTracerProvider::builder().build();
    let tracer = provider.tracer(service);
    opentelemetry::global::set_tracer_provider(provider);
    let otel = tracing_opentelemetry::layer().with_tracer(tracer);
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let registry = tracing_subscriber::registry().with(filter).with(otel);
    // A second init (tests running several services) keeps the first one.
    let _ = if json {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_current_span(true),
            )
            .try_init()
    } else {
        registry.with(tracing_subscriber::fmt::layer()).try_init()
    };
}
