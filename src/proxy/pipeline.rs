//! One request through the proxy, in DESIGN.md §6's order: route → authenticate → endpoint and
//! model scope → caps → limits → injection screen → redaction → forward → response (streamed or
//! buffered) → settle tokens → audit line and metrics.

use std::{
    convert::Infallible,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use bytes::Bytes;
use chrono::Utc;
use http::{HeaderMap, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;

use super::{
    Mode,
    audit::{AuditRecord, AuditSink, hash_user},
    auth,
    body::{CLIENT_DISCONNECTED, Observed, ProxyBody, full},
    config::Store,
    error::ApiError,
    forward::{Upstream, copy_response_headers},
    injection::{self, PromptInjectionMode},
    limits::Reservation,
    metrics::{Metrics, Usage},
    redact::Counts,
    request::{self, Facts, MAX_BODY_BYTES},
    scope::{self, Route},
    sse::{SseTransformer, merge_usage},
    tenant::Tenant,
};

/// Metric label for requests refused before they were tied to a ClaudeKey.
const UNAUTHENTICATED: &str = "unauthenticated";

/// What every request needs, shared by all connections.
pub struct Shared {
    pub store: Arc<Store>,
    pub upstream: Upstream,
    pub metrics: Arc<Metrics>,
    pub audit: AuditSink,
    pub mode: Mode,
    pub pod: Option<String>,
}

/// The bookkeeping of one request, finished exactly once: when the response ends, or at once
/// when the proxy answers itself.
struct Ctx {
    tenant: Option<Arc<Tenant>>,
    model_label: String,
    audit: AuditRecord,
    start: Instant,
    reservation: Option<Reservation>,
    counts: Counts,
}

impl Ctx {
    fn finish(
        mut self,
        shared: &Shared,
        status: u16,
        usage: Usage,
        response_counts: Counts,
        error: Option<String>,
    ) {
        if let Some(reservation) = self.reservation.take() {
            reservation.settle(usage.input + usage.output + usage.cache_creation);
        }
        let elapsed = self.start.elapsed();
        self.audit.status = status;
        self.audit.set_usage(&usage);
        self.audit.latency_ms = elapsed.as_secs_f64() * 1000.0;
        self.audit.error = self.audit.error.take().or(error);
        let label = self
            .tenant
            .as_ref()
            .map_or(UNAUTHENTICATED, |t| t.label.as_str());
        shared.metrics.request(
            label,
            &self.model_label,
            &self.audit.endpoint,
            status,
            elapsed,
            &usage,
        );
        if let Some(tenant) = &self.tenant {
            for (name, n) in self
                .counts
                .named(&tenant.redactor)
                .chain(response_counts.named(&tenant.redactor))
            {
                *self.audit.redactions.entry(name.to_string()).or_default() += n;
                shared.metrics.redactions(label, name, n);
            }
        }
        shared.audit.write(&self.audit);
    }
}

/// The hyper service function.
pub async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let audit = AuditRecord {
        time: Utc::now(),
        request_id: request_id(),
        pod: shared.pod.clone(),
        method: req.method().to_string(),
        endpoint: "unknown".into(),
        ..Default::default()
    };
    let request_id = audit.request_id.clone();
    let mut slot = Some(Ctx {
        tenant: None,
        model_label: "none".into(),
        audit,
        start: Instant::now(),
        reservation: None,
        counts: Counts::default(),
    });
    match pipeline(&shared, req, &mut slot).await {
        Ok(response) => Ok(response),
        Err(error) => {
            if let Some(ctx) = slot.take() {
                ctx.finish(
                    &shared,
                    error.status().as_u16(),
                    Usage::default(),
                    Counts::default(),
                    Some(error.kind().into()),
                );
            }
            Ok(error.into_response(&request_id))
        }
    }
}

/// `req_ck_` and 32 hex digits, unique per request: a random per-process half and a counter, so
/// no request pays for a call to the kernel's random source.
fn request_id() -> String {
    static PROCESS: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let process = *PROCESS.get_or_init(|| uuid::Uuid::new_v4().as_u64_pair().0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("req_ck_{process:016x}{n:016x}")
}

fn ctx(slot: &mut Option<Ctx>) -> &mut Ctx {
    slot.as_mut()
        .expect("the context is taken only when the response is built")
}

async fn pipeline(
    shared: &Arc<Shared>,
    req: Request<Incoming>,
    slot: &mut Option<Ctx>,
) -> Result<Response<ProxyBody>, ApiError> {
    let method = req.method().clone();
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let route = scope::classify(&method, &path)?;
    ctx(slot).audit.endpoint = route.label().into();
    let tenant = resolve_tenant(shared, req.headers())?;
    let c = ctx(slot);
    c.audit.claude_key = tenant.label.clone();
    c.audit.namespace = tenant.id.namespace.clone();
    c.tenant = Some(tenant.clone());
    tenant.scope.check_endpoint(route)?;

    let (parts, body) = req.into_parts();
    let replayable =
        route.has_message_body() || matches!(method, Method::GET | Method::HEAD | Method::DELETE);
    if !replayable {
        // Uploads (files, batch operations): streamed through, limited by requests/min only.
        admit(shared, &tenant, slot, None, 0)?;
        let body = body.map_err(Into::into).boxed_unsync();
        let key = &tenant.current_upstream().header;
        let response = send(
            shared,
            &tenant,
            shared
                .upstream
                .request(&method, &path, &parts.headers, key, body)?,
        )
        .await?;
        return Ok(respond(shared, &tenant, route, response, slot).await);
    }
    let mut bytes = Limited::new(body, MAX_BODY_BYTES)
        .collect()
        .await
        .map_err(|_| {
            ApiError::TooLarge(format!(
                "request body exceeds {MAX_BODY_BYTES} bytes or could not be read"
            ))
        })?
        .to_bytes();
    if route.has_message_body() {
        bytes = inspect(shared, &tenant, route, bytes, slot)?;
    } else {
        admit(shared, &tenant, slot, None, 0)?;
    }
    let response = forward_replayable(
        shared,
        &tenant,
        &method,
        &path,
        &parts.headers,
        &bytes,
        slot,
    )
    .await?;
    Ok(respond(shared, &tenant, route, response, slot).await)
}

/// The ClaudeKey a request belongs to: by its workload key in gateway mode, the only one
/// configured in sidecar mode.
fn resolve_tenant(shared: &Shared, headers: &HeaderMap) -> Result<Arc<Tenant>, ApiError> {
    let config = shared
        .store
        .load_full()
        .ok_or_else(|| ApiError::Unavailable("the proxy has no configuration loaded yet".into()))?;
    let now = Utc::now();
    match shared.mode {
        Mode::Gateway => Ok(auth::authenticate(&config.tenants, headers, now)?.clone()),
        Mode::Sidecar => {
            let tenant = config
                .tenants
                .first()
                .ok_or_else(|| ApiError::Unavailable("no ClaudeKey configured".into()))?;
            if tenant.expired(now) {
                return Err(ApiError::Authentication(
                    "this ClaudeKey has expired".into(),
                ));
            }
            Ok(tenant.clone())
        }
    }
}

/// Scope, caps, limits, injection screen and redaction of a Messages-style body; returns the
/// bytes to forward (the original ones when nothing was redacted).
fn inspect(
    shared: &Shared,
    tenant: &Arc<Tenant>,
    route: Route,
    bytes: Bytes,
    slot: &mut Option<Ctx>,
) -> Result<Bytes, ApiError> {
    let mut json = request::parse(&bytes)?;
    let facts = request::facts(&json);
    let c = ctx(slot);
    c.audit.model = facts.model.as_ref().map(|m| m.chars().take(100).collect());
    c.audit.stream = facts.stream;
    c.audit.user_hash = facts.user_id.as_deref().map(hash_user);
    c.model_label = shared.metrics.model_label(tenant, facts.model.as_deref());
    if route == Route::BatchCreate {
        for params in request::batch_params(&json) {
            let facts = request::facts(params);
            check_model(tenant, &facts)?;
            tenant.caps.check(&facts, true)?;
        }
    } else {
        check_model(tenant, &facts)?;
        tenant.caps.check(&facts, route == Route::Messages)?;
    }
    let reserve = if route == Route::Messages {
        facts.max_tokens.unwrap_or(0) + facts.input_chars.div_ceil(4)
    } else {
        0
    };
    admit(shared, tenant, slot, facts.user_id.as_deref(), reserve)?;

    if tenant.injection != PromptInjectionMode::Off {
        let mut hit = None;
        request::visit_texts(&json, false, &mut |text| {
            hit = hit.or_else(|| injection::screen(text))
        });
        if let Some(pattern) = hit {
            ctx(slot).audit.injection_flagged = true;
            let block = tenant.injection == PromptInjectionMode::Block;
            shared
                .metrics
                .injection(&tenant.label, if block { "blocked" } else { "flagged" });
            if block {
                return Err(ApiError::InvalidRequest(format!(
                    "request refused by claudekey's prompt-injection screen (pattern {pattern})"
                )));
            }
        }
    }
    if tenant.redactor.is_empty() {
        return Ok(bytes);
    }
    let counts = &mut ctx(slot).counts;
    if request::rewrite_texts(&mut json, &mut |text| tenant.redactor.redact(text, counts)) {
        let rewritten = serde_json::to_vec(&json).map_err(|_| {
            ApiError::InvalidRequest("request body could not be re-encoded after redaction".into())
        })?;
        return Ok(Bytes::from(rewritten));
    }
    Ok(bytes)
}

fn check_model(tenant: &Tenant, facts: &Facts) -> Result<(), ApiError> {
    match &facts.model {
        Some(model) => tenant.scope.check_model(model),
        None if tenant.scope.has_model_allowlist() => {
            Err(ApiError::InvalidRequest("model: field required".into()))
        }
        None => Ok(()),
    }
}

fn admit(
    shared: &Shared,
    tenant: &Arc<Tenant>,
    slot: &mut Option<Ctx>,
    user: Option<&str>,
    reserve: u64,
) -> Result<(), ApiError> {
    match tenant.limiter.admit(&tenant.limits, user, reserve) {
        Ok(reservation) => {
            ctx(slot).reservation = Some(reservation);
            Ok(())
        }
        Err(refusal) => {
            shared
                .metrics
                .rate_limited(&tenant.label, refusal.limit.label());
            Err(refusal.error)
        }
    }
}

async fn send(
    shared: &Shared,
    tenant: &Tenant,
    request: Request<ProxyBody>,
) -> Result<Response<Incoming>, ApiError> {
    shared.upstream.send(request).await.inspect_err(|e| {
        let kind = if e.status() == StatusCode::GATEWAY_TIMEOUT {
            "timeout"
        } else {
            "connect"
        };
        shared.metrics.upstream_error(&tenant.label, kind);
    })
}

/// Sends with the current upstream key; on a 401 during a grace period, once more with the
/// previous key (the new key may not be active at Anthropic yet).
async fn forward_replayable(
    shared: &Shared,
    tenant: &Tenant,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    bytes: &Bytes,
    slot: &mut Option<Ctx>,
) -> Result<Response<Incoming>, ApiError> {
    let current = tenant.current_upstream();
    ctx(slot).audit.upstream_key = Some(current.fingerprint.clone());
    let request = shared.upstream.request(
        method,
        path,
        headers,
        &current.header,
        Upstream::body(bytes),
    )?;
    let response = send(shared, tenant, request).await?;
    if response.status() != StatusCode::UNAUTHORIZED {
        return Ok(response);
    }
    let Some(previous) = tenant.previous_upstream(Utc::now()) else {
        return Ok(response);
    };
    drop(response);
    shared
        .metrics
        .upstream_error(&tenant.label, "unauthorizedRetried");
    ctx(slot).audit.upstream_key = Some(previous.fingerprint.clone());
    let request = shared.upstream.request(
        method,
        path,
        headers,
        &previous.header,
        Upstream::body(bytes),
    )?;
    send(shared, tenant, request).await
}

async fn respond(
    shared: &Arc<Shared>,
    tenant: &Arc<Tenant>,
    route: Route,
    response: Response<Incoming>,
    slot: &mut Option<Ctx>,
) -> Response<ProxyBody> {
    let status = response.status();
    if status.is_server_error() {
        shared.metrics.upstream_error(&tenant.label, "status5xx");
    }
    let (parts, body) = response.into_parts();
    let c = ctx(slot);
    c.audit.upstream_request_id = parts
        .headers
        .get("request-id")
        .and_then(|v| v.to_str().ok())
        .map(|s| s.chars().take(128).collect());
    let is_sse = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let buffered = route == Route::Messages && status.is_success() && !is_sse;
    let mut out = Response::new(full(Bytes::new()));
    *out.status_mut() = status;
    copy_response_headers(&parts.headers, out.headers_mut(), is_sse || buffered);

    if buffered {
        let ctx = slot
            .take()
            .expect("context present until the response is built");
        let (bytes, usage, counts) = match Limited::new(body, MAX_BODY_BYTES).collect().await {
            Ok(collected) => read_message(tenant, collected.to_bytes()),
            Err(_) => {
                let error = ApiError::BadGateway("the upstream response broke off".into());
                let request_id = ctx.audit.request_id.clone();
                ctx.finish(
                    shared,
                    502,
                    Usage::default(),
                    Counts::default(),
                    Some(error.kind().into()),
                );
                return error.into_response(&request_id);
            }
        };
        ctx.finish(shared, status.as_u16(), usage, counts, None);
        *out.body_mut() = full(bytes);
        return out;
    }
    let ctx = slot
        .take()
        .expect("context present until the response is built");
    let sse = is_sse.then(|| SseTransformer::new(Some(tenant.clone())));
    let shared = shared.clone();
    let label = tenant.label.clone();
    let observed = Observed::new(body, sse, move |summary| {
        // An `error` event after a 200, or a stream the upstream broke off.
        if summary
            .error
            .as_deref()
            .is_some_and(|e| e != CLIENT_DISCONNECTED)
        {
            shared.metrics.upstream_error(&label, "streamError");
        }
        ctx.finish(
            &shared,
            status.as_u16(),
            summary.usage,
            summary.counts,
            summary.error,
        );
    });
    *out.body_mut() = observed.boxed_unsync();
    out
}

/// A complete, non-streamed message: its usage, and its text redacted when the policy asks.
fn read_message(tenant: &Tenant, bytes: Bytes) -> (Bytes, Usage, Counts) {
    let mut usage = Usage::default();
    let mut counts = Counts::default();
    let Ok(mut json) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
        return (bytes, usage, counts);
    };
    if let Some(u) = json.get("usage") {
        merge_usage(&mut usage, u);
    }
    if !tenant.redact_responses || tenant.redactor.is_empty() {
        return (bytes, usage, counts);
    }
    let changed = json.get_mut("content").is_some_and(|content| {
        request::rewrite_content(content, &mut |t| tenant.redactor.redact(t, &mut counts))
    });
    if changed && let Ok(rewritten) = serde_json::to_vec(&json) {
        return (Bytes::from(rewritten), usage, counts);
    }
    (bytes, usage, counts)
}
