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

use std::{
    io::Write,
    sync::{
        Arc, Condvar, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::sync::Notify;

use super::audit::AuditRecord;

/// How long the writer waits, once a line has come, before it writes: lines of requests that end
/// meanwhile go out together. Also the most a line can lag behind its request.
pub const COALESCE: Duration = Duration::from_millis(10);

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
}

/// The sending side of one writer thread. When it is dropped (with the last sink) the thread
/// writes what is queued and ends.
pub struct Writer(Arc<Queue>);

impl Writer {
    /// Starts the thread writing to `target`, with room for `capacity` lines before requests
    /// wait at the door. Both of its buffers are reserved now: no line allocates.
    pub fn start(target: Box<dyn Write + Send>, capacity: usize) -> std::io::Result<Self> {
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
        });
        let thread_queue = queue.clone();
        std::thread::Builder::new()
            .name("claudekey-audit".into())
            .spawn(move || write_lines(&thread_queue, target))?;
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

    /// Waits, without holding a thread, until the queue has room: at once while it has, else
    /// until the writer has taken the queue.
    pub async fn room(&self) {
        let queue = &*self.0;
        while !self.has_room() {
            let notified = queue.room.notified();
            tokio::pin!(notified);
            // Registered before the check, so a take between the two still wakes this one.
            notified.as_mut().enable();
            if self.has_room() {
                return;
            }
            notified.await;
        }
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

/// The writer thread: encodes each batch into one buffer and writes it in one call. A failed
/// write is logged and its lines are lost; the next batch tries again.
fn write_lines(queue: &Queue, mut target: Box<dyn Write + Send>) {
    /// The encoded batch's buffer is kept between batches, up to this.
    const KEEP_BYTES: usize = 256 * 1024;
    let mut batch = Vec::with_capacity(queue.capacity);
    let mut bytes = Vec::new();
    while let Some(through) = queue.take(&mut batch) {
        for record in batch.drain(..) {
            record.encode(&mut bytes);
            bytes.push(b'\n');
        }
        if let Err(e) = target.write_all(&bytes).and_then(|()| target.flush()) {
            tracing::error!(error = %e, "failed to write audit log");
        }
        bytes.clear();
        bytes.shrink_to(KEEP_BYTES);
        queue.written_through(through);
    }
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
        let writer = Writer::start(Box::new(out.clone()), 16).unwrap();
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
        let writer = Writer::start(Box::new(out.clone()), 16).unwrap();
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
        let writer = Arc::new(Writer::start(Box::new(target.clone()), 4).unwrap());
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
                        writer.room().await;
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
}
