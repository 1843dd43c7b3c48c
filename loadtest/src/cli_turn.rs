//! Coding-agent turn overhead: what the workspace runtime adds around a real CLI turn.
//!
//! The real `codex` and `claude` (the pinned installs of `scripts/lib/clis.sh`) answer one
//! message at a time from a local model server that streams a short answer in the shape of
//! the Responses or Messages API (`warren-test-models`, the servers the runtime's tests
//! use). Two ways, interleaved turn by turn so both see the same machine:
//!
//! - **alone** (the baseline): the CLI run directly, with the same model server, the same
//!   flags and environment, and no MCP server: its own run time.
//! - **through the runtime**: a message published to the agent's JetStream inbox, the
//!   runtime's `command` driver starting the CLI with Warren's MCP server
//!   (`warren-workspace-runtime --mcp`, which the CLI starts and handshakes with), parsing
//!   its JSON, and publishing the reply and `turn_completed`; timed until
//!   `turn_completed` arrives.
//!
//! The overhead is the difference of each pair: process start, the MCP server's start and
//! handshake, output parsing, and the NATS legs.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use warren_schema::EventId;
use warren_schema::events::Origin;
use warren_schema::nats::{InboxMessage, Namespace, OutboxMessage};

use crate::report;

#[derive(Debug, Clone, clap::Parser)]
pub struct Args {
    /// Which CLIs: `codex`, `claude`, or both (the default).
    #[arg(long, value_delimiter = ',', default_values_t = [Cli::Codex, Cli::Claude])]
    pub cli: Vec<Cli>,
    /// Measured turns per CLI and way (after 2 warm-up turns each).
    #[arg(long, default_value_t = 20)]
    pub turns: usize,
    /// The runtime binary the CLIs start as their MCP server (default: the
    /// `warren-workspace-runtime` beside this program, as `cargo build --release` leaves it).
    #[arg(long)]
    pub runtime_binary: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Cli {
    Codex,
    Claude,
}

impl std::fmt::Display for Cli {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Codex => "codex",
            Self::Claude => "claude",
        })
    }
}

const WARM_UP: usize = 2;
const KEY: &str = "sk-bench-key";

/// The model: a short final answer, streamed when the request asks for a stream.
fn answer(cli: Cli, body: &Value) -> axum::response::Response {
    use axum::response::IntoResponse;
    match cli {
        Cli::Codex => warren_test_models::responses_stream(&json!({
            "id": "resp_1", "object": "response", "status": "completed",
            "model": body["model"],
            "output": [{"type": "message", "id": "msg_1", "role": "assistant",
                        "status": "completed",
                        "content": [{"type": "output_text", "annotations": [],
                                     "text": "Done."}]}],
            "usage": {"input_tokens": 1000, "input_tokens_details": {"cached_tokens": 0},
                      "output_tokens": 2, "output_tokens_details": {"reasoning_tokens": 0},
                      "total_tokens": 1002}})),
        Cli::Claude => {
            let message = json!({
                "id": "msg_1", "type": "message", "role": "assistant",
                "model": body["model"], "stop_reason": "end_turn", "stop_sequence": null,
                "content": [{"type": "text", "text": "Done."}],
                "usage": {"input_tokens": 1000, "output_tokens": 2,
                          "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}});
            if body["stream"] == true {
                warren_test_models::messages_stream(&message)
            } else {
                axum::Json(message).into_response()
            }
        }
    }
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let runtime_binary = match args.runtime_binary {
        Some(path) => path,
        None => std::env::current_exe()?
            .parent()
            .ok_or_else(|| anyhow::anyhow!("this program has no directory"))?
            .join("warren-workspace-runtime"),
    };
    anyhow::ensure!(
        runtime_binary.exists(),
        "{} is missing: cargo build --release -p warren-workspace-runtime (or pass \
         --runtime-binary)",
        runtime_binary.display()
    );
    for cli in args.cli {
        measure(cli, args.turns, &runtime_binary).await?;
    }
    Ok(())
}

async fn measure(cli: Cli, turns: usize, runtime_binary: &Path) -> anyhow::Result<()> {
    let (path, program, output, key_var) = match cli {
        Cli::Codex => (
            "/v1/responses",
            warren_test_models::cli("WARREN_CODEX_BIN", "codex-", "codex"),
            "codex-json",
            "OPENAI_API_KEY",
        ),
        Cli::Claude => (
            "/v1/messages",
            warren_test_models::cli("WARREN_CLAUDE_BIN", "claude-code-", "claude"),
            "claude-json",
            "ANTHROPIC_API_KEY",
        ),
    };
    let program = program.map_err(|e| anyhow::anyhow!(e))?;
    let (base_url, _) =
        warren_test_models::dynamic_model(path, move |body: &Value| answer(cli, body)).await;
    let command = |mcp: Option<&str>| match cli {
        Cli::Codex => warren_test_models::codex_command(&program, &base_url, mcp),
        Cli::Claude => warren_test_models::claude_command(&program, &base_url, mcp),
    };
    let runtime_path = runtime_binary.to_string_lossy().into_owned();
    let alone = command(None);
    let through = command(Some(&runtime_path));

    let root = std::env::temp_dir().join(format!("warren-bench-{cli}-{}", std::process::id()));
    let (alone_dir, workspace_dir) = (root.join("alone"), root.join("workspace"));
    std::fs::create_dir_all(&alone_dir)?;
    std::fs::create_dir_all(&workspace_dir)?;
    let key_file = root.join("model.key");
    std::fs::write(&key_file, format!("{KEY}\n"))?;

    // The runtime, with one `command` agent running the CLI.
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let client = async_nats::connect(url.as_str()).await?;
    let js = async_nats::jetstream::new(client.clone());
    let prefix = format!("benchcli{}{cli}", std::process::id());
    let ns = Namespace::new(&prefix);
    js.get_or_create_stream(ns.inbox_stream_config()).await?;
    js.get_or_create_stream(ns.outbox_stream_config()).await?;
    let mut contract = warren_schema::launch::LaunchContract::new(
        "bench",
        workspace_dir.clone(),
        warren_schema::launch::NatsLaunch::new(url.clone(), prefix.clone()),
    );
    let driver = warren_test_models::command_agent(through, output);
    let mut agent =
        warren_schema::launch::AgentLaunch::new("coder", "command", driver["settings"].clone());
    agent.keys.insert(key_var.into(), key_file);
    contract.agents.push(agent);
    let shutdown = CancellationToken::new();
    let runtime = tokio::spawn(warren_workspace_runtime::run(contract, shutdown.clone()));
    let mut outbox = client.subscribe(ns.outbox_subject("bench")).await?;

    report::heading(&format!(
        "{cli} turn: through the runtime vs the CLI alone ({turns} turns each, interleaved)"
    ));
    let (mut alone_ms, mut through_ms, mut overhead_ms) = (Vec::new(), Vec::new(), Vec::new());
    for n in 0..turns + WARM_UP {
        let text = format!("say done ({n})");
        let started = Instant::now();
        let status = tokio::process::Command::new(&alone[0])
            .args(&alone[1..])
            .arg(&text)
            .current_dir(&alone_dir)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", &alone_dir)
            .env(key_var, KEY)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .await?;
        anyhow::ensure!(status.success(), "{cli} alone failed: {status}");
        let alone_took = started.elapsed();

        let routing = EventId::random();
        let message = InboxMessage {
            routing_id: routing,
            message_id: EventId::random(),
            workspace: "bench".into(),
            agent: "coder".into(),
            text,
            reply_to: Origin::Webhook {
                endpoint: "bench".into(),
                delivery_id: n.to_string(),
            },
            chain: vec![],
            correlation_id: None,
            files: vec![],
        };
        let started = Instant::now();
        js.publish(
            ns.inbox_subject("bench", "coder"),
            serde_json::to_vec(&message)?.into(),
        )
        .await?
        .await?;
        let mut replied = false;
        loop {
            let m = tokio::time::timeout(Duration::from_secs(120), outbox.next())
                .await?
                .ok_or_else(|| anyhow::anyhow!("outbox subscription ended"))?;
            match serde_json::from_slice::<OutboxMessage>(&m.payload) {
                Ok(OutboxMessage::Reply { in_reply_to, .. }) if in_reply_to == routing => {
                    replied = true;
                }
                Ok(OutboxMessage::DeadLettered { in_reply_to, .. }) if in_reply_to == routing => {
                    anyhow::bail!("{cli} through the runtime failed (dead-lettered)");
                }
                Ok(OutboxMessage::TurnCompleted { in_reply_to, .. }) if in_reply_to == routing => {
                    break;
                }
                _ => {}
            }
        }
        let through_took = started.elapsed();
        anyhow::ensure!(replied, "{cli} through the runtime gave no reply");
        if n >= WARM_UP {
            let ms = |d: Duration| d.as_secs_f64() * 1000.0;
            alone_ms.push(ms(alone_took));
            through_ms.push(ms(through_took));
            overhead_ms.push(ms(through_took) - ms(alone_took));
        }
    }
    shutdown.cancel();
    runtime.await??;
    let _ = js.delete_stream(ns.inbox_stream()).await;
    let _ = js.delete_stream(ns.outbox_stream()).await;
    let _ = js.delete_key_value(ns.workspace_bucket("bench")).await;
    let _ = js.delete_key_value(ns.shared_bucket()).await;
    let _ = std::fs::remove_dir_all(&root);

    for (name, values) in [
        (format!("baseline: {cli} alone"), &mut alone_ms),
        (format!("{cli} through the runtime"), &mut through_ms),
        ("runtime overhead (pairwise)".to_owned(), &mut overhead_ms),
    ] {
        values.sort_by(f64::total_cmp);
        for (label, q) in [("p50", 0.5), ("p99", 0.99)] {
            report::figure(&format!("{name} {label}"), quantile(values, q), "ms");
        }
    }
    report::ratio(
        &format!("p50 through the runtime / p50 {cli} alone"),
        quantile(&through_ms, 0.5) / quantile(&alone_ms, 0.5).max(f64::EPSILON),
        &[],
    );
    Ok(())
}

/// The `q` quantile of sorted `values` (nearest rank).
fn quantile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
    values[rank - 1]
}
