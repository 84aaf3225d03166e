//! Per-key usage from the Admin API's messages usage report, exported as token and estimated
//! cost gauges labelled by ClaudeKey (`claudekey="namespace/name"`, as on the proxy's metrics:
//! bounded by the objects that exist). The report counts every request made with the upstream
//! key, so traffic that bypassed the proxy shows up here and not in the proxy's counters.
//! Anthropic's cost report cannot group by API key, so cost is estimated from list prices.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};

use chrono::{DateTime, SecondsFormat, TimeDelta, Timelike, Utc};
use http::Method;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use serde::Deserialize;

use super::client::{AdminClient, AdminError, ApiKey, urlencode};
use super::hint::{Match, find_by_hint};

/// Tokens of one API key over a period.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KeyUsage {
    pub uncached_input_tokens: u64,
    pub output_tokens: u64,
    pub cache_read_input_tokens: u64,
    pub cache_creation_input_tokens: u64,
    /// Estimated USD at list prices; models without a known price add nothing.
    pub cost_usd: f64,
}

#[derive(Deserialize)]
struct Report {
    data: Vec<Bucket>,
    #[serde(default)]
    has_more: bool,
    #[serde(default)]
    next_page: Option<String>,
}

#[derive(Deserialize)]
struct Bucket {
    results: Vec<ResultRow>,
}

#[derive(Deserialize)]
struct ResultRow {
    #[serde(default)]
    api_key_id: Option<String>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    uncached_input_tokens: u64,
    #[serde(default)]
    output_tokens: u64,
    #[serde(default)]
    cache_read_input_tokens: u64,
    #[serde(default)]
    cache_creation: CacheCreation,
}

#[derive(Deserialize, Default)]
struct CacheCreation {
    #[serde(default)]
    ephemeral_5m_input_tokens: u64,
    #[serde(default)]
    ephemeral_1h_input_tokens: u64,
}

/// List prices in USD per million tokens (input, output) by model family; `None` = unknown.
pub fn price_per_mtok(model: &str) -> Option<(f64, f64)> {
    let m = model.to_ascii_lowercase();
    let table: &[(&str, (f64, f64))] = &[
        ("opus-4-5", (5.0, 25.0)),
        ("opus-4-6", (5.0, 25.0)),
        ("opus", (15.0, 75.0)),
        ("sonnet", (3.0, 15.0)),
        ("haiku-4", (1.0, 5.0)),
        ("3-5-haiku", (0.8, 4.0)),
        ("haiku", (0.25, 1.25)),
    ];
    table.iter().find(|(k, _)| m.contains(k)).map(|(_, p)| *p)
}

/// Sums the report rows per API key; cache writes cost 1.25x (5m) and 2x (1h) input, reads 0.1x.
fn fold(rows: impl IntoIterator<Item = ResultRow>, into: &mut BTreeMap<String, KeyUsage>) {
    for r in rows {
        let Some(id) = r.api_key_id else { continue };
        let u = into.entry(id).or_default();
        let cache_creation =
            r.cache_creation.ephemeral_5m_input_tokens + r.cache_creation.ephemeral_1h_input_tokens;
        u.uncached_input_tokens += r.uncached_input_tokens;
        u.output_tokens += r.output_tokens;
        u.cache_read_input_tokens += r.cache_read_input_tokens;
        u.cache_creation_input_tokens += cache_creation;
        if let Some((input, output)) = r.model.as_deref().and_then(price_per_mtok) {
            let input_equiv = r.uncached_input_tokens as f64
                + 1.25 * r.cache_creation.ephemeral_5m_input_tokens as f64
                + 2.0 * r.cache_creation.ephemeral_1h_input_tokens as f64
                + 0.1 * r.cache_read_input_tokens as f64;
            u.cost_usd += (input_equiv * input + r.output_tokens as f64 * output) / 1e6;
        }
    }
}

/// The coarsest bucket that still fits the window, so short windows stay exact and long ones
/// take few pages (the API allows 1440 minute, 168 hour and 31 day buckets per request).
fn bucket_width(window: TimeDelta) -> &'static str {
    if window <= TimeDelta::hours(24) {
        "1m"
    } else if window <= TimeDelta::days(7) {
        "1h"
    } else {
        "1d"
    }
}

impl AdminClient {
    /// Usage per API key between `from` and `to`, grouped by `api_key_id` and `model` (for the
    /// price), optionally only for `key_ids`. Follows `next_page`.
    pub async fn usage_by_key(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        key_ids: &[String],
    ) -> Result<BTreeMap<String, KeyUsage>, AdminError> {
        let mut base = format!(
            "/v1/organizations/usage_report/messages?starting_at={}&ending_at={}&bucket_width={}&group_by[]=api_key_id&group_by[]=model",
            urlencode(&from.to_rfc3339_opts(SecondsFormat::Secs, true)),
            urlencode(&to.to_rfc3339_opts(SecondsFormat::Secs, true)),
            bucket_width(to - from),
        );
        for id in key_ids {
            base.push_str(&format!("&api_key_ids[]={}", urlencode(id)));
        }
        let mut out = BTreeMap::new();
        let mut page: Option<String> = None;
        for _ in 0..1000 {
            let path = match &page {
                Some(p) => format!("{base}&page={}", urlencode(p)),
                None => base.clone(),
            };
            let report: Report = self
                .call(Method::GET, &path, None, "read the usage report")
                .await?;
            for bucket in report.data {
                fold(bucket.results, &mut out);
            }
            match (report.has_more, report.next_page) {
                (true, Some(next)) => page = Some(next),
                _ => return Ok(out),
            }
        }
        Err(AdminError::TooManyPages)
    }
}

/// The report window the gauges cover: the last hour of complete minutes before `now`.
/// An hour is short enough to show a leak within one poll and long enough to smooth the
/// report's few minutes of lag; `claudekey_upstream_usage_tokens / 3600` is a rate.
pub fn report_window(now: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
    let to = now
        .with_second(0)
        .and_then(|t| t.with_nanosecond(0))
        .unwrap_or(now);
    (to - TimeDelta::hours(1), to)
}

impl KeyUsage {
    /// Adds another key's usage: a ClaudeKey in its grace period has two upstream keys.
    pub fn add(&mut self, other: &KeyUsage) {
        self.uncached_input_tokens += other.uncached_input_tokens;
        self.output_tokens += other.output_tokens;
        self.cache_read_input_tokens += other.cache_read_input_tokens;
        self.cache_creation_input_tokens += other.cache_creation_input_tokens;
        self.cost_usd += other.cost_usd;
    }

    /// The summed usage of `ids` in a report (keys without rows used nothing).
    pub fn of(ids: &[String], report: &BTreeMap<String, KeyUsage>) -> KeyUsage {
        let mut sum = KeyUsage::default();
        for usage in ids.iter().filter_map(|id| report.get(id)) {
            sum.add(usage);
        }
        sum
    }
}

/// Why a ClaudeKey's upstream keys could not be told apart at Anthropic: its usage is not
/// exported rather than guessed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unmatched {
    #[error("no key at Anthropic has the hint {0}")]
    NotFound(String),
    #[error("several keys at Anthropic have the hint {hint}: {}", ids.join(", "))]
    Ambiguous { hint: String, ids: Vec<String> },
}

/// The Admin API ids of the keys with these hints; every hint must name exactly one key.
pub fn resolve_hints(keys: &[ApiKey], hints: &[String]) -> Result<Vec<String>, Unmatched> {
    hints
        .iter()
        .map(|hint| match find_by_hint(keys, hint, None) {
            Match::Unique(key) => Ok(key.id),
            Match::None => Err(Unmatched::NotFound(hint.clone())),
            Match::Ambiguous(ids) => Err(Unmatched::Ambiguous {
                hint: hint.clone(),
                ids,
            }),
        })
        .collect()
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KeyLabels {
    /// `namespace/name`, as on the proxy's metrics, so one query can join both.
    pub claudekey: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    pub claudekey: String,
    /// input, output, cache_read or cache_creation.
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PollLabels {
    /// ok, unmatched (hint not unique at Anthropic) or error (Admin API or admin key).
    pub result: &'static str,
}

const TOKEN_KINDS: [&str; 4] = ["input", "output", "cache_read", "cache_creation"];

/// Gauges of what Anthropic reports for each ClaudeKey's upstream keys over the last hour
/// ([`report_window`]), including traffic that bypassed the proxy.
#[derive(Clone, Default)]
pub struct UsageMetrics {
    pub tokens: Family<TokenLabels, Gauge<u64, AtomicU64>>,
    pub cost_usd: Family<KeyLabels, Gauge<f64, AtomicU64>>,
    pub polls: Family<PollLabels, Counter>,
    /// The ClaudeKeys that have series, so those of deleted ones can be dropped.
    exported: Arc<Mutex<BTreeSet<String>>>,
}

impl UsageMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "upstream_usage_tokens",
            "Tokens Anthropic reports for the ClaudeKey's upstream keys over the last hour",
            m.tokens.clone(),
        );
        registry.register(
            "upstream_cost_usd_estimate",
            "Estimated USD at list prices for the ClaudeKey's upstream keys over the last hour",
            m.cost_usd.clone(),
        );
        registry.register(
            "upstream_usage_polls",
            "Usage report reads per ClaudeKey by result",
            m.polls.clone(),
        );
        m
    }

    /// Counts one ClaudeKey's poll result.
    pub fn polled(&self, result: &'static str) {
        self.polls.get_or_create(&PollLabels { result }).inc();
    }

    /// Exports `usage` for the ClaudeKey `claudekey` (`namespace/name`).
    pub fn set(&self, claudekey: &str, usage: &KeyUsage) {
        for (kind, value) in TOKEN_KINDS.into_iter().zip([
            usage.uncached_input_tokens,
            usage.output_tokens,
            usage.cache_read_input_tokens,
            usage.cache_creation_input_tokens,
        ]) {
            self.tokens
                .get_or_create(&TokenLabels {
                    claudekey: claudekey.to_string(),
                    kind,
                })
                .set(value);
        }
        self.cost_usd
            .get_or_create(&KeyLabels {
                claudekey: claudekey.to_string(),
            })
            .set(usage.cost_usd);
        self.exported_set().insert(claudekey.to_string());
    }

    /// Drops a ClaudeKey's series: deleted, no admin key any more, or no longer matched.
    pub fn remove(&self, claudekey: &str) {
        for kind in TOKEN_KINDS {
            self.tokens.remove(&TokenLabels {
                claudekey: claudekey.to_string(),
                kind,
            });
        }
        self.cost_usd.remove(&KeyLabels {
            claudekey: claudekey.to_string(),
        });
        self.exported_set().remove(claudekey);
    }

    /// Drops the series of every ClaudeKey `keep` rejects, so labels stay bounded by live
    /// objects.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        let gone: Vec<String> = self
            .exported_set()
            .iter()
            .filter(|k| !keep(k))
            .cloned()
            .collect();
        for claudekey in gone {
            self.remove(&claudekey);
        }
    }

    fn exported_set(&self) -> MutexGuard<'_, BTreeSet<String>> {
        self.exported.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folds_rows_per_key_with_cost() {
        let rows: Vec<ResultRow> = serde_json::from_value(serde_json::json!([
            {"api_key_id":"k1","model":"claude-sonnet-4-5","uncached_input_tokens":1_000_000,
             "output_tokens":100_000,"cache_read_input_tokens":0,
             "cache_creation":{"ephemeral_5m_input_tokens":0,"ephemeral_1h_input_tokens":0}},
            {"api_key_id":"k1","model":"mystery-model","uncached_input_tokens":5,"output_tokens":5},
            {"api_key_id":null,"model":"claude-sonnet-4-5","uncached_input_tokens":9}
        ]))
        .unwrap();
        let mut out = BTreeMap::new();
        fold(rows, &mut out);
        assert_eq!(out.len(), 1);
        let k1 = &out["k1"];
        assert_eq!(k1.uncached_input_tokens, 1_000_005);
        assert_eq!(k1.output_tokens, 100_005);
        assert!((k1.cost_usd - 4.5).abs() < 1e-9, "{}", k1.cost_usd);
        assert_eq!(
            price_per_mtok("claude-3-5-haiku-20241022"),
            Some((0.8, 4.0))
        );
        assert_eq!(price_per_mtok("claude-opus-4-1"), Some((15.0, 75.0)));
    }

    #[test]
    fn window_is_the_last_hour_of_whole_minutes() {
        let now = DateTime::parse_from_rfc3339("2026-11-28T10:15:42.5Z")
            .unwrap()
            .with_timezone(&Utc);
        let (from, to) = report_window(now);
        assert_eq!(to.to_rfc3339(), "2026-11-28T10:15:00+00:00");
        assert_eq!(from.to_rfc3339(), "2026-11-28T09:15:00+00:00");
        assert_eq!(bucket_width(to - from), "1m");
        assert_eq!(bucket_width(TimeDelta::days(2)), "1h");
        assert_eq!(bucket_width(TimeDelta::days(30)), "1d");
    }

    fn key(id: &str, hint: &str, status: &str) -> ApiKey {
        serde_json::from_value(serde_json::json!({
            "id": id, "name": id, "status": status, "partial_key_hint": hint
        }))
        .unwrap()
    }

    #[test]
    fn hints_resolve_only_to_unique_keys() {
        let keys = [
            key("k1", "sk-ant-api03-aaa...1111", "active"),
            key("k2", "sk-ant-api03-bbb...2222", "inactive"),
            key("k3", "sk-ant-api03-ccc...3333", "active"),
            key("k4", "sk-ant-api03-ccc...3333", "active"),
            key("k5", "sk-ant-api03-ddd...4444", "archived"),
        ];
        let hints = |h: &[&str]| h.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            resolve_hints(
                &keys,
                &hints(&["sk-ant-api03-aaa...1111", "sk-ant-api03-bbb...2222"])
            ),
            Ok(vec!["k1".to_string(), "k2".to_string()]),
            "an inactive key in its grace period still has usage"
        );
        assert_eq!(
            resolve_hints(
                &keys,
                &hints(&["sk-ant-api03-aaa...1111", "sk-ant-api03-ccc...3333"])
            ),
            Err(Unmatched::Ambiguous {
                hint: "sk-ant-api03-ccc...3333".into(),
                ids: vec!["k3".into(), "k4".into()]
            })
        );
        assert_eq!(
            resolve_hints(&keys, &hints(&["sk-ant-api03-ddd...4444"])),
            Err(Unmatched::NotFound("sk-ant-api03-ddd...4444".into()))
        );
        assert_eq!(resolve_hints(&keys, &[]), Ok(vec![]));
    }

    #[test]
    fn usage_of_several_keys_is_summed() {
        let report = BTreeMap::from([
            (
                "k1".to_string(),
                KeyUsage {
                    uncached_input_tokens: 10,
                    output_tokens: 1,
                    cost_usd: 0.5,
                    ..KeyUsage::default()
                },
            ),
            (
                "k2".to_string(),
                KeyUsage {
                    uncached_input_tokens: 5,
                    cache_read_input_tokens: 3,
                    cost_usd: 0.25,
                    ..KeyUsage::default()
                },
            ),
        ]);
        let ids = ["k1".to_string(), "k2".to_string(), "k9".to_string()];
        let sum = KeyUsage::of(&ids, &report);
        assert_eq!(sum.uncached_input_tokens, 15);
        assert_eq!(sum.output_tokens, 1);
        assert_eq!(sum.cache_read_input_tokens, 3);
        assert!((sum.cost_usd - 0.75).abs() < 1e-12);
        assert_eq!(KeyUsage::of(&[], &report), KeyUsage::default());
    }

    fn encode(registry: &Registry) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
        text
    }

    #[test]
    fn gauges_are_dropped_for_claudekeys_that_are_gone() {
        let mut registry = Registry::with_prefix("claudekey");
        let m = UsageMetrics::register(&mut registry);
        let usage = KeyUsage {
            output_tokens: 42,
            ..KeyUsage::default()
        };
        m.set("team-a/bot", &usage);
        m.set("team-b/bot", &usage);
        let text = encode(&registry);
        assert!(
            text.contains(
                r#"claudekey_upstream_usage_tokens{claudekey="team-a/bot",kind="output"} 42"#
            ),
            "{text}"
        );
        m.retain(|k| k == "team-b/bot");
        let text = encode(&registry);
        assert!(!text.contains("team-a/bot"), "{text}");
        assert!(text.contains("team-b/bot"), "{text}");
    }
}
