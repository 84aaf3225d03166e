//! The command line: one binary, five roles (DESIGN.md opening). Each role owns its flags; this
//! file only wires them together.

use clap::{Parser, Subcommand};

use crate::telemetry::{self, LogFormat};

#[derive(Parser, Debug)]
#[command(
    name = "claudekey",
    version,
    about = "Anthropic Claude API keys, safe in Kubernetes"
)]
pub struct Cli {
    /// Log format: text for people, json for log pipelines.
    #[arg(
        long,
        global = true,
        env = "CLAUDEKEY_LOG_FORMAT",
        value_enum,
        default_value_t
    )]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once at start-up: the size of the largest role's flags does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Reconcile ClaudeKeys: sync upstream keys, issue and rotate workload keys.
    Controller(crate::controller::Args),
    /// Serve the validating and mutating admission webhooks over HTTPS.
    Webhook(crate::webhook::Args),
    /// Run the proxy that enforces a ClaudeKey's scope in front of the Anthropic API.
    Proxy(crate::proxy::Args),
    /// Print the ClaudeKey CustomResourceDefinition as YAML.
    Crd,
    /// Check Kubernetes YAML or JSON for raw Anthropic keys, offline, with the webhook's rules.
    Scan(crate::scan::Args),
    /// Breach playbook: replace the workload key with zero grace and retire the old upstream key.
    Revoke(crate::admin::cli::RevokeArgs),
    /// Check that a retired upstream key is really dead (GET /v1/models answers 401).
    Drill(crate::admin::cli::DrillArgs),
    /// Prove an install works from inside the cluster: both webhooks answer and a ClaudeKey
    /// reaches Ready (what the chart's `helm test` runs).
    SelfCheck(crate::selfcheck::Args),
}

/// Runs the chosen role to completion; the exit code is the process's.
pub async fn run(cli: Cli) -> anyhow::Result<std::process::ExitCode> {
    crate::crypto::install_default_provider();
    use std::process::ExitCode;
    match cli.command {
        Command::Crd => {
            print!("{}", crate::crd::crd_yaml());
            Ok(ExitCode::SUCCESS)
        }
        Command::Scan(args) => Ok(crate::scan::run(args)),
        Command::Revoke(args) => crate::admin::cli::revoke(args).await,
        Command::Drill(args) => crate::admin::cli::drill(args).await,
        Command::SelfCheck(args) => crate::selfcheck::run(args).await,
        command => {
            telemetry::init(cli.log_format);
            match crate::open_files::raise() {
                Ok(limit) => tracing::debug!(limit, "open-files limit"),
                Err(e) => tracing::warn!(error = %e, "failed to raise the open-files limit"),
            }
            match command {
                Command::Controller(args) => crate::controller::run(args).await?,
                Command::Webhook(args) => crate::webhook::run(args).await?,
                Command::Proxy(args) => crate::proxy::run(args).await?,
                Command::Crd
                | Command::Scan(_)
                | Command::Revoke(_)
                | Command::Drill(_)
                | Command::SelfCheck(_) => {
                    unreachable!("handled above")
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
