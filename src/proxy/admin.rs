//! The proxy's admin listener: `/metrics`, `/healthz` (the process can serve: its runtime runs
//! and its audit log writer too) and `/readyz` (that, and a config is loaded). In sidecar mode
//! the traffic port is loopback-only, so probes come here. Served by [`crate::probe_port`].

use std::sync::Arc;

use axum::http::StatusCode;

use super::{audit_sink::AuditSink, config::Store, metrics::Metrics};

/// Serves until `shutdown` resolves.
pub async fn serve_admin(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    store: Arc<Store>,
    audit: AuditSink,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::{Router, routing::get};
    let live = audit.clone();
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                async move {
                    (
                        [(
                            http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        metrics.encode(),
                    )
                }
            }),
        )
        .route("/healthz", get(move || std::future::ready(liveness(&live))))
        .route(
            "/readyz",
            get(move || {
                let answer = match liveness(&audit) {
                    (StatusCode::OK, _) if store.load().is_none() => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "no proxy config loaded yet",
                    ),
                    (StatusCode::OK, _) => (StatusCode::OK, "ready"),
                    failed => failed,
                };
                std::future::ready(answer)
            }),
        );
    crate::probe_port::serve(listener, app, shutdown).await
}

/// `/healthz`: a proxy whose audit writer has stopped refuses every request (none could be
/// audited) and only a restart mends it, so the liveness probe must fail.
fn liveness(audit: &AuditSink) -> (StatusCode, &'static str) {
    if audit.is_running() {
        (StatusCode::OK, "ok")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "the audit log writer has stopped; restart the proxy",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn liveness_fails_once_the_audit_writer_has_stopped() {
        assert_eq!(liveness(&AuditSink::Off), (StatusCode::OK, "ok"));
        let target = crate::proxy::audit_sink::AuditTarget::File("/dev/null".into());
        let running = AuditSink::start(target, Default::default()).unwrap();
        assert_eq!(liveness(&running), (StatusCode::OK, "ok"));
        let stopped = AuditSink::Writer(Arc::new(crate::proxy::audit_queue::stopped_writer(4)));
        let (status, text) = liveness(&stopped);
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(text.contains("restart"), "{text}");
    }
}
