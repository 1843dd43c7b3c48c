//! Warren's load generators and benchmarks.
//!
//! Every benchmark prints its figures beside a baseline measured in the same run on the
//! same machine, and the ratio between them: absolute numbers swing with whatever else the
//! machine is doing, ratios much less. Nothing here asserts a figure; the closing notes of
//! the issues quote what these commands printed.

pub mod cli_turn;
pub mod control_plane;
pub mod drill;
pub mod event_log;
pub mod gateway;
pub mod kubernetes;
mod pgbench;
mod report;
pub mod runtime;
pub mod svg;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "warren-loadtest", about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Event log benchmarks (each in fresh databases on the server at DATABASE_URL).
    EventLog(event_log::Args),
    /// Gateway benchmarks: signed Slack events over HTTP (fresh databases at DATABASE_URL).
    Gateway(gateway::Args),
    /// Control-plane benchmarks: read-model rebuild, append -> decision latency.
    ControlPlane(control_plane::Args),
    /// Workspace runtime: mention round trip vs raw NATS request-reply (NATS at NATS_URL).
    Runtime(runtime::Args),
    /// Coding-agent turns: what the runtime adds around a real Codex / Claude Code turn,
    /// next to the CLI alone (local model server; NATS at NATS_URL).
    CliTurn(cli_turn::Args),
    /// Drills: faults under load, then what was stored counted against what was acked
    /// (`scripts/drills` runs them with PostgreSQL stops).
    Drill(drill::Args),
    /// Kubernetes backend: webhook -> pod create, cold start, 10,000 workspaces (the API
    /// server of scripts/lib/kube.sh: KUBECONFIG, WARREN_KUBECONFIG_CONTROL_PLANE).
    Kubernetes(kubernetes::Args),
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::EventLog(args) => event_log::run(args).await,
        Command::Gateway(args) => gateway::run(args).await,
        Command::ControlPlane(args) => control_plane::run(args).await,
        Command::Runtime(args) => runtime::run(args).await,
        Command::CliTurn(args) => cli_turn::run(args).await,
        Command::Drill(args) => drill::run(args).await,
        Command::Kubernetes(args) => kubernetes::run(args).await,
    }
}
