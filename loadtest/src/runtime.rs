//! Workspace-runtime benchmark: an agent-to-agent mention round trip through the runtime
//! (a message published to alice's JetStream inbox → alice's turn → her mention of bob
//! published to the outbox), against raw NATS request-reply on the same server (the goal's
//! baseline) and against the JetStream floor: the same two stores with a bare relay in place
//! of the runtime (inbox consumer → outbox publish → ack). The three are interleaved round
//! trip by round trip. Closed loop, one at a time; HDR histograms.
//!
//! runtime / raw is the goal's ratio; runtime / floor is what the runtime itself adds to
//! what JetStream costs on that path.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use hdrhistogram::Histogram;
use tokio_util::sync::CancellationToken;
use warren_schema::EventId;
use warren_schema::events::Origin;
use warren_schema::nats::{InboxMessage, Namespace, OutboxMessage};

use crate::report;

#[derive(Debug, Clone, clap::Parser)]
pub struct Args {
    /// Round trips per measurement.
    #[arg(long, default_value_t = 2000)]
    pub round_trips: usize,
    /// Run the runtime as this binary (`target/release/warren-workspace-runtime`), a
    /// process of its own with its own connection, as it runs in a workspace. Without it,
    /// the runtime runs inside the benchmark process.
    #[arg(long)]
    pub runtime_binary: Option<std::path::PathBuf>,
}

/// The runtime under test: in this process, or a child process.
enum Runtime {
    InProcess(
        CancellationToken,
        tokio::task::JoinHandle<warren_workspace_runtime::Result<()>>,
    ),
    Process(tokio::process::Child),
}

impl Runtime {
    async fn start(
        config: warren_workspace_runtime::Config,
        binary: Option<&std::path::Path>,
    ) -> anyhow::Result<Self> {
        let Some(binary) = binary else {
            let shutdown = CancellationToken::new();
            let task = tokio::spawn(warren_workspace_runtime::run(config, shutdown.clone()));
            return Ok(Self::InProcess(shutdown, task));
        };
        let mut child = tokio::process::Command::new(binary)
            .env_clear()
            .envs(config.environment("/usr/local/bin:/usr/bin:/bin"))
            // Its logs at their default level, as deployed, written where nobody reads.
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| anyhow::anyhow!("starting {}: {e}", binary.display()))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
        let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
        loop {
            let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
                .await
                .map_err(|_| anyhow::anyhow!("the runtime did not say ready within 30 s"))??
                .ok_or_else(|| anyhow::anyhow!("the runtime exited before it was ready"))?;
            if line.trim() == "ready" {
                break;
            }
        }
        // Keep reading its stdout so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Self::Process(child))
    }

    async fn stop(self) -> anyhow::Result<()> {
        match self {
            Self::InProcess(shutdown, task) => {
                shutdown.cancel();
                task.await??;
            }
            Self::Process(mut child) => {
                child.kill().await?;
            }
        }
        Ok(())
    }
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let client = async_nats::connect(url.as_str()).await?;
    let js = async_nats::jetstream::new(client.clone());
    let prefix = format!("bench{}", std::process::id());
    let ns = Namespace::new(&prefix);
    js.get_or_create_stream(ns.inbox_stream_config()).await?;
    js.get_or_create_stream(ns.outbox_stream_config()).await?;
    report::heading(&format!(
        "workspace runtime: mention round trip vs raw NATS request-reply ({} each)",
        args.round_trips
    ));

    // Baseline: a responder that answers at once.
    let subject = format!("{prefix}.echo");
    let mut requests = client.subscribe(subject.clone()).await?;
    let responder = client.clone();
    tokio::spawn(async move {
        while let Some(m) = requests.next().await {
            if let Some(reply) = m.reply {
                let _ = responder.publish(reply, m.payload).await;
            }
        }
    });
    let mut raw = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;

    // The JetStream floor: a relay that takes each message from a durable inbox consumer,
    // publishes it to the outbox (awaiting the store), then acks, as a turn does, with no
    // parsing, driver or tracing.
    let floor_in = ns.inbox_subject("floor", "relay");
    let floor_out = ns.outbox_subject("floor");
    let relay = {
        let inboxes = js.get_stream(ns.inbox_stream()).await?;
        let consumer = inboxes
            .get_or_create_consumer(
                "floor-relay",
                async_nats::jetstream::consumer::pull::Config {
                    durable_name: Some("floor-relay".into()),
                    filter_subject: floor_in.clone(),
                    ack_policy: async_nats::jetstream::consumer::AckPolicy::Explicit,
                    ..Default::default()
                },
            )
            .await?;
        let mut messages = consumer.messages().await?;
        let (js, floor_out) = (js.clone(), floor_out.clone());
        tokio::spawn(async move {
            while let Some(Ok(m)) = messages.next().await {
                let Ok(stored) = js.publish(floor_out.clone(), m.payload.clone()).await else {
                    return;
                };
                if stored.await.is_err() || m.ack().await.is_err() {
                    return;
                }
            }
        })
    };
    let mut floor_outbox = client.subscribe(floor_out).await?;
    let mut floor = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;

    // Through the runtime: alice (echo, cc bob) in workspace "bench".
    let mut config = warren_schema::launch::LaunchContract::new(
        "bench",
        std::env::temp_dir(),
        warren_schema::launch::NatsLaunch::new(url.clone(), prefix.clone()),
    );
    config.agents.push(warren_schema::launch::AgentLaunch::new(
        "alice",
        "echo",
        serde_json::json!({"cc": ["bob"]}),
    ));
    let runtime = Runtime::start(config, args.runtime_binary.as_deref()).await?;
    report::line(match args.runtime_binary {
        Some(_) => "runtime: its own process (the binary)",
        None => "runtime: inside the benchmark process",
    });
    let mut outbox = client.subscribe(ns.outbox_subject("bench")).await?;
    let mut through = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let origin = Origin::Webhook {
        endpoint: "bench".into(),
        delivery_id: "0".into(),
    };
    for n in 0..args.round_trips + 100 {
        let routing = EventId::random();
        let message = InboxMessage {
            routing_id: routing,
            message_id: EventId::random(),
            workspace: "bench".into(),
            agent: "alice".into(),
            text: format!("question {n}"),
            reply_to: origin.clone(),
            chain: vec![],
            correlation_id: None,
            files: vec![],
        };
        // The baseline, interleaved: each raw round trip runs right before a runtime one,
        // so both see the same machine and server (no drift between two phases).
        let started = Instant::now();
        client.request(subject.clone(), "ping".into()).await?;
        if n >= 100 {
            raw.record(started.elapsed().as_micros().max(1) as u64)?;
        }
        let started = Instant::now();
        js.publish(floor_in.clone(), format!("{n}").into())
            .await?
            .await?;
        tokio::time::timeout(Duration::from_secs(10), floor_outbox.next())
            .await?
            .ok_or_else(|| anyhow::anyhow!("floor subscription ended"))?;
        if n >= 100 {
            floor.record(started.elapsed().as_micros().max(1) as u64)?;
        }
        let started = Instant::now();
        js.publish(
            ns.inbox_subject("bench", "alice"),
            serde_json::to_vec(&message)?.into(),
        )
        .await?
        .await?;
        // Wait for alice's mention of bob for this message.
        loop {
            let m = tokio::time::timeout(Duration::from_secs(10), outbox.next())
                .await?
                .ok_or_else(|| anyhow::anyhow!("outbox subscription ended"))?;
            if let Ok(OutboxMessage::Mention { in_reply_to, .. }) =
                serde_json::from_slice::<OutboxMessage>(&m.payload)
                && in_reply_to == routing
            {
                break;
            }
        }
        // The first 100 of each warm up.
        if n >= 100 {
            through.record(started.elapsed().as_micros().max(1) as u64)?;
        }
    }
    runtime.stop().await?;
    relay.abort();
    let _ = js.delete_stream(ns.inbox_stream()).await;
    let _ = js.delete_stream(ns.outbox_stream()).await;

    for (name, h) in [
        ("baseline: raw NATS request-reply", &raw),
        ("JetStream floor: inbox → relay → outbox", &floor),
        ("mention round trip through the runtime", &through),
    ] {
        for (label, q) in [("p50", 0.5), ("p99", 0.99), ("p99.9", 0.999)] {
            report::figure(
                &format!("{name} {label}"),
                h.value_at_quantile(q) as f64,
                "µs",
            );
        }
    }
    let ratio = through.value_at_quantile(0.99) as f64 / raw.value_at_quantile(0.99).max(1) as f64;
    report::ratio("p99 runtime / p99 raw (goal <= 1.5)", ratio, &[]);
    report::ratio("goal 1.5 / ratio", 1.5 / ratio, &[1.0]);
    let p99 = |h: &Histogram<u64>| h.value_at_quantile(0.99).max(1) as f64;
    report::ratio(
        "p99 JetStream floor / p99 raw",
        p99(&floor) / p99(&raw),
        &[],
    );
    report::ratio(
        "p99 runtime / p99 JetStream floor",
        p99(&through) / p99(&floor),
        &[],
    );
    Ok(())
}
