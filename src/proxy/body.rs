//! The one response body type the proxy serves: a boxed stream of bytes, so buffered JSON,
//! passed-through upstream bodies and the SSE transformer all fit one `Response` type.

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};

/// Errors inside a body stream; boxed because they come from hyper, timers or the SSE parser.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Every response body the proxy returns.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// A body that is already complete.
pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

use std::{
    pin::Pin,
    task::{Context, Poll, ready},
};

use http_body::{Body, Frame};

use super::{metrics::Usage, redact::Counts, sse::SseTransformer};

/// What a finished (or abandoned) response body reports to the audit line and the limiter.
#[derive(Debug, Default)]
pub struct Summary {
    pub usage: Usage,
    pub counts: Counts,
    /// `error.type` of an SSE `error` event, or why the stream broke off.
    pub error: Option<String>,
}

type Done = Box<dyn FnOnce(Summary) + Send>;

/// `Summary::error` when the client went away before the body ended.
pub const CLIENT_DISCONNECTED: &str = "client_disconnected";

/// An upstream body on its way to the client: passed frame by frame, through the SSE
/// transformer when it is an event stream, and reported once when it ends, fails, or the client
/// goes away (drop).
pub struct Observed<B> {
    inner: B,
    sse: Option<SseTransformer>,
    done: Option<Done>,
    ended: bool,
}

impl<B> Observed<B> {
    pub fn new(
        inner: B,
        sse: Option<SseTransformer>,
        done: impl FnOnce(Summary) + Send + 'static,
    ) -> Self {
        Self {
            inner,
            sse,
            done: Some(Box::new(done)),
            ended: false,
        }
    }

    fn report(&mut self, error: Option<String>) {
        if let Some(done) = self.done.take() {
            let mut summary = Summary {
                error,
                ..Summary::default()
            };
            if let Some(sse) = &mut self.sse {
                summary.usage = sse.usage;
                summary.counts = std::mem::take(&mut sse.counts);
                summary.error = summary.error.or_else(|| sse.error.take());
            }
            done(summary);
        }
    }
}

impl<B> Drop for Observed<B> {
    fn drop(&mut self) {
        self.report(Some(CLIENT_DISCONNECTED.into()));
    }
}

impl<B> Body for Observed<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            if this.ended {
                return Poll::Ready(None);
            }
            match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => match &mut this.sse {
                        Some(sse) => {
                            let out = sse.push(&data);
                            if !out.is_empty() {
                                return Poll::Ready(Some(Ok(Frame::data(out))));
                            }
                        }
                        None => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    },
                    Err(frame) => return Poll::Ready(Some(Ok(frame))),
                },
                Some(Err(e)) => {
                    this.ended = true;
                    this.report(Some("upstream_stream_error".into()));
                    return Poll::Ready(Some(Err(e.into())));
                }
                None => {
                    this.ended = true;
                    let tail = this
                        .sse
                        .as_mut()
                        .map(SseTransformer::finish)
                        .unwrap_or_default();
                    this.report(None);
                    if !tail.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(tail))));
                    }
                    return Poll::Ready(None);
                }
            }
        }
    }
}
