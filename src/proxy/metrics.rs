//! Prometheus metrics of the proxy and the admin listener that serves them with `/healthz` and
//! `/readyz` (in sidecar mode the traffic port is loopback-only, so probes come here). Labels are
//! bounded: ClaudeKey names come from config, models only when the scope allows them.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::Duration,
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};

use super::{config::Store, tenant::Tenant};

/// Distinct model labels allowed when a scope has no allowlist; later ones become "other".
const MAX_OPEN_MODELS: usize = 32;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    claudekey: String,
    model: String,
    endpoint: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    claudekey: String,
    model: String,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LatencyLabels {
    claudekey: String,
    endpoint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    claudekey: String,
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    tokens: Family<TokenLabels, Counter>,
    latency: Family<LatencyLabels, Histogram, fn() -> Histogram>,
    rate_limited: Family<KindLabels, Counter>,
    redactions: Family<KindLabels, Counter>,
    injections: Family<KindLabels, Counter>,
    upstream_errors: Family<KindLabels, Counter>,
    reloads: Family<ResultLabels, Counter>,
    open_models: Mutex<HashSet<String>>,
}

/// Token counts of one request by direction.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub input: u64,
    pub output: u64,
    pub cache_creation: u64,
    pub cache_read: u64,
}

impl Usage {
    pub fn total(&self) -> u64 {
        self.input + self.output + self.cache_creation + self.cache_read
    }
}

fn latency_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.0005, 2.5, 14,
    ))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("claudekey_proxy");
        let m = Self {
            requests: Family::default(),
            tokens: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            rate_limited: Family::default(),
            redactions: Family::default(),
            injections: Family::default(),
            upstream_errors: Family::default(),
            reloads: Family::default(),
            open_models: Mutex::default(),
            registry: Registry::default(),
        };
        registry.register(
            "requests",
            "Requests by ClaudeKey, model, endpoint and status class",
            m.requests.clone(),
        );
        registry.register(
            "tokens",
            "Tokens by ClaudeKey, model and direction",
            m.tokens.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time to the end of the response",
            m.latency.clone(),
        );
        registry.register(
            "rate_limited",
            "Requests refused by a limit",
            m.rate_limited.clone(),
        );
        registry.register("redactions", "Redactions by detector", m.redactions.clone());
        registry.register(
            "injection_flags",
            "Requests flagged as prompt injection, by action",
            m.injections.clone(),
        );
        registry.register(
            "upstream_errors",
            "Upstream failures by kind",
            m.upstream_errors.clone(),
        );
        registry.register(
            "config_reloads",
            "Config reloads by result",
            m.reloads.clone(),
        );
        Self { registry, ..m }
    }
}

impl Metrics {
    /// The model as a label: named only when the scope allows it (an explicit allowlist is a
    /// bounded set), else "other".
    pub fn model_label(&self, tenant: &Tenant, model: Option<&str>) -> String {
        let Some(model) = model else {
            return "none".into();
        };
        if !tenant.scope.model_allowed(model) {
            return "other".into();
        }
        if tenant.scope.has_model_allowlist() {
            return model.to_string();
        }
        let plausible = model.len() <= 64
            && model.starts_with("claude-")
            && model
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        let mut seen = self.open_models.lock().unwrap_or_else(|p| p.into_inner());
        if plausible && (seen.contains(model) || seen.len() < MAX_OPEN_MODELS) {
            seen.insert(model.to_string());
            model.to_string()
        } else {
            "other".into()
        }
    }

    pub fn request(
        &self,
        claudekey: &str,
        model: &str,
        endpoint: &str,
        status: u16,
        elapsed: Duration,
        usage: &Usage,
    ) {
        let class = match status {
            200..=299 => "2xx",
            400..=499 => "4xx",
            500..=599 => "5xx",
            _ => "other",
        };
        self.requests
            .get_or_create(&RequestLabels {
                claudekey: claudekey.into(),
                model: model.into(),
                endpoint: endpoint.into(),
                status: class.into(),
            })
            .inc();
        self.latency
            .get_or_create(&LatencyLabels {
                claudekey: claudekey.into(),
                endpoint: endpoint.into(),
            })
            .observe(elapsed.as_secs_f64());
        for (direction, n) in [
            ("input", usage.input),
            ("output", usage.output),
            ("cacheCreation", usage.cache_creation),
            ("cacheRead", usage.cache_read),
        ] {
            if n > 0 {
                self.tokens
                    .get_or_create(&TokenLabels {
                        claudekey: claudekey.into(),
                        model: model.into(),
                        direction,
                    })
                    .inc_by(n);
            }
        }
    }

    fn kind(family: &Family<KindLabels, Counter>, claudekey: &str, kind: &str, n: u64) {
        family
            .get_or_create(&KindLabels {
                claudekey: claudekey.into(),
                kind: kind.into(),
            })
            .inc_by(n);
    }

    pub fn rate_limited(&self, claudekey: &str, limit: &str) {
        Self::kind(&self.rate_limited, claudekey, limit, 1);
    }

    pub fn redactions(&self, claudekey: &str, detector: &str, n: u32) {
        Self::kind(&self.redactions, claudekey, detector, u64::from(n));
    }

    pub fn injection(&self, claudekey: &str, action: &str) {
        Self::kind(&self.injections, claudekey, action, 1);
    }

    pub fn upstream_error(&self, claudekey: &str, kind: &str) {
        Self::kind(&self.upstream_errors, claudekey, kind, 1);
    }

    pub fn config_reload(&self, ok: bool) {
        self.reloads
            .get_or_create(&ResultLabels {
                result: if ok { "ok" } else { "error" },
            })
            .inc();
    }

    /// OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Serves `/metrics`, `/healthz` (the process runs) and `/readyz` (a config is loaded).
pub async fn serve_admin(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    store: Arc<Store>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::{Router, http::StatusCode, routing::get};
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
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let ready = store.load().is_some();
                async move {
                    if ready {
                        (StatusCode::OK, "ready")
                    } else {
                        (
                            StatusCode::SERVICE_UNAVAILABLE,
                            "no proxy config loaded yet",
                        )
                    }
                }
            }),
        );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_requests_and_tokens() {
        let m = Metrics::default();
        let usage = Usage {
            input: 10,
            output: 5,
            ..Default::default()
        };
        m.request(
            "ns/a",
            "claude-x",
            "messages",
            200,
            Duration::from_millis(3),
            &usage,
        );
        m.rate_limited("ns/a", "tokensPerMinute");
        let text = m.encode();
        assert!(text.contains(r#"claudekey_proxy_requests_total{claudekey="ns/a",model="claude-x",endpoint="messages",status="2xx"} 1"#), "{text}");
        assert!(text.contains(r#"claudekey_proxy_tokens_total{claudekey="ns/a",model="claude-x",direction="input"} 10"#));
        assert!(text.contains(
            r#"claudekey_proxy_rate_limited_total{claudekey="ns/a",kind="tokensPerMinute"} 1"#
        ));
        assert!(text.contains("claudekey_proxy_request_duration_seconds_bucket"));
    }
}

#[cfg(test)]
mod label_tests {
    use super::*;
    use crate::{proxy::limits::Limiters, proxyconf::ProxyConfig};

    fn tenant(models: &[&str]) -> Tenant {
        let config: ProxyConfig = serde_json::from_value(serde_json::json!({
            "claudeKey": { "namespace": "ns", "name": "a" },
            "upstream": [{ "key": "sk-ant-api03-u", "fingerprint": "up:x", "validUntil": null }],
            "workloadKeys": [],
            "policy": { "scope": { "models": models } }
        }))
        .unwrap();
        Tenant::compile(&config, &Limiters::default()).unwrap()
    }

    #[test]
    fn model_labels_are_bounded() {
        let m = Metrics::default();
        let scoped = tenant(&["claude-haiku-*"]);
        assert_eq!(
            m.model_label(&scoped, Some("claude-haiku-4-5")),
            "claude-haiku-4-5"
        );
        assert_eq!(m.model_label(&scoped, Some("claude-opus-4-1")), "other");
        assert_eq!(m.model_label(&scoped, None), "none");
        let open = tenant(&[]);
        assert_eq!(m.model_label(&open, Some("not-a-claude-model")), "other");
        assert_eq!(
            m.model_label(&open, Some("claude-sonnet-4-5")),
            "claude-sonnet-4-5"
        );
        for i in 0..100 {
            m.model_label(&open, Some(&format!("claude-x-{i}")));
        }
        assert!(m.open_models.lock().unwrap().len() <= MAX_OPEN_MODELS);
        assert_eq!(
            m.model_label(&open, Some("claude-sonnet-4-5")),
            "claude-sonnet-4-5"
        );
        assert_eq!(m.model_label(&open, Some("claude-new-99")), "other");
    }
}
