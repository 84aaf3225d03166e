//! The reconcile pipeline of DESIGN.md §3 and §10: **observe** (the source and its grant, the
//! upstream key, the owned Secrets) -> **plan** (pure, `plan.rs`) -> **execute**
//! (Secrets in a crash-safe order, deletions, Events, consumers, status, requeue). Only the ends
//! touch the API; nothing here logs or reports a key.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Resource, ResourceExt, runtime::controller::Action};
use tracing::{instrument, warn};

pub use super::apply::Error;
use super::apply::{StatusUpdate, delete_secret, get_secret, write_secret, write_status};
use super::conditions::reason;
use super::context::Context;
use super::decide;
use super::finalizer;
use super::metrics::ErrorLabels;
use super::orphans;
use super::plan::{self, Issue, Observation, Outcome, Plan, Retry, Settings};
use super::report;
use super::secrets::Drift;
use super::source::{self, Resolution};
use super::stores::Cached;
use crate::crd::{
    ClaudeKey, Placement, client_secret_name, gateway_config_secret_name, proxy_secret_name,
};
use crate::events;
use crate::keys;

/// How often a ClaudeKey refused its source is looked at again without any watch event.
const REFUSED_POLL: Duration = Duration::from_secs(300);

/// When to look again after asking the orphan sweep to remove an earlier ClaudeKey's config.
const EARLIER_CONFIG_RETRY: Duration = Duration::from_secs(2);

/// When to look again after the watch cache was found behind the apiserver.
const STALE_RETRY: Duration = Duration::from_millis(500);

/// Reconciles one ClaudeKey; see the module doc for the steps.
#[instrument(skip_all, fields(namespace = ck.namespace(), name = ck.name_any()))]
pub async fn reconcile(ck: Arc<ClaudeKey>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.start_reconcile();
    if ck.meta().deletion_timestamp.is_some() {
        return finalizer::on_delete(&ck, &ctx).await;
    }
    if !ctx.stores.ready().await {
        warn!("the watch caches hold no full list yet; will look again");
        return Ok(Action::requeue(STALE_RETRY));
    }
    let ck = ctx.written_status.overlay(&ck);
    // The caches first. A write they made stale (refused by the apiserver: the Secret exists
    // after all, or changed) is planned once more from the apiserver's own answers, so a Secret
    // outside the caches (one claudekey does not manage) is seen and never taken over.
    let result = match observe_plan_execute(&ck, &ctx, Read::Cache).await {
        Err(Error::Stale { namespace, name }) => {
            tracing::debug!(
                secret = format!("{namespace}/{name}"),
                "cache behind the apiserver"
            );
            stale_is_not_a_failure(observe_plan_execute(&ck, &ctx, Read::Api).await)
        }
        other => other,
    };
    terminating_is_not_a_failure(result, &ck.namespace().unwrap_or_default())
}

/// Where `observe` reads the Secrets.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Read {
    Cache,
    Api,
}

async fn observe_plan_execute(ck: &ClaudeKey, ctx: &Context, read: Read) -> Result<Action, Error> {
    let observed = observe(ck, ctx, read).await?;
    if let Some(config) = &observed.gateway_config
        && orphans::written_for_another(config, ck)
    {
        // An earlier ClaudeKey of this name left its config: the sweep removes it (after
        // asking the apiserver who exists), then the Secret watch brings this one back.
        ctx.orphans
            .push(&ck.namespace().unwrap_or_default(), &ck.name_any());
        return Ok(Action::requeue(EARLIER_CONFIG_RETRY));
    }
    let candidate = keys::generate_workload_key();
    let settings = Settings {
        operator_namespace: &ctx.namespace,
        gateway: &ctx.gateway,
        sealer: &ctx.sealer,
        consumer_restart_delay: ctx.consumer_restart_delay,
        shared_counters: ctx.namespace_users.is_some(),
        max_pattern_lists: ctx.max_pattern_lists,
    };
    let plan = plan::plan(ck, &observed, &settings, &candidate, Utc::now());
    let (namespace, name) = (ck.namespace().unwrap_or_default(), ck.name_any());
    ctx.place_waits
        .record(&namespace, &name, plan.waits_for_a_place());
    if let Some(users) = &ctx.namespace_users {
        let wants = matches!(&observed.resolution,
            Resolution::Granted(granted) if granted.placement == Placement::Namespace);
        users.decide(&namespace, &name, wants);
    }
    execute(ck, ctx, &observed, plan).await
}

/// Stale twice in a row: come back shortly, without counting a failure (no backoff, no error
/// metric); the watch is about to deliver what the writes missed.
fn stale_is_not_a_failure(result: Result<Action, Error>) -> Result<Action, Error> {
    match result {
        Err(Error::Stale { .. }) => Ok(Action::requeue(STALE_RETRY)),
        other => other,
    }
}

/// A write refused because the ClaudeKey's own namespace is being deleted: the ClaudeKey goes
/// with it (its deletion is the next change the watch brings), so wait for that quietly instead
/// of a warning and a backoff per reconcile while the namespace empties. Another namespace being
/// deleted (the operator namespace, where gateway configs go) stays a failure: this ClaudeKey
/// is not going anywhere.
fn terminating_is_not_a_failure(
    result: Result<Action, Error>,
    claudekey_namespace: &str,
) -> Result<Action, Error> {
    match result {
        Err(Error::NamespaceTerminating { namespace }) if namespace == claudekey_namespace => {
            tracing::debug!(namespace, "namespace being deleted; nothing written");
            Ok(Action::await_change())
        }
        other => other,
    }
}

/// Reads everything the plan needs: the Secrets from the watch caches (`super::stores`) or the
/// apiserver, the source from the caches. The backend is read only for a granted source.
async fn observe(ck: &ClaudeKey, ctx: &Context, read: Read) -> Result<Observation, Error> {
    let namespace = ck.namespace().ok_or(Error::NoNamespace)?;
    let name = ck.name_any();
    let client = secret(ctx, read, &namespace, &client_secret_name(&name)).await?;
    let proxy = secret(ctx, read, &namespace, &proxy_secret_name(&name)).await?;
    let gateway_name = gateway_config_secret_name(&namespace, &name);
    let gateway_config = secret(ctx, read, &ctx.namespace, &gateway_name).await?;
    let resolution = source::resolve(&ctx.client, &ctx.stores, ck).await?;
    let (upstream, backend_error) = match &resolution {
        // Federation: there is no upstream key anywhere to read.
        Resolution::Granted(granted) if granted.federation.is_some() => (None, None),
        Resolution::Granted(granted) => match ctx.cache.fetch(&granted.backend).await {
            Ok(cached) => (Some(cached), None),
            Err(e) => {
                warn!(error = %e, "failed to read the upstream key");
                (None, Some(e))
            }
        },
        Resolution::Refused { .. } => (None, None),
    };
    Ok(Observation {
        resolution,
        upstream,
        backend_error,
        client,
        proxy,
        gateway_config,
        earlier_pattern_lists: earlier_pattern_lists(ck, ctx),
    })
}

/// The distinct custom-pattern lists of the ClaudeKeys of `ck`'s namespace older than it, from
/// the watch cache; nothing to read when `ck` has none itself.
fn earlier_pattern_lists(ck: &ClaudeKey, ctx: &Context) -> Vec<String> {
    if decide::pattern_list(&ck.spec).is_none() {
        return Vec::new();
    }
    let namespace = ck.namespace();
    let all = ctx.stores.claudekeys.state();
    let created = |c: &ClaudeKey| c.creation_timestamp().map(|t| t.0.as_second());
    let others = all
        .iter()
        .filter(|c| c.namespace() == namespace && c.uid() != ck.uid())
        .filter(|c| !c.spec.data_protection.custom_patterns.is_empty())
        .map(|c| decide::PatternUser {
            created: created(c),
            name: c.metadata.name.as_deref().unwrap_or_default(),
            protection: &c.spec.data_protection,
        })
        .collect();
    let this = (created(ck), ck.metadata.name.as_deref().unwrap_or_default());
    decide::earlier_pattern_lists(others, this, ctx.max_pattern_lists)
}

/// A Secret from the cache, or from the apiserver when asked or where the watch does not reach.
async fn secret(
    ctx: &Context,
    read: Read,
    namespace: &str,
    name: &str,
) -> Result<Option<Secret>, Error> {
    match (read, ctx.stores.secret(namespace, name)) {
        (Read::Cache, Cached::Known(found)) => Ok(found),
        (Read::Api, _) | (_, Cached::NotCovered) => {
            let api: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
            get_secret(&api, namespace, name).await
        }
    }
}

/// Applies a plan in a fixed order: `-client` (it commits the raw key with its
/// ledger), the config Secret, deletions, Events, consumers, status.
async fn execute(
    ck: &ClaudeKey,
    ctx: &Context,
    observed: &Observation,
    plan: Plan,
) -> Result<Action, Error> {
    let object_key = format!("{}/{}", ck.namespace().unwrap_or_default(), ck.name_any());
    let Plan {
        outcome,
        deletes,
        events,
        mut conditions,
        source,
        placement,
        identity_token,
        used,
    } = plan;
    let (issue, retry) = match outcome {
        Outcome::Issue(issue) => (Some(issue), Retry::Backoff),
        Outcome::Refused(retry) => (None, retry),
    };
    let drifts = match &issue {
        Some(issue) => write_all(ctx, observed, issue).await?,
        None => Vec::new(),
    };
    for target in &deletes {
        delete_secret(&ctx.client, target).await?;
        warn!(
            secret = format!("{}/{}", target.namespace, target.name),
            "removed upstream keys this ClaudeKey may no longer hold"
        );
    }
    for e in &events {
        ctx.event(ck, events::event_type(e.warning), e.reason, e.note.clone())
            .await;
    }
    ctx.keys_in_use.record(ck, used);
    let Some(issue) = issue else {
        let update = StatusUpdate {
            conditions,
            decision: None,
            source: &source,
            placement,
            identity_token: None,
            synced_at: None,
            consumers_restarted_for: None,
        };
        write_status(ck, &ctx.client, &ctx.written_status, update).await?;
        return Ok(match retry {
            Retry::AwaitChange => Action::await_change(),
            Retry::Slow => Action::requeue(REFUSED_POLL),
            Retry::Backoff => Action::requeue(ctx.backoff(&object_key)),
        });
    };
    if let Some(hook) = &ctx.after_secrets {
        hook(issue.decision.rotation).await;
    }
    report::changes(ck, ctx, &issue.decision, issue.had_ledger, &drifts).await;
    if let Some((name, key)) = &issue.source_key {
        ctx.source_keys.observe(&ctx.client, name, key).await;
    }
    let (deferred, rolled_for) = roll_consumers(ck, ctx, &issue, &mut conditions).await;
    let update = StatusUpdate {
        conditions: conditions.clone(),
        decision: Some(&issue.decision),
        source: &source,
        placement,
        identity_token,
        synced_at: observed.upstream.as_ref().map(|c| c.synced_at),
        consumers_restarted_for: rolled_for,
    };
    write_status(ck, &ctx.client, &ctx.written_status, update).await?;
    let age = (Utc::now() - issue.decision.ledger.issued_at).num_milliseconds() as f64 / 1000.0;
    let interval = ck.spec.rotation.interval.as_duration().as_secs_f64();
    let namespace = ck.namespace().unwrap_or_default();
    ctx.metrics
        .set_key_age(&namespace, &ck.name_any(), age, interval);
    let failed = conditions
        .iter()
        .any(|c| c.type_ == crate::crd::condition::DEGRADED && c.status);
    let backoff = if failed {
        Some(ctx.backoff(&object_key))
    } else {
        ctx.succeeded(&object_key);
        None
    };
    let refresh = observed.upstream.as_ref().map(|c| c.refresh_in);
    Ok(requeue(&issue, [refresh, deferred, backoff]))
}

/// Writes `-client` first, then the config Secret wherever its placement puts it.
async fn write_all(
    ctx: &Context,
    observed: &Observation,
    issue: &Issue,
) -> Result<Vec<(String, Drift)>, Error> {
    let mut drifts = Vec::new();
    for desired in &issue.writes {
        let namespace = desired.namespace().unwrap_or_default();
        let name = desired.name_any();
        let existing = [&observed.client, &observed.proxy, &observed.gateway_config]
            .into_iter()
            .flatten()
            .find(|s| s.name_any() == name && s.namespace().as_deref() == Some(&namespace));
        let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
        let drift = write_secret(&api, &namespace, existing, desired).await?;
        drifts.push((name, drift));
    }
    Ok(drifts)
}

/// Rolls gateway consumers when the plan asks, at most once per workload key. Returns when to
/// come back for deferred ones, and the fingerprint to record once all were rolled.
async fn roll_consumers(
    ck: &ClaudeKey,
    ctx: &Context,
    issue: &Issue,
    conditions: &mut [super::conditions::Desired],
) -> (Option<Duration>, Option<String>) {
    let Some((fingerprint, at)) = &issue.consumers else {
        return (None, None);
    };
    if let Ok(wait) = (*at - Utc::now()).to_std()
        && !wait.is_zero()
    {
        return (Some(wait), None);
    }
    let (deferred, error) = report::restart_consumers(ck, ctx, fingerprint).await;
    if let Some(message) = &error {
        plan::degrade(conditions, reason::CONSUMER_RESTART_FAILED, message);
    }
    let done = (deferred.is_none() && error.is_none()).then(|| fingerprint.clone());
    (deferred, done)
}

/// The earliest of the decision's deadline and the other waits; never a fixed poll. A deadline
/// that is already due still waits a moment, so clock skew cannot make it spin.
fn requeue(issue: &Issue, others: [Option<Duration>; 3]) -> Action {
    let until_wake = issue
        .decision
        .wake_at
        .map(|t| (t - Utc::now()).to_std().unwrap_or(Duration::ZERO));
    let wait = others.into_iter().chain([until_wake]).flatten().min();
    wait.map_or_else(Action::await_change, |w| {
        Action::requeue(w.max(Duration::from_millis(200)))
    })
}

/// Backs off on failures the reconcile could not turn into status.
pub fn error_policy(ck: Arc<ClaudeKey>, error: &Error, ctx: Arc<Context>) -> Action {
    let key = format!("{}/{}", ck.namespace().unwrap_or_default(), ck.name_any());
    warn!(%error, claudekey = key, "reconcile failed");
    let labels = ErrorLabels {
        error: error.kind(),
    };
    ctx.metrics.errors.get_or_create(&labels).inc();
    Action::requeue(ctx.backoff(&key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_claudekeys_own_namespace_being_deleted_waits_quietly() {
        let terminating = |namespace: &str| {
            Err(Error::NamespaceTerminating {
                namespace: namespace.into(),
            })
        };
        assert_eq!(
            terminating_is_not_a_failure(terminating("team"), "team").unwrap(),
            Action::await_change()
        );
        // The operator namespace going away does not take the ClaudeKey with it.
        assert!(matches!(
            terminating_is_not_a_failure(terminating("claudekey-system"), "team"),
            Err(Error::NamespaceTerminating { .. })
        ));
        let failed = Err(Error::WriteSecret {
            namespace: "team".into(),
            name: "app-client".into(),
            reason: "HTTP 403 Forbidden".into(),
        });
        assert!(matches!(
            terminating_is_not_a_failure(failed, "team"),
            Err(Error::WriteSecret { .. })
        ));
    }
}
