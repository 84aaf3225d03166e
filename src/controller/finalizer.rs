//! The finalizer older releases put on ClaudeKeys placed at the gateway, honoured on deletion:
//! their config Secret lives in the operator namespace, where an owner reference cannot reach,
//! and may carry no ClaudeKey uid for `super::orphans` to go by. New ClaudeKeys get no
//! finalizer; the orphan sweep removes their config once they are gone.

use kube::{
    Api, Resource, ResourceExt,
    api::{Patch, PatchParams},
    runtime::controller::Action,
};

use super::apply::SecretRef;
use super::apply::{Error, delete_secret, safe_reason};
use super::context::Context;
use crate::crd::{ClaudeKey, gateway_config_secret_name};

/// The finalizer claudekey put on ClaudeKeys placed at the gateway before config Secrets
/// carried their ClaudeKey's uid.
pub const NAME: &str = "claudekey.io/gateway-config";

/// On deletion: removes the gateway config Secret, then the finalizer.
pub async fn on_delete(ck: &ClaudeKey, ctx: &Context) -> Result<Action, Error> {
    ctx.keys_in_use.forget(ck);
    ctx.written_status.forget(ck);
    if !ck.finalizers().iter().any(|f| f == NAME) {
        return Ok(Action::await_change());
    }
    let namespace = ck.namespace().ok_or(Error::NoNamespace)?;
    let target = SecretRef {
        namespace: ctx.namespace.clone(),
        name: gateway_config_secret_name(&namespace, &ck.name_any()),
    };
    delete_secret(&ctx.client, &target).await?;
    let rest = ck
        .finalizers()
        .iter()
        .filter(|f| *f != NAME)
        .cloned()
        .collect();
    patch_finalizers(ck, ctx, rest).await?;
    Ok(Action::await_change())
}

/// A merge patch of the whole list, guarded by the resourceVersion, so a concurrent change to
/// another finalizer is never lost (a conflict retries with backoff).
async fn patch_finalizers(
    ck: &ClaudeKey,
    ctx: &Context,
    finalizers: Vec<String>,
) -> Result<ClaudeKey, Error> {
    let namespace = ck.namespace().ok_or(Error::NoNamespace)?;
    let api: Api<ClaudeKey> = Api::namespaced(ctx.client.clone(), &namespace);
    let patch = serde_json::json!({
        "metadata": {
            "finalizers": finalizers,
            "resourceVersion": ck.meta().resource_version,
        }
    });
    api.patch(
        &ck.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await
    .map_err(|e| Error::Finalizer {
        namespace,
        name: ck.name_any(),
        reason: safe_reason(&e),
    })
}
