//! `claudekey proxy`: not yet built; see its open issue.

/// Flags of `claudekey proxy`.
#[derive(clap::Args, Debug)]
pub struct Args {}

/// Fails until the role is built: a stub must never look like success.
pub async fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("claudekey proxy is not yet built")
}
