//! Audit lines encoded after the answer is on the wire. hyper drops a response body of known
//! length (and with it the request's [`Exchange`](super::exchange::Exchange), which writes the
//! line) as soon as it has buffered the last byte, and flushes the buffer to the socket after
//! that, in the same poll. Encoding the line there put about 4,000 instructions between the
//! upstream's answer and the client's (issue 21, the c=1 rows). While a connection is polled
//! through [`AnswersFirst`], a line written on its thread is held and queued once the poll
//! returns, after hyper's flush: same line, same queue, microseconds later.
//!
//! Only the line waits. The reservation is settled and the metrics counted before the answer
//! leaves, as before: a client that reads its answer and asks again (or scrapes) sees both.

use std::{
    cell::RefCell,
    collections::VecDeque,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use super::{audit::AuditRecord, audit_queue::Writer};

thread_local! {
    static HELD: RefCell<Held> = const {
        RefCell::new(Held {
            holding: false,
            lines: VecDeque::new(),
        })
    };
}

struct Held {
    /// A connection is being polled through [`AnswersFirst`] on this thread.
    holding: bool,
    /// Lines written meanwhile, in order; the deque keeps its room between polls.
    lines: VecDeque<(Arc<Writer>, AuditRecord)>,
}

/// Queues `record` on `writer` now, or once the connection being polled on this thread has
/// written what it buffered.
pub fn push(writer: &Arc<Writer>, record: AuditRecord) {
    let now = HELD.with_borrow_mut(|held| {
        if held.holding {
            held.lines.push_back((writer.clone(), record));
            None
        } else {
            Some(record)
        }
    });
    if let Some(record) = now {
        writer.push(record);
    }
}

/// A connection's future, polled so that the lines its requests write are queued after the
/// poll (and so after hyper's flush). Also on unwinding: no line is lost to a panic.
pub struct AnswersFirst<'a, F>(pub Pin<&'a mut F>);

impl<F: Future> Future for AnswersFirst<'_, F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let _holding = Holding::start();
        self.0.as_mut().poll(cx)
    }
}

/// Holds lines from its start until it is dropped, then queues them. A nested one (a
/// connection polled inside another's poll) leaves them to the outer one.
struct Holding {
    outer: bool,
}

impl Holding {
    fn start() -> Self {
        let outer = !HELD.with_borrow_mut(|held| std::mem::replace(&mut held.holding, true));
        Self { outer }
    }
}

impl Drop for Holding {
    fn drop(&mut self) {
        if !self.outer {
            return;
        }
        HELD.with_borrow_mut(|held| held.holding = false);
        // Each line is taken out and the cell released before it is queued, so nothing the
        // queueing does (even writing another line) can find the cell borrowed.
        while let Some((writer, record)) = HELD.with_borrow_mut(|held| held.lines.pop_front()) {
            writer.push(record);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::audit_queue::tests::{Written, record};
    use prometheus_client::metrics::counter::Counter;
    use std::time::Duration;

    fn writer() -> (Arc<Writer>, Written) {
        let out = Written::default();
        let writer = Writer::start(Box::new(out.clone()), 16, Counter::default()).unwrap();
        (Arc::new(writer), out)
    }

    /// The statuses of the lines written so far (once the writer has caught up).
    fn written(writer: &Writer, out: &Written) -> Vec<u16> {
        writer.flush(Duration::from_secs(5));
        out.statuses()
    }

    /// Polls `body` once as a connection is polled.
    fn poll_as_a_connection(cx: &mut Context<'_>, body: impl FnMut(&mut Context<'_>) -> Poll<()>) {
        let mut polled = std::pin::pin!(std::future::poll_fn(body));
        let _ = Pin::new(&mut AnswersFirst(polled.as_mut())).poll(cx);
    }

    fn noop() -> Context<'static> {
        Context::from_waker(std::task::Waker::noop())
    }

    #[test]
    fn outside_a_connections_poll_a_line_is_queued_at_once() {
        let (writer, out) = writer();
        push(&writer, record(200));
        assert_eq!(written(&writer, &out), [200]);
    }

    #[test]
    fn inside_a_poll_lines_wait_for_its_end_and_keep_their_order() {
        let (writer, out) = writer();
        poll_as_a_connection(&mut noop(), |_| {
            push(&writer, record(200));
            push(&writer, record(201));
            assert!(
                written(&writer, &out).is_empty(),
                "held until the poll returns"
            );
            Poll::Ready(())
        });
        assert_eq!(written(&writer, &out), [200, 201]);
        push(&writer, record(202));
        assert_eq!(written(&writer, &out), [200, 201, 202], "no longer held");
    }

    #[test]
    fn a_panicking_poll_loses_no_line() {
        let (writer, out) = writer();
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            poll_as_a_connection(&mut noop(), |_| {
                push(&writer, record(200));
                panic!("a bug in a request")
            });
        }));
        assert!(panicked.is_err());
        assert_eq!(written(&writer, &out), [200]);
        push(&writer, record(201));
        assert_eq!(written(&writer, &out), [200, 201], "nothing held after it");
    }

    #[test]
    fn a_nested_poll_leaves_its_lines_to_the_outer_one() {
        let (writer, out) = writer();
        poll_as_a_connection(&mut noop(), |cx| {
            poll_as_a_connection(cx, |_| {
                push(&writer, record(200));
                Poll::Ready(())
            });
            assert!(written(&writer, &out).is_empty(), "still in the outer poll");
            Poll::Ready(())
        });
        assert_eq!(written(&writer, &out), [200]);
    }
}
