//! Warren's workspace runtime: one process per workspace (a pod on Kubernetes, a child
//! process of the control plane with the `local` backend). It hosts the workspace's agents:
//! each takes its messages from its JetStream inbox, one turn at a time, and publishes what
//! it says to the outbox, where the control plane records it.
//!
//! Where a message goes, in order:
//!
//! - [`inbox`]: a durable consumer per agent; a message is acknowledged only after the
//!   turn's outputs are acknowledged by the server; a crash mid-turn redelivers; a message
//!   that keeps failing goes to the dead-letter subject and is reported.
//! - [`agent`]: the drivers (`echo`, `command`, `openai`, `anthropic`) that turn a message
//!   into what the agent says, and the `@name` mentions in it.
//! - [`tools`]: what agents can do during a turn (mention, reply, memory, list agents), the
//!   same for every driver; [`mcp`] serves them to `command` agents over MCP.
//! - [`memory`]: shared memory on JetStream KV, every write recorded in the log.
//! - [`outbox`]: the one way the runtime speaks (replies, mentions, heartbeats, reports).
//! - [`error`]: why the runtime could not start or had to stop.

pub mod agent;
pub mod error;
pub mod inbox;
pub mod mcp;
pub mod memory;
pub mod outbox;
pub mod tools;

pub use error::{Error, Result};

use std::io::Write;
use std::time::Duration;

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
    /// Every agent of the installation, as JSON `[{"name": ..., "workspace": ...}]` (what
    /// the `list_agents` tool shows; the control plane passes it).
    #[arg(long, env = "WARREN_AGENT_DIRECTORY", default_value = "[]")]
    pub agent_directory: String,
    /// The workspace's directory (`command` agents run there).
    #[arg(long, env = "WARREN_WORKSPACE_DIR", default_value = ".")]
    pub workspace_dir: std::path::PathBuf,
    /// NATS server (JetStream).
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// NATS credentials file (a user JWT and its seed) when the server requires one: the
    /// control plane issues one per workspace, allowed this workspace's subjects only.
    #[arg(long, env = "WARREN_NATS_CREDS")]
    pub nats_creds: Option<std::path::PathBuf>,
    /// Prefix of every NATS subject and stream.
    #[arg(long, env = "WARREN_NATS_PREFIX", default_value = "warren")]
    pub nats_prefix: String,
    /// Deliveries of one message before it is dead-lettered.
    #[arg(long, env = "WARREN_MAX_DELIVER", default_value_t = 5)]
    pub max_deliver: i64,
    /// Seconds before an unacknowledged message is redelivered (after a crashed runtime).
    #[arg(long, env = "WARREN_ACK_WAIT_SECS", default_value_t = 120)]
    pub ack_wait_secs: u64,
    /// Seconds between heartbeats while a turn runs (in-progress ack + `agent.busy`).
    #[arg(long, env = "WARREN_HEARTBEAT_SECS", default_value_t = 30)]
    pub heartbeat_secs: u64,
    /// Serve Warren's tools to one agent's turn over MCP (stdio) instead of running the
    /// workspace: what a `command` agent's MCP client starts.
    #[arg(long)]
    pub mcp: bool,
    #[command(flatten)]
    pub telemetry: warren_telemetry::TelemetryOptions,
}

impl Config {
    /// The agent directory, parsed.
    pub fn directory(&self) -> Result<Vec<warren_schema::nats::AgentInfo>> {
        serde_json::from_str(&self.agent_directory).map_err(|e| {
            Error::Config(format!(
                "WARREN_AGENT_DIRECTORY is not a list of {{name, workspace}}: {e}"
            ))
        })
    }

    /// Each hosted agent's driver, from `WARREN_AGENT_SETTINGS`: every agent is checked
    /// before any consumer is created, so bad settings change nothing.
    pub fn drivers(&self) -> Result<Vec<(String, agent::Driver)>> {
        let settings: serde_json::Value = serde_json::from_str(&self.agent_settings)
            .map_err(|e| Error::Config(format!("WARREN_AGENT_SETTINGS is not JSON: {e}")))?;
        self.agents
            .iter()
            .filter(|a| !a.is_empty())
            .map(|agent| {
                agent::Driver::from_settings(&settings[agent.as_str()])
                    .map(|driver| (agent.clone(), driver))
                    .map_err(|source| Error::Agent {
                        agent: agent.clone(),
                        source,
                    })
            })
            .collect()
    }
}

/// Connects as this workspace: its credentials, its reply inboxes.
async fn connect(config: &Config, ns: &Namespace) -> Result<async_nats::jetstream::Context> {
    let options = warren_schema::nats::connect_options(
        config.nats_creds.as_deref(),
        Some(&ns.workspace_inbox_prefix(&config.workspace)),
    )
    .await?;
    let client = options
        .connect(config.nats_url.as_str())
        .await
        .map_err(|source| Error::Connect {
            url: config.nats_url.clone(),
            source,
        })?;
    Ok(async_nats::jetstream::new(client))
}

/// The runtime process's command line: its [`Config`] and where to serve its metrics.
#[derive(Debug, Clone, clap::Parser)]
pub struct Args {
    #[command(flatten)]
    pub config: Config,
    /// Admin listener for `GET /metrics` (Prometheus): turns by agent and outcome, turn
    /// durations, redeliveries, memory writes and conflicts. Unset: not served (the local
    /// backend runs many runtimes on one machine; a pod sets it).
    #[arg(long, env = "WARREN_RUNTIME_METRICS_LISTEN")]
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// Serves `metrics` (a `GET /metrics` router) on `listen`, in the background.
pub async fn serve_metrics(listen: std::net::SocketAddr, metrics: axum::Router) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| Error::Io {
            what: "binding the metrics listener",
            source,
        })?;
    info!(%listen, "serving metrics");
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, metrics).await {
            tracing::warn!(error = %e, "the metrics listener stopped");
        }
    });
    Ok(())
}

/// Serves MCP on stdin/stdout for the turn described by the environment.
pub async fn run_mcp(config: Config) -> Result<()> {
    let mut turn = mcp::McpTurn::from_env(&config.workspace)?;
    turn.ctx.directory = config.directory()?;
    let ns = Namespace::new(&config.nats_prefix);
    let js = connect(&config, &ns).await?;
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
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<()> {
    let drivers = config.drivers()?;
    let directory = config.directory()?;
    let ns = Namespace::new(&config.nats_prefix);
    let js = connect(&config, &ns).await?;
    // Opened once for all the workspace's agents.
    let buckets = memory::Buckets::open(&js, &ns, &config.workspace).await?;
    // The streams are the control plane's; created here only if missing and allowed (a
    // runtime with credentials of its own may not, and then fails until they exist).
    let inboxes = js
        .get_or_create_stream(ns.inbox_stream_config())
        .await
        .map_err(|e| Error::jetstream(format!("the stream {}", ns.inbox_stream()), e))?;
    js.get_or_create_stream(ns.outbox_stream_config())
        .await
        .map_err(|e| Error::jetstream(format!("the stream {}", ns.outbox_stream()), e))?;
    let outbox = outbox::Outbox::new(js.clone(), &ns, &config.workspace);
    let mut tasks = Vec::new();
    let agents: Vec<&str> = drivers.iter().map(|(a, _)| a.as_str()).collect();
    for (agent, driver) in &drivers {
        let consumer = inbox::consumer(
            &inboxes,
            &ns,
            &config.workspace,
            agent,
            config.max_deliver,
            Duration::from_secs(config.ack_wait_secs.max(1)),
        )
        .await?;
        let worker = inbox::Worker {
            js: js.clone(),
            ns: ns.clone(),
            outbox: outbox.clone(),
            workspace: config.workspace.clone(),
            agent: agent.clone(),
            driver: driver.clone(),
            workspace_dir: config.workspace_dir.clone(),
            memory: Some(buckets.for_agent(agent)),
            max_deliver: config.max_deliver,
            heartbeat: Duration::from_secs(config.heartbeat_secs.max(1)),
            directory: directory.clone(),
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
        writeln!(out, "ready")
            .and_then(|()| out.flush())
            .map_err(|source| Error::Io {
                what: "writing the ready line",
                source,
            })?;
    }
    for task in tasks {
        task.await??;
    }
    Ok(())
}
