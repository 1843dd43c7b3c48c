use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = warren_gateway::Config::parse();
    let telemetry = warren_telemetry::Telemetry::init("warren-gateway", &config.telemetry)?;
    // SIGTERM or SIGINT: stop accepting, answer what was accepted.
    let shutdown = warren_telemetry::shutdown_on_signal()?;
    let result = warren_gateway::run(config, telemetry.metrics_router(), shutdown).await;
    tokio::task::spawn_blocking(move || telemetry.shutdown()).await?;
    result
}
