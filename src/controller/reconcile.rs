//! The reconcile pipeline of DESIGN.md §3: read the Secrets and the backend -> decide (pure) ->
//! write `-client` then `-proxy` -> restart gateway consumers -> status -> requeue at the earliest
//! deadline. Only the ends touch the API; nothing here logs or reports a key.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api, ResourceExt,
    runtime::{controller::Action, events::EventType},
};
use secrecy::{ExposeSecret, SecretString};
use tracing::{instrument, warn};

use super::admin;
pub use super::apply::Error;
use super::apply::{get_secret, write_secret, write_status};
use super::conditions::{self, Desired, event, reason};
use super::consumers;
use super::context::Context;
use super::decide::{self, Decision, FetchedUpstream, KeyId, Observed, Triggers};
use super::metrics::ErrorLabels;
use super::report;
use super::secrets::{self, Recovered};
use crate::backend::cache::CachedKey;
use crate::crd::{ClaudeKey, annotations, client_secret_name, condition, proxy_secret_name};
use crate::keys::{self, KeyKind};

/// Reconciles one ClaudeKey; see the module doc for the steps.
#[instrument(skip_all, fields(namespace = ck.namespace(), name = ck.name_any()))]
pub async fn reconcile(ck: Arc<ClaudeKey>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.start_reconcile();
    let namespace = ck.namespace().ok_or(Error::NoNamespace)?;
    let name = ck.name_any();
    let object_key = format!("{namespace}/{name}");
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);

    // 1. Read what was issued before, validate what the schema cannot, read the upstream key.
    let client_secret = get_secret(&api, &namespace, &client_secret_name(&name)).await?;
    let proxy_secret = get_secret(&api, &namespace, &proxy_secret_name(&name)).await?;
    if let Some(foreign) = [&client_secret, &proxy_secret]
        .into_iter()
        .flatten()
        .find(|s| !secrets::controlled_by(s, &ck))
    {
        let message = format!(
            "Secret {namespace}/{} exists and is not owned by this ClaudeKey; delete or rename it",
            foreign.name_any()
        );
        warn!(%message, "refusing to take over a Secret");
        let note = message.clone();
        ctx.event(&ck, EventType::Warning, event::SECRET_CONFLICT, note)
            .await;
        let desired = conditions::failed(reason::SECRET_CONFLICT, &message);
        write_status(&ck, &ctx.client, desired, None, None, None).await?;
        return Ok(Action::requeue(ctx.backoff(&object_key)));
    }
    let recovered = secrets::recover(client_secret.as_ref(), proxy_secret.as_ref());
    if let Err(message) = decide::validate(&ck.spec) {
        warn!(%message, "invalid ClaudeKey spec");
        let note = message.clone();
        ctx.event(&ck, EventType::Warning, event::INVALID_SPEC, note)
            .await;
        let desired = conditions::failed(reason::INVALID_SPEC, &message);
        write_status(&ck, &ctx.client, desired, None, None, None).await?;
        return Ok(Action::await_change());
    }
    let (cached, backend_error) = read_upstream(&ck, &ctx).await;

    // 2. Decide (pure), with a fresh candidate key that is used only if a rotation is due.
    let candidate_key = keys::generate_workload_key();
    let retirements = admin::retire_queued(&ck, &ctx, recovered.ledger.as_ref()).await;
    let Ok(mut decision) = decide_next(&ck, &recovered, cached.as_ref(), &candidate_key) else {
        return not_ready(&ck, &ctx, &object_key, backend_error).await;
    };
    decision
        .ledger
        .retiring
        .retain(|r| !retirements.done.contains(&r.fingerprint));

    // 3. Write -client first: it commits the raw key together with its ledger.
    let workload_key = match (decision.rotation, &recovered.client_key) {
        (None, Some(key)) => key,
        _ => &candidate_key,
    };
    let mut values: HashMap<String, SecretString> = recovered.upstream_values.clone();
    if let Some(c) = &cached {
        let value = c.key.value.clone();
        values.insert(keys::sha256_hex(value.expose_secret()), value);
    }
    let config = match secrets::render_config(&ck, &decision.ledger, &values) {
        Ok(config) => config,
        Err(missing) => {
            let message = backend_error.or(Some(missing.to_string()));
            return not_ready(&ck, &ctx, &object_key, message).await;
        }
    };
    let desired_client =
        secrets::build_client(&ck, workload_key, &ctx.gateway_url, &decision.ledger);
    let desired_proxy = secrets::build_proxy(&ck, &config, &decision.ledger);
    let drifts = [
        write_secret(&api, &namespace, client_secret.as_ref(), &desired_client).await?,
        write_secret(&api, &namespace, proxy_secret.as_ref(), &desired_proxy).await?,
    ];
    if let Some(hook) = &ctx.after_secrets {
        hook(decision.rotation).await;
    }
    report::changes(&ck, &ctx, &decision, recovered.ledger.is_some(), drifts).await;

    // 4. Roll gateway consumers that read the key from env.
    let fingerprint = decision
        .ledger
        .current_workload()
        .map(|c| c.fingerprint.clone())
        .unwrap_or_default();
    let restart_at = consumers::restart_at(&decision.ledger, ctx.consumer_restart_delay);
    let (deferred, consumer_error) = match (restart_at - Utc::now()).to_std() {
        Ok(wait) if !wait.is_zero() => (Some(wait), None),
        _ => report::restart_consumers(&ck, &ctx, &fingerprint).await,
    };

    // 5. Status, through the status subresource, after the Secrets.
    let other_error = retirements.error.clone().or(consumer_error
        .clone()
        .map(|m| (reason::CONSUMER_RESTART_FAILED, m)));
    let desired = healthy_conditions(&decision, backend_error.as_deref(), other_error.as_ref());
    let retired = match retirements.last.clone() {
        Some(record) => Some(record),
        // The cached object may predate the status write that recorded the last retirement;
        // read it back, so a reconcile that retires nothing never erases that record.
        None if ck.spec.anthropic_admin.is_some() => {
            Api::<ClaudeKey>::namespaced(ctx.client.clone(), &namespace)
                .get_status(&name)
                .await
                .ok()
                .and_then(|fresh| fresh.status?.upstream?.retired)
        }
        None => None,
    };
    write_status(
        &ck,
        &ctx.client,
        desired,
        Some(&decision),
        cached.as_ref(),
        retired,
    )
    .await?;
    let age = (Utc::now() - decision.ledger.issued_at).num_milliseconds() as f64 / 1000.0;
    let interval = ck.spec.rotation.interval.as_duration().as_secs_f64();
    ctx.metrics.set_key_age(&namespace, &name, age, interval);

    // 6. Requeue at the earliest deadline.
    let failed = backend_error.is_some() || other_error.is_some();
    let backoff = if failed {
        Some(ctx.backoff(&object_key))
    } else {
        ctx.succeeded(&object_key);
        None
    };
    let refresh = cached.as_ref().map(|c| c.refresh_in);
    // Keys queued for retirement just now are retired by the next reconcile.
    let retire_soon =
        (!failed && !decision.ledger.retiring.is_empty()).then_some(Duration::from_secs(1));
    Ok(requeue(
        &decision,
        [refresh, deferred, backoff, retire_soon],
    ))
}

/// Reads the upstream key through the cache; a failure becomes a message, an Event and a
/// log line, and the reconcile carries on with the last synced key.
async fn read_upstream(ck: &ClaudeKey, ctx: &Context) -> (Option<CachedKey>, Option<String>) {
    match ctx.cache.fetch(&ck.spec.source).await {
        Ok(cached) => (Some(cached), None),
        Err(e) => {
            let message = e.to_string();
            warn!(error = %message, "failed to read the upstream key");
            let note = message.clone();
            ctx.event(ck, EventType::Warning, event::BACKEND_ERROR, note)
                .await;
            (None, Some(message))
        }
    }
}

fn decide_next(
    ck: &ClaudeKey,
    recovered: &Recovered,
    cached: Option<&CachedKey>,
    candidate_key: &SecretString,
) -> Result<Decision, decide::NoUpstreamKey> {
    let upstream = cached.map(|c| FetchedUpstream {
        id: key_id(KeyKind::Upstream, &c.key.value),
        version: c.key.version.clone(),
        hint: crate::admin::partial_key_hint(c.key.value.expose_secret()),
    });
    let annotation = |key| ck.annotations().get(key).map(String::as_str);
    let triggers = Triggers {
        rotate: annotation(annotations::ROTATE),
        revoke: annotation(annotations::REVOKE),
    };
    let observed = Observed {
        ledger: recovered.ledger.as_ref(),
        client_key_present: recovered.client_key.is_some(),
    };
    let candidate = key_id(KeyKind::Workload, candidate_key);
    decide::decide(
        &ck.spec,
        triggers,
        observed,
        upstream.as_ref(),
        &candidate,
        Utc::now(),
    )
}

fn healthy_conditions(
    decision: &Decision,
    backend_error: Option<&str>,
    other_error: Option<&(&'static str, String)>,
) -> Vec<Desired> {
    let mut desired = conditions::healthy(
        &decision.ledger,
        decision.expired,
        decision.next_rotation,
        backend_error,
    );
    if let (None, Some((why, message))) = (backend_error, other_error) {
        for c in desired
            .iter_mut()
            .filter(|c| c.type_ == condition::DEGRADED)
        {
            *c = Desired::new(condition::DEGRADED, true, why, message.clone());
        }
    }
    desired
}

/// The earliest of the decision's deadline and the other waits; never a fixed poll. A deadline
/// that is already due still waits a moment, so clock skew cannot make it spin.
fn requeue(decision: &Decision, others: [Option<Duration>; 4]) -> Action {
    let until_wake = decision
        .wake_at
        .map(|t| (t - Utc::now()).to_std().unwrap_or(Duration::ZERO));
    let wait = others.into_iter().chain([until_wake]).flatten().min();
    wait.map_or_else(Action::await_change, |w| {
        Action::requeue(w.max(Duration::from_millis(200)))
    })
}

/// Nothing could be written: Ready=False with the backend's message; retry with backoff.
async fn not_ready(
    ck: &ClaudeKey,
    ctx: &Context,
    object_key: &str,
    message: Option<String>,
) -> Result<Action, Error> {
    let message = message.unwrap_or_else(|| "no upstream key has been synced yet".to_string());
    let desired = conditions::failed(reason::BACKEND_ERROR, &message);
    write_status(ck, &ctx.client, desired, None, None, None).await?;
    Ok(Action::requeue(ctx.backoff(object_key)))
}

fn key_id(kind: KeyKind, key: &SecretString) -> KeyId {
    KeyId {
        sha256: keys::sha256_hex(key.expose_secret()),
        fingerprint: keys::fingerprint(kind, key.expose_secret()),
    }
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
