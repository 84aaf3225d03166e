//! The audit trail: one JSON line per request with who, what, how much and what was done to it —
//! never a prompt, a completion or a key. Lines are written by a background thread so a slow disk
//! never slows a request, and that thread writes at most every [`COALESCE`]: a busy proxy does
//! not wake it (and, on a one-core pod, get preempted by it) once per request.

use std::{
    collections::BTreeMap,
    io::Write,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use chrono::{DateTime, Utc};
use serde::Serialize;
use std::sync::mpsc;

use super::metrics::Usage;

#[derive(Serialize, Debug, Clone, Default)]
#[serde(rename_all = "camelCase")]
pub struct AuditRecord {
    pub time: DateTime<Utc>,
    /// `namespace/name`; empty when the request was refused before it was authenticated.
    pub claude_key: String,
    pub namespace: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    pub request_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_request_id: Option<String>,
    pub method: String,
    pub endpoint: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    pub stream: bool,
    pub status: u16,
    /// The Anthropic-style error type, when the proxy refused the request or a stream ended in
    /// an `error` event.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_creation_input_tokens: u64,
    pub cache_read_input_tokens: u64,
    pub latency_ms: f64,
    /// SHA-256 (hex, first 16 digits) of `metadata.user_id`: enough to correlate, not to recover.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_hash: Option<String>,
    pub redactions: BTreeMap<String, u32>,
    pub injection_flagged: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_key: Option<String>,
}

impl AuditRecord {
    pub fn set_usage(&mut self, usage: &Usage) {
        self.input_tokens = usage.input;
        self.output_tokens = usage.output;
        self.cache_creation_input_tokens = usage.cache_creation;
        self.cache_read_input_tokens = usage.cache_read;
    }
}

pub fn hash_user(user_id: &str) -> String {
    crate::keys::sha256_hex(user_id)[..16].to_string()
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

/// How long the writer waits after a write before it writes again: lines of requests that end
/// meanwhile go out together. Also the most a line can lag behind its request.
pub const COALESCE: Duration = Duration::from_millis(10);

/// What the writer thread receives.
pub enum Message {
    Line(String),
    /// Write everything queued before this, then answer.
    Flush(mpsc::SyncSender<()>),
}

/// The sending side; cheap to clone.
#[derive(Clone)]
pub enum AuditSink {
    Off,
    Memory(Arc<Mutex<Vec<String>>>),
    /// Lines go to a writer thread, which batches and flushes them.
    Writer(mpsc::Sender<Message>),
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
        let (tx, rx) = mpsc::channel::<Message>();
        std::thread::Builder::new()
            .name("claudekey-audit".into())
            .spawn(move || write_lines(rx, writer))?;
        Ok(Self::Writer(tx))
    }

    /// Waits (up to 5 s) until every line written so far is in the target: at shutdown.
    pub fn flush(&self) {
        if let Self::Writer(tx) = self {
            let (ack, done) = mpsc::sync_channel(1);
            if tx.send(Message::Flush(ack)).is_ok() {
                let _ = done.recv_timeout(Duration::from_secs(5));
            }
        }
    }

    pub fn write(&self, record: &AuditRecord) {
        if matches!(self, Self::Off) {
            return;
        }
        let line = match serde_json::to_string(record) {
            Ok(line) => line,
            Err(e) => {
                tracing::error!(error = %e, "failed to serialize audit record");
                return;
            }
        };
        match self {
            Self::Off => {}
            Self::Memory(lines) => lines.lock().unwrap_or_else(|p| p.into_inner()).push(line),
            Self::Writer(tx) => {
                let _ = tx.send(Message::Line(line));
            }
        }
    }
}

/// The writer thread: blocks only when nothing is queued, so while requests keep coming the
/// senders never have to wake it.
fn write_lines(rx: mpsc::Receiver<Message>, mut writer: Box<dyn Write + Send>) {
    while let Ok(first) = rx.recv() {
        let mut batch = String::new();
        let mut acks = Vec::new();
        for message in std::iter::once(first).chain(rx.try_iter()) {
            match message {
                Message::Line(line) => {
                    batch.push_str(&line);
                    batch.push('\n');
                }
                Message::Flush(ack) => acks.push(ack),
            }
        }
        if let Err(e) = writer
            .write_all(batch.as_bytes())
            .and_then(|()| writer.flush())
        {
            tracing::error!(error = %e, "failed to write audit log");
        }
        let flushing = !acks.is_empty();
        for ack in acks {
            let _ = ack.send(());
        }
        if !flushing {
            std::thread::sleep(COALESCE);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        record.user_hash = Some(hash_user("user-1"));
        sink.write(&record);
        let line = lines.lock().unwrap()[0].clone();
        let json: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(json["claudeKey"], "ns/a");
        assert_eq!(json["redactions"]["email"], 2);
        assert_eq!(json["userHash"].as_str().unwrap().len(), 16);
        assert!(!line.contains("user-1"));
    }

    #[test]
    fn flush_writes_every_queued_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let sink = AuditSink::start(AuditTarget::File(path.clone())).unwrap();
        for status in 0..100 {
            sink.write(&AuditRecord {
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
            sink.write(&AuditRecord {
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
