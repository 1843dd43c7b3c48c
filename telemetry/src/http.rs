//! One span and two metrics per HTTP request, for every Warren HTTP service.
//!
//! The span (`http_request`, with method, route and status) joins the caller's trace when
//! the request carries a W3C `traceparent`, and everything a handler records is inside it.
//! Metrics: `{prefix}_requests_total` by route and status, `{prefix}_request_seconds` by
//! route, where `prefix` names the service (`warren_gateway`, `warren_admin_api`).
//!
//! Each service makes its span itself ([`HttpService::span`]), so that the span's target is
//! the service's own crate: a log filter such as `warn,warren_gateway=info` keeps the
//! gateway's request spans, and with them the trace its events join.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::Response;
use tracing::{Instrument, Span};

/// A service's requests: its metric prefix and the span each request runs in.
#[derive(Debug, Clone, Copy)]
pub struct HttpService {
    pub metric_prefix: &'static str,
    /// Makes the request's span (`http_request`, with `method`, `route` and an empty
    /// `status`), from the service's own crate: see [`http_request_span!`].
    pub span: fn(&axum::http::Method, &str) -> Span,
}

/// The span of a request, made where this macro is called (so its target is that crate):
/// `HttpService { metric_prefix, span: |m, r| warren_telemetry::http_request_span!(m, r) }`.
#[macro_export]
macro_rules! http_request_span {
    ($method:expr, $route:expr) => {
        ::tracing::info_span!(
            "http_request",
            method = %$method,
            route = %$route,
            status = ::tracing::field::Empty,
            actor = ::tracing::field::Empty,
        )
    };
}

/// Middleware (`axum::middleware::from_fn_with_state(service, request_span)`): wraps each
/// request in its span and records its metrics.
pub async fn request_span(
    State(service): State<HttpService>,
    request: Request,
    next: Next,
) -> Response {
    let metric_prefix = service.metric_prefix;
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let span = (service.span)(request.method(), &route);
    if let Some(parent) = inbound_traceparent(request.headers()) {
        crate::set_parent_from_traceparent(&span, parent);
    }
    let started = Instant::now();
    let response = next.run(request).instrument(span.clone()).await;
    let status = response.status().as_u16();
    span.record("status", status);
    metrics::counter!(
        format!("{metric_prefix}_requests_total"),
        "route" => route.clone(),
        "status" => status.to_string()
    )
    .increment(1);
    metrics::histogram!(format!("{metric_prefix}_request_seconds"), "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}

/// The caller's `traceparent` header, when present and of a sane size.
pub fn inbound_traceparent(headers: &HeaderMap) -> Option<&str> {
    headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.len() <= 128)
}

/// The `traceparent` to record on the events a request stores: the request span's own
/// (a child of the caller's) when traces are exported, otherwise the caller's as received.
pub fn event_traceparent(headers: &HeaderMap) -> Option<String> {
    crate::current_traceparent().or_else(|| inbound_traceparent(headers).map(str::to_owned))
}
