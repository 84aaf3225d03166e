//! The one response body type the proxy serves: a boxed stream of bytes, so buffered JSON,
//! passed-through upstream bodies and the SSE transformer all fit one `Response` type. A leaf:
//! errors build their bodies with it without importing the pipeline.

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
