//! Gateway load: signed Slack `event_callback` requests over real HTTP to the gateway's
//! router, served on 127.0.0.1 in this process, backed by a fresh database.
//!
//! - Open loop: requests are *scheduled* at a constant rate and each latency is measured from
//!   its scheduled time, so a slow answer cannot hide the queueing behind it (coordinated
//!   omission). Reported: ack latency p50 / p99 / p99.9 / max (HDR histogram).
//! - Saturation: 64 clients sending back to back; acked Slack events per second beside
//!   pgbench single-row INSERTs (64 clients) into the same table, measured in the same run.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use warren_gateway::http::{AppState, router};
use warren_schema::Secret;
use warren_schema::event_log::{Appender, AppenderConfig};
use warren_schema::testing::TestDatabase;

use crate::{pgbench, report};

const SECRET: &str = "loadtest-signing-secret";

#[derive(Debug, Clone, clap::Parser)]
pub struct Args {
    /// Open loop: requests per second.
    #[arg(long, default_value_t = 1000)]
    pub rate: u64,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 15)]
    pub seconds: u64,
    /// Saturation: concurrent clients (and pgbench clients).
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
    /// Event log writer transactions in the gateway's appender.
    #[arg(long, default_value_t = AppenderConfig::default().writers)]
    pub writers: usize,
    /// Serve with plain `axum::serve` (no connection limit, no timeouts) instead of the
    /// gateway's hardened listener: the comparison for what the listener costs.
    #[arg(long)]
    pub plain_listener: bool,
    /// Draws the open loop's ack latency (over time, and its histogram) as an SVG here.
    #[arg(long)]
    pub svg: Option<std::path::PathBuf>,
}

struct Gateway {
    url: String,
    db: TestDatabase,
}

async fn start_gateway(writers: usize, plain_listener: bool) -> anyhow::Result<Gateway> {
    let db = TestDatabase::with_pool_size(writers as u32 + 4).await;
    let config = AppenderConfig {
        writers,
        ..AppenderConfig::default()
    };
    let (appender, _writers) = Appender::start(db.pool.clone(), config);
    let app = router(
        AppState {
            appender,
            pool: db.pool.clone(),
            slack_signing_secret: Some(Secret::new(SECRET)),
            webhooks: Default::default(),
            append_timeout: Duration::from_secs(2),
            retry_after_secs: 1,
            queued_bytes: warren_gateway::http::QueuedBytes::new(64 << 20),
        },
        1024 * 1024,
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/slack/events", listener.local_addr()?);
    if plain_listener {
        use axum::serve::ListenerExt;
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        tokio::spawn(async move { axum::serve(listener, app).await });
    } else {
        tokio::spawn(warren_gateway::http::serve(
            listener,
            app,
            warren_gateway::http::Limits::default(),
            std::future::pending(),
        ));
    }
    Ok(Gateway { url, db })
}

/// A signed Slack message event with a unique event id and message ts.
fn signed_request(client: &reqwest::Client, url: &str, n: u64) -> reqwest::RequestBuilder {
    let now = chrono::Utc::now().timestamp();
    let body = serde_json::json!({
        "type": "event_callback", "team_id": "TLOAD", "event_id": format!("Ev{n}"),
        "event_time": now, "authorizations": [{"user_id": "UAPP"}],
        "event": {"type": "app_mention", "user": "U1", "channel": format!("C{}", n % 50),
                  "text": "<@UAPP> @alice how are the numbers today?",
                  "ts": format!("{now}.{n:06}")},
    })
    .to_string();
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).expect("any key length");
    mac.update(format!("v0:{now}:{body}").as_bytes());
    let sig = hex::encode(mac.finalize().into_bytes());
    client
        .post(url)
        .header("content-type", "application/json")
        .header("x-slack-request-timestamp", now.to_string())
        .header("x-slack-signature", format!("v0={sig}"))
        .body(body)
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    report::line(&format!(
        "open loop: {} req/s for {}s; saturation: {} clients for {}s",
        args.rate, args.seconds, args.clients, args.seconds
    ));
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(512)
        .tcp_nodelay(true)
        .build()?;

    report::heading("gateway: open-loop ack latency");
    let gw = start_gateway(args.writers, args.plain_listener).await?;
    let (hist, ok, failed, elapsed, samples) = open_loop(&client, &gw.url, &args).await?;
    if let Some(path) = &args.svg {
        let title = format!(
            "gateway ack latency, open loop at {} req/s for {} s ({} acked)",
            args.rate, args.seconds, ok
        );
        std::fs::write(path, crate::svg::ack_latency(&title, &samples))?;
        report::line(&format!("ack latency drawn: {}", path.display()));
    }
    report::figure("offered rate", args.rate as f64, "req/s");
    report::figure("acked rate", ok as f64 / elapsed.as_secs_f64(), "req/s");
    report::figure("failed or non-200", failed as f64, "requests");
    for (name, q) in [("p50", 0.5), ("p99", 0.99), ("p99.9", 0.999)] {
        report::figure(
            &format!("ack latency {name}"),
            hist.value_at_quantile(q) as f64 / 1000.0,
            "ms",
        );
    }
    report::figure("ack latency max", hist.max() as f64 / 1000.0, "ms");
    report::ratio(
        "p99 goal 10 ms: goal / p99",
        10_000.0 / hist.value_at_quantile(0.99).max(1) as f64,
        &[1.0],
    );
    report::ratio(
        "p99.9 goal 50 ms: goal / p99.9",
        50_000.0 / hist.value_at_quantile(0.999).max(1) as f64,
        &[1.0],
    );
    drop(gw);

    report::heading("gateway: saturation vs pgbench single-row INSERT");
    let baseline_db = TestDatabase::with_pool_size(2).await;
    let baseline = pgbench::insert_tps(
        &baseline_db.url(),
        args.clients,
        Duration::from_secs(args.seconds),
    )
    .await?;
    drop(baseline_db);
    let gw = start_gateway(args.writers, args.plain_listener).await?;
    let (acked, elapsed) = saturate(&client, &gw.url, &args).await?;
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&gw.db.pool)
        .await?;
    let rate = acked as f64 / elapsed.as_secs_f64();
    report::figure("baseline: pgbench INSERT", baseline, "rows/s");
    report::figure("gateway: acked Slack events", rate, "events/s");
    // Each acked event is two rows (the raw delivery and the message).
    report::figure(
        "gateway: rows stored per acked event",
        stored as f64 / acked.max(1) as f64,
        "rows",
    );
    report::ratio("acked events/s / pgbench rows/s", rate / baseline, &[1.5]);
    Ok(())
}

async fn open_loop(
    client: &reqwest::Client,
    url: &str,
    args: &Args,
) -> anyhow::Result<(Histogram<u64>, u64, u64, Duration, Vec<(f64, f64)>)> {
    let total = args.rate * args.seconds;
    let interval = Duration::from_secs_f64(1.0 / args.rate as f64);
    let started = Instant::now();
    let mut handles = Vec::with_capacity(total as usize);
    for n in 0..total {
        let intended = started + interval * n as u32;
        tokio::time::sleep_until(intended.into()).await;
        let request = signed_request(client, url, n);
        handles.push(tokio::spawn(async move {
            // The ack is complete when its body is read (and the connection goes back to
            // the pool for the next request).
            let ok = match request.send().await {
                Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                Err(_) => false,
            };
            (ok, intended.elapsed())
        }));
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let (mut ok, mut failed) = (0, 0);
    // (seconds into the load when it was due, ack latency in ms) of each acked request.
    let mut samples = Vec::with_capacity(handles.len());
    for (n, h) in handles.into_iter().enumerate() {
        let (success, latency) = h.await?;
        if success {
            ok += 1;
            hist.record(latency.as_micros() as u64)?;
            samples.push((
                (interval * n as u32).as_secs_f64(),
                latency.as_secs_f64() * 1000.0,
            ));
        } else {
            failed += 1;
        }
    }
    Ok((hist, ok, failed, started.elapsed(), samples))
}

async fn saturate(
    client: &reqwest::Client,
    url: &str,
    args: &Args,
) -> anyhow::Result<(u64, Duration)> {
    let stop = Arc::new(AtomicBool::new(false));
    let next = Arc::new(AtomicU64::new(10_000_000));
    let started = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..args.clients {
        let (client, url, stop, next) =
            (client.clone(), url.to_owned(), stop.clone(), next.clone());
        handles.push(tokio::spawn(async move {
            let mut acked = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if let Ok(r) = signed_request(&client, &url, n).send().await
                    && r.status().is_success()
                    && r.bytes().await.is_ok()
                {
                    acked += 1;
                }
            }
            acked
        }));
    }
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut acked = 0;
    for h in handles {
        acked += h.await?;
    }
    Ok((acked, started.elapsed()))
}
