//! The fake's Admin API (`/v1/organizations/api_keys`): list with `after_id`/`limit`/`has_more`,
//! get one, update name and status. It needs an admin key (`x-api-key` or Bearer); it cannot
//! create or delete keys, like the real one.

use std::sync::Arc;

use axum::{
    body::Bytes,
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiKey, KeyStatus, Shared, credential, error};

/// The API's `partial_key_hint`: the key's prefix through its kind, three characters, `...`,
/// and the last four, e.g. `sk-ant-api03-R2D...igAA`.
pub fn partial_key_hint(key: &str) -> String {
    let prefix_end = key.match_indices('-').nth(2).map_or(0, |(i, _)| i + 1);
    let chars: Vec<char> = key.chars().collect();
    if chars.len() < prefix_end + 7 {
        return "...".into();
    }
    let head: String = key[prefix_end..].chars().take(3).collect();
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{}{head}...{tail}", &key[..prefix_end])
}

fn key_json(k: &ApiKey) -> Value {
    json!({
        "id": k.id,
        "type": "api_key",
        "name": k.name,
        "status": k.status,
        "created_at": k.created_at,
        "created_by": { "id": "user_fake", "type": "user" },
        "partial_key_hint": partial_key_hint(&k.value),
        "workspace_id": null,
    })
}

pub(super) fn require_admin(shared: &Shared, headers: &HeaderMap) -> Result<(), Box<Response>> {
    let ok = credential(headers).is_some_and(|c| shared.inner().admin_keys.iter().any(|a| a == c));
    if ok {
        Ok(())
    } else {
        Err(Box::new(error(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "invalid x-api-key",
        )))
    }
}

#[derive(Deserialize)]
pub(super) struct ListQuery {
    after_id: Option<String>,
    before_id: Option<String>,
    limit: Option<usize>,
    status: Option<KeyStatus>,
}

pub(super) async fn list(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Response {
    if let Err(r) = require_admin(&shared, &headers) {
        return *r;
    }
    let limit = q.limit.unwrap_or(20).clamp(1, 1000);
    let inner = shared.inner();
    let keys: Vec<&ApiKey> = inner
        .keys
        .iter()
        .filter(|k| q.status.is_none_or(|s| k.status == s))
        .collect();
    let start = match &q.after_id {
        Some(after) => keys
            .iter()
            .position(|k| &k.id == after)
            .map_or(keys.len(), |p| p + 1),
        None => 0,
    };
    let end = match &q.before_id {
        Some(before) => keys
            .iter()
            .position(|k| &k.id == before)
            .unwrap_or(keys.len()),
        None => keys.len(),
    };
    let page: Vec<&ApiKey> = keys[start.min(end)..end]
        .iter()
        .take(limit)
        .copied()
        .collect();
    let has_more = start + page.len() < end;
    axum::Json(json!({
        "data": page.iter().map(|k| key_json(k)).collect::<Vec<_>>(),
        "has_more": has_more,
        "first_id": page.first().map(|k| k.id.clone()),
        "last_id": page.last().map(|k| k.id.clone()),
    }))
    .into_response()
}

pub(super) async fn get(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(r) = require_admin(&shared, &headers) {
        return *r;
    }
    match shared.inner().keys.iter().find(|k| k.id == id) {
        Some(k) => axum::Json(key_json(k)).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            "not_found_error",
            "API key not found",
        ),
    }
}

#[derive(Deserialize)]
struct Update {
    name: Option<String>,
    status: Option<KeyStatus>,
}

pub(super) async fn update(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    if let Err(r) = require_admin(&shared, &headers) {
        return *r;
    }
    let Ok(update) = serde_json::from_slice::<Update>(&body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "body must be {name?, status?} with status active|inactive|archived",
        );
    };
    let mut inner = shared.inner();
    let Some(key) = inner.keys.iter_mut().find(|k| k.id == id) else {
        return error(
            StatusCode::NOT_FOUND,
            "not_found_error",
            "API key not found",
        );
    };
    if key.status == KeyStatus::Archived && update.status.is_some_and(|s| s != KeyStatus::Archived)
    {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "an archived key cannot be changed",
        );
    }
    if let Some(name) = update.name {
        key.name = name;
    }
    if let Some(status) = update.status {
        key.status = status;
    }
    axum::Json(key_json(key)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hint_has_the_api_shape() {
        assert_eq!(
            partial_key_hint("sk-ant-api03-R2Dxxxxxxxxxxxxxxxxxxxxxxxx-igAA"),
            "sk-ant-api03-R2D...igAA"
        );
        assert_eq!(partial_key_hint("short"), "...");
    }
}
