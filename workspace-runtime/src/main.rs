use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = warren_workspace_runtime::Config::parse();
    if config.mcp {
        // stdout is the protocol: logs go to stderr only, and no telemetry set-up output.
        return warren_workspace_runtime::run_mcp(config).await;
    }
    let telemetry =
        warren_telemetry::Telemetry::init("warren-workspace-runtime", &config.telemetry)?;
    // SIGTERM or SIGINT: finish the current turns, take no new ones.
    let shutdown = warren_telemetry::shutdown_on_signal()?;
    let result = warren_workspace_runtime::run(config, shutdown).await;
    tokio::task::spawn_blocking(move || telemetry.shutdown()).await?;
    result
}
