//! The flags of `claudekey proxy` and the modes they choose.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use super::limits;

/// Default port of the proxy's traffic listener (the webhook injects `127.0.0.1:8484`).
pub const DEFAULT_PORT: u16 = 8484;
/// Default admin (metrics, probes) address when `--metrics-listen` is given without a value.
pub const DEFAULT_METRICS_LISTEN: &str = "0.0.0.0:9484";

/// The gateway's default `--shutdown-delay`: about the time kube-proxy (or the apiserver's
/// endpoint routing) takes to stop sending a terminating pod new connections. A sidecar needs
/// none: its only client, the app, has stopped before it.
pub const GATEWAY_SHUTDOWN_DELAY: Duration = Duration::from_secs(5);

/// How the proxy authenticates its clients.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// A shared proxy behind a Service: every request carries a workload key.
    #[default]
    Gateway,
    /// Inside the pod: loopback only, no workload key (the app sends a placeholder).
    Sidecar,
}

/// The `--mode` flag: one of the two proxy modes, or the forwarder (which runs no pipeline,
/// so the pipeline's `Mode` never has to handle it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum RunMode {
    /// A shared proxy behind a Service: every request carries a workload key.
    #[default]
    Gateway,
    /// Inside the pod: loopback only, no workload key (the app sends a placeholder).
    Sidecar,
    /// Gateway placement's sidecar: loopback only; adds the workload key from the mounted
    /// `<name>-client` Secret and forwards to the gateway (`forwarder`).
    Forward,
}

impl RunMode {
    /// The proxy mode, or `None` for the forwarder.
    pub fn proxy(self) -> Option<Mode> {
        match self {
            Self::Gateway => Some(Mode::Gateway),
            Self::Sidecar => Some(Mode::Sidecar),
            Self::Forward => None,
        }
    }
}

/// Flags of `claudekey proxy`; each has a `CLAUDEKEY_PROXY_*` environment twin.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The mounted `<name>-proxy` Secret (or, in gateway mode, a directory of them; in forward
    /// mode the mounted `<name>-client` Secret).
    #[arg(
        long,
        env = "CLAUDEKEY_PROXY_CONFIG_DIR",
        required_unless_present = "config_secrets",
        conflicts_with = "config_secrets"
    )]
    pub config_dir: Option<PathBuf>,
    /// Gateway mode: serve the config Secrets labelled claudekey.io/config=gateway in this
    /// namespace, watched through the Kubernetes API (in-cluster config or KUBECONFIG).
    #[arg(long, env = "CLAUDEKEY_PROXY_CONFIG_SECRETS")]
    pub config_secrets: Option<String>,
    /// PEM certificate chain: serve HTTPS on --listen; re-read when it changes.
    #[arg(long, env = "CLAUDEKEY_PROXY_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert; re-read when it changes.
    #[arg(long, env = "CLAUDEKEY_PROXY_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Address of the traffic listener, e.g. 127.0.0.1:8484.
    #[arg(long, env = "CLAUDEKEY_PROXY_LISTEN")]
    pub listen: SocketAddr,
    /// Base URL of the Anthropic API (without /v1).
    #[arg(
        long,
        env = "CLAUDEKEY_PROXY_UPSTREAM",
        default_value = "https://api.anthropic.com"
    )]
    pub upstream: String,
    /// Audit log: a file to append to, or `-` for stdout.
    #[arg(long, env = "CLAUDEKEY_PROXY_AUDIT_LOG", default_value = "-")]
    pub audit_log: String,
    /// Address serving /metrics, /healthz and /readyz (0.0.0.0:9484 when given without a value).
    #[arg(long, env = "CLAUDEKEY_PROXY_METRICS_LISTEN", num_args = 0..=1, default_missing_value = DEFAULT_METRICS_LISTEN)]
    pub metrics_listen: Option<SocketAddr>,
    /// gateway (workload key required), sidecar (loopback only, no key) or forward (loopback
    /// only, forwards to the gateway with the workload key of --config-dir).
    #[arg(long, env = "CLAUDEKEY_PROXY_MODE", value_enum, default_value_t)]
    pub mode: RunMode,
    /// Share limits and spend budgets with every other proxy serving the same ClaudeKeys
    /// through this Redis (or Valkey): redis://[:password@]host:port/db, rediss:// for TLS.
    /// Give a URL with a password only through the environment, never on the command line.
    /// Unset: each proxy counts alone (in memory).
    #[arg(long, env = "CLAUDEKEY_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<crate::shared_counters::RedisUrl>,
    /// The Redis user to log in as, instead of the URL's (a namespace's sidecars: their
    /// namespace's user, which reaches only that namespace's counters).
    #[arg(long, env = "CLAUDEKEY_REDIS_USERNAME")]
    pub redis_username: Option<String>,
    /// A file holding the Redis password (e.g. a mounted Secret), used instead of the URL's.
    #[arg(long, env = "CLAUDEKEY_REDIS_PASSWORD_FILE")]
    pub redis_password_file: Option<PathBuf>,
    /// Bound of one Redis call, connection included; past it the request is decided locally.
    #[arg(long, env = "CLAUDEKEY_REDIS_TIMEOUT", default_value = "100ms", value_parser = humantime::parse_duration)]
    pub redis_timeout: Duration,
    /// Share (0 < share <= 1) of every limit and budget each proxy enforces alone while Redis
    /// is unreachable. With N proxies serving a ClaudeKey, at most N x share x limit pass
    /// during an outage: set 1/N to hold the limit, more to favour availability.
    #[arg(long, env = "CLAUDEKEY_REDIS_FALLBACK_SHARE", default_value_t = limits::DEFAULT_FALLBACK_SHARE)]
    pub redis_fallback_share: f64,
    /// JSON or YAML list prices (USD per million tokens) put before the built-in table, to
    /// settle spend budgets: {models: [{model: GLOB, input, output, cacheWrite, cacheRead}]}.
    #[arg(long, env = "CLAUDEKEY_PRICE_TABLE")]
    pub price_table: Option<PathBuf>,
    /// Sidecar of a workload-identity-federation source: the projected service-account token
    /// to exchange for Anthropic access tokens (re-read on every exchange).
    #[arg(
        long,
        env = "CLAUDEKEY_IDENTITY_TOKEN_FILE",
        conflicts_with = "identity_service_account"
    )]
    pub identity_token_file: Option<PathBuf>,
    /// Gateway: request identity tokens for federation sources from the TokenRequest API for
    /// this ServiceAccount (NAMESPACE/NAME, the gateway's own).
    #[arg(long, env = "CLAUDEKEY_PROXY_IDENTITY_SERVICE_ACCOUNT")]
    pub identity_service_account: Option<String>,
    /// MiB of request bodies (and the JSON trees parsed from them) held at once, across all
    /// connections; past it, requests get a retryable 503. An eighth is kept for bodies of at
    /// most 1 MiB, and one body may hold at most the other seven eighths.
    #[arg(long, env = "CLAUDEKEY_PROXY_BODY_BUDGET_MIB", default_value_t = super::server_limits::DEFAULT_BODY_BUDGET_MIB, value_parser = clap::value_parser!(u32).range(1..=1 << 20))]
    pub body_budget_mib: u32,
    /// After SIGTERM, keep accepting this long while every connection is closed cleanly after
    /// its next request, so clients behind a Service move to another replica without a failed
    /// request [default: 5s in gateway mode, 0s in sidecar mode].
    #[arg(long, env = "CLAUDEKEY_PROXY_SHUTDOWN_DELAY")]
    pub shutdown_delay: Option<humantime::Duration>,
}

impl Args {
    /// `--body-budget-mib` in bytes.
    pub fn body_budget_bytes(&self) -> usize {
        (self.body_budget_mib as usize) << 20
    }
}
