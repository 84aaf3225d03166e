//! The API ends of the pipeline: reading and server-side applying the owned Secrets and the
//! ClaudeKey status. Errors keep names and API reasons but never a response or request body,
//! since either may quote Secret data.

use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api, Resource, ResourceExt,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};

use super::conditions::{self, StatusInput};
use super::decide::Decision;
use super::secrets::{self, Drift};
use super::stores::WrittenStatus;
use crate::crd::{ClaudeKey, ClaudeKeyStatus, Placement, annotations};

/// A Secret to delete: upstream keys out of a place they may no longer be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretRef {
    pub namespace: String,
    pub name: String,
}

/// Why a reconcile failed. Messages carry names and API reasons, never Secret contents.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to read Secret {namespace}/{name}: {reason}")]
    ReadSecret {
        namespace: String,
        name: String,
        reason: String,
    },
    #[error("failed to write Secret {namespace}/{name}: {reason}")]
    WriteSecret {
        namespace: String,
        name: String,
        reason: String,
    },
    #[error("failed to write status of ClaudeKey {namespace}/{name}: {reason}")]
    WriteStatus {
        namespace: String,
        name: String,
        reason: String,
    },
    #[error("failed to read {kind} {name}: {reason}")]
    ReadSource {
        kind: &'static str,
        name: String,
        reason: String,
    },
    #[error("failed to delete Secret {namespace}/{name}: {reason}")]
    DeleteSecret {
        namespace: String,
        name: String,
        reason: String,
    },
    #[error("failed to update the finalizer of ClaudeKey {namespace}/{name}: {reason}")]
    Finalizer {
        namespace: String,
        name: String,
        reason: String,
    },
    #[error("ClaudeKey has no namespace")]
    NoNamespace,
    /// The watch cache was behind the apiserver: the write was refused by its precondition and
    /// nothing was written. Not a failure; the reconcile comes back when the watch caught up.
    #[error("Secret {namespace}/{name} changed since the cache saw it; will look again")]
    Stale { namespace: String, name: String },
    /// The apiserver refused to create a Secret in a namespace being deleted: nothing can be
    /// created there again. In the ClaudeKey's own namespace not a failure (it goes too).
    #[error("namespace {namespace} is being deleted; nothing new can be written there")]
    NamespaceTerminating { namespace: String },
}

impl Error {
    /// Bounded label for `claudekey_reconcile_errors_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::ReadSecret { .. } => "readSecret",
            Self::WriteSecret { .. } => "writeSecret",
            Self::WriteStatus { .. } => "writeStatus",
            Self::ReadSource { .. } => "readSource",
            Self::DeleteSecret { .. } => "deleteSecret",
            Self::Finalizer { .. } => "finalizer",
            Self::NoNamespace => "noNamespace",
            Self::Stale { .. } => "staleCache",
            Self::NamespaceTerminating { .. } => "namespaceTerminating",
        }
    }
}

/// A kube error reduced to what is safe to log: HTTP code and reason for API errors, the
/// error class otherwise (a deserialization error can quote the payload, i.e. Secret data).
pub fn safe_reason(error: &kube::Error) -> String {
    match error {
        kube::Error::Api(status) => format!("HTTP {} {}", status.code, status.reason),
        kube::Error::SerdeError(_) => "the apiserver's response could not be parsed".to_string(),
        kube::Error::HyperError(e) => format!("connection error: {e}"),
        kube::Error::Service(e) => format!("connection error: {e}"),
        _ => "request failed".to_string(),
    }
}

/// Whether the apiserver refused a write because the namespace is being deleted: its
/// NamespaceLifecycle admission answers 403 with the cause `NamespaceTerminating`. A 403 without
/// it (RBAC) is a real failure.
fn refused_as_terminating(status: &kube::core::Status) -> bool {
    status.code == 403
        && status.details.as_ref().is_some_and(|details| {
            details
                .causes
                .iter()
                .any(|cause| cause.reason == "NamespaceTerminating")
        })
}

pub async fn get_secret(
    api: &Api<Secret>,
    namespace: &str,
    name: &str,
) -> Result<Option<Secret>, Error> {
    api.get_opt(name).await.map_err(|e| Error::ReadSecret {
        namespace: namespace.to_string(),
        name: name.to_string(),
        reason: safe_reason(&e),
    })
}

/// Writes `desired` when it differs from `existing` (the cached Secret): created when the cache
/// holds none, else server-side applied with the cached `resourceVersion` as a precondition;
/// then removes data entries added by hand (which server-side apply would leave, being owned by
/// another field manager). A refused precondition is [`Error::Stale`]: see `super::stores`.
pub async fn write_secret(
    api: &Api<Secret>,
    namespace: &str,
    existing: Option<&Secret>,
    desired: &Secret,
) -> Result<Drift, Error> {
    let name = desired.name_any();
    let fail = |e: kube::Error| match e {
        kube::Error::Api(s) if s.code == 409 => Error::Stale {
            namespace: namespace.to_string(),
            name: name.clone(),
        },
        kube::Error::Api(s) if refused_as_terminating(&s) => Error::NamespaceTerminating {
            namespace: namespace.to_string(),
        },
        e => Error::WriteSecret {
            namespace: namespace.to_string(),
            name: name.clone(),
            reason: safe_reason(&e),
        },
    };
    let drift = secrets::drift(existing, desired);
    let extra = secrets::extra_entries(existing, desired);
    if drift == Drift::None && extra.is_empty() {
        return Ok(drift);
    }
    let Some(existing) = existing else {
        // Not in the cache: create, which the apiserver refuses (409) when it exists after all.
        let params = PostParams {
            field_manager: Some(annotations::MANAGER.to_string()),
            ..PostParams::default()
        };
        api.create(&params, desired).await.map_err(fail)?;
        return Ok(drift);
    };
    let mut metadata = desired.metadata.clone();
    metadata.resource_version = existing.resource_version();
    let body = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": metadata,
        "type": desired.type_,
        "data": desired.data,
    });
    let params = PatchParams::apply(annotations::MANAGER).force();
    let applied = api
        .patch(&name, &params, &Patch::Apply(&body))
        .await
        .map_err(fail)?;
    if !extra.is_empty() {
        let removal: serde_json::Map<String, serde_json::Value> = extra
            .into_iter()
            .map(|k| (k, serde_json::Value::Null))
            .collect();
        let patch = serde_json::json!({
            "metadata": { "resourceVersion": applied.resource_version() },
            "data": removal,
        });
        api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(fail)?;
    }
    Ok(drift)
}

/// What a reconcile wants the status to say.
pub struct StatusUpdate<'a> {
    pub conditions: Vec<conditions::Desired>,
    pub decision: Option<&'a Decision>,
    pub source: &'a str,
    pub placement: Option<Placement>,
    pub identity_token: Option<crate::crd::IdentityTokenStatus>,
    pub synced_at: Option<DateTime<Utc>>,
    pub consumers_restarted_for: Option<String>,
}

/// Replaces the status through the status subresource (a JSON patch, field manager
/// claudekey); skipped when nothing changed, so a status write never triggers another one.
pub async fn write_status(
    ck: &ClaudeKey,
    client: &kube::Client,
    written: &WrittenStatus,
    update: StatusUpdate<'_>,
) -> Result<(), Error> {
    let namespace = ck.namespace().unwrap_or_default();
    let status: ClaudeKeyStatus = conditions::build_status(StatusInput {
        existing: ck.status.as_ref(),
        generation: ck.meta().generation,
        source: update.source.to_string(),
        placement: update.placement,
        identity_token: update.identity_token,
        consumers_restarted_for: update.consumers_restarted_for,
        conditions: update.conditions,
        ledger: update.decision.map(|d| &d.ledger),
        synced_at: update.synced_at,
        next_rotation: update.decision.and_then(|d| d.next_rotation),
        now: Utc::now(),
    });
    if ck.status.as_ref() == Some(&status) {
        return Ok(());
    }
    let api: Api<ClaudeKey> = Api::namespaced(client.clone(), &namespace);
    // The whole status, replaced: this controller is its only writer, so anything another
    // writer put there goes at the next write. A JSON patch spares the apiserver server-side
    // apply's field-set merge on the one write every ClaudeKey gets (measured: 10,000 Ready
    // 132 s -> 116 s on two cores).
    let patch: json_patch::Patch = serde_json::from_value(serde_json::json!([
        { "op": "add", "path": "/status", "value": status }
    ]))
    .expect("a status serializes");
    let params = PatchParams {
        field_manager: Some(annotations::MANAGER.to_string()),
        ..PatchParams::default()
    };
    let result = api
        .patch_status(&ck.name_any(), &params, &Patch::<()>::Json(patch))
        .await
        .map_err(|e| Error::WriteStatus {
            namespace,
            name: ck.name_any(),
            reason: safe_reason(&e),
        })?;
    written.record(ck, result);
    Ok(())
}

/// Deletes a Secret this controller wrote; one already gone is fine.
pub async fn delete_secret(client: &kube::Client, target: &SecretRef) -> Result<(), Error> {
    let api: Api<Secret> = Api::namespaced(client.clone(), &target.namespace);
    match api.delete(&target.name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(Error::DeleteSecret {
            namespace: target.namespace.clone(),
            name: target.name.clone(),
            reason: safe_reason(&e),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(body: serde_json::Value) -> kube::core::Status {
        serde_json::from_value(body).expect("a Status")
    }

    #[test]
    fn only_the_namespace_lifecycle_refusal_counts_as_terminating() {
        // As kube-apiserver v1.34 answered a Secret create (and an apply) in a namespace
        // being deleted.
        let terminating = status(serde_json::json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "secrets \"x\" is forbidden: unable to create new content in namespace held because it is being terminated",
            "reason": "Forbidden",
            "details": { "name": "x", "kind": "secrets", "causes": [{
                "reason": "NamespaceTerminating",
                "message": "namespace held is being terminated",
                "field": "metadata.namespace"
            }]},
            "code": 403
        }));
        assert!(refused_as_terminating(&terminating));
        // RBAC's refusal is a 403 too, and a real failure.
        let rbac = status(serde_json::json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "secrets is forbidden: User \"x\" cannot create resource \"secrets\" in API group \"\" in the namespace \"team\"",
            "reason": "Forbidden",
            "details": { "kind": "secrets" },
            "code": 403
        }));
        assert!(!refused_as_terminating(&rbac));
        let mut not_forbidden = terminating.clone();
        not_forbidden.code = 422;
        assert!(!refused_as_terminating(&not_forbidden));
    }
}
