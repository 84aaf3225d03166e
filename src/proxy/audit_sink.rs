//! Where audit lines go: stdout, a file, memory (tests) or nowhere. Lines for stdout or a file
//! are written by a background thread (`audit_queue`) so a slow write never slows a request, at
//! most every [`COALESCE`](audit_queue::COALESCE), and no request of a busy proxy wakes it (a
//! wake is a system call, and on a one-core pod it put the writer on the core mid-request). Its
//! queue is bounded ([`queue_size`]): once it is full new requests wait at the door
//! ([`AuditSink::room`]) until the writer catches up, so a target that stops taking lines (a
//! full disk's retries, a container log pipe nobody reads) holds requests back instead of growing
//! the proxy until it is killed, and no request goes unaudited.

use std::{
    io::Write,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use prometheus_client::metrics::counter::Counter;

use super::{after_answer, audit::AuditRecord, audit_queue};

pub use audit_queue::WriterStopped;

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
    /// Opens the target and starts its writer thread, which counts each failed try at a write
    /// in `failed_writes`.
    pub fn start(target: AuditTarget, failed_writes: Counter) -> std::io::Result<Self> {
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
        let writer = audit_queue::Writer::start(writer, queue_size(), failed_writes)?;
        Ok(Self::Writer(Arc::new(writer)))
    }

    /// Waits (up to 5 s) until every line written so far is in the target: at shutdown.
    pub fn flush(&self) {
        if let Self::Writer(writer) = self {
            writer.flush(FLUSH_WAIT);
        }
    }

    /// Whether a request may start now: the writer runs and its queue is not full.
    pub fn has_room(&self) -> bool {
        match self {
            Self::Writer(writer) => writer.has_room(),
            Self::Off | Self::Memory(_) => true,
        }
    }

    /// A request waits here before it starts while the writer's queue is full: the proxy then
    /// serves at the audit target's pace, and a request that never got in leaves no line.
    /// Refused once the writer has stopped: nothing would ever make room.
    pub async fn room(&self) -> Result<(), WriterStopped> {
        match self {
            Self::Writer(writer) => writer.room().await,
            Self::Off | Self::Memory(_) => Ok(()),
        }
    }

    /// Whether lines still reach the target: false only once the writer thread has stopped
    /// (a panic), which only a restart mends. The admin probes report it.
    pub fn is_running(&self) -> bool {
        match self {
            Self::Writer(writer) => writer.is_running(),
            Self::Off | Self::Memory(_) => true,
        }
    }

    /// Queues one request's line; never waits. For a writer thread, after the answer of the
    /// connection being polled is written (`after_answer`); in memory (tests read it as soon as
    /// they have their answer), at once.
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
            Self::Writer(writer) => after_answer::push(writer, record),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::audit::hash_user;

    #[test]
    fn writes_one_camel_case_line_per_record() {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink =
            AuditSink::start(AuditTarget::Memory(lines.clone()), Counter::default()).unwrap();
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
    fn flush_writes_every_queued_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let sink = AuditSink::start(AuditTarget::File(path.clone()), Counter::default()).unwrap();
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
        let sink = AuditSink::start(AuditTarget::File(path.clone()), Counter::default()).unwrap();
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
