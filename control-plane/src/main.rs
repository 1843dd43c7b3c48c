use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    warren_control_plane::run(warren_control_plane::Cli::parse()).await
}
