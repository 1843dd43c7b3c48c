//! Logs, traces and metrics for Warren's services, set up the same way in every binary.
//!
//! - **Logs**: `tracing` to stderr, one JSON object per line (or text for a terminal),
//!   filtered by `RUST_LOG` (default `info`).
//! - **Traces**: when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (the collector's base URL, e.g.
//!   `http://otel-collector:4318`), every span is also exported to `{endpoint}/v1/traces`
//!   over OTLP/HTTP (protobuf) by a batch processor on its own thread. The other standard
//!   `OTEL_EXPORTER_OTLP_*` variables (headers, timeout) apply. Without it nothing is
//!   exported and nothing is paid.
//! - **Metrics**: the `metrics` facade records into a Prometheus recorder; serve
//!   [`Telemetry::metrics_router`] (`GET /metrics`) on an admin port.
//! - **Shutdown**: [`shutdown_on_signal`], the SIGTERM/SIGINT token every binary starts from.
//! - **Trace context**: W3C `traceparent` in and out ([`current_traceparent`],
//!   [`set_parent_from_traceparent`]), so an event's `traceparent` joins the trace of the
//!   request that caused it.

pub mod http;

use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line (production).
    #[default]
    Json,
    /// Human-readable lines (a terminal).
    Text,
}

/// Why telemetry could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("building the OTLP span exporter: {0}")]
    Otlp(#[from] opentelemetry_otlp::ExporterBuildError),
    #[error("installing the Prometheus recorder: {0}")]
    Metrics(String),
    #[error("installing the tracing subscriber: {0}")]
    Subscriber(#[from] tracing_subscriber::util::TryInitError),
}

/// Latency buckets (seconds) for every `*_seconds` histogram: 250 µs to 10 s.
const SECONDS_BUCKETS: &[f64] = &[
    0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0,
];

/// Telemetry settings, flattened into each binary's configuration.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TelemetryOptions {
    /// Log line format.
    #[arg(long, env = "WARREN_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    pub log_format: LogFormat,
    /// Which logs to write (an `EnvFilter` directive such as `info,warren=debug`).
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    pub log_filter: Option<String>,
    /// OTLP/HTTP collector base URL; spans go to `{url}/v1/traces`. Unset: no export.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
}

/// Installed telemetry. Keep it for the life of the process and call
/// [`Telemetry::shutdown`] before exit so the last spans are exported.
#[derive(Debug)]
pub struct Telemetry {
    metrics: PrometheusHandle,
    tracer: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Installs the global log subscriber, the OTLP exporter (when configured by the
    /// environment) and the Prometheus recorder. Call once, at the start of `main`.
    pub fn init(service: &'static str, options: &TelemetryOptions) -> Result<Self, TelemetryError> {
        let metrics = install_prometheus()?;
        let tracer = options
            .otlp_endpoint
            .as_deref()
            .filter(|e| !e.is_empty())
            .map(|endpoint| otlp_provider(service, endpoint))
            .transpose()?;
        let otel_layer = tracer
            .as_ref()
            .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer(service)));
        let filter = options
            .log_filter
            .as_deref()
            .and_then(|f| EnvFilter::try_new(f).ok())
            .unwrap_or_else(|| EnvFilter::new("info"));
        // Colours on a terminal only: in a file, a journal or a pod's log (whose last line
        // becomes a failed workspace's recorded reason) escape codes are noise.
        let fmt = tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
        let registry = tracing_subscriber::registry().with(filter).with(otel_layer);
        match options.log_format {
            LogFormat::Json => registry.with(fmt.json()).try_init()?,
            LogFormat::Text => registry.with(fmt).try_init()?,
        }
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        if tracer.is_some() {
            tracing::info!(service, "exporting traces over OTLP/HTTP");
        }
        Ok(Self { metrics, tracer })
    }

    /// Prometheus text exposition of every metric recorded so far.
    pub fn render_metrics(&self) -> String {
        self.metrics.render()
    }

    /// `GET /metrics` in the Prometheus text format and `GET /healthz`: a metrics port.
    pub fn metrics_router(&self) -> axum::Router {
        metrics_router(self.metrics.clone())
    }

    /// `GET /metrics` alone, to merge into a router that answers `/healthz` itself.
    pub fn metrics_route(&self) -> axum::Router {
        metrics_route(self.metrics.clone())
    }

    /// Exports the spans still buffered (bounded wait) and stops the exporter.
    pub fn shutdown(self) {
        if let Some(provider) = self.tracer
            && let Err(e) = provider.shutdown_with_timeout(Duration::from_secs(5))
        {
            tracing::warn!(error = %e, "exporting the last spans failed");
        }
    }
}

/// `GET /metrics` serving `handle`'s exposition, and `GET /healthz` (the process answers:
/// what a liveness probe asks).
pub fn metrics_router(handle: PrometheusHandle) -> axum::Router {
    metrics_route(handle).route("/healthz", axum::routing::get(|| async { "ok" }))
}

/// `GET /metrics` serving `handle`'s exposition.
pub fn metrics_route(handle: PrometheusHandle) -> axum::Router {
    axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let body = handle.render();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    body,
                )
            }
        }),
    )
}

/// How often pending histogram samples are folded into their buckets.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

fn install_prometheus() -> Result<PrometheusHandle, TelemetryError> {
    let recorder = prometheus_builder()?.build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).map_err(|e| TelemetryError::Metrics(e.to_string()))?;
    // A recorder built (not installed by the exporter) keeps every histogram sample until
    // something folds them into buckets: a scrape, or this. Without it a process nobody
    // scrapes grows with every request (a control plane given 10,000 messages reached
    // 400 MB, nearly all of it pending samples).
    let upkeep = handle.clone();
    std::thread::Builder::new()
        .name("metrics-upkeep".into())
        .spawn(move || {
            loop {
                std::thread::sleep(UPKEEP_EVERY);
                upkeep.run_upkeep();
            }
        })
        .map_err(|e| TelemetryError::Metrics(format!("starting the upkeep thread: {e}")))?;
    Ok(handle)
}

fn prometheus_builder() -> Result<PrometheusBuilder, TelemetryError> {
    PrometheusBuilder::new()
        .set_buckets(SECONDS_BUCKETS)
        .map_err(|e| TelemetryError::Metrics(e.to_string()))
}

fn otlp_provider(
    service: &'static str,
    endpoint: &str,
) -> Result<SdkTracerProvider, TelemetryError> {
    use opentelemetry_otlp::WithExportConfig;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
        .build()?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service)
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

/// The W3C `traceparent` of the current span, when traces are exported (without an
/// exporter there is no trace id worth recording).
pub fn current_traceparent() -> Option<String> {
    let context = tracing::Span::current().context();
    let mut carrier = TraceparentCarrier(None);
    TraceContextPropagator::new().inject_context(&context, &mut carrier);
    carrier.0
}

/// Makes the current span a child of `traceparent` (an inbound request's or event's), so
/// the work it causes joins the sender's trace. Malformed values are ignored.
pub fn set_parent_from_traceparent(span: &tracing::Span, traceparent: &str) {
    let carrier = TraceparentCarrier(Some(traceparent.to_owned()));
    let context = TraceContextPropagator::new().extract(&carrier);
    // Fails only when the span has no OpenTelemetry layer (no exporter): nothing to join.
    let _ = span.set_parent(context);
}

/// Joins `span` to the trace `parent` names (when there is one) and returns the context the
/// work inside it hands on to the next process: the span's own `traceparent` when traces are
/// exported, otherwise `parent` as received, so the trace still travels.
pub fn join_trace(span: &tracing::Span, parent: Option<&str>) -> Option<String> {
    if let Some(parent) = parent {
        set_parent_from_traceparent(span, parent);
    }
    span.in_scope(current_traceparent)
        .or_else(|| parent.map(str::to_owned))
}

/// Makes `span` the root of a trace of its own (not a child of whatever span is current),
/// linked to `cause`'s trace when `cause` is a valid `traceparent`: what a time-based
/// decision (an idle stop, a restart, an admission) is recorded in, so its trace is not
/// the conversation's yet leads to it.
pub fn start_linked_trace(span: &tracing::Span, cause: Option<&str>) {
    use opentelemetry::trace::TraceContextExt;
    // Fails only when the span has no OpenTelemetry layer (no exporter): nothing to do.
    let _ = span.set_parent(opentelemetry::Context::new());
    if let Some(cause) = cause {
        let carrier = TraceparentCarrier(Some(cause.to_owned()));
        let context = TraceContextPropagator::new().extract(&carrier);
        let linked = context.span().span_context().clone();
        if linked.is_valid() {
            span.add_link(linked);
        }
    }
}

/// A carrier holding just `traceparent` (Warren does not propagate `tracestate`).
struct TraceparentCarrier(Option<String>);

impl opentelemetry::propagation::Injector for TraceparentCarrier {
    fn set(&mut self, key: &str, value: String) {
        if key == "traceparent" {
            self.0 = Some(value);
        }
    }
}

impl opentelemetry::propagation::Extractor for TraceparentCarrier {
    fn get(&self, key: &str) -> Option<&str> {
        (key == "traceparent")
            .then_some(self.0.as_deref())
            .flatten()
    }

    fn keys(&self) -> Vec<&str> {
        vec!["traceparent"]
    }
}

/// A token cancelled on SIGTERM (Kubernetes, `kill`) or SIGINT (Ctrl-C): every binary's
/// graceful shutdown starts here.
pub fn shutdown_on_signal() -> std::io::Result<tokio_util::sync::CancellationToken> {
    use tokio::signal::unix::{SignalKind, signal};
    let token = tokio_util::sync::CancellationToken::new();
    let mut term = signal(SignalKind::terminate())?;
    let cancel = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("shutting down");
        cancel.cancel();
    });
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upkeep_folds_pending_samples_into_buckets_without_losing_any() {
        let recorder = prometheus_builder().expect("builder").build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            for i in 0..1000 {
                metrics::histogram!("warren_test_seconds").record(f64::from(i) / 1000.0);
            }
        });
        handle.run_upkeep();
        metrics::with_local_recorder(&recorder, || {
            metrics::histogram!("warren_test_seconds").record(0.5);
        });
        let text = handle.render();
        assert!(text.contains("warren_test_seconds_count 1001"), "{text}");
        assert!(
            text.contains("warren_test_seconds_bucket{le=\"10\"} 1001"),
            "{text}"
        );
    }
}
