use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    warren_loadtest::run(warren_loadtest::Cli::parse()).await
}
