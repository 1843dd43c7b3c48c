//! Drills: load with faults, then a count of what was stored against what was acked.
//!
//! - `crash`: signed Slack events at a steady rate into the real `warren-gateway` binary
//!   (its own process, a fresh database), which is SIGKILLed and started again
//!   `--gateway-kills` times, while PostgreSQL is stopped at once (`pg_ctl -m immediate`:
//!   no checkpoint, no goodbye) and started again `--postgres-stops` times. The sender
//!   retries whatever was not acked, as Slack does (same event id, `X-Slack-Retry-Num`).
//! - `duplicates`: each event sent 4 times, two at once and two delayed, to a gateway that
//!   stays up.
//! - `overload`: the gateway's saturation rate measured (64 senders back to back), then
//!   twice that rate, open loop, each request sent once: what is not taken must be refused
//!   fast (503 with `Retry-After` within 100 ms), and nothing acked may be missing.
//!
//! - `leader-kill`: control-plane replicas SIGKILLed during a burst ([`leader_kill`]).
//! - `nats-loss`: the NATS store deleted under a control plane during a burst
//!   ([`nats_loss`]).
//!
//! At the end, the log is counted: every acked delivery stored exactly once, every delivery
//! eventually stored, no duplicates, nothing acked that is not stored (an ack before the
//! commit would show as acked but lost after PostgreSQL's crash). Each drill ends with one
//! line a script can read: `DRILL name=… result=pass|fail` and the counts.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use warren_schema::testing::TestDatabase;

use crate::report;

mod installation;
mod leader_kill;
mod nats_loss;
pub use leader_kill::{Counts as LeaderKillCounts, LeaderKillArgs};
pub use nats_loss::NatsLossArgs;

const SECRET: &str = "drill-signing-secret";

#[derive(Debug, clap::Parser)]
pub struct Args {
    #[command(subcommand)]
    pub drill: Drill,
}

#[derive(Debug, clap::Subcommand)]
pub enum Drill {
    /// Gateway SIGKILLs and PostgreSQL crashes under load.
    Crash(CrashArgs),
    /// Every delivery sent four times, at once and delayed.
    Duplicates(DuplicatesArgs),
    /// Twice the saturation rate: fast 503s with Retry-After, nothing acked unstored.
    Overload(OverloadArgs),
    /// Control-plane leaders SIGKILLed during a burst: nothing skipped, nothing started twice.
    LeaderKill(LeaderKillArgs),
    /// The NATS store lost during a burst: every message answered once, memory restored.
    NatsLoss(NatsLossArgs),
}

#[derive(Debug, Clone, clap::Parser)]
pub struct OverloadArgs {
    /// Seconds of saturation measurement (64 senders back to back).
    #[arg(long, default_value_t = 5)]
    pub measure_secs: u64,
    /// Seconds of overload at twice the measured rate.
    #[arg(long, default_value_t = 10)]
    pub overload_secs: u64,
    #[command(flatten)]
    pub gateway: GatewayArgs,
}

#[derive(Debug, Clone, clap::Parser)]
pub struct CrashArgs {
    /// Signed events to deliver.
    #[arg(long, default_value_t = 100_000)]
    pub events: u64,
    /// Events per second, scheduled evenly.
    #[arg(long, default_value_t = 1000)]
    pub rate: u64,
    /// Times the gateway is SIGKILLed (and started again), spread over the load.
    #[arg(long, default_value_t = 20)]
    pub gateway_kills: u32,
    /// Times PostgreSQL is stopped immediately (and started again), spread over the load.
    #[arg(long, default_value_t = 5)]
    pub postgres_stops: u32,
    /// Shell command that stops PostgreSQL at once (`scripts/drills` sets it).
    #[arg(long, env = "WARREN_DRILL_PG_STOP")]
    pub postgres_stop: Option<String>,
    /// Shell command that starts PostgreSQL again.
    #[arg(long, env = "WARREN_DRILL_PG_START")]
    pub postgres_start: Option<String>,
    #[command(flatten)]
    pub gateway: GatewayArgs,
}

#[derive(Debug, Clone, clap::Parser)]
pub struct DuplicatesArgs {
    /// Deliveries, each sent four times.
    #[arg(long, default_value_t = 10_000)]
    pub events: u64,
    /// Deliveries per second.
    #[arg(long, default_value_t = 500)]
    pub rate: u64,
    #[command(flatten)]
    pub gateway: GatewayArgs,
}

#[derive(Debug, Clone, clap::Args)]
pub struct GatewayArgs {
    /// The gateway binary (default: `warren-gateway` beside this program).
    #[arg(long)]
    pub gateway_binary: Option<PathBuf>,
    /// CPUs the gateway may run on (a `taskset -c` list, e.g. `0`): with the drill itself
    /// pinned to the others, the sender does not take the gateway's CPU, as on a machine
    /// of its own.
    #[arg(long)]
    pub gateway_cpus: Option<String>,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let passed = match args.drill {
        Drill::Crash(a) => crash(a).await?,
        Drill::Duplicates(a) => duplicates(a).await?,
        Drill::Overload(a) => overload(a).await?,
        Drill::LeaderKill(a) => leader_kill::leader_kill(a).await?,
        Drill::NatsLoss(a) => nats_loss::nats_loss(a).await?,
    };
    anyhow::ensure!(passed, "the drill failed (see its counts)");
    Ok(())
}

/// The real gateway binary, in a process of its own, on a port that stays the same across
/// restarts.
struct GatewayProcess {
    binary: PathBuf,
    cpus: Option<String>,
    database_url: String,
    port: u16,
    log: PathBuf,
    child: Option<tokio::process::Child>,
}

impl GatewayProcess {
    async fn start(args: &GatewayArgs, database_url: String) -> anyhow::Result<Self> {
        let binary = match &args.gateway_binary {
            Some(b) => b.clone(),
            None => sibling("warren-gateway")?,
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let log = std::env::temp_dir().join(format!("warren-drill-gateway-{port}.log"));
        let mut gateway = Self {
            binary,
            cpus: args.gateway_cpus.clone(),
            database_url,
            port,
            log,
            child: None,
        };
        gateway.spawn().await?;
        Ok(gateway)
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/slack/events", self.port)
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut command = match &self.cpus {
            Some(cpus) => {
                let mut c = tokio::process::Command::new("taskset");
                c.arg("-c").arg(cpus).arg(&self.binary);
                c
            }
            None => tokio::process::Command::new(&self.binary),
        };
        let child = command
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("DATABASE_URL", &self.database_url)
            .env("SLACK_SIGNING_SECRET", SECRET)
            .env("WARREN_GATEWAY_LISTEN", format!("127.0.0.1:{}", self.port))
            .env("WARREN_GATEWAY_METRICS_LISTEN", "127.0.0.1:0")
            .env("WARREN_LOG_FORMAT", "text")
            .env("RUST_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| anyhow::anyhow!("starting {}: {e}", self.binary.display()))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .is_err()
        {
            anyhow::ensure!(
                Instant::now() < deadline,
                "the gateway did not listen within 30 s; see {}",
                self.log.display()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    /// SIGKILL (no drain, no goodbye), then a new process on the same port.
    async fn kill_and_restart(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().await?;
        }
        self.spawn().await
    }
}

/// A program beside this one (as `cargo build` leaves them).
fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .ok_or_else(|| anyhow::anyhow!("this program has no directory"))?;
    // Integration tests run from target/{profile}/deps.
    for candidate in [dir.join(name), dir.join("..").join(name)] {
        if candidate.exists() {
            return Ok(candidate);
        }
    }
    anyhow::bail!(
        "{name} is not beside {}: cargo build -p {name} (or pass its path)",
        exe.display()
    )
}

/// Delivery `n`: a signed Slack message event with a unique event id; `retry` sets
/// `X-Slack-Retry-Num` as Slack does on a redelivery.
fn request(client: &reqwest::Client, url: &str, n: u64, retry: u32) -> reqwest::RequestBuilder {
    let now = chrono::Utc::now().timestamp();
    let body = serde_json::json!({
        "type": "event_callback", "team_id": "TDRILL", "event_id": format!("EvDrill{n}"),
        "event_time": now, "authorizations": [{"user_id": "UAPP"}],
        "event": {"type": "app_mention", "user": "U1", "channel": format!("C{}", n % 50),
                  "text": "<@UAPP> @alice drill", "ts": format!("1700000000.{n:06}")},
    })
    .to_string();
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).expect("any key length");
    mac.update(format!("v0:{now}:{body}").as_bytes());
    let mut request = client
        .post(url)
        .timeout(Duration::from_secs(5))
        .header("content-type", "application/json")
        .header("x-slack-request-timestamp", now.to_string())
        .header(
            "x-slack-signature",
            format!("v0={}", hex::encode(mac.finalize().into_bytes())),
        )
        .body(body);
    if retry > 0 {
        request = request
            .header("x-slack-retry-num", retry.to_string())
            .header("x-slack-retry-reason", "http_timeout");
    }
    request
}

/// What the sender saw.
#[derive(Debug, Default)]
struct Sent {
    acked: Mutex<HashSet<u64>>,
    attempts: AtomicU64,
    refused: AtomicU64,
    unreachable: AtomicU64,
}

/// Sends delivery `n` until it is acked (200), retrying anything else after a pause, for
/// at most `patience`.
async fn deliver(client: &reqwest::Client, url: &str, n: u64, sent: &Sent, patience: Duration) {
    let deadline = Instant::now() + patience;
    let mut pause = Duration::from_millis(100);
    for retry in 0.. {
        sent.attempts.fetch_add(1, Ordering::Relaxed);
        match request(client, url, n, retry).send().await {
            Ok(r) if r.status() == reqwest::StatusCode::OK => {
                sent.acked.lock().expect("lock").insert(n);
                return;
            }
            Ok(_) => {
                sent.refused.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                sent.unreachable.fetch_add(1, Ordering::Relaxed);
            }
        }
        if Instant::now() + pause > deadline {
            return;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(2));
    }
}

/// Stored copies of each delivery, by its number.
async fn stored(db: &TestDatabase) -> anyhow::Result<HashMap<u64, i64>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let rows: Vec<(String, i64)> = loop {
        // PostgreSQL may still be coming back from the last stop.
        match sqlx::query_as(
            "SELECT payload->>'event_id', count(*) FROM events \
             WHERE event_type = 'slack.event_received' GROUP BY 1",
        )
        .fetch_all(&db.pool)
        .await
        {
            Ok(rows) => break rows,
            Err(e) if Instant::now() < deadline => {
                tracing::warn!(error = %e, "counting: retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e.into()),
        }
    };
    Ok(rows
        .into_iter()
        .filter_map(|(id, count)| Some((id.strip_prefix("EvDrill")?.parse().ok()?, count)))
        .collect())
}

/// The verdict on a drill's counts: printed, with the closing line. Pure but for printing.
fn verdict(
    name: &str,
    events: u64,
    sent: &Sent,
    stored: &HashMap<u64, i64>,
    extra: &[(&str, String)],
) -> bool {
    let acked = sent.acked.lock().expect("lock").clone();
    let duplicates: i64 = stored.values().map(|c| c - 1).sum();
    let lost = (0..events).filter(|n| !stored.contains_key(n)).count();
    let acked_not_stored = acked.iter().filter(|n| !stored.contains_key(n)).count();
    let never_acked = events as usize - acked.len();
    let passed = duplicates == 0 && lost == 0 && acked_not_stored == 0 && never_acked == 0;
    for (label, value) in [
        ("deliveries", events.to_string()),
        ("acked", acked.len().to_string()),
        ("stored (distinct)", stored.len().to_string()),
        ("duplicates stored", duplicates.to_string()),
        ("lost (never stored)", lost.to_string()),
        ("acked but not stored", acked_not_stored.to_string()),
        ("never acked", never_acked.to_string()),
        (
            "attempts",
            sent.attempts.load(Ordering::Relaxed).to_string(),
        ),
        (
            "answered 5xx/4xx",
            sent.refused.load(Ordering::Relaxed).to_string(),
        ),
        (
            "no answer (refused, reset, timed out)",
            sent.unreachable.load(Ordering::Relaxed).to_string(),
        ),
    ] {
        report::line(&format!("{label:<40} {value:>12}"));
    }
    let mut line = format!(
        "DRILL name={name} deliveries={events} acked={} stored={} duplicates={duplicates} \
         lost={lost} acked_not_stored={acked_not_stored}",
        acked.len(),
        stored.len()
    );
    for (k, v) in extra {
        line.push_str(&format!(" {k}={v}"));
    }
    line.push_str(if passed {
        " result=pass"
    } else {
        " result=fail"
    });
    report::line(&line);
    passed
}

async fn shell(command: &str) -> anyhow::Result<()> {
    let status = tokio::process::Command::new("bash")
        .arg("-c")
        .arg(command)
        .status()
        .await?;
    anyhow::ensure!(status.success(), "`{command}` failed: {status}");
    Ok(())
}

pub async fn crash(args: CrashArgs) -> anyhow::Result<bool> {
    anyhow::ensure!(
        args.rate > 0 && args.events > 0,
        "--rate and --events must be positive"
    );
    let stops = match (
        &args.postgres_stop,
        &args.postgres_start,
        args.postgres_stops,
    ) {
        (_, _, 0) => None,
        (Some(stop), Some(start), _) => Some((stop.clone(), start.clone())),
        _ => anyhow::bail!(
            "--postgres-stops needs --postgres-stop and --postgres-start (scripts/drills sets \
             them), or --postgres-stops 0"
        ),
    };
    let db = TestDatabase::new().await;
    let mut gateway = GatewayProcess::start(&args.gateway, db.url()).await?;
    let url = gateway.url();
    let load_time = Duration::from_secs_f64(args.events as f64 / args.rate as f64);
    report::heading(&format!(
        "drill: crash ({} events at {}/s over {:.0} s; {} gateway SIGKILLs, {} PostgreSQL \
         stops)",
        args.events,
        args.rate,
        load_time.as_secs_f64(),
        args.gateway_kills,
        args.postgres_stops
    ));

    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()?;
    let sent = Arc::new(Sent::default());
    let started = Instant::now();
    let mut load = tokio::task::JoinSet::new();
    let limit = Arc::new(tokio::sync::Semaphore::new(512));
    let schedule = {
        let (client, url, sent) = (client.clone(), url.clone(), sent.clone());
        let (events, rate) = (args.events, args.rate);
        tokio::spawn(async move {
            for n in 0..events {
                let at = started + Duration::from_secs_f64(n as f64 / rate as f64);
                tokio::time::sleep_until(at.into()).await;
                let permit = limit.clone().acquire_owned().await.expect("open");
                let (client, url, sent) = (client.clone(), url.clone(), sent.clone());
                load.spawn(async move {
                    deliver(&client, &url, n, &sent, Duration::from_secs(120)).await;
                    drop(permit);
                });
            }
            while load.join_next().await.is_some() {}
        })
    };

    // The faults, spread evenly over the load.
    let mut faults: Vec<(Duration, bool)> = (0..args.gateway_kills)
        .map(|i| {
            (
                load_time.mul_f64((i as f64 + 0.5) / args.gateway_kills as f64),
                true,
            )
        })
        .chain((0..args.postgres_stops).map(|i| {
            (
                load_time.mul_f64((i as f64 + 0.25) / args.postgres_stops as f64),
                false,
            )
        }))
        .collect();
    faults.sort();
    let mut down_time = Duration::ZERO;
    for (at, gateway_fault) in faults {
        tokio::time::sleep_until((started + at).into()).await;
        let fault = Instant::now();
        if gateway_fault {
            gateway.kill_and_restart().await?;
        } else if let Some((stop, start)) = &stops {
            shell(stop).await?;
            tokio::time::sleep(Duration::from_millis(500)).await;
            shell(start).await?;
        }
        down_time += fault.elapsed();
    }
    schedule.await?;
    let took = started.elapsed();
    let stored = stored(&db).await?;
    let passed = verdict(
        "crash",
        args.events,
        &sent,
        &stored,
        &[
            ("gateway_kills", args.gateway_kills.to_string()),
            ("postgres_stops", args.postgres_stops.to_string()),
            ("seconds", format!("{:.1}", took.as_secs_f64())),
            ("fault_seconds", format!("{:.1}", down_time.as_secs_f64())),
        ],
    );
    drop(gateway);
    Ok(passed)
}

pub async fn duplicates(args: DuplicatesArgs) -> anyhow::Result<bool> {
    anyhow::ensure!(
        args.rate > 0 && args.events > 0,
        "--rate and --events must be positive"
    );
    let db = TestDatabase::new().await;
    let gateway = GatewayProcess::start(&args.gateway, db.url()).await?;
    let url = gateway.url();
    report::heading(&format!(
        "drill: duplicates ({} deliveries, each sent 4 times: two at once, one 50 ms and one \
         500 ms later)",
        args.events
    ));
    let client = reqwest::Client::new();
    let sent = Arc::new(Sent::default());
    let copies_acked = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut load = tokio::task::JoinSet::new();
    for n in 0..args.events {
        let at = started + Duration::from_secs_f64(n as f64 / args.rate as f64);
        tokio::time::sleep_until(at.into()).await;
        for delay in [0, 0, 50, 500] {
            let (client, url, sent, copies_acked) = (
                client.clone(),
                url.clone(),
                sent.clone(),
                copies_acked.clone(),
            );
            load.spawn(async move {
                tokio::time::sleep(Duration::from_millis(delay)).await;
                deliver(&client, &url, n, &sent, Duration::from_secs(60)).await;
                if sent.acked.lock().expect("lock").contains(&n) {
                    copies_acked.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    }
    while load.join_next().await.is_some() {}
    let stored = stored(&db).await?;
    let copies = copies_acked.load(Ordering::Relaxed);
    let passed = verdict(
        "duplicates",
        args.events,
        &sent,
        &stored,
        &[
            ("copies_sent", (args.events * 4).to_string()),
            ("copies_acked", copies.to_string()),
        ],
    ) && copies == args.events * 4;
    drop(gateway);
    Ok(passed)
}

/// The first error of a request that got no answer (logged once).
static FIRST_ERROR: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// One overload request's outcome: status (`None`: no answer), seconds from send to
/// answer, `Retry-After` set (for no answer: whether it timed out).
type Answer = (Option<u16>, f64, bool);

pub async fn overload(args: OverloadArgs) -> anyhow::Result<bool> {
    let db = TestDatabase::new().await;
    let gateway = GatewayProcess::start(&args.gateway, db.url()).await?;
    let url = gateway.url();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(1024)
        .build()?;
    let next = Arc::new(AtomicU64::new(0));

    // Saturation: 64 senders back to back.
    let acked = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + Duration::from_secs(args.measure_secs);
    let mut senders = tokio::task::JoinSet::new();
    for _ in 0..64 {
        let (client, url, next, acked) = (client.clone(), url.clone(), next.clone(), acked.clone());
        senders.spawn(async move {
            while Instant::now() < until {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if let Ok(r) = request(&client, &url, n, 0).send().await
                    && r.status() == reqwest::StatusCode::OK
                {
                    acked.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    while senders.join_next().await.is_some() {}
    let saturation = acked.load(Ordering::Relaxed) as f64 / args.measure_secs as f64;
    let rate = (saturation * 2.0).max(1.0);
    report::heading(&format!(
        "drill: overload (saturation {saturation:.0} acked/s; {rate:.0}/s for {} s, open loop, \
         each request once)",
        args.overload_secs
    ));

    // Twice that, open loop.
    let first = next.load(Ordering::Relaxed);
    let total = (rate * args.overload_secs as f64) as u64;
    let answers: Arc<Mutex<Vec<(u64, Answer)>>> = Arc::default();
    let started = Instant::now();
    let mut load = tokio::task::JoinSet::new();
    for i in 0..total {
        let at = started + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(at.into()).await;
        let (client, url, answers) = (client.clone(), url.clone(), answers.clone());
        let n = first + i;
        load.spawn(async move {
            let sent = Instant::now();
            let answer = match request(&client, &url, n, 0).send().await {
                Ok(r) => (
                    Some(r.status().as_u16()),
                    sent.elapsed().as_secs_f64(),
                    r.headers().contains_key(reqwest::header::RETRY_AFTER),
                ),
                Err(e) => {
                    if FIRST_ERROR.set(format!("{e:?}")).is_ok() {
                        tracing::warn!(error = ?e, "first request without an answer");
                    }
                    (None, sent.elapsed().as_secs_f64(), e.is_timeout())
                }
            };
            answers.lock().expect("lock").push((n, answer));
        });
    }
    let sending = started.elapsed();
    while load.join_next().await.is_some() {}
    let answers = std::mem::take(&mut *answers.lock().expect("lock"));
    let stored = stored(&db).await?;

    let ok: Vec<u64> = answers
        .iter()
        .filter(|(_, (s, ..))| *s == Some(200))
        .map(|(n, _)| *n)
        .collect();
    let mut shed: Vec<f64> = answers
        .iter()
        .filter(|(_, (s, ..))| *s == Some(503))
        .map(|(_, (_, secs, _))| secs * 1000.0)
        .collect();
    shed.sort_by(f64::total_cmp);
    let without_retry_after = answers
        .iter()
        .filter(|(_, (s, _, retry))| *s == Some(503) && !retry)
        .count();
    let unanswered = answers.iter().filter(|(_, (s, ..))| s.is_none()).count();
    let other = answers.len() - ok.len() - shed.len() - unanswered;
    let acked_not_stored = ok.iter().filter(|n| !stored.contains_key(n)).count();
    let p = |q: f64| {
        shed.get(((q * shed.len() as f64).ceil() as usize).saturating_sub(1))
            .copied()
            .unwrap_or(0.0)
    };
    let (p99, max) = (p(0.99), shed.last().copied().unwrap_or(0.0));
    let passed = !shed.is_empty()
        && without_retry_after == 0
        && p99 <= 100.0
        && acked_not_stored == 0
        && other == 0
        && unanswered == 0;
    for (label, value) in [
        ("sent", answers.len().to_string()),
        (
            "send rate achieved (/s)",
            format!("{:.0}", answers.len() as f64 / sending.as_secs_f64()),
        ),
        ("acked (200)", ok.len().to_string()),
        ("shed (503)", shed.len().to_string()),
        ("503 without Retry-After", without_retry_after.to_string()),
        ("503 answer p50 (ms)", format!("{:.1}", p(0.5))),
        ("503 answer p99 (ms)", format!("{p99:.1}")),
        ("503 answer max (ms)", format!("{max:.1}")),
        ("other statuses", other.to_string()),
        (
            "no answer (refused, reset, timed out)",
            unanswered.to_string(),
        ),
        (
            "  of which timed out (5 s)",
            answers
                .iter()
                .filter(|(_, (s, _, timed_out))| s.is_none() && *timed_out)
                .count()
                .to_string(),
        ),
        ("acked but not stored", acked_not_stored.to_string()),
    ] {
        report::line(&format!("{label:<40} {value:>12}"));
    }
    report::line(&format!(
        "DRILL name=overload saturation={saturation:.0} rate={rate:.0} sent={} acked={} \
         shed={} shed_p99_ms={p99:.1} shed_max_ms={max:.1} no_retry_after={without_retry_after} \
         other={other} unanswered={unanswered} acked_not_stored={acked_not_stored} result={}",
        answers.len(),
        ok.len(),
        shed.len(),
        if passed { "pass" } else { "fail" }
    ));
    drop(gateway);
    Ok(passed)
}
