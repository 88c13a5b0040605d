//! Traces and logs of the delegation system.
//!
//! - Logs go to stderr as text or JSON lines ([`LogFormat`]), filtered by `RUST_LOG` or a default.
//! - Traces go to an OTLP collector over gRPC when the standard `OTEL_*` variables ask for it
//!   ([`OtlpConfig::from_env`]); otherwise no OpenTelemetry layer is installed, no trace span is created
//!   ([`enabled`] is false) and the services carry W3C trace context exactly as before.
//! - [`follow`] and [`traceparent`] move W3C trace context between `tracing` spans and message headers
//!   (bus or HTTP), so that one delegation is one trace across services and deployments.
//!
//! Trace spans are made at INFO with their own filter, independent of the log filter: a span filtered out
//! has no trace context, and `RUST_LOG=warn` must not cut the traces (STACK.md).

use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

pub use tracing_opentelemetry::OpenTelemetrySpanExt as SpanExt;

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported: services create trace spans only then, so that without an exporter the
/// hot path pays nothing.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per line (`timestamp`, `level`, `target`, `fields`, `spans`), for log shippers.
    Json,
}

/// Why telemetry could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("the OTLP exporter cannot be built: {0}")]
    Exporter(String),
    #[error("a log subscriber is already installed")]
    AlreadyInstalled,
}

/// Where and as what spans are exported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtlpConfig {
    /// The collector's gRPC endpoint (`http://host:4317`).
    pub endpoint: String,
    /// `service.name` of the resource (`OTEL_SERVICE_NAME` overrides it).
    pub service_name: String,
}

/// The variables that turn export on: an OTLP endpoint, general or for traces.
const ENDPOINT_VARS: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
];

impl OtlpConfig {
    /// Export is on when an OTLP endpoint is set (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, else
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`) and `OTEL_SDK_DISABLED` and `OTEL_TRACES_EXPORTER=none` do not
    /// turn it off. `lookup` reads a variable (the process environment in `main`, a map in tests).
    pub fn from_env(
        lookup: impl Fn(&str) -> Option<String>,
        default_service_name: &str,
    ) -> Option<Self> {
        if lookup("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
            return None;
        }
        if lookup("OTEL_TRACES_EXPORTER").is_some_and(|v| v.trim().eq_ignore_ascii_case("none")) {
            return None;
        }
        let endpoint = ENDPOINT_VARS
            .iter()
            .find_map(|name| lookup(name).filter(|v| !v.trim().is_empty()))?;
        let service_name = lookup("OTEL_SERVICE_NAME")
            .filter(|v| !v.trim().is_empty())
            .unwrap_or_else(|| default_service_name.to_string());
        Some(Self {
            endpoint: endpoint.trim().to_string(),
            service_name,
        })
    }
}

/// A tracer provider exporting to `config.endpoint` over gRPC through a batch processor (spans are queued
/// and sent from a background thread; a full queue drops spans rather than slowing the service). The
/// SDK reads the other `OTEL_*` variables itself: `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER`(`_ARG`),
/// `OTEL_BSP_*`, `OTEL_EXPORTER_OTLP_(TRACES_)TIMEOUT|HEADERS|COMPRESSION`. Must be called inside a Tokio
/// runtime, which carries the gRPC connection for as long as the provider lives.
pub fn tracer_provider(config: &OtlpConfig) -> Result<SdkTracerProvider, TelemetryError> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(config.endpoint.clone())
        .build()
        .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(config.service_name.clone())
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

/// The `tracing` layer sending spans to `provider`, with its own filter (spans of this project's crates
/// at INFO and above, whatever the log filter says). Marks export as [`enabled`].
pub fn otel_layer<S>(provider: &SdkTracerProvider) -> impl Layer<S> + Send + Sync + 'static
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a> + Send + Sync,
{
    ENABLED.store(true, Ordering::Relaxed);
    let tracer = provider.tracer("dmd");
    let filter = tracing_subscriber::filter::filter_fn(|meta| {
        meta.is_span()
            && *meta.level() <= tracing::Level::INFO
            && (meta.target().starts_with("dm_") || meta.target().starts_with("dmd"))
    });
    tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_level(true)
        .with_filter(filter)
}

/// Keeps the exporter alive; [`Telemetry::shutdown`] (or drop) flushes the spans still queued.
#[derive(Debug, Default)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    /// The exporter's own runtime (one thread): exporting never competes with the services' tasks, and
    /// it outlives the services' runtime so that shutdown can flush.
    runtime: Option<tokio::runtime::Runtime>,
}

impl Telemetry {
    /// Whether spans are being exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Sends what is queued and stops the exporter (at most the export timeout).
    pub fn shutdown(&mut self) {
        if let Some(provider) = self.provider.take() {
            let _ = provider.force_flush();
            if let Err(e) = provider.shutdown() {
                eprintln!("dmd: spans could not all be exported at shutdown: {e}");
            }
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Installs the process's subscriber: logs to stderr in `format`, filtered by `RUST_LOG` or
/// `default_filter`; spans to `otlp` when given (exported from a runtime of their own).
pub fn init(
    format: LogFormat,
    default_filter: &str,
    otlp: Option<&OtlpConfig>,
) -> Result<Telemetry, TelemetryError> {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let logs = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            // Colours only for a person at a terminal, not for log collectors.
            .with_ansi(ansi)
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(false)
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed(),
    };
    let (provider, runtime) = match otlp {
        Some(config) => {
            let runtime = exporter_runtime()?;
            let provider = {
                let _entered = runtime.enter();
                tracer_provider(config)?
            };
            (Some(provider), Some(runtime))
        }
        None => (None, None),
    };
    let otel = provider.as_ref().map(otel_layer);
    tracing_subscriber::registry()
        .with(logs)
        .with(otel)
        .try_init()
        .map_err(|_| TelemetryError::AlreadyInstalled)?;
    Ok(Telemetry { provider, runtime })
}

/// A one-thread runtime for the exporter's connection.
pub fn exporter_runtime() -> Result<tokio::runtime::Runtime, TelemetryError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("otlp-export")
        .enable_all()
        .build()
        .map_err(|e| TelemetryError::Exporter(e.to_string()))
}

impl Telemetry {
    /// Exports through `provider` (built inside `runtime`), for tests that install their own subscriber.
    pub fn with_provider(provider: SdkTracerProvider, runtime: tokio::runtime::Runtime) -> Self {
        Self {
            provider: Some(provider),
            runtime: Some(runtime),
        }
    }
}

/// Makes `span` a child of the W3C context in `traceparent` (and `tracestate`), when export is on and the
/// context is valid. Call before the span is entered.
pub fn follow(span: &tracing::Span, traceparent: Option<&str>, tracestate: Option<&str>) {
    if !enabled() || span.is_none() {
        return;
    }
    let Some(traceparent) = traceparent else {
        return;
    };
    let mut carrier = std::collections::HashMap::new();
    carrier.insert("traceparent".to_string(), traceparent.to_string());
    if let Some(state) = tracestate {
        carrier.insert("tracestate".to_string(), state.to_string());
    }
    let cx = TraceContextPropagator::new().extract(&carrier);
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// The W3C `traceparent` naming `span` (to put on what it sends), if it is an exported span.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    if !enabled() || span.is_none() {
        return None;
    }
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| {
        format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        )
    })
}

/// The trace id (32 hex digits) of `span`, if it is an exported span.
pub fn trace_id(span: &tracing::Span) -> Option<String> {
    if !enabled() || span.is_none() {
        return None;
    }
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

/// The trace id of a W3C `traceparent`, lower case, if it is well formed.
pub fn trace_id_of(traceparent: &str) -> Option<&str> {
    let mut parts = traceparent.trim().split('-');
    let (_, trace) = (parts.next()?, parts.next()?);
    (trace.len() == 32 && trace.bytes().all(|b| b.is_ascii_hexdigit())).then_some(trace)
}

/// The `traceparent` to send from inside `span`: the span's own when it is exported and on the same trace
/// as `carried` (or nothing is carried), else `carried` unchanged. Keeps the carried context when export is
/// off, so behaviour without an exporter is what it was.
pub fn outgoing(span: &tracing::Span, carried: Option<&str>) -> Option<String> {
    match (traceparent(span), carried) {
        (Some(own), None) => Some(own),
        (Some(own), Some(c)) if trace_id_of(&own) == trace_id_of(c) => Some(own),
        (_, c) => c.map(str::to_string),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: std::collections::HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn export_is_on_only_with_an_endpoint() {
        assert_eq!(OtlpConfig::from_env(env(&[]), "dmd"), None);
        let on = OtlpConfig::from_env(
            env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317")]),
            "dmd",
        );
        assert_eq!(
            on,
            Some(OtlpConfig {
                endpoint: "http://c:4317".into(),
                service_name: "dmd".into()
            })
        );
        let traces = OtlpConfig::from_env(
            env(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
                ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://t:4317"),
                ("OTEL_SERVICE_NAME", "dmd-gateway"),
            ]),
            "dmd",
        );
        assert_eq!(
            traces,
            Some(OtlpConfig {
                endpoint: "http://t:4317".into(),
                service_name: "dmd-gateway".into()
            })
        );
        for off in [
            ("OTEL_SDK_DISABLED", "true"),
            ("OTEL_TRACES_EXPORTER", "none"),
        ] {
            let cfg = OtlpConfig::from_env(
                env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"), off]),
                "dmd",
            );
            assert_eq!(cfg, None, "{off:?}");
        }
    }

    #[test]
    fn without_export_the_carried_context_goes_on() {
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        assert_eq!(outgoing(&tracing::Span::none(), Some(tp)), Some(tp.into()));
        assert_eq!(outgoing(&tracing::Span::none(), None), None);
        assert_eq!(trace_id_of(tp), Some("0af7651916cd43dd8448eb211c80319c"));
    }
}
