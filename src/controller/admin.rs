//! The controller's side of retiring replaced upstream keys (DESIGN.md §3 step 6): *when* to
//! retire (keys queued in the ledger's `retiring` list after their grace period) and what to
//! record (Events, `status.upstream.retired`, Degraded). *How* — the Admin API client, hint
//! matching and the never-guess decision — lives in [`crate::admin`], one place for both the
//! controller and the `revoke`/`drill` CLI.

use chrono::Utc;
use kube::runtime::events::EventType;

use super::conditions::{event, reason};
use super::context::Context;
use super::ledger::Ledger;
use crate::admin::{RetireOutcome, RetiredKeyStatus, admin_client_for, retire_hint};
use crate::crd::ClaudeKey;

/// What one pass over the retirement queue achieved.
#[derive(Debug, Default)]
pub struct Retirements {
    /// Fingerprints to drop from the queue: retired, already inactive, or not at Anthropic.
    pub done: Vec<String>,
    /// Degraded reason and message when a queued key could not be retired; it stays queued.
    pub error: Option<(&'static str, String)>,
    /// The record of the last attempt, for `status.upstream.retired`.
    pub last: Option<RetiredKeyStatus>,
}

/// Whether an outcome takes the key off the queue. Retired and already inactive are done; not
/// found is done too (no retry can find it; the Warning Event asks a human to check the
/// Console). Ambiguous and failed stay queued and keep Degraded: nothing was changed.
fn leaves_queue(outcome: &RetireOutcome) -> bool {
    matches!(
        outcome,
        RetireOutcome::Retired { .. }
            | RetireOutcome::AlreadyInactive { .. }
            | RetireOutcome::NotFound
    )
}

/// Deactivates the upstream keys the ledger queued for retirement, through `crate::admin`.
pub async fn retire_queued(ck: &ClaudeKey, ctx: &Context, ledger: Option<&Ledger>) -> Retirements {
    let queued = ledger.map(|l| l.retiring.as_slice()).unwrap_or_default();
    if queued.is_empty() {
        return Retirements::default();
    }
    let admin =
        match admin_client_for(&ctx.client, &ctx.namespace, &ck.spec, &ctx.anthropic_url).await {
            Ok(Some(admin)) => admin,
            Ok(None) => return Retirements::default(),
            Err(e) => {
                let message = e.to_string();
                tracing::warn!(%message, "cannot retire replaced upstream keys");
                ctx.event(
                    ck,
                    EventType::Warning,
                    event::ADMIN_API_ERROR,
                    message.clone(),
                )
                .await;
                return Retirements {
                    error: Some((reason::ADMIN_API_ERROR, message)),
                    ..Retirements::default()
                };
            }
        };
    let mut result = Retirements::default();
    for entry in queued {
        let outcome = retire_hint(&admin, &entry.hint, None).await;
        ctx.admin_metrics.retired(&outcome);
        let shown = format!("{} ({})", entry.fingerprint, entry.hint);
        let message = outcome.message(&shown);
        tracing::info!(
            fingerprint = entry.fingerprint,
            reason = outcome.reason(),
            key_id = ?outcome.key_id(),
            "upstream key retirement"
        );
        let type_ = if outcome.is_success() {
            EventType::Normal
        } else {
            EventType::Warning
        };
        ctx.event(ck, type_, outcome.reason(), message.clone())
            .await;
        result.last = Some(outcome.record(&entry.hint, Utc::now()));
        if leaves_queue(&outcome) {
            result.done.push(entry.fingerprint.clone());
        } else {
            result.error = Some((outcome.reason(), message));
            if matches!(outcome, RetireOutcome::Failed { .. }) {
                // The Admin API is failing: try the rest on the next (backed-off) reconcile.
                break;
            }
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_known_dead_or_absent_keys_leave_the_queue() {
        let id = || "apikey_1".to_string();
        assert!(leaves_queue(&RetireOutcome::Retired { key_id: id() }));
        assert!(leaves_queue(&RetireOutcome::AlreadyInactive {
            key_id: id()
        }));
        assert!(leaves_queue(&RetireOutcome::NotFound));
        assert!(!leaves_queue(&RetireOutcome::Ambiguous {
            key_ids: vec![id(), "apikey_2".into()]
        }));
        assert!(!leaves_queue(&RetireOutcome::Failed { error: "x".into() }));
    }
}
