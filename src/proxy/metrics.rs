//! Prometheus metrics of the proxy. Labels are bounded: ClaudeKey names come from config, models
//! are the scope's allowlist entries (or `other`), kinds and outcomes are fixed sets. The admin
//! listener that serves them is `admin.rs`.

use std::time::Duration;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};

use super::{limits::LimitsMetrics, usage::Usage};

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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ExchangeLabels {
    source: String,
    outcome: &'static str,
}

pub struct Metrics {
    registry: Registry,
    federation_exchanges: Family<ExchangeLabels, Counter>,
    requests: Family<RequestLabels, Counter>,
    tokens: Family<TokenLabels, Counter>,
    latency: Family<LatencyLabels, Histogram, fn() -> Histogram>,
    rate_limited: Family<KindLabels, Counter>,
    redactions: Family<KindLabels, Counter>,
    injections: Family<KindLabels, Counter>,
    upstream_errors: Family<KindLabels, Counter>,
    reloads: Family<ResultLabels, Counter>,
    outcomes: Family<KindLabels, Counter>,
    user_overflow: Family<KindLabels, Counter>,
    /// Fallback state and spend, written by the limiter itself.
    pub limits: LimitsMetrics,
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
            outcomes: Family::default(),
            user_overflow: Family::default(),
            limits: LimitsMetrics::default(),
            federation_exchanges: Family::default(),
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
        registry.register(
            "request_outcomes",
            "Requests by how they ended (completed, refused, upstream_error, client_closed, timeout, shutdown)",
            m.outcomes.clone(),
        );
        registry.register(
            "user_window_overflow",
            "Requests of end users counted in the shared overflow window because the per-user table was full",
            m.user_overflow.clone(),
        );
        m.limits.register(&mut registry);
        registry.register(
            "federation_exchanges",
            "Identity-token exchanges at POST /v1/oauth/token by ClusterClaudeKeySource and outcome (ok, refused, unreachable, noIdentityToken, awaitingNewIdentityToken)",
            m.federation_exchanges.clone(),
        );
        Self { registry, ..m }
    }
}

impl Metrics {
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

    pub fn outcome(&self, claudekey: &str, outcome: &str) {
        Self::kind(&self.outcomes, claudekey, outcome, 1);
    }

    pub fn user_overflow(&self, claudekey: &str) {
        Self::kind(&self.user_overflow, claudekey, "perUserRequestsPerHour", 1);
    }

    /// One identity-token exchange (or a refusal to attempt one) for a federation source.
    pub fn federation_exchange(&self, source: &str, outcome: &'static str) {
        self.federation_exchanges
            .get_or_create(&ExchangeLabels {
                source: source.into(),
                outcome,
            })
            .inc();
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
