//! A proxy in front of the test API server that makes it misbehave on demand, for fault
//! tests: the client talks plain HTTP to the proxy on loopback; the proxy forwards every
//! request (headers, body, streamed responses such as watches) to the API server over TLS.
//!
//! Faults, set at any time through [`FaultProxy`]:
//! - the next N writes answered `429 Too Many Requests` with `Retry-After` (header and
//!   `details.retryAfterSeconds`, as the API server's priority and fairness does), or with
//!   a 500;
//! - every watch in flight cut off mid-stream;
//! - watches refused with `410 Gone` (their resourceVersion "expired");
//! - a delay before each request.
//!
//! It counts what it saw: the time of each write that reached the server, each write the
//! server answered (when, what, with which status: benchmarks time API calls by it), 429s
//! and 500s sent, watches cut.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

/// A write the server answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answered {
    /// When its answer's head arrived from the server.
    pub at: Instant,
    pub method: String,
    /// The request's path, without the query.
    pub path: String,
    pub status: u16,
}

/// A fault to answer writes with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteFault {
    TooManyRequests { retry_after_secs: u32 },
    ServerError,
}

#[derive(Debug, Default)]
struct Faults {
    writes_to_fail: usize,
    write_fault: Option<WriteFault>,
    gone_watches: usize,
    delay: Duration,
    /// Cancelled to cut every watch in flight; replaced after each cut.
    cut: CancellationToken,
    /// What reached the server.
    writes: Vec<Instant>,
    answered: Vec<Answered>,
    faults_sent: usize,
    watches_cut: usize,
}

#[derive(Debug, Clone)]
struct Shared {
    upstream: String,
    client: reqwest::Client,
    faults: Arc<Mutex<Faults>>,
}

/// The proxy; it stops when dropped.
#[derive(Debug)]
pub struct FaultProxy {
    pub url: String,
    faults: Arc<Mutex<Faults>>,
    stop: CancellationToken,
}

impl FaultProxy {
    /// Listens on loopback and forwards to `upstream` (`https://...`), trusting `ca_pem`.
    pub async fn start(upstream: &str, ca_pem: &[u8]) -> std::io::Result<Self> {
        let ca = reqwest::Certificate::from_pem(ca_pem).map_err(std::io::Error::other)?;
        let client = reqwest::Client::builder()
            .add_root_certificate(ca)
            .build()
            .map_err(std::io::Error::other)?;
        let faults = Arc::new(Mutex::new(Faults::default()));
        let shared = Shared {
            upstream: upstream.trim_end_matches('/').to_owned(),
            client,
            faults: Arc::clone(&faults),
        };
        let app = axum::Router::new().fallback(forward).with_state(shared);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stopped.cancelled().await })
                .await;
        });
        Ok(Self { url, faults, stop })
    }

    fn with<T>(&self, f: impl FnOnce(&mut Faults) -> T) -> T {
        let mut faults = self.faults.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut faults)
    }

    /// The next `n` writes (POST, PUT, PATCH, DELETE) get `fault` instead of the server.
    pub fn fail_writes(&self, n: usize, fault: WriteFault) {
        self.with(|f| {
            f.writes_to_fail = n;
            f.write_fault = Some(fault);
        });
    }

    /// Cuts every watch in flight.
    pub fn cut_watches(&self) {
        self.with(|f| {
            f.cut.cancel();
            f.cut = CancellationToken::new();
        });
    }

    /// The next `n` watch requests get `410 Gone`.
    pub fn expire_watches(&self, n: usize) {
        self.with(|f| f.gone_watches = n);
    }

    /// Waits `delay` before forwarding each request.
    pub fn delay(&self, delay: Duration) {
        self.with(|f| f.delay = delay);
    }

    /// When each write that reached the server was forwarded.
    pub fn writes(&self) -> Vec<Instant> {
        self.with(|f| f.writes.clone())
    }

    /// Every write the server answered, in the order the answers came.
    pub fn answered(&self) -> Vec<Answered> {
        self.with(|f| f.answered.clone())
    }

    /// Faults answered (429s and 500s).
    pub fn faults_sent(&self) -> usize {
        self.with(|f| f.faults_sent)
    }

    pub fn watches_cut(&self) -> usize {
        self.with(|f| f.watches_cut)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn status(code: u16, reason: &str, message: &str, retry_after: Option<u32>) -> Response {
    let mut body = serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code,
    });
    if let Some(secs) = retry_after {
        body["details"] = serde_json::json!({"retryAfterSeconds": secs});
    }
    let mut response = Response::builder()
        .status(code)
        .header("content-type", "application/json");
    if let Some(secs) = retry_after {
        response = response.header("retry-after", secs.to_string());
    }
    response
        .body(Body::from(body.to_string()))
        .unwrap_or_default()
}

async fn forward(State(shared): State<Shared>, request: Request) -> Response {
    let method = request.method().clone();
    let path_and_query = request
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let watch = path_and_query.contains("watch=true") || path_and_query.contains("watch=1");
    let write = !matches!(method.as_str(), "GET" | "HEAD" | "OPTIONS");
    let (delay, fault, gone, cut) = {
        let mut f = shared.faults.lock().unwrap_or_else(|e| e.into_inner());
        let fault = if write && f.writes_to_fail > 0 {
            f.writes_to_fail -= 1;
            f.faults_sent += 1;
            f.write_fault
        } else {
            None
        };
        let gone = watch && f.gone_watches > 0;
        if gone {
            f.gone_watches -= 1;
        }
        if write && fault.is_none() {
            f.writes.push(Instant::now());
        }
        (f.delay, fault, gone, f.cut.clone())
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    match fault {
        Some(WriteFault::TooManyRequests { retry_after_secs }) => {
            return status(
                429,
                "TooManyRequests",
                "the server has received too many requests and has asked us to try again later",
                Some(retry_after_secs),
            );
        }
        Some(WriteFault::ServerError) => {
            return status(
                500,
                "InternalError",
                "an error on the server (injected)",
                None,
            );
        }
        None => {}
    }
    if gone {
        return status(410, "Expired", "too old resource version (injected)", None);
    }
    let (parts, body) = request.into_parts();
    let body = match axum::body::to_bytes(body, 64 << 20).await {
        Ok(body) => body,
        Err(e) => return status(400, "BadRequest", &e.to_string(), None),
    };
    let mut upstream = shared
        .client
        .request(parts.method, format!("{}{path_and_query}", shared.upstream))
        .body(body);
    for (name, value) in &parts.headers {
        if name != "host" && name != "content-length" {
            upstream = upstream.header(name, value);
        }
    }
    let answer = match upstream.send().await {
        Ok(answer) => answer,
        Err(e) => return status(502, "BadGateway", &e.to_string(), None),
    };
    if write && let Ok(mut f) = shared.faults.lock() {
        f.answered.push(Answered {
            at: Instant::now(),
            method: method.to_string(),
            path: path_and_query
                .split('?')
                .next()
                .unwrap_or_default()
                .to_owned(),
            status: answer.status().as_u16(),
        });
    }
    let mut response = Response::builder().status(answer.status().as_u16());
    for (name, value) in answer.headers() {
        if name != "content-length" && name != "transfer-encoding" {
            response = response.header(name, value);
        }
    }
    let faults = Arc::clone(&shared.faults);
    let stream = answer.bytes_stream();
    let body = if watch {
        // A watch ends when the proxy is told to cut it.
        let cut_stream = futures_util::stream::unfold(
            (stream, cut, faults),
            |(mut stream, cut, faults)| async move {
                tokio::select! {
                    () = cut.cancelled() => {
                        if let Ok(mut f) = faults.lock() {
                            f.watches_cut += 1;
                        }
                        None
                    }
                    next = stream.next() => next.map(|item| (item, (stream, cut, faults))),
                }
            },
        );
        Body::from_stream(cut_stream)
    } else {
        Body::from_stream(stream)
    };
    response.body(body).unwrap_or_default()
}
