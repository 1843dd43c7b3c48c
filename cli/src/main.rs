use clap::Parser;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    warren_cli::run(warren_cli::Cli::parse()).await
}
