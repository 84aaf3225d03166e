//! List prices per model, to settle spend budgets from real usage. Built in from Anthropic's
//! public pricing page (https://platform.claude.com/docs/en/about-claude/pricing, "Model
//! pricing", read 2026-12-02, USD per million tokens, 5-minute cache writes; the Opus 5.5,
//! Sonnet 5.x and Haiku 5.5 rows as announced with those models); `--price-table FILE` (chart
//! value `prices`) puts its entries before these, so the platform overrides or adds models.

use std::{collections::HashMap, path::Path, sync::Arc};

use arc_swap::ArcSwap;
use globset::{Glob, GlobSet, GlobSetBuilder};
use serde::Deserialize;

use super::budget::NANOS_PER_USD;
use crate::proxy::usage::Usage;

/// USD per million tokens of one model family.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Price {
    pub input: f64,
    pub output: f64,
    /// Prompt-cache writes (`cache_creation_input_tokens`).
    pub cache_write: f64,
    /// Prompt-cache reads (`cache_read_input_tokens`).
    pub cache_read: f64,
}

impl Price {
    /// What `usage` costs, in nano-USD (a token at $1/MTok is 1000 nano-USD).
    pub fn nanos(&self, usage: &Usage) -> u64 {
        let per_token = NANOS_PER_USD / 1e6;
        let usd_nanos = usage.input as f64 * self.input
            + usage.output as f64 * self.output
            + usage.cache_creation as f64 * self.cache_write
            + usage.cache_read as f64 * self.cache_read;
        (usd_nanos * per_token).round() as u64
    }
}

const fn price(input: f64, output: f64, cache_write: f64, cache_read: f64) -> Price {
    Price {
        input,
        output,
        cache_write,
        cache_read,
    }
}

/// Model globs, most specific first (the first match wins).
const BUILT_IN: &[(&str, Price)] = &[
    ("claude-fable-5-1*", price(10.0, 50.0, 12.50, 0.25)),
    ("claude-fable-*", price(10.0, 50.0, 12.50, 1.0)),
    ("claude-mythos-5-1*", price(10.0, 50.0, 12.50, 0.25)),
    ("claude-mythos-*", price(10.0, 50.0, 12.50, 1.0)),
    ("claude-opus-5-5*", price(4.0, 20.0, 5.0, 0.20)),
    ("claude-opus-5*", price(5.0, 25.0, 6.25, 0.50)),
    ("claude-opus-4-[5-9]*", price(5.0, 25.0, 6.25, 0.50)),
    ("claude-opus-4*", price(15.0, 75.0, 18.75, 1.50)),
    ("claude-3-opus*", price(15.0, 75.0, 18.75, 1.50)),
    ("claude-sonnet-5-5*", price(2.0, 10.0, 2.50, 0.10)),
    ("claude-sonnet-5*", price(2.0, 10.0, 2.50, 0.20)),
    ("claude-sonnet-4*", price(3.0, 15.0, 3.75, 0.30)),
    ("claude-3-7-sonnet*", price(3.0, 15.0, 3.75, 0.30)),
    ("claude-3-5-sonnet*", price(3.0, 15.0, 3.75, 0.30)),
    // The band of prompts up to 100k tokens; longer prompts are billed at five times this,
    // which the table cannot tell (a platform that sends them should override the entry).
    ("claude-haiku-5-5*", price(0.10, 0.50, 0.125, 0.01)),
    ("claude-haiku-4-5*", price(1.0, 5.0, 1.25, 0.10)),
    ("claude-3-5-haiku*", price(0.80, 4.0, 1.0, 0.08)),
    ("claude-3-haiku*", price(0.25, 1.25, 0.30, 0.03)),
];

/// A model no entry matches is charged at the highest list price, so a new or misspelled
/// model never spends a budget for free.
const UNKNOWN: Price = price(15.0, 75.0, 18.75, 1.50);

#[derive(Debug, thiserror::Error)]
pub enum PriceError {
    #[error("failed to read the price table {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("failed to parse the price table {path}: {message}")]
    Parse { path: String, message: String },
    #[error("failed to compile the price table's model glob {glob:?}: {source}")]
    Glob {
        glob: String,
        source: globset::Error,
    },
}

/// The price table file: `{ models: [{ model: GLOB, input, output, cacheWrite, cacheRead }],
/// unknown?: {...} }`, JSON or YAML.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TableFile {
    #[serde(default)]
    models: Vec<Entry>,
    #[serde(default)]
    unknown: Option<Price>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Entry {
    model: String,
    input: f64,
    output: f64,
    cache_write: f64,
    cache_read: f64,
}

/// Prices by model glob, first match wins. The globs are one set, matched in one pass (one
/// matcher per glob tried in turn cost ~2k instructions a request), and a model's price is
/// remembered once found: nearly every request names a model seen before, and a hash lookup is a
/// fraction of the set's pass, which also allocates its list of matches.
#[derive(Debug, Clone)]
pub struct PriceTable {
    globs: GlobSet,
    prices: Vec<Price>,
    unknown: Price,
    /// Models already priced; read without a lock, replaced whole on a new model.
    seen: Arc<ArcSwap<HashMap<Box<str>, Price>>>,
}

/// Model names remembered at most, and the longest remembered: names are the client's, so
/// past these a name is matched every time rather than kept (the models in use are a handful of
/// short names; a flood of long made-up ones must not pin memory or cost a copy of the map).
const SEEN_MODELS: usize = 64;
const SEEN_NAME_BYTES: usize = 64;

impl Default for PriceTable {
    fn default() -> Self {
        Self::with(&[], None).unwrap_or_else(|_| unreachable!("the built-in globs compile"))
    }
}

impl PriceTable {
    fn with(overrides: &[(String, Price)], unknown: Option<Price>) -> Result<Self, PriceError> {
        let built_in = BUILT_IN.iter().map(|(g, p)| (g.to_string(), *p));
        let mut globs = GlobSetBuilder::new();
        let mut prices = Vec::new();
        for (glob, price) in overrides.iter().cloned().chain(built_in) {
            let compiled = Glob::new(&glob).map_err(|source| PriceError::Glob { glob, source })?;
            globs.add(compiled);
            prices.push(price);
        }
        let globs = globs.build().map_err(|source| PriceError::Glob {
            glob: "(the whole table)".into(),
            source,
        })?;
        Ok(Self {
            globs,
            prices,
            unknown: unknown.unwrap_or(UNKNOWN),
            seen: Arc::default(),
        })
    }

    /// The built-in table with `text`'s entries first (JSON or YAML).
    pub fn parse(text: &str, path: &str) -> Result<Self, PriceError> {
        let file: TableFile = serde_yaml::from_str(text).map_err(|e| PriceError::Parse {
            path: path.into(),
            message: e.to_string(),
        })?;
        let overrides: Vec<(String, Price)> = file
            .models
            .into_iter()
            .map(|e| {
                (
                    e.model,
                    price(e.input, e.output, e.cache_write, e.cache_read),
                )
            })
            .collect();
        Self::with(&overrides, file.unknown)
    }

    pub fn load(path: &Path) -> Result<Self, PriceError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| PriceError::Read {
            path: shown.clone(),
            source,
        })?;
        Self::parse(&text, &shown)
    }

    /// The price of `model` (`None`: the request named none, e.g. a file upload).
    pub fn price(&self, model: Option<&str>) -> Price {
        let Some(model) = model else {
            return self.unknown;
        };
        if let Some(price) = self.seen.load().get(model) {
            return *price;
        }
        let price = self.matched(model);
        self.remember(model, price);
        price
    }

    /// The first entry whose glob matches `model` (indices come in table order).
    fn matched(&self, model: &str) -> Price {
        self.globs
            .matches(model)
            .first()
            .map_or(self.unknown, |&i| self.prices[i])
    }

    fn remember(&self, model: &str, price: Price) {
        if model.len() > SEEN_NAME_BYTES || self.seen.load().len() >= SEEN_MODELS {
            return;
        }
        self.seen.rcu(|seen| {
            let mut seen = HashMap::clone(seen);
            if seen.len() < SEEN_MODELS {
                seen.insert(model.into(), price);
            }
            seen
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(input: u64, output: u64, write: u64, read: u64) -> Usage {
        Usage {
            input,
            output,
            cache_creation: write,
            cache_read: read,
        }
    }

    #[test]
    fn every_kind_of_token_at_its_list_price() {
        let table = PriceTable::default();
        // Sonnet 4.5: $3 in, $15 out, $3.75 cache write, $0.30 cache read per MTok.
        let cost = table
            .price(Some("claude-sonnet-4-5-20250929"))
            .nanos(&usage(1_000_000, 100_000, 10_000, 1_000_000));
        let usd = 3.0 + 1.5 + 0.0375 + 0.30;
        assert_eq!(cost, (usd * NANOS_PER_USD).round() as u64);
        // One token of Haiku 3 cache read: $0.03/MTok = 30 nano-USD, exactly.
        assert_eq!(
            table
                .price(Some("claude-3-haiku-20240307"))
                .nanos(&usage(0, 0, 0, 1)),
            30
        );
    }

    #[test]
    fn most_specific_family_first_and_unknown_at_the_top_price() {
        let table = PriceTable::default();
        assert_eq!(table.price(Some("claude-opus-4-5-20251101")).input, 5.0);
        assert_eq!(table.price(Some("claude-opus-4-1-20250805")).input, 15.0);
        assert_eq!(table.price(Some("claude-haiku-4-5")).output, 5.0);
        assert_eq!(table.price(Some("claude-opus-4-8")).input, 5.0);
        assert_eq!(table.price(Some("claude-opus-5-5")).input, 4.0);
        assert_eq!(table.price(Some("claude-opus-5")).input, 5.0);
        assert_eq!(table.price(Some("claude-sonnet-5-5")).cache_read, 0.10);
        assert_eq!(table.price(Some("claude-sonnet-5")).cache_read, 0.20);
        assert_eq!(table.price(Some("claude-fable-5-1")).cache_read, 0.25);
        assert_eq!(table.price(Some("gpt-4o")), UNKNOWN);
        assert_eq!(table.price(None), UNKNOWN);
    }

    #[test]
    fn a_remembered_price_is_the_matched_one_and_a_flood_of_names_is_not_kept() {
        let table = PriceTable::default();
        for _ in 0..2 {
            assert_eq!(table.price(Some("claude-opus-4-1-20250805")).input, 15.0);
            assert_eq!(table.price(Some("claude-opus-4-5-20251101")).input, 5.0);
            assert_eq!(table.price(Some("gpt-4o")), UNKNOWN);
        }
        assert_eq!(table.seen.load().len(), 3);
        for n in 0..1_000 {
            let model = format!("claude-haiku-4-5-{n}");
            assert_eq!(table.price(Some(&model)).output, 5.0);
        }
        assert_eq!(table.seen.load().len(), SEEN_MODELS);
        let long = format!("claude-haiku-4-5-{}", "x".repeat(SEEN_NAME_BYTES));
        let fresh = PriceTable::default();
        assert_eq!(fresh.price(Some(&long)).output, 5.0);
        assert!(
            fresh.seen.load().is_empty(),
            "a long name is priced, not kept"
        );
        // Past the bound names are still priced by their glob.
        assert_eq!(table.price(Some("claude-3-haiku-x")).input, 0.25);
        assert_eq!(table.price(Some("claude-opus-4-1-20250805")).input, 15.0);
    }

    #[test]
    fn a_file_overrides_and_adds_models() {
        let text = r#"
models:
  - { model: "claude-sonnet-4*", input: 2, output: 10, cacheWrite: 2.5, cacheRead: 0.2 }
  - { model: "my-fine-tune", input: 1, output: 1, cacheWrite: 1, cacheRead: 1 }
unknown: { input: 100, output: 100, cacheWrite: 100, cacheRead: 100 }
"#;
        let table = PriceTable::parse(text, "prices.yaml").unwrap();
        assert_eq!(table.price(Some("claude-sonnet-4-5")).input, 2.0);
        assert_eq!(table.price(Some("my-fine-tune")).input, 1.0);
        assert_eq!(table.price(Some("claude-haiku-4-5")).input, 1.0);
        assert_eq!(table.price(Some("nope")).input, 100.0);
        // JSON is YAML too; unknown fields and bad globs are errors that name the file.
        let json =
            r#"{"models":[{"model":"x","input":1,"output":1,"cacheWrite":1,"cacheRead":1}]}"#;
        assert!(PriceTable::parse(json, "p.json").is_ok());
        let typo = r#"{"models":[{"model":"x","inptu":1}]}"#;
        assert!(
            PriceTable::parse(typo, "p.json")
                .unwrap_err()
                .to_string()
                .contains("p.json")
        );
        let glob =
            r#"{"models":[{"model":"[","input":1,"output":1,"cacheWrite":1,"cacheRead":1}]}"#;
        assert!(PriceTable::parse(glob, "p.json").is_err());
    }
}
