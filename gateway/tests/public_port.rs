//! The public port against hostile clients, on the real `warren-gateway` binary: slowloris
//! connections trickling their headers, a body trickled byte by byte, and more connections
//! than the limit. The gateway sheds what it cannot hold (503 + Retry-After at once), closes
//! what is too slow, and serves again as soon as they are gone.

use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use warren_schema::testing::TestDatabase;

/// The gateway's `--header-read-timeout-ms` in these tests.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(3);

/// The gateway binary on a free port, with small limits so that the test is quick.
struct Gateway {
    child: tokio::process::Child,
    addr: std::net::SocketAddr,
    /// The admin listener (`GET /metrics`).
    metrics: std::net::SocketAddr,
}

impl Gateway {
    async fn start(db: &TestDatabase) -> Self {
        // A port found free may be taken by another test before the gateway binds it: the
        // gateway then exits at once ("address already in use"), and it is started again on
        // other ports.
        for _ in 0..5 {
            if let Some(gateway) = Self::try_start(db).await {
                return gateway;
            }
        }
        panic!("the gateway did not come up on five pairs of free ports");
    }

    async fn try_start(db: &TestDatabase) -> Option<Self> {
        let free = |_| {
            std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
        };
        let (addr, metrics) = (free(0), free(1));
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_warren-gateway"))
            .env_clear()
            .env("DATABASE_URL", db.url())
            .env("SLACK_SIGNING_SECRET", "public-port-test")
            .args(["--listen", &addr.to_string()])
            .args(["--metrics-listen", &metrics.to_string()])
            .args(["--max-connections", "4"])
            // Long enough for a loaded machine to check the shedding while slow clients hold
            // every slot: they hold them only until their headers are late.
            .args([
                "--header-read-timeout-ms",
                &HEADER_READ_TIMEOUT.as_millis().to_string(),
            ])
            .args(["--request-timeout-ms", "1500"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("start the gateway");
        let mut gateway = Self {
            child,
            addr,
            metrics,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while gateway
            .get("/healthz")
            .await
            .map(|r| r.starts_with("HTTP/1.1 200"))
            != Some(true)
        {
            if gateway
                .child
                .try_wait()
                .expect("the gateway's status")
                .is_some()
            {
                return None;
            }
            assert!(Instant::now() < deadline, "the gateway did not come up");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Some(gateway)
    }

    /// One request on a new connection; the whole answer, or `None` if it could not connect.
    async fn get(&self, path: &str) -> Option<String> {
        let mut tcp = TcpStream::connect(self.addr).await.ok()?;
        let request = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
        tcp.write_all(request.as_bytes()).await.ok()?;
        let mut answer = String::new();
        tokio::time::timeout(Duration::from_secs(5), tcp.read_to_string(&mut answer))
            .await
            .ok()?
            .ok()?;
        Some(answer)
    }
}

impl Gateway {
    /// Waits until the public listener serves exactly `n` connections
    /// (`warren_gateway_connections_open`), and none is on its way out.
    async fn wait_open_connections(&self, n: u32) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let open = self.open_connections().await;
            if open == Some(n) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{open:?} connections open, not {n}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn open_connections(&self) -> Option<u32> {
        let mut tcp = TcpStream::connect(self.metrics).await.ok()?;
        tcp.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut text = String::new();
        tcp.read_to_string(&mut text).await.ok()?;
        let line = text
            .lines()
            .find(|l| l.starts_with("warren_gateway_connections_open{listener=\"public\"}"));
        // Not yet written: no connection was ever served.
        let Some(line) = line else { return Some(0) };
        line.rsplit(' ')
            .next()?
            .parse::<f64>()
            .ok()
            .map(|v| v as u32)
    }
}

/// A connection sending a request head one header every 200 ms, never finishing it.
async fn slowloris(addr: std::net::SocketAddr) -> TcpStream {
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.write_all(b"POST /slack/events HTTP/1.1\r\nhost: x\r\n")
        .await
        .expect("write");
    tcp
}

/// Keeps trickling headers into `tcp` until the server closes it; returns how long that took.
async fn trickle_until_closed(mut tcp: TcpStream) -> Duration {
    let started = Instant::now();
    let mut buffer = [0u8; 1024];
    loop {
        if tcp.write_all(b"x-slow: 1\r\n").await.is_err() {
            return started.elapsed();
        }
        let read = tokio::time::timeout(Duration::from_millis(200), tcp.read(&mut buffer)).await;
        if let Ok(Ok(0) | Err(_)) = read {
            return started.elapsed();
        }
        assert!(started.elapsed() < Duration::from_secs(10), "never closed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_shed_and_closed_and_the_port_serves_again() {
    let db = TestDatabase::new().await;
    let gateway = Gateway::start(&db).await;

    // Four slowloris connections take every slot (until their headers are late), each
    // once the one before holds its own: the connections that showed the gateway up may
    // still hold theirs for a moment, and a slowloris accepted then would be shed.
    gateway.wait_open_connections(0).await;
    let slow_since = Instant::now();
    let mut slow = Vec::new();
    for held in 1..=4 {
        slow.push(slowloris(gateway.addr).await);
        gateway.wait_open_connections(held).await;
    }
    let shed = gateway.get("/healthz").await.expect("an answer");
    assert!(shed.starts_with("HTTP/1.1 503"), "{shed}");
    // ...so a fifth is told at once to come back later, instead of hanging.
    let head = shed.to_lowercase();
    assert!(head.contains("retry-after: 1"), "{shed}");
    assert!(head.contains("connection: close"), "{shed}");
    // A real HTTP client sending a whole request with a body gets the 503 as the answer to
    // it: written before the request had arrived, it was a message the client had not asked
    // for, and it reported a broken connection; closed with the body unread, a reset.
    for _ in 0..5 {
        let answer = reqwest::Client::new()
            .post(format!("http://{}/slack/events", gateway.addr))
            .header("content-type", "application/json")
            .body(vec![b' '; 32 * 1024])
            .send()
            .await
            .expect("an answer, not a broken connection");
        assert_eq!(
            answer.status(),
            503,
            "served after {:?}: the slow clients' headers were late (the check took too long)",
            slow_since.elapsed()
        );
        assert_eq!(answer.headers()["retry-after"], "1");
    }

    // The slow ones are closed once their headers are late, however they trickle.
    let mut closed = tokio::task::JoinSet::new();
    for tcp in slow {
        closed.spawn(trickle_until_closed(tcp));
    }
    while let Some(took) = closed.join_next().await {
        let took = took.expect("join");
        assert!(
            slow_since.elapsed() < HEADER_READ_TIMEOUT + Duration::from_secs(3),
            "a slowloris was held for {took:?}"
        );
    }
    // And the port serves again.
    let answer = gateway.get("/healthz").await.expect("an answer");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_trickled_byte_by_byte_gets_408_and_the_connection_closes() {
    let db = TestDatabase::new().await;
    let gateway = Gateway::start(&db).await;
    let mut tcp = TcpStream::connect(gateway.addr).await.expect("connect");
    tcp.write_all(
        b"POST /slack/events HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
          content-length: 1000\r\n\r\n{",
    )
    .await
    .expect("head");
    let started = Instant::now();
    let mut answer = Vec::new();
    let mut buffer = [0u8; 1024];
    loop {
        let _ = tcp.write_all(b" ").await;
        match tokio::time::timeout(Duration::from_millis(100), tcp.read(&mut buffer)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => answer.extend_from_slice(&buffer[..n]),
            Err(_) => {}
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "still reading after {:?}",
            started.elapsed()
        );
    }
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    // Nothing was stored.
    let log = db.log();
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(log.pool())
        .await
        .expect("count");
    assert_eq!(stored, 0);
}

#[tokio::test]
async fn a_queue_budget_smaller_than_a_body_stops_the_gateway_at_start() {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_warren-gateway"))
        .env_clear()
        .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .args(["--max-body-bytes", "1000", "--append-queue-bytes", "999"])
        .output()
        .await
        .expect("run");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("WARREN_APPEND_QUEUE_BYTES"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_gateway_accepts_no_more_and_answers_the_request_in_flight() {
    use hmac::{Hmac, KeyInit, Mac};
    let db = TestDatabase::new().await;
    let mut gateway = Gateway::start(&db).await;
    let now = chrono::Utc::now().timestamp();
    let body = serde_json::json!({
        "type": "event_callback", "team_id": "T1", "event_id": "EvInFlight",
        "event_time": now, "authorizations": [{"user_id": "UAPP"}],
        "event": {"type": "app_mention", "user": "U1", "channel": "C1",
                  "text": "<@UAPP> @alice hello", "ts": "1700000000.000100"},
    })
    .to_string();
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(b"public-port-test").expect("key");
    mac.update(format!("v0:{now}:{body}").as_bytes());
    let signature = hex::encode(mac.finalize().into_bytes());

    // A kept-alive connection, being served (it has had an answer)...
    let mut tcp = TcpStream::connect(gateway.addr).await.expect("connect");
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .expect("write");
    let mut buffer = [0u8; 4096];
    let n = tcp.read(&mut buffer).await.expect("read");
    assert!(buffer[..n].starts_with(b"HTTP/1.1 200"));
    // ...is halfway through a signed event when the gateway is told to stop.
    let (first, rest) = body.as_bytes().split_at(body.len() / 2);
    let head = format!(
        "POST /slack/events HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
         x-slack-request-timestamp: {now}\r\nx-slack-signature: v0={signature}\r\n\
         content-length: {}\r\n\r\n",
        body.len()
    );
    tcp.write_all(head.as_bytes()).await.expect("head");
    tcp.write_all(first).await.expect("first half");
    let pid = gateway.child.id().expect("the gateway's pid");
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(kill.success());

    // It stops accepting...
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(gateway.addr).await.is_ok() {
        assert!(Instant::now() < deadline, "still accepting after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ...yet answers the request in flight once it is whole, after storing it, and exits.
    tcp.write_all(rest).await.expect("the rest");
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut answer))
        .await
        .expect("an answer within 10 s")
        .expect("read");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let status = tokio::time::timeout(Duration::from_secs(10), gateway.child.wait())
        .await
        .expect("the gateway exited within 10 s")
        .expect("its status");
    assert!(status.success(), "{status}");
    let stored: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE payload->>'event_id' = 'EvInFlight'")
            .fetch_one(db.log().pool())
            .await
            .expect("count");
    assert_eq!(stored, 1);
}
