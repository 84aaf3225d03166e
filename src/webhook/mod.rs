//! `claudekey webhook` (DESIGN.md §5): the validating webhook that keeps raw Anthropic keys out
//! of pod specs and the mutating webhook that injects the proxy sidecar, served over rustls.

pub mod envexpand;
pub mod finding;
mod keyrules;
pub mod keyshape;
pub mod limits;
pub mod mutate;
pub mod placement;
pub mod preconditions;
pub mod rules;
pub mod server;
/// The serving certificate loader, shared with the proxy's HTTPS listener.
pub use crate::tls;
pub mod validate;
pub mod walk;
pub mod workload;

#[cfg(test)]
mod rules_tests;
#[cfg(test)]
mod validate_tests;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use futures::StreamExt;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tokio::net::TcpListener;

use crate::crd::ClaudeKey;
pub use mutate::SidecarConfig;
pub use validate::{Admission, ClaudeKeyLookup, Mode};

/// Flags of `claudekey webhook`; each has an environment twin.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Address of the HTTPS listener the apiserver calls.
    #[arg(long, env = "CLAUDEKEY_WEBHOOK_LISTEN", default_value = "0.0.0.0:8443")]
    pub listen: SocketAddr,
    /// PEM certificate chain served to the apiserver; re-read when it changes.
    #[arg(long, env = "CLAUDEKEY_WEBHOOK_TLS_CERT_FILE")]
    pub tls_cert_file: PathBuf,
    /// PEM private key of that certificate; re-read when it changes.
    #[arg(long, env = "CLAUDEKEY_WEBHOOK_TLS_KEY_FILE")]
    pub tls_key_file: PathBuf,
    /// enforce: refuse offending objects; warn: admit them with admission warnings.
    #[arg(long, env = "CLAUDEKEY_WEBHOOK_MODE", value_enum, default_value_t)]
    pub mode: Mode,
    /// After SIGTERM, keep answering this long before closing the listener: the apiserver
    /// still sends reviews to a deleted pod's address until its endpoint is gone, and both
    /// webhooks fail closed, so a refused connection refuses a pod creation cluster-wide.
    /// Meanwhile every connection is closed cleanly after its next review (HTTP/2 GOAWAY,
    /// HTTP/1 `Connection: close`), so the apiserver moves to a new one without failing any.
    #[arg(long, env = "CLAUDEKEY_WEBHOOK_SHUTDOWN_DELAY", default_value = "5s")]
    pub shutdown_delay: humantime::Duration,
    /// Image of the injected proxy sidecar (its entrypoint is the claudekey binary).
    #[arg(long, env = "CLAUDEKEY_PROXY_IMAGE")]
    pub proxy_image: String,
    /// Loopback port the sidecar proxy listens on; apps get ANTHROPIC_BASE_URL with it.
    #[arg(long, env = "CLAUDEKEY_PROXY_PORT", default_value_t = 8484)]
    pub proxy_port: u16,
    /// Port of the sidecar's /metrics and /readyz.
    #[arg(long, env = "CLAUDEKEY_PROXY_METRICS_PORT", default_value_t = 9484)]
    pub proxy_metrics_port: u16,
    /// The Anthropic API the sidecar forwards to.
    #[arg(
        long,
        env = "CLAUDEKEY_PROXY_UPSTREAM",
        default_value = "https://api.anthropic.com"
    )]
    pub proxy_upstream: String,
    /// CPU request of the sidecar.
    #[arg(long, env = "CLAUDEKEY_SIDECAR_CPU_REQUEST", default_value = "10m")]
    pub sidecar_cpu_request: String,
    /// Memory request of the sidecar.
    #[arg(long, env = "CLAUDEKEY_SIDECAR_MEMORY_REQUEST", default_value = "32Mi")]
    pub sidecar_memory_request: String,
    /// CPU limit of the sidecar (none by default: CPU limits throttle latency).
    #[arg(long, env = "CLAUDEKEY_SIDECAR_CPU_LIMIT")]
    pub sidecar_cpu_limit: Option<String>,
    /// Memory limit of the sidecar.
    #[arg(long, env = "CLAUDEKEY_SIDECAR_MEMORY_LIMIT", default_value = "128Mi")]
    pub sidecar_memory_limit: String,
    /// Shared limits of namespace-placement sidecars: the Redis they count in, as the pods
    /// reach it, without a password (it is written into pod specs; each sidecar reads its
    /// namespace's password from its `-proxy` Secret). The controller needs --redis-url too.
    #[arg(long, env = "CLAUDEKEY_SIDECAR_REDIS_URL")]
    pub sidecar_redis_url: Option<String>,
    /// Optional plain-HTTP listener for /metrics (the HTTPS listener serves it too).
    #[arg(long, env = "CLAUDEKEY_WEBHOOK_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
}

impl Args {
    /// The sidecar the flags describe.
    pub fn sidecar(&self) -> SidecarConfig {
        let mut requests = BTreeMap::new();
        requests.insert("cpu".to_string(), self.sidecar_cpu_request.clone());
        requests.insert("memory".to_string(), self.sidecar_memory_request.clone());
        let mut limits = BTreeMap::new();
        limits.insert("memory".to_string(), self.sidecar_memory_limit.clone());
        if let Some(cpu) = &self.sidecar_cpu_limit {
            limits.insert("cpu".to_string(), cpu.clone());
        }
        requests.retain(|_, v| !v.is_empty());
        limits.retain(|_, v| !v.is_empty());
        SidecarConfig {
            image: self.proxy_image.clone(),
            port: self.proxy_port,
            metrics_port: self.proxy_metrics_port,
            upstream: self.proxy_upstream.clone(),
            requests,
            limits,
            redis_url: self.sidecar_redis_url.clone(),
        }
    }
}

/// A `--sidecar-redis-url` lands in every injected pod's spec: it must name no password.
pub fn check_sidecar_redis_url(url: &str) -> anyhow::Result<()> {
    use redis::IntoConnectionInfo;
    let info = url.into_connection_info().map_err(|_| {
        anyhow::anyhow!(
            "--sidecar-redis-url: expected redis://host[:port][/db] or rediss://…, without a password"
        )
    })?;
    if info.redis_settings().password().is_some() {
        anyhow::bail!(
            "--sidecar-redis-url must not carry a password: it is written into every injected pod's spec (each sidecar reads its namespace's password from its -proxy Secret)"
        );
    }
    Ok(())
}

/// What [`serve`] needs besides a listener.
#[derive(Clone, Debug)]
pub struct WebhookConfig {
    /// Enforce or warn.
    pub mode: Mode,
    /// The sidecar to inject.
    pub sidecar: SidecarConfig,
    /// Serving certificate (PEM), reloaded on change.
    pub tls_cert_file: PathBuf,
    /// Its key (PEM), reloaded on change.
    pub tls_key_file: PathBuf,
}

/// Why the webhook could not start.
#[derive(thiserror::Error, Debug)]
pub enum WebhookError {
    /// The certificate could not be loaded.
    #[error("failed to load the serving certificate: {0}")]
    Tls(#[from] tls::TlsError),
    /// rustls refused the configuration.
    #[error("failed to configure TLS: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Serves the webhook on `listener` until `shutdown` resolves. Tests call this in-process.
pub async fn serve(
    config: WebhookConfig,
    listener: TcpListener,
    claudekeys: Arc<dyn ClaudeKeyLookup>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), WebhookError> {
    serve_with_metrics(
        config,
        listener,
        claudekeys,
        Arc::default(),
        shutdown,
        std::time::Duration::ZERO,
    )
    .await
}

async fn serve_with_metrics(
    config: WebhookConfig,
    listener: TcpListener,
    claudekeys: Arc<dyn ClaudeKeyLookup>,
    metrics: Arc<server::Metrics>,
    shutdown: impl Future<Output = ()> + Send,
    delay: std::time::Duration,
) -> Result<(), WebhookError> {
    let resolver = tls::ReloadingResolver::new(&config.tls_cert_file, &config.tls_key_file)?;
    let tls = tls::server_config(resolver)?;
    let admission = Arc::new(Admission {
        mode: config.mode,
        sidecar: config.sidecar,
        claudekeys,
    });
    server::serve_tls(
        server::router(admission, metrics),
        tls,
        listener,
        shutdown,
        delay,
    )
    .await;
    Ok(())
}

/// A reflector cache of all ClaudeKeys and the future that keeps it current (spawn it).
/// Requests are answered from the cache: no API call per AdmissionReview.
pub fn claudekey_cache(
    client: Client,
) -> (Store<ClaudeKey>, impl Future<Output = ()> + Send + 'static) {
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(
        writer,
        watcher(Api::<ClaudeKey>::all(client), watcher::Config::default()),
    )
    .default_backoff()
    .touched_objects();
    let driver = async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            if let Err(error) = event {
                tracing::warn!(%error, "ClaudeKey watch failed; retrying");
            }
        }
    };
    (reader, driver)
}

/// Runs `claudekey webhook` until SIGTERM or Ctrl-C.
pub async fn run(args: Args) -> anyhow::Result<()> {
    if let Some(url) = &args.sidecar_redis_url {
        check_sidecar_redis_url(url)?;
    }
    let client = Client::try_default().await?;
    let (store, driver) = claudekey_cache(client);
    tokio::spawn(driver);
    store.wait_until_ready().await?;
    tracing::info!(claudekeys = store.len(), "ClaudeKey cache ready");
    let metrics = Arc::new(server::Metrics::default());
    if let Some(addr) = args.metrics_listen {
        let listener = TcpListener::bind(addr).await?;
        let router = server::metrics_router(metrics.clone());
        tokio::spawn(crate::probe_port::serve(
            listener,
            router,
            std::future::pending(),
        ));
    }
    let config = WebhookConfig {
        mode: args.mode,
        sidecar: args.sidecar(),
        tls_cert_file: args.tls_cert_file.clone(),
        tls_key_file: args.tls_key_file.clone(),
    };
    let listener = TcpListener::bind(args.listen).await?;
    tracing::info!(listen = %args.listen, mode = ?args.mode, "serving admission webhooks");
    serve_with_metrics(
        config,
        listener,
        Arc::new(store),
        metrics,
        crate::shutdown::signal(),
        *args.shutdown_delay,
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod sidecar_redis_tests {
    #[test]
    fn a_sidecar_redis_url_with_a_password_is_refused() {
        assert!(super::check_sidecar_redis_url("redis://redis.ns.svc:6379/0").is_ok());
        let err = super::check_sidecar_redis_url("redis://:hunter2@redis.ns.svc:6379")
            .unwrap_err()
            .to_string();
        assert!(err.contains("must not carry a password"), "{err}");
        assert!(!err.contains("hunter2"));
        let err = super::check_sidecar_redis_url("redis://:hunter2@[::1")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("hunter2"), "{err}");
    }
}
