//! PII redaction: built-in detectors (email, US SSN, phone, Luhn-checked card numbers) plus a
//! ClaudeKey's custom regexes, compiled once per config, and a streaming form for SSE text deltas.

use std::sync::{Arc, LazyLock};

use regex::{Regex, RegexBuilder, RegexSet, RegexSetBuilder};
use regex_automata::util::syntax;

use super::interned::Interned;
use crate::crd::{DataProtectionSpec, Detector};

/// One compiled [`Redactor`] per distinct detector list, shared by the tenants that use it.
static REDACTORS: LazyLock<Interned<Redactor>> = LazyLock::new(Interned::default);

/// A pattern may be at most this many bytes compiled, so a custom regex cannot exhaust memory.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// All of a policy's patterns together may be at most this many bytes compiled (their one-pass
/// set, built before any of them alone): a ClaudeKey listing many large patterns is refused
/// before a shared gateway has compiled them one by one (1,000 copies of `\w{10}` would have
/// been ~550 MB). What a policy then costs a process is about three and a half times this (the
/// set, each pattern alone, the prescreen): measured in a gateway, 3.6 MB for the largest list
/// this admits (two `\w{10}`), where 4 MiB admitted seven at 12 MB; patterns of ASCII classes
/// and literals cost tens of KB. The controller's cap on distinct lists per namespace
/// (`--max-pattern-lists-per-namespace`) counts in units of this.
const PATTERNS_SIZE_LIMIT: usize = REGEX_SIZE_LIMIT;

/// The lazy DFA of each compiled pattern (and of the set) keeps the states it has built in a
/// cache, one per thread searching at the time, of 2 MiB by default. A namespace writes the
/// patterns and sends the text, so it could fill every cache of every pattern it has: measured,
/// four tenants with two `\w{10}` each, 20 requests of 390 KB of mixed-script text, grew a
/// gateway by ~75 MB more than ASCII patterns did. At this size a cache that fills is cleared
/// and rebuilt, or the search falls back to the slower engines; what a search finds never
/// changes.
pub const DFA_CACHE_LIMIT: usize = 256 << 10;

/// How much text the streaming redactor holds back, in bytes. A match longer than this that is
/// split across deltas could be missed; every built-in detector's matches are shorter, except
/// e-mail addresses longer than this, which are rare.
pub const STREAM_HOLD_BYTES: usize = 128;

#[derive(Debug, thiserror::Error)]
pub enum RedactError {
    #[error("failed to compile custom pattern {name}: {source}")]
    Pattern { name: String, source: regex::Error },
    #[error(
        "the patterns together compile to more than {} MiB: use fewer or smaller ones \
         (a counted repetition of a Unicode class, such as \\w{{10}}, is large; \
         (?-u:\\w) is small)",
        PATTERNS_SIZE_LIMIT >> 20
    )]
    TooLarge,
}

/// A rule before it is compiled.
struct Source<'s> {
    name: &'s str,
    pattern: &'s str,
    validate: Option<Validator>,
}

struct Rule {
    name: String,
    placeholder: String,
    regex: Regex,
    /// Extra check a regex cannot express (Luhn, reserved SSN ranges).
    validate: Option<fn(&str) -> bool>,
}

/// The compiled detectors of one policy. Built once per config load, shared by every request.
pub struct Redactor {
    rules: Vec<Rule>,
    /// One pass over the text says which rules can match at all; most text matches none.
    prefilter: RegexSet,
}

/// Redactions made, per rule index of the [`Redactor`] that made them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts(Vec<u32>);

impl Counts {
    fn add(&mut self, rule: usize) {
        if self.0.len() <= rule {
            self.0.resize(rule + 1, 0);
        }
        self.0[rule] += 1;
    }

    pub fn total(&self) -> u32 {
        self.0.iter().sum()
    }

    /// `(detector name, count)` for every detector that fired.
    pub fn named<'a>(
        &'a self,
        redactor: &'a Redactor,
    ) -> impl Iterator<Item = (&'a str, u32)> + 'a {
        self.0
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .filter_map(|(i, n)| redactor.rules.get(i).map(|r| (r.name.as_str(), *n)))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Found {
    start: usize,
    end: usize,
    rule: usize,
}

impl Redactor {
    /// The redactor of `spec`, shared with every tenant whose detectors are the same.
    pub fn shared(spec: &DataProtectionSpec) -> Result<Arc<Self>, RedactError> {
        REDACTORS.get_or_compile(Self::key(spec), || Self::new(spec))
    }

    /// What tells one compiled redactor from another: specs with equal keys share one.
    pub fn key(spec: &DataProtectionSpec) -> String {
        serde_json::to_string(&(&spec.redact, &spec.custom_patterns)).expect("detectors serialize")
    }

    pub fn new(spec: &DataProtectionSpec) -> Result<Self, RedactError> {
        let sources = sources(spec);
        let prefilter = prefilter(&sources)?;
        let rules = sources
            .iter()
            .map(|source| {
                Ok(Rule {
                    placeholder: format!("[REDACTED:{}]", source.name),
                    name: source.name.to_string(),
                    regex: compile(source)?,
                    validate: source.validate,
                })
            })
            .collect::<Result<_, RedactError>>()?;
        Ok(Self { rules, prefilter })
    }

    /// Whether `spec`'s detectors compile within the limits, as [`Redactor::new`] checks them,
    /// holding at most one compiled pattern at a time: the controller's check of a spec.
    pub fn check(spec: &DataProtectionSpec) -> Result<(), RedactError> {
        let sources = sources(spec);
        drop(prefilter(&sources)?);
        sources
            .iter()
            .try_for_each(|source| compile(source).map(drop))
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The rules' patterns, in priority order (what the prefilter and the prescreen match).
    pub fn patterns(&self) -> impl Iterator<Item = &str> {
        self.prefilter.patterns().iter().map(String::as_str)
    }

    /// Names of the rules, by index, for audit lines and metrics.
    pub fn rule_names(&self) -> impl Iterator<Item = &str> {
        self.rules.iter().map(|r| r.name.as_str())
    }

    /// Whether [`Redactor::redact`] might rewrite the text; `false` means it certainly would
    /// not. `is_match` stops at the first hit and needs no overlapping search, so the common
    /// case (no PII at all) costs one fast pass.
    pub fn may_rewrite(&self, text: &str) -> bool {
        !self.rules.is_empty() && self.prefilter.is_match(text)
    }

    /// Non-overlapping matches, in order; on overlap the earlier, then longer, then
    /// higher-priority match wins.
    fn find(&self, text: &str) -> Vec<Found> {
        if !self.may_rewrite(text) {
            return Vec::new();
        }
        let candidates = self.prefilter.matches(text);
        let mut all = Vec::new();
        for rule in candidates.iter() {
            let r = &self.rules[rule];
            for m in r.regex.find_iter(text) {
                if m.is_empty() || r.validate.is_some_and(|ok| !ok(m.as_str())) {
                    continue;
                }
                all.push(Found {
                    start: m.start(),
                    end: m.end(),
                    rule,
                });
            }
        }
        all.sort_by_key(|f| (f.start, std::cmp::Reverse(f.end), f.rule));
        let mut kept: Vec<Found> = Vec::with_capacity(all.len());
        for f in all {
            if kept.last().is_none_or(|last| f.start >= last.end) {
                kept.push(f);
            }
        }
        kept
    }

    fn apply(&self, text: &str, found: &[Found], counts: &mut Counts) -> String {
        let mut out = String::with_capacity(text.len());
        let mut at = 0;
        for f in found {
            out.push_str(&text[at..f.start]);
            out.push_str(&self.rules[f.rule].placeholder);
            counts.add(f.rule);
            at = f.end;
        }
        out.push_str(&text[at..]);
        out
    }

    /// The text with every match replaced by `[REDACTED:<name>]`, or `None` when nothing matched
    /// (so callers can forward the original bytes untouched).
    pub fn redact(&self, text: &str, counts: &mut Counts) -> Option<String> {
        let found = self.find(text);
        if found.is_empty() {
            None
        } else {
            Some(self.apply(text, &found, counts))
        }
    }
}

/// Redacts a text that arrives in pieces (SSE `text_delta`s): it holds back the last
/// [`STREAM_HOLD_BYTES`] and any match that reaches into them, so a pattern split across deltas
/// is still caught, and emits everything before that as soon as it is final.
#[derive(Default)]
pub struct StreamRedactor {
    carry: String,
}

impl StreamRedactor {
    /// Adds a piece and returns the text that is now safe to send (possibly empty).
    pub fn push(&mut self, redactor: &Redactor, piece: &str, counts: &mut Counts) -> String {
        self.carry.push_str(piece);
        let found = redactor.find(&self.carry);
        let mut cut = settle_point(&self.carry);
        // A match reaching past the cut may still grow: hold it back whole.
        if let Some(f) = found.iter().find(|f| f.end > cut) {
            cut = cut.min(f.start);
        }
        let settled: Vec<Found> = found.into_iter().filter(|f| f.end <= cut).collect();
        let out = redactor.apply(&self.carry[..cut], &settled, counts);
        self.carry.drain(..cut);
        out
    }

    /// The held-back rest, redacted, at the end of the text block.
    pub fn finish(&mut self, redactor: &Redactor, counts: &mut Counts) -> String {
        let rest = std::mem::take(&mut self.carry);
        redactor.redact(&rest, counts).unwrap_or(rest)
    }
}

/// Where the held-back tail starts: [`STREAM_HOLD_BYTES`] before the end, moved back to just
/// after a whitespace when one is near, so the next match starts with the same left context
/// (`\b`) it would have in the whole text.
fn settle_point(text: &str) -> usize {
    let cut = floor_char_boundary(text, text.len().saturating_sub(STREAM_HOLD_BYTES));
    let window = floor_char_boundary(text, cut.saturating_sub(256));
    match text[window..cut].rfind(char::is_whitespace) {
        Some(i) => window + i + text[window + i..].chars().next().map_or(1, char::len_utf8),
        None => cut,
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// A check a regex cannot express.
type Validator = fn(&str) -> bool;

/// The rules of `spec` in priority order (when matches overlap, the most specific detectors
/// first), not yet compiled.
fn sources<'s>(spec: &'s DataProtectionSpec) -> Vec<Source<'s>> {
    let builtins = [
        Detector::CreditCard,
        Detector::Ssn,
        Detector::Email,
        Detector::Phone,
    ]
    .into_iter()
    .filter(|detector| spec.redact.contains(detector))
    .map(builtin);
    let custom = spec.custom_patterns.iter().map(|custom| Source {
        name: &custom.name,
        pattern: &custom.regex,
        validate: None,
    });
    builtins.chain(custom).collect()
}

/// The one-pass set of every pattern, built first: its size bounds them all together. A
/// syntax error is blamed on its pattern, found by parsing each (compiling each to find it
/// would be the very cost the set's limit spares).
fn prefilter(sources: &[Source<'_>]) -> Result<RegexSet, RedactError> {
    RegexSetBuilder::new(sources.iter().map(|s| s.pattern))
        .size_limit(PATTERNS_SIZE_LIMIT)
        .dfa_size_limit(DFA_CACHE_LIMIT)
        .build()
        .map_err(|error| match error {
            regex::Error::CompiledTooBig(_) => RedactError::TooLarge,
            error => sources
                .iter()
                .find(|s| syntax::parse(s.pattern).is_err())
                .and_then(|s| compile(s).err())
                .unwrap_or(RedactError::Pattern {
                    name: "(all)".into(),
                    source: error,
                }),
        })
}

fn compile(source: &Source<'_>) -> Result<Regex, RedactError> {
    RegexBuilder::new(source.pattern)
        .size_limit(REGEX_SIZE_LIMIT)
        .dfa_size_limit(DFA_CACHE_LIMIT)
        .build()
        .map_err(|error| RedactError::Pattern {
            name: source.name.to_string(),
            source: error,
        })
}

fn builtin<'s>(detector: Detector) -> Source<'s> {
    let (name, pattern, validate): (&str, &str, Option<Validator>) = match detector {
        Detector::Email => (
            "email",
            r"(?i-u)\b[a-z0-9._%+-]+@[a-z0-9-]+(?:\.[a-z0-9-]+)*\.[a-z]{2,}\b",
            None,
        ),
        Detector::Ssn => ("ssn", r"(?-u)\b\d{3}-\d{2}-\d{4}\b", Some(valid_ssn)),
        Detector::Phone => (
            "phone",
            r"(?-u)(?:\+\d{1,3}[ .-]?)?(?:\(\d{3}\)|\b\d{3})[ .-]?\d{3}[ .-]\d{4}\b",
            None,
        ),
        Detector::CreditCard => (
            "creditCard",
            r"(?-u)\b\d(?:[ -]?\d){12,18}\b",
            Some(luhn_valid),
        ),
    };
    Source {
        name,
        pattern,
        validate,
    }
}

/// US SSNs never have area 000, 666 or 9xx, group 00 or serial 0000.
fn valid_ssn(s: &str) -> bool {
    let mut parts = s.split('-');
    let (Some(area), Some(group), Some(serial)) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    area != "000" && area != "666" && !area.starts_with('9') && group != "00" && serial != "0000"
}

/// The Luhn checksum every payment card number satisfies; it keeps order numbers and
/// timestamps from being redacted as cards.
pub fn luhn_valid(s: &str) -> bool {
    let digits: Vec<u32> = s.chars().filter_map(|c| c.to_digit(10)).collect();
    if !(13..=19).contains(&digits.len()) {
        return false;
    }
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            if i % 2 == 1 {
                if d * 2 > 9 { d * 2 - 9 } else { d * 2 }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

#[cfg(test)]
#[path = "redact_tests.rs"]
mod tests;
