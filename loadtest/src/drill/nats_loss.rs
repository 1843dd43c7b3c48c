//! The NATS-loss drill: a private `nats-server` under a control plane (the real binary, the
//! local backend, `echo` agents in runtime processes) is killed, its JetStream store deleted
//! and started again empty, during a burst of messages, again and again. Before each loss
//! the shared memory is written, as an agent writes it (a request to the control plane).
//!
//! What it counts: every message routed once and answered (`agent.turn_completed`: the log
//! keeps each turn's outputs once, whatever the runtime did twice), none dead-lettered;
//! every shared-memory key back in the new store with its last value; a `nats.recovered`
//! for each loss, and how long after the restart it came.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use warren_schema::nats::{Namespace, SharedWrite, SharedWriteResult};

use super::installation::{Installation, Options};
use super::leader_kill::Counts;
use crate::report;

#[derive(Debug, Clone, clap::Parser)]
pub struct NatsLossArgs {
    /// Messages in the burst.
    #[arg(long, default_value_t = 1000)]
    pub messages: u64,
    /// Messages per second.
    #[arg(long, default_value_t = 50)]
    pub rate: u64,
    /// Times the NATS store is lost.
    #[arg(long, default_value_t = 2)]
    pub losses: usize,
    /// Agents, each in a workspace of its own.
    #[arg(long, default_value_t = 4)]
    pub workspaces: usize,
    /// Shared-memory keys written before each loss.
    #[arg(long, default_value_t = 20)]
    pub keys: usize,
    /// The `nats-server` binary (2.10 or newer).
    #[arg(long, env = "NATS_SERVER_BIN", default_value = "nats-server")]
    pub nats_server_bin: PathBuf,
    /// The control-plane binary (default: beside this program).
    #[arg(long)]
    pub control_plane_binary: Option<PathBuf>,
    /// The runtime binary (default: beside this program).
    #[arg(long)]
    pub runtime_binary: Option<PathBuf>,
}

use warren_test_nats::NatsServer;

/// Writes `key` in the shared memory as `agent` of `workspace` would, until the control
/// plane says it is written (it may still be reconnecting after a loss).
async fn write_shared(
    client: &async_nats::Client,
    ns: &Namespace,
    workspace: &str,
    agent: &str,
    key: &str,
    value: &Value,
) -> anyhow::Result<()> {
    let write = SharedWrite {
        agent: agent.to_owned(),
        key: key.to_owned(),
        value: Some(value.clone()),
        expected_revision: None,
        conversation: None,
    };
    let payload = serde_json::to_vec(&write)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let answer = client
            .request(ns.shared_write_subject(workspace), payload.clone().into())
            .await;
        match answer.map(|m| serde_json::from_slice::<SharedWriteResult>(&m.payload)) {
            Ok(Ok(SharedWriteResult::Written { .. })) => return Ok(()),
            Ok(Ok(SharedWriteResult::Refused { reason })) => {
                anyhow::bail!("the shared write of {key} was refused: {reason}")
            }
            other => anyhow::ensure!(
                Instant::now() < deadline,
                "the shared write of {key} did not succeed within 60 s: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub async fn nats_loss(args: NatsLossArgs) -> anyhow::Result<bool> {
    report::heading("drill nats-loss");
    let server_dir = std::env::temp_dir().join(format!("warren-drill-nats-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&server_dir);
    let mut server = NatsServer::start_with(&args.nats_server_bin, &server_dir, "").await?;
    let mut install = Installation::new(Options {
        name: "natsloss",
        workspaces: args.workspaces,
        nats_url: &server.url,
        lease_ttl_secs: 10,
        control_plane_binary: args.control_plane_binary.as_deref(),
        runtime_binary: args.runtime_binary.as_deref(),
    })
    .await?;
    report::line(&format!(
        "{} messages at {}/s to {} agents; the NATS store lost {} times, {} shared keys written before each; logs in {}",
        args.messages,
        args.rate,
        args.workspaces,
        args.losses,
        args.keys,
        install.dir.display()
    ));
    let replicas = vec![install.spawn()?];
    install.configured().await?;
    let client = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connect(server.url.as_str())
        .await?;
    let ns = Namespace::new(&install.prefix);

    let burst = install.burst(args.messages, args.rate);
    let burst_time = Duration::from_secs_f64(args.messages as f64 / args.rate.max(1) as f64);
    let gap = burst_time / u32::try_from(args.losses + 1).unwrap_or(u32::MAX);
    let mut written: BTreeMap<String, Value> = BTreeMap::new();
    let mut recoveries: Vec<Duration> = Vec::new();
    for loss in 0..args.losses {
        for i in 0..args.keys {
            // Each loss's keys, and one key overwritten every time: the last value counts.
            let (key, value) = (format!("drill-{loss}-{i}"), json!({"loss": loss, "i": i}));
            write_shared(&client, &ns, &install.workspaces[0], "agent0", &key, &value).await?;
            written.insert(key, value);
        }
        let last = json!({"written_before_loss": loss});
        write_shared(
            &client,
            &ns,
            &install.workspaces[0],
            "agent0",
            "drill-last",
            &last,
        )
        .await?;
        written.insert("drill-last".into(), last);
        tokio::time::sleep(gap).await;

        let before = install.count("nats.recovered").await?;
        server.crash_wipe_and_restart().await?;
        let at = Instant::now();
        while install.count("nats.recovered").await? <= before {
            anyhow::ensure!(
                at.elapsed() < Duration::from_secs(60),
                "no nats.recovered within 60 s of the loss; see {}",
                install.dir.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        recoveries.push(at.elapsed());
    }
    let sent = burst.await??;
    let (routed, answered) = install.outcome(&sent, Duration::from_secs(180)).await?;
    let dead_lettered = install.count("message.dead_lettered").await?;
    let republished: u64 = install
        .pairs(
            "SELECT coalesce(sum((payload->>'republished')::bigint), 0)::text, '' FROM events \
             WHERE event_type = 'nats.recovered'",
        )
        .await?
        .first()
        .and_then(|(n, _)| n.parse().ok())
        .unwrap_or(0);

    // The shared memory, as an agent reads it from the new store (each key holds its value
    // with its writer's name).
    let js = async_nats::jetstream::new(client);
    let mut memory_wrong = 0;
    match js.get_key_value(ns.shared_bucket()).await {
        Ok(kv) => {
            for (key, value) in &written {
                let stored = kv.get(key).await.ok().flatten();
                let same = stored
                    .and_then(|bytes| serde_json::from_slice::<Value>(&bytes).ok())
                    .is_some_and(|v| v["value"] == *value && v["agent"] == "agent0");
                memory_wrong += usize::from(!same);
            }
        }
        Err(_) => memory_wrong = written.len(),
    }

    // Workspaces are not judged here: a runtime whose consumer went with the store exits and
    // is started again, as it should be.
    let counts = Counts::of(
        &sent,
        &routed,
        &answered,
        dead_lettered,
        &[],
        &HashMap::new(),
        0,
    );
    let passed = counts.passed() && memory_wrong == 0 && recoveries.len() == args.losses;
    recoveries.sort();
    let ms = |d: Option<&Duration>| d.map_or(0.0, |d| d.as_secs_f64() * 1000.0);
    for (label, value) in [
        ("messages", counts.messages.to_string()),
        ("NATS stores lost", args.losses.to_string()),
        ("nats.recovered recorded", recoveries.len().to_string()),
        ("routed messages published again", republished.to_string()),
        ("never routed (skipped)", counts.never_routed.to_string()),
        ("routed twice", counts.routed_twice.to_string()),
        (
            "routed, never answered (lost)",
            counts.unanswered.to_string(),
        ),
        ("dead-lettered", counts.dead_lettered.to_string()),
        ("shared keys written", written.len().to_string()),
        (
            "shared keys missing or wrong after",
            memory_wrong.to_string(),
        ),
        (
            "recovery after restart, max ms",
            format!("{:.0}", ms(recoveries.last())),
        ),
    ] {
        report::line(&format!("{label:<44} {value:>10}"));
    }
    report::line(&format!(
        "DRILL name=nats-loss messages={} losses={} recovered={} republished={republished} \
         lost={} routed_twice={} memory_wrong={memory_wrong} recovery_max_ms={:.0} result={}",
        counts.messages,
        args.losses,
        recoveries.len(),
        counts.never_routed + counts.unanswered + counts.dead_lettered,
        counts.routed_twice,
        ms(recoveries.last()),
        if passed { "pass" } else { "fail" }
    ));
    install.remove(replicas, passed).await;
    drop(server);
    if passed {
        let _ = std::fs::remove_dir_all(&server_dir);
    }
    Ok(passed)
}
