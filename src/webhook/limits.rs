//! What keeps the webhook alive under a flood (DESIGN.md §5): it fails closed, so its death
//! blocks pod creation cluster-wide. Bodies are refused by their declared length before a byte
//! is buffered, and all bodies in memory at once share one budget, so 50 concurrent 8 MiB
//! AdmissionReviews cost at most the budget, and small real reviews still fit beside them.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Largest AdmissionReview read. The apiserver takes request bodies up to 3 MiB, and an
/// UPDATE review carries the object twice (object and oldObject).
pub const MAX_BODY: usize = 6 * 1024 * 1024;
/// Bytes of request bodies held at once, across all connections and streams.
pub const BODY_BUDGET: usize = 16 * 1024 * 1024;
/// How long a request waits for room in the budget before it is answered 503.
pub const BUDGET_WAIT: Duration = Duration::from_secs(3);
/// A body not complete by then is dropped (slow senders hold budget only this long).
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A client that has not sent a whole request head by then is disconnected.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Open connections at most; more wait in the kernel's accept queue.
pub const MAX_CONNECTIONS: usize = 512;
/// Concurrent HTTP/2 streams per connection.
pub const MAX_STREAMS: u32 = 32;

/// The budget is counted in KiB, so it fits a semaphore's `u32` permits.
const UNIT: usize = 1024;

/// The shared body budget.
#[derive(Clone, Debug)]
pub struct BodyBudget {
    permits: Arc<Semaphore>,
}

impl Default for BodyBudget {
    fn default() -> Self {
        Self::new(BODY_BUDGET)
    }
}

/// Why a body was not read; each maps to the status the client gets.
#[derive(thiserror::Error, Debug, PartialEq, Eq)]
pub enum BodyError {
    /// Declared or actual size over [`MAX_BODY`].
    #[error("request body larger than {MAX_BODY} bytes")]
    TooLarge,
    /// No room in the budget within [`BUDGET_WAIT`].
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

impl BodyBudget {
    /// A budget of `bytes`.
    pub fn new(bytes: usize) -> Self {
        let units = (bytes / UNIT).clamp(1, Semaphore::MAX_PERMITS);
        Self {
            permits: Arc::new(Semaphore::new(units)),
        }
    }

    /// Reads a request body: refused by its declared length first, then within its share of
    /// the budget (the declared length, or [`MAX_BODY`] when undeclared), in bounded time.
    /// The permit is held while the caller works on the bytes.
    pub async fn read(
        &self,
        headers: &HeaderMap,
        body: Body,
    ) -> Result<(Bytes, OwnedSemaphorePermit), BodyError> {
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let claim = match declared {
            Some(n) if n > MAX_BODY as u64 => return Err(BodyError::TooLarge),
            Some(n) => usize::try_from(n).unwrap_or(MAX_BODY),
            None => MAX_BODY,
        };
        let units = u32::try_from(claim.div_ceil(UNIT).max(1)).unwrap_or(u32::MAX);
        let permit =
            tokio::time::timeout(BUDGET_WAIT, self.permits.clone().acquire_many_owned(units))
                .await
                .map_err(|_| BodyError::Busy)?
                .map_err(|_| BodyError::Busy)?;
        let collected =
            tokio::time::timeout(BODY_READ_TIMEOUT, Limited::new(body, claim).collect())
                .await
                .map_err(|_| BodyError::Slow)?;
        match collected {
            Ok(body) => Ok((body.to_bytes(), permit)),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(BodyError::TooLarge),
            Err(_) => Err(BodyError::Broken),
        }
    }

    /// KiB currently free (for tests and metrics).
    pub fn available_kib(&self) -> usize {
        self.permits.available_permits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(len: Option<usize>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(n) = len {
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        }
        h
    }

    #[tokio::test]
    async fn oversized_bodies_are_refused_before_reading() {
        let budget = BodyBudget::new(MAX_BODY);
        // A body that would fail if polled: the declared length alone refuses it.
        let stream = futures::stream::once(async {
            panic!("the body was read");
            #[allow(unreachable_code)]
            Ok::<Bytes, std::io::Error>(Bytes::new())
        });
        let err = budget
            .read(&headers(Some(8 * 1024 * 1024)), Body::from_stream(stream))
            .await
            .unwrap_err();
        assert_eq!(err, BodyError::TooLarge);
        assert_eq!(err.status(), StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[tokio::test]
    async fn undeclared_bodies_stop_at_the_limit() {
        let budget = BodyBudget::new(2 * MAX_BODY);
        let chunk = Bytes::from(vec![b'x'; 1024 * 1024]);
        let stream =
            futures::stream::iter((0..8).map(move |_| Ok::<_, std::io::Error>(chunk.clone())));
        let err = budget
            .read(&headers(None), Body::from_stream(stream))
            .await
            .unwrap_err();
        assert_eq!(err, BodyError::TooLarge);
        assert_eq!(
            budget.available_kib(),
            2 * MAX_BODY / 1024,
            "the claim is returned"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_budget_makes_large_requests_wait_then_503_but_small_ones_fit() {
        let budget = BodyBudget::new(MAX_BODY + 64 * 1024);
        let held = budget
            .read(&headers(Some(MAX_BODY)), Body::from(vec![0u8; MAX_BODY]))
            .await
            .unwrap();
        let err = budget
            .read(&headers(Some(MAX_BODY)), Body::from(vec![0u8; MAX_BODY]))
            .await
            .unwrap_err();
        assert_eq!(err, BodyError::Busy);
        let (small, _p) = budget
            .read(&headers(Some(5)), Body::from("small"))
            .await
            .unwrap();
        assert_eq!(&small[..], b"small");
        drop(held);
        assert!(
            budget
                .read(&headers(Some(MAX_BODY)), Body::from(vec![0u8; MAX_BODY]))
                .await
                .is_ok()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn slow_bodies_time_out_and_give_their_claim_back() {
        let budget = BodyBudget::new(MAX_BODY);
        let stream = futures::stream::pending::<Result<Bytes, std::io::Error>>();
        let err = budget
            .read(&headers(Some(1000)), Body::from_stream(stream))
            .await
            .unwrap_err();
        assert_eq!(err, BodyError::Slow);
        assert_eq!(budget.available_kib(), MAX_BODY / 1024);
    }
}
