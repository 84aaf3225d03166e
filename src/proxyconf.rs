//! `proxy.json`, the one file in a `<name>-proxy` Secret (DESIGN.md §8): written by the
//! controller, read by the proxy. One file, so the proxy always reloads a consistent whole.

use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize, Serializer};

use crate::crd::{DataProtectionSpec, LimitsSpec, ScopeSpec};

/// File name of the config inside the mounted Secret.
pub const FILE_NAME: &str = "proxy.json";

/// Everything a proxy needs to serve one ClaudeKey.
#[derive(Serialize, Deserialize, Clone, Debug)]
#[serde(rename_all = "camelCase")]
pub struct ProxyConfig {
    pub claude_key: ClaudeKeyRef,
    /// Upstream keys, current first. The first entry with `validUntil: null` is current.
    pub upstream: Vec<UpstreamEntry>,
    /// Accepted workload keys by SHA-256, current first.
    pub workload_keys: Vec<WorkloadKeyEntry>,
    pub policy: Policy,
    /// 64 hex digits: the HMAC key of the audit line's user hash, stable per ClaudeKey so hashes
    /// correlate across pods and restarts. Absent: a random salt per proxy process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit_salt: Option<String>,
    /// Workload identity federation (DESIGN.md §11): present => `upstream` is empty and the
    /// proxy exchanges an identity token for a short-lived access token instead. Not secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub federation: Option<FederationConfig>,
}

/// What the proxy sends to `POST /v1/oauth/token` besides the identity token itself, and the
/// ClusterClaudeKeySource it came from (for metrics, logs and status).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
pub struct FederationConfig {
    pub source: String,
    pub organization_id: String,
    pub service_account_id: String,
    pub federation_rule_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace_id: Option<String>,
    pub audience: String,
}

/// Identity of the ClaudeKey a config belongs to; limits are keyed by it, so rotation never
/// resets a rate window.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
pub struct ClaudeKeyRef {
    pub namespace: String,
    pub name: String,
}

/// An upstream Anthropic key. `Debug` never shows the key (secrecy).
#[derive(Serialize, Deserialize, Clone, Debug)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamEntry {
    #[serde(serialize_with = "expose")]
    pub key: SecretString,
    pub fingerprint: String,
    pub valid_until: Option<DateTime<Utc>>,
}

/// A workload key the proxy accepts, stored as its SHA-256 only.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadKeyEntry {
    pub sha256: String,
    pub fingerprint: String,
    pub valid_until: Option<DateTime<Utc>>,
}

/// The policy rendered from the ClaudeKey spec, with the spec's own field names and defaults.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Policy {
    #[serde(default)]
    pub scope: ScopeSpec,
    #[serde(default)]
    pub limits: LimitsSpec,
    #[serde(default)]
    pub data_protection: DataProtectionSpec,
    #[serde(default)]
    pub expires_at: Option<DateTime<Utc>>,
}

impl ProxyConfig {
    /// The current upstream key: the first entry without an end.
    pub fn current_upstream(&self) -> Option<&UpstreamEntry> {
        self.upstream.iter().find(|u| u.valid_until.is_none())
    }
}

/// Whether an entry with this `validUntil` is still accepted at `now`.
pub fn still_valid(valid_until: Option<DateTime<Utc>>, now: DateTime<Utc>) -> bool {
    valid_until.is_none_or(|until| now < until)
}

fn expose<S: Serializer>(key: &SecretString, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(key.expose_secret())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOLDEN: &str = r#"{
  "claudeKey": { "namespace": "team-a", "name": "support-bot" },
  "upstream": [
    { "key": "sk-ant-api03-current", "fingerprint": "up:77d0b1aa", "validUntil": null },
    { "key": "sk-ant-api03-old", "fingerprint": "up:0c1d2e3f", "validUntil": "2026-12-01T10:15:00Z" }
  ],
  "workloadKeys": [
    { "sha256": "aa", "fingerprint": "ck:3f9a1c2e", "validUntil": null }
  ],
  "policy": {
    "scope": { "models": ["claude-sonnet-4-*"], "endpoints": ["messages", "countTokens"], "maxTokens": 4096 },
    "limits": { "requestsPerMinute": 50 },
    "dataProtection": { "redact": ["email", "creditCard"], "customPatterns": [{ "name": "employee-id", "regex": "EMP-[0-9]{6}" }], "redactResponses": true, "promptInjection": "block" },
    "expiresAt": null
  }
}"#;

    #[test]
    fn reads_the_design_format() {
        let config: ProxyConfig = serde_json::from_str(GOLDEN).unwrap();
        assert_eq!(config.claude_key.name, "support-bot");
        assert_eq!(
            config.current_upstream().unwrap().fingerprint,
            "up:77d0b1aa"
        );
        assert_eq!(config.policy.scope.max_tokens, Some(4096));
        assert_eq!(config.policy.limits.requests_per_minute, Some(50));
        assert!(config.policy.data_protection.redact_responses);
    }

    #[test]
    fn round_trips_keys_and_nulls() {
        let config: ProxyConfig = serde_json::from_str(GOLDEN).unwrap();
        let written = serde_json::to_value(&config).unwrap();
        assert_eq!(written["upstream"][0]["key"], "sk-ant-api03-current");
        assert!(written["upstream"][0]["validUntil"].is_null());
        assert!(written["policy"]["expiresAt"].is_null());
    }

    #[test]
    fn debug_never_shows_upstream_keys() {
        let config: ProxyConfig = serde_json::from_str(GOLDEN).unwrap();
        assert!(!format!("{config:?}").contains("sk-ant-api03-current"));
    }

    #[test]
    fn federation_is_optional_and_round_trips() {
        let config: ProxyConfig = serde_json::from_str(GOLDEN).unwrap();
        assert!(config.federation.is_none());
        assert!(
            serde_json::to_value(&config)
                .unwrap()
                .get("federation")
                .is_none()
        );
        let mut value: serde_json::Value = serde_json::from_str(GOLDEN).unwrap();
        value["upstream"] = serde_json::json!([]);
        value["federation"] = serde_json::json!({
            "source": "wif", "organizationId": "0f1e2d3c-aaaa-bbbb-cccc-000000000001",
            "serviceAccountId": "svac_01", "federationRuleId": "fdrl_01",
            "audience": "https://api.anthropic.com"
        });
        let config: ProxyConfig = serde_json::from_value(value).unwrap();
        let federation = config.federation.as_ref().unwrap();
        assert_eq!(federation.federation_rule_id, "fdrl_01");
        assert_eq!(federation.workspace_id, None);
        assert!(config.current_upstream().is_none());
        let written = serde_json::to_value(&config).unwrap();
        assert_eq!(written["federation"]["serviceAccountId"], "svac_01");
        assert!(written["federation"].get("workspaceId").is_none());
    }

    #[test]
    fn policy_defaults_match_the_spec() {
        let policy: Policy = serde_json::from_str("{}").unwrap();
        assert_eq!(policy.scope, ScopeSpec::default());
        assert_eq!(policy.scope.endpoints.len(), 3);
    }
}
