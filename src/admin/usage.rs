//! Per-key usage from the Admin API's messages usage report, exported as token and estimated
//! cost gauges labelled by ClaudeKey (namespace/name: bounded by the objects that exist).
//! Anthropic's cost report cannot group by API key, so cost is estimated from list prices.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;

use chrono::{DateTime, SecondsFormat, Utc};
use http::Method;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{family::Family, gauge::Gauge},
    registry::Registry,
};
use serde::Deserialize;

use super::client::{AdminClient, AdminError, urlencode};

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
            "/v1/organizations/usage_report/messages?starting_at={}&ending_at={}&bucket_width=1d&group_by[]=api_key_id&group_by[]=model",
            urlencode(&from.to_rfc3339_opts(SecondsFormat::Secs, true)),
            urlencode(&to.to_rfc3339_opts(SecondsFormat::Secs, true)),
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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KeyLabels {
    pub namespace: String,
    pub name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    pub namespace: String,
    pub name: String,
    /// input, output, cache_read or cache_creation.
    pub kind: &'static str,
}

/// Gauges of what Anthropic reports for each ClaudeKey's upstream key over the report window,
/// including traffic that bypassed the proxy.
#[derive(Clone, Default)]
pub struct UsageMetrics {
    pub tokens: Family<TokenLabels, Gauge<u64, AtomicU64>>,
    pub cost_usd: Family<KeyLabels, Gauge<f64, AtomicU64>>,
}

impl UsageMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "upstream_usage_tokens",
            "Tokens Anthropic reports for the ClaudeKey's upstream key over the report window",
            m.tokens.clone(),
        );
        registry.register(
            "upstream_cost_usd_estimate",
            "Estimated USD at list prices for the ClaudeKey's upstream key over the report window",
            m.cost_usd.clone(),
        );
        m
    }

    pub fn set(&self, namespace: &str, name: &str, usage: &KeyUsage) {
        for (kind, value) in [
            ("input", usage.uncached_input_tokens),
            ("output", usage.output_tokens),
            ("cache_read", usage.cache_read_input_tokens),
            ("cache_creation", usage.cache_creation_input_tokens),
        ] {
            self.tokens
                .get_or_create(&TokenLabels {
                    namespace: namespace.to_string(),
                    name: name.to_string(),
                    kind,
                })
                .set(value);
        }
        self.cost_usd
            .get_or_create(&KeyLabels {
                namespace: namespace.to_string(),
                name: name.to_string(),
            })
            .set(usage.cost_usd);
    }

    /// Drops a deleted ClaudeKey's series, so labels stay bounded by live objects.
    pub fn remove(&self, namespace: &str, name: &str) {
        for kind in ["input", "output", "cache_read", "cache_creation"] {
            self.tokens.remove(&TokenLabels {
                namespace: namespace.to_string(),
                name: name.to_string(),
                kind,
            });
        }
        self.cost_usd.remove(&KeyLabels {
            namespace: namespace.to_string(),
            name: name.to_string(),
        });
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
}
