//! The public listener: what a hostile client cannot hold.
//!
//! - At most [`Limits::max_connections`] connections at once. One past that gets
//!   `503 Service Unavailable` with `Retry-After` and is closed, at once: the gateway sheds
//!   load instead of queueing it, and file descriptors stay available.
//! - Request headers must arrive within [`Limits::header_read_timeout`], from the first byte
//!   of a request (or from the end of the previous one on a kept-alive connection): a
//!   slowloris client trickling headers, or an idle connection, is closed.
//! - A whole request (body read, handled, answered) takes at most
//!   [`Limits::request_timeout`]; past it the sender gets `408` and the connection closes: a
//!   body trickled byte by byte holds nothing for long.
//!
//! Connections are accepted on a thread of their own ([`serve`]), which also answers the
//! shed ones: under overload the request tasks fill the runtime's queue, and an accept loop
//! among them fell behind, so the kernel's accept queue overflowed and dropped handshakes
//! that the client sent again only after its 1 s retransmission timeout (measured in the
//! overload drill: 10,674 listen overflows, shed p99 1.7 s). The listen backlog is
//! [`Limits::listen_backlog`] (the kernel caps it at `net.core.somaxconn`).
//!
//! HTTP/1.1 only (Slack and webhook senders speak it); every accepted socket gets
//! TCP_NODELAY (without it, a response written in two segments waited for the client's
//! delayed ACK: a flat ~100 ms on a tenth of the acks in the gateway benchmark).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::AsyncWriteExt;
use tokio::sync::{Semaphore, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use tracing::{debug, warn};

/// What one client may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The listener's name in metrics (`listener` label): `public`, `admin`.
    pub listener: &'static str,
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub request_timeout: Duration,
    /// `Retry-After` of a shed connection, seconds.
    pub retry_after_secs: u64,
    /// Connections the kernel may hold, handshake done, until they are accepted.
    pub listen_backlog: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            listener: "public",
            max_connections: 1024,
            header_read_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(15),
            retry_after_secs: 1,
            listen_backlog: 4096,
        }
    }
}

/// A listener on `addr` with room for `backlog` connections not yet accepted (tokio's own
/// `bind` keeps 1024).
pub fn bind(addr: std::net::SocketAddr, backlog: u32) -> std::io::Result<tokio::net::TcpListener> {
    let socket = match addr {
        std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// The answer to a connection past the limit: complete, and closing.
fn shed_response(retry_after_secs: u64) -> String {
    let body = r#"{"error":"too many connections; retry later"}"#;
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         retry-after: {retry_after_secs}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// Waits for the request head of a connection about to be shed (at most 16 KiB, at most
/// 200 ms): a 503 sent before the request is, to an HTTP client, a message it did not ask
/// for, and it reports a broken connection instead of the answer.
async fn read_head(tcp: &mut tokio::net::TcpStream) {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 4096];
    let read = async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    head.extend_from_slice(&buf[..n]);
                    if head.windows(4).any(|w| w == b"\r\n\r\n") || head.len() > 16 * 1024 {
                        break;
                    }
                }
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_millis(200), read).await;
}

/// A lingering close: reads and drops what the client still sends (at most 64 KiB, for at
/// most a second) before the socket is closed. Closing with its request unread would make
/// the kernel answer with a reset, which can reach the client before it has read the 503,
/// so that it sees a broken connection instead of an answer with `Retry-After`.
async fn linger(mut tcp: tokio::net::TcpStream) {
    use tokio::io::AsyncReadExt;
    let mut sink = [0u8; 4096];
    let mut left = 64 * 1024usize;
    let drain = async {
        while left > 0 {
            match tcp.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
}

/// Serves `app` on `listener` within `limits` until `shutdown` resolves; then stops
/// accepting, lets every connection finish the request it is in, and returns once all are
/// closed.
///
/// Accepting, and answering the connections past the limit, happens on a thread of its own
/// with a runtime of its own; the connections admitted are served on the caller's runtime.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let request_timeout = limits.request_timeout;
    let app = app.layer(axum::middleware::from_fn(move |request, next| {
        within(request_timeout, request, next)
    }));
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let (stop, stopped) = watch::channel(false);
    let listener = listener.into_std()?;
    let end_accepting = CancellationToken::new();
    let (accepting_ended, ended) = oneshot::channel();
    let admit = Admit {
        app,
        limits,
        stopped,
        runtime: tokio::runtime::Handle::current(),
    };
    let (accept_slots, end) = (slots.clone(), end_accepting.clone());
    std::thread::Builder::new()
        .name("accept".into())
        .spawn(move || {
            let result = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .and_then(|runtime| runtime.block_on(accept(listener, accept_slots, admit, end)));
            let _ = accepting_ended.send(result);
        })?;
    tokio::pin!(ended);
    let accepting = tokio::select! {
        () = shutdown => {
            end_accepting.cancel();
            (&mut ended).await
        }
        // Only a listener the accept thread cannot use ends it first.
        ended = &mut ended => ended,
    };
    // Accepting has stopped; tell every connection, then wait until each has given its
    // slot back.
    let _ = stop.send(true);
    let all = u32::try_from(limits.max_connections.max(1)).unwrap_or(u32::MAX);
    let _ = slots.acquire_many(all).await;
    accepting.unwrap_or_else(|_| Err(std::io::Error::other("the accept thread panicked")))
}

/// What serving an admitted connection needs.
struct Admit {
    app: Router,
    limits: Limits,
    stopped: watch::Receiver<bool>,
    /// The runtime the connections are served on.
    runtime: tokio::runtime::Handle,
}

/// The accept loop, on the accept thread's runtime, until `end`: a connection within the
/// limit goes to the serving runtime, one past it is answered 503 here.
async fn accept(
    listener: std::net::TcpListener,
    slots: Arc<Semaphore>,
    admit: Admit,
    end: CancellationToken,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    loop {
        let (tcp, peer) = tokio::select! {
            () = end.cancelled() => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                // Out of file descriptors and the like: pause instead of spinning.
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if let Err(e) = tcp.set_nodelay(true) {
            debug!(error = %e, "could not set TCP_NODELAY");
        }
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics::counter!("warren_gateway_connections_shed_total").increment(1);
            debug!(%peer, "connection limit reached; shedding");
            tokio::spawn(shed(tcp, shed_response(admit.limits.retry_after_secs)));
            continue;
        };
        // Moved to the serving runtime's reactor.
        let tcp = match tcp.into_std() {
            Ok(tcp) => tcp,
            Err(e) => {
                debug!(%peer, error = %e, "could not hand the connection over");
                continue;
            }
        };
        let service = TowerToHyperService::new(
            admit
                .app
                .clone()
                .map_request(|r: Request<hyper::body::Incoming>| r.map(axum::body::Body::new)),
        );
        let (limits, mut stopped) = (admit.limits, admit.stopped.clone());
        let open = Open::new(limits.listener);
        admit.runtime.spawn(async move {
            let _held = (slot, open);
            let tcp = match tokio::net::TcpStream::from_std(tcp) {
                Ok(tcp) => tcp,
                Err(e) => {
                    debug!(%peer, error = %e, "could not take the connection over");
                    return;
                }
            };
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .keep_alive(true);
            let connection = http.serve_connection(TokioIo::new(tcp), service);
            tokio::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                _ = stopped.changed() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = result {
                debug!(%peer, error = %e, "connection ended");
            }
        });
    }
}

/// One connection counted in `warren_gateway_connections_open` while it lives.
struct Open(metrics::Gauge);

impl Open {
    fn new(listener: &'static str) -> Self {
        let gauge = metrics::gauge!("warren_gateway_connections_open", "listener" => listener);
        gauge.increment(1.0);
        Self(gauge)
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// Answers a connection past the limit: its request head read, the 503 written, a
/// lingering close.
async fn shed(mut tcp: tokio::net::TcpStream, answer: String) {
    read_head(&mut tcp).await;
    let write = tcp.write_all(answer.as_bytes());
    let _ = tokio::time::timeout(Duration::from_secs(1), write).await;
    let _ = tcp.shutdown().await;
    linger(tcp).await;
}

/// Middleware: the whole request within `limit`, or 408 and the connection closed.
async fn within(limit: Duration, request: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            metrics::counter!("warren_gateway_requests_timed_out_total").increment(1);
            let mut response = (
                StatusCode::REQUEST_TIMEOUT,
                axum::Json(serde_json::json!({ "error": "the request took too long" })),
            )
                .into_response();
            response.headers_mut().insert(
                header::CONNECTION,
                header::HeaderValue::from_static("close"),
            );
            response
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shed_connection_gets_a_complete_closing_503() {
        let answer = shed_response(2);
        let (head, body) = answer.split_once("\r\n\r\n").expect("head and body");
        assert!(head.starts_with("HTTP/1.1 503 "), "{head}");
        assert!(head.contains("retry-after: 2"), "{head}");
        assert!(head.contains("connection: close"), "{head}");
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{head}"
        );
        serde_json::from_str::<serde_json::Value>(body).expect("a JSON body");
    }
}
