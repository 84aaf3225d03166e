//! Telling people what a reconcile did: Events, log lines and metrics for issued and rotated
//! keys, upstream rolls, repaired Secrets and restarted consumers. Fingerprints only.

use std::time::Duration;

use kube::{ResourceExt, runtime::events::EventType};
use tracing::{info, warn};

use super::conditions::event;
use super::consumers;
use super::context::Context;
use super::decide::{Decision, RotationReason};
use super::metrics::RotationLabels;
use super::secrets::Drift;
use crate::crd::ClaudeKey;

/// Events and metrics for what this reconcile changed in the Secrets.
pub async fn changes(
    ck: &ClaudeKey,
    ctx: &Context,
    decision: &Decision,
    had_ledger: bool,
    drifts: &[(String, Drift)],
) {
    if let Some(rotation) = decision.rotation {
        rotated(ck, ctx, decision, rotation).await;
    }
    if decision.upstream_rolled {
        let up = decision
            .ledger
            .current_upstream()
            .map(|c| c.fingerprint.as_str())
            .unwrap_or_default();
        info!(fingerprint = up, "new upstream key rolled out");
        let labels = RotationLabels {
            reason: "upstream",
            result: "ok",
        };
        ctx.metrics.rotations.get_or_create(&labels).inc();
        let note = format!(
            "rolled out upstream key {up} (version {})",
            decision.ledger.upstream_version
        );
        ctx.event(ck, EventType::Normal, event::UPSTREAM_ROTATED, note)
            .await;
    }
    for (secret, drift) in drifts {
        let tampered = match drift {
            Drift::Edited => true,
            Drift::Missing => had_ledger && decision.rotation.is_none(),
            Drift::None | Drift::Progress => false,
        };
        if tampered {
            warn!(
                secret,
                "repaired an owned Secret that was edited or deleted by hand"
            );
            let note = format!("Secret {secret} was edited or deleted by hand; restored it");
            ctx.event(ck, EventType::Warning, event::TAMPER_REPAIRED, note)
                .await;
        }
    }
}

async fn rotated(ck: &ClaudeKey, ctx: &Context, decision: &Decision, rotation: RotationReason) {
    let fingerprint = decision
        .ledger
        .current_workload()
        .map(|c| c.fingerprint.as_str())
        .unwrap_or_default();
    // The first key gets no Event: the Ready condition says it was issued, and at 10,000
    // ClaudeKeys an Event each is a fifth of the controller's API writes. Every later change of
    // key is news to somebody and gets one.
    let event = match rotation {
        RotationReason::Initial => None,
        RotationReason::Revoke => Some((
            event::KEY_REVOKED,
            format!("revoked every previous workload key at once; issued {fingerprint}"),
        )),
        RotationReason::Expired => Some((
            event::KEY_EXPIRED,
            format!("spec.expiresAt passed; retired the workload key, issued {fingerprint}"),
        )),
        RotationReason::ClientLost => Some((
            event::KEY_ROTATED,
            format!(
                "the -client Secret was deleted or edited, so its key cannot be restored; issued {fingerprint}"
            ),
        )),
        other => Some((
            event::KEY_ROTATED,
            format!(
                "rotated the workload key ({}); issued {fingerprint}",
                other.as_str()
            ),
        )),
    };
    info!(
        reason = rotation.as_str(),
        fingerprint, "workload key issued"
    );
    let labels = RotationLabels {
        reason: rotation.as_str(),
        result: "ok",
    };
    ctx.metrics.rotations.get_or_create(&labels).inc();
    if let Some((reason, note)) = event {
        ctx.event(ck, EventType::Normal, reason, note).await;
    }
}

/// Rolls gateway consumers; returns when to come back for deferred ones, and an error message.
pub async fn restart_consumers(
    ck: &ClaudeKey,
    ctx: &Context,
    fingerprint: &str,
) -> (Option<Duration>, Option<String>) {
    let namespace = ck.namespace().unwrap_or_default();
    let name = ck.name_any();
    match consumers::restart(
        &ctx.client,
        &ctx.stores.workloads,
        &namespace,
        &name,
        fingerprint,
        &ctx.limiter,
    )
    .await
    {
        Ok(outcome) => {
            if !outcome.restarted.is_empty() {
                ctx.metrics
                    .consumer_restarts
                    .inc_by(outcome.restarted.len() as u64);
                let list = outcome.restarted.join(", ");
                info!(workloads = %list, fingerprint, "restarted gateway consumers");
                let note = format!("restarted {list} for workload key {fingerprint}");
                ctx.event(ck, EventType::Normal, event::CONSUMERS_RESTARTED, note)
                    .await;
            }
            (outcome.deferred, None)
        }
        Err(e) => {
            warn!(error = %e, "failed to restart gateway consumers");
            (None, Some(e.to_string()))
        }
    }
}
