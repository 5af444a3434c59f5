//! Structured logs and traces for service processes.
//!
//! Spans are exported over OTLP when the standard variables ask for it
//! (`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`;
//! `OTEL_EXPORTER_OTLP_PROTOCOL` = `grpc` or `http/protobuf`;
//! `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER`,
//! `OTEL_BSP_*`), batched on the SDK's own thread so the hot path never waits
//! for the collector, and flushed by [`shutdown`]. Without them nothing is
//! exported, but every span still has a W3C trace ID that travels in NATS
//! headers and links logs across services.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::{EnvFilter, layer::SubscriberExt, util::SubscriberInitExt};

static PROVIDER: Mutex<Option<SdkTracerProvider>> = Mutex::new(None);

/// Whether [`init`] started span export.
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Whether this process exports its spans (set by [`init`]).
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// Installs the global subscriber: an env filter (`RUST_LOG`, default
/// `info`), JSON or human logs, and the OpenTelemetry layer.
pub fn init(service: &'static str, json: bool) {
    init_with_default(service, json, "info");
}

/// Same, with `default_filter` when `RUST_LOG` is unset.
pub fn init_with_default(service: &'static str, json: bool, default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let (provider, export_error) = provider(service);
    let exported = export_configured() && export_error.is_none();
    EXPORTING.store(exported, Ordering::Relaxed);
    let tracer = provider.tracer(service);
    opentelemetry::global::set_tracer_provider(provider.clone());
    *PROVIDER.lock().unwrap_or_else(|e| e.into_inner()) = Some(provider);
    // Unexported spans only give trace IDs to carry across the bus: skip
    // the timings, thread names and code locations each would record.
    let otel = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_tracked_inactivity(exported)
        .with_threads(exported)
        .with_location(exported);
    let registry = tracing_subscriber::registry()
        .with(filter)
        .with(otel)
        .with(LastError);
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
        // Colours only for a person at a terminal: a file, a pipe or
        // `docker logs` gets plain text, not escape codes.
        let ansi = std::io::stdout().is_terminal()
            && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
        registry
            .with(tracing_subscriber::fmt::layer().with_ansi(ansi))
            .try_init()
    };
    if let Some(err) = export_error {
        let error = crate::error::one_line(&err);
        tracing::error!(%error, "OTLP trace export not started; spans are not exported");
    }
}

/// Flushes and stops span export; call once, as the process ends.
pub fn shutdown() {
    let provider = PROVIDER.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(provider) = provider
        && let Err(err) = provider.shutdown()
    {
        tracing::warn!(error = %err, "flushing spans on shutdown failed");
    }
}

/// Whether the environment asks for OTLP export.
pub fn export_configured() -> bool {
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|v| std::env::var_os(v).is_some_and(|s| !s.is_empty()))
}

/// Why spans are not exported although the environment asks for it.
#[derive(Debug, thiserror::Error)]
enum ExportError {
    #[error("unsupported OTEL_EXPORTER_OTLP_PROTOCOL {0:?} (grpc or http/protobuf)")]
    Protocol(String),
    #[error("OTLP over HTTP needs a Tokio runtime")]
    NoRuntime(#[source] tokio::runtime::TryCurrentError),
    #[error("cannot build the OTLP HTTP client")]
    Client(#[source] reqwest::Error),
    #[error(transparent)]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
}

fn provider(service: &'static str) -> (SdkTracerProvider, Option<ExportError>) {
    // OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES (read by the builder)
    // win over the service's own name.
    let mut resource = Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(service);
    }
    let builder = SdkTracerProvider::builder().with_resource(resource.build());
    if !export_configured() {
        return (builder.build(), None);
    }
    match exporter() {
        Ok(exporter) => (builder.with_batch_exporter(exporter).build(), None),
        Err(err) => (builder.build(), Some(err)),
    }
}

/// The exporter the standard variables describe (gRPC when they name no
/// protocol, as the OTLP specification's most common setting).
fn exporter() -> Result<opentelemetry_otlp::SpanExporter, ExportError> {
    use opentelemetry_otlp::{SpanExporter, WithHttpConfig};
    let protocol = std::env::var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        .or_else(|_| std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL"))
        .unwrap_or_else(|_| "grpc".into());
    match protocol.as_str() {
        "grpc" => SpanExporter::builder().with_tonic().build(),
        "http/protobuf" => SpanExporter::builder()
            .with_http()
            .with_http_client(RuntimeHttpClient::new()?)
            .build(),
        other => return Err(ExportError::Protocol(other.to_owned())),
    }
    .map_err(ExportError::from)
}

/// An HTTP client for the SDK's export thread that runs each request on
/// the process's Tokio runtime (the thread itself has none).
#[derive(Debug)]
struct RuntimeHttpClient {
    runtime: tokio::runtime::Handle,
    client: reqwest::Client,
}

impl RuntimeHttpClient {
    fn new() -> Result<RuntimeHttpClient, ExportError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(ExportError::NoRuntime)?;
        let client = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(10))
            .build()
            .map_err(ExportError::Client)?;
        Ok(RuntimeHttpClient { runtime, client })
    }
}

#[tonic::async_trait]
impl opentelemetry_http::HttpClient for RuntimeHttpClient {
    async fn send_bytes(
        &self,
        request: opentelemetry_http::Request<opentelemetry_http::Bytes>,
    ) -> Result<
        opentelemetry_http::Response<opentelemetry_http::Bytes>,
        opentelemetry_http::HttpError,
    > {
        let request = reqwest::Request::try_from(request.map(reqwest::Body::from))?;
        let client = self.client.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.runtime.spawn(async move {
            let result = async {
                let response = client.execute(request).await?;
                let status = response.status();
                let body = response.bytes().await?;
                Ok::<_, reqwest::Error>((status, body))
            }
            .await;
            let _ = tx.send(result);
        });
        let (status, body) = rx.await??;
        let mut response = opentelemetry_http::Response::new(body);
        *response.status_mut() = status;
        Ok(response)
    }
}

/// Keeps the last error logged, for `pushbus status`.
struct LastError;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for LastError {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if *event.metadata().level() != tracing::Level::ERROR {
            return;
        }
        let mut text = Text::default();
        event.record(&mut text);
        let mut line = text.message;
        line.push_str(&text.fields);
        crate::status::record_error(event.metadata().target(), &text.whose, line);
    }
}

#[derive(Default)]
struct Text {
    message: String,
    fields: String,
    /// The fields that can say whose error it is (`service`, `client`,
    /// `consumer`), for `pushbus status`.
    whose: Vec<(&'static str, String)>,
}

impl Text {
    fn field(&mut self, field: &tracing::field::Field, value: String) {
        use std::fmt::Write;
        if field.name() == "message" {
            self.message.push_str(&value);
            return;
        }
        let _ = write!(self.fields, " {}={value}", field.name());
        if crate::status::WHOSE_FIELDS.contains(&field.name()) {
            self.whose.push((field.name(), value));
        }
    }
}

impl tracing::field::Visit for Text {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.field(field, format!("{value:?}"));
    }

    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.field(field, value.to_owned());
    }
}
