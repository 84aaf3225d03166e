//! One budget for the request bodies a server holds in memory at once, across all connections
//! and streams: what keeps a flood of large bodies from taking a process down. The webhook
//! (DESIGN.md §5: it fails closed, so its death blocks pod creation cluster-wide) and the proxy
//! (a gateway many namespaces share: one tenant's bodies must not take it down for the rest)
//! read their bodies through it.
//!
//! A body is refused by its declared length before a byte is buffered; the bytes of all bodies
//! are counted as they arrive (a slow sender holds only what it sent) and given back when the
//! request is done with them; part of the budget is kept for requests that declare a small
//! body, so a burst of large ones cannot starve the ordinary ones.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, StatusCode, header};
use http_body_util::BodyExt;

/// The sizes and the time one server reads bodies within.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BodyLimits {
    /// Largest body read.
    pub max_body: usize,
    /// Bytes of bodies held at once.
    pub total: usize,
    /// Part of `total` only requests declaring at most `small` bytes may use.
    pub reserve: usize,
    /// What counts as a small body.
    pub small: usize,
    /// A body not complete by then is dropped.
    pub read_timeout: Duration,
}

/// The shared body budget (cloning shares it).
#[derive(Clone, Debug)]
pub struct BodyBudget {
    used: Arc<AtomicUsize>,
    limits: BodyLimits,
}

/// Why a body was not read; each maps to the status the client gets.
#[derive(thiserror::Error, Debug, PartialEq, Eq)]
pub enum BodyError {
    /// Declared or actual size over the limit (given).
    #[error("request body larger than {0} bytes")]
    TooLarge(usize),
    /// The budget is spent by other requests.
    #[error("too many large requests at once; retry")]
    Busy,
    /// The body did not arrive within the read timeout.
    #[error("request body not received in time")]
    Slow,
    /// The connection failed while reading.
    #[error("failed to read the request body")]
    Broken,
}

impl BodyError {
    /// The HTTP status of the refusal.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Busy => StatusCode::SERVICE_UNAVAILABLE,
            Self::Slow => StatusCode::REQUEST_TIMEOUT,
            Self::Broken => StatusCode::BAD_REQUEST,
        }
    }
}

/// Bytes one request holds in the budget; given back when dropped.
#[derive(Debug)]
pub struct Held {
    used: Arc<AtomicUsize>,
    bytes: usize,
    small: bool,
}

impl Held {
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Gives `n` of the held bytes back before the rest (what the request built and dropped).
    pub fn give_back(&mut self, n: usize) {
        let n = n.min(self.bytes);
        self.used.fetch_sub(n, Ordering::AcqRel);
        self.bytes -= n;
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

impl BodyBudget {
    /// A budget of `limits`; a body that could never fit beside the reserve is refused as too
    /// large (a 413 the client need not retry) rather than as busy.
    pub fn new(limits: BodyLimits) -> Self {
        let reserve = limits.reserve.min(limits.total);
        let limits = BodyLimits {
            reserve,
            max_body: limits.max_body.min(limits.total - reserve),
            ..limits
        };
        Self {
            used: Arc::default(),
            limits,
        }
    }

    pub fn limits(&self) -> &BodyLimits {
        &self.limits
    }

    /// Counts `n` more bytes for `held` (the body's own, or what the request builds from it),
    /// or refuses without waiting: busy while others hold the budget, too large when the
    /// request could never hold that much. Only a request declared small, and holding no more
    /// than a small body in all, may use the reserve: undeclared and large ones never can, so
    /// their first bytes cannot eat it either, nor can a small body that builds a large tree.
    pub fn take(&self, held: &mut Held, n: usize) -> Result<(), BodyError> {
        let small = held.small && held.bytes.saturating_add(n) <= self.limits.small;
        let limit = if small {
            self.limits.total
        } else {
            self.limits.total - self.limits.reserve
        };
        if held.bytes.saturating_add(n) > limit {
            return Err(BodyError::TooLarge(limit));
        }
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|&sum| sum <= limit)
            })
            .map_err(|_| BodyError::Busy)?;
        held.bytes += n;
        Ok(())
    }

    /// Reads a request body within the limits; the [`Held`] bytes stay counted while the
    /// caller works on them.
    pub async fn read<B>(&self, headers: &HeaderMap, body: B) -> Result<(Bytes, Held), BodyError>
    where
        B: http_body::Body<Data = Bytes> + Unpin,
    {
        let max = self.limits.max_body;
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > max as u64) {
            return Err(BodyError::TooLarge(max));
        }
        let mut held = Held {
            used: self.used.clone(),
            bytes: 0,
            small: declared.is_some_and(|n| n <= self.limits.small as u64),
        };
        let read = async {
            let mut body = body;
            let mut chunks: Vec<Bytes> = Vec::new();
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|_| BodyError::Broken)?;
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                if held.bytes + data.len() > max {
                    return Err(BodyError::TooLarge(max));
                }
                self.take(&mut held, data.len())?;
                chunks.push(data);
            }
            Ok(chunks)
        };
        let chunks = tokio::time::timeout(self.limits.read_timeout, read)
            .await
            .map_err(|_| BodyError::Slow)??;
        let bytes = match chunks.len() {
            1 => chunks.into_iter().next().unwrap_or_default(),
            _ => Bytes::from(chunks.concat()),
        };
        Ok((bytes, held))
    }

    /// Bytes currently counted (for tests and metrics).
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use http_body_util::StreamBody;

    const MIB: usize = 1024 * 1024;
    const SMALL: usize = 256 * 1024;

    fn limits(total: usize, reserve: usize) -> BodyLimits {
        BodyLimits {
            max_body: 6 * MIB,
            total,
            reserve,
            small: SMALL,
            read_timeout: Duration::from_secs(10),
        }
    }

    fn headers(len: Option<usize>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(n) = len {
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        }
        h
    }

    type Frames = StreamBody<
        futures::stream::BoxStream<'static, Result<http_body::Frame<Bytes>, std::io::Error>>,
    >;

    fn body(stream: impl futures::Stream<Item = Bytes> + Send + 'static) -> Frames {
        use futures::StreamExt;
        StreamBody::new(stream.map(|b| Ok(http_body::Frame::data(b))).boxed())
    }

    fn chunks(n: usize, size: usize) -> Frames {
        let chunk = Bytes::from(vec![b'x'; size]);
        body(futures::stream::iter((0..n).map(move |_| chunk.clone())))
    }

    #[tokio::test]
    async fn oversized_bodies_are_refused_before_reading() {
        let budget = BodyBudget::new(limits(16 * MIB, 4 * MIB));
        // A body that fails the test if polled: the declared length alone refuses it.
        let stream = futures::stream::once(async {
            panic!("the body was read");
            #[allow(unreachable_code)]
            Bytes::new()
        });
        let err = budget
            .read(&headers(Some(8 * MIB)), body(stream))
            .await
            .unwrap_err();
        assert_eq!(err, BodyError::TooLarge(6 * MIB));
        assert_eq!(err.status(), StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[tokio::test]
    async fn undeclared_bodies_stop_at_the_limit_and_give_their_bytes_back() {
        let budget = BodyBudget::new(limits(16 * MIB, 4 * MIB));
        let err = budget
            .read(&headers(None), chunks(8, MIB))
            .await
            .unwrap_err();
        assert_eq!(err, BodyError::TooLarge(6 * MIB));
        assert_eq!(budget.used(), 0);
        let (bytes, held) = budget.read(&headers(None), chunks(3, MIB)).await.unwrap();
        assert_eq!(bytes.len(), 3 * MIB);
        assert_eq!((budget.used(), held.bytes()), (3 * MIB, 3 * MIB));
        drop(held);
        assert_eq!(budget.used(), 0);
    }

    #[tokio::test]
    async fn large_bodies_cannot_use_the_reserve_small_ones_can() {
        let budget = BodyBudget::new(limits(10 * MIB, 4 * MIB));
        let (_, big) = budget.read(&headers(None), chunks(6, MIB)).await.unwrap();
        // 6 MiB used: one more large body would need the reserve.
        let err = budget.read(&headers(None), chunks(2, MIB)).await.err();
        assert_eq!(err, Some(BodyError::Busy));
        assert_eq!(budget.used(), 6 * MIB);
        // Undeclared bodies count as large even for their first bytes.
        let err = budget.read(&headers(None), chunks(1, SMALL)).await.err();
        assert_eq!(err, Some(BodyError::Busy));
        let mut small = Vec::new();
        for _ in 0..16 {
            let read = budget.read(&headers(Some(SMALL)), chunks(1, SMALL)).await;
            small.push(read.map(|(_, held)| held).expect("small bodies fit"));
        }
        assert_eq!(budget.used(), 10 * MIB);
        drop((big, small));
        assert_eq!(budget.used(), 0);
    }

    #[tokio::test]
    async fn a_body_that_could_never_fit_is_too_large_not_busy() {
        let budget = BodyBudget::new(limits(4 * MIB, MIB));
        assert_eq!(budget.limits().max_body, 3 * MIB);
        let err = budget.read(&headers(Some(4 * MIB)), chunks(4, MIB)).await;
        assert_eq!(err.err(), Some(BodyError::TooLarge(3 * MIB)));
    }

    #[tokio::test]
    async fn what_a_request_builds_from_its_body_is_counted_with_it() {
        let budget = BodyBudget::new(limits(10 * MIB, 4 * MIB));
        let (_, mut held) = budget.read(&headers(None), chunks(1, MIB)).await.unwrap();
        assert_eq!(budget.take(&mut held, 4 * MIB), Ok(()));
        // Past what one large request may hold (total - reserve): never, not busy.
        let never = Err(BodyError::TooLarge(6 * MIB));
        assert_eq!(budget.take(&mut held, 2 * MIB), never);
        assert_eq!(budget.take(&mut held, usize::MAX), never, "no overflow");
        assert_eq!((budget.used(), held.bytes()), (5 * MIB, 5 * MIB));
        held.give_back(4 * MIB);
        assert_eq!((budget.used(), held.bytes()), (MIB, MIB));
        assert_eq!(budget.take(&mut held, 4 * MIB), Ok(()));
        // Within it, but others hold the rest: busy, retryable.
        let (_, other) = budget.read(&headers(None), chunks(1, MIB)).await.unwrap();
        assert_eq!(budget.take(&mut held, MIB), Err(BodyError::Busy));
        drop((held, other));
        assert_eq!(budget.used(), 0);
    }

    #[tokio::test]
    async fn a_small_body_building_more_than_a_small_body_leaves_the_reserve_alone() {
        let budget = BodyBudget::new(limits(10 * MIB, 4 * MIB));
        let (_, _large) = budget.read(&headers(None), chunks(6, MIB)).await.unwrap();
        let (_, mut held) = budget
            .read(&headers(Some(SMALL)), chunks(1, SMALL))
            .await
            .expect("a small body uses the reserve");
        assert_eq!(
            budget.take(&mut held, MIB),
            Err(BodyError::Busy),
            "its tree may not"
        );
        assert_eq!(budget.used(), 6 * MIB + SMALL);
    }

    #[tokio::test(start_paused = true)]
    async fn slow_bodies_time_out_and_give_their_bytes_back() {
        let budget = BodyBudget::new(limits(16 * MIB, 4 * MIB));
        let first = futures::stream::iter([Bytes::from("abc")]);
        let stalled = futures::StreamExt::chain(first, futures::stream::pending());
        let err = budget
            .read(&headers(Some(1000)), body(stalled))
            .await
            .unwrap_err();
        assert_eq!(err, BodyError::Slow);
        assert_eq!(budget.used(), 0);
    }
}
