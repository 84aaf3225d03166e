//! The fake's Messages, count_tokens and models endpoints, with the real SSE event sequence:
//! message_start (with usage), content_block_start, ping, content_block_delta…,
//! content_block_stop, message_delta (cumulative usage), message_stop.

use std::{convert::Infallible, sync::Arc};

use axum::{
    body::{Body, Bytes},
    extract::{Path, State},
    http::{HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};

use super::{Reply, Shared, authenticate, error};

const MODELS: &[(&str, &str)] = &[
    ("claude-sonnet-4-5-20250929", "Claude Sonnet 4.5"),
    ("claude-haiku-4-5-20251001", "Claude Haiku 4.5"),
    ("claude-opus-4-1-20250805", "Claude Opus 4.1"),
];

/// Roughly four characters a token, as the tokenizer averages on English text.
const CHARS_PER_TOKEN: u64 = 4;

fn tokens(chars: usize) -> u64 {
    (chars as u64).div_ceil(CHARS_PER_TOKEN).max(1)
}

/// The reply as generation under `max_tokens` leaves it, and why it stopped.
fn cut_at_max_tokens(mut text: String, max_tokens: u64) -> (String, &'static str) {
    let limit = usize::try_from(max_tokens.saturating_mul(CHARS_PER_TOKEN)).unwrap_or(usize::MAX);
    match text.char_indices().nth(limit) {
        Some((end, _)) => {
            text.truncate(end);
            (text, "max_tokens")
        }
        None => (text, "end_turn"),
    }
}

fn all_text(body: &Value) -> String {
    let mut out = String::new();
    let mut push = |v: &Value| match v {
        Value::String(s) => out.push_str(s),
        Value::Array(blocks) => {
            for b in blocks {
                if let Some(t) = b.get("text").and_then(Value::as_str) {
                    out.push_str(t);
                }
            }
        }
        _ => {}
    };
    if let Some(system) = body.get("system") {
        push(system);
    }
    for m in body
        .get("messages")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(c) = m.get("content") {
            push(c);
        }
    }
    out
}

fn last_user_text(body: &Value) -> String {
    let last = body
        .get("messages")
        .and_then(Value::as_array)
        .and_then(|m| {
            m.iter()
                .rev()
                .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        });
    let Some(content) = last.and_then(|m| m.get("content")) else {
        return String::new();
    };
    match content {
        Value::String(s) => s.clone(),
        Value::Array(blocks) => blocks
            .iter()
            .filter_map(|b| b.get("text").and_then(Value::as_str))
            .collect(),
        _ => String::new(),
    }
}

/// Checks the request as the API does: version header, JSON, model, max_tokens, messages.
fn validate(
    headers: &HeaderMap,
    body: &Bytes,
    needs_max_tokens: bool,
) -> Result<Value, Box<Response>> {
    if headers.get("anthropic-version").is_none() {
        return Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "anthropic-version: header is required",
        )));
    }
    let json: Value = serde_json::from_slice(body).map_err(|_| {
        Box::new(error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid JSON body",
        ))
    })?;
    if json.get("model").and_then(Value::as_str).is_none() {
        return Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "model: Field required",
        )));
    }
    if needs_max_tokens && json.get("max_tokens").and_then(Value::as_u64).is_none() {
        return Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "max_tokens: Field required",
        )));
    }
    if json.get("messages").and_then(Value::as_array).is_none() {
        return Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "messages: Field required",
        )));
    }
    Ok(json)
}

fn rate_limit_headers(headers: &mut HeaderMap, request_id: &str) {
    let reset = HeaderValue::from_static("2026-01-01T00:01:00Z");
    for (name, value) in [
        ("anthropic-ratelimit-requests-limit", "4000"),
        ("anthropic-ratelimit-requests-remaining", "3999"),
        ("anthropic-ratelimit-tokens-limit", "400000"),
        ("anthropic-ratelimit-tokens-remaining", "399000"),
        ("anthropic-ratelimit-input-tokens-limit", "200000"),
        ("anthropic-ratelimit-input-tokens-remaining", "199000"),
        ("anthropic-ratelimit-output-tokens-limit", "80000"),
        ("anthropic-ratelimit-output-tokens-remaining", "79000"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    for name in [
        "anthropic-ratelimit-requests-reset",
        "anthropic-ratelimit-tokens-reset",
        "anthropic-ratelimit-input-tokens-reset",
        "anthropic-ratelimit-output-tokens-reset",
    ] {
        headers.insert(name, reset.clone());
    }
    if let Ok(id) = HeaderValue::from_str(request_id) {
        headers.insert("request-id", id);
    }
    headers.insert(
        "anthropic-organization-id",
        HeaderValue::from_static(FAKE_ORGANIZATION_ID),
    );
}

/// The organization the fake's keys belong to, named in every answer as Anthropic's are.
const FAKE_ORGANIZATION_ID: &str = "5b9e3c1a-0f2d-4e6b-8a7c-1d2e3f4a5b6c";

pub(super) async fn create(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let key_id = match authenticate(&shared, &headers) {
        Ok(id) => id,
        Err(r) => return *r,
    };
    let json = match validate(&headers, &body, true) {
        Ok(json) => json,
        Err(r) => return *r,
    };
    let (reply, delay, chunk_chars, stream_error, stop_at_max_tokens) = {
        let mut b = shared.behavior();
        if let Some((count, status, kind)) = b.fail_next.take() {
            if count > 1 {
                b.fail_next = Some((count - 1, status, kind.clone()));
            }
            return error(status, &kind, "injected failure");
        }
        (
            b.reply.clone(),
            b.delta_delay,
            b.chunk_chars,
            b.stream_error.clone(),
            b.stop_at_max_tokens,
        )
    };
    let text = match reply {
        Reply::Text(t) => t,
        Reply::Echo => last_user_text(&json),
    };
    let (text, stop_reason) = match json.get("max_tokens").and_then(Value::as_u64) {
        Some(max_tokens) if stop_at_max_tokens => cut_at_max_tokens(text, max_tokens),
        _ => (text, "end_turn"),
    };
    let n = shared.next_id();
    let id = format!("msg_fake{n:06}");
    let request_id = format!("req_fake{n:06}");
    let model = json
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let input_tokens = tokens(all_text(&json).chars().count());
    let output_tokens = tokens(text.chars().count());
    shared.record_usage(&key_id, &model, input_tokens, output_tokens);
    let stream = json.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let mut response = if stream {
        let mut events = sse_events(
            &id,
            &model,
            &text,
            input_tokens,
            output_tokens,
            chunk_chars,
            stop_reason,
        );
        if let Some((after, kind)) = stream_error {
            // message_start, content_block_start, ping, then `after` deltas.
            events.truncate(3 + after);
            let data = json!({ "type": "error", "error": { "type": kind, "message": "injected stream error" } });
            events.push(format!("event: error\ndata: {data}\n\n"));
        }
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, Infallible>>(4);
        tokio::spawn(async move {
            let mut deltas = 0;
            for event in events {
                // The pause is between text deltas: the events before the first and after the
                // last (the block's stop, the message's end) follow at once, as the API sends
                // them when the text is done.
                if event.starts_with("event: content_block_delta") {
                    deltas += 1;
                    if deltas > 1 && !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                }
                if tx.send(Ok(Bytes::from(event))).await.is_err() {
                    return;
                }
            }
        });
        let mut r =
            Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx)).into_response();
        r.headers_mut().insert(
            "content-type",
            HeaderValue::from_static("text/event-stream; charset=utf-8"),
        );
        r.headers_mut()
            .insert("cache-control", HeaderValue::from_static("no-cache"));
        r
    } else {
        axum::Json(json!({
            "id": id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{ "type": "text", "text": text }],
            "stop_reason": stop_reason,
            "stop_sequence": null,
            "usage": {
                "input_tokens": input_tokens,
                "output_tokens": output_tokens,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
            },
        }))
        .into_response()
    };
    rate_limit_headers(response.headers_mut(), &request_id);
    response
}

/// The event sequence of one streamed message, each a complete `event:`/`data:` block.
pub fn sse_events(
    id: &str,
    model: &str,
    text: &str,
    input_tokens: u64,
    output_tokens: u64,
    chunk_chars: usize,
    stop_reason: &str,
) -> Vec<String> {
    let event = |name: &str, data: Value| format!("event: {name}\ndata: {data}\n\n");
    let mut events = vec![
        event(
            "message_start",
            json!({ "type": "message_start", "message": {
                "id": id, "type": "message", "role": "assistant", "model": model, "content": [],
                "stop_reason": null, "stop_sequence": null,
                "usage": { "input_tokens": input_tokens, "output_tokens": 1,
                           "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0 }
            }}),
        ),
        event(
            "content_block_start",
            json!({ "type": "content_block_start", "index": 0, "content_block": { "type": "text", "text": "" } }),
        ),
        event("ping", json!({ "type": "ping" })),
    ];
    let chars: Vec<char> = text.chars().collect();
    for piece in chars.chunks(chunk_chars.max(1)) {
        let piece: String = piece.iter().collect();
        events.push(event(
            "content_block_delta",
            json!({ "type": "content_block_delta", "index": 0, "delta": { "type": "text_delta", "text": piece } }),
        ));
    }
    events.push(event(
        "content_block_stop",
        json!({ "type": "content_block_stop", "index": 0 }),
    ));
    events.push(event(
        "message_delta",
        json!({ "type": "message_delta", "delta": { "stop_reason": stop_reason, "stop_sequence": null },
                "usage": { "output_tokens": output_tokens } }),
    ));
    events.push(event("message_stop", json!({ "type": "message_stop" })));
    events
}

pub(super) async fn count_tokens(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(r) = authenticate(&shared, &headers) {
        return *r;
    }
    match validate(&headers, &body, false) {
        Ok(json) => {
            let mut r =
                axum::Json(json!({ "input_tokens": tokens(all_text(&json).chars().count()) }))
                    .into_response();
            rate_limit_headers(r.headers_mut(), "req_fake_count");
            r
        }
        Err(r) => *r,
    }
}

/// `POST /v1/messages/batches`: accepts the batch (its requests are never run) and answers with
/// the batch object the SDKs parse.
pub(super) async fn create_batch(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(r) = authenticate(&shared, &headers) {
        return *r;
    }
    let Some(count) = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|b| b.get("requests").and_then(Value::as_array).map(Vec::len))
    else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "requests: Field required",
        );
    };
    let id = shared.next_id();
    axum::Json(json!({
        "id": format!("msgbatch_fake{id}"),
        "type": "message_batch",
        "processing_status": "in_progress",
        "request_counts": { "processing": count, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0 },
        "created_at": "2026-12-01T00:00:00Z",
        "expires_at": "2026-12-02T00:00:00Z",
        "ended_at": null,
        "cancel_initiated_at": null,
        "archived_at": null,
        "results_url": null,
    }))
    .into_response()
}

fn model_json(id: &str, name: &str) -> Value {
    json!({ "type": "model", "id": id, "display_name": name, "created_at": "2025-09-29T00:00:00Z" })
}

pub(super) async fn list_models(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if let Err(r) = authenticate(&shared, &headers) {
        return *r;
    }
    let data: Vec<Value> = MODELS
        .iter()
        .map(|(id, name)| model_json(id, name))
        .collect();
    axum::Json(json!({
        "data": data,
        "has_more": false,
        "first_id": MODELS[0].0,
        "last_id": MODELS[MODELS.len() - 1].0,
    }))
    .into_response()
}

pub(super) async fn get_model(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(r) = authenticate(&shared, &headers) {
        return *r;
    }
    match MODELS.iter().find(|(m, _)| *m == id) {
        Some((id, name)) => axum::Json(model_json(id, name)).into_response(),
        None => error(StatusCode::NOT_FOUND, "not_found_error", "model not found"),
    }
}
