use clap::Parser;
use claudekey::cli::{Cli, Command};

fn main() -> anyhow::Result<std::process::ExitCode> {
    let cli = Cli::parse();
    runtime(&cli)?.block_on(claudekey::cli::run(cli))
}

/// A proxy with one core runs on a single-threaded runtime, as linkerd2-proxy does: no work
/// stealing and no wake-ups between threads on the request path, which at one core only cost
/// latency. Every other role, and a proxy with more cores, gets the multi-threaded runtime.
/// (`available_parallelism` honours CPU affinity and the cgroup CPU limit.)
fn runtime(cli: &Cli) -> std::io::Result<tokio::runtime::Runtime> {
    let one_core = std::thread::available_parallelism().is_ok_and(|n| n.get() == 1);
    let mut builder = match cli.command {
        Command::Proxy(_) if one_core => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    builder.enable_all().build()
}
