//! Prometheus metrics of the proxy. Labels are bounded: ClaudeKey names come from config, models
//! are the scope's allowlist entries (or `other`), kinds and outcomes are fixed sets. The admin
//! listener that serves them is `admin.rs`.
//!
//! Every request looks up its series by a label set built on the spot, so label values are
//! shared (`Arc<str>` from the tenant's config) or static: building one copies pointers and
//! allocates nothing. Only a new series clones its label set into the family.

use std::{borrow::Cow, sync::Arc, time::Duration};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};

use super::{limits::LimitsMetrics, usage::Usage};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    claudekey: Arc<str>,
    model: Arc<str>,
    endpoint: &'static str,
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    claudekey: Arc<str>,
    model: Arc<str>,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LatencyLabels {
    claudekey: Arc<str>,
    endpoint: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    claudekey: Arc<str>,
    kind: Cow<'static, str>,
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
        claudekey: &Arc<str>,
        model: &Arc<str>,
        endpoint: &'static str,
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
                claudekey: claudekey.clone(),
                model: model.clone(),
                endpoint,
                status: class,
            })
            .inc();
        self.latency
            .get_or_create(&LatencyLabels {
                claudekey: claudekey.clone(),
                endpoint,
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
                        claudekey: claudekey.clone(),
                        model: model.clone(),
                        direction,
                    })
                    .inc_by(n);
            }
        }
    }

    fn kind(
        family: &Family<KindLabels, Counter>,
        claudekey: &Arc<str>,
        kind: Cow<'static, str>,
        n: u64,
    ) {
        family
            .get_or_create(&KindLabels {
                claudekey: claudekey.clone(),
                kind,
            })
            .inc_by(n);
    }

    pub fn rate_limited(&self, claudekey: &Arc<str>, limit: &'static str) {
        Self::kind(&self.rate_limited, claudekey, limit.into(), 1);
    }

    /// `detector` is a custom pattern's name or a built-in one; redactions are rare enough to
    /// copy it.
    pub fn redactions(&self, claudekey: &Arc<str>, detector: &str, n: u32) {
        Self::kind(
            &self.redactions,
            claudekey,
            detector.to_owned().into(),
            u64::from(n),
        );
    }

    pub fn injection(&self, claudekey: &Arc<str>, action: &'static str) {
        Self::kind(&self.injections, claudekey, action.into(), 1);
    }

    pub fn upstream_error(&self, claudekey: &Arc<str>, kind: &'static str) {
        Self::kind(&self.upstream_errors, claudekey, kind.into(), 1);
    }

    pub fn outcome(&self, claudekey: &Arc<str>, outcome: &'static str) {
        Self::kind(&self.outcomes, claudekey, outcome.into(), 1);
    }

    pub fn user_overflow(&self, claudekey: &Arc<str>) {
        Self::kind(
            &self.user_overflow,
            claudekey,
            "perUserRequestsPerHour".into(),
            1,
        );
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
            &"ns/a".into(),
            &"claude-x".into(),
            "messages",
            200,
            Duration::from_millis(3),
            &usage,
        );
        m.rate_limited(&"ns/a".into(), "tokensPerMinute");
        let text = m.encode();
        assert!(text.contains(r#"claudekey_proxy_requests_total{claudekey="ns/a",model="claude-x",endpoint="messages",status="2xx"} 1"#), "{text}");
        assert!(text.contains(r#"claudekey_proxy_tokens_total{claudekey="ns/a",model="claude-x",direction="input"} 10"#));
        assert!(text.contains(
            r#"claudekey_proxy_rate_limited_total{claudekey="ns/a",kind="tokensPerMinute"} 1"#
        ));
        assert!(text.contains("claudekey_proxy_request_duration_seconds_bucket"));
    }
}
