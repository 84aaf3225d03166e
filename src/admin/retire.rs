//! Retiring a replaced upstream key at Anthropic (DESIGN.md §3 step 6) and the revocation drill:
//! the outcomes, their Event reasons/messages, and the admin-key lookup. Never guesses.

use chrono::{DateTime, Utc};
use http::{Method, StatusCode};
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use schemars::JsonSchema;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use super::client::{AdminClient, AdminError, KeyStatus};
use super::hint::{RetireAction, RetireRefusal, decide, find_by_hint, partial_key_hint};
use crate::crd::AnthropicAdminSpec;

/// Event reasons (and `status.retired[].outcome` values of a ClusterClaudeKeySource), one per outcome.
pub mod reason {
    pub const RETIRED: &str = "UpstreamKeyRetired";
    pub const ALREADY_INACTIVE: &str = "UpstreamKeyAlreadyInactive";
    pub const NOT_FOUND: &str = "UpstreamKeyNotFound";
    pub const AMBIGUOUS: &str = "UpstreamKeyAmbiguous";
    pub const FAILED: &str = "UpstreamKeyRetireFailed";
    pub const DRILL_PASSED: &str = "RevocationDrillPassed";
    pub const DRILL_FAILED: &str = "RetiredKeyLive";
    pub const DRILL_INCONCLUSIVE: &str = "RevocationDrillInconclusive";
    pub const REVOKED: &str = "WorkloadKeyRevoked";
}

/// Condition type set (True) when a retired upstream key still answers: loud, a breach risk.
pub const CONDITION_RETIRED_KEY_LIVE: &str = "RetiredKeyLive";

/// The result of retiring one upstream key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RetireOutcome {
    /// The key was active and is now inactive.
    Retired { key_id: String },
    /// The key was already inactive (or archived): nothing to do, a success.
    AlreadyInactive { key_id: String },
    /// No key at Anthropic has this key's hint (deleted, or another organization).
    NotFound,
    /// Several keys share the hint; none was touched.
    Ambiguous { key_ids: Vec<String> },
    /// The Admin API failed; the text never contains a key.
    Failed { error: String },
}

impl RetireOutcome {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Retired { .. } => reason::RETIRED,
            Self::AlreadyInactive { .. } => reason::ALREADY_INACTIVE,
            Self::NotFound => reason::NOT_FOUND,
            Self::Ambiguous { .. } => reason::AMBIGUOUS,
            Self::Failed { .. } => reason::FAILED,
        }
    }

    /// Whether the old key is known to be unusable now.
    pub fn is_success(&self) -> bool {
        matches!(self, Self::Retired { .. } | Self::AlreadyInactive { .. })
    }

    /// `Normal` for successes, `Warning` otherwise (the Event type).
    pub fn event_type(&self) -> &'static str {
        if self.is_success() {
            "Normal"
        } else {
            "Warning"
        }
    }

    /// The Anthropic key id, when one key was identified.
    pub fn key_id(&self) -> Option<&str> {
        match self {
            Self::Retired { key_id } | Self::AlreadyInactive { key_id } => Some(key_id),
            _ => None,
        }
    }

    /// Event message. `hint` is the masked key hint, never the key.
    pub fn message(&self, hint: &str) -> String {
        match self {
            Self::Retired { key_id } => {
                format!("deactivated the replaced upstream key {hint} ({key_id}) at Anthropic")
            }
            Self::AlreadyInactive { key_id } => {
                format!("the replaced upstream key {hint} ({key_id}) was already inactive")
            }
            Self::NotFound => format!(
                "no Anthropic API key matches {hint}; check that the admin key belongs to the key's organization, and deactivate it in the Console"
            ),
            Self::Ambiguous { key_ids } => format!(
                "{} Anthropic API keys match {hint} ({}); none was changed: deactivate the right one in the Console",
                key_ids.len(),
                key_ids.join(", ")
            ),
            Self::Failed { error } => {
                format!("failed to deactivate the replaced upstream key {hint}: {error}")
            }
        }
    }

    /// The record the controller keeps in the source's `status.retired`.
    pub fn record(&self, hint: &str, now: DateTime<Utc>) -> RetiredKeyStatus {
        RetiredKeyStatus {
            key_id: self.key_id().map(str::to_string),
            hint: hint.to_string(),
            outcome: self.reason().to_string(),
            at: now,
            drill: None,
        }
    }
}

/// Suggested status field for the last retired upstream key: the Anthropic key id (not a
/// secret: it cannot authenticate) and the masked hint, never the key.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RetiredKeyStatus {
    /// Anthropic's id of the retired key (apikey_…), when it was identified uniquely.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    /// Masked hint of the retired key (sk-ant-api03-…AA).
    pub hint: String,
    /// The Event reason of the retirement outcome.
    pub outcome: String,
    /// When it was retired (or tried).
    pub at: DateTime<Utc>,
    /// Result of the last revocation drill on it: Passed, Failed or Inconclusive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drill: Option<String>,
}

/// Finds `old_key` at Anthropic by its partial hint (optionally in one workspace) and sets it
/// inactive. Already inactive is a success; no match or several matches change nothing.
pub async fn retire(
    admin: &AdminClient,
    old_key: &SecretString,
    workspace: Option<Option<&str>>,
) -> RetireOutcome {
    let Some(hint) = partial_key_hint(old_key.expose_secret()) else {
        return RetireOutcome::NotFound;
    };
    retire_hint(admin, &hint, workspace).await
}

/// [`retire`] by a recorded `partial_key_hint` instead of the key: the controller keeps only
/// hints in its ledger, so a queued retirement survives the key leaving `proxy.json`.
pub async fn retire_hint(
    admin: &AdminClient,
    hint: &str,
    workspace: Option<Option<&str>>,
) -> RetireOutcome {
    let keys = match admin.list_keys().await {
        Ok(keys) => keys,
        Err(e) => {
            return RetireOutcome::Failed {
                error: e.to_string(),
            };
        }
    };
    match decide(find_by_hint(&keys, hint, workspace)) {
        RetireAction::Deactivate(key_id) => {
            match admin.set_status(&key_id, KeyStatus::Inactive).await {
                Ok(k) if k.status == KeyStatus::Inactive => RetireOutcome::Retired { key_id },
                Ok(k) => RetireOutcome::Failed {
                    error: format!("key {key_id} is still {:?} after the update", k.status),
                },
                Err(e) => RetireOutcome::Failed {
                    error: e.to_string(),
                },
            }
        }
        RetireAction::AlreadyInactive(key_id) => RetireOutcome::AlreadyInactive { key_id },
        RetireAction::Refuse(RetireRefusal::NotFound) => RetireOutcome::NotFound,
        RetireAction::Refuse(RetireRefusal::Ambiguous(key_ids)) => {
            RetireOutcome::Ambiguous { key_ids }
        }
        RetireAction::Refuse(RetireRefusal::UnknownStatus(key_id)) => RetireOutcome::Failed {
            error: format!("key {key_id} has a status this version does not know; left as it is"),
        },
    }
}

/// The controller's step after the grace period of a rolled upstream key: call it with the
/// previous upstream entry's key from the `-proxy` Secret *before* dropping that entry.
pub async fn retire_after_grace(admin: &AdminClient, old_key: &SecretString) -> RetireOutcome {
    let outcome = retire(admin, old_key, None).await;
    tracing::info!(reason = outcome.reason(), key_id = ?outcome.key_id(), "upstream key retirement");
    outcome
}

/// Result of the revocation drill: the retired key tried against `GET /v1/models`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DrillResult {
    /// 401: the key is dead, as it should be.
    Dead,
    /// 2xx: the retired key still works.
    Live,
    /// Anything else (429, 5xx, network): no verdict.
    Inconclusive(String),
}

impl DrillResult {
    pub fn from_status(status: StatusCode) -> Self {
        match status {
            StatusCode::UNAUTHORIZED => Self::Dead,
            s if s.is_success() => Self::Live,
            s => Self::Inconclusive(format!("GET /v1/models answered HTTP {}", s.as_u16())),
        }
    }

    pub fn reason(&self) -> &'static str {
        match self {
            Self::Dead => reason::DRILL_PASSED,
            Self::Live => reason::DRILL_FAILED,
            Self::Inconclusive(_) => reason::DRILL_INCONCLUSIVE,
        }
    }

    /// Short word for status and metrics (bounded).
    pub fn label(&self) -> &'static str {
        match self {
            Self::Dead => "Passed",
            Self::Live => "Failed",
            Self::Inconclusive(_) => "Inconclusive",
        }
    }

    pub fn message(&self, hint: &str) -> String {
        match self {
            Self::Dead => format!("the retired upstream key {hint} is rejected by Anthropic (401)"),
            Self::Live => format!(
                "the retired upstream key {hint} STILL WORKS at Anthropic: deactivate it in the Console now"
            ),
            Self::Inconclusive(why) => {
                format!("could not verify the retired upstream key {hint}: {why}")
            }
        }
    }
}

/// Tries `key` on `GET /v1/models`, as secret scanners verify keys.
pub async fn probe_key(base_url: &str, key: &SecretString) -> DrillResult {
    let client = match AdminClient::new(base_url, key.clone()) {
        Ok(c) => c,
        Err(e) => return DrillResult::Inconclusive(e.to_string()),
    };
    match client
        .send(Method::GET, "/v1/models", None, Some(key), "probe the key")
        .await
    {
        Ok((status, _)) => DrillResult::from_status(status),
        Err(e) => DrillResult::Inconclusive(e.to_string()),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AdminKeyError {
    #[error("failed to read admin key Secret {namespace}/{name}: {source}")]
    Read {
        namespace: String,
        name: String,
        source: kube::Error,
    },
    #[error("failed to read admin key: Secret {namespace}/{name} has no key {key:?}")]
    MissingKey {
        namespace: String,
        name: String,
        key: String,
    },
    #[error("failed to read admin key from Secret {namespace}/{name}: {source}")]
    Client {
        namespace: String,
        name: String,
        source: AdminError,
    },
}

/// The Admin API client of a ClusterClaudeKeySource's `anthropicAdmin`. The admin key is read
/// from the Secret in the operator namespace that it names.
pub async fn admin_client_for(
    client: &Client,
    operator_ns: &str,
    admin: &AnthropicAdminSpec,
    base_url: &str,
) -> Result<AdminClient, AdminKeyError> {
    let r = &admin.admin_key_secret_ref;
    let secret = Api::<Secret>::namespaced(client.clone(), operator_ns)
        .get(&r.name)
        .await
        .map_err(|source| AdminKeyError::Read {
            namespace: operator_ns.to_string(),
            name: r.name.clone(),
            source,
        })?;
    let value = secret
        .data
        .as_ref()
        .and_then(|d| d.get(&r.key))
        .and_then(|v| String::from_utf8(v.0.clone()).ok())
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .ok_or_else(|| AdminKeyError::MissingKey {
            namespace: operator_ns.to_string(),
            name: r.name.clone(),
            key: r.key.clone(),
        })?;
    AdminClient::new(base_url, SecretString::from(value)).map_err(|source| AdminKeyError::Client {
        namespace: operator_ns.to_string(),
        name: r.name.clone(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_have_reasons_types_and_safe_messages() {
        let hint = "sk-ant-api03-…AA";
        let all = [
            RetireOutcome::Retired {
                key_id: "apikey_1".into(),
            },
            RetireOutcome::AlreadyInactive {
                key_id: "apikey_1".into(),
            },
            RetireOutcome::NotFound,
            RetireOutcome::Ambiguous {
                key_ids: vec!["a".into(), "b".into()],
            },
            RetireOutcome::Failed { error: "x".into() },
        ];
        let reasons: std::collections::HashSet<_> = all.iter().map(|o| o.reason()).collect();
        assert_eq!(reasons.len(), all.len());
        assert_eq!(all[0].event_type(), "Normal");
        assert_eq!(all[1].event_type(), "Normal");
        assert!(all[2..].iter().all(|o| o.event_type() == "Warning"));
        assert!(all[3].message(hint).contains("a, b"));
        let rec = all[0].record(hint, Utc::now());
        assert_eq!(rec.key_id.as_deref(), Some("apikey_1"));
        assert_eq!(rec.outcome, reason::RETIRED);
    }

    #[test]
    fn drill_verdicts() {
        assert_eq!(
            DrillResult::from_status(StatusCode::UNAUTHORIZED),
            DrillResult::Dead
        );
        assert_eq!(DrillResult::from_status(StatusCode::OK), DrillResult::Live);
        assert!(matches!(
            DrillResult::from_status(StatusCode::TOO_MANY_REQUESTS),
            DrillResult::Inconclusive(_)
        ));
        assert_eq!(DrillResult::Live.reason(), CONDITION_RETIRED_KEY_LIVE);
    }
}
