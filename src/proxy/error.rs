//! Errors the proxy makes itself, rendered in the Anthropic API's own shape so the official SDKs
//! raise their usual exception types (`RateLimitError`, `AuthenticationError`, …).

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

use super::body::{ProxyBody, full};

/// A refusal or failure produced by the proxy, never by the upstream (whose errors pass through).
/// Messages are written for the client and never contain keys or prompt text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    InvalidRequest(String),
    #[error("{0}")]
    Authentication(String),
    #[error("{0}")]
    Permission(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    TooLarge(String),
    /// `retry_after` is when trying again can succeed; `retryable` is false when it never can
    /// (a request larger than the whole budget), so SDKs stop retrying at once.
    #[error("{message}")]
    RateLimited {
        message: String,
        retry_after: Duration,
        retryable: bool,
    },
    /// The client did not send its request in time.
    #[error("{0}")]
    Timeout(String),
    #[error("{0}")]
    BadGateway(String),
    #[error("{0}")]
    GatewayTimeout(String),
    #[error("{0}")]
    Unavailable(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::InvalidRequest(_) => StatusCode::BAD_REQUEST,
            Self::Authentication(_) => StatusCode::UNAUTHORIZED,
            Self::Permission(_) => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::BadGateway(_) => StatusCode::BAD_GATEWAY,
            Self::GatewayTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The `error.type` the Anthropic API uses for this status.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::InvalidRequest(_) => "invalid_request_error",
            Self::Authentication(_) => "authentication_error",
            Self::Permission(_) => "permission_error",
            Self::NotFound(_) => "not_found_error",
            Self::TooLarge(_) => "request_too_large",
            Self::RateLimited { .. } => "rate_limit_error",
            Self::BadGateway(_) | Self::Unavailable(_) => "api_error",
            Self::GatewayTimeout(_) | Self::Timeout(_) => "timeout_error",
        }
    }

    /// `{"type":"error","error":{"type":…,"message":…}}`, with `request-id` and the retry headers.
    pub fn into_response(self, request_id: &str) -> Response<ProxyBody> {
        let status = self.status();
        let body = serde_json::json!({
            "type": "error",
            "error": { "type": self.kind(), "message": self.to_string() },
        });
        let mut response = Response::new(full(Bytes::from(body.to_string())));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Ok(id) = HeaderValue::from_str(request_id) {
            headers.insert("request-id", id);
        }
        match &self {
            Self::RateLimited {
                retry_after,
                retryable,
                ..
            } => {
                let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
                headers.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
                if !retryable {
                    headers.insert("x-should-retry", HeaderValue::from_static("false"));
                }
            }
            Self::InvalidRequest(_)
            | Self::Authentication(_)
            | Self::Permission(_)
            | Self::NotFound(_)
            | Self::TooLarge(_) => {
                headers.insert("x-should-retry", HeaderValue::from_static("false"));
            }
            _ => {}
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn body_json(response: Response<ProxyBody>) -> serde_json::Value {
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn rate_limit_is_anthropic_shaped_with_retry_after() {
        let err = ApiError::RateLimited {
            message: "slow down".into(),
            retry_after: Duration::from_millis(1500),
            retryable: true,
        };
        let response = err.into_response("req_1");
        assert_eq!(response.status(), 429);
        assert_eq!(response.headers()["retry-after"], "2");
        assert_eq!(response.headers()["request-id"], "req_1");
        assert!(response.headers().get("x-should-retry").is_none());
        let json = body_json(response).await;
        assert_eq!(json["type"], "error");
        assert_eq!(json["error"]["type"], "rate_limit_error");
        assert_eq!(json["error"]["message"], "slow down");
    }

    #[tokio::test]
    async fn hopeless_rate_limit_says_do_not_retry() {
        let err = ApiError::RateLimited {
            message: "too big".into(),
            retry_after: Duration::ZERO,
            retryable: false,
        };
        let response = err.into_response("r");
        assert_eq!(response.headers()["x-should-retry"], "false");
        assert_eq!(response.headers()["retry-after"], "1");
    }

    #[test]
    fn statuses_and_kinds() {
        let cases = [
            (
                ApiError::InvalidRequest(String::new()),
                400,
                "invalid_request_error",
            ),
            (
                ApiError::Authentication(String::new()),
                401,
                "authentication_error",
            ),
            (ApiError::Permission(String::new()), 403, "permission_error"),
            (ApiError::NotFound(String::new()), 404, "not_found_error"),
            (ApiError::TooLarge(String::new()), 413, "request_too_large"),
            (ApiError::BadGateway(String::new()), 502, "api_error"),
            (
                ApiError::GatewayTimeout(String::new()),
                504,
                "timeout_error",
            ),
        ];
        for (err, status, kind) in cases {
            assert_eq!(err.status().as_u16(), status);
            assert_eq!(err.kind(), kind);
        }
    }
}
