//! The audit writer: a queue of encoded lines and the thread that writes them.
//!
//! A finishing request never waits here: its line is always taken (the request is in flight and
//! its memory already spent). The request's own thread encodes its record (about 1.8k
//! instructions, on data still in its cache) and appends the line under a lock, and the record's
//! memory is freed on the thread that allocated it. The writer thread only writes bytes, at its
//! own pace: while lines keep coming no request wakes it (see [`Queue::take`]). On a one-core
//! proxy the writer shares the core with the requests, and what it does there lands on whichever
//! request is in flight: a write of a batch is a shorter stall than encoding the batch was
//! (docs/benchmarks-notes.md). What the queue bounds is how
//! many requests *start*: once its capacity of lines wait, new requests wait at the door
//! ([`Writer::room`]) until the writer has taken them. That wait is asynchronous, so a target that
//! stops taking lines (a container log pipe nobody reads, a disk that blocks) holds requests at
//! its pace while the rest of the proxy runs on: streams in flight, timers, `/healthz` and the
//! `/metrics` that raise the stall's alert. Memory stays bounded by the queue, the batch
//! in the writer's hands and the requests already in flight.
//!
//! A write that fails (a full disk, a log pipe that broke) loses nothing: the writer keeps the
//! bytes the target did not take and tries again, sooner first and then every
//! [`RETRY_MAX`], while lines queue behind them and, once the queue is full, requests wait at
//! the door as they do for a target that blocks. Should the writer thread itself ever stop (a
//! panic), nothing would write the queue again: [`Writer::is_running`] says so, the door
//! refuses every request from then on (not only once the queue is full: a line queued for no
//! writer is a request served unaudited), and the admin probes fail so the proxy is restarted.

use std::{
    cell::RefCell,
    io::Write,
    sync::{
        Arc, Condvar, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use prometheus_client::metrics::counter::Counter;
use tokio::sync::Notify;

use super::audit::AuditRecord;

/// How long the writer waits, once a line has come, before it writes: lines of requests that end
/// meanwhile go out together. Also the most a line can lag behind its request.
pub const COALESCE: Duration = Duration::from_millis(10);

/// How long the writer keeps looking for lines on its own after the last one came, before it
/// sleeps until a request wakes it: an idle proxy's writer does not wake a hundred times a
/// second.
pub const IDLE_AFTER: Duration = Duration::from_secs(1);

/// The wait before the first retry of a failed write (a log rotated under the proxy, a
/// transient I/O error): doubled after each failure up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(10);

/// The longest wait between two tries of a write that keeps failing (a full disk).
pub const RETRY_MAX: Duration = Duration::from_secs(1);

/// The lines waiting for the writer, and what the writer is doing.
#[derive(Default)]
struct Pending {
    /// Encoded lines, each ending in a newline.
    lines: Vec<u8>,
    /// How many lines `lines` holds: the door closes at the queue's capacity.
    waiting: usize,
    /// The writer sleeps until a sender wakes it: nothing was queued for [`IDLE_AFTER`]. While
    /// it looks on its own senders need not wake it, so a busy proxy makes no system call per
    /// line and none of its requests wakes the writer.
    writer_idle: bool,
    flush_asked: bool,
    /// Every sink is gone: the writer writes what is left and ends.
    closed: bool,
    /// Lines ever queued, and ever handed to the target: a flush waits until the second
    /// reaches what the first was when it began.
    queued: u64,
    written: u64,
}

struct Queue {
    pending: Mutex<Pending>,
    /// Wakes the writer: the first line after it went idle, a flush, or the close.
    wake: Condvar,
    /// Wakes flushers after each write.
    written: Condvar,
    /// Whether [`Self::capacity`] lines or more wait: new requests wait at the door.
    full: AtomicBool,
    /// Where they wait, until the writer takes the queue.
    room: Notify,
    capacity: usize,
    /// Cleared when the writer thread ends: at the close, or a panic.
    running: AtomicBool,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits for lines (or a flush, or the close) and swaps the queue into `batch` (which must be
    /// empty). Returns how many lines will have been written after it, or `None` once closed
    /// with nothing left.
    ///
    /// While lines keep coming the writer looks every [`COALESCE`] on its own, so no request
    /// has to wake it: a wake is a system call, and on a one-core proxy it put the writer on the
    /// core in the middle of that request. After [`IDLE_AFTER`] without a line it sleeps until
    /// a request wakes it, and then waits [`COALESCE`] for the lines that follow.
    fn take(&self, batch: &mut Vec<u8>) -> Option<u64> {
        let mut pending = self.lock();
        let mut quiet = Duration::ZERO;
        let mut woken = false;
        while pending.lines.is_empty() && !pending.flush_asked {
            if pending.closed {
                return None;
            }
            if quiet >= IDLE_AFTER {
                pending.writer_idle = true;
                pending = self
                    .wake
                    .wait(pending)
                    .unwrap_or_else(PoisonError::into_inner);
                (quiet, woken) = (Duration::ZERO, true);
            } else {
                pending = self
                    .wake
                    .wait_timeout(pending, COALESCE)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
                quiet += COALESCE;
            }
        }
        pending.writer_idle = false;
        if woken && !pending.flush_asked && !pending.closed {
            pending = self
                .wake
                .wait_timeout_while(pending, COALESCE, |p| !p.flush_asked && !p.closed)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        pending.flush_asked = false;
        std::mem::swap(&mut pending.lines, batch);
        pending.waiting = 0;
        let through = pending.queued;
        let was_full = self.full.swap(false, Ordering::AcqRel);
        drop(pending);
        if was_full {
            self.room.notify_waiters();
        }
        Some(through)
    }

    fn written_through(&self, through: u64) {
        self.lock().written = through;
        self.written.notify_all();
    }

    /// The writer's wait before it tries a failed write again; returns whether the queue was
    /// closed meanwhile (or before).
    fn closed_after(&self, wait: Duration) -> bool {
        let pending = self.lock();
        self.wake
            .wait_timeout_while(pending, wait, |p| !p.closed)
            .unwrap_or_else(PoisonError::into_inner)
            .0
            .closed
    }
}

/// Clears [`Queue::running`] when the writer thread ends, however it ends.
struct Running<'a>(&'a Queue);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.running.store(false, Ordering::Release);
        // Requests waiting at the door learn that no writer will make room.
        self.0.room.notify_waiters();
    }
}

/// The door's answer when the writer thread has stopped: no line can be written any more.
#[derive(Debug, thiserror::Error)]
#[error("the audit log writer has stopped; the proxy must be restarted")]
pub struct WriterStopped;

/// What a queue's buffer of lines starts with, and keeps between batches: a burst may grow it
/// up to the queue's capacity of lines, and it is given back down to this once written.
const KEEP_BYTES: usize = 256 * 1024;

/// The sending side of one writer thread. When it is dropped (with the last sink) the thread
/// writes what is queued and ends.
pub struct Writer(Arc<Queue>);

impl Writer {
    /// Starts the thread writing to `target`, with room for `capacity` lines before requests
    /// wait at the door; each failed try at a write counts in `failed_writes`. Both of its
    /// buffers are reserved now: a line allocates only when a burst outgrows them.
    pub fn start(
        target: Box<dyn Write + Send>,
        capacity: usize,
        failed_writes: Counter,
    ) -> std::io::Result<Self> {
        let capacity = capacity.max(1);
        let queue = Arc::new(Queue {
            pending: Mutex::new(Pending {
                lines: Vec::with_capacity(KEEP_BYTES),
                ..Pending::default()
            }),
            wake: Condvar::new(),
            written: Condvar::new(),
            full: AtomicBool::new(false),
            room: Notify::new(),
            capacity,
            running: AtomicBool::new(true),
        });
        let thread_queue = queue.clone();
        std::thread::Builder::new()
            .name("claudekey-audit".into())
            .spawn(move || {
                let _running = Running(&thread_queue);
                write_lines(&thread_queue, target, &failed_writes);
            })?;
        Ok(Self(queue))
    }

    /// Queues one request's record as its line; never waits. The line is encoded before the
    /// lock is taken, into a buffer the thread keeps, so the lock is held for a copy.
    pub fn push(&self, record: AuditRecord) {
        /// Lines are short (client-given fields are clipped): the thread's buffer starts at
        /// `KEPT_LINE` bytes, and one grown past `MAX_KEPT_LINE` is not kept.
        const KEPT_LINE: usize = 1024;
        const MAX_KEPT_LINE: usize = 16 * 1024;
        thread_local! {
            static LINE: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(KEPT_LINE));
        }
        let queue = &*self.0;
        LINE.with_borrow_mut(|line| {
            line.clear();
            record.encode(line);
            line.push(b'\n');
            drop(record);
            let mut pending = queue.lock();
            pending.lines.extend_from_slice(line);
            pending.waiting += 1;
            pending.queued += 1;
            if pending.waiting >= queue.capacity {
                queue.full.store(true, Ordering::Release);
            }
            let wake = std::mem::take(&mut pending.writer_idle);
            drop(pending);
            if line.capacity() > MAX_KEPT_LINE {
                *line = Vec::with_capacity(KEPT_LINE);
            }
            if wake {
                queue.wake.notify_one();
            }
        });
    }

    /// Whether a request may start now: the queue is not full and the writer still runs. A
    /// stopped writer has no room, however empty its queue: a line queued then would be
    /// written by nobody, so the request goes to [`Self::room`], which refuses it.
    pub fn has_room(&self) -> bool {
        !self.0.full.load(Ordering::Acquire) && self.is_running()
    }

    /// Whether the writer thread still runs. Once it has stopped (it never does but at the
    /// close, unless it panicked) no queued line will be written.
    pub fn is_running(&self) -> bool {
        self.0.running.load(Ordering::Acquire)
    }

    /// Waits, without holding a thread, until the queue has room: at once while it has, else
    /// until the writer has taken the queue. Refuses once the writer has stopped.
    pub async fn room(&self) -> Result<(), WriterStopped> {
        let queue = &*self.0;
        while !self.has_room() {
            let notified = queue.room.notified();
            tokio::pin!(notified);
            // Registered before the checks, so a take (or the writer's end) between them still
            // wakes this one.
            notified.as_mut().enable();
            if !self.is_running() {
                return Err(WriterStopped);
            }
            if self.has_room() {
                return Ok(());
            }
            notified.await;
        }
        Ok(())
    }

    /// Waits (up to `wait`) until every line queued so far is in the target: at shutdown.
    pub fn flush(&self, wait: Duration) {
        let queue = &*self.0;
        let deadline = Instant::now() + wait;
        let mut pending = queue.lock();
        let through = pending.queued;
        if pending.written >= through {
            return;
        }
        pending.flush_asked = true;
        queue.wake.notify_one();
        while pending.written < through {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            pending = queue
                .written
                .wait_timeout(pending, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.0.lock().closed = true;
        self.0.wake.notify_one();
    }
}

/// The writer thread: writes each batch of lines in one call, trying again
/// until the target takes it (see the module's doc).
fn write_lines(queue: &Queue, mut target: Box<dyn Write + Send>, failed_writes: &Counter) {
    let mut batch = Vec::with_capacity(KEEP_BYTES);
    while let Some(through) = queue.take(&mut batch) {
        if !write_until_taken(queue, &mut *target, &mut batch, failed_writes) {
            return;
        }
        batch.shrink_to(KEEP_BYTES);
        queue.written_through(through);
    }
}

/// Writes `bytes` and flushes, trying again after each failure, with a growing wait, until the
/// target has taken them all. Returns false when the queue is closed while the target still
/// fails: the proxy is stopping, and the lines are lost (said in the log).
fn write_until_taken(
    queue: &Queue,
    target: &mut dyn Write,
    bytes: &mut Vec<u8>,
    failed_writes: &Counter,
) -> bool {
    let mut wait = RETRY_FIRST;
    let mut failures = 0u64;
    loop {
        let Err(e) = write_out(target, bytes) else {
            if failures > 0 {
                tracing::warn!(failures, "the audit log takes lines again; none was lost");
            }
            return true;
        };
        failed_writes.inc();
        if failures == 0 {
            tracing::error!(error = %e, "failed to write the audit log; retrying (requests wait once its queue is full)");
        }
        failures += 1;
        if queue.closed_after(wait) {
            // One last try: the proxy is stopping and will not wait for more.
            if write_out(target, bytes).is_ok() {
                return true;
            }
            let lines = bytes.iter().filter(|&&b| b == b'\n').count();
            tracing::error!(
                lines,
                "audit lines lost: the proxy stopped while its audit log failed"
            );
            return false;
        }
        wait = (wait * 2).min(RETRY_MAX);
    }
}

/// Writes `bytes` whole and flushes. What the target took is removed from `bytes` even when a
/// later call fails, so a retry never repeats part of a line.
fn write_out(target: &mut dyn Write, bytes: &mut Vec<u8>) -> std::io::Result<()> {
    let mut taken = 0;
    let result = loop {
        if taken == bytes.len() {
            break target.flush();
        }
        match target.write(&bytes[taken..]) {
            Ok(0) => break Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => taken += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => break Err(e),
        }
    };
    bytes.drain(..taken);
    result
}

/// A writer whose thread has stopped, as a panic in it would leave it: its target panicked on
/// the first line. For the tests of what depends on a running writer.
#[cfg(test)]
pub(crate) fn stopped_writer(capacity: usize) -> Writer {
    struct Panicking;

    impl Write for Panicking {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            panic!("the audit target panics on purpose (test)");
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    let writer = Writer::start(Box::new(Panicking), capacity, Counter::default()).unwrap();
    assert!(writer.is_running());
    writer.push(AuditRecord::default());
    let deadline = Instant::now() + Duration::from_secs(5);
    while writer.is_running() {
        assert!(Instant::now() < deadline, "the writer still runs");
        std::thread::sleep(Duration::from_millis(5));
    }
    writer
}

#[cfg(test)]
#[path = "audit_queue_tests.rs"]
pub(super) mod tests;
