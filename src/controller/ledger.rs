//! The durable rotation ledger: everything the controller must remember about the keys it issued,
//! kept as one JSON annotation on both owned Secrets. Hashes and fingerprints only, never keys.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::proxyconf::WorkloadKeyEntry;

/// Annotation holding the ledger JSON on the `-client` and `-proxy` Secrets.
pub const LEDGER_ANNOTATION: &str = "claudekey.io/ledger";

/// What was issued and which triggers were already acted on.
///
/// The `-client` Secret is written first and carries the ledger in the same object as the raw
/// workload key, so the key and its bookkeeping are committed by one atomic write; the `-proxy`
/// Secret carries a copy, which is used when the `-client` Secret was lost or edited by hand.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Ledger {
    /// When the current workload key was issued.
    pub issued_at: DateTime<Utc>,
    /// The `claudekey.io/rotate` value already acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotate_handled: Option<String>,
    /// The `claudekey.io/revoke` value already acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoke_handled: Option<String>,
    /// The `spec.expiresAt` for which the key was already retired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expiry_handled: Option<DateTime<Utc>>,
    /// Accepted workload keys by hash, current first (same shape as in `proxy.json`).
    pub workload_keys: Vec<WorkloadKeyEntry>,
    /// Backend version of the current upstream key.
    pub upstream_version: String,
    /// Upstream keys by hash, current first; their values live only in `proxy.json`.
    pub upstream_keys: Vec<UpstreamLedgerEntry>,
}

/// An upstream key as the ledger knows it: by hash.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamLedgerEntry {
    pub sha256: String,
    pub fingerprint: String,
    pub valid_until: Option<DateTime<Utc>>,
    /// The Admin API's partial hint of the key (as the Console shows it), for retiring it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

impl Ledger {
    /// The current workload key entry (the first one without an end).
    pub fn current_workload(&self) -> Option<&WorkloadKeyEntry> {
        self.workload_keys.iter().find(|k| k.valid_until.is_none())
    }

    /// The current upstream key entry (the first one without an end).
    pub fn current_upstream(&self) -> Option<&UpstreamLedgerEntry> {
        self.upstream_keys.iter().find(|k| k.valid_until.is_none())
    }

    /// The most recent previous workload key still in its grace period.
    pub fn previous_workload(&self) -> Option<&WorkloadKeyEntry> {
        self.workload_keys
            .iter()
            .filter(|k| k.valid_until.is_some())
            .max_by_key(|k| k.valid_until)
    }

    /// The most recent previous upstream key still in its grace period.
    pub fn previous_upstream(&self) -> Option<&UpstreamLedgerEntry> {
        self.upstream_keys
            .iter()
            .filter(|k| k.valid_until.is_some())
            .max_by_key(|k| k.valid_until)
    }

    /// Serialized form for the annotation.
    pub fn to_annotation(&self) -> String {
        serde_json::to_string(self).expect("the ledger always serializes")
    }

    /// Parses the annotation; `None` when missing or edited into something unreadable.
    pub fn from_annotation(text: &str) -> Option<Self> {
        serde_json::from_str(text).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_the_annotation() {
        let ledger = Ledger {
            issued_at: "2026-11-27T10:00:00Z".parse().unwrap(),
            rotate_handled: Some("1".into()),
            revoke_handled: None,
            expiry_handled: None,
            workload_keys: vec![WorkloadKeyEntry {
                sha256: "ab".repeat(32),
                fingerprint: "ck:abababab".into(),
                valid_until: None,
            }],
            upstream_version: "v1".into(),
            upstream_keys: vec![],
        };
        assert_eq!(
            Ledger::from_annotation(&ledger.to_annotation()),
            Some(ledger)
        );
        assert_eq!(Ledger::from_annotation("{not json"), None);
    }
}
