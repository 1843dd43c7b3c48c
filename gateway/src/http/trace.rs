//! One span and two metrics per request.
//!
//! The span (`http_request`, with method, route and status) joins the sender's trace when
//! the request carries a W3C `traceparent`, and everything a handler records (the stored
//! event's `traceparent` included) is inside it. Metrics: `warren_gateway_requests_total`
//! by route and status, `warren_gateway_request_seconds` by route.

use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::Response;
use tracing::{Instrument, info_span};

/// Middleware: wraps each request in its span and records its metrics.
pub async fn request_span(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let span = info_span!(
        "http_request",
        method = %request.method(),
        route = %route,
        status = tracing::field::Empty,
    );
    if let Some(parent) = inbound_traceparent(request.headers()) {
        warren_telemetry::set_parent_from_traceparent(&span, parent);
    }
    let started = Instant::now();
    let response = next.run(request).instrument(span.clone()).await;
    let status = response.status().as_u16();
    span.record("status", status);
    metrics::counter!(
        "warren_gateway_requests_total",
        "route" => route.clone(),
        "status" => status.to_string()
    )
    .increment(1);
    metrics::histogram!("warren_gateway_request_seconds", "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}

/// The sender's `traceparent` header, when present and of a sane size.
pub fn inbound_traceparent(headers: &HeaderMap) -> Option<&str> {
    headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.len() <= 128)
}

/// The `traceparent` to record on the events a request stores: the request span's own
/// (a child of the sender's) when traces are exported, otherwise the sender's as received.
pub fn event_traceparent(headers: &HeaderMap) -> Option<String> {
    warren_telemetry::current_traceparent()
        .or_else(|| inbound_traceparent(headers).map(str::to_owned))
}
