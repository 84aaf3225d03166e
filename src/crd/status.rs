//! `ClaudeKey.status`: what the controller observed and did. Fingerprints only, never keys.

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Condition types on a ClaudeKey (metav1.Condition shape).
pub mod condition {
    /// Both Secrets hold a valid workload key and upstream key.
    pub const READY: &str = "Ready";
    /// A previous key is still inside its grace period.
    pub const ROTATING: &str = "Rotating";
    /// The backend or the Admin API failed; the last good keys are still served.
    pub const DEGRADED: &str = "Degraded";
    /// The workload key has reached its rotation interval or expiry.
    pub const ROTATION_DUE: &str = "RotationDue";
    /// Workload identity federation: whether the gateway's last token exchange for the source
    /// succeeded (on ClusterClaudeKeySource, mirrored on its ClaudeKeys).
    pub const FEDERATION_READY: &str = "FederationReady";

    /// Every type the controller writes, in the order it lists them. A condition of another
    /// type was written by someone else and is dropped at the next status write.
    pub const ALL: &[&str] = &[READY, ROTATING, DEGRADED, ROTATION_DUE, FEDERATION_READY];
}

/// Observed state of a ClaudeKey.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ClaudeKeyStatus {
    /// Ready, Rotating, Degraded and RotationDue, in the standard Kubernetes condition shape.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// The metadata.generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The source of the upstream key, e.g. ClusterClaudeKeySource/support (kubernetes:anthropic-support).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Where the upstream key is placed: gateway (the claudekey gateway in the operator
    /// namespace serves this ClaudeKey) or namespace (its <name>-proxy Secret, direct sidecar).
    /// The webhook injects the matching sidecar.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<super::Placement>,
    /// The workload key claudekey issued (fingerprints only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_key: Option<WorkloadKeyStatus>,
    /// The upstream key synced from the backend (fingerprints only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<UpstreamStatus>,
    /// When the workload key is next re-issued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_rotation_time: Option<DateTime<Utc>>,
    /// Fingerprint of the workload key the gateway consumers (claudekey.io/consumes) were last
    /// rolled for, so a steady-state reconcile need not look for them again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumers_restarted_for: Option<String>,
    /// The projected service-account token an injected proxy sidecar needs, when the source is
    /// workload identity federation with placement namespace; the webhook mounts it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity_token: Option<IdentityTokenStatus>,
}

/// The projected token of a federation source (not a secret: its shape only).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct IdentityTokenStatus {
    /// The token's audience.
    pub audience: String,
    /// The token's lifetime the kubelet asks for.
    pub expiration_seconds: i64,
}

/// The current and previous workload key, by fingerprint.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadKeyStatus {
    /// ck: followed by the first 8 hex digits of the key's SHA-256.
    pub fingerprint: String,
    /// When the current key was issued.
    pub issued_at: DateTime<Utc>,
    /// Fingerprint of the previous key while it is still accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_fingerprint: Option<String>,
    /// The previous key is accepted until this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_valid_until: Option<DateTime<Utc>>,
}

/// The current and previous upstream key, by fingerprint and backend version.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamStatus {
    /// The backend's version identifier of the current upstream key.
    pub version: String,
    /// up: followed by the first 8 hex digits of the key's SHA-256.
    pub fingerprint: String,
    /// When the upstream key was last read from the backend.
    pub synced_at: DateTime<Utc>,
    /// Fingerprint of the previous upstream key while it is still used as a fallback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_fingerprint: Option<String>,
    /// The previous upstream key is used as a fallback until this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_valid_until: Option<DateTime<Utc>>,
}
