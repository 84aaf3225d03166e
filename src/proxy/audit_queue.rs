//! The audit writer: a queue of records and the thread that encodes and writes them.
//!
//! A finishing request never waits here: its line is always taken (the request is in flight and
//! its memory already spent), and taking it is a lock and a move. What the queue bounds is how
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
//! refuses instead of holding requests for ever, and the admin probes fail so the proxy is
//! restarted.

use std::{
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

/// The wait before the first retry of a failed write (a log rotated under the proxy, a
/// transient I/O error): doubled after each failure up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(10);

/// The longest wait between two tries of a write that keeps failing (a full disk).
pub const RETRY_MAX: Duration = Duration::from_secs(1);

/// The records waiting for the writer, and what the writer is doing.
#[derive(Default)]
struct Pending {
    records: Vec<AuditRecord>,
    /// The writer sleeps until a sender wakes it: nothing was queued when it last looked. While
    /// it is awake senders need not wake it, so a busy proxy makes no system call per line.
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

    /// Waits for lines (or a flush, or the close), then for [`COALESCE`] more unless a flush
    /// is asked, and swaps the queue into `batch`. Returns how many lines will have been written
    /// after it, or `None` once closed with nothing left.
    fn take(&self, batch: &mut Vec<AuditRecord>) -> Option<u64> {
        let mut pending = self.lock();
        while pending.records.is_empty() && !pending.flush_asked {
            if pending.closed {
                return None;
            }
            pending.writer_idle = true;
            pending = self
                .wake
                .wait(pending)
                .unwrap_or_else(PoisonError::into_inner);
        }
        pending.writer_idle = false;
        if !pending.flush_asked && !pending.closed {
            pending = self
                .wake
                .wait_timeout_while(pending, COALESCE, |p| !p.flush_asked && !p.closed)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        pending.flush_asked = false;
        std::mem::swap(&mut pending.records, batch);
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

/// The sending side of one writer thread. When it is dropped (with the last sink) the thread
/// writes what is queued and ends.
pub struct Writer(Arc<Queue>);

impl Writer {
    /// Starts the thread writing to `target`, with room for `capacity` lines before requests
    /// wait at the door; each failed try at a write counts in `failed_writes`. Both of its
    /// buffers are reserved now: no line allocates.
    pub fn start(
        target: Box<dyn Write + Send>,
        capacity: usize,
        failed_writes: Counter,
    ) -> std::io::Result<Self> {
        let capacity = capacity.max(1);
        let queue = Arc::new(Queue {
            pending: Mutex::new(Pending {
                records: Vec::with_capacity(capacity),
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

    /// Queues one request's record; never waits. A request's own thread, which on a one-core
    /// proxy has the client's next request to serve, only moves the record: the writer thread
    /// encodes it (about 1.8k instructions and 8 KB of code).
    pub fn push(&self, record: AuditRecord) {
        let queue = &*self.0;
        let mut pending = queue.lock();
        pending.records.push(record);
        pending.queued += 1;
        if pending.records.len() >= queue.capacity {
            queue.full.store(true, Ordering::Release);
        }
        let wake = std::mem::take(&mut pending.writer_idle);
        drop(pending);
        if wake {
            queue.wake.notify_one();
        }
    }

    /// Whether a request may start now: the queue is not full.
    pub fn has_room(&self) -> bool {
        !self.0.full.load(Ordering::Acquire)
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

/// The writer thread: encodes each batch into one buffer and writes it in one call, trying again
/// until the target takes it (see the module's doc).
fn write_lines(queue: &Queue, mut target: Box<dyn Write + Send>, failed_writes: &Counter) {
    /// The encoded batch's buffer is kept between batches, up to this.
    const KEEP_BYTES: usize = 256 * 1024;
    let mut batch = Vec::with_capacity(queue.capacity);
    // Encoded lines the target has not taken yet.
    let mut unwritten = Vec::new();
    while let Some(through) = queue.take(&mut batch) {
        for record in batch.drain(..) {
            record.encode(&mut unwritten);
            unwritten.push(b'\n');
        }
        if !write_until_taken(queue, &mut *target, &mut unwritten, failed_writes) {
            return;
        }
        unwritten.shrink_to(KEEP_BYTES);
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
mod tests {
    use super::*;

    /// Keeps what the writer wrote, when it first flushed, and how many writes it made.
    #[derive(Clone, Default)]
    struct Written(Arc<Mutex<Seen>>);

    type Seen = (Option<Instant>, Vec<u8>, usize);

    impl Written {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().1.clone()).unwrap()
        }

        fn statuses(&self) -> Vec<u16> {
            let text = self.text();
            let line = |l: &str| serde_json::from_str::<serde_json::Value>(l).unwrap();
            text.lines()
                .map(|l| line(l)["status"].as_u64().unwrap() as u16)
                .collect()
        }

        /// Waits (up to 5 s) until `lines` lines are written.
        fn wait_for(&self, lines: usize) {
            let deadline = Instant::now() + Duration::from_secs(5);
            while self.text().lines().count() < lines {
                assert!(
                    Instant::now() < deadline,
                    "lines not written: {}",
                    self.text()
                );
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }

    impl Write for Written {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let mut written = self.0.lock().unwrap();
            written.1.extend_from_slice(buf);
            written.2 += 1;
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.0.lock().unwrap().0.get_or_insert_with(Instant::now);
            Ok(())
        }
    }

    fn record(status: u16) -> AuditRecord {
        AuditRecord {
            status,
            ..AuditRecord::default()
        }
    }

    #[test]
    fn lines_that_end_close_together_go_out_in_one_write_after_the_wait() {
        let out = Written::default();
        let writer = Writer::start(Box::new(out.clone()), 16, Counter::default()).unwrap();
        let sent = Instant::now();
        writer.push(record(1));
        writer.push(record(2));
        out.wait_for(2);
        let (first_write, _, writes) = out.0.lock().unwrap().clone();
        assert_eq!(out.statuses(), [1, 2]);
        assert_eq!(writes, 1, "one write for both lines");
        // Written no sooner than the wait (a lower bound: a loaded machine only delays it).
        assert!(first_write.unwrap() - sent >= COALESCE);
    }

    #[test]
    fn a_flush_writes_every_queued_line_and_a_closed_writer_what_is_left() {
        let out = Written::default();
        let writer = Writer::start(Box::new(out.clone()), 16, Counter::default()).unwrap();
        for status in 0..40 {
            writer.push(record(status));
        }
        writer.flush(Duration::from_secs(5));
        assert_eq!(out.statuses(), (0..40).collect::<Vec<u16>>());
        // With nothing queued, a flush returns at once.
        let asked = Instant::now();
        writer.flush(Duration::from_secs(5));
        assert!(asked.elapsed() < Duration::from_secs(1));
        writer.push(record(40));
        drop(writer);
        out.wait_for(41);
        assert_eq!(out.statuses().last(), Some(&40));
    }

    /// A target that takes nothing until it is opened: a stalled disk or log pipe.
    #[derive(Clone, Default)]
    struct Stalled(Arc<(Mutex<bool>, Condvar)>, Written);

    impl Stalled {
        fn open(&self) {
            *self.0.0.lock().unwrap() = true;
            self.0.1.notify_all();
        }
    }

    impl Write for Stalled {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let (open, opened) = &*self.0;
            drop(
                opened
                    .wait_while(open.lock().unwrap(), |open| !*open)
                    .unwrap(),
            );
            self.1.write(buf)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.1.flush()
        }
    }

    /// Requests stop at the door once the queue is full, but the runtime they run on does not:
    /// on a one-thread runtime (a one-core sidecar) other tasks go on while they wait. Once the
    /// target takes lines again every request goes through and no line is lost or reordered.
    #[test]
    fn a_stalled_target_holds_new_requests_at_the_door_and_the_runtime_runs_on() {
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        let target = Stalled::default();
        let writer =
            Arc::new(Writer::start(Box::new(target.clone()), 4, Counter::default()).unwrap());
        // Should the runtime block, this opens the target after 3 s so the test fails
        // rather than hangs.
        std::thread::spawn({
            let target = target.clone();
            move || {
                std::thread::sleep(Duration::from_secs(3));
                target.open();
            }
        });
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let (queued, ticks) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        runtime.block_on(async {
            let requests = tokio::spawn({
                let (writer, queued) = (writer.clone(), queued.clone());
                async move {
                    let mut waited = 0;
                    for status in 0..40 {
                        waited += usize::from(!writer.has_room());
                        writer.room().await.unwrap();
                        writer.push(record(status));
                        queued.fetch_add(1, SeqCst);
                        tokio::task::yield_now().await;
                    }
                    waited
                }
            });
            tokio::spawn({
                let ticks = ticks.clone();
                async move {
                    loop {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        ticks.fetch_add(1, SeqCst);
                    }
                }
            });
            // The writer is stuck in its first write: requests stop once the queue is full
            // again (the first batch, taken before the write, and four more).
            tokio::time::sleep(Duration::from_millis(300)).await;
            let held = queued.load(SeqCst);
            assert!(held < 40, "all 40 lines queued behind a stalled target");
            let ticked = ticks.load(SeqCst);
            tokio::time::sleep(Duration::from_millis(200)).await;
            assert_eq!(
                queued.load(SeqCst),
                held,
                "requests went on past a full queue"
            );
            assert!(
                ticks.load(SeqCst) >= ticked + 5,
                "the runtime stopped while requests waited"
            );
            target.open();
            assert!(requests.await.unwrap() >= 1, "no request said it waited");
        });
        writer.flush(Duration::from_secs(5));
        assert_eq!(target.1.statuses(), (0..40).collect::<Vec<u16>>());
    }

    /// A target that fails: `fails` times (a full disk) after taking `partial` bytes of the
    /// write before each failure, then its flush once, then never again.
    #[derive(Clone)]
    struct Failing {
        out: Written,
        fails: Arc<Mutex<(usize, bool)>>,
        partial: usize,
    }

    impl Write for Failing {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let mut fails = self.fails.lock().unwrap();
            if fails.0 == 0 {
                return self.out.write(buf);
            }
            if fails.1 {
                fails.0 -= 1;
                fails.1 = false;
                return Err(std::io::ErrorKind::StorageFull.into());
            }
            fails.1 = true;
            self.out.write(&buf[..self.partial.min(buf.len())])
        }
        fn flush(&mut self) -> std::io::Result<()> {
            let mut fails = self.fails.lock().unwrap();
            if fails.0 == 0 && !fails.1 {
                fails.1 = true;
                return Err(std::io::Error::other("flush failed"));
            }
            self.out.flush()
        }
    }

    /// Writes that fail part way are tried again from the first byte the target did not take:
    /// every line arrives once, whole and in order, and each failed try is counted.
    #[test]
    fn a_failed_write_is_tried_again_and_no_line_is_lost_or_repeated() {
        let target = Failing {
            out: Written::default(),
            fails: Arc::new(Mutex::new((3, false))),
            partial: 7,
        };
        let failed = Counter::default();
        let writer = Writer::start(Box::new(target.clone()), 64, failed.clone()).unwrap();
        for status in 0..10 {
            writer.push(record(status));
        }
        target.out.wait_for(10);
        for status in 10..20 {
            writer.push(record(status));
        }
        writer.flush(Duration::from_secs(5));
        assert_eq!(target.out.statuses(), (0..20).collect::<Vec<u16>>());
        // Three writes and one flush.
        assert_eq!(failed.get(), 4);
    }

    /// A writer whose target keeps failing gives up when the proxy stops, rather than keep a
    /// thread trying for ever.
    #[test]
    fn a_target_failing_at_the_close_is_given_up() {
        let target = Failing {
            out: Written::default(),
            fails: Arc::new(Mutex::new((usize::MAX, false))),
            partial: 0,
        };
        let writer = Writer::start(Box::new(target), 4, Counter::default()).unwrap();
        let queue = writer.0.clone();
        writer.push(record(1));
        std::thread::sleep(COALESCE * 5);
        drop(writer);
        let deadline = Instant::now() + Duration::from_secs(5);
        while queue.running.load(Ordering::Acquire) {
            assert!(Instant::now() < deadline, "the writer never gave up");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Once the writer thread has stopped nothing makes room again: the door refuses at once
    /// instead of holding requests for ever, and `is_running` says so (the admin probes).
    #[test]
    fn a_stopped_writer_refuses_at_the_door() {
        let writer = stopped_writer(2);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        runtime.block_on(async {
            // Room for one more, then full.
            assert!(writer.room().await.is_ok());
            writer.push(record(2));
            writer.push(record(3));
            let door = tokio::time::timeout(Duration::from_secs(5), writer.room()).await;
            assert!(matches!(door, Ok(Err(WriterStopped))), "{door:?}");
        });
    }
}
