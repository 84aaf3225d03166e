//! Retiring upstream keys at Anthropic (DESIGN.md §10): only a ClusterClaudeKeySource's
//! `anthropicAdmin` can, and only for a key that has left its source while no ClaudeKey anywhere
//! still uses it (current or in grace). The queue is the source's `status.retiring`, which no
//! namespace team can write; what each ClaudeKey uses comes from its verified ledger.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use kube::api::ListParams;
use kube::runtime::reflector::Store;
use kube::{Api, Resource, ResourceExt};

use super::context::Context;
use crate::admin::{RetireOutcome, admin_client_for, retire_hint};
use crate::crd::{ClaudeKey, ClusterClaudeKeySource, SourceKeyStatus};
use crate::events;

/// At most this many retirement records are kept in a source's status.
const RETIRED_KEPT: usize = 5;
/// How often the leader looks for keys that can be retired.
pub const PASS_INTERVAL: Duration = Duration::from_secs(5);

/// The leader's loop: waits for the ClaudeKey cache, then retires what can be retired.
/// `watched` is the one namespace this controller sees, when it does not see them all.
pub async fn retire_forever(store: Store<ClaudeKey>, ctx: Arc<Context>, watched: Option<String>) {
    if store.wait_until_ready().await.is_err() {
        return;
    }
    loop {
        tokio::time::sleep(PASS_INTERVAL).await;
        if let Err(error) = retire_once(&store, &ctx, watched.as_deref()).await {
            tracing::warn!(%error, "retirement pass failed");
        }
    }
}

/// One pass over every cluster source that may retire keys and has some queued.
pub async fn retire_once(
    store: &Store<ClaudeKey>,
    ctx: &Context,
    watched: Option<&str>,
) -> Result<(), kube::Error> {
    let api: Api<ClusterClaudeKeySource> = Api::all(ctx.client.clone());
    for source in api.list(&ListParams::default()).await? {
        let queued = source
            .status
            .as_ref()
            .map(|s| s.retiring.len())
            .unwrap_or(0);
        let visible = sees_every_user(&source, watched);
        if source.spec.anthropic_admin.is_some() && queued > 0 && visible {
            retire_source(store, ctx, &source).await;
        }
    }
    Ok(())
}

/// "No ClaudeKey anywhere uses it" can be known only when every namespace the source allows is
/// watched: all of them, or exactly the one namespace a namespace-scoped controller watches.
pub fn sees_every_user(source: &ClusterClaudeKeySource, watched: Option<&str>) -> bool {
    let allowed = &source.spec.allowed_namespaces;
    match watched {
        None => true,
        Some(ns) => allowed.selector.is_none() && allowed.names.iter().all(|n| n == ns),
    }
}

async fn retire_source(store: &Store<ClaudeKey>, ctx: &Context, source: &ClusterClaudeKeySource) {
    let live: HashSet<String> = store.state().iter().filter_map(|ck| ck.uid()).collect();
    let now = Utc::now();
    let status = source.status.clone().unwrap_or_default();
    let free: Vec<&SourceKeyStatus> = status
        .retiring
        .iter()
        .filter(|k| ctx.keys_in_use.in_use(&k.fingerprint, &live, now) == Some(false))
        .collect();
    if free.is_empty() {
        return;
    }
    let Some(admin_spec) = &source.spec.anthropic_admin else {
        return;
    };
    let admin = match admin_client_for(&ctx.client, &ctx.namespace, admin_spec, &ctx.anthropic_url)
        .await
    {
        Ok(admin) => admin,
        Err(e) => {
            let note = e.to_string();
            tracing::warn!(source = source.name_any(), %note, "cannot retire replaced upstream keys");
            source_event(
                ctx,
                source,
                true,
                super::conditions::event::ADMIN_API_ERROR,
                note,
            )
            .await;
            return;
        }
    };
    let mut done = Vec::new();
    let mut records = Vec::new();
    for key in free {
        let Some(hint) = &key.hint else { continue };
        let outcome = retire_hint(&admin, hint, None).await;
        ctx.admin_metrics.retired(&outcome);
        let shown = format!("{} ({hint})", key.fingerprint);
        let warning = !outcome.is_success();
        source_event(
            ctx,
            source,
            warning,
            outcome.reason(),
            outcome.message(&shown),
        )
        .await;
        tracing::info!(
            source = source.name_any(),
            fingerprint = key.fingerprint,
            reason = outcome.reason(),
            "upstream key retirement"
        );
        records.push(outcome.record(hint, Utc::now()));
        if leaves_queue(&outcome) {
            done.push(key.fingerprint.clone());
        }
        if matches!(outcome, RetireOutcome::Failed { .. }) {
            break;
        }
    }
    let written = ctx
        .source_keys
        .update(&ctx.client, &source.name_any(), |_, status| {
            let mut next = status.clone();
            next.retiring.retain(|r| !done.contains(&r.fingerprint));
            next.retired.extend(records.iter().cloned());
            let keep_from = next.retired.len().saturating_sub(RETIRED_KEPT);
            next.retired.drain(..keep_from);
            Some(next)
        })
        .await;
    if let Err(error) = written {
        tracing::warn!(source = source.name_any(), %error, "failed to record retirements");
    }
}

/// Retired, already inactive and not found leave the queue (no retry could do better);
/// ambiguous and failed stay queued: nothing was changed at Anthropic.
fn leaves_queue(outcome: &RetireOutcome) -> bool {
    matches!(
        outcome,
        RetireOutcome::Retired { .. }
            | RetireOutcome::AlreadyInactive { .. }
            | RetireOutcome::NotFound
    )
}

async fn source_event(
    ctx: &Context,
    source: &ClusterClaudeKeySource,
    warning: bool,
    reason: &str,
    note: String,
) {
    let event = events::event(events::event_type(warning), "Retire", reason, note);
    if let Err(error) = ctx.recorder.publish(&event, &source.object_ref(&())).await {
        tracing::warn!(%error, reason, "failed to record an Event on the source");
    }
}
