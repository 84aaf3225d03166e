//! Prometheus metrics of the proxy. Labels are bounded: ClaudeKey names come from config, models
//! are the scope's allowlist entries (or `other`), kinds and outcomes are fixed sets. The admin
//! listener that serves them is `admin.rs`.
//!
//! A finished request of a known tenant counts into that tenant's [`Series`], taken from the
//! families once. Other counts look up their series by a label set built on the spot, so label
//! values are shared (`Arc<str>` from the tenant's config) or static: building one copies
//! pointers and allocates nothing. Only a new series clones its label set into the family.

use std::{
    borrow::Cow,
    sync::{Arc, Mutex},
    time::Duration,
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::Histogram,
    },
    registry::{Registry, Unit},
};

use super::{limits::LimitsMetrics, usage::Usage};
use crate::body_budget::BodyBudget;

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
    audit_waits: Counter,
    client_connections_refused: Counter,
    audit_waiting: Gauge,
    audit_write_failures: Counter,
    /// Fallback state and spend, written by the limiter itself.
    pub limits: LimitsMetrics,
}

/// What one finished request adds to the metrics.
pub struct Finished<'a> {
    pub claudekey: &'a Arc<str>,
    pub model: &'a Arc<str>,
    pub endpoint: &'static str,
    pub status: u16,
    pub outcome: &'static str,
    pub elapsed: Duration,
    pub usage: &'a Usage,
}

/// One ClaudeKey's series of the per-request metrics, each taken from its family on first use.
/// A request then finds its series by comparing a few short strings under one uncontended lock,
/// where the families hash the whole label set with SipHash under their own lock, four or five
/// times a request (about 3k instructions). Kept by the tenant: a reload starts an empty one,
/// and every label set here is bounded as the families' are (model labels are allowlist
/// entries, `other` or `none`).
#[derive(Default, Debug)]
pub struct Series(Mutex<SeriesCache>);

/// Model label, endpoint and status class.
type RequestKey = (Arc<str>, &'static str, &'static str);

#[derive(Default, Debug)]
struct SeriesCache {
    requests: Vec<(RequestKey, Counter)>,
    latency: Vec<(&'static str, Histogram)>,
    tokens: Vec<((Arc<str>, &'static str), Counter)>,
    outcomes: Vec<(&'static str, Counter)>,
}

/// The series whose key `is`, or the one `first` takes from its family (then kept).
fn cached<K, M>(
    cache: &mut Vec<(K, M)>,
    is: impl Fn(&K) -> bool,
    first: impl FnOnce() -> (K, M),
) -> &M {
    let at = match cache.iter().position(|(k, _)| is(k)) {
        Some(at) => at,
        None => {
            cache.push(first());
            cache.len() - 1
        }
    };
    &cache[at].1
}

fn status_class(status: u16) -> &'static str {
    match status {
        200..=299 => "2xx",
        400..=499 => "4xx",
        500..=599 => "5xx",
        _ => "other",
    }
}

const TOKEN_DIRECTIONS: [&str; 4] = ["input", "output", "cacheCreation", "cacheRead"];

fn token_counts(usage: &Usage) -> [u64; 4] {
    [
        usage.input,
        usage.output,
        usage.cache_creation,
        usage.cache_read,
    ]
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
            audit_waits: Counter::default(),
            client_connections_refused: Counter::default(),
            audit_waiting: Gauge::default(),
            audit_write_failures: Counter::default(),
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
        registry.register(
            "client_connections_refused",
            "Connections closed on accept because their client address already had the per-client maximum open (a gateway's is a quarter of its 4,096)",
            m.client_connections_refused.clone(),
        );
        registry.register(
            "audit_queue_full",
            "Requests that had to wait to start because the audit writer's queue was full: the audit log (file or stdout) is taking lines slower than requests end, and requests are held back to its pace",
            m.audit_waits.clone(),
        );
        registry.register(
            "audit_waiting_requests",
            "Requests waiting right now to start because the audit writer's queue is full: above 0 for long, the audit log has stopped taking lines",
            m.audit_waiting.clone(),
        );
        registry.register(
            "audit_write_failures",
            "Tries at writing the audit log that failed (a full disk, a broken log pipe): the lines are kept and written again, and requests wait once the queue is full",
            m.audit_write_failures.clone(),
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
    /// Reports the bytes `budget` holds on every scrape: how close the proxy is to refusing
    /// request bodies with a 503.
    pub fn watch_body_budget(&mut self, budget: BodyBudget) {
        self.registry
            .register_collector(Box::new(BodyBudgetCollector(budget)));
    }
}

/// One request among those waiting for the audit writer's queue.
pub struct AuditWait(Gauge);

impl Drop for AuditWait {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The body budget's level and size, read at scrape time (nothing on the request path).
#[derive(Debug)]
struct BodyBudgetCollector(BodyBudget);

impl Collector for BodyBudgetCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let gauges = [
            (
                "body_budget_used",
                "Bytes of request bodies and their parsed JSON held in the body budget",
                self.0.used(),
            ),
            (
                "body_budget_limit",
                "Bytes the body budget holds at most (--body-budget-mib)",
                self.0.limits().total,
            ),
        ];
        for (name, help, bytes) in gauges {
            let gauge = ConstGauge::new(i64::try_from(bytes).unwrap_or(i64::MAX));
            let metric =
                encoder.encode_descriptor(name, help, Some(&Unit::Bytes), gauge.metric_type())?;
            gauge.encode(metric)?;
        }
        Ok(())
    }
}

fn request_labels(r: &Finished<'_>, status: &'static str) -> RequestLabels {
    RequestLabels {
        claudekey: r.claudekey.clone(),
        model: r.model.clone(),
        endpoint: r.endpoint,
        status,
    }
}

fn latency_labels(r: &Finished<'_>) -> LatencyLabels {
    LatencyLabels {
        claudekey: r.claudekey.clone(),
        endpoint: r.endpoint,
    }
}

fn token_labels(r: &Finished<'_>, direction: &'static str) -> TokenLabels {
    TokenLabels {
        claudekey: r.claudekey.clone(),
        model: r.model.clone(),
        direction,
    }
}

fn kind_labels(claudekey: &Arc<str>, kind: Cow<'static, str>) -> KindLabels {
    KindLabels {
        claudekey: claudekey.clone(),
        kind,
    }
}

impl Metrics {
    /// Counts a finished request: its status class, latency, tokens and outcome. `series` is
    /// its tenant's (none before authentication), which spares the family lookups.
    pub fn finished(&self, series: Option<&Series>, r: &Finished<'_>) {
        let Some(series) = series else {
            return self.finished_uncached(r);
        };
        let class = status_class(r.status);
        let mut cache = series.0.lock().unwrap_or_else(|p| p.into_inner());
        let cache = &mut *cache;
        cached(
            &mut cache.requests,
            |(model, endpoint, status)| {
                model == r.model && *endpoint == r.endpoint && *status == class
            },
            || {
                let labels = request_labels(r, class);
                let counter = self.requests.get_or_create(&labels).clone();
                ((labels.model, labels.endpoint, class), counter)
            },
        )
        .inc();
        cached(
            &mut cache.latency,
            |endpoint| *endpoint == r.endpoint,
            || {
                let histogram = self.latency.get_or_create(&latency_labels(r)).clone();
                (r.endpoint, histogram)
            },
        )
        .observe(r.elapsed.as_secs_f64());
        for (direction, n) in TOKEN_DIRECTIONS.into_iter().zip(token_counts(r.usage)) {
            if n > 0 {
                cached(
                    &mut cache.tokens,
                    |(model, d)| model == r.model && *d == direction,
                    || {
                        let labels = token_labels(r, direction);
                        let counter = self.tokens.get_or_create(&labels).clone();
                        ((labels.model, direction), counter)
                    },
                )
                .inc_by(n);
            }
        }
        cached(
            &mut cache.outcomes,
            |outcome| *outcome == r.outcome,
            || {
                let labels = kind_labels(r.claudekey, r.outcome.into());
                (r.outcome, self.outcomes.get_or_create(&labels).clone())
            },
        )
        .inc();
    }

    fn finished_uncached(&self, r: &Finished<'_>) {
        let class = status_class(r.status);
        self.requests.get_or_create(&request_labels(r, class)).inc();
        self.latency
            .get_or_create(&latency_labels(r))
            .observe(r.elapsed.as_secs_f64());
        for (direction, n) in TOKEN_DIRECTIONS.into_iter().zip(token_counts(r.usage)) {
            if n > 0 {
                self.tokens
                    .get_or_create(&token_labels(r, direction))
                    .inc_by(n);
            }
        }
        self.outcome(r.claudekey, r.outcome);
    }

    fn kind(
        family: &Family<KindLabels, Counter>,
        claudekey: &Arc<str>,
        kind: Cow<'static, str>,
        n: u64,
    ) {
        family
            .get_or_create(&kind_labels(claudekey, kind))
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

    /// A connection was closed on accept: its client address had the per-client maximum open.
    pub fn client_connection_refused(&self) {
        self.client_connections_refused.inc();
    }

    /// A request has to wait to start: the audit writer's queue is full. Counted now, and
    /// among the waiting until the guard is dropped (it got in, or its client went away).
    pub fn audit_wait(&self) -> AuditWait {
        self.audit_waits.inc();
        self.audit_waiting.inc();
        AuditWait(self.audit_waiting.clone())
    }

    /// The counter the audit writer thread adds its failed writes to.
    pub fn audit_write_failures(&self) -> Counter {
        self.audit_write_failures.clone()
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

    fn finished<'a>(
        claudekey: &'a Arc<str>,
        model: &'a Arc<str>,
        endpoint: &'static str,
        status: u16,
        usage: &'a Usage,
    ) -> Finished<'a> {
        Finished {
            claudekey,
            model,
            endpoint,
            status,
            outcome: "completed",
            elapsed: Duration::from_millis(3),
            usage,
        }
    }

    #[test]
    fn encodes_requests_and_tokens() {
        let m = Metrics::default();
        let usage = Usage {
            input: 10,
            output: 5,
            ..Default::default()
        };
        let (key, model) = ("ns/a".into(), "claude-x".into());
        m.finished(None, &finished(&key, &model, "messages", 200, &usage));
        m.rate_limited(&"ns/a".into(), "tokensPerMinute");
        let text = m.encode();
        assert!(text.contains(r#"claudekey_proxy_requests_total{claudekey="ns/a",model="claude-x",endpoint="messages",status="2xx"} 1"#), "{text}");
        assert!(text.contains(r#"claudekey_proxy_tokens_total{claudekey="ns/a",model="claude-x",direction="input"} 10"#));
        assert!(text.contains(
            r#"claudekey_proxy_rate_limited_total{claudekey="ns/a",kind="tokensPerMinute"} 1"#
        ));
        assert!(text.contains(
            r#"claudekey_proxy_request_outcomes_total{claudekey="ns/a",kind="completed"} 1"#
        ));
        assert!(text.contains("claudekey_proxy_request_duration_seconds_bucket"));
    }

    /// A tenant's cached series are the families' own: the exposition is the same whichever way
    /// a request is counted, and requests that differ in any label never share a series.
    #[test]
    fn a_tenants_series_count_what_the_families_count() {
        let (by_family, by_series) = (Metrics::default(), Metrics::default());
        let series = Series::default();
        let key: Arc<str> = "ns/a".into();
        // Equal model labels from different allocations (a reload) are one series.
        let (sonnet, sonnet_again, haiku) = (
            "claude-sonnet-4-*".into(),
            "claude-sonnet-4-*".into(),
            "claude-haiku-4-*".into(),
        );
        let usage = Usage {
            input: 7,
            output: 3,
            cache_read: 2,
            ..Default::default()
        };
        let none = Usage::default();
        let requests = [
            finished(&key, &sonnet, "messages", 200, &usage),
            finished(&key, &sonnet_again, "messages", 200, &usage),
            finished(&key, &haiku, "messages", 200, &usage),
            finished(&key, &sonnet, "countTokens", 200, &usage),
            finished(&key, &sonnet, "messages", 429, &none),
            Finished {
                outcome: "refused",
                ..finished(&key, &sonnet, "messages", 503, &none)
            },
        ];
        for r in &requests {
            by_family.finished(None, r);
            by_series.finished(Some(&series), r);
            by_series.finished(Some(&series), r);
            by_family.finished(None, r);
        }
        // (A family encodes its series in its hash map's order: compare the lines as sets.)
        let lines = |m: &Metrics| {
            let mut lines: Vec<String> = m.encode().lines().map(str::to_owned).collect();
            lines.sort();
            lines
        };
        assert_eq!(lines(&by_series), lines(&by_family));
        let text = by_series.encode();
        assert!(text.contains(r#"claudekey_proxy_requests_total{claudekey="ns/a",model="claude-sonnet-4-*",endpoint="messages",status="2xx"} 4"#), "{text}");
        assert!(text.contains(r#"claudekey_proxy_tokens_total{claudekey="ns/a",model="claude-haiku-4-*",direction="cacheRead"} 4"#), "{text}");
        assert!(
            text.contains(
                r#"claudekey_proxy_request_outcomes_total{claudekey="ns/a",kind="refused"} 2"#
            ),
            "{text}"
        );
    }
}
