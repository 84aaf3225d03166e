//! `claudekey proxy` (DESIGN.md §6, §8): the server every Anthropic API request passes through,
//! in sidecar mode (loopback, no workload key) or gateway mode (workload key per ClaudeKey).

pub mod admin;
mod after_answer;
mod args;
pub mod audit;
mod audit_line;
mod audit_queue;
pub mod audit_sink;
pub mod auth;
pub mod body;
pub mod caps;
pub mod config;
mod dir_watch;
pub mod error;
pub mod exchange;
pub mod federation;
pub mod forward;
pub mod forwarder;
pub mod injection;
mod interned;
pub mod json;
pub mod kube_source;
mod launch;
pub mod limits;
mod message_scan;
pub mod metrics;
mod observed;
mod pipeline;
pub mod prescreen;
pub mod redact;
pub mod request;
pub mod scope;
pub mod server_limits;
pub mod sse;
pub mod tenant;
pub mod upstream_pool;
pub mod usage;

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use hyper::service::service_fn;
use tokio::{
    net::{TcpListener, TcpStream},
    task::JoinSet,
};

use crate::per_client::{ClientSlot, PerClient};
use crate::shutdown::drain::Drain;
pub use args::{Args, DEFAULT_METRICS_LISTEN, DEFAULT_PORT, GATEWAY_SHUTDOWN_DELAY, Mode, RunMode};
pub use audit_sink::AuditTarget;
use config::{Loader, Store};
use exchange::Recorder;
use metrics::Metrics;
pub use server_limits::ServerLimits;

/// Everything the proxy needs to start, for `run` and for in-process tests and benches.
#[derive(Clone, Debug)]
pub struct ProxySettings {
    pub config_dir: PathBuf,
    pub upstream: String,
    pub mode: Mode,
    pub audit: AuditTarget,
    /// Shown in audit lines (from `POD_NAME`).
    pub pod: Option<String>,
    /// Re-read the config this often even without a file event.
    pub poll_interval: Duration,
    /// How long to wait for the upstream's response headers.
    pub upstream_timeout: Duration,
    /// Gateway mode: read config Secrets through the API instead of `config_dir`.
    pub config_secrets: Option<kube_source::SecretsSource>,
    /// Serve HTTPS with this certificate and key (PEM files, re-read when they change).
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Timeouts and the connection cap of the traffic listener.
    pub server_limits: ServerLimits,
    /// How long open requests may take to finish at shutdown before they are cut.
    pub shutdown_grace: Duration,
    /// In-memory or shared (Redis) limits, prices, fallback share.
    pub limits: limits::LimitSettings,
    /// Where identity tokens for federation sources come from (none: such sources get 503s).
    pub identity: Option<federation::IdentitySource>,
    /// After the shutdown signal, keep accepting this long while every connection is closed
    /// cleanly after its next request (`crate::shutdown::drain`).
    pub shutdown_delay: Duration,
}

impl ProxySettings {
    pub fn new(config_dir: impl Into<PathBuf>, upstream: impl Into<String>, mode: Mode) -> Self {
        Self {
            config_dir: config_dir.into(),
            upstream: upstream.into(),
            mode,
            audit: AuditTarget::Stdout,
            pod: std::env::var("POD_NAME").ok(),
            poll_interval: Duration::from_secs(10),
            upstream_timeout: Duration::from_secs(600),
            config_secrets: None,
            tls: None,
            server_limits: match mode {
                Mode::Gateway => ServerLimits::gateway(),
                Mode::Sidecar => ServerLimits::default(),
            },
            shutdown_grace: Duration::from_secs(30),
            limits: limits::LimitSettings::default(),
            identity: None,
            shutdown_delay: Duration::ZERO,
        }
    }
}

/// A started proxy: config loaded (or waiting for one), watcher running.
pub struct Proxy {
    shared: Arc<pipeline::Shared>,
    pub metrics: Arc<Metrics>,
    pub store: Arc<Store>,
    watcher: tokio::task::JoinHandle<()>,
    /// Gateway: reports federation health on ClusterClaudeKeySource status.
    reporter: Option<tokio::task::JoinHandle<()>>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    limits: ServerLimits,
    /// The limits of every ClaudeKey served; kept here to flush shared settlements at the end.
    limiters: Arc<limits::Limiters>,
    shutdown_grace: Duration,
    shutdown_delay: Duration,
}

impl Proxy {
    /// Loads the config once, starts the directory watcher and the audit writer.
    pub fn start(settings: ProxySettings) -> anyhow::Result<Self> {
        let bodies = settings.server_limits.body_budget();
        let metrics = Arc::new({
            let mut metrics = Metrics::default();
            metrics.watch_body_budget(bodies.clone());
            metrics
        });
        let store = Arc::new(Store::empty());
        let limiters = Arc::new(
            limits::Limiters::new(settings.limits.clone(), metrics.limits.clone())
                .context("failed to configure shared limits")?,
        );
        // Runs until the proxy is dropped (the task is aborted then).
        let watcher = match settings.config_secrets.clone() {
            Some(source) => {
                kube_source::spawn(source, store.clone(), metrics.clone(), limiters.clone())
            }
            None => {
                let mut loader =
                    Loader::new(settings.config_dir.clone(), settings.mode, limiters.clone());
                config::reload_into(&mut loader, &store, &metrics);
                config::spawn_watcher(
                    loader,
                    store.clone(),
                    metrics.clone(),
                    settings.poll_interval,
                    std::future::pending(),
                )?
            }
        };
        let tls = match &settings.tls {
            Some((cert, key)) => Some(launch::acceptor(cert, key)?),
            None => None,
        };
        let upstream = forward::Upstream::new(&settings.upstream, settings.upstream_timeout)?;
        let audit =
            audit_sink::AuditSink::start(settings.audit.clone(), metrics.audit_write_failures())
                .context("failed to open the audit log")?;
        let recorder = Arc::new(Recorder {
            metrics: metrics.clone(),
            audit,
            shutting_down: Default::default(),
            pod: settings.pod.as_deref().map(Into::into),
        });
        let federation = Arc::new(federation::Federation::new(settings.identity.clone()));
        let reporter = settings
            .config_secrets
            .as_ref()
            .map(|source| federation::report::spawn(source.client.clone(), federation.clone()));
        let shared = Arc::new(pipeline::Shared {
            store: store.clone(),
            upstream,
            federation,
            recorder,
            mode: settings.mode,
            bodies,
        });
        Ok(Self {
            shared,
            metrics,
            store,
            watcher,
            reporter,
            tls,
            limits: settings.server_limits,
            limiters,
            shutdown_grace: settings.shutdown_grace,
            shutdown_delay: settings.shutdown_delay,
        })
    }

    /// The connection's place among its client address's, or `None` over the per-client cap
    /// (the stream is then dropped: closed before a byte is read).
    fn admit_client(&self, per_client: &PerClient, stream: &TcpStream) -> Option<ClientSlot> {
        let client = stream.peer_addr().ok()?.ip();
        let admitted = per_client.admit(client);
        if admitted.is_none() {
            self.metrics.client_connection_refused();
            tracing::debug!(%client, "closed a connection over the per-client cap");
        }
        admitted
    }

    /// Serves the traffic listener until `shutdown` resolves, drains for the shutdown delay
    /// (still accepting; every connection closed cleanly after its next request: HTTP/2 GOAWAY,
    /// HTTP/1 `Connection: close`), then closes the listener and lets open requests finish
    /// (streams included) for the shutdown grace (30 s); requests still open then are cut, and
    /// each still leaves its audit line (outcome `shutdown`) and its shared settlement before
    /// this returns. With TLS, each
    /// connection's handshake comes first (bounded), then the same limits as plain HTTP.
    pub async fn serve(
        &self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()> {
        let drain = Drain::new();
        let stop = drain.after(shutdown, self.shutdown_delay);
        tokio::pin!(stop);
        let slots = self.limits.slots();
        let per_client = self.limits.per_client();
        let mut connections = JoinSet::new();
        loop {
            // Finished connections leave the set, so it holds only open ones.
            while connections.try_join_next().is_some() {}
            // A free slot first: past the cap, connections wait in the kernel's backlog.
            let slot = tokio::select! {
                () = &mut stop => break,
                slot = slots.clone().acquire_owned() => match slot {
                    Ok(slot) => slot,
                    Err(_) => break,
                },
            };
            let stream = tokio::select! {
                () = &mut stop => break,
                accepted = server_limits::accept(&listener) => match accepted {
                    Some(stream) => stream,
                    None => continue,
                },
            };
            let Some(client_slot) = self.admit_client(&per_client, &stream) else {
                continue;
            };
            let shared = self.shared.clone();
            // Boxed here, once: the request's future is several KiB (every step's state), and
            // each layer above it (server limits, drain, hyper's dispatcher) would otherwise
            // copy it whole when it wraps it.
            let service = service_fn(move |req| Box::pin(pipeline::handle(shared.clone(), req)));
            let (limits, watcher) = (self.limits.clone(), drain.connection());
            let tls = self.tls.clone();
            connections.spawn(async move {
                let _client_slot = client_slot;
                match tls {
                    Some(acceptor) => {
                        if let Some(stream) = launch::handshake(&acceptor, stream).await {
                            server_limits::serve_connection(
                                &limits, watcher, stream, service, slot,
                            )
                            .await;
                        }
                    }
                    None => {
                        server_limits::serve_connection(&limits, watcher, stream, service, slot)
                            .await
                    }
                }
            });
        }
        drop(listener);
        let drained = async { while connections.join_next().await.is_some() {} };
        if tokio::time::timeout(self.shutdown_grace, drained)
            .await
            .is_err()
        {
            tracing::warn!(grace = ?self.shutdown_grace, "requests still open at shutdown; cutting them");
            self.shared
                .recorder
                .shutting_down
                .store(true, std::sync::atomic::Ordering::Relaxed);
            connections.shutdown().await;
        }
        self.limiters.flush().await;
        let audit = self.shared.recorder.audit.clone();
        let _ = tokio::task::spawn_blocking(move || audit.flush()).await;
        Ok(())
    }

    /// Serves `/metrics`, `/healthz` and `/readyz` until `shutdown` resolves.
    pub async fn serve_admin(
        &self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        admin::serve_admin(
            listener,
            self.metrics.clone(),
            self.store.clone(),
            self.shared.recorder.audit.clone(),
            shutdown,
        )
        .await
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.watcher.abort();
        if let Some(reporter) = &self.reporter {
            reporter.abort();
        }
    }
}

/// In-process entry point for tests and benches: start and serve until `shutdown`.
pub async fn serve(
    settings: ProxySettings,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let proxy = Proxy::start(settings)?;
    proxy.serve(listener, shutdown).await?;
    Ok(())
}

/// Says so at start when the open-files limit (raised to the hard one by then) cannot hold the
/// connections the listener admits: past it, accepts and upstream connects fail for everyone.
fn warn_if_short_of_open_files(max_connections: usize) {
    let needed = crate::open_files::needed_by_proxy(max_connections);
    match crate::open_files::soft() {
        Ok(limit) if limit < needed => tracing::warn!(
            limit,
            needed,
            max_connections,
            "the open-files limit is below what the proxy's connections need: raise the \
             container's nofile limit (the hard RLIMIT_NOFILE)"
        ),
        Ok(_) | Err(_) => {}
    }
}

/// Sidecar mode never listens beyond loopback: there the missing workload key is safe only
/// because nothing outside the pod can connect.
pub fn check_listen(mode: Mode, listen: SocketAddr) -> anyhow::Result<()> {
    if mode == Mode::Sidecar && !listen.ip().is_loopback() {
        anyhow::bail!(
            "sidecar mode accepts unauthenticated requests, so it listens only on a loopback address, not {listen}"
        );
    }
    Ok(())
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let Some(mode) = args.mode.proxy() else {
        return launch::run_forwarder(args).await;
    };
    check_listen(mode, args.listen)?;
    let mut settings = ProxySettings::new(
        args.config_dir.clone().unwrap_or_default(),
        args.upstream.clone(),
        mode,
    );
    settings.config_secrets = launch::secrets_source(&args).await?;
    settings.tls = args.tls_cert.clone().zip(args.tls_key.clone());
    settings.server_limits.body_budget = args.body_budget_bytes();
    settings.limits = launch::limit_settings(&args)?;
    settings.identity = launch::identity_source(&args).await?;
    settings.shutdown_delay = match (args.shutdown_delay, mode) {
        (Some(delay), _) => *delay,
        (None, Mode::Gateway) => GATEWAY_SHUTDOWN_DELAY,
        (None, Mode::Sidecar) => Duration::ZERO,
    };
    settings.audit = match args.audit_log.as_str() {
        "-" => AuditTarget::Stdout,
        path => AuditTarget::File(path.into()),
    };
    warn_if_short_of_open_files(settings.server_limits.max_connections);
    let proxy = Proxy::start(settings)?;
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("failed to listen on {}", args.listen))?;
    tracing::info!(listen = %args.listen, mode = ?args.mode, upstream = %args.upstream, tls = proxy.tls.is_some(), shared_limits = args.redis_url.is_some(), "proxy listening");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    if let Some(addr) = args.metrics_listen {
        let admin = TcpListener::bind(addr)
            .await
            .with_context(|| format!("failed to listen on {addr}"))?;
        let admin_proxy_metrics = proxy.metrics.clone();
        let store = proxy.store.clone();
        let audit = proxy.shared.recorder.audit.clone();
        let mut rx = stop_rx.clone();
        tokio::spawn(async move {
            let stop = async move {
                let _ = rx.wait_for(|stop| *stop).await;
            };
            if let Err(e) = admin::serve_admin(admin, admin_proxy_metrics, store, audit, stop).await
            {
                tracing::error!(error = %e, "admin listener failed");
            }
        });
    }
    proxy.serve(listener, crate::shutdown::signal()).await?;
    let _ = stop_tx.send(true);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    #[test]
    fn flags_and_defaults() {
        let cli = Cli::try_parse_from([
            "x",
            "--config-dir",
            "/etc/claudekey/proxy",
            "--listen",
            "127.0.0.1:8484",
            "--metrics-listen",
            "--mode",
            "sidecar",
        ])
        .unwrap();
        assert_eq!(cli.args.upstream, "https://api.anthropic.com");
        assert_eq!(
            cli.args.metrics_listen,
            Some(DEFAULT_METRICS_LISTEN.parse().unwrap())
        );
        assert_eq!(cli.args.mode, RunMode::Sidecar);
        assert_eq!(cli.args.audit_log, "-");
        let cli =
            Cli::try_parse_from(["x", "--config-dir", "d", "--listen", "0.0.0.0:8484"]).unwrap();
        assert_eq!(cli.args.mode, RunMode::Gateway);
        assert_eq!(cli.args.metrics_listen, None);
        assert_eq!(
            cli.args.body_budget_bytes(),
            ServerLimits::default().body_budget,
            "the flag's default is the settings' default"
        );
    }

    #[test]
    fn the_body_budget_flag_is_mib_and_never_zero() {
        let parse = |mib: &str| {
            let argv = ["x", "--config-dir", "d", "--listen", "127.0.0.1:8484"];
            Cli::try_parse_from(argv.iter().chain(&["--body-budget-mib", mib])).map(|c| c.args)
        };
        assert_eq!(parse("8").unwrap().body_budget_bytes(), 8 * 1024 * 1024);
        assert!(
            parse("0").is_err(),
            "a budget of nothing refuses every body"
        );
        assert!(parse("-1").is_err());
    }

    #[test]
    fn exactly_one_config_source_and_tls_as_a_pair() {
        let parse = |extra: &[&str]| {
            let argv = ["x", "--listen", "0.0.0.0:8443"].iter().chain(extra);
            Cli::try_parse_from(argv).map(|c| c.args)
        };
        assert!(parse(&[]).is_err(), "a config source is required");
        assert!(parse(&["--config-dir", "d", "--config-secrets", "ns"]).is_err());
        let args = parse(&["--config-secrets", "claudekey-system"]).unwrap();
        assert_eq!(args.config_secrets.as_deref(), Some("claudekey-system"));
        assert!(args.config_dir.is_none());
        assert!(parse(&["--config-dir", "d", "--tls-cert", "c"]).is_err());
        assert!(parse(&["--config-dir", "d", "--tls-key", "k"]).is_err());
        let args = parse(&["--config-dir", "d", "--tls-cert", "c", "--tls-key", "k"]).unwrap();
        assert_eq!(args.tls_cert, Some(PathBuf::from("c")));
        let args = parse(&["--config-dir", "d", "--mode", "forward"]).unwrap();
        assert_eq!(args.mode.proxy(), None);
        let args = parse(&["--config-dir", "d", "--identity-token-file", "/t"]).unwrap();
        assert_eq!(args.identity_token_file, Some(PathBuf::from("/t")));
        let both = [
            "--config-secrets",
            "ns",
            "--identity-token-file",
            "/t",
            "--identity-service-account",
            "ns/gw",
        ];
        assert!(parse(&both).is_err(), "one identity source at most");
    }

    #[tokio::test]
    async fn forward_mode_refuses_non_loopback_and_gateway_flags() {
        let parse = |extra: &[&str]| {
            let argv = ["x", "--mode", "forward"].iter().chain(extra);
            Cli::try_parse_from(argv).unwrap().args
        };
        let error = run(parse(&["--config-dir", "d", "--listen", "0.0.0.0:8484"]))
            .await
            .unwrap_err();
        assert!(error.to_string().contains("loopback"), "{error}");
        let error = run(parse(&[
            "--config-secrets",
            "ns",
            "--listen",
            "127.0.0.1:0",
        ]))
        .await
        .unwrap_err();
        assert!(error.to_string().contains("--config-dir"), "{error}");
        let sidecar = [
            "x",
            "--mode",
            "sidecar",
            "--config-secrets",
            "ns",
            "--listen",
            "127.0.0.1:0",
        ];
        let error = run(Cli::try_parse_from(sidecar).unwrap().args)
            .await
            .unwrap_err();
        assert!(error.to_string().contains("gateway mode only"), "{error}");
        let sidecar_with_sa = [
            "x",
            "--mode",
            "sidecar",
            "--config-dir",
            "d",
            "--identity-service-account",
            "ns/gw",
            "--listen",
            "127.0.0.1:0",
        ];
        let error = run(Cli::try_parse_from(sidecar_with_sa).unwrap().args)
            .await
            .unwrap_err();
        assert!(error.to_string().contains("for the gateway"), "{error}");
    }

    #[test]
    fn redis_flags_never_show_the_url_and_check_their_values() {
        let parse = |extra: &[&str]| {
            let argv = ["x", "--config-dir", "d", "--listen", "127.0.0.1:0"]
                .iter()
                .chain(extra);
            Cli::try_parse_from(argv).unwrap().args
        };
        let args = parse(&["--redis-url", "redis://:pw-Secret1@r:6379/0"]);
        assert!(!format!("{args:?}").contains("pw-Secret1"));
        assert_eq!(args.redis_timeout, Duration::from_millis(100));
        assert_eq!(args.redis_fallback_share, limits::DEFAULT_FALLBACK_SHARE);
        let settings = launch::limit_settings(&args).unwrap();
        assert!(!format!("{settings:?}").contains("pw-Secret1"));
        assert!(settings.redis.is_some());
        // In-memory unless a URL is given.
        assert!(launch::limit_settings(&parse(&[])).unwrap().redis.is_none());
        let error = launch::limit_settings(&parse(&["--redis-password-file", "/nope"]));
        assert!(error.unwrap_err().to_string().contains("--redis-url"));
        for share in ["0", "1.5", "NaN"] {
            let args = parse(&["--redis-url", "redis://r", "--redis-fallback-share", share]);
            assert!(launch::limit_settings(&args).is_err(), "{share}");
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "pw-from-file\n").unwrap();
        let args = parse(&[
            "--redis-url",
            "redis://r",
            "--redis-password-file",
            file.to_str().unwrap(),
        ]);
        let settings = launch::limit_settings(&args).unwrap();
        let redis = settings.redis.unwrap();
        assert_eq!(
            secrecy::ExposeSecret::expose_secret(redis.password.as_ref().unwrap()),
            "pw-from-file"
        );
        assert!(!format!("{redis:?}").contains("pw-from-file"));
        let bad = dir.path().join("prices.yaml");
        std::fs::write(&bad, "models: [{model: x}]").unwrap();
        let args = parse(&["--price-table", bad.to_str().unwrap()]);
        assert!(launch::limit_settings(&args).is_err());
    }

    #[test]
    fn sidecar_refuses_non_loopback() {
        assert!(check_listen(Mode::Sidecar, "0.0.0.0:8484".parse().unwrap()).is_err());
        assert!(check_listen(Mode::Sidecar, "127.0.0.1:8484".parse().unwrap()).is_ok());
        assert!(check_listen(Mode::Sidecar, "[::1]:8484".parse().unwrap()).is_ok());
        assert!(check_listen(Mode::Gateway, "0.0.0.0:8484".parse().unwrap()).is_ok());
    }
}
