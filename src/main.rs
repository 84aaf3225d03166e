use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<std::process::ExitCode> {
    claudekey::cli::run(claudekey::cli::Cli::parse()).await
}
