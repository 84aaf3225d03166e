//! One request through the proxy, in DESIGN.md §6's order: route → authenticate → endpoint,
//! header and model scope → caps → limits → injection screen → redaction → forward → response
//! (streamed or buffered). Every policy step has one shape, `fn(&Tenant, &mut Exchange)`, and
//! the exchange writes the audit line and metrics when it is dropped (`exchange.rs`).

use std::{convert::Infallible, sync::Arc};

use bytes::Bytes;
use chrono::Utc;
use futures::TryFutureExt as _;
use http::{HeaderMap, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;

use crate::body_budget::{BodyBudget, BodyError};

use super::{
    Mode, audit, auth,
    body::ProxyBody,
    config::Store,
    error::ApiError,
    exchange::{Exchange, Recorder},
    federation::Federation,
    forward::{Credential, Upstream, client_response_headers},
    injection::{self, PromptInjectionMode},
    json::{Duplicates, Json},
    limits::Ask,
    message_scan,
    observed::Observed,
    redact::Counts,
    request::{self, Facts, MAX_BODY_BYTES, Piece},
    scope::{self, Route},
    sse::SseTransformer,
    tenant::Tenant,
    upstream_pool::UpstreamBody,
    usage::Usage,
};

/// What every request needs, shared by all connections.
pub struct Shared {
    pub store: Arc<Store>,
    pub upstream: Upstream,
    /// Access tokens of federation sources (empty otherwise).
    pub federation: Arc<Federation>,
    pub recorder: Arc<Recorder>,
    pub mode: Mode,
    /// Request bodies held at once, and how long a client may take to send one.
    pub bodies: BodyBudget,
}

/// A policy step over one exchange: it reads what earlier steps learned and refuses, or
/// records what it decided.
type Step = fn(&Tenant, &mut Exchange) -> Result<(), ApiError>;

/// A step over a Messages-style body (messages, count_tokens, batch create), which also gets
/// the body's tree: the tree borrows from the body's bytes, so it lives beside the exchange
/// for the request's steps rather than in it.
type BodyStep = for<'b> fn(&Tenant, &mut Exchange, &mut Json<'b>) -> Result<(), ApiError>;

/// The steps of every request, before its body is read.
const REQUEST_STEPS: &[Step] = &[check_endpoint, check_betas];

/// The steps of a Messages-style body, in order, after it is parsed; the limits (`admit`,
/// async: it may ask Redis) come between the two lists.
const BODY_STEPS: &[BodyStep] = &[read_facts, check_scope, check_caps];
const AFTER_ADMIT: &[BodyStep] = &[prescreen, screen, redact];

/// The hyper service function.
pub async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    // Before anything is read or counted: a request held here while the audit log catches up
    // has cost nothing, and one whose client gives up leaves no line. Counted as it starts to
    // wait, so a log that has stopped for good shows in the metrics too.
    let audit = &shared.recorder.audit;
    if !audit.has_room() {
        let _waiting = shared.recorder.metrics.audit_wait();
        if let Err(stopped) = audit.room().await {
            // Fail closed: nothing would audit it. Not an exchange (it would queue a line).
            let id = super::exchange::request_id();
            return Ok(ApiError::Unavailable(stopped.to_string()).into_response(&id));
        }
    }
    let (parts, body) = req.into_parts();
    let mut exchange = exchange_of(&shared, parts);
    match to_upstream(&shared, &mut exchange, body).await {
        Ok(response) => Ok(respond(exchange, response).await),
        Err(error) => {
            exchange.refuse(&error);
            Ok(error.into_response(exchange.request_id()))
        }
    }
}

/// The request's exchange, from its head. A function of its own so the rest of the head (its
/// URI and extensions) is dropped here, not held in the request's future until it ends.
fn exchange_of(shared: &Shared, parts: http::request::Parts) -> Exchange {
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    Exchange::new(shared.recorder.clone(), parts.method, path, parts.headers)
}

/// Everything up to the upstream's response headers.
async fn to_upstream(
    shared: &Shared,
    ex: &mut Exchange,
    body: Incoming,
) -> Result<Response<UpstreamBody>, ApiError> {
    let route = scope::classify(&ex.method, &ex.path)?;
    ex.route = Some(route);
    ex.audit.endpoint = route.label();
    let tenant = resolve_tenant(shared, &ex.headers)?;
    ex.audit.claude_key = tenant.label.clone();
    ex.audit.namespace = tenant.namespace.clone();
    ex.tenant = Some(tenant.clone());
    for step in REQUEST_STEPS {
        step(&tenant, ex)?;
    }

    let replayable = route.has_message_body()
        || matches!(ex.method, Method::GET | Method::HEAD | Method::DELETE);
    if !replayable {
        // Uploads (files, batch operations): streamed through, limited by requests/min only.
        admit(&tenant, ex).await?;
        let body = body.map_err(Into::into).boxed_unsync();
        let credential = credential(shared, &tenant, ex).await?;
        let request =
            shared
                .upstream
                .request(&ex.method, &ex.path, &ex.headers, &credential, body)?;
        ex.sent = true;
        return send(shared, &tenant, request).await;
    }
    read_body(&shared.bodies, body, ex).await?;
    if route.has_message_body() {
        // A second handle on the bytes, so `redact` may replace `ex.body` while the tree
        // still borrows from the client's.
        let client_body = ex.body.clone();
        let (mut json, values) = request::parse(&client_body)?;
        let tree = hold_tree(&shared.bodies, ex, values)?;
        for step in BODY_STEPS {
            step(&tenant, ex, &mut json)?;
        }
        admit(&tenant, ex).await?;
        for step in AFTER_ADMIT {
            step(&tenant, ex, &mut json)?;
        }
        drop(json);
        if let Some(held) = &mut ex.body_held {
            held.give_back(tree);
        }
    } else {
        admit(&tenant, ex).await?;
    }
    forward_replayable(shared, &tenant, ex).await
}

/// The whole request body through the process's body budget: refused with a 413 as soon as
/// it is known to be too large (from its `content-length`, or while it streams in), never
/// after buffering all of it, and with a retryable 503 while other requests hold the budget.
/// Its bytes stay counted until the upstream has answered (`respond`) or the exchange ends.
async fn read_body(bodies: &BodyBudget, body: Incoming, ex: &mut Exchange) -> Result<(), ApiError> {
    let (bytes, held) = bodies.read(&ex.headers, body).await.map_err(|e| match e {
        BodyError::TooLarge(max) => ApiError::TooLarge(format!("request body exceeds {max} bytes")),
        BodyError::Busy => busy(),
        BodyError::Slow => ApiError::Timeout(format!(
            "request body did not arrive within {} s",
            bodies.limits().read_timeout.as_secs()
        )),
        BodyError::Broken => ApiError::InvalidRequest("request body could not be read".into()),
    })?;
    ex.body = bytes;
    ex.body_held = Some(held);
    Ok(())
}

/// Counts a parsed body's tree in the body budget beside the body while the tree lives (a body
/// of small values builds a tree many times its size); the bytes counted.
fn hold_tree(bodies: &BodyBudget, ex: &mut Exchange, values: usize) -> Result<usize, ApiError> {
    let bytes = values.saturating_mul(request::TREE_BYTES_PER_VALUE);
    let held = ex.body_held.as_mut().ok_or_else(busy)?;
    bodies.take(held, bytes).map(|()| bytes).map_err(|e| match e {
        BodyError::TooLarge(max) => ApiError::TooLarge(format!(
            "request body and its {values} JSON values need more than the {max} bytes one request may hold"
        )),
        _ => busy(),
    })
}

/// The refusal while other requests hold the body budget: retryable.
fn busy() -> ApiError {
    ApiError::Unavailable(
        "the proxy is holding too many large request bodies at once; retry".into(),
    )
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
        Mode::Gateway => Ok(auth::authenticate(&config, headers, now)?.clone()),
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

fn check_endpoint(tenant: &Tenant, ex: &mut Exchange) -> Result<(), ApiError> {
    match ex.route {
        Some(route) => tenant.scope.check_endpoint(route),
        None => Err(ApiError::NotFound("no route".into())),
    }
}

fn check_betas(tenant: &Tenant, ex: &mut Exchange) -> Result<(), ApiError> {
    tenant.scope.check_betas(&ex.headers)
}

fn is_batch(ex: &Exchange) -> bool {
    ex.route == Some(Route::BatchCreate)
}

/// The Messages requests of the exchange's body: itself, or each of a batch.
fn messages<'t, 'b>(
    ex: &Exchange,
    json: &'t mut Json<'b>,
) -> Result<impl Iterator<Item = &'t mut Json<'b>> + use<'t, 'b>, ApiError> {
    request::messages_mut(json, is_batch(ex))
}

fn read_facts(tenant: &Tenant, ex: &mut Exchange, json: &mut Json<'_>) -> Result<(), ApiError> {
    let facts = messages(ex, json)?
        .map(Facts::read)
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(first) = facts.first() {
        ex.audit.model = first.model.as_deref().map(|m| audit::clip(m, 100));
        ex.audit.stream = first.stream;
        ex.audit.user_hash = first.user_id.as_deref().map(|u| tenant.user_hasher.hash(u));
        if let Some(model) = &first.model {
            ex.model_label = tenant.scope.model_label(model).clone();
        }
    }
    ex.facts = facts;
    Ok(())
}

fn check_scope(tenant: &Tenant, ex: &mut Exchange, _: &mut Json<'_>) -> Result<(), ApiError> {
    for facts in &ex.facts {
        match &facts.model {
            Some(model) => tenant.scope.check_model(model)?,
            None if tenant.scope.has_model_allowlist() => {
                return Err(ApiError::InvalidRequest("model: field required".into()));
            }
            None => {}
        }
        tenant.scope.check_mcp_servers(&facts.mcp_urls)?;
    }
    Ok(())
}

fn check_caps(tenant: &Tenant, ex: &mut Exchange, _: &mut Json<'_>) -> Result<(), ApiError> {
    let with_max_tokens = ex.route != Some(Route::CountTokens);
    for facts in &ex.facts {
        tenant.caps.check(facts, with_max_tokens)?;
    }
    Ok(())
}

/// Per-key and per-user limits and spend budgets; a Messages request (or each of a batch)
/// reserves its `max_tokens` plus an estimate of its input.
async fn admit(tenant: &Tenant, ex: &mut Exchange) -> Result<(), ApiError> {
    let reserve: u64 = if ex.route == Some(Route::CountTokens) {
        0
    } else {
        ex.facts
            .iter()
            .map(|f| f.max_tokens.unwrap_or(0) + f.text_chars.div_ceil(4))
            .fold(0u64, u64::saturating_add)
    };
    let users: Vec<&str> = ex
        .facts
        .iter()
        .filter_map(|f| f.user_id.as_deref())
        .collect();
    let ask = Ask {
        users: &users,
        reserve_tokens: reserve,
        model: ex.facts.first().and_then(|f| f.model.as_deref()),
    };
    match tenant.limiter.admit(&tenant.limits, ask).await {
        Ok(reservation) => {
            if reservation.user_overflow {
                ex.metrics().user_overflow(&tenant.label);
            }
            ex.reservation = Some(reservation);
            Ok(())
        }
        Err(refusal) => {
            ex.metrics()
                .rate_limited(&tenant.label, refusal.limit.label());
            Err(refusal.error)
        }
    }
}

/// One pass over every text for the patterns of both steps after it (`prescreen.rs`).
fn prescreen(tenant: &Tenant, ex: &mut Exchange, json: &mut Json<'_>) -> Result<(), ApiError> {
    let Some(prescreen) = &tenant.prescreen else {
        return Ok(());
    };
    let mut clear = true;
    for message in messages(ex, json)? {
        clear = clear && prescreen.clears_request(message);
    }
    ex.texts_clear = clear;
    Ok(())
}

/// The prompt-injection screen over everything but the app's own system prompt.
fn screen(tenant: &Tenant, ex: &mut Exchange, json: &mut Json<'_>) -> Result<(), ApiError> {
    if tenant.injection == PromptInjectionMode::Off || ex.texts_clear {
        return Ok(());
    }
    let mut hit = None;
    for message in messages(ex, json)? {
        request::walk(message, &mut |piece| match piece {
            Piece::Text {
                text,
                system: false,
            } => hit = hit.or_else(|| injection::screen(text)),
            Piece::Signed(text) => hit = hit.or_else(|| injection::screen(text)),
            _ => {}
        });
    }
    let Some(pattern) = hit else {
        return Ok(());
    };
    ex.audit.injection_flagged = true;
    let block = tenant.injection == PromptInjectionMode::Block;
    ex.metrics()
        .injection(&tenant.label, if block { "blocked" } else { "flagged" });
    if block {
        return Err(ApiError::InvalidRequest(format!(
            "request refused by claudekey's prompt-injection screen (pattern {pattern})"
        )));
    }
    Ok(())
}

/// Redacts every text the walk visits; the body is re-encoded only when something changed.
fn redact(tenant: &Tenant, ex: &mut Exchange, json: &mut Json<'_>) -> Result<(), ApiError> {
    if tenant.redactor.is_empty() || ex.texts_clear {
        return Ok(());
    }
    let mut changed = false;
    for message in messages(ex, json)? {
        let counts = &mut ex.counts;
        request::walk(message, &mut |piece| {
            if let Piece::Text { text, .. } = piece
                && let Some(new) = tenant.redactor.redact(text, counts)
            {
                *text = new.into();
                changed = true;
            }
        });
    }
    if changed {
        ex.body = Bytes::from(json.to_vec());
    }
    Ok(())
}

/// A combinator, not an `async fn`, for the reason [`Upstream::send`] is one.
fn send<'a>(
    shared: &'a Shared,
    tenant: &'a Tenant,
    request: Request<ProxyBody>,
) -> impl Future<Output = Result<Response<UpstreamBody>, ApiError>> + Send + 'a {
    shared.upstream.send(request).inspect_err(|e| {
        let kind = if e.status() == StatusCode::GATEWAY_TIMEOUT {
            "timeout"
        } else {
            "connect"
        };
        shared.recorder.metrics.upstream_error(&tenant.label, kind);
    })
}

/// The current upstream key, or for a federation source its access token (exchanged when due;
/// a 503 when none can be had). The audit line names the key's fingerprint or the rule.
async fn credential(
    shared: &Shared,
    tenant: &Tenant,
    ex: &mut Exchange,
) -> Result<Credential, ApiError> {
    if let Some(config) = &tenant.federation {
        ex.audit.upstream_key = Some(format!("federation:{}", config.federation_rule_id).into());
        let bearer = shared
            .federation
            .bearer(config, &shared.upstream, &shared.recorder.metrics)
            .await?;
        return Ok(Credential::Bearer(bearer));
    }
    let current = tenant
        .current_upstream()
        .ok_or_else(|| ApiError::Unavailable("no upstream key is configured".into()))?;
    ex.audit.upstream_key = Some(current.fingerprint.clone());
    Ok(Credential::ApiKey(current.header.clone()))
}

/// Sends with the current upstream key; on a 401 during a grace period, once more with the
/// previous key (the new key may not be active at Anthropic yet).
async fn forward_replayable(
    shared: &Shared,
    tenant: &Tenant,
    ex: &mut Exchange,
) -> Result<Response<UpstreamBody>, ApiError> {
    let credential = credential(shared, tenant, ex).await?;
    ex.sent = true;
    let request = shared.upstream.request(
        &ex.method,
        &ex.path,
        &ex.headers,
        &credential,
        Upstream::body(&ex.body),
    )?;
    let response = send(shared, tenant, request).await?;
    if response.status() != StatusCode::UNAUTHORIZED {
        return Ok(response);
    }
    if let (Some(config), Credential::Bearer(sent)) = (&tenant.federation, &credential) {
        shared.federation.refused(config, sent);
        return Ok(response);
    }
    let Some(previous) = tenant.previous_upstream(Utc::now()) else {
        return Ok(response);
    };
    drop(response);
    shared
        .recorder
        .metrics
        .upstream_error(&tenant.label, "unauthorizedRetried");
    ex.audit.upstream_key = Some(previous.fingerprint.clone());
    let request = shared.upstream.request(
        &ex.method,
        &ex.path,
        &ex.headers,
        &Credential::ApiKey(previous.header.clone()),
        Upstream::body(&ex.body),
    )?;
    send(shared, tenant, request).await
}

/// The client's response: a complete message buffered (to redact it and read its usage), every
/// other body streamed; both through [`Observed`], which owns the exchange until the body ends.
///
/// An `async` block rather than an `async fn`: an `async fn` keeps its arguments (the exchange
/// and the response, 960 bytes) twice in its future, and the future is moved whole into the
/// request's (docs/benchmarks-notes.md, "Futures moved whole").
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn keeps its arguments twice"
)]
fn respond(
    mut ex: Exchange,
    response: Response<UpstreamBody>,
) -> impl Future<Output = Response<ProxyBody>> + Send {
    async move {
        let Some(tenant) = ex.tenant.clone() else {
            let error = ApiError::Unavailable("request has no ClaudeKey".into());
            ex.refuse(&error);
            return error.into_response(ex.request_id());
        };
        // The upstream has answered: the request body (kept for a resend) is done with, and so is
        // its place in the body budget, however long the answer streams.
        ex.body = Bytes::new();
        ex.body_held = None;
        let status = response.status();
        if status.is_server_error() {
            ex.metrics().upstream_error(&tenant.label, "status5xx");
        }
        let (parts, body) = response.into_parts();
        ex.audit.status = status.as_u16();
        ex.audit.upstream_request_id = parts
            .headers
            .get("request-id")
            .and_then(|v| v.to_str().ok())
            .map(|s| audit::clip(s, 128));
        let is_sse = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        let buffered = ex.route == Some(Route::Messages) && status.is_success() && !is_sse;
        // The body first: the response is built once, around it.
        let body = if buffered {
            let Ok(collected) = Limited::new(body, MAX_BODY_BYTES).collect().await else {
                let error = ApiError::BadGateway("the upstream response broke off".into());
                ex.refuse(&error);
                return error.into_response(ex.request_id());
            };
            let (bytes, usage, counts) = read_message(&tenant, collected.to_bytes());
            ex.usage = usage;
            ex.response_counts = counts;
            Observed::buffered(bytes, ex).boxed_unsync()
        } else {
            let sse = is_sse.then(|| SseTransformer::new(Some(tenant)));
            Observed::new(body, sse, ex).boxed_unsync()
        };
        let mut out = Response::new(body);
        *out.status_mut() = status;
        *out.headers_mut() = client_response_headers(parts.headers, is_sse || buffered);
        out
    }
}

/// A complete, non-streamed message: its usage, and its text (with citations and tool inputs)
/// redacted when the policy asks. Thinking passes unchanged: its signature covers it.
fn read_message(tenant: &Tenant, bytes: Bytes) -> (Bytes, Usage, Counts) {
    let redactor = (tenant.redact_responses && !tenant.redactor.is_empty())
        .then_some(tenant.redactor.as_ref());
    let suspect = |text: &str| redactor.is_some_and(|r| r.may_rewrite(text));
    match message_scan::scan(&bytes, &suspect) {
        Ok(scanned) if !scanned.suspect => (bytes, scanned.usage, Counts::default()),
        _ => read_message_fully(tenant, bytes),
    }
}

/// [`read_message`] through a [`Json`] tree: what a message that may need redacting (or that
/// is not one JSON object) takes. A repeated key keeps its last value, as a client reads it.
fn read_message_fully(tenant: &Tenant, bytes: Bytes) -> (Bytes, Usage, Counts) {
    let mut usage = Usage::default();
    let mut counts = Counts::default();
    // No budget of values: the upstream's message is bounded by its size, and a message that
    // could not be read would reach the client unredacted.
    let Ok(mut json) = Json::parse(&bytes, Duplicates::LastWins, usize::MAX) else {
        return (bytes, usage, counts);
    };
    if let Some(u) = json.get("usage") {
        usage.merge(u);
    }
    if !tenant.redact_responses || tenant.redactor.is_empty() {
        return (bytes, usage, counts);
    }
    let mut changed = false;
    if let Some(content) = json.get_mut("content") {
        request::walk_content(content, &mut |piece| {
            if let Piece::Text { text, .. } = piece
                && let Some(new) = tenant.redactor.redact(text, &mut counts)
            {
                *text = new.into();
                changed = true;
            }
        });
    }
    if changed {
        return (Bytes::from(json.to_vec()), usage, counts);
    }
    (bytes, usage, counts)
}

#[cfg(test)]
#[path = "pipeline_tests.rs"]
mod tests;
