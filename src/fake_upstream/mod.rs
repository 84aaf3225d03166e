//! The one faithful fake of the Anthropic API that tests, benches and the demo share
//! (DESIGN.md §7): Messages (JSON and SSE with the real event sequence), count_tokens, models,
//! the Admin API's key list/get/update, rate-limit headers, 401 for unknown or inactive keys.
//! It records every request so tests can assert what the upstream saw.

mod admin;
mod jwt;
mod messages;
mod oauth;
mod usage;

pub use admin::partial_key_hint;
pub use messages::sse_events;
pub use oauth::{ExchangeRecord, FederationRule};
pub use usage::UsageRecord;

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use axum::{
    Router,
    body::Bytes,
    extract::{DefaultBodyLimit, Request, State},
    http::{HeaderMap, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde_json::json;

/// What the fake answers to a Messages request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// Always this text.
    Text(String),
    /// The text of the last user message, so tests can see what the upstream received and
    /// exercise response redaction.
    Echo,
}

/// Status of a key in the Admin API.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyStatus {
    Active,
    Inactive,
    Archived,
}

#[derive(Clone, Debug)]
struct ApiKey {
    id: String,
    name: String,
    value: String,
    status: KeyStatus,
    created_at: String,
}

/// One request as the fake received it.
#[derive(Clone, Debug)]
pub struct Received {
    pub method: String,
    /// Path and query.
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Debug)]
struct Behavior {
    reply: Reply,
    delta_delay: Duration,
    chunk_chars: usize,
    /// Answer the next N Messages requests with this status and error type.
    fail_next: Option<(u32, StatusCode, String)>,
    /// Streams end with an `error` event of this type after this many text deltas.
    stream_error: Option<(usize, String)>,
    /// Keep every request for [`FakeUpstream::received`]; off for long benchmark runs.
    recording: bool,
    /// Wait this long before answering any request (after recording it).
    response_delay: Duration,
    /// Cut a reply longer than the request's `max_tokens` there, as the API does.
    stop_at_max_tokens: bool,
}

#[derive(Debug, Default)]
struct Inner {
    keys: Vec<ApiKey>,
    admin_keys: Vec<String>,
    received: Vec<Received>,
    next_id: u64,
    usage: Vec<UsageRecord>,
}

#[derive(Debug)]
pub(crate) struct Shared {
    inner: Mutex<Inner>,
    behavior: Mutex<Behavior>,
    oauth: Mutex<oauth::OAuthState>,
}

impl Shared {
    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn behavior(&self) -> MutexGuard<'_, Behavior> {
        self.behavior.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn oauth(&self) -> MutexGuard<'_, oauth::OAuthState> {
        self.oauth.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn next_id(&self) -> u64 {
        let mut inner = self.inner();
        inner.next_id += 1;
        inner.next_id
    }
}

/// A running fake. Dropping it stops the server.
pub struct FakeUpstream {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeUpstream {
    /// Starts on a free loopback port with the given active API keys.
    pub async fn start(keys: &[&str]) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        Self::serve(listener, keys)
    }

    /// Serves on `listener` (for the example binary and fixed ports).
    pub fn serve(listener: tokio::net::TcpListener, keys: &[&str]) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            inner: Mutex::default(),
            behavior: Mutex::new(Behavior {
                reply: Reply::Text("Hello from the fake Anthropic API.".into()),
                delta_delay: Duration::ZERO,
                chunk_chars: 8,
                fail_next: None,
                stream_error: None,
                recording: true,
                response_delay: Duration::ZERO,
                stop_at_max_tokens: false,
            }),
            oauth: Mutex::default(),
        });
        let app = router(shared.clone());
        // TCP_NODELAY like the real API's edge: without it a paced SSE stream shows Nagle's
        // ~40 ms stalls (small writes waiting for a delayed ACK) in every measurement.
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "fake upstream stopped");
            }
        });
        let fake = Self { addr, shared, task };
        for key in keys {
            fake.add_key(key);
        }
        Ok(fake)
    }

    /// `http://127.0.0.1:PORT`, what the proxy takes as `--upstream`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Adds an active key; returns its Admin API id.
    pub fn add_key(&self, value: &str) -> String {
        let n = self.shared.next_id();
        let id = format!("apikey_fake{n:04}");
        self.shared.inner().keys.push(ApiKey {
            id: id.clone(),
            name: format!("key-{n}"),
            value: value.to_string(),
            status: KeyStatus::Active,
            created_at: "2026-01-01T00:00:00Z".into(),
        });
        id
    }

    pub fn add_admin_key(&self, value: &str) {
        self.shared.inner().admin_keys.push(value.to_string());
    }

    pub fn set_key_status(&self, value: &str, status: KeyStatus) {
        for key in self
            .shared
            .inner()
            .keys
            .iter_mut()
            .filter(|k| k.value == value)
        {
            key.status = status;
        }
    }

    pub fn key_status(&self, value: &str) -> Option<KeyStatus> {
        self.shared
            .inner()
            .keys
            .iter()
            .find(|k| k.value == value)
            .map(|k| k.status)
    }

    pub fn set_reply(&self, reply: Reply) {
        self.shared.behavior().reply = reply;
    }

    /// Pause between SSE text deltas (for streaming tests and benchmarks).
    pub fn set_delta_delay(&self, delay: Duration) {
        self.shared.behavior().delta_delay = delay;
    }

    /// Characters per SSE text delta.
    pub fn set_chunk_chars(&self, chars: usize) {
        self.shared.behavior().chunk_chars = chars.max(1);
    }

    /// Replies longer than the request's `max_tokens` end there with `stop_reason: max_tokens`,
    /// as the API's do. Off by default: tests choose their replies and `max_tokens` freely. On,
    /// one paced upstream serves long streams and short ones (the benchmarks' TTFB phase).
    pub fn set_stop_at_max_tokens(&self, on: bool) {
        self.shared.behavior().stop_at_max_tokens = on;
    }

    /// The next `count` Messages requests fail with `status` and an error of `kind`.
    pub fn fail_next(&self, count: u32, status: StatusCode, kind: &str) {
        self.shared.behavior().fail_next = Some((count, status, kind.to_string()));
    }

    /// Every request is recorded at once and answered only after `delay` (for tests of
    /// clients that give up waiting).
    pub fn set_response_delay(&self, delay: Duration) {
        self.shared.behavior().response_delay = delay;
    }

    /// Whether requests are kept for [`FakeUpstream::received`] (on by default).
    pub fn set_recording(&self, on: bool) {
        self.shared.behavior().recording = on;
    }

    /// Streamed replies stop after `after_deltas` text deltas with an `error` event of `kind`
    /// (as the API does when it overloads mid-stream, after the 200); `None` turns it off.
    pub fn set_stream_error(&self, error: Option<(usize, &str)>) {
        self.shared.behavior().stream_error = error.map(|(n, kind)| (n, kind.to_string()));
    }

    /// Every request received so far.
    pub fn received(&self) -> Vec<Received> {
        self.shared.inner().received.clone()
    }

    pub fn clear_received(&self) {
        self.shared.inner().received.clear();
    }

    /// Configures a federation rule (`POST /v1/oauth/token`); replaces one with the same id.
    pub fn add_federation_rule(&self, rule: FederationRule) {
        self.shared.oauth().add_rule(rule);
    }

    /// Every token exchange so far, with the fake's reason for each refusal.
    pub fn exchanges(&self) -> Vec<ExchangeRecord> {
        self.shared.oauth().exchanges()
    }

    /// Revokes every access token issued so far: they answer 401 from now on.
    pub fn revoke_access_tokens(&self) {
        self.shared.oauth().revoke_all();
    }

    /// Every access token issued so far (for tests that scan for leaks).
    pub fn issued_access_tokens(&self) -> Vec<String> {
        self.shared.oauth().issued()
    }
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/messages", post(messages::create))
        .route("/v1/messages/count_tokens", post(messages::count_tokens))
        .route("/v1/messages/batches", post(messages::create_batch))
        .route("/v1/oauth/token", post(oauth::token))
        .route("/v1/models", get(messages::list_models))
        .route("/v1/models/{id}", get(messages::get_model))
        .route("/v1/organizations/api_keys", get(admin::list))
        .route(
            "/v1/organizations/api_keys/{id}",
            get(admin::get).post(admin::update),
        )
        .route(
            "/v1/organizations/usage_report/messages",
            get(usage::messages_report),
        )
        .fallback(|| async { error(StatusCode::NOT_FOUND, "not_found_error", "Not found") })
        .layer(middleware::from_fn_with_state(shared.clone(), record))
        // The API reads Messages bodies up to 32 MB (batches more); axum's own 2 MB default
        // would refuse large requests the real one takes.
        .layer(DefaultBodyLimit::max(MAX_REQUEST_BYTES))
        .with_state(shared)
}

/// Largest request body read (beyond it: the API's `request_too_large`).
const MAX_REQUEST_BYTES: usize = 64 * 1024 * 1024;

/// Records the request (with its body) before any handler runs.
async fn record(State(shared): State<Arc<Shared>>, request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, MAX_REQUEST_BYTES).await else {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request_too_large",
            "Request too large",
        );
    };
    if !shared.behavior().recording {
        return next
            .run(Request::from_parts(parts, axum::body::Body::from(bytes)))
            .await;
    }
    shared.inner().received.push(Received {
        method: parts.method.to_string(),
        path: parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string(),
        headers: parts
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body: bytes.clone(),
    });
    let delay = shared.behavior().response_delay;
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    next.run(Request::from_parts(parts, axum::body::Body::from(bytes)))
        .await
}

/// The credential from `x-api-key` or `Authorization: Bearer`.
fn credential(headers: &HeaderMap) -> Option<&str> {
    if let Some(key) = headers.get("x-api-key").and_then(|v| v.to_str().ok()) {
        return Some(key);
    }
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}

/// 401 unless the request carries an active API key, or a live federation access token as
/// `Authorization: Bearer` with the OAuth beta; the key's Admin API id (or the token's service
/// account) otherwise.
fn authenticate(shared: &Shared, headers: &HeaderMap) -> Result<String, Box<Response>> {
    if let Some(token) = credential(headers).filter(|c| c.starts_with("sk-ant-oat01-")) {
        let bearer = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("Bearer "));
        let refused = |message| {
            Box::new(error(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                message,
            ))
        };
        if !bearer || !oauth::has_oauth_beta(headers) {
            return Err(refused(
                "OAuth authentication is currently not supported without the oauth beta.",
            ));
        }
        return shared
            .oauth()
            .bearer(token, std::time::Instant::now())
            .ok_or_else(|| refused("Invalid bearer token"));
    }
    let inner = shared.inner();
    credential(headers)
        .and_then(|c| {
            inner
                .keys
                .iter()
                .find(|k| k.value == c && k.status == KeyStatus::Active)
        })
        .map(|k| k.id.clone())
        .ok_or_else(|| {
            Box::new(error(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "invalid x-api-key",
            ))
        })
}

/// An error in the API's shape.
pub(crate) fn error(status: StatusCode, kind: &str, message: &str) -> Response {
    let body = json!({ "type": "error", "error": { "type": kind, "message": message } });
    (status, [("request-id", "req_fake_error")], axum::Json(body)).into_response()
}
