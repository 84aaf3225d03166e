//! Condition and Event reasons as named constants, and the pure assembly of `status` from what a
//! reconcile decided. Fingerprints and times only: nothing here ever sees a key.

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::crd::{ClaudeKeyStatus, UpstreamStatus, WorkloadKeyStatus, condition};

use super::ledger::Ledger;

/// Reasons on the four conditions.
pub mod reason {
    /// Ready=True: both Secrets hold a current workload key and upstream key.
    pub const KEYS_ISSUED: &str = "KeysIssued";
    /// Ready=False: the spec has an error the schema cannot catch; waits for a spec change.
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// Ready=False: the namespace's older ClaudeKeys already use as many distinct custom-pattern
    /// lists as a namespace may (`--max-pattern-lists-per-namespace`).
    pub const PATTERN_LISTS_EXCEEDED: &str = "PatternListsExceeded";
    /// Ready=False / Degraded=True: the backend could not be read.
    pub const BACKEND_ERROR: &str = "BackendError";
    /// Ready=False: a Secret with the name of an owned Secret belongs to someone else.
    pub const SECRET_CONFLICT: &str = "SecretConflict";
    /// Ready=False / RotationDue=True: `spec.expiresAt` has passed.
    pub const EXPIRED: &str = "Expired";
    /// Rotating=True: a previous key is inside its grace period.
    pub const GRACE_PERIOD: &str = "GracePeriod";
    /// Rotating=False.
    pub const NO_PREVIOUS_KEY: &str = "NoPreviousKey";
    /// Degraded=False.
    pub const AS_EXPECTED: &str = "AsExpected";
    /// Degraded=True: a replaced upstream key could not be retired through the Admin API.
    pub const ADMIN_API_ERROR: &str = "AdminApiError";
    /// Degraded=True: gateway consumers could not be restarted for the new key.
    pub const CONSUMER_RESTART_FAILED: &str = "ConsumerRestartFailed";
    /// RotationDue=False: the next rotation is scheduled.
    pub const SCHEDULED: &str = "Scheduled";
    /// Ready=False: the ClusterClaudeKeySource does not allow this namespace.
    pub const SOURCE_NOT_ALLOWED: &str = "SourceNotAllowed";
    /// Ready=False: the sourceRef names no source (in this namespace, for a ClaudeKeySource).
    pub const SOURCE_NOT_FOUND: &str = "SourceNotFound";
    /// Ready=False: the source names a Secret of the operator namespace that is not labelled
    /// claudekey.io/upstream-key=true.
    pub const UPSTREAM_KEY_LABEL_MISSING: &str = "UpstreamKeyLabelMissing";
}

/// Reasons of the Events the controller records on a ClaudeKey.
pub mod event {
    pub const KEY_ROTATED: &str = "KeyRotated";
    pub const KEY_REVOKED: &str = "KeyRevoked";
    pub const KEY_EXPIRED: &str = "KeyExpired";
    pub const UPSTREAM_ROTATED: &str = "UpstreamRotated";
    pub const BACKEND_ERROR: &str = "BackendError";
    pub const TAMPER_REPAIRED: &str = "TamperRepaired";
    pub const INVALID_SPEC: &str = "InvalidSpec";
    pub const SECRET_CONFLICT: &str = "SecretConflict";
    pub const ADMIN_API_ERROR: &str = "AdminApiError";
    pub const CONSUMERS_RESTARTED: &str = "ConsumersRestarted";
    /// Warning: the source may not be used; every upstream key was removed from this namespace.
    pub const SOURCE_NOT_ALLOWED: &str = "SourceNotAllowed";
    /// Warning: a Secret's bookkeeping failed its HMAC; nothing it claimed was acted on.
    pub const LEDGER_TAMPERED: &str = "LedgerTampered";
}

/// One condition as decided, before timestamps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Desired {
    pub type_: &'static str,
    pub status: bool,
    pub reason: &'static str,
    pub message: String,
}

impl Desired {
    pub fn new(
        type_: &'static str,
        status: bool,
        reason: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Self {
            type_,
            status,
            reason,
            message: message.into(),
        }
    }
}

/// Merges desired conditions into the existing ones, keeping `lastTransitionTime` when a
/// condition's status did not change (the metav1.Condition contract).
pub fn merge(
    existing: &[Condition],
    desired: &[Desired],
    generation: Option<i64>,
    now: DateTime<Utc>,
) -> Vec<Condition> {
    desired
        .iter()
        .map(|d| {
            let status = if d.status { "True" } else { "False" }.to_string();
            let since = existing
                .iter()
                .find(|c| c.type_ == d.type_ && c.status == status)
                .map(|c| c.last_transition_time.clone())
                .unwrap_or_else(|| time(now));
            Condition {
                type_: d.type_.to_string(),
                status,
                reason: d.reason.to_string(),
                message: d.message.clone(),
                observed_generation: generation,
                last_transition_time: since,
            }
        })
        .collect()
}

/// The conditions of a reconcile that wrote both Secrets.
pub fn healthy(
    ledger: &Ledger,
    expired: bool,
    next_rotation: Option<DateTime<Utc>>,
    backend_error: Option<&str>,
) -> Vec<Desired> {
    let ready = if expired {
        Desired::new(
            condition::READY,
            false,
            reason::EXPIRED,
            "spec.expiresAt has passed; the workload key is no longer accepted",
        )
    } else {
        Desired::new(
            condition::READY,
            true,
            reason::KEYS_ISSUED,
            "workload key and upstream key are in place",
        )
    };
    let in_grace = ledger.workload_keys.len() > 1 || ledger.upstream_keys.len() > 1;
    let rotating = if in_grace {
        Desired::new(
            condition::ROTATING,
            true,
            reason::GRACE_PERIOD,
            "a previous key is accepted until its grace period ends",
        )
    } else {
        Desired::new(
            condition::ROTATING,
            false,
            reason::NO_PREVIOUS_KEY,
            "only the current keys are accepted",
        )
    };
    let degraded = match backend_error {
        Some(message) => Desired::new(
            condition::DEGRADED,
            true,
            reason::BACKEND_ERROR,
            format!("{message}; serving the last synced upstream key"),
        ),
        None => Desired::new(
            condition::DEGRADED,
            false,
            reason::AS_EXPECTED,
            "the backend was read successfully",
        ),
    };
    let due = match next_rotation {
        Some(at) => Desired::new(
            condition::ROTATION_DUE,
            false,
            reason::SCHEDULED,
            format!("next rotation at {}", at.to_rfc3339()),
        ),
        None => Desired::new(
            condition::ROTATION_DUE,
            true,
            reason::EXPIRED,
            "spec.expiresAt has passed; extend it to resume rotation",
        ),
    };
    vec![ready, rotating, degraded, due]
}

/// The conditions when nothing could be written: Ready=False with `reason`, everything else unknown-ish.
pub fn failed(ready_reason: &'static str, message: &str) -> Vec<Desired> {
    let degraded = ready_reason == reason::BACKEND_ERROR;
    vec![
        Desired::new(condition::READY, false, ready_reason, message),
        Desired::new(
            condition::DEGRADED,
            degraded,
            if degraded {
                reason::BACKEND_ERROR
            } else {
                reason::AS_EXPECTED
            },
            if degraded { message } else { "" },
        ),
    ]
}

/// `status.workloadKey` and `status.upstream` from the ledger.
pub fn key_status(
    ledger: &Ledger,
    synced_at: DateTime<Utc>,
) -> (WorkloadKeyStatus, UpstreamStatus) {
    let current = ledger.current_workload();
    let previous = ledger.previous_workload();
    let workload = WorkloadKeyStatus {
        fingerprint: current.map(|c| c.fingerprint.clone()).unwrap_or_default(),
        issued_at: ledger.issued_at,
        previous_fingerprint: previous.map(|p| p.fingerprint.clone()),
        previous_valid_until: previous.and_then(|p| p.valid_until),
    };
    let up_previous = ledger.previous_upstream();
    let upstream = UpstreamStatus {
        version: ledger.upstream_version.clone(),
        fingerprint: ledger
            .current_upstream()
            .map(|c| c.fingerprint.clone())
            .unwrap_or_default(),
        synced_at,
        previous_fingerprint: up_previous.map(|p| p.fingerprint.clone()),
        previous_valid_until: up_previous.and_then(|p| p.valid_until),
    };
    (workload, upstream)
}

/// A whole status for a successful reconcile.
pub struct StatusInput<'a> {
    pub existing: Option<&'a ClaudeKeyStatus>,
    pub generation: Option<i64>,
    pub source: String,
    pub placement: Option<crate::crd::Placement>,
    /// Replaces the previous value whenever `placement` is known.
    pub identity_token: Option<crate::crd::IdentityTokenStatus>,
    /// The key gateway consumers were last rolled for; `None` keeps the previous record.
    pub consumers_restarted_for: Option<String>,
    pub conditions: Vec<Desired>,
    pub ledger: Option<&'a Ledger>,
    pub synced_at: Option<DateTime<Utc>>,
    pub next_rotation: Option<DateTime<Utc>>,
    pub now: DateTime<Utc>,
}

/// Builds the status to apply; fields a failed reconcile cannot know are kept from before.
pub fn build_status(input: StatusInput<'_>) -> ClaudeKeyStatus {
    let existing = input.existing.cloned().unwrap_or_default();
    let mut conditions = merge(
        &existing.conditions,
        &input.conditions,
        input.generation,
        input.now,
    );
    // Keep conditions this reconcile did not speak about (e.g. Rotating while the backend is
    // down), if they are of a type this controller writes: whoever may write the status
    // subresource cannot plant a condition of its own that the controller then carries along.
    for old in &existing.conditions {
        let ours = condition::ALL.contains(&old.type_.as_str());
        if ours && !conditions.iter().any(|c| c.type_ == old.type_) {
            conditions.push(old.clone());
        }
    }
    conditions.sort_by_key(|c| order(&c.type_));
    let (workload_key, upstream) = match input.ledger {
        Some(ledger) => {
            let synced = input
                .synced_at
                .or(existing.upstream.as_ref().map(|u| u.synced_at))
                .unwrap_or(input.now);
            let (w, u) = key_status(ledger, synced);
            (Some(w), Some(u))
        }
        None => (existing.workload_key, existing.upstream),
    };
    ClaudeKeyStatus {
        conditions,
        observed_generation: input.generation,
        source: Some(input.source),
        identity_token: if input.placement.is_some() {
            input.identity_token
        } else {
            existing.identity_token
        },
        placement: input.placement.or(existing.placement),
        consumers_restarted_for: input
            .consumers_restarted_for
            .or(existing.consumers_restarted_for),
        workload_key,
        upstream,
        next_rotation_time: if input.ledger.is_some() {
            input.next_rotation
        } else {
            existing.next_rotation_time
        },
    }
}

fn order(type_: &str) -> usize {
    condition::ALL
        .iter()
        .position(|t| *t == type_)
        .unwrap_or(usize::MAX)
}

/// chrono to the apimachinery Time (jiff inside), at second precision like metav1.Time.
pub fn time(at: DateTime<Utc>) -> Time {
    Time(
        k8s_openapi::jiff::Timestamp::from_second(at.timestamp())
            .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn transition_time_moves_only_when_status_changes() {
        let t0 = at("2026-11-27T10:00:00Z");
        let t1 = at("2026-11-27T11:00:00Z");
        let first = merge(
            &[],
            &[Desired::new(
                condition::READY,
                true,
                reason::KEYS_ISSUED,
                "ok",
            )],
            Some(1),
            t0,
        );
        let same = merge(
            &first,
            &[Desired::new(
                condition::READY,
                true,
                reason::KEYS_ISSUED,
                "ok",
            )],
            Some(2),
            t1,
        );
        assert_eq!(same[0].last_transition_time, time(t0));
        assert_eq!(same[0].observed_generation, Some(2));
        let flipped = merge(
            &same,
            &[Desired::new(
                condition::READY,
                false,
                reason::BACKEND_ERROR,
                "x",
            )],
            Some(2),
            t1,
        );
        assert_eq!(flipped[0].last_transition_time, time(t1));
        assert_eq!(flipped[0].status, "False");
    }

    /// The status a reconcile that failed with a backend error writes over `before`.
    fn after_failure(
        before: &ClaudeKeyStatus,
        message: &str,
        now: DateTime<Utc>,
    ) -> ClaudeKeyStatus {
        build_status(StatusInput {
            existing: Some(before),
            generation: Some(3),
            source: "kubernetes:x".into(),
            placement: None,
            identity_token: None,
            consumers_restarted_for: None,
            conditions: failed(reason::BACKEND_ERROR, message),
            ledger: None,
            synced_at: None,
            next_rotation: None,
            now,
        })
    }

    #[test]
    fn a_failed_reconcile_keeps_the_last_known_keys_and_other_conditions() {
        let now = at("2026-11-27T10:00:00Z");
        let before = ClaudeKeyStatus {
            conditions: merge(
                &[],
                &[Desired::new(
                    condition::ROTATING,
                    true,
                    reason::GRACE_PERIOD,
                    "",
                )],
                None,
                now,
            ),
            workload_key: Some(WorkloadKeyStatus {
                fingerprint: "ck:1".into(),
                issued_at: now,
                ..Default::default()
            }),
            ..Default::default()
        };
        let status = after_failure(&before, "Secret ns/x not found", now);
        let types: Vec<_> = status.conditions.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(types, ["Ready", "Rotating", "Degraded"]);
        assert_eq!(status.workload_key.unwrap().fingerprint, "ck:1");
    }

    #[test]
    fn a_condition_of_a_foreign_type_is_not_carried_along() {
        let now = at("2026-11-27T10:00:00Z");
        let planted = merge(
            &[],
            &[
                Desired::new("Verified", true, "Forged", "audited by nobody"),
                Desired::new(condition::ROTATING, true, reason::GRACE_PERIOD, ""),
            ],
            None,
            now,
        );
        let before = ClaudeKeyStatus {
            conditions: planted,
            ..Default::default()
        };
        let status = after_failure(&before, "down", now);
        let types: Vec<_> = status.conditions.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(types, ["Ready", "Rotating", "Degraded"]);
    }
}
