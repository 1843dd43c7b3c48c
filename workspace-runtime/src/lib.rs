//! Warren's workspace runtime: one process per workspace (a pod on Kubernetes, a child
//! process of the control plane with the `local` backend). It hosts the workspace's agents:
//! each takes its messages from its JetStream inbox, one turn at a time, and publishes what
//! it says to the outbox, where the control plane records it.
//!
//! - [`inbox`]: a durable consumer per agent; a message is acknowledged only after the
//!   turn's outputs are acknowledged by the server; a crash mid-turn redelivers; a message
//!   that keeps failing goes to the dead-letter subject.
//! - [`agent`]: drivers (`echo`, `command`, [`openai`]) and the `@name` mentions in what an
//!   agent says.
//! - [`memory`]: shared memory on JetStream KV, every write recorded in the log.
//!
//! Built so far (issue 5 in progress): inboxes, turns, replies, mentions, readiness and
//! graceful shutdown, with the `echo` and `command` drivers. Not yet: key-value memory, the
//! `anthropic` and `openai` drivers, MCP tools, per-workspace NATS credentials.

pub mod agent;
pub mod anthropic;
pub mod inbox;
pub mod mcp;
pub mod memory;
pub mod model;
pub mod openai;

use std::io::Write;

use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span};
use warren_schema::nats::Namespace;

/// The runtime's settings: what the backend puts in its environment.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "warren-workspace-runtime", version, about)]
pub struct Config {
    /// This workspace's name.
    #[arg(long, env = "WARREN_WORKSPACE")]
    pub workspace: String,
    /// The agents it hosts, comma-separated.
    #[arg(long, env = "WARREN_AGENTS", value_delimiter = ',')]
    pub agents: Vec<String>,
    /// Each agent's driver and settings, as JSON: `{"alice": {"driver": "echo",
    /// "settings": {"cc": ["bob"]}}}` (the control plane passes what it was configured with).
    #[arg(long, env = "WARREN_AGENT_SETTINGS", default_value = "{}")]
    pub agent_settings: String,
    /// The workspace's directory (`command` agents run there).
    #[arg(long, env = "WARREN_WORKSPACE_DIR", default_value = ".")]
    pub workspace_dir: std::path::PathBuf,
    /// NATS server (JetStream).
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// Prefix of every NATS subject and stream.
    #[arg(long, env = "WARREN_NATS_PREFIX", default_value = "warren")]
    pub nats_prefix: String,
    /// Deliveries of one message before it is dead-lettered.
    #[arg(long, env = "WARREN_MAX_DELIVER", default_value_t = 5)]
    pub max_deliver: i64,
    /// Serve Warren's tools to one agent's turn over MCP (stdio) instead of running the
    /// workspace: what a `command` agent's MCP client starts.
    #[arg(long)]
    pub mcp: bool,
    #[command(flatten)]
    pub telemetry: warren_telemetry::TelemetryOptions,
}

/// Serves MCP on stdin/stdout for the turn described by the environment.
pub async fn run_mcp(config: Config) -> anyhow::Result<()> {
    let turn = mcp::McpTurn::from_env(&config.workspace)?;
    let client = async_nats::connect(config.nats_url.as_str()).await?;
    let js = async_nats::jetstream::new(client);
    let ns = Namespace::new(&config.nats_prefix);
    mcp::serve(
        turn,
        js,
        ns,
        tokio::io::BufReader::new(tokio::io::stdin()),
        tokio::io::stdout(),
    )
    .await
}

/// Runs the workspace's agents until `shutdown`; each finishes its current turn first.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let client = async_nats::connect(config.nats_url.as_str()).await?;
    let js = async_nats::jetstream::new(client);
    let ns = Namespace::new(&config.nats_prefix);
    let agents: Vec<String> = config
        .agents
        .iter()
        .filter(|a| !a.is_empty())
        .cloned()
        .collect();
    let settings: serde_json::Value = serde_json::from_str(&config.agent_settings)
        .map_err(|e| anyhow::anyhow!("WARREN_AGENT_SETTINGS is not JSON: {e}"))?;
    let mut tasks = Vec::new();
    for agent in &agents {
        let driver = agent::Driver::from_settings(&settings[agent.as_str()])?;
        let memory = (
            memory::Memory::open(
                js.clone(),
                ns.clone(),
                &ns.workspace_bucket(&config.workspace),
                &config.workspace,
                agent,
            )
            .await?,
            memory::Memory::open(
                js.clone(),
                ns.clone(),
                &ns.shared_bucket(),
                &config.workspace,
                agent,
            )
            .await?,
        );
        let consumer =
            inbox::consumer(&js, &ns, &config.workspace, agent, config.max_deliver).await?;
        let worker = inbox::Worker {
            js: js.clone(),
            ns: ns.clone(),
            workspace: config.workspace.clone(),
            agent: agent.clone(),
            driver,
            workspace_dir: config.workspace_dir.clone(),
            memory: Some(memory),
            max_deliver: config.max_deliver,
        };
        let span = info_span!("agent", workspace = %config.workspace, agent = %agent);
        tasks.push(tokio::spawn(
            worker.run(consumer, shutdown.clone()).instrument(span),
        ));
    }
    info!(workspace = %config.workspace, ?agents, "ready");
    // The local backend waits for this line.
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "ready")?;
        out.flush()?;
    }
    for task in tasks {
        task.await??;
    }
    Ok(())
}
