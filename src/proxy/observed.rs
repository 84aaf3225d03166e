//! An upstream body on its way to the client: passed frame by frame (through the SSE transformer
//! when it is an event stream), owning the request's [`Exchange`] so the audit line is written
//! when the body ends, fails, or is dropped because the client went away.

use std::{
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use http_body::{Body, Frame};

use super::{
    body::BoxError,
    exchange::{Exchange, Outcome},
    sse::SseTransformer,
};

pub struct Observed<B: Body> {
    inner: B,
    sse: Option<SseTransformer>,
    exchange: Option<Exchange>,
}

impl<B: Body> Observed<B> {
    pub fn new(inner: B, sse: Option<SseTransformer>, exchange: Exchange) -> Self {
        Self {
            inner,
            sse,
            exchange: Some(exchange),
        }
    }

    /// Hands what the stream learned to the exchange and, with an outcome, finishes it.
    fn report(&mut self, outcome: Option<Outcome>) {
        let Some(exchange) = self.exchange.as_mut() else {
            return;
        };
        if let Some(sse) = &mut self.sse {
            exchange.usage = sse.usage;
            exchange.response_counts = std::mem::take(&mut sse.counts);
            if let Some(error) = sse.error.take() {
                exchange.audit.error = Some(error);
            }
        }
        if let Some(outcome) = outcome {
            exchange.outcome = outcome;
            // An `error` event after a 200: the upstream failed mid-stream.
            if outcome == Outcome::Completed && exchange.audit.error.is_some() {
                exchange.outcome = Outcome::UpstreamError;
            }
            if exchange.outcome == Outcome::UpstreamError
                && let Some(tenant) = &exchange.tenant
            {
                exchange
                    .metrics()
                    .upstream_error(&tenant.label, "streamError");
            }
            self.exchange = None;
        }
    }
}

impl<B: Body> Drop for Observed<B> {
    /// A body of known length is dropped by hyper once its last byte is written, without being
    /// asked for its end: if the upstream's body was all read, the answer is complete. Otherwise
    /// the client went away: usage seen so far still settles the reservation, and the outcome
    /// stays client_closed.
    fn drop(&mut self) {
        let ended = self.inner.is_end_stream();
        self.report(ended.then_some(Outcome::Completed));
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
            if this.exchange.is_none() {
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
                    if let Some(exchange) = this.exchange.as_mut() {
                        exchange.audit.error = Some("upstream_stream_error".into());
                    }
                    this.report(Some(Outcome::UpstreamError));
                    return Poll::Ready(Some(Err(e.into())));
                }
                None => {
                    let tail = this
                        .sse
                        .as_mut()
                        .map(SseTransformer::finish)
                        .unwrap_or_default();
                    this.report(Some(Outcome::Completed));
                    if !tail.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(tail))));
                    }
                    return Poll::Ready(None);
                }
            }
        }
    }
}
