use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = warren_workspace_runtime::Config::parse();
    let telemetry =
        warren_telemetry::Telemetry::init("warren-workspace-runtime", &config.telemetry)?;
    // SIGTERM: finish the current turns, take no new ones.
    let shutdown = CancellationToken::new();
    let mut term = signal(SignalKind::terminate())?;
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("shutting down after the current turns");
        on_signal.cancel();
    });
    let result = warren_workspace_runtime::run(config, shutdown).await;
    tokio::task::spawn_blocking(move || telemetry.shutdown()).await?;
    result
}
