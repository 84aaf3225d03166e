//! The frames of a streamed answer that have already arrived, taken before its head goes out, so
//! the head and the events the upstream sent with it leave in one write, as a bare proxy's do.
//! Without this each event went out in a write (and a TCP segment) of its own: hyper's client
//! hands a body over one chunk at a time through its connection task, and hyper's server
//! flushes whenever the body has nothing ready, so the head and the `message_start`,
//! `content_block_start` and `ping` events that arrive together left in four writes, and the
//! client read the first while the others were still being sent.

use std::{
    collections::VecDeque,
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use http_body::{Body, Frame, SizeHint};

/// Frames taken ahead at most: what arrives together at the start of a stream is a few events;
/// a faster body is not held back from the client longer than this.
const MAX_FRAMES: usize = 16;

pub struct Prefetched<B: Body> {
    ready: VecDeque<Result<Frame<B::Data>, B::Error>>,
    /// The body ended among the frames taken.
    ended: bool,
    inner: B,
}

impl<B: Body + Unpin> Prefetched<B> {
    /// Takes the frames `inner` has ready, letting the task that feeds it run between them,
    /// and stops at the first it has not: nothing here waits for the network.
    pub async fn take_ready(mut inner: B) -> Self {
        let mut ready = VecDeque::new();
        let mut ended = false;
        while ready.len() < MAX_FRAMES {
            let polled =
                std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut inner).poll_frame(cx))).await;
            match polled {
                Poll::Ready(Some(frame)) => {
                    let failed = frame.is_err();
                    ready.push_back(frame);
                    if failed {
                        break;
                    }
                }
                Poll::Ready(None) => {
                    ended = true;
                    break;
                }
                Poll::Pending => break,
            }
            YieldOnce(false).await;
        }
        Self {
            ready,
            ended,
            inner,
        }
    }
}

// The frames taken are only ever moved out, never pinned.
impl<B: Body + Unpin> Unpin for Prefetched<B> {}

impl<B: Body + Unpin> Body for Prefetched<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        if let Some(frame) = this.ready.pop_front() {
            return Poll::Ready(Some(frame));
        }
        if this.ended {
            return Poll::Ready(None);
        }
        Pin::new(&mut this.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.ready.is_empty() && (self.ended || self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        match (self.ready.is_empty(), self.ended) {
            (true, false) => self.inner.size_hint(),
            (true, true) => SizeHint::with_exact(0),
            // Not worth adding up: a streamed answer's size is not announced anyway.
            (false, _) => SizeHint::default(),
        }
    }
}

/// Gives the other tasks one turn. Not `tokio::task::yield_now`: that defers the wake-up until
/// the runtime has polled its I/O driver, one `epoll_wait` more on a one-core proxy each time.
struct YieldOnce(bool);

impl Future for YieldOnce {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0 {
            return Poll::Ready(());
        }
        self.0 = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use http_body_util::{BodyExt, StreamBody};
    use tokio::sync::mpsc;
    use tokio_stream::wrappers::ReceiverStream;

    use super::*;

    type Fed = StreamBody<ReceiverStream<Result<Frame<Bytes>, String>>>;

    /// A body fed one frame at a time by a task of its own, as hyper's client connection feeds
    /// an answer: `frames` are sent as soon as the body has room for one.
    fn fed(frames: Vec<Result<&'static str, &'static str>>) -> Fed {
        let (tx, rx) = mpsc::channel(1);
        tokio::spawn(async move {
            for frame in frames {
                let frame = frame
                    .map(|s| Frame::data(Bytes::from_static(s.as_bytes())))
                    .map_err(String::from);
                if tx.send(frame).await.is_err() {
                    return;
                }
            }
        });
        StreamBody::new(ReceiverStream::new(rx))
    }

    async fn texts<B: Body<Data = Bytes> + Unpin>(body: B) -> Vec<Result<String, B::Error>> {
        let mut body = body;
        let mut out = Vec::new();
        while let Some(frame) = body.frame().await {
            out.push(frame.map(|f| String::from_utf8(f.into_data().unwrap().to_vec()).unwrap()));
        }
        out
    }

    #[tokio::test]
    async fn takes_every_frame_already_there_and_the_end() {
        let body = fed(vec![Ok("message_start"), Ok("block_start"), Ok("ping")]);
        tokio::task::yield_now().await; // the feeder has sent the first frame
        let prefetched = Prefetched::take_ready(body).await;
        assert_eq!(prefetched.ready.len(), 3, "one frame at a time, all taken");
        assert!(prefetched.ended, "the end was there too");
        assert!(
            !prefetched.is_end_stream(),
            "not before its frames are read"
        );
        let got: Vec<_> = texts(prefetched)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(got, ["message_start", "block_start", "ping"]);
    }

    #[tokio::test]
    async fn takes_nothing_and_waits_for_nothing_when_no_frame_is_there() {
        let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, String>>(1);
        let prefetched = Prefetched::take_ready(StreamBody::new(ReceiverStream::new(rx))).await;
        assert!(prefetched.ready.is_empty() && !prefetched.ended);
        assert!(!prefetched.is_end_stream());
        // What comes later passes through, in order.
        tx.send(Ok(Frame::data(Bytes::from_static(b"late"))))
            .await
            .unwrap();
        drop(tx);
        let got: Vec<_> = texts(prefetched)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(got, ["late"]);
    }

    #[tokio::test]
    async fn an_error_among_the_frames_is_kept_in_its_place() {
        let body = fed(vec![Ok("message_start"), Err("broken"), Ok("never")]);
        tokio::task::yield_now().await;
        let prefetched = Prefetched::take_ready(body).await;
        assert_eq!(prefetched.ready.len(), 2, "stops at the error");
        let got = texts(prefetched).await;
        assert_eq!(got[0].as_deref(), Ok("message_start"));
        assert_eq!(got[1].as_deref(), Err(&"broken".to_string()));
    }

    #[tokio::test]
    async fn takes_at_most_a_bounded_number_of_frames() {
        let body = fed(vec![Ok("delta"); MAX_FRAMES + 5]);
        tokio::task::yield_now().await;
        let prefetched = Prefetched::take_ready(body).await;
        assert_eq!(prefetched.ready.len(), MAX_FRAMES);
        assert!(!prefetched.is_end_stream());
        assert_eq!(texts(prefetched).await.len(), MAX_FRAMES + 5, "none lost");
    }
}
