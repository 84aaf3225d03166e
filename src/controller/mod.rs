//! `claudekey controller` (DESIGN.md §3): issues, syncs and rotates keys for every ClaudeKey.

pub mod decide;
pub mod ledger;
pub mod secrets;

/// Flags of `claudekey controller`.
#[derive(clap::Args, Debug)]
pub struct Args {}

/// Fails until the role is built: a stub must never look like success.
pub async fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("claudekey controller is not yet built")
}
