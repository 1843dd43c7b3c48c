use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = warren_workspace_runtime::Args::parse();
    if args.mcp {
        // A bridge to the turn's socket: stdout is the protocol, nothing else is written.
        return Ok(warren_workspace_runtime::run_mcp().await?);
    }
    // Everything the runtime knows comes from its launch contract.
    let config = warren_workspace_runtime::Config::from_env()?;
    let telemetry = warren_telemetry::Telemetry::init(
        "warren-workspace-runtime",
        &warren_workspace_runtime::telemetry_options(&config),
    )?;
    if let Some(listen) = config.telemetry.metrics_listen {
        warren_workspace_runtime::serve_metrics(listen, telemetry.metrics_router()).await?;
    }
    // SIGTERM or SIGINT: finish the current turns, take no new ones.
    let shutdown = warren_telemetry::shutdown_on_signal()?;
    let result = warren_workspace_runtime::run(config, shutdown).await;
    tokio::task::spawn_blocking(move || telemetry.shutdown()).await?;
    Ok(result?)
}
