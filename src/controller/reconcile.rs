//! The reconcile pipeline of DESIGN.md §3: read the Secrets and the backend -> decide (pure) ->
//! write `-client` then `-proxy` -> restart gateway consumers -> status -> requeue at the earliest
//! deadline. Only the ends touch the API; nothing here logs or reports a key.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api, Resource, ResourceExt,
    api::{Patch, PatchParams},
    runtime::{controller::Action, events::EventType},
};
use secrecy::{ExposeSecret, SecretString};
use tracing::{info, instrument, warn};

use super::conditions::{self, StatusInput, event, reason};
use super::consumers;
use super::context::Context;
use super::decide::{
    self, Decision, FetchedUpstream, KeyId, NoUpstreamKey, Observed, RotationReason, Triggers,
};
use super::metrics::{KeyLabels, RotationLabels};
use super::secrets::{self, Drift};
use crate::backend::cache::CachedKey;
use crate::crd::{ClaudeKey, ClaudeKeyStatus, annotations, client_secret_name, proxy_secret_name};
use crate::keys::{self, KeyKind};

/// Why a reconcile failed. Messages carry names and API reasons, never Secret contents.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to read Secret {namespace}/{name}: {source}")]
    ReadSecret {
        namespace: String,
        name: String,
        source: kube::Error,
    },
    /// Only code and reason of a failed Secret write: the apiserver's message may quote data.
    #[error("failed to write Secret {namespace}/{name}: HTTP {code} {reason}")]
    WriteSecret {
        namespace: String,
        name: String,
        code: u16,
        reason: String,
    },
    #[error("failed to write status of ClaudeKey {namespace}/{name}: {source}")]
    WriteStatus {
        namespace: String,
        name: String,
        source: kube::Error,
    },
    #[error("ClaudeKey has no namespace")]
    NoNamespace,
}

impl Error {
    /// Bounded label for `claudekey_reconcile_errors_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::ReadSecret { .. } => "readSecret",
            Self::WriteSecret { .. } => "writeSecret",
            Self::WriteStatus { .. } => "writeStatus",
            Self::NoNamespace => "noNamespace",
        }
    }
}

/// Reconciles one ClaudeKey; see the module doc for the steps.
#[instrument(skip_all, fields(namespace = ck.namespace(), name = ck.name_any()))]
pub async fn reconcile(ck: Arc<ClaudeKey>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.start_reconcile();
    let namespace = ck.namespace().ok_or(Error::NoNamespace)?;
    let name = ck.name_any();
    let object_key = format!("{namespace}/{name}");
    let secrets_api: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);

    // 1. Read what was issued before, and validate what the schema cannot.
    let client_secret = get_secret(&secrets_api, &namespace, &client_secret_name(&name)).await?;
    let proxy_secret = get_secret(&secrets_api, &namespace, &proxy_secret_name(&name)).await?;
    let recovered = secrets::recover(client_secret.as_ref(), proxy_secret.as_ref());
    if let Err(message) = decide::validate(&ck.spec) {
        warn!(%message, "invalid ClaudeKey spec");
        ctx.event(
            &ck,
            EventType::Warning,
            event::INVALID_SPEC,
            message.clone(),
        )
        .await;
        write_status(
            &ck,
            &ctx,
            conditions::failed(reason::INVALID_SPEC, &message),
            None,
            None,
        )
        .await?;
        return Ok(Action::await_change());
    }

    // 2. Read the upstream key (cached per source for refreshInterval).
    let fetched = ctx.cache.fetch(&ck.spec.source).await;
    let (cached, backend_error) = match fetched {
        Ok(cached) => (Some(cached), None),
        Err(e) => {
            let message = e.to_string();
            warn!(error = %message, "failed to read the upstream key");
            ctx.event(
                &ck,
                EventType::Warning,
                event::BACKEND_ERROR,
                message.clone(),
            )
            .await;
            (None, Some(message))
        }
    };

    // 3. Decide.
    let candidate_key = keys::generate_workload_key();
    let candidate = key_id(KeyKind::Workload, &candidate_key);
    let upstream = cached.as_ref().map(|c| FetchedUpstream {
        id: key_id(KeyKind::Upstream, &c.key.value),
        version: c.key.version.clone(),
    });
    let triggers = Triggers {
        rotate: ck
            .annotations()
            .get(annotations::ROTATE)
            .map(String::as_str),
        revoke: ck
            .annotations()
            .get(annotations::REVOKE)
            .map(String::as_str),
    };
    let observed = Observed {
        ledger: recovered.ledger.as_ref(),
        client_key_present: recovered.client_key.is_some(),
    };
    let now = Utc::now();
    let decision = match decide::decide(
        &ck.spec,
        triggers,
        observed,
        upstream.as_ref(),
        &candidate,
        now,
    ) {
        Ok(decision) => decision,
        Err(NoUpstreamKey) => return not_ready(&ck, &ctx, &object_key, backend_error).await,
    };

    // 4. Write -client first: it commits the raw key together with its ledger.
    let workload_key = match (decision.rotation, &recovered.client_key) {
        (Some(_), _) | (None, None) => &candidate_key,
        (None, Some(key)) => key,
    };
    let mut values: HashMap<String, SecretString> = recovered.upstream_values.clone();
    if let Some(c) = &cached {
        values.insert(
            keys::sha256_hex(c.key.value.expose_secret()),
            c.key.value.clone(),
        );
    }
    let config = match secrets::render_config(&ck, &decision.ledger, &values) {
        Ok(config) => config,
        Err(missing) => {
            return not_ready(
                &ck,
                &ctx,
                &object_key,
                backend_error.or(Some(missing.to_string())),
            )
            .await;
        }
    };
    let desired_client =
        secrets::build_client(&ck, workload_key, &ctx.gateway_url, &decision.ledger);
    let desired_proxy = secrets::build_proxy(&ck, &config, &decision.ledger);
    let client_drift = write_secret(
        &secrets_api,
        &namespace,
        client_secret.as_ref(),
        &desired_client,
    )
    .await?;
    let proxy_drift = write_secret(
        &secrets_api,
        &namespace,
        proxy_secret.as_ref(),
        &desired_proxy,
    )
    .await?;
    if let Some(hook) = &ctx.after_secrets {
        hook().await;
    }
    report_changes(
        &ck,
        &ctx,
        &decision,
        recovered.ledger.is_some(),
        [client_drift, proxy_drift],
    )
    .await;

    // 5. Roll gateway consumers that read the key from env.
    let fingerprint = decision
        .ledger
        .current_workload()
        .map(|c| c.fingerprint.clone())
        .unwrap_or_default();
    let (deferred, consumer_error) =
        restart_consumers(&ck, &ctx, &namespace, &name, &fingerprint).await;

    // 6. Status, through the status subresource, after the Secrets.
    let degraded = backend_error.clone().or(consumer_error.clone());
    let mut desired = conditions::healthy(
        &decision.ledger,
        decision.expired,
        decision.next_rotation,
        degraded.as_deref(),
    );
    if backend_error.is_none()
        && let Some(message) = &consumer_error
    {
        desired[2] = conditions::Desired::new(
            crate::crd::condition::DEGRADED,
            true,
            reason::CONSUMER_RESTART_FAILED,
            message.clone(),
        );
    }
    write_status(&ck, &ctx, desired, Some(&decision), cached.as_ref()).await?;
    let age = (now - decision.ledger.issued_at).num_milliseconds() as f64 / 1000.0;
    ctx.metrics
        .key_age
        .get_or_create(&KeyLabels {
            namespace: namespace.clone(),
            name: name.clone(),
        })
        .set(age);

    // 7. Requeue at the earliest deadline.
    let mut wait = decision
        .wake_at
        .map(|t| (t - Utc::now()).to_std().unwrap_or(Duration::ZERO));
    let mut earliest = |d: Option<Duration>| {
        if let Some(d) = d {
            wait = Some(wait.map_or(d, |w| w.min(d)));
        }
    };
    earliest(cached.as_ref().map(|c| c.refresh_in));
    earliest(deferred);
    if backend_error.is_some() || consumer_error.is_some() {
        earliest(Some(ctx.backoff(&object_key)));
    } else {
        ctx.succeeded(&object_key);
    }
    // A deadline that is now must still not spin: at least a short pause.
    Ok(wait.map_or_else(Action::await_change, |w| {
        Action::requeue(w.max(Duration::from_millis(200)))
    }))
}

/// Nothing could be written: Ready=False with the backend's message; retry with backoff.
async fn not_ready(
    ck: &ClaudeKey,
    ctx: &Context,
    object_key: &str,
    message: Option<String>,
) -> Result<Action, Error> {
    let message = message.unwrap_or_else(|| "no upstream key has been synced yet".to_string());
    write_status(
        ck,
        ctx,
        conditions::failed(reason::BACKEND_ERROR, &message),
        None,
        None,
    )
    .await?;
    Ok(Action::requeue(ctx.backoff(object_key)))
}

fn key_id(kind: KeyKind, key: &SecretString) -> KeyId {
    KeyId {
        sha256: keys::sha256_hex(key.expose_secret()),
        fingerprint: keys::fingerprint(kind, key.expose_secret()),
    }
}

async fn get_secret(
    api: &Api<Secret>,
    namespace: &str,
    name: &str,
) -> Result<Option<Secret>, Error> {
    api.get_opt(name).await.map_err(|source| Error::ReadSecret {
        namespace: namespace.to_string(),
        name: name.to_string(),
        source,
    })
}

/// Server-side applies `desired` when it differs, and removes data entries added by hand.
async fn write_secret(
    api: &Api<Secret>,
    namespace: &str,
    existing: Option<&Secret>,
    desired: &Secret,
) -> Result<Drift, Error> {
    let name = desired.name_any();
    let fail = |e: kube::Error| {
        let (code, reason) = match &e {
            kube::Error::Api(s) => (s.code, s.reason.clone()),
            _ => (0, "transport error".to_string()),
        };
        Error::WriteSecret {
            namespace: namespace.to_string(),
            name: name.clone(),
            code,
            reason,
        }
    };
    let drift = secrets::drift(existing, desired);
    if drift == Drift::None && secrets::extra_entries(existing, desired).is_empty() {
        return Ok(drift);
    }
    let mut body = desired.clone();
    body.metadata.managed_fields = None;
    let body = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": body.metadata,
        "type": body.type_,
        "data": body.data,
    });
    let params = PatchParams::apply(annotations::MANAGER).force();
    api.patch(&name, &params, &Patch::Apply(&body))
        .await
        .map_err(fail)?;
    let extra = secrets::extra_entries(existing, desired);
    if !extra.is_empty() {
        let removal: serde_json::Map<String, serde_json::Value> = extra
            .into_iter()
            .map(|k| (k, serde_json::Value::Null))
            .collect();
        let patch = serde_json::json!({ "data": removal });
        api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(fail)?;
    }
    Ok(drift)
}

/// Events and metrics for what this reconcile changed.
async fn report_changes(
    ck: &ClaudeKey,
    ctx: &Context,
    decision: &Decision,
    had_ledger: bool,
    drifts: [Drift; 2],
) {
    let fingerprint = decision
        .ledger
        .current_workload()
        .map(|c| c.fingerprint.as_str())
        .unwrap_or_default();
    if let Some(rotation) = decision.rotation {
        let (reason, note) = match rotation {
            RotationReason::Initial => (
                event::KEY_ISSUED,
                format!("issued workload key {fingerprint}"),
            ),
            RotationReason::Revoke => (
                event::KEY_REVOKED,
                format!("revoked the previous workload key; issued {fingerprint}"),
            ),
            RotationReason::Expired => (
                event::KEY_EXPIRED,
                format!("spec.expiresAt passed; retired the workload key, issued {fingerprint}"),
            ),
            RotationReason::ClientLost => (
                event::KEY_ROTATED,
                format!(
                    "the -client Secret was deleted or edited, so its key is unrecoverable; issued {fingerprint}"
                ),
            ),
            other => (
                event::KEY_ROTATED,
                format!(
                    "rotated the workload key ({}); issued {fingerprint}",
                    other.as_str()
                ),
            ),
        };
        info!(
            reason = rotation.as_str(),
            fingerprint, "workload key issued"
        );
        ctx.metrics
            .rotations
            .get_or_create(&RotationLabels {
                reason: rotation.as_str(),
                result: "ok",
            })
            .inc();
        ctx.event(ck, EventType::Normal, reason, note).await;
    }
    if decision.upstream_rolled {
        let up = decision
            .ledger
            .current_upstream()
            .map(|c| c.fingerprint.as_str())
            .unwrap_or_default();
        info!(fingerprint = up, "new upstream key rolled out");
        ctx.metrics
            .rotations
            .get_or_create(&RotationLabels {
                reason: "upstream",
                result: "ok",
            })
            .inc();
        ctx.event(
            ck,
            EventType::Normal,
            event::UPSTREAM_ROTATED,
            format!(
                "rolled out upstream key {up} (version {})",
                decision.ledger.upstream_version
            ),
        )
        .await;
    }
    let names = [
        client_secret_name(&ck.name_any()),
        proxy_secret_name(&ck.name_any()),
    ];
    for (drift, secret) in drifts.into_iter().zip(names) {
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
            ctx.event(
                ck,
                EventType::Warning,
                event::TAMPER_REPAIRED,
                format!("Secret {secret} was edited or deleted by hand; restored it"),
            )
            .await;
        }
    }
}

async fn restart_consumers(
    ck: &ClaudeKey,
    ctx: &Context,
    namespace: &str,
    name: &str,
    fingerprint: &str,
) -> (Option<Duration>, Option<String>) {
    match consumers::restart(&ctx.client, namespace, name, fingerprint, &ctx.limiter).await {
        Ok(outcome) => {
            if !outcome.restarted.is_empty() {
                ctx.metrics
                    .consumer_restarts
                    .inc_by(outcome.restarted.len() as u64);
                let list = outcome.restarted.join(", ");
                info!(workloads = %list, fingerprint, "restarted gateway consumers");
                ctx.event(
                    ck,
                    EventType::Normal,
                    event::CONSUMERS_RESTARTED,
                    format!("restarted {list} for workload key {fingerprint}"),
                )
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

/// Applies the status through the status subresource (server-side apply, field manager claudekey).
async fn write_status(
    ck: &ClaudeKey,
    ctx: &Context,
    desired: Vec<conditions::Desired>,
    decision: Option<&Decision>,
    cached: Option<&CachedKey>,
) -> Result<(), Error> {
    let namespace = ck.namespace().unwrap_or_default();
    let status: ClaudeKeyStatus = conditions::build_status(StatusInput {
        existing: ck.status.as_ref(),
        generation: ck.meta().generation,
        source: ck.spec.source.describe(),
        conditions: desired,
        ledger: decision.map(|d| &d.ledger),
        synced_at: cached.map(|c| c.synced_at),
        next_rotation: decision.and_then(|d| d.next_rotation),
        now: Utc::now(),
    });
    if ck.status.as_ref() == Some(&status) {
        return Ok(());
    }
    let api: Api<ClaudeKey> = Api::namespaced(ctx.client.clone(), &namespace);
    let body = serde_json::json!({
        "apiVersion": "claudekey.io/v1alpha1",
        "kind": "ClaudeKey",
        "status": status,
    });
    api.patch_status(
        &ck.name_any(),
        &PatchParams::apply(annotations::MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await
    .map_err(|source| Error::WriteStatus {
        namespace,
        name: ck.name_any(),
        source,
    })?;
    Ok(())
}

/// Backs off on failures the reconcile could not turn into status.
pub fn error_policy(ck: Arc<ClaudeKey>, error: &Error, ctx: Arc<Context>) -> Action {
    let key = format!("{}/{}", ck.namespace().unwrap_or_default(), ck.name_any());
    warn!(%error, claudekey = key, "reconcile failed");
    ctx.metrics
        .errors
        .get_or_create(&super::metrics::ErrorLabels {
            error: error.kind(),
        })
        .inc();
    Action::requeue(ctx.backoff(&key))
}
