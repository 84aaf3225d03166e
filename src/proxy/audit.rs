//! The audit trail: one JSON line per request with who, what, how much and what was done to it —
//! never a prompt, a completion or a key. This module is the line itself and the hashes in it;
//! `audit_sink` is where lines go (and, through `audit_queue`, how a writer thread takes them off
//! the request path).

use std::{borrow::Cow, collections::BTreeMap, sync::Arc};

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::usage::Usage;

/// One line. What every request repeats (its ClaudeKey, pod, key fingerprint, method and
/// endpoint) is shared with the config or static, so filling a record copies pointers.
///
/// The derived `Serialize` defines the line; `AuditRecord::encode` (in `audit_line`) writes
/// the same bytes without serde's per-byte escaping, and a test holds the two equal.
#[derive(Serialize, Debug, Clone, Default)]
#[serde(rename_all = "camelCase")]
pub struct AuditRecord {
    #[serde(serialize_with = "rfc3339")]
    pub time: DateTime<Utc>,
    /// `namespace/name`; empty when the request was refused before it was authenticated.
    #[serde(serialize_with = "shared")]
    pub claude_key: Arc<str>,
    #[serde(serialize_with = "shared")]
    pub namespace: Arc<str>,
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "shared_opt")]
    pub pod: Option<Arc<str>>,
    pub request_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_request_id: Option<String>,
    pub method: Cow<'static, str>,
    pub endpoint: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    pub stream: bool,
    /// The proxy's status, or 499 when the client went away before any response.
    pub status: u16,
    /// How the request ended: completed, refused, upstream_error, client_closed, timeout or
    /// shutdown. Every request gets exactly one line, whichever.
    pub outcome: &'static str,
    /// The Anthropic-style error type, when the proxy refused the request or a stream ended in
    /// an `error` event.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_creation_input_tokens: u64,
    pub cache_read_input_tokens: u64,
    pub latency_ms: f64,
    /// HMAC-SHA256 of `metadata.user_id` keyed by the ClaudeKey's audit salt (32 hex digits):
    /// enough to correlate one user's requests, and not reversible from a list of likely ids
    /// without the salt.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_hash: Option<String>,
    pub redactions: BTreeMap<String, u32>,
    pub injection_flagged: bool,
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "shared_opt")]
    pub upstream_key: Option<Arc<str>>,
}

/// The same text as chrono's own `Serialize` (RFC 3339, `Z`, as many fraction digits as needed),
/// written in one piece: chrono's impl goes through `collect_str`, which serde_json escapes a
/// character at a time (about 2k instructions a line, ~1% of a request).
fn rfc3339<S: serde::Serializer>(time: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&time_text(time))
}

/// The line's `time`: RFC 3339, `Z`, as many fraction digits as needed.
pub(super) fn time_text(time: &DateTime<Utc>) -> String {
    time.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

// `Arc<str>` as a plain string (serde's own impl needs its `rc` feature, which would rebuild
// every crate that uses serde).
fn shared<S: serde::Serializer>(value: &Arc<str>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(value)
}

fn shared_opt<S: serde::Serializer>(value: &Option<Arc<str>>, s: S) -> Result<S::Ok, S::Error> {
    match value {
        Some(value) => s.serialize_some(&**value),
        None => s.serialize_none(),
    }
}

impl AuditRecord {
    pub fn set_usage(&mut self, usage: &Usage) {
        self.input_tokens = usage.input;
        self.output_tokens = usage.output;
        self.cache_creation_input_tokens = usage.cache_creation;
        self.cache_read_input_tokens = usage.cache_read;
    }
}

/// The audit's user hash, keyed per ClaudeKey: HMAC-SHA256(salt, user id), first 128 bits in
/// hex. The key's inner and outer pads are computed once per tenant (by `ring`, already linked
/// through rustls), not on every request. `Debug` never shows the salt.
#[derive(Clone, Debug)]
pub struct UserHasher(ring::hmac::Key);

impl UserHasher {
    pub fn new(salt: &[u8; 32]) -> Self {
        Self(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, salt))
    }

    pub fn hash(&self, user_id: &str) -> String {
        let tag = ring::hmac::sign(&self.0, user_id.as_bytes());
        let mut first = [0u8; 16];
        first.copy_from_slice(&tag.as_ref()[..16]);
        let mut hash = String::with_capacity(32);
        push_hex_128(&mut hash, &first);
        hash
    }
}

/// Appends 128 bits as 32 lower-case hex digits (the user hash, the request id) through a
/// buffer: `hex::encode` collects characters one by one and `{:016x}` goes through the
/// formatter, each about 1k instructions on the hot path.
pub fn push_hex_128(out: &mut String, bits: &[u8; 16]) {
    let mut digits = [0u8; 32];
    // 16 bytes always fit 32 digits, and hex digits are ASCII.
    let _ = hex::encode_to_slice(bits, &mut digits);
    out.push_str(std::str::from_utf8(&digits).unwrap_or_default());
}

/// At most `max_chars` characters of a client's or upstream's text, for an audit field. Most
/// texts are short: they are copied whole without walking their characters.
pub fn clip(text: &str, max_chars: usize) -> String {
    if text.len() <= max_chars {
        return text.to_owned();
    }
    match text.char_indices().nth(max_chars) {
        Some((end, _)) => text[..end].to_owned(),
        None => text.to_owned(),
    }
}

/// [`UserHasher::hash`] with a one-off key.
pub fn hash_user(salt: &[u8; 32], user_id: &str) -> String {
    UserHasher::new(salt).hash(user_id)
}

/// HMAC-SHA256 (RFC 2104).
pub fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::hmac::sign(&key, message).as_ref());
    out
}

/// The salt of ClaudeKeys whose `proxy.json` has no `auditSalt`: random per process, so hashes
/// still correlate within one proxy's lifetime and never match a precomputed table.
pub fn process_salt() -> [u8; 32] {
    static SALT: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
    *SALT.get_or_init(rand::random)
}

#[cfg(test)]
mod tests {
    #[test]
    fn clip_keeps_at_most_the_characters_asked() {
        use super::clip;
        assert_eq!(clip("claude-sonnet-4-5", 100), "claude-sonnet-4-5");
        assert_eq!(clip("abcdef", 3), "abc");
        assert_eq!(clip("abc", 3), "abc");
        // Characters, not bytes: 4 two-byte characters fit under 3 only as 3.
        assert_eq!(clip("éééé", 3), "ééé");
        assert_eq!(clip("ééé", 3), "ééé");
        assert_eq!(clip("", 0), "");
        assert_eq!(clip("a", 0), "");
    }

    use super::*;

    #[test]
    fn the_time_is_written_as_chrono_writes_it() {
        use chrono::TimeZone;
        let whole = Utc.with_ymd_and_hms(2026, 12, 3, 23, 7, 20).unwrap();
        for nanos in [0, 1, 304_000_000, 304_194_000, 304_194_507, 999_999_999] {
            let time = whole + chrono::Duration::nanoseconds(nanos);
            let ours = serde_json::to_value(AuditRecord {
                time,
                ..AuditRecord::default()
            })
            .unwrap();
            assert_eq!(ours["time"], serde_json::to_value(time).unwrap(), "{nanos}");
        }
    }

    #[test]
    fn hmac_matches_rfc_4231() {
        // Test case 2 of RFC 4231.
        assert_eq!(
            hex::encode(hmac_sha256(b"Jefe", b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // Test case 6: a key longer than the block is hashed first.
        assert_eq!(
            hex::encode(hmac_sha256(
                &[0xaa; 131],
                b"Test Using Larger Than Block-Size Key - Hash Key First"
            )),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[test]
    fn user_hash_depends_on_the_salt() {
        let a = hash_user(&[1; 32], "jane@example.com");
        assert_eq!(a, hash_user(&[1; 32], "jane@example.com"));
        assert_ne!(a, hash_user(&[2; 32], "jane@example.com"));
        // Not the unsalted SHA-256 an attacker could precompute.
        assert!(!crate::keys::sha256_hex("jane@example.com").starts_with(&a));
    }

    #[test]
    fn user_hash_is_the_first_128_bits_of_the_hmac_in_lower_case_hex() {
        let salt = [9; 32];
        for user in ["", "u", "jane@example.com", "é…"] {
            let full = hex::encode(hmac_sha256(&salt, user.as_bytes()));
            assert_eq!(hash_user(&salt, user), full[..32], "{user}");
        }
    }
}
