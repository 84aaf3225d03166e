//! Gateway config Secrets whose ClaudeKey is gone. A config Secret lives in the operator
//! namespace, where no owner reference can reach, so the garbage collector never removes it.
//! Rather than a finalizer on every ClaudeKey (one more write each, and a ClaudeKey stuck in
//! `Terminating` whenever no controller leads), each config carries the uid of the ClaudeKey it
//! was written for, and the leader deletes the ones whose ClaudeKey no longer exists: at once
//! when its watch reports a deletion, at start (deletions made while nobody led) and every few
//! minutes.
//!
//! A ClaudeKey created again under the same name never reads nor overwrites an earlier one's
//! config ([`written_for_another`]): the reconcile asks for the sweep here and waits. Nothing is
//! deleted on the caches' word alone: the ClaudeKey's absence is read back from the apiserver,
//! and the delete carries the config's uid and resourceVersion as preconditions, so a config
//! written meanwhile for a new ClaudeKey is never removed.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{DeleteParams, ListParams, Preconditions};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Resource, ResourceExt};
use tokio::time::Instant;
use tracing::{info, warn};

use super::apply::safe_reason;
use super::context::Context;
use super::stores::Cached;
use crate::crd::{ClaudeKey, annotations, gateway_config_secret_name};

/// How often every config Secret is checked, for deletions no watch reported.
const FULL_SWEEP: Duration = Duration::from_secs(300);

/// The ClaudeKey a config Secret was written for.
#[derive(Debug, PartialEq, Eq)]
pub struct WrittenFor<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    /// Absent on configs written while a finalizer removed them (those ClaudeKeys still carry
    /// it, see `super::finalizer`).
    pub uid: Option<&'a str>,
}

/// Whom `config` was written for, from its annotations; `None` when it does not say.
pub fn written_for(config: &Secret) -> Option<WrittenFor<'_>> {
    let found = config.annotations();
    let (namespace, name) = found
        .get(annotations::CLAUDEKEY_ANNOTATION)?
        .split_once('/')?;
    Some(WrittenFor {
        namespace,
        name,
        uid: found
            .get(annotations::CLAUDEKEY_UID_ANNOTATION)
            .map(String::as_str),
    })
}

/// Whether `config` was written for an earlier ClaudeKey of `ck`'s name: its ledger is signed
/// for another uid, so the reconcile neither reads nor overwrites it, and waits for the sweep.
/// (A config naming another ClaudeKey altogether is someone else's Secret: the plan refuses it.)
pub fn written_for_another(config: &Secret, ck: &ClaudeKey) -> bool {
    let Some(written) = written_for(config) else {
        return false;
    };
    let same_name =
        Some(written.namespace) == ck.meta().namespace.as_deref() && written.name == ck.name_any();
    same_name && matches!((written.uid, ck.uid()), (Some(w), Some(live)) if w != live)
}

/// Whether a config written for `written` belongs to nobody, `live` being the uid of the
/// ClaudeKey of its name that exists now. A config without a uid belongs to whichever
/// ClaudeKey has its name (the finalizer it carries removes the config before it goes).
pub fn orphaned(written: Option<&str>, live: Option<&str>) -> bool {
    match (written, live) {
        (_, None) => true,
        (Some(written), Some(live)) => written != live,
        (None, Some(_)) => false,
    }
}

/// The leader's sweep, for as long as it leads: every config at start and each
/// [`FULL_SWEEP`], and the queued ClaudeKeys as they come.
pub async fn sweep_forever(ctx: Arc<Context>, claudekeys: Store<ClaudeKey>) {
    // "Not listed yet" is not "deleted": nothing before both caches hold a full list.
    let _ = claudekeys.wait_until_ready().await;
    while !ctx.stores.ready().await {
        warn!("the watch caches hold no full list yet; the orphan sweep waits");
    }
    let mut next_full = Instant::now();
    loop {
        if Instant::now() >= next_full {
            for config in configs(&ctx).await {
                check(&ctx, &claudekeys, &config).await;
            }
            next_full = Instant::now() + FULL_SWEEP;
        }
        for (namespace, name) in ctx.orphans.take() {
            if let Some(config) = config_of(&ctx, &namespace, &name).await {
                check(&ctx, &claudekeys, &config).await;
            }
        }
        tokio::select! {
            () = ctx.orphans.pushed() => {}
            () = tokio::time::sleep_until(next_full) => {}
        }
    }
}

/// Every gateway config Secret: from the Secret cache, or listed where the watch does not reach.
async fn configs(ctx: &Context) -> Vec<Arc<Secret>> {
    if let Some(cached) = ctx.stores.gateway_configs(&ctx.namespace) {
        return cached;
    }
    let selector = format!(
        "{}={}",
        annotations::CONFIG_LABEL,
        annotations::CONFIG_LABEL_VALUE
    );
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    match api.list(&ListParams::default().labels(&selector)).await {
        Ok(list) => list.items.into_iter().map(Arc::new).collect(),
        Err(e) => {
            warn!(
                reason = safe_reason(&e),
                "failed to list the gateway configs"
            );
            Vec::new()
        }
    }
}

/// The config Secret of ClaudeKey `namespace/name`, if any.
async fn config_of(ctx: &Context, namespace: &str, name: &str) -> Option<Arc<Secret>> {
    let config_name = gateway_config_secret_name(namespace, name);
    match ctx.stores.secret(&ctx.namespace, &config_name) {
        Cached::Known(found) => found.map(Arc::new),
        Cached::NotCovered => {
            let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
            match api.get_opt(&config_name).await {
                Ok(found) => found.map(Arc::new),
                Err(e) => {
                    warn!(reason = safe_reason(&e), "failed to read a gateway config");
                    None
                }
            }
        }
    }
}

/// Deletes `config` when it is orphaned by the cache's account and still by the apiserver's.
/// Failures are logged; the next full sweep tries again.
async fn check(ctx: &Context, claudekeys: &Store<ClaudeKey>, config: &Secret) {
    let Some(owner) = written_for(config) else {
        return;
    };
    // Another controller's ClaudeKey (one watching another namespace, sharing this operator
    // namespace): not this one's to judge, nor to look up every few minutes.
    if !ctx.stores.covers(owner.namespace) {
        return;
    }
    let key = ObjectRef::new(owner.name).within(owner.namespace);
    let cached = claudekeys.get(&key).and_then(|ck| ck.uid());
    if !orphaned(owner.uid, cached.as_deref()) {
        return;
    }
    let api: Api<ClaudeKey> = Api::namespaced(ctx.client.clone(), owner.namespace);
    let live = match api.get_opt(owner.name).await {
        Ok(found) => found.and_then(|ck| ck.uid()),
        Err(e) => {
            warn!(reason = safe_reason(&e), "failed to read a ClaudeKey");
            return;
        }
    };
    if !orphaned(owner.uid, live.as_deref()) {
        return;
    }
    let claudekey = format!("{}/{}", owner.namespace, owner.name);
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid: config.uid(),
            resource_version: config.resource_version(),
        }),
        ..DeleteParams::default()
    };
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    match api.delete(&config.name_any(), &params).await {
        Ok(_) => info!(
            claudekey,
            "removed the gateway config of a ClaudeKey that no longer exists"
        ),
        // Gone already, or rewritten since it was read: either way not ours to remove now.
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
        Err(e) => warn!(
            claudekey,
            reason = safe_reason(&e),
            "failed to remove an orphaned gateway config"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(annotations: &[(&str, &str)]) -> Secret {
        let mut secret = Secret::default();
        secret.metadata.annotations = Some(
            annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        secret
    }

    fn claudekey(uid: &str) -> ClaudeKey {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "claudekey.io/v1alpha2", "kind": "ClaudeKey",
            "metadata": { "name": "bot", "namespace": "team", "uid": uid },
            "spec": { "sourceRef": { "kind": "ClusterClaudeKeySource", "name": "s" } },
        }))
        .unwrap()
    }

    #[test]
    fn a_config_names_the_claudekey_it_was_written_for() {
        let stamped = config(&[
            ("claudekey.io/claudekey", "team/bot"),
            ("claudekey.io/claudekey-uid", "u1"),
        ]);
        assert_eq!(
            written_for(&stamped),
            Some(WrittenFor {
                namespace: "team",
                name: "bot",
                uid: Some("u1")
            })
        );
        let legacy = config(&[("claudekey.io/claudekey", "team/bot")]);
        assert_eq!(written_for(&legacy).unwrap().uid, None);
        // Someone else's Secret with our label but no (or a malformed) owner is never ours.
        assert_eq!(written_for(&config(&[])), None);
        assert_eq!(
            written_for(&config(&[("claudekey.io/claudekey", "no-slash")])),
            None
        );
    }

    #[test]
    fn only_a_claudekey_of_another_uid_makes_a_config_earlier() {
        let stamped = config(&[
            ("claudekey.io/claudekey", "team/bot"),
            ("claudekey.io/claudekey-uid", "u1"),
        ]);
        assert!(!written_for_another(&stamped, &claudekey("u1")));
        assert!(written_for_another(&stamped, &claudekey("u2")));
        let legacy = config(&[("claudekey.io/claudekey", "team/bot")]);
        assert!(!written_for_another(&legacy, &claudekey("u2")));
        let another = config(&[
            ("claudekey.io/claudekey", "team/other"),
            ("claudekey.io/claudekey-uid", "u1"),
        ]);
        assert!(!written_for_another(&another, &claudekey("u2")));
    }

    #[test]
    fn a_config_is_orphaned_when_its_claudekey_is_gone_or_replaced() {
        assert!(orphaned(Some("u1"), None));
        assert!(orphaned(Some("u1"), Some("u2")));
        assert!(!orphaned(Some("u1"), Some("u1")));
        assert!(orphaned(None, None));
        assert!(!orphaned(None, Some("u2")));
    }
}
