//! The fake's `POST /v1/oauth/token` (RFC 7523 jwt-bearer, DESIGN.md §11), as the official SDK
//! calls it: a JSON body with `grant_type`, `assertion`, `federation_rule_id`,
//! `organization_id`, optional `service_account_id` / `workspace_id`, and
//! `anthropic-beta: oauth-2025-04-20,oidc-federation-2026-04-01`. A valid assertion (see
//! `jwt.rs`) whose `jti` was never exchanged before yields `sk-ant-oat01-…` with `expires_in`;
//! the Messages API accepts it as `Authorization: Bearer` (with `anthropic-beta:
//! oauth-2025-04-20`) until it expires. Every refusal is the same opaque `invalid_grant`.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};
use serde::Deserialize;
use serde_json::json;

use super::{Shared, jwt};

pub const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
pub const OAUTH_BETA: &str = "oauth-2025-04-20";
pub const FEDERATION_BETA: &str = "oidc-federation-2026-04-01";

/// A federation rule as configured in the Anthropic Console.
#[derive(Clone, Debug)]
pub struct FederationRule {
    /// `fdrl_…`
    pub id: String,
    pub organization_id: String,
    /// `svac_…`: the service account the tokens act as.
    pub service_account_id: String,
    /// The issuer (`iss`) the rule trusts; its JWKS is fetched on every exchange.
    pub issuer: String,
    pub audience: String,
    /// Exact `sub`, or a prefix ending in `*`.
    pub subject: String,
    /// The access tokens' lifetime (`expires_in`), 60 s to 24 h at Anthropic.
    pub token_lifetime: Duration,
    /// The CA that signs the issuer's serving certificate.
    pub issuer_ca_pem: Vec<u8>,
}

/// One exchange as the fake decided it, for tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExchangeRecord {
    pub rule_id: String,
    /// `None` when a token was issued.
    pub refusal: Option<String>,
    /// SHA-256 of the assertion, so tests can see that none was sent twice.
    pub assertion_sha256: String,
}

#[derive(Debug, Default)]
pub(super) struct OAuthState {
    rules: Vec<FederationRule>,
    used_jti: HashSet<String>,
    /// access token -> (expiry, service account id)
    tokens: HashMap<String, (Instant, String)>,
    exchanges: Vec<ExchangeRecord>,
}

impl OAuthState {
    pub(super) fn add_rule(&mut self, rule: FederationRule) {
        self.rules.retain(|r| r.id != rule.id);
        self.rules.push(rule);
    }

    pub(super) fn exchanges(&self) -> Vec<ExchangeRecord> {
        self.exchanges.clone()
    }

    /// The service account of a live access token.
    pub(super) fn bearer(&self, token: &str, now: Instant) -> Option<String> {
        self.tokens
            .get(token)
            .filter(|(until, _)| now < *until)
            .map(|(_, svac)| svac.clone())
    }

    /// Revokes every access token issued so far (as deleting a federation rule would).
    pub(super) fn revoke_all(&mut self) {
        self.tokens
            .values_mut()
            .for_each(|(until, _)| *until = Instant::now());
    }

    /// Every access token issued so far, for tests that scan for leaks.
    pub(super) fn issued(&self) -> Vec<String> {
        self.tokens.keys().cloned().collect()
    }
}

#[derive(Deserialize)]
struct TokenRequest {
    grant_type: String,
    assertion: String,
    federation_rule_id: String,
    organization_id: String,
    #[serde(default)]
    service_account_id: Option<String>,
    #[serde(default)]
    workspace_id: Option<String>,
}

/// RFC 6749 §5.2 error; the description never says which check failed.
fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    let body = json!({ "error": error, "error_description": description });
    (status, [("request-id", "req_fake_oauth")], axum::Json(body)).into_response()
}

fn invalid_grant() -> Response {
    // The SDK's hint for a 401 is "Ensure your federation rule matches your identity token":
    // the token endpoint answers a failed assertion with 401 invalid_grant.
    oauth_error(
        StatusCode::UNAUTHORIZED,
        "invalid_grant",
        "The identity token could not be exchanged.",
    )
}

fn has_betas(headers: &HeaderMap, wanted: &[&str]) -> bool {
    let sent: Vec<&str> = headers
        .get_all("anthropic-beta")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    wanted.iter().all(|w| sent.contains(w))
}

/// Whether an API request carries the beta that unlocks `Authorization: Bearer`.
pub(super) fn has_oauth_beta(headers: &HeaderMap) -> bool {
    has_betas(headers, &[OAUTH_BETA])
}

pub(super) async fn token(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !has_betas(&headers, &[OAUTH_BETA, FEDERATION_BETA]) {
        // Without the federation beta the request reaches the other OAuth handler.
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "The grant type is not supported.",
        );
    }
    let Ok(request) = serde_json::from_slice::<TokenRequest>(&body) else {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "The request body is not valid.",
        );
    };
    if request.grant_type != GRANT_TYPE {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "The grant type is not supported.",
        );
    }
    let digest = crate::keys::sha256_hex(&request.assertion);
    let rule = shared
        .oauth()
        .rules
        .iter()
        .find(|r| {
            r.id == request.federation_rule_id && r.organization_id == request.organization_id
        })
        .cloned();
    let outcome = match &rule {
        None => Err("no such rule in this organization".to_string()),
        Some(rule) => check(&shared, rule, &request).await,
    };
    let mut state = shared.oauth();
    state.exchanges.push(ExchangeRecord {
        rule_id: request.federation_rule_id.clone(),
        refusal: outcome.as_ref().err().cloned(),
        assertion_sha256: digest,
    });
    let (Ok(()), Some(rule)) = (outcome, rule) else {
        return invalid_grant();
    };
    let access = format!("sk-ant-oat01-{}", random_token());
    let until = Instant::now() + rule.token_lifetime;
    state
        .tokens
        .insert(access.clone(), (until, rule.service_account_id.clone()));
    let body = json!({
        "access_token": access,
        "token_type": "Bearer",
        "expires_in": rule.token_lifetime.as_secs(),
    });
    (
        StatusCode::OK,
        [("request-id", "req_fake_oauth")],
        axum::Json(body),
    )
        .into_response()
}

fn random_token() -> String {
    use rand::{Rng, distr::Alphanumeric};
    rand::rng()
        .sample_iter(Alphanumeric)
        .take(64)
        .map(char::from)
        .collect()
}

/// Everything Anthropic checks about one assertion against one rule; the error is for the
/// fake's records only.
async fn check(
    shared: &Shared,
    rule: &FederationRule,
    request: &TokenRequest,
) -> Result<(), String> {
    if request
        .service_account_id
        .as_ref()
        .is_some_and(|s| *s != rule.service_account_id)
    {
        return Err("service account does not match the rule".into());
    }
    if request
        .workspace_id
        .as_deref()
        .is_some_and(|w| w.is_empty())
    {
        return Err("empty workspace".into());
    }
    let issuer = jwt::issuer(&request.assertion).map_err(|e| e.to_string())?;
    if issuer != rule.issuer {
        return Err("issuer is not the rule's".into());
    }
    let jwks = jwt::fetch_jwks(&rule.issuer, &rule.issuer_ca_pem)
        .await
        .map_err(|e| e.to_string())?;
    let claims = jwt::verify_signature(&request.assertion, &jwks).map_err(|e| e.to_string())?;
    let now = chrono::Utc::now().timestamp();
    jwt::check_claims(&claims, &rule.issuer, &rule.audience, &rule.subject, now)
        .map_err(|e| e.to_string())?;
    // Replay: a token is exchanged once. Tokens without a jti are identified by their hash.
    let id = claims
        .jti
        .clone()
        .unwrap_or_else(|| crate::keys::sha256_hex(&request.assertion));
    if !shared.oauth().used_jti.insert(id) {
        return Err("the identity token was already exchanged (jti replay)".into());
    }
    Ok(())
}
