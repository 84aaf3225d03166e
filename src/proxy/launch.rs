//! Start-up pieces of gateway placement (DESIGN.md §10), kept out of the request path: the
//! HTTPS listener of the gateway (the shared reloading certificate of `crate::tls`), the
//! config-Secret source, and forward mode's own entry point.

use std::{path::Path, sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use super::{
    Args, RunMode,
    forwarder::{self, Forwarder},
    kube_source::SecretsSource,
    limits::{LimitSettings, RedisSettings, prices::PriceTable},
    metrics,
};

/// The limiter's settings from the flags: Redis (password file read once at start), the price
/// table, the fallback share.
pub(super) fn limit_settings(args: &Args) -> anyhow::Result<LimitSettings> {
    let share = args.redis_fallback_share;
    if !(share > 0.0 && share <= 1.0) {
        anyhow::bail!("--redis-fallback-share must be above 0 and at most 1, not {share}");
    }
    let redis = RedisSettings::from_flags(
        args.redis_url.as_ref(),
        args.redis_username.as_deref(),
        args.redis_password_file.as_deref(),
        args.redis_timeout,
    )?;
    let prices = match &args.price_table {
        Some(path) => PriceTable::load(path)?,
        None => PriceTable::default(),
    };
    Ok(LimitSettings {
        redis,
        prices,
        fallback_share: share,
        ..LimitSettings::default()
    })
}

/// A client that has not finished its TLS handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The TLS acceptor of `--tls-cert`/`--tls-key`: the first load must succeed; later changes to
/// the files are picked up at the next handshake (the last good pair serves meanwhile).
pub(super) fn acceptor(cert: &Path, key: &Path) -> anyhow::Result<TlsAcceptor> {
    let resolver = crate::tls::ReloadingResolver::new(cert, key)
        .context("failed to load the proxy's serving certificate")?;
    let config = crate::tls::server_config(resolver).context("failed to configure TLS")?;
    Ok(TlsAcceptor::from(config))
}

/// The TLS handshake of one connection, bounded in time; `None` when it fails (logged at debug:
/// scanners and health checks of load balancers do that all day).
pub(super) async fn handshake(
    acceptor: &TlsAcceptor,
    stream: TcpStream,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => Some(tls),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!("TLS handshake timed out");
            None
        }
    }
}

/// `--config-secrets NAMESPACE`: gateway mode only, with a client from the pod's service
/// account or KUBECONFIG.
pub(super) async fn secrets_source(args: &Args) -> anyhow::Result<Option<SecretsSource>> {
    let Some(namespace) = &args.config_secrets else {
        return Ok(None);
    };
    if args.mode != RunMode::Gateway {
        anyhow::bail!("--config-secrets serves config Secrets in gateway mode only");
    }
    let client = kube::Client::try_default()
        .await
        .context("failed to configure a Kubernetes client for --config-secrets")?;
    Ok(Some(SecretsSource {
        client,
        namespace: namespace.clone(),
    }))
}

/// `--identity-token-file` (sidecar) or `--identity-service-account` (gateway): where identity
/// tokens of federation sources come from.
pub(super) async fn identity_source(
    args: &Args,
) -> anyhow::Result<Option<super::federation::IdentitySource>> {
    use super::federation::IdentitySource;
    if let Some(path) = &args.identity_token_file {
        return Ok(Some(IdentitySource::File(path.clone())));
    }
    let Some(account) = &args.identity_service_account else {
        return Ok(None);
    };
    if args.mode != RunMode::Gateway {
        anyhow::bail!(
            "--identity-service-account is for the gateway; a sidecar reads --identity-token-file"
        );
    }
    let Some((namespace, name)) = account.split_once('/') else {
        anyhow::bail!("--identity-service-account takes NAMESPACE/NAME, not {account:?}");
    };
    let client = kube::Client::try_default()
        .await
        .context("failed to configure a Kubernetes client for --identity-service-account")?;
    Ok(Some(IdentitySource::TokenRequest {
        client,
        namespace: namespace.to_string(),
        name: name.to_string(),
    }))
}

/// `claudekey proxy --mode forward`: loopback listener, the `<name>-client` directory watched,
/// and the usual admin listener (`/readyz` once that directory was loaded).
pub(super) async fn run_forwarder(args: Args) -> anyhow::Result<()> {
    forwarder::check_listen(args.listen)?;
    let Some(dir) = args.config_dir.clone() else {
        anyhow::bail!("forward mode reads the mounted <name>-client Secret: set --config-dir");
    };
    if args.config_secrets.is_some() || args.tls_cert.is_some() {
        anyhow::bail!(
            "forward mode listens on loopback in plain HTTP and reads only --config-dir: --config-secrets and --tls-cert are for the gateway"
        );
    }
    let forwarder = Forwarder::new(dir.clone());
    let watcher = forwarder
        .spawn_watcher()
        .with_context(|| format!("failed to watch {}", dir.display()))?;
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("failed to listen on {}", args.listen))?;
    tracing::info!(listen = %args.listen, dir = %dir.display(), "forwarder listening");
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    if let Some(addr) = args.metrics_listen {
        let admin = TcpListener::bind(addr)
            .await
            .with_context(|| format!("failed to listen on {addr}"))?;
        let ready = forwarder.ready.clone();
        tokio::spawn(async move {
            let stop = async move {
                let _ = stop_rx.wait_for(|stop| *stop).await;
            };
            let metrics = Arc::new(metrics::Metrics::default());
            // The forwarder writes no audit line: the gateway does.
            let audit = super::audit_sink::AuditSink::Off;
            if let Err(e) = super::admin::serve_admin(admin, metrics, ready, audit, stop).await {
                tracing::error!(error = %e, "admin listener failed");
            }
        });
    }
    forwarder.serve(listener, crate::shutdown::signal()).await?;
    watcher.abort();
    let _ = stop_tx.send(true);
    Ok(())
}
