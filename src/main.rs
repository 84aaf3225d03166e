use clap::Parser;
use claudekey::cli::{Cli, Command};

/// jemalloc, not glibc's malloc: the proxy frees and allocates a few dozen small blocks per
/// request from one thread while hyper's buffers come and go, and glibc spent a sixth of the
/// proxy's CPU at c=64 on it (consolidating and unlinking chunks). The library and its tests
/// keep the system allocator; only the shipped executable changes.
#[cfg(all(target_os = "linux", not(target_env = "musl")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
