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
pub mod plan;
pub mod reconcile;
pub mod redis_users;
pub mod report;
pub mod retire;
pub mod seal;
pub mod secrets;
pub mod source;
pub mod stores;
pub mod usage;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::runtime::{
    Controller, events::Recorder, events::Reporter, reflector::ObjectRef, watcher,
};
use kube::{Api, Client, ResourceExt};
use prometheus_client::registry::Registry;

pub use context::Hook;

use crate::backend::{Backends, SecretBackend, cache::BackendCache, kubernetes::KubernetesBackend};
use crate::crd::{ClaudeKey, ClaudeKeySource, ClusterClaudeKeySource, SourceKind, annotations};

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
        let reconciles = controller(
            &client,
            &config,
            ctx.clone(),
            writers,
            stopped(stop_rx.clone()),
        );
        // The leader alone defines the namespaces' Redis users: it alone reconciles.
        let controller = async {
            match &ctx.namespace_users {
                Some(users) => tokio::select! {
                    () = reconciles => {}
                    () = users.run(|ns| ctx.sealer.redis_password(ns)) => {}
                },
                None => reconciles.await,
            }
        };
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

/// The kube-runtime Controller over ClaudeKeys, owning their Secrets. Every watch that
/// triggers a reconcile also fills a cache the reconcile reads (`stores`): an object is in the
/// cache before the event it caused reaches the reconcile.
async fn controller(
    client: &Client,
    config: &ControllerConfig,
    ctx: Arc<context::Context>,
    writers: stores::Writers,
    stop: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let (claudekeys, secrets, sources): (Api<ClaudeKey>, Api<Secret>, Api<ClaudeKeySource>) =
        match &config.watch_namespace {
            Some(ns) => (
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
            ),
            None => (
                Api::all(client.clone()),
                Api::all(client.clone()),
                Api::all(client.clone()),
            ),
        };
    let owned = watcher::Config::default().labels(&format!(
        "{}={}",
        annotations::MANAGED_BY_LABEL,
        annotations::MANAGER
    ));
    let runtime_config = kube::runtime::controller::Config::default()
        .concurrency(config.max_concurrent_reconciles)
        .debounce(RECONCILE_DEBOUNCE);
    // The ClaudeKeys' own watch, without managedFields (nothing reads them; at 10,000 objects
    // they are most of the cache), as every cache below.
    let (store, writer) = kube::runtime::reflector::store();
    let claudekeys = {
        use kube::runtime::WatchStreamExt;
        watcher(claudekeys, watcher::Config::default())
            .default_backoff()
            .modify(without_managed_fields)
            .reflect(writer)
            .inspect(orphans::on_deletion(ctx.clone()))
            .applied_objects()
    };
    let controller = Controller::for_stream(claudekeys, store.clone());
    let all = watcher::Config::default;
    let mut controller = controller
        .watches_stream(cached(secrets, owned, writers.secrets), owning_claudekey)
        .watches_stream(
            cached(
                Api::<ClusterClaudeKeySource>::all(client.clone()),
                all(),
                writers.cluster_sources,
            ),
            users_of(store.clone(), |ck, s: &ClusterClaudeKeySource| {
                refers_to(ck, SourceKind::ClusterClaudeKeySource, &s.name_any())
            }),
        )
        .watches_stream(
            cached(sources, all(), writers.sources),
            users_of(store.clone(), namespaced_user),
        );
    if let Some(namespaces) = writers.namespaces {
        controller = controller.watches_stream(
            cached(Api::<Namespace>::all(client.clone()), all(), namespaces),
            users_of(store.clone(), |ck, ns: &Namespace| {
                ck.namespace() == Some(ns.name_any())
            }),
        );
    }
    // The workload caches only feed consumer restarts: they trigger no reconcile.
    let stores::Workloads {
        deployments,
        statefulsets,
        daemonsets,
    } = writers.workloads;
    let controller = controller
        .watches_stream(workloads(client, config, deployments), no_reconcile)
        .watches_stream(workloads(client, config, statefulsets), no_reconcile)
        .watches_stream(workloads(client, config, daemonsets), no_reconcile)
        .with_config(runtime_config)
        .graceful_shutdown_on(stop);
    let metrics = ctx.metrics.clone();
    let usage = {
        let (store, ctx) = (store.clone(), ctx.clone());
        async move {
            match config.usage_interval {
                Some(interval) => usage::poll_forever(store, ctx, interval).await,
                None => futures::future::pending().await,
            }
        }
    };
    let retire = retire::retire_forever(store.clone(), ctx.clone(), config.watch_namespace.clone());
    let orphans = orphans::sweep_forever(ctx.clone(), store.clone());
    let sweep_ctx = ctx.clone();
    let run = controller
        .run(reconcile::reconcile, reconcile::error_policy, ctx)
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!(%error, "reconcile loop");
            }
        });
    let sweep = async move {
        loop {
            tokio::time::sleep(KEY_AGE_SWEEP).await;
            metrics.retain_key_ages(|namespace, name| {
                store.get(&ObjectRef::new(name).within(namespace)).is_some()
            });
            let live: std::collections::HashSet<String> =
                store.state().iter().filter_map(|ck| ck.uid()).collect();
            sweep_ctx.written_status.retain(|uid| live.contains(uid));
        }
    };
    tokio::select! {
        () = run => {}
        () = sweep => {}
        () = usage => {}
        () = retire => {}
        () = orphans => {}
    }
}

/// A watch that fills `writer` and yields every object it saw change (deletions included).
fn cached<K>(
    api: Api<K>,
    config: watcher::Config,
    writer: kube::runtime::reflector::store::Writer<K>,
) -> impl futures::Stream<Item = Result<K, watcher::Error>> + Send + 'static
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    use kube::runtime::WatchStreamExt;
    watcher(api, config)
        .default_backoff()
        .modify(without_managed_fields)
        .reflect(writer)
        .touched_objects()
}

/// Drops the field-manager bookkeeping of a cached object: no reconcile reads it.
fn without_managed_fields<K: kube::Resource>(object: &mut K) {
    object.meta_mut().managed_fields = None;
}

/// A watch of one workload kind in the controller's scope, stripped as it arrives to what a
/// consumer restart reads.
fn workloads<K: consumers::Workload>(
    client: &Client,
    config: &ControllerConfig,
    writer: kube::runtime::reflector::store::Writer<K>,
) -> impl futures::Stream<Item = Result<K, watcher::Error>> + Send + 'static {
    use kube::runtime::WatchStreamExt;
    let api: Api<K> = match &config.watch_namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    watcher(api, watcher::Config::default())
        .default_backoff()
        .modify(K::strip)
        .reflect(writer)
        .touched_objects()
}

fn no_reconcile<K>(_: K) -> Option<ObjectRef<ClaudeKey>> {
    None
}

/// A watch mapper: every ClaudeKey in the store for which `uses` holds.
fn users_of<K>(
    store: kube::runtime::reflector::Store<ClaudeKey>,
    uses: impl Fn(&ClaudeKey, &K) -> bool + Send + Sync + 'static,
) -> impl Fn(K) -> Vec<ObjectRef<ClaudeKey>> + Send + Sync + 'static {
    move |changed: K| {
        store
            .state()
            .iter()
            .filter(|ck| uses(ck, &changed))
            .map(|ck| ObjectRef::from_obj(ck.as_ref()))
            .collect()
    }
}

fn refers_to(ck: &ClaudeKey, kind: SourceKind, name: &str) -> bool {
    ck.spec.source_ref.kind == kind && ck.spec.source_ref.name == name
}

fn namespaced_user(ck: &ClaudeKey, source: &ClaudeKeySource) -> bool {
    ck.namespace() == source.namespace()
        && refers_to(ck, SourceKind::ClaudeKeySource, &source.name_any())
}

/// The ClaudeKey a managed Secret belongs to, by its `claudekey.io/name` label rather than its
/// owner reference, so a Secret whose owner reference was stripped by hand is still repaired.
/// A gateway config Secret names its ClaudeKey in an annotation.
fn owning_claudekey(secret: Secret) -> Option<ObjectRef<ClaudeKey>> {
    if let Some(id) = secret.annotations().get(annotations::CLAUDEKEY_ANNOTATION) {
        let (namespace, name) = id.split_once('/')?;
        return Some(ObjectRef::new(name).within(namespace));
    }
    let name = secret.labels().get(annotations::NAME_LABEL)?;
    Some(ObjectRef::new(name).within(&secret.namespace()?))
}

/// The default of `--max-concurrent-reconciles`.
const MAX_CONCURRENT_RECONCILES: u16 = 16;

/// A reconcile writes two Secrets and the status, and each write comes back as a watch event
/// that asks for another reconcile; waiting this long after the last trigger folds those into one.
const RECONCILE_DEBOUNCE: Duration = Duration::from_millis(200);

/// How often key-age series of deleted ClaudeKeys are dropped.
const KEY_AGE_SWEEP: Duration = Duration::from_secs(60);

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
