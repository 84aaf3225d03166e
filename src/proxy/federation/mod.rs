//! Workload identity federation in the proxy (DESIGN.md §11): an identity token (projected file
//! or TokenRequest) is exchanged at `POST /v1/oauth/token` for a short-lived access token, which
//! lives in this process's memory only and goes upstream as `Authorization: Bearer` with
//! `anthropic-beta: oauth-2025-04-20`. One token per source, refreshed well before its end by
//! the first request that finds it due (single flight: the others keep the current token or wait
//! for that one exchange). An identity token that got an answer is never sent again.
//!
//! A failure is an Anthropic-shaped 503 for the client (`api_error`, which SDKs retry), the
//! metric `claudekey_proxy_federation_exchanges_total{source,outcome}`, a log line at most every
//! 30 s per source naming the source and rule (never a token), and the source's health, which
//! the gateway reports on its ClusterClaudeKeySource (`report.rs`).

mod cache;
pub mod identity;
pub mod report;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use secrecy::ExposeSecret;
use serde::Deserialize;

pub use cache::refresh_after;
use cache::{Access, Flight, Next};
pub use identity::{IdentityError, IdentitySource};

use super::{error::ApiError, forward::Upstream, metrics::Metrics};
use crate::{crd::federation_ready, proxyconf::FederationConfig};

pub const TOKEN_PATH: &str = "/v1/oauth/token";
pub const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
pub use super::forward::OAUTH_BETA;
/// Sent on the jwt-bearer exchange only, with the OAuth beta.
pub const FEDERATION_BETA: &str = "oidc-federation-2026-04-01";
/// The SDK's timeout of the exchange.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_ANSWER_BYTES: usize = 1 << 20;
/// At most one log line per source this often.
const LOG_EVERY: Duration = Duration::from_secs(30);

/// How an exchange ended: the bounded `outcome` label, and the condition reason the gateway
/// reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// Anthropic answered with an error (a rule mismatch is `401 invalid_grant`).
    Refused,
    /// No answer (connection, timeout) or an answer that is not a token.
    Unreachable,
    /// The identity token could not be read or requested.
    NoIdentityToken,
    /// The only identity token at hand was already sent, and no access token is left.
    AwaitingNewIdentityToken,
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Refused => "refused",
            Self::Unreachable => "unreachable",
            Self::NoIdentityToken => "noIdentityToken",
            Self::AwaitingNewIdentityToken => "awaitingNewIdentityToken",
        }
    }

    /// The `FederationReady` condition reason (`docs/troubleshooting.md`).
    pub fn reason(self) -> &'static str {
        match self {
            Self::Ok => federation_ready::REASON_TOKEN_EXCHANGED,
            Self::Refused => federation_ready::REASON_EXCHANGE_REFUSED,
            Self::Unreachable => federation_ready::REASON_EXCHANGE_FAILED,
            Self::NoIdentityToken => federation_ready::REASON_NO_IDENTITY_TOKEN,
            Self::AwaitingNewIdentityToken => federation_ready::REASON_IDENTITY_TOKEN_REUSED,
        }
    }
}

/// The last exchange of a source, for status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Health {
    pub outcome: Outcome,
    pub message: String,
}

#[derive(Default)]
struct Slot {
    current: RwLock<Option<Access>>,
    flight: tokio::sync::Mutex<Flight>,
    /// When an access token the upstream refused was last dropped.
    dropped_at: Mutex<Option<Instant>>,
}

/// At most one refused access token is dropped per this long per source: a client that
/// provokes 401s must not make the proxy exchange a token on every request.
pub const DROP_REFUSED_EVERY: Duration = Duration::from_secs(30);

/// Every federation source this proxy serves, and where its identity tokens come from.
pub struct Federation {
    identity: Option<IdentitySource>,
    slots: Mutex<HashMap<FederationConfig, Arc<Slot>>>,
    logged: Mutex<HashMap<String, Instant>>,
    health: Mutex<HashMap<String, Health>>,
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    expires_in: u64,
    #[serde(default)]
    token_type: Option<String>,
}

/// A failed attempt: what the metric, the log, the status and the client see.
struct Failure {
    outcome: Outcome,
    detail: String,
}

impl Federation {
    pub fn new(identity: Option<IdentitySource>) -> Self {
        Self {
            identity,
            slots: Mutex::default(),
            logged: Mutex::default(),
            health: Mutex::default(),
        }
    }

    /// The last outcome per source (by name).
    pub fn health(&self) -> HashMap<String, Health> {
        self.health
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn slot(&self, config: &FederationConfig) -> Arc<Slot> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.entry(config.clone()).or_default().clone()
    }

    /// The `Authorization` value for a request of this source: the current access token, or a
    /// new one when it is due. A 503 when there is none.
    pub async fn bearer(
        &self,
        config: &FederationConfig,
        upstream: &Upstream,
        metrics: &Metrics,
    ) -> Result<HeaderValue, ApiError> {
        let slot = self.slot(config);
        let now = Instant::now();
        if let Some(access) = read(&slot).filter(|a| a.fresh(now)) {
            return Ok(access.header);
        }
        let mut flight = slot.flight.lock().await;
        let now = Instant::now();
        // Another request may have refreshed it while this one waited.
        let current = read(&slot);
        if let Some(access) = current.as_ref().filter(|a| a.fresh(now)) {
            return Ok(access.header.clone());
        }
        let usable = current.filter(|a| a.usable(now));
        if let Some(message) = flight.recent_failure(now) {
            return match usable {
                Some(access) => Ok(access.header),
                None => Err(ApiError::Unavailable(message.to_string())),
            };
        }
        // Boxed: the exchange's future (~4.5 KB) would otherwise be in every federated
        // request's future, though a token is refreshed once in its lifetime.
        match Box::pin(self.refresh(config, upstream, &mut flight)).await {
            Ok(access) => {
                *slot.current.write().unwrap_or_else(|p| p.into_inner()) = Some(access.clone());
                flight.failure = None;
                self.record(config, metrics, Outcome::Ok, "an access token was obtained");
                Ok(access.header)
            }
            Err(failure) => {
                self.record(config, metrics, failure.outcome, &failure.detail);
                if let Some(access) = usable {
                    // The current token still serves; the next request past the retry pause
                    // tries again.
                    flight.failure = Some((now, String::new()));
                    return Ok(access.header);
                }
                let message = format!(
                    "claudekey could not obtain an Anthropic access token for ClusterClaudeKeySource {} (federation rule {}): {}",
                    config.source, config.federation_rule_id, failure.detail
                );
                flight.failure = Some((now, message.clone()));
                Err(ApiError::Unavailable(message))
            }
        }
    }

    /// The upstream answered 401 to a request sent with `sent`: the token was revoked or its
    /// rule changed. Forget it, so the next request exchanges anew instead of sending a token
    /// known to be refused until its refresh time (at most once per [`DROP_REFUSED_EVERY`]).
    pub fn refused(&self, config: &FederationConfig, sent: &HeaderValue) {
        let slot = self.slot(config);
        let now = Instant::now();
        let mut dropped_at = slot.dropped_at.lock().unwrap_or_else(|p| p.into_inner());
        if dropped_at.is_some_and(|at| now < at + DROP_REFUSED_EVERY) {
            return;
        }
        let mut current = slot.current.write().unwrap_or_else(|p| p.into_inner());
        if current.as_ref().is_some_and(|a| a.header == *sent) {
            *current = None;
            *dropped_at = Some(now);
            tracing::warn!(
                source = %config.source,
                "the upstream refused this source's access token; exchanging a new one"
            );
        }
    }

    /// Reads an identity token and exchanges it, unless it was sent before.
    async fn refresh(
        &self,
        config: &FederationConfig,
        upstream: &Upstream,
        flight: &mut Flight,
    ) -> Result<Access, Failure> {
        let identity = self.identity.as_ref().ok_or_else(|| Failure {
            outcome: Outcome::NoIdentityToken,
            detail: IdentityError::Missing.to_string(),
        })?;
        let token = identity
            .token(&config.audience)
            .await
            .map_err(|e| Failure {
                outcome: Outcome::NoIdentityToken,
                detail: e.to_string(),
            })?;
        let digest = crate::keys::sha256_hex(token.expose_secret());
        if flight.next(&digest) == Next::AwaitNew {
            return Err(Failure {
                outcome: Outcome::AwaitingNewIdentityToken,
                detail: "the identity token at hand was already exchanged; waiting for the kubelet to write a new one (the federation rule's token lifetime should be at least the projected token's tokenExpirationSeconds)".into(),
            });
        }
        let (status, body) = exchange(config, token.expose_secret(), upstream).await?;
        // An answer came: this identity token is spent, whatever the answer.
        flight.last_sent = Some(digest);
        if !status.is_success() {
            return Err(Failure {
                outcome: Outcome::Refused,
                detail: format!(
                    "the token exchange was refused (HTTP {}{}); check that the federation rule matches this cluster's issuer, the audience and the subject system:serviceaccount:<namespace>:<name>",
                    status.as_u16(),
                    oauth_error(&body)
                        .map(|e| format!(" {e}"))
                        .unwrap_or_default()
                ),
            });
        }
        let invalid = || Failure {
            outcome: Outcome::Unreachable,
            detail: "the token endpoint's answer is not an access token".into(),
        };
        let answer: TokenAnswer = serde_json::from_slice(&body).map_err(|_| invalid())?;
        if answer
            .token_type
            .as_deref()
            .is_some_and(|t| !t.eq_ignore_ascii_case("bearer"))
            || answer.access_token.is_empty()
            || answer.expires_in == 0
        {
            return Err(invalid());
        }
        let lifetime = Duration::from_secs(answer.expires_in);
        Access::new(&answer.access_token, lifetime, Instant::now()).ok_or_else(invalid)
    }

    /// Metric, rate-limited log line and health of one attempt. Never a token.
    fn record(&self, config: &FederationConfig, metrics: &Metrics, outcome: Outcome, detail: &str) {
        metrics.federation_exchange(&config.source, outcome.label());
        self.health
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                config.source.clone(),
                Health {
                    outcome,
                    message: detail.to_string(),
                },
            );
        if outcome == Outcome::Ok {
            tracing::debug!(source = %config.source, rule = %config.federation_rule_id, "federation access token obtained");
            return;
        }
        let now = Instant::now();
        let mut logged = self.logged.lock().unwrap_or_else(|p| p.into_inner());
        if logged
            .get(&config.source)
            .is_some_and(|at| now < *at + LOG_EVERY)
        {
            return;
        }
        logged.insert(config.source.clone(), now);
        tracing::warn!(
            source = %config.source,
            rule = %config.federation_rule_id,
            outcome = outcome.label(),
            detail,
            "federation token exchange failed"
        );
    }
}

fn read(slot: &Slot) -> Option<Access> {
    slot.current
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
}

/// `error` of an RFC 6749 error answer, when it is a short plain word (never echo a body).
fn oauth_error(body: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let error = value.get("error")?.as_str()?;
    (error.len() <= 64
        && error
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_'))
    .then(|| error.to_string())
}

/// The exchange request body, as the official SDK sends it (JSON).
pub fn exchange_body(config: &FederationConfig, assertion: &str) -> serde_json::Value {
    let mut body = serde_json::json!({
        "grant_type": GRANT_TYPE,
        "assertion": assertion,
        "federation_rule_id": config.federation_rule_id,
        "organization_id": config.organization_id,
        "service_account_id": config.service_account_id,
    });
    if let Some(workspace) = &config.workspace_id {
        body["workspace_id"] = workspace.clone().into();
    }
    body
}

async fn exchange(
    config: &FederationConfig,
    assertion: &str,
    upstream: &Upstream,
) -> Result<(StatusCode, Bytes), Failure> {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(
        "anthropic-beta",
        HeaderValue::from_static("oauth-2025-04-20,oidc-federation-2026-04-01"),
    );
    headers.insert(
        header::USER_AGENT,
        HeaderValue::from_static(concat!("claudekey/", env!("CARGO_PKG_VERSION"))),
    );
    let body = Bytes::from(exchange_body(config, assertion).to_string());
    let send = upstream.post(TOKEN_PATH, headers, body, MAX_ANSWER_BYTES);
    match tokio::time::timeout(EXCHANGE_TIMEOUT, send).await {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(reason)) => Err(Failure {
            outcome: Outcome::Unreachable,
            detail: format!("the token endpoint could not be reached ({reason})"),
        }),
        Err(_) => Err(Failure {
            outcome: Outcome::Unreachable,
            detail: "the token endpoint did not answer in time".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> FederationConfig {
        FederationConfig {
            source: "wif".into(),
            organization_id: "org-1".into(),
            service_account_id: "svac_01".into(),
            federation_rule_id: "fdrl_01".into(),
            workspace_id: None,
            audience: "https://api.anthropic.com".into(),
        }
    }

    #[test]
    fn the_body_is_the_sdks() {
        let body = exchange_body(&config(), "eyJ.a.b");
        assert_eq!(body["grant_type"], GRANT_TYPE);
        assert_eq!(body["assertion"], "eyJ.a.b");
        assert_eq!(body["federation_rule_id"], "fdrl_01");
        assert_eq!(body["organization_id"], "org-1");
        assert_eq!(body["service_account_id"], "svac_01");
        assert!(body.get("workspace_id").is_none());
        let with = FederationConfig {
            workspace_id: Some("wrkspc_1".into()),
            ..config()
        };
        assert_eq!(exchange_body(&with, "x")["workspace_id"], "wrkspc_1");
    }

    #[test]
    fn only_a_plain_oauth_error_word_is_quoted() {
        assert_eq!(
            oauth_error(br#"{"error":"invalid_grant","error_description":"x"}"#),
            Some("invalid_grant".into())
        );
        assert_eq!(oauth_error(br#"{"error":"eyJhbGciOi.x.y"}"#), None);
        assert_eq!(oauth_error(b"not json"), None);
    }
}
