//! `claudekey scan`: not yet built; see its open issue.

use std::process::ExitCode;

/// Flags of `claudekey scan`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Files to scan, or - for standard input.
    pub files: Vec<std::path::PathBuf>,
}

/// Exits 2 (cannot scan) until the rule engine is built: never a fake "clean".
pub fn run(_args: Args) -> ExitCode {
    eprintln!("claudekey scan is not yet built");
    ExitCode::from(2)
}
