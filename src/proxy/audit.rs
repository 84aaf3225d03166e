//! The audit trail: one JSON line per request with who, what, how much and what was done to it —
//! never a prompt, a completion or a key. Lines are written by a background thread
//! (`audit_queue`) so a slow write never slows a request, at most every
//! [`COALESCE`](audit_queue::COALESCE): a busy proxy does not wake it (and, on a one-core pod,
//! get preempted by it) once per request. Its queue is bounded ([`queue_size`]): once it is
//! full new requests wait at the door ([`AuditSink::room`]) until the writer catches up, so a
//! target that stops taking lines (a full disk's retries, a container log pipe nobody reads)
//! holds requests back instead of growing the proxy until it is killed, and no request goes
//! unaudited.

use std::{
    borrow::Cow,
    collections::BTreeMap,
    io::Write,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::{audit_queue, usage::Usage};

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

/// Where audit lines go.
#[derive(Clone, Debug)]
pub enum AuditTarget {
    /// `--audit-log -`
    Stdout,
    /// `--audit-log FILE`, appended to.
    File(PathBuf),
    /// Kept in memory, for tests.
    Memory(Arc<Mutex<Vec<String>>>),
    Off,
}

/// Records the writer's queue holds per core of the proxy before new requests wait at the door:
/// about 70 ms of a core's peak rate, seven times what one core ends during one
/// [`COALESCE`](audit_queue::COALESCE) wait.
pub const QUEUE_PER_CORE: usize = 1024;

/// The writer's queue: [`QUEUE_PER_CORE`] for each core the proxy may use (its CPU affinity and
/// cgroup limit), so a gateway on four cores is not held back by a queue sized for a sidecar's
/// one, and a sidecar does not carry a gateway's.
pub fn queue_size() -> usize {
    QUEUE_PER_CORE * std::thread::available_parallelism().map_or(1, usize::from)
}

/// How long a flush at shutdown waits for the target.
const FLUSH_WAIT: Duration = Duration::from_secs(5);

/// The sending side; cheap to clone.
#[derive(Clone)]
pub enum AuditSink {
    Off,
    Memory(Arc<Mutex<Vec<String>>>),
    /// Lines go to a writer thread, which batches and flushes them.
    Writer(Arc<audit_queue::Writer>),
}

impl AuditSink {
    /// Opens the target and starts its writer thread.
    pub fn start(target: AuditTarget) -> std::io::Result<Self> {
        let writer: Box<dyn Write + Send> = match target {
            AuditTarget::Off => return Ok(Self::Off),
            AuditTarget::Memory(lines) => return Ok(Self::Memory(lines)),
            AuditTarget::Stdout => Box::new(std::io::stdout()),
            AuditTarget::File(path) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?,
            ),
        };
        let writer = audit_queue::Writer::start(writer, queue_size())?;
        Ok(Self::Writer(Arc::new(writer)))
    }

    /// Waits (up to 5 s) until every line written so far is in the target: at shutdown.
    pub fn flush(&self) {
        if let Self::Writer(writer) = self {
            writer.flush(FLUSH_WAIT);
        }
    }

    /// Whether a request may start now: the writer's queue is not full.
    pub fn has_room(&self) -> bool {
        match self {
            Self::Writer(writer) => writer.has_room(),
            Self::Off | Self::Memory(_) => true,
        }
    }

    /// A request waits here before it starts while the writer's queue is full: the proxy then
    /// serves at the audit target's pace, and a request that never got in leaves no line.
    pub async fn room(&self) {
        if let Self::Writer(writer) = self {
            writer.room().await;
        }
    }

    /// Queues one request's line; never waits.
    pub fn write(&self, record: AuditRecord) {
        match self {
            Self::Off => {}
            Self::Memory(lines) => {
                let mut line = Vec::with_capacity(768);
                record.encode(&mut line);
                // The line is made of UTF-8 strings and ASCII.
                let line = String::from_utf8(line).unwrap_or_default();
                lines.lock().unwrap_or_else(|p| p.into_inner()).push(line);
            }
            Self::Writer(writer) => writer.push(record),
        }
    }
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
    fn writes_one_camel_case_line_per_record() {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = AuditSink::start(AuditTarget::Memory(lines.clone())).unwrap();
        let mut record = AuditRecord {
            claude_key: "ns/a".into(),
            status: 200,
            ..Default::default()
        };
        record.redactions.insert("email".into(), 2);
        record.user_hash = Some(hash_user(&[7; 32], "user-1"));
        sink.write(record);
        let line = lines.lock().unwrap()[0].clone();
        let json: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(json["claudeKey"], "ns/a");
        assert_eq!(json["redactions"]["email"], 2);
        assert_eq!(json["userHash"].as_str().unwrap().len(), 32);
        assert!(!line.contains("user-1"));
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

    #[test]
    fn flush_writes_every_queued_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let sink = AuditSink::start(AuditTarget::File(path.clone())).unwrap();
        for status in 0..100 {
            sink.write(AuditRecord {
                status,
                ..Default::default()
            });
        }
        sink.flush();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 100, "all lines written by flush");
        assert!(text.lines().last().unwrap().contains("\"status\":99"));
    }

    #[test]
    fn file_target_appends_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let sink = AuditSink::start(AuditTarget::File(path.clone())).unwrap();
        for status in [200, 429] {
            sink.write(AuditRecord {
                status,
                ..Default::default()
            });
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            if text.lines().count() == 2 {
                assert!(text.lines().nth(1).unwrap().contains("\"status\":429"));
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "audit lines not written"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}
