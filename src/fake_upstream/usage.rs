//! The fake's Admin API usage report (`GET /v1/organizations/usage_report/messages`): one time
//! bucket holding every Messages request it answered (per key and model, as the real report
//! attributes usage to the key that was sent) plus what tests added with
//! [`FakeUpstream::add_usage`], grouped by the `group_by[]` dimensions asked for (`api_key_id`,
//! `model`), filtered by `api_key_ids[]`.

use std::sync::Arc;

use axum::{
    extract::{RawQuery, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};

use super::{FakeUpstream, Shared, admin, error};

/// Token counts of one (key, model) pair, as tests set them.
#[derive(Clone, Debug, Default)]
pub struct UsageRecord {
    pub api_key_id: String,
    pub model: String,
    pub uncached_input_tokens: u64,
    pub output_tokens: u64,
    pub cache_read_input_tokens: u64,
    pub cache_creation_5m_input_tokens: u64,
}

impl Shared {
    /// Adds one answered request's tokens to its (key, model) total: bounded memory however
    /// long a benchmark runs.
    pub(super) fn record_usage(&self, api_key_id: &str, model: &str, input: u64, output: u64) {
        let mut inner = self.inner();
        match inner
            .usage
            .iter_mut()
            .find(|r| r.api_key_id == api_key_id && r.model == model)
        {
            Some(r) => {
                r.uncached_input_tokens += input;
                r.output_tokens += output;
            }
            None => inner.usage.push(UsageRecord {
                api_key_id: api_key_id.to_string(),
                model: model.to_string(),
                uncached_input_tokens: input,
                output_tokens: output,
                ..UsageRecord::default()
            }),
        }
    }
}

impl FakeUpstream {
    /// Adds usage that the report will show for `record.api_key_id`.
    pub fn add_usage(&self, record: UsageRecord) {
        self.shared.inner().usage.push(record);
    }
}

pub(super) async fn messages_report(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    if let Err(r) = admin::require_admin(&shared, &headers) {
        return *r;
    }
    let params: Vec<(String, String)> = query
        .as_deref()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    let values = |name: &str| -> Vec<String> {
        params
            .iter()
            .filter(|(k, _)| k == name || *k == format!("{name}[]"))
            .map(|(_, v)| v.clone())
            .collect()
    };
    let Some(starting_at) = values("starting_at").into_iter().next() else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "starting_at: Field required",
        );
    };
    let group_by = values("group_by");
    let key_filter = values("api_key_ids");
    let by_key = group_by.iter().any(|g| g == "api_key_id");
    let by_model = group_by.iter().any(|g| g == "model");
    let mut groups: Vec<(Option<String>, Option<String>, [u64; 4])> = Vec::new();
    for r in shared.inner().usage.iter() {
        if !key_filter.is_empty() && !key_filter.contains(&r.api_key_id) {
            continue;
        }
        let key = by_key.then(|| r.api_key_id.clone());
        let model = by_model.then(|| r.model.clone());
        let counts = [
            r.uncached_input_tokens,
            r.output_tokens,
            r.cache_read_input_tokens,
            r.cache_creation_5m_input_tokens,
        ];
        match groups.iter_mut().find(|g| g.0 == key && g.1 == model) {
            Some(g) => (0..4).for_each(|i| g.2[i] += counts[i]),
            None => groups.push((key, model, counts)),
        }
    }
    let results: Vec<Value> = groups
        .into_iter()
        .map(|(key, model, c)| {
            json!({
                "uncached_input_tokens": c[0],
                "output_tokens": c[1],
                "cache_read_input_tokens": c[2],
                "cache_creation": {
                    "ephemeral_5m_input_tokens": c[3],
                    "ephemeral_1h_input_tokens": 0,
                },
                "server_tool_use": { "web_search_requests": 0 },
                "api_key_id": key,
                "model": model,
                "workspace_id": null,
                "service_tier": null,
                "context_window": null,
            })
        })
        .collect();
    axum::Json(json!({
        "data": [{
            "starting_at": starting_at,
            "ending_at": values("ending_at").into_iter().next(),
            "results": results,
        }],
        "has_more": false,
        "next_page": null,
    }))
    .into_response()
}
