//! Retiring replaced upstream keys at Anthropic (DESIGN.md §3 step 6): after its grace period a
//! previous upstream key is set `inactive` through the Admin API, found by its partial key hint
//! (the Admin API never returns key values). The admin key is read from the operator namespace.

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::TokioExecutor;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

/// The Admin API version header value.
const ANTHROPIC_VERSION: &str = "2023-06-01";
/// Pages of at most this many keys (the API's maximum).
const PAGE: u32 = 1000;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("failed to call the Anthropic Admin API: {0}")]
    Transport(String),
    #[error("the Anthropic Admin API answered HTTP {status} to {what}")]
    Status { what: &'static str, status: u16 },
    #[error("failed to read the Anthropic Admin API's answer to {what}")]
    Malformed { what: &'static str },
    #[error(
        "{count} active Anthropic keys match hint {hint}; deactivate the right one in the Console"
    )]
    Ambiguous { count: usize, hint: String },
}

/// What became of a retired key.
#[derive(Debug, PartialEq, Eq)]
pub enum Retired {
    /// Set inactive now; the Admin API id of the key.
    Deactivated(String),
    /// No active key matches: already inactive, archived or deleted.
    NotActive,
}

/// The Anthropic-style partial hint of a key: its first 16 characters (`sk-ant-api03-` and
/// three more) and its last four, as the Console and `partial_key_hint` show them.
pub fn hint_of(key: &str) -> String {
    let chars: Vec<char> = key.chars().collect();
    if chars.len() < 24 {
        return String::new();
    }
    let head: String = chars[..16].iter().collect();
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{head}...{tail}")
}

/// Whether the API's `partial_key_hint` names the key whose hint we recorded. Either side may
/// show fewer characters, so the shorter prefix and suffix are compared.
pub fn hint_matches(ours: &str, theirs: &str) -> bool {
    let (Some((our_head, our_tail)), Some((their_head, their_tail))) =
        (ours.split_once("..."), theirs.split_once("..."))
    else {
        return false;
    };
    let heads = our_head.starts_with(their_head) || their_head.starts_with(our_head);
    let tails = our_tail.ends_with(their_tail) || their_tail.ends_with(our_tail);
    !their_head.is_empty() && !their_tail.is_empty() && heads && tails
}

#[derive(Deserialize)]
struct KeyList {
    data: Vec<ApiKey>,
    #[serde(default)]
    has_more: bool,
    #[serde(default)]
    last_id: Option<String>,
}

#[derive(Deserialize)]
struct ApiKey {
    id: String,
    #[serde(default)]
    partial_key_hint: Option<String>,
    #[serde(default)]
    status: String,
}

/// A small Admin API client (HTTPS with the webpki roots; plain HTTP for test fakes).
#[derive(Clone)]
pub struct AdminClient {
    base_url: String,
    http: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl AdminClient {
    pub fn new(base_url: &str) -> Self {
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .build();
        Self {
            base_url: base_url.trim_end_matches('/').to_string(),
            http: Client::builder(TokioExecutor::new()).build(connector),
        }
    }

    /// Sets the one active key matching `hint` inactive.
    pub async fn retire(
        &self,
        admin_key: &SecretString,
        hint: &str,
    ) -> Result<Retired, AdminError> {
        let mut matches = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let mut path = format!("/v1/organizations/api_keys?limit={PAGE}");
            if let Some(id) = &after {
                path.push_str(&format!("&after_id={id}"));
            }
            let body = self
                .call(Method::GET, &path, admin_key, None, "list keys")
                .await?;
            let page: KeyList = serde_json::from_slice(&body)
                .map_err(|_| AdminError::Malformed { what: "list keys" })?;
            matches.extend(page.data.into_iter().filter(|k| {
                k.status == "active"
                    && k.partial_key_hint
                        .as_deref()
                        .is_some_and(|h| hint_matches(hint, h))
            }));
            match (page.has_more, page.last_id) {
                (true, Some(last)) => after = Some(last),
                _ => break,
            }
        }
        match matches.as_slice() {
            [] => Ok(Retired::NotActive),
            [key] => {
                let path = format!("/v1/organizations/api_keys/{}", key.id);
                let update = Bytes::from_static(br#"{"status":"inactive"}"#);
                self.call(Method::POST, &path, admin_key, Some(update), "update key")
                    .await?;
                Ok(Retired::Deactivated(key.id.clone()))
            }
            more => Err(AdminError::Ambiguous {
                count: more.len(),
                hint: hint.to_string(),
            }),
        }
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        admin_key: &SecretString,
        body: Option<Bytes>,
        what: &'static str,
    ) -> Result<Bytes, AdminError> {
        let request = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base_url))
            .header("x-api-key", admin_key.expose_secret())
            .header("anthropic-version", ANTHROPIC_VERSION)
            .header("content-type", "application/json")
            .body(Full::new(body.unwrap_or_default()))
            .map_err(|e| AdminError::Transport(e.to_string()))?;
        let response = self
            .http
            .request(request)
            .await
            .map_err(|e| AdminError::Transport(e.to_string()))?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| AdminError::Transport(e.to_string()))?
            .to_bytes();
        if status != StatusCode::OK {
            return Err(AdminError::Status {
                what,
                status: status.as_u16(),
            });
        }
        Ok(bytes)
    }
}

/// Deactivates the upstream keys the ledger queued for retirement. Returns the fingerprints
/// that are done (deactivated now, or no longer active) and an error message for Degraded.
pub async fn retire_queued(
    ck: &crate::crd::ClaudeKey,
    ctx: &super::context::Context,
    ledger: Option<&super::ledger::Ledger>,
) -> (Vec<String>, Option<String>) {
    use kube::runtime::events::EventType;
    let queued = ledger.map(|l| l.retiring.as_slice()).unwrap_or_default();
    let Some(admin) = ck
        .spec
        .anthropic_admin
        .as_ref()
        .filter(|_| !queued.is_empty())
    else {
        return (Vec::new(), None);
    };
    let admin_key = match read_admin_key(ctx, &admin.admin_key_secret_ref).await {
        Ok(key) => key,
        Err(message) => return (Vec::new(), Some(message)),
    };
    let mut done = Vec::new();
    for entry in queued {
        match ctx.admin.retire(&admin_key, &entry.hint).await {
            Ok(outcome) => {
                let note = match &outcome {
                    Retired::Deactivated(id) => format!(
                        "deactivated replaced upstream key {} ({id}) at Anthropic",
                        entry.fingerprint
                    ),
                    Retired::NotActive => format!(
                        "replaced upstream key {} is no longer active at Anthropic",
                        entry.fingerprint
                    ),
                };
                tracing::info!(fingerprint = entry.fingerprint, "{note}");
                let reason = super::conditions::event::UPSTREAM_RETIRED;
                ctx.event(ck, EventType::Normal, reason, note).await;
                done.push(entry.fingerprint.clone());
            }
            Err(e) => {
                let message = format!("failed to retire upstream key {}: {e}", entry.fingerprint);
                tracing::warn!(%message, "Admin API call failed");
                let reason = super::conditions::event::ADMIN_API_ERROR;
                ctx.event(ck, EventType::Warning, reason, message.clone())
                    .await;
                return (done, Some(message));
            }
        }
    }
    (done, None)
}

async fn read_admin_key(
    ctx: &super::context::Context,
    reference: &crate::crd::SecretKeyRef,
) -> Result<SecretString, String> {
    use k8s_openapi::api::core::v1::Secret;
    let source = format!("Secret {}/{}", ctx.namespace, reference.name);
    let api: kube::Api<Secret> = kube::Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let secret = api
        .get_opt(&reference.name)
        .await
        .map_err(|e| {
            format!(
                "failed to read admin key {source}: {}",
                super::apply::safe_reason(&e)
            )
        })?
        .ok_or_else(|| format!("admin key {source} not found"))?;
    let raw = secret
        .data
        .as_ref()
        .and_then(|d| d.get(&reference.key))
        .ok_or_else(|| format!("admin key {source} has no data key {:?}", reference.key))?;
    let value = std::str::from_utf8(&raw.0)
        .map_err(|_| format!("admin key {source} is not UTF-8 text"))?
        .trim();
    Ok(SecretString::from(value.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_look_like_the_consoles_and_match_flexibly() {
        let key = format!("sk-ant-api03-R2D{}igAA", "x".repeat(80));
        let ours = hint_of(&key);
        assert_eq!(ours, "sk-ant-api03-R2D...igAA");
        assert!(hint_matches(&ours, "sk-ant-api03-R2D...igAA"));
        assert!(
            hint_matches(&ours, "sk-ant-api03-R2...gAA"),
            "shorter hint from the API"
        );
        assert!(!hint_matches(&ours, "sk-ant-api03-R2E...igAA"));
        assert!(!hint_matches(&ours, "sk-ant-api03-R2D...igAB"));
        assert!(
            !hint_matches(&ours, "...igAA"),
            "an empty head matches nothing"
        );
        assert_eq!(hint_of("short"), "");
    }
}
