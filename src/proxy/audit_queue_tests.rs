//! Tests of the audit writer: batching, flushes, the door of a full queue, failed writes.

use super::*;

/// Keeps what the writer wrote, when it first flushed, and how many writes it made.
#[derive(Clone, Default)]
pub(in crate::proxy) struct Written(Arc<Mutex<Seen>>);

type Seen = (Option<Instant>, Vec<u8>, usize);

impl Written {
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().1.clone()).unwrap()
    }

    pub(in crate::proxy) fn statuses(&self) -> Vec<u16> {
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

pub(in crate::proxy) fn record(status: u16) -> AuditRecord {
    AuditRecord {
        status,
        ..AuditRecord::default()
    }
}

/// Waits (up to `IDLE_AFTER` and 5 s more) until the writer sleeps until a request wakes it.
fn wait_until_idle(writer: &Writer) {
    let deadline = Instant::now() + IDLE_AFTER + Duration::from_secs(5);
    while !writer.0.lock().writer_idle {
        assert!(Instant::now() < deadline, "the writer never went idle");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn lines_that_end_close_together_go_out_in_one_write_after_the_wait() {
    let out = Written::default();
    let writer = Writer::start(Box::new(out.clone()), 16, Counter::default()).unwrap();
    // From idle: the first line wakes the writer, which waits for those that follow.
    wait_until_idle(&writer);
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
fn a_writer_that_wrote_looks_again_on_its_own_then_sleeps_after_a_quiet_while() {
    let out = Written::default();
    let writer = Writer::start(Box::new(out.clone()), 16, Counter::default()).unwrap();
    writer.push(record(1));
    out.wait_for(1);
    let written = Instant::now();
    // Looking on its own: the next request's line needs no wake (no system call, and the writer
    // is not put on the core in the middle of that request).
    assert!(
        !writer.0.lock().writer_idle,
        "the writer slept right after a write"
    );
    writer.push(record(2));
    out.wait_for(2);
    assert_eq!(out.statuses(), [1, 2]);
    std::thread::sleep(IDLE_AFTER / 2);
    assert!(
        !writer.0.lock().writer_idle || written.elapsed() >= IDLE_AFTER,
        "the writer slept before a quiet {IDLE_AFTER:?}"
    );
    // And an idle proxy's writer does not keep waking: it sleeps until a line comes.
    wait_until_idle(&writer);
    writer.push(record(3));
    out.wait_for(3);
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
    let writer = Arc::new(Writer::start(Box::new(target.clone()), 4, Counter::default()).unwrap());
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
        // The queue has room for one more line, but no writer would ever write it.
        assert!(!writer.has_room());
        let door = tokio::time::timeout(Duration::from_secs(5), writer.room()).await;
        assert!(matches!(door, Ok(Err(WriterStopped))), "{door:?}");
        // And so it stays once the queue is full.
        writer.push(record(2));
        writer.push(record(3));
        let door = tokio::time::timeout(Duration::from_secs(5), writer.room()).await;
        assert!(matches!(door, Ok(Err(WriterStopped))), "{door:?}");
    });
}
