//! Spans reach an OTLP/HTTP receiver, trace context joins an inbound `traceparent`, and
//! metrics render in the Prometheus format. One test: the subscriber is process-global.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use warren_telemetry::{LogFormat, Telemetry, TelemetryOptions};

/// What the receiver got: (content-type, body) per export request.
type Received = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

const INBOUND: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_are_exported_over_otlp_and_metrics_render() {
    // A local OTLP/HTTP receiver: records each POST /v1/traces body.
    let received: Received = Arc::default();
    let sink = received.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(
            move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                let content_type = headers
                    .get("content-type")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                sink.lock()
                    .expect("lock")
                    .push((content_type, body.to_vec()));
                async { "" }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });

    let telemetry = Telemetry::init(
        "warren-telemetry-test",
        &TelemetryOptions {
            log_format: LogFormat::Text,
            log_filter: None,
            otlp_endpoint: Some(endpoint),
        },
    )
    .expect("telemetry installs");

    // A span joined to an inbound trace: its own traceparent carries the inbound trace id.
    let outbound = {
        let span = tracing::info_span!("handle_delivery");
        warren_telemetry::set_parent_from_traceparent(&span, INBOUND);
        let _entered = span.enter();
        warren_telemetry::current_traceparent().expect("a traceparent inside a span")
    };
    let parts: Vec<&str> = outbound.split('-').collect();
    assert_eq!(parts.len(), 4, "{outbound}");
    assert_eq!(parts[1], "4bf92f3577b34da6a3ce929d0e0e4736", "same trace");
    assert_ne!(parts[2], "00f067aa0ba902b7", "a new span id");

    // The same inside another span (a long-lived worker's): the inbound trace wins.
    let nested = {
        let worker = tracing::info_span!("worker");
        let _worker = worker.enter();
        let span = tracing::info_span!("handle_event");
        warren_telemetry::set_parent_from_traceparent(&span, INBOUND);
        let _entered = span.enter();
        warren_telemetry::current_traceparent().expect("a traceparent inside a span")
    };
    assert_eq!(
        nested.split('-').nth(1),
        Some("4bf92f3577b34da6a3ce929d0e0e4736"),
        "{nested}"
    );

    // A time-based decision inside the worker: a trace of its own, linked to its cause.
    let linked = {
        let worker = tracing::info_span!("worker");
        let _worker = worker.enter();
        let outer = warren_telemetry::current_traceparent().expect("the worker's");
        let span = tracing::info_span!(parent: None, "tick");
        warren_telemetry::start_linked_trace(&span, Some(INBOUND));
        let own = span
            .in_scope(warren_telemetry::current_traceparent)
            .expect("its own");
        (outer, own)
    };
    assert_ne!(
        linked.0.split('-').nth(1),
        linked.1.split('-').nth(1),
        "{linked:?}"
    );
    assert_ne!(
        linked.1.split('-').nth(1),
        Some("4bf92f3577b34da6a3ce929d0e0e4736")
    );

    metrics::counter!("warren_test_requests_total", "outcome" => "ok").increment(3);
    let exposition = telemetry.render_metrics();
    assert!(
        exposition.contains("warren_test_requests_total{outcome=\"ok\"} 3"),
        "{exposition}"
    );

    // Shutdown flushes the batch processor; the receiver then holds the span, tagged with
    // the service name, in a protobuf body.
    tokio::task::spawn_blocking(move || telemetry.shutdown())
        .await
        .expect("shutdown");
    let deadline = Instant::now() + Duration::from_secs(10);
    let trace_id = hex_bytes("4bf92f3577b34da6a3ce929d0e0e4736");
    loop {
        {
            let got = received.lock().expect("lock");
            if let Some((content_type, body)) =
                got.iter().find(|(_, b)| contains(b, b"handle_delivery"))
            {
                assert_eq!(content_type, "application/x-protobuf");
                assert!(contains(body, b"warren-telemetry-test"), "service.name");
                assert!(contains(body, &trace_id), "the inbound trace id");
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no span reached the OTLP receiver"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn hex_bytes(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}
