use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = warren_gateway::Config::parse();
    let telemetry = warren_telemetry::Telemetry::init("warren-gateway", &config.telemetry)?;
    // SIGTERM (Kubernetes, kill) or SIGINT: stop accepting, answer what was accepted.
    let shutdown = CancellationToken::new();
    let mut term = signal(SignalKind::terminate())?;
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("shutting down");
        on_signal.cancel();
    });
    let result = warren_gateway::run(config, telemetry.metrics_router(), shutdown).await;
    tokio::task::spawn_blocking(move || telemetry.shutdown()).await?;
    result
}
