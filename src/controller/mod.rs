//! `claudekey controller` (DESIGN.md §3): issues, syncs and rotates keys for every ClaudeKey.
//! `run` parses flags and builds a client; `run_with` is the in-process entry point tests use.

pub mod apply;
pub mod conditions;
pub mod consumers;
pub mod context;
pub mod decide;
pub mod finalizer;
pub mod http;
pub mod in_use;
pub mod leader;
pub mod ledger;
pub mod metrics;
pub mod orphans;
pub mod place_waits;
pub mod plan;
pub mod queue;
pub mod reconcile;
pub mod redis_users;
pub mod report;
pub mod retire;
pub mod seal;
pub mod secrets;
pub mod source;
pub mod stores;
pub mod usage;
mod watches;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use kube::Client;
use kube::runtime::events::{Recorder, Reporter};
use prometheus_client::registry::Registry;

pub use context::Hook;

use crate::backend::{Backends, SecretBackend, cache::BackendCache, kubernetes::KubernetesBackend};

/// Flags of `claudekey controller`; each has an environment twin.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The operator namespace: kubernetesSecret sources and admin-key Secrets are read only here,
    /// and the leader Lease lives here. Defaults to the pod's own namespace in a cluster.
    #[arg(long, env = "CLAUDEKEY_NAMESPACE")]
    pub namespace: Option<String>,
    /// Reconcile ClaudeKeys in this namespace only; all namespaces when unset.
    #[arg(long, env = "CLAUDEKEY_WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,
    /// ANTHROPIC_BASE_URL written into `<name>-client` Secrets: the gateway's https URL
    /// [default: https://claudekey-gateway.<namespace>.svc:8443].
    #[arg(long, env = "CLAUDEKEY_GATEWAY_URL")]
    pub gateway_url: Option<String>,
    /// PEM bundle that verifies the gateway's serving certificate, written as `ca.crt` into the
    /// `-client` Secrets of ClaudeKeys placed at the gateway.
    #[arg(long, env = "CLAUDEKEY_GATEWAY_CA_FILE")]
    pub gateway_ca_file: Option<std::path::PathBuf>,
    /// Address of the admin port serving /metrics, /healthz and /readyz.
    #[arg(long, env = "CLAUDEKEY_METRICS_LISTEN", default_value = "0.0.0.0:8080")]
    pub metrics_listen: SocketAddr,
    /// Elect a leader through a coordination.k8s.io Lease, so only one replica reconciles.
    /// A bare `--leader-election` means true, as the chart passes it.
    #[arg(
        long,
        env = "CLAUDEKEY_LEADER_ELECTION",
        default_value_t = true,
        action = clap::ArgAction::Set,
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub leader_election: bool,
    /// Name of the leader-election Lease in the operator namespace.
    #[arg(
        long,
        env = "CLAUDEKEY_LEASE_NAME",
        default_value = "claudekey-controller"
    )]
    pub lease_name: String,
    /// How long a Lease stays valid without renewal, e.g. 15s.
    #[arg(long, env = "CLAUDEKEY_LEASE_DURATION", default_value = "15s")]
    pub lease_duration: humantime::Duration,
    /// This replica's identity in the Lease and in Events; defaults to the host (pod) name.
    #[arg(long, env = "CLAUDEKEY_POD_NAME")]
    pub identity: Option<String>,
    /// After a rotation with grace, wait this long (at most half the grace period) before
    /// restarting gateway consumers, so gateway proxies have picked up the new key first.
    #[arg(long, env = "CLAUDEKEY_CONSUMER_RESTART_DELAY", default_value = "90s")]
    pub consumer_restart_delay: humantime::Duration,
    /// Base URL of the Anthropic API, whose Admin API retires replaced upstream keys (the same
    /// flag and variable as the `revoke`/`drill` CLI).
    #[arg(
        long,
        env = "CLAUDEKEY_ANTHROPIC_URL",
        default_value = "https://api.anthropic.com"
    )]
    pub anthropic_url: String,
    /// How often the leader reads Anthropic's usage report for ClaudeKeys with
    /// `spec.anthropicAdmin` (the `claudekey_upstream_*` gauges); 0s turns it off.
    #[arg(long, env = "CLAUDEKEY_USAGE_INTERVAL", default_value = "5m")]
    pub usage_interval: humantime::Duration,
    /// At most this many ClaudeKeys are reconciled at once (each reconcile holds a few API
    /// requests in flight), so applying thousands at once neither floods the apiserver nor
    /// balloons the controller's memory.
    #[arg(
        long,
        env = "CLAUDEKEY_MAX_CONCURRENT_RECONCILES",
        default_value_t = MAX_CONCURRENT_RECONCILES,
        value_parser = clap::value_parser!(u16).range(1..)
    )]
    pub max_concurrent_reconciles: u16,
    /// At most this many distinct dataProtection detector lists with customPatterns per
    /// namespace: each is compiled on its own in the shared gateway (up to ~3.6 MB). ClaudeKeys
    /// beyond it, the newest first, are Ready=False PatternListsExceeded.
    #[arg(
        long,
        env = "CLAUDEKEY_MAX_PATTERN_LISTS_PER_NAMESPACE",
        default_value_t = DEFAULT_MAX_PATTERN_LISTS
    )]
    pub max_pattern_lists_per_namespace: usize,
    /// At most this many gateway consumer workloads are restarted per minute.
    #[arg(
        long,
        env = "CLAUDEKEY_CONSUMER_RESTARTS_PER_MINUTE",
        default_value_t = 10
    )]
    pub consumer_restarts_per_minute: u32,
    /// Shared limits (DESIGN.md §12): the Redis (or Valkey) the proxies share counters in, as
    /// its admin. Set, the controller gives the sidecars of each namespace-placement namespace
    /// a Redis user of their own (only the limit scripts, only that namespace's keys) and
    /// writes its password into their `-proxy` Secrets. Give a URL with a password only through
    /// the environment.
    #[arg(long, env = "CLAUDEKEY_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<crate::shared_counters::RedisUrl>,
    /// A file holding the Redis admin password (e.g. a mounted Secret), used instead of the URL's.
    #[arg(long, env = "CLAUDEKEY_REDIS_PASSWORD_FILE")]
    pub redis_password_file: Option<std::path::PathBuf>,
    /// Where the AWS Secrets Manager and Vault backends are (the Kubernetes backend is always on).
    #[command(flatten)]
    pub backends: crate::backend::config::BackendArgs,
}

/// Everything `run_with` needs besides a client.
#[derive(Clone)]
pub struct ControllerConfig {
    /// The operator namespace.
    pub namespace: String,
    /// Reconcile only this namespace when set.
    pub watch_namespace: Option<String>,
    pub gateway_url: String,
    /// PEM bundle of the gateway's CA, for `ca.crt` in `-client` Secrets.
    pub gateway_ca: Option<String>,
    /// Admin port; `None` serves none (in-process tests that read metrics otherwise).
    pub metrics_listen: Option<SocketAddr>,
    /// Lease name and duration; `None` disables leader election.
    pub leader_election: Option<(String, Duration)>,
    pub identity: String,
    pub consumer_restarts_per_minute: u32,
    pub consumer_restart_delay: Duration,
    /// Distinct custom-pattern lists a namespace may use.
    pub max_pattern_lists_per_namespace: usize,
    /// Base URL of the Anthropic API (a fake in tests).
    pub anthropic_url: String,
    /// How often the Admin API usage report is read; `None` never.
    pub usage_interval: Option<Duration>,
    pub max_concurrent_reconciles: u16,
    /// The AWS and Vault backends, when this controller was configured with them.
    pub aws: Option<Arc<dyn SecretBackend>>,
    pub vault: Option<Arc<dyn SecretBackend>>,
    /// Shared limits: Redis as its admin, to define the users of namespace-placement
    /// sidecars (`redis_users`); `None` leaves those sidecars counting alone.
    pub redis: Option<crate::shared_counters::RedisSettings>,
    /// Test seam: runs after both Secrets are written, before status.
    pub after_secrets: Option<Hook>,
}

impl ControllerConfig {
    /// Defaults for an operator namespace: the in-cluster gateway URL, leader election on.
    pub fn new(namespace: &str) -> Self {
        Self {
            namespace: namespace.to_string(),
            watch_namespace: None,
            gateway_url: default_gateway_url(namespace),
            gateway_ca: None,
            metrics_listen: None,
            leader_election: Some(("claudekey-controller".to_string(), Duration::from_secs(15))),
            identity: default_identity(),
            consumer_restarts_per_minute: 10,
            consumer_restart_delay: Duration::from_secs(90),
            max_pattern_lists_per_namespace: DEFAULT_MAX_PATTERN_LISTS,
            anthropic_url: "https://api.anthropic.com".to_string(),
            usage_interval: Some(Duration::from_secs(300)),
            max_concurrent_reconciles: MAX_CONCURRENT_RECONCILES,
            aws: None,
            vault: None,
            redis: None,
            after_secrets: None,
        }
    }
}

/// The gateway Service of the Helm chart in the operator namespace.
pub fn default_gateway_url(namespace: &str) -> String {
    format!("https://claudekey-gateway.{namespace}.svc:8443")
}

fn default_identity() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| format!("claudekey-{}", uuid::Uuid::new_v4().simple()))
}

/// Why the controller stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("failed to determine the operator namespace: set --namespace or CLAUDEKEY_NAMESPACE")]
    NoNamespace,
    #[error(transparent)]
    Leader(#[from] leader::LeaderError),
    #[error(transparent)]
    Admin(#[from] http::ServeError),
    #[error("failed to build a Kubernetes client: {0}")]
    Client(#[source] kube::Error),
    #[error(transparent)]
    Seal(#[from] seal::SealError),
    #[error(transparent)]
    Redis(#[from] crate::shared_counters::SharedError),
    #[error("failed to read --gateway-ca-file {path}: {source}")]
    GatewayCa {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// Builds a client from the environment (in-cluster or KUBECONFIG) and runs until SIGTERM/SIGINT.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let namespace = args
        .namespace
        .or_else(|| {
            std::fs::read_to_string("/var/run/secrets/kubernetes.io/serviceaccount/namespace").ok()
        })
        .map(|n| n.trim().to_string())
        .filter(|n| !n.is_empty())
        .ok_or(RunError::NoNamespace)?;
    let client = Client::try_default().await.map_err(RunError::Client)?;
    let mut config = ControllerConfig::new(&namespace);
    config.watch_namespace = args.watch_namespace;
    config.gateway_url = args
        .gateway_url
        .unwrap_or_else(|| default_gateway_url(&namespace));
    if let Some(path) = args.gateway_ca_file {
        let pem = std::fs::read_to_string(&path).map_err(|source| RunError::GatewayCa {
            path: path.clone(),
            source,
        })?;
        config.gateway_ca = Some(pem);
    }
    config.metrics_listen = Some(args.metrics_listen);
    config.leader_election = args
        .leader_election
        .then(|| (args.lease_name, *args.lease_duration));
    if let Some(identity) = args.identity {
        config.identity = identity;
    }
    config.consumer_restarts_per_minute = args.consumer_restarts_per_minute;
    config.consumer_restart_delay = *args.consumer_restart_delay;
    config.max_pattern_lists_per_namespace = args.max_pattern_lists_per_namespace;
    config.anthropic_url = args.anthropic_url;
    config.usage_interval = Some(*args.usage_interval).filter(|d| !d.is_zero());
    config.max_concurrent_reconciles = args.max_concurrent_reconciles;
    (config.aws, config.vault) = crate::backend::config::build(&args.backends).await?;
    config.redis = crate::shared_counters::RedisSettings::from_flags(
        args.redis_url.as_ref(),
        None,
        args.redis_password_file.as_deref(),
        redis_users::TIMEOUT,
    )?;
    run_with(client, config, crate::shutdown::signal()).await?;
    Ok(())
}

/// Runs the controller until `shutdown` resolves (then stops gracefully and releases the Lease)
/// or the Lease is lost. Everything runs inside the returned future, so aborting its task is a
/// faithful crash.
pub async fn run_with(
    client: Client,
    config: ControllerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let mut registry = Registry::with_prefix("claudekey");
    let metrics = metrics::Metrics::new(&mut registry);
    let backends = Backends {
        kubernetes: Arc::new(KubernetesBackend::new(client.clone(), &config.namespace)),
        aws: config.aws.clone(),
        vault: config.vault.clone(),
    };
    let cache = BackendCache::new(backends, &mut registry);
    let admin_metrics = crate::admin::AdminMetrics::register(&mut registry);
    let usage_metrics = crate::admin::UsageMetrics::register(&mut registry);
    let registry = Arc::new(registry);
    let ready = Arc::new(AtomicBool::new(false));
    let admin = async {
        match config.metrics_listen {
            Some(addr) => http::serve(addr, registry.clone(), ready.clone()).await,
            None => futures::future::pending().await,
        }
    };
    let reporter = Reporter {
        controller: "claudekey-controller".to_string(),
        instance: Some(config.identity.clone()),
    };
    let sealer = seal::Sealer::load_or_create(&client, &config.namespace).await?;
    let gateway = secrets::GatewayEndpoint {
        url: config.gateway_url.clone(),
        ca: config.gateway_ca.clone(),
    };
    let (stores, writers) = stores::new(config.watch_namespace.as_deref());
    let mut ctx = context::Context::new(
        client.clone(),
        config.namespace.clone(),
        gateway,
        sealer,
        cache,
        metrics.clone(),
        Recorder::new(client.clone(), reporter),
        consumers::RestartLimiter::new(config.consumer_restarts_per_minute),
        config.consumer_restart_delay,
        config.anthropic_url.clone(),
        admin_metrics,
        usage_metrics,
        config.after_secrets.clone(),
        stores,
    );
    ctx.max_pattern_lists = config.max_pattern_lists_per_namespace;
    if let Some(settings) = &config.redis {
        ctx.namespace_users = Some(Arc::new(redis_users::NamespaceUsers::new(settings)?));
    }
    let ctx = Arc::new(ctx);
    let elector = config.leader_election.as_ref().map(|(name, duration)| {
        leader::Elector::new(
            client.clone(),
            leader::LeaseConfig {
                name: name.clone(),
                namespace: config.namespace.clone(),
                identity: config.identity.clone(),
                lease_duration: *duration,
            },
        )
    });
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let shutdown = async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    };
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let work = async {
        ready.store(true, Ordering::SeqCst);
        if let Some(elector) = &elector {
            tokio::select! {
                result = elector.acquire() => result?,
                _ = stopped(stop_rx.clone()) => return Ok(()),
            }
            tracing::info!(identity = config.identity, "acquired the controller Lease");
            metrics.leader.set(1);
        }
        let controller = watches::run(
            &client,
            &config,
            ctx.clone(),
            writers,
            stopped(stop_rx.clone()),
        );
        let result = match &elector {
            Some(elector) => tokio::select! {
                () = controller => Ok(()),
                lost = elector.hold() => Err(RunError::Leader(lost)),
            },
            None => {
                controller.await;
                Ok(())
            }
        };
        metrics.leader.set(0);
        if let Some(elector) = &elector {
            elector.release().await;
        }
        result
    };
    tokio::select! {
        result = work => result,
        result = admin => result.map_err(RunError::from),
        () = async { shutdown.await; futures::future::pending::<()>().await } => unreachable!("pending never resolves"),
    }
}

/// The default of `--max-concurrent-reconciles`.
const MAX_CONCURRENT_RECONCILES: u16 = 16;

/// The default of `--max-pattern-lists-per-namespace`: a namespace's worst case is then about
/// 15 MB of a shared gateway, while teams that share one list across their ClaudeKeys (or use
/// only the built-in detectors) never meet it.
pub const DEFAULT_MAX_PATTERN_LISTS: usize = 4;

#[cfg(test)]
mod tests {
    use clap::Parser;

    use crate::cli::{Cli, Command};

    fn args(argv: &[&str]) -> super::Args {
        let mut full = vec!["claudekey", "controller"];
        full.extend_from_slice(argv);
        match Cli::try_parse_from(full).expect("flags parse").command {
            Command::Controller(args) => args,
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn flags_have_the_documented_defaults() {
        let a = args(&["--namespace", "claudekey-system"]);
        assert_eq!(a.namespace.as_deref(), Some("claudekey-system"));
        assert_eq!(a.metrics_listen.to_string(), "0.0.0.0:8080");
        assert!(a.leader_election);
        assert_eq!(a.lease_name, "claudekey-controller");
        assert_eq!(a.consumer_restarts_per_minute, 10);
        assert_eq!(a.max_pattern_lists_per_namespace, 4);
        assert_eq!(a.max_concurrent_reconciles, 16);
        assert_eq!(a.gateway_url, None);
        assert!(
            Cli::try_parse_from([
                "claudekey",
                "controller",
                "--max-concurrent-reconciles",
                "0"
            ])
            .is_err(),
            "0 would mean unbounded to kube-runtime"
        );
        let off = args(&[
            "--leader-election",
            "false",
            "--gateway-url",
            "http://gw:8080",
        ]);
        assert!(!off.leader_election);
        assert!(!args(&["--leader-election=false"]).leader_election);
        let bare = args(&["--leader-election", "--lease-name=x"]);
        assert!(bare.leader_election);
        assert_eq!(bare.lease_name, "x");
        assert_eq!(off.gateway_url.as_deref(), Some("http://gw:8080"));
        assert_eq!(
            super::default_gateway_url("ops"),
            "https://claudekey-gateway.ops.svc:8443"
        );
    }
}
