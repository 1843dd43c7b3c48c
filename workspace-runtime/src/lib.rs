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
//! - [`attachments`]: files attached to the message, fetched from the control plane and
//!   saved in the workspace directory before the turn, and named in its message.
//! - [`agent`]: the drivers (`echo`, `command`, `openai`, `anthropic`) that turn a message
//!   into what the agent says, and the `@name` mentions in it.
//! - [`tools`]: what agents can do during a turn (mention, reply, memory, list agents), the
//!   same for every driver; [`mcp`] serves them to `command` agents over MCP.
//! - [`memory`]: shared memory on JetStream KV, every write recorded in the log.
//! - [`outbox`]: the one way the runtime speaks (replies, mentions, heartbeats, reports).
//! - [`error`]: why the runtime could not start or had to stop.

pub mod agent;
pub mod attachments;
pub mod control_plane;
pub mod error;
pub mod files;
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

/// What the runtime is started with: the backend's [`LaunchContract`], and nothing else.
pub use warren_schema::launch::LaunchContract as Config;

/// The runtime process's command line. Everything else comes from the launch contract in
/// `WARREN_LAUNCH` (see [`warren_schema::launch`]).
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "warren-workspace-runtime", version, about)]
pub struct Args {
    /// Serve Warren's tools to one agent's turn over MCP (stdio) instead of running the
    /// workspace: what a `command` agent's MCP client starts.
    #[arg(long)]
    pub mcp: bool,
}

/// Each hosted agent's driver: every agent is checked before any consumer is created, so
/// bad settings change nothing.
pub fn drivers(config: &Config) -> Result<Vec<(String, agent::Driver)>> {
    config
        .agents
        .iter()
        .map(|agent| {
            agent::Driver::from_launch(agent)
                .map(|driver| (agent.name.clone(), driver))
                .map_err(|source| Error::Agent {
                    agent: agent.name.clone(),
                    source,
                })
        })
        .collect()
}

/// The telemetry settings of the contract, as the telemetry crate takes them.
pub fn telemetry_options(config: &Config) -> warren_telemetry::TelemetryOptions {
    warren_telemetry::TelemetryOptions {
        log_format: match config.telemetry.log_format.as_deref() {
            Some("text") => warren_telemetry::LogFormat::Text,
            _ => warren_telemetry::LogFormat::Json,
        },
        log_filter: config.telemetry.log_filter.clone(),
        otlp_endpoint: config.telemetry.otlp_endpoint.clone(),
    }
}

/// Connects as this workspace: its credentials, its reply inboxes.
async fn connect(config: &Config, ns: &Namespace) -> Result<async_nats::jetstream::Context> {
    let options = warren_schema::nats::connect_options(
        config.nats.credentials.as_deref(),
        Some(&ns.workspace_inbox_prefix(&config.workspace)),
    )
    .await?;
    let client = options
        .connect(config.nats.url.as_str())
        .await
        .map_err(|source| Error::Connect {
            url: config.nats.url.clone(),
            source,
        })?;
    Ok(async_nats::jetstream::new(client))
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

/// `--mcp`: a command agent's MCP server, served by its runtime for the turn
/// ([`mcp::bridge`]: this process only carries the bytes).
pub async fn run_mcp() -> Result<()> {
    mcp::bridge().await
}

/// Runs the workspace's agents until `shutdown`; each finishes its current turn first.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<()> {
    let drivers = drivers(&config)?;
    let ns = Namespace::new(&config.nats.prefix);
    let js = connect(&config, &ns).await?;
    // The control plane made the buckets and consumers; only a runtime with unrestricted
    // credentials (none: tests, a machine without a control plane) makes what is missing.
    let create_missing = config.nats.credentials.is_none();
    // Opened once for all the workspace's agents.
    let buckets = memory::Buckets::open(&js, &ns, &config.workspace, create_missing).await?;
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
    let directory = control_plane::Directory::new(js.client(), &ns, &config.workspace);
    let attachments = attachments::Attachments::new(js.client(), &ns, &config.workspace);
    let environment = agent::command::Environment {
        // The backend set PATH from the contract's environment; nothing else is passed on.
        path: std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into()),
        launch: config.to_json(),
    };
    let mut tasks = tokio::task::JoinSet::new();
    let agents: Vec<&str> = drivers.iter().map(|(a, _)| a.as_str()).collect();
    for (agent, driver) in &drivers {
        let consumer = inbox::consumer(
            &inboxes,
            &ns,
            &config.workspace,
            agent,
            &config.tuning,
            create_missing,
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
            shared_dir: config.shared_dir.clone(),
            environment: environment.clone(),
            memory: Some(buckets.for_agent(agent)),
            max_deliver: config.tuning.max_deliver,
            heartbeat: Duration::from_secs(config.tuning.heartbeat_secs.max(1)),
            directory: directory.clone(),
            attachments: attachments.clone(),
        };
        let span = info_span!("agent", workspace = %config.workspace, agent = %agent);
        let (name, stop) = (agent.clone(), shutdown.clone());
        tasks.spawn(async move { (name, worker.run(consumer, stop).await) }.instrument(span));
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
    // Every agent runs until shutdown. One that ends before (its consumer deleted, its task
    // panicked) ends the runtime, so that the backend restarts it whole; the others finish
    // their turns first.
    let mut first_failure = None;
    while let Some(done) = tasks.join_next().await {
        let failure = match done {
            Ok((_, Ok(()))) if shutdown.is_cancelled() => None,
            Ok((agent, Ok(()))) => Some(Error::AgentStopped {
                agent,
                reason: "its inbox ended".into(),
            }),
            Ok((agent, Err(e))) => Some(Error::AgentStopped {
                agent,
                reason: e.to_string(),
            }),
            Err(e) => Some(Error::Task(e)),
        };
        if let Some(failure) = failure {
            tracing::error!(error = %failure, "an agent stopped; ending the runtime");
            shutdown.cancel();
            first_failure.get_or_insert(failure);
        }
    }
    first_failure.map_or(Ok(()), Err)
}
