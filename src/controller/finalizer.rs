//! The finalizer of gateway placement: a ClaudeKey's config Secret lives in the operator
//! namespace, where an owner reference cannot reach, so deleting the ClaudeKey must delete it
//! explicitly (its workload key is then refused by the gateway at once).

use kube::{
    Api, Resource, ResourceExt,
    api::{Patch, PatchParams},
    runtime::controller::Action,
};

use super::apply::SecretRef;
use super::apply::{Error, delete_secret, safe_reason};
use super::context::Context;
use crate::crd::{ClaudeKey, gateway_config_secret_name};

/// The finalizer claudekey puts on ClaudeKeys placed at the gateway.
pub const NAME: &str = "claudekey.io/gateway-config";

/// Adds the finalizer before anything is written outside the ClaudeKey's namespace, so a crash
/// can never leave a config Secret that nothing will remove. Returns the ClaudeKey as patched
/// (its new resourceVersion), or `None` when it had the finalizer already.
pub async fn ensure(ck: &ClaudeKey, ctx: &Context) -> Result<Option<ClaudeKey>, Error> {
    if ck.finalizers().iter().any(|f| f == NAME) {
        return Ok(None);
    }
    let mut finalizers = ck.finalizers().to_vec();
    finalizers.push(NAME.to_string());
    let patched = patch_finalizers(ck, ctx, finalizers).await?;
    ctx.written_status.record(ck, patched.clone());
    Ok(Some(patched))
}

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
