//! What keeps the webhook alive under a flood (DESIGN.md §5): it fails closed, so its death
//! blocks pod creation cluster-wide. A body is refused by its declared length before a byte is
//! buffered; the bytes of all bodies in memory are counted against one budget as they arrive
//! (a slow sender holds only what it sent), and part of the budget is kept for requests that
//! declare a small body, so a burst of large AdmissionReviews cannot starve the real ones.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, StatusCode, header};
use http_body_util::BodyExt;

/// Largest AdmissionReview read. The apiserver takes request bodies up to 3 MiB, and an
/// UPDATE review carries the object twice (object and oldObject).
pub const MAX_BODY: usize = 6 * 1024 * 1024;
/// Bytes of request bodies held at once, across all connections and streams.
pub const BODY_BUDGET: usize = 16 * 1024 * 1024;
/// Part of the budget only requests declaring at most [`SMALL`] bytes may use.
pub const RESERVE: usize = 4 * 1024 * 1024;
/// Real reviews are this small (a pod is a few KiB); the reserve serves them.
pub const SMALL: usize = 256 * 1024;
/// A body not complete by then is dropped.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A client that has not sent a whole request head by then is disconnected.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Open connections at most; more wait in the kernel's accept queue.
pub const MAX_CONNECTIONS: usize = 512;
/// Concurrent HTTP/2 streams per connection.
pub const MAX_STREAMS: u32 = 32;
/// Request headers of one HTTP/2 stream at most (hyper's default is 16 MiB; the apiserver
/// sends a few hundred bytes).
pub const MAX_HEADERS: u32 = 64 * 1024;

/// The shared body budget.
#[derive(Clone, Debug)]
pub struct BodyBudget {
    used: Arc<AtomicUsize>,
    total: usize,
    reserve: usize,
}

impl Default for BodyBudget {
    fn default() -> Self {
        Self::new(BODY_BUDGET, RESERVE)
    }
}

/// Why a body was not read; each maps to the status the client gets.
#[derive(thiserror::Error, Debug, PartialEq, Eq)]
pub enum BodyError {
    /// Declared or actual size over [`MAX_BODY`].
    #[error("request body larger than {MAX_BODY} bytes")]
    TooLarge,
    /// The budget is spent by other requests.
    #[error("too many large requests at once; retry")]
    Busy,
    /// The body did not arrive within [`BODY_READ_TIMEOUT`].
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
            Self::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Busy => StatusCode::SERVICE_UNAVAILABLE,
            Self::Slow => StatusCode::REQUEST_TIMEOUT,
            Self::Broken => StatusCode::BAD_REQUEST,
        }
    }
}

/// Bytes one request holds in the budget; given back when dropped (after the answer is built).
#[derive(Debug)]
pub struct Held {
    used: Arc<AtomicUsize>,
    bytes: usize,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

impl BodyBudget {
    /// A budget of `total` bytes, `reserve` of them only for the first [`SMALL`] bytes of a
    /// request.
    pub fn new(total: usize, reserve: usize) -> Self {
        Self {
            used: Arc::default(),
            total,
            reserve: reserve.min(total),
        }
    }

    /// Counts `n` more bytes for `held`, or refuses without waiting. Only a request declared
    /// [`SMALL`] may use the reserve: undeclared and large ones never can, so their first
    /// bytes cannot eat it either.
    fn take(&self, held: &mut Held, small: bool, n: usize) -> bool {
        let limit = if small {
            self.total
        } else {
            self.total - self.reserve
        };
        let taken = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                (used + n <= limit).then_some(used + n)
            })
            .is_ok();
        if taken {
            held.bytes += n;
        }
        taken
    }

    /// Reads a request body within the limits; the [`Held`] bytes stay counted while the
    /// caller works on them.
    pub async fn read(&self, headers: &HeaderMap, body: Body) -> Result<(Bytes, Held), BodyError> {
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > MAX_BODY as u64) {
            return Err(BodyError::TooLarge);
        }
        let small = declared.is_some_and(|n| n <= SMALL as u64);
        let mut held = Held {
            used: self.used.clone(),
            bytes: 0,
        };
        let read = async {
            let mut body = body;
            let mut chunks: Vec<Bytes> = Vec::new();
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|_| BodyError::Broken)?;
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                if held.bytes + data.len() > MAX_BODY {
                    return Err(BodyError::TooLarge);
                }
                if !self.take(&mut held, small, data.len()) {
                    return Err(BodyError::Busy);
                }
                chunks.push(data);
            }
            Ok(chunks)
        };
        let chunks = tokio::time::timeout(BODY_READ_TIMEOUT, read)
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
    use axum::http::HeaderValue;

    const MIB: usize = 1024 * 1024;

    fn headers(len: Option<usize>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(n) = len {
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        }
        h
    }

    fn chunks(n: usize, size: usize) -> Body {
        let chunk = Bytes::from(vec![b'x'; size]);
        Body::from_stream(futures::stream::iter(
            (0..n).map(move |_| Ok::<_, std::io::Error>(chunk.clone())),
        ))
    }

    #[tokio::test]
    async fn oversized_bodies_are_refused_before_reading() {
        let budget = BodyBudget::default();
        // A body that fails the test if polled: the declared length alone refuses it.
        let stream = futures::stream::once(async {
            panic!("the body was read");
            #[allow(unreachable_code)]
            Ok::<Bytes, std::io::Error>(Bytes::new())
        });
        let err = budget
            .read(&headers(Some(8 * MIB)), Body::from_stream(stream))
            .await
            .unwrap_err();
        assert_eq!(err, BodyError::TooLarge);
        assert_eq!(err.status(), StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[tokio::test]
    async fn undeclared_bodies_stop_at_the_limit_and_give_their_bytes_back() {
        let budget = BodyBudget::default();
        let err = budget
            .read(&headers(None), chunks(8, MIB))
            .await
            .unwrap_err();
        assert_eq!(err, BodyError::TooLarge);
        assert_eq!(budget.used(), 0);
        let (bytes, held) = budget.read(&headers(None), chunks(3, MIB)).await.unwrap();
        assert_eq!(bytes.len(), 3 * MIB);
        assert_eq!(budget.used(), 3 * MIB);
        drop(held);
        assert_eq!(budget.used(), 0);
    }

    #[tokio::test]
    async fn large_bodies_cannot_use_the_reserve_small_ones_can() {
        let budget = BodyBudget::new(10 * MIB, 4 * MIB);
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

    #[tokio::test(start_paused = true)]
    async fn slow_bodies_time_out_and_give_their_bytes_back() {
        let budget = BodyBudget::default();
        let first = futures::stream::iter([Ok::<_, std::io::Error>(Bytes::from("abc"))]);
        let stalled = futures::StreamExt::chain(first, futures::stream::pending());
        let err = budget
            .read(&headers(Some(1000)), Body::from_stream(stalled))
            .await
            .unwrap_err();
        assert_eq!(err, BodyError::Slow);
        assert_eq!(budget.used(), 0);
    }
}
