use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let warren_workspace_runtime::Args {
        config,
        metrics_listen,
    } = warren_workspace_runtime::Args::parse();
    if config.mcp {
        // stdout is the protocol: logs go to stderr only, and no telemetry set-up output.
        return Ok(warren_workspace_runtime::run_mcp(config).await?);
    }
    let telemetry =
        warren_telemetry::Telemetry::init("warren-workspace-runtime", &config.telemetry)?;
    if let Some(listen) = metrics_listen {
        warren_workspace_runtime::serve_metrics(listen, telemetry.metrics_router()).await?;
    }
    // SIGTERM or SIGINT: finish the current turns, take no new ones.
    let shutdown = warren_telemetry::shutdown_on_signal()?;
    let result = warren_workspace_runtime::run(config, shutdown).await;
    tokio::task::spawn_blocking(move || telemetry.shutdown()).await?;
    Ok(result?)
}
