//! The bookkeeping behind retirement (DESIGN.md §10), apart from the pass that acts on it: which
//! upstream keys each ClaudeKey uses (from its verified ledger), and each cluster source's
//! current key and retirement queue in its status, written one at a time.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use kube::api::{Patch, PatchParams};
use kube::{Api, Client, Resource, ResourceExt};

use crate::crd::{ClaudeKey, ClusterClaudeKeySource, SourceKeyStatus, SourceStatus};

/// An upstream key a ClaudeKey still uses (current, or until its grace ends), by fingerprint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsedKey {
    pub fingerprint: String,
    pub until: Option<DateTime<Utc>>,
}

/// Which upstream keys each ClaudeKey uses, by uid, as its last reconcile found them.
#[derive(Default)]
pub struct KeysInUse {
    by_uid: Mutex<HashMap<String, Vec<UsedKey>>>,
}

impl KeysInUse {
    pub fn record(&self, ck: &ClaudeKey, used: Vec<UsedKey>) {
        if let Some(uid) = ck.uid() {
            self.lock().insert(uid, used);
        }
    }

    pub fn forget(&self, ck: &ClaudeKey) {
        if let Some(uid) = ck.uid() {
            self.lock().remove(&uid);
        }
    }

    /// Whether any of the `live` ClaudeKeys uses `fingerprint` at `now`; `None` while one of
    /// them has not been reconciled since this controller started (nobody can say yet).
    pub fn in_use(
        &self,
        fingerprint: &str,
        live: &HashSet<String>,
        now: DateTime<Utc>,
    ) -> Option<bool> {
        let mut map = self.lock();
        map.retain(|uid, _| live.contains(uid));
        if map.len() < live.len() {
            return None;
        }
        Some(
            map.values()
                .flatten()
                .any(|k| k.fingerprint == fingerprint && k.until.is_none_or(|until| now < until)),
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<UsedKey>>> {
        self.by_uid.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The next status of a source that now serves `key`, or `None` when nothing changed. The key it
/// replaced joins `retiring` when the source may retire keys (and it has a hint to find it by).
pub fn record_key(
    status: &SourceStatus,
    key: &SourceKeyStatus,
    backend: &str,
    may_retire: bool,
) -> Option<SourceStatus> {
    if status.current.as_ref() == Some(key) && status.backend.as_deref() == Some(backend) {
        return None;
    }
    let mut next = status.clone();
    next.backend = Some(backend.to_string());
    if let Some(old) = next.current.replace(key.clone()) {
        let queued = next
            .retiring
            .iter()
            .any(|r| r.fingerprint == old.fingerprint);
        if may_retire && old.fingerprint != key.fingerprint && old.hint.is_some() && !queued {
            next.retiring.push(old);
        }
    }
    // A key that came back to its source is not retired.
    next.retiring.retain(|r| r.fingerprint != key.fingerprint);
    Some(next)
}

/// Records sources' current keys in their status, one writer at a time.
#[derive(Default)]
pub struct SourceKeys {
    /// The last key recorded per source, so a steady state makes no API call.
    seen: Mutex<HashMap<String, String>>,
    write: tokio::sync::Mutex<()>,
}

impl SourceKeys {
    /// Called by every reconcile that read a cluster source's key.
    pub async fn observe(&self, client: &Client, source: &str, key: &SourceKeyStatus) {
        let seen = self
            .seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(source)
            .cloned();
        if seen.as_deref() == Some(key.fingerprint.as_str()) {
            return;
        }
        let recorded = self
            .update(client, source, |fresh, status| {
                let backend = fresh.spec.backend().describe();
                let may_retire = fresh.spec.anthropic_admin.is_some();
                record_key(status, key, &backend, may_retire)
            })
            .await;
        match recorded {
            Ok(()) => {
                self.seen
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(source.to_string(), key.fingerprint.clone());
            }
            Err(error) => tracing::warn!(source, %error, "failed to record the source's key"),
        }
    }

    /// Read-modify-write of a source's status, one writer at a time, guarded by the
    /// resourceVersion and retried on a conflict. `change` returns the new status, or `None`
    /// when there is nothing to write.
    pub async fn update(
        &self,
        client: &Client,
        source: &str,
        change: impl Fn(&ClusterClaudeKeySource, &SourceStatus) -> Option<SourceStatus>,
    ) -> Result<(), kube::Error> {
        let _one = self.write.lock().await;
        let api: Api<ClusterClaudeKeySource> = Api::all(client.clone());
        let mut attempts = 0;
        loop {
            let Some(fresh) = api.get_opt(source).await? else {
                return Ok(());
            };
            let status = fresh.status.clone().unwrap_or_default();
            let Some(next) = change(&fresh, &status) else {
                return Ok(());
            };
            match patch_status(&api, &fresh, &next).await {
                Err(kube::Error::Api(e)) if e.code == 409 && attempts < 3 => attempts += 1,
                other => return other,
            }
        }
    }
}

/// A merge patch of the whole status. Lists are written even when empty: a merge patch that
/// leaves a field out keeps the old value, and an emptied `retiring` must stay empty.
async fn patch_status(
    api: &Api<ClusterClaudeKeySource>,
    source: &ClusterClaudeKeySource,
    status: &SourceStatus,
) -> Result<(), kube::Error> {
    let mut body = serde_json::to_value(status).expect("status always serializes");
    body["retiring"] = serde_json::json!(status.retiring);
    body["retired"] = serde_json::json!(status.retired);
    let patch = serde_json::json!({
        "metadata": { "resourceVersion": source.meta().resource_version },
        "status": body,
    });
    api.patch_status(
        &source.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(fp: &str) -> SourceKeyStatus {
        SourceKeyStatus {
            fingerprint: fp.into(),
            hint: Some(format!("sk-ant-api03-…{fp}")),
        }
    }

    #[test]
    fn a_replaced_key_is_queued_only_when_the_source_may_retire() {
        let first =
            record_key(&SourceStatus::default(), &key("up:1"), "kubernetes:a", true).unwrap();
        assert_eq!(first.current, Some(key("up:1")));
        assert!(first.retiring.is_empty());
        assert_eq!(
            record_key(&first, &key("up:1"), "kubernetes:a", true),
            None,
            "steady state"
        );
        let second = record_key(&first, &key("up:2"), "kubernetes:a", true).unwrap();
        assert_eq!(second.retiring, vec![key("up:1")]);
        let plain = record_key(&first, &key("up:2"), "kubernetes:a", false).unwrap();
        assert!(plain.retiring.is_empty());
        // Back to the old key: it is not retired.
        let back = record_key(&second, &key("up:1"), "kubernetes:a", true).unwrap();
        assert_eq!(back.retiring, vec![key("up:2")]);
    }

    fn ck(uid: &str) -> ClaudeKey {
        let mut ck: ClaudeKey = serde_yaml::from_str(
            "apiVersion: claudekey.io/v1alpha2\nkind: ClaudeKey\nmetadata: { name: x, namespace: n }\nspec:\n  sourceRef: { kind: ClusterClaudeKeySource, name: s }\n",
        )
        .unwrap();
        ck.metadata.uid = Some(uid.into());
        ck
    }

    #[test]
    fn a_key_is_free_only_when_every_live_claudekey_was_seen_and_none_uses_it() {
        let now: DateTime<Utc> = "2026-12-01T10:00:00Z".parse().unwrap();
        let keys = KeysInUse::default();
        let live: HashSet<String> = ["a".to_string(), "b".to_string()].into();
        let used = |fp: &str, until: Option<DateTime<Utc>>| UsedKey {
            fingerprint: fp.into(),
            until,
        };
        keys.record(&ck("a"), vec![used("up:2", None)]);
        assert_eq!(keys.in_use("up:1", &live, now), None, "b not seen yet");
        keys.record(
            &ck("b"),
            vec![
                used("up:2", None),
                used("up:1", Some(now + chrono::TimeDelta::minutes(5))),
            ],
        );
        assert_eq!(keys.in_use("up:1", &live, now), Some(true), "b's grace");
        assert_eq!(
            keys.in_use("up:1", &live, now + chrono::TimeDelta::minutes(5)),
            Some(false),
            "grace over"
        );
        // A deleted ClaudeKey no longer counts, and is dropped from the map.
        keys.record(&ck("gone"), vec![used("up:1", None)]);
        assert_eq!(
            keys.in_use("up:1", &live, now + chrono::TimeDelta::hours(1)),
            Some(false)
        );
    }
}
