//! An answer on its way to the client: an upstream body passed frame by frame (through the SSE
//! transformer when it is an event stream) or a buffered message, owning the request's
//! [`Exchange`] so the audit line is written when the body ends, fails, or is dropped because
//! the client went away. It ends when hyper is told so: a tail the transformer still held (text
//! kept back for redaction, a last partial event) is handed on first, and a client gone before
//! it was taken is `client_closed`.

use std::{
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;

use super::{
    body::BoxError,
    exchange::{Exchange, Outcome},
    sse::SseTransformer,
};

pub struct Observed<B: Body> {
    inner: B,
    sse: Option<SseTransformer>,
    exchange: Option<Exchange>,
    /// The upstream's body ended and the transformer's tail was handed on: the exchange
    /// completes when hyper asks for the next frame.
    tail_sent: bool,
    /// The inner body's size is the client's (set for a buffered answer, which hyper then sends
    /// with its `content-length`).
    sized: bool,
}

impl<B: Body> Observed<B> {
    pub fn new(inner: B, sse: Option<SseTransformer>, exchange: Exchange) -> Self {
        Self {
            inner,
            sse,
            exchange: Some(exchange),
            tail_sent: false,
            sized: false,
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

impl Observed<Full<Bytes>> {
    /// A buffered answer: its exchange completes once hyper has taken all of it, so the audit
    /// line and the metrics are written after the client's bytes rather than before them, and
    /// a client gone before they were written is `client_closed`.
    pub fn buffered(bytes: Bytes, exchange: Exchange) -> Self {
        let mut body = Self::new(Full::new(bytes), None, exchange);
        body.sized = true;
        body
    }
}

impl<B: Body> Drop for Observed<B> {
    /// A body of known length is dropped by hyper once its last byte is written, without being
    /// asked for its end: if the upstream's body was all read, the answer is complete. Otherwise
    /// the client went away: usage seen so far still settles the reservation, and the outcome
    /// stays client_closed.
    fn drop(&mut self) {
        let ended = self.inner.is_end_stream() && !self.tail_sent;
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

    fn size_hint(&self) -> SizeHint {
        if self.sized {
            self.inner.size_hint()
        } else {
            SizeHint::default()
        }
    }

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            if this.exchange.is_none() {
                return Poll::Ready(None);
            }
            if this.tail_sent {
                this.report(Some(Outcome::Completed));
                return Poll::Ready(None);
            }
            match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => match &mut this.sse {
                        Some(sse) => {
                            let out = sse.push(data);
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
                    if !tail.is_empty() {
                        this.tail_sent = true;
                        return Poll::Ready(Some(Ok(Frame::data(tail))));
                    }
                    this.report(Some(Outcome::Completed));
                    return Poll::Ready(None);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use bytes::Bytes;
    use http::{HeaderMap, Method};
    use http_body_util::BodyExt;

    use super::*;
    use crate::proxy::{audit_sink::AuditSink, exchange::Recorder, metrics::Metrics, sse};

    /// A stream the upstream ended in the middle of a text block: the transformer still holds
    /// the end of the last delta (it may be the start of an address) when the body ends.
    const CUT_SHORT: &str = concat!(
        "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"write to jane@exa\"}}\n\n",
    );

    fn exchange() -> (Exchange, Arc<Mutex<Vec<String>>>) {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let recorder = Arc::new(Recorder {
            metrics: Arc::new(Metrics::default()),
            audit: AuditSink::Memory(lines.clone()),
            shutting_down: Default::default(),
            pod: None,
        });
        let path = "/v1/messages".into();
        (
            Exchange::new(recorder, Method::POST, path, HeaderMap::new()),
            lines,
        )
    }

    fn buffered(message: Bytes) -> (Observed<Full<Bytes>>, Arc<Mutex<Vec<String>>>) {
        let (exchange, lines) = exchange();
        (Observed::buffered(message, exchange), lines)
    }

    fn observed() -> (Observed<Full<Bytes>>, Arc<Mutex<Vec<String>>>) {
        let (exchange, lines) = exchange();
        let sse = SseTransformer::new(Some(sse::tests::tenant(true)));
        let body = Observed::new(
            Full::new(Bytes::from_static(CUT_SHORT.as_bytes())),
            Some(sse),
            exchange,
        );
        (body, lines)
    }

    fn outcome(lines: &Mutex<Vec<String>>) -> String {
        let lines = lines.lock().unwrap();
        assert_eq!(lines.len(), 1, "one audit line per exchange");
        let line: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
        line["outcome"].as_str().unwrap().to_owned()
    }

    async fn data(body: &mut Observed<Full<Bytes>>) -> Option<Bytes> {
        let frame = body.frame().await?.unwrap();
        Some(frame.into_data().unwrap())
    }

    #[tokio::test]
    async fn a_stream_completes_only_once_its_held_back_tail_was_taken() {
        let (mut body, lines) = observed();
        let events = data(&mut body).await.unwrap();
        assert!(!String::from_utf8_lossy(&events).contains("jane@exa"));
        let tail = data(&mut body)
            .await
            .expect("the held-back text comes last");
        assert!(!tail.is_empty());
        assert!(
            lines.lock().unwrap().is_empty(),
            "not complete before the end is asked for"
        );
        assert!(data(&mut body).await.is_none());
        assert_eq!(outcome(&lines), "completed");
    }

    #[tokio::test]
    async fn a_buffered_answer_completes_once_taken_and_keeps_its_length() {
        let message = Bytes::from_static(b"{\"type\":\"message\"}");
        let (body, lines) = buffered(message.clone());
        assert_eq!(body.size_hint().exact(), Some(message.len() as u64));
        assert!(
            lines.lock().unwrap().is_empty(),
            "nothing written before the client's bytes"
        );
        let mut body = body;
        assert_eq!(data(&mut body).await.unwrap(), message);
        // hyper drops a body of known length once it has all of it, without asking for its end.
        drop(body);
        assert_eq!(outcome(&lines), "completed");

        let (body, lines) = buffered(message);
        drop(body);
        assert_eq!(outcome(&lines), "client_closed");
    }

    #[tokio::test]
    async fn a_client_gone_before_taking_the_tail_is_client_closed() {
        let (mut body, lines) = observed();
        data(&mut body).await.unwrap();
        data(&mut body).await.expect("the tail");
        drop(body);
        assert_eq!(outcome(&lines), "client_closed");
    }
}
