//! Watch caches the reconcile reads instead of asking the apiserver: the Secrets claudekey
//! manages, the sources, (cluster-wide) the namespaces, and the workloads that may be gateway
//! consumers. At 10,000 ClaudeKeys a GET per object per reconcile is most of the API traffic;
//! the watches that trigger reconciles already carry every object, so the reconcile reads them
//! from here. The workloads are stripped to the annotations of their pod template as they
//! arrive ([`super::consumers::Workload::strip`]), so watching every Deployment costs a few hundred
//! bytes each.
//!
//! A cache can be behind the apiserver. That is safe because nothing is written on its word
//! alone: a Secret the cache does not hold is *created* (the apiserver refuses it when it exists)
//! and one it holds is applied with the cached `resourceVersion` as a precondition (refused when
//! it changed). Either refusal is [`super::apply::Error::Stale`]: the reconcile comes back once
//! the watch has caught up, so a stale cache can never issue a second key.

use std::time::Duration;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::runtime::reflector::{self, ObjectRef, Store, store::Writer};

use std::sync::Arc;

use kube::ResourceExt;

use crate::crd::{ClaudeKey, ClaudeKeySource, ClusterClaudeKeySource, annotations};

/// How long a reconcile waits for the caches' first full list after a (re)start.
const FIRST_LIST: Duration = Duration::from_secs(60);

/// Readers of the caches, shared by every reconcile.
#[derive(Clone)]
pub struct Stores {
    secrets: Store<Secret>,
    /// The namespace the Secret watch covers (`None`: all).
    secrets_scope: Option<String>,
    pub cluster_sources: Store<ClusterClaudeKeySource>,
    pub sources: Store<ClaudeKeySource>,
    /// Only when the controller watches the whole cluster (it may not list namespaces otherwise).
    pub namespaces: Option<Store<Namespace>>,
    /// Workloads whose pod templates may name a ClaudeKey in `claudekey.io/consumes`.
    pub workloads: Workloads<Store<Deployment>, Store<StatefulSet>, Store<DaemonSet>>,
    /// The ClaudeKeys themselves (the controller's own watch fills it): a reconcile reads its
    /// namespace's others for the pattern budget.
    pub claudekeys: Store<ClaudeKey>,
}

/// One of each workload kind whose pods a consumer restart rolls.
#[derive(Clone)]
pub struct Workloads<D, S, A> {
    pub deployments: D,
    pub statefulsets: S,
    pub daemonsets: A,
}

/// The writing ends, fed by the controller's watches.
pub struct Writers {
    pub secrets: Writer<Secret>,
    pub cluster_sources: Writer<ClusterClaudeKeySource>,
    pub sources: Writer<ClaudeKeySource>,
    pub namespaces: Option<Writer<Namespace>>,
    pub workloads: Workloads<Writer<Deployment>, Writer<StatefulSet>, Writer<DaemonSet>>,
    pub claudekeys: Writer<ClaudeKey>,
}

/// Fresh, empty caches for a controller watching `watch_namespace` (`None`: the cluster).
pub fn new(watch_namespace: Option<&str>) -> (Stores, Writers) {
    let (secrets, secrets_writer) = reflector::store();
    let (cluster_sources, cluster_sources_writer) = reflector::store();
    let (sources, sources_writer) = reflector::store();
    let (namespaces, namespaces_writer) = match watch_namespace {
        Some(_) => (None, None),
        None => {
            let (reader, writer) = reflector::store();
            (Some(reader), Some(writer))
        }
    };
    let (deployments, deployments_writer) = reflector::store();
    let (statefulsets, statefulsets_writer) = reflector::store();
    let (daemonsets, daemonsets_writer) = reflector::store();
    let (claudekeys, claudekeys_writer) = reflector::store();
    let stores = Stores {
        secrets,
        secrets_scope: watch_namespace.map(str::to_string),
        cluster_sources,
        sources,
        namespaces,
        workloads: Workloads {
            deployments,
            statefulsets,
            daemonsets,
        },
        claudekeys,
    };
    let writers = Writers {
        secrets: secrets_writer,
        cluster_sources: cluster_sources_writer,
        sources: sources_writer,
        namespaces: namespaces_writer,
        workloads: Workloads {
            deployments: deployments_writer,
            statefulsets: statefulsets_writer,
            daemonsets: daemonsets_writer,
        },
        claudekeys: claudekeys_writer,
    };
    (stores, writers)
}

/// What the cache says about one Secret.
#[derive(Debug)]
pub enum Cached<T> {
    /// The Secret watch covers this namespace: the answer (present or not).
    Known(Option<T>),
    /// Outside the watch (a namespaced controller's operator namespace): ask the apiserver.
    NotCovered,
}

impl Stores {
    /// Waits until every cache holds its first full list, so a reconcile right after a start
    /// never mistakes "not listed yet" for "does not exist". `false` when that took too long.
    pub async fn ready(&self) -> bool {
        let all = async {
            let _ = self.secrets.wait_until_ready().await;
            let _ = self.cluster_sources.wait_until_ready().await;
            let _ = self.sources.wait_until_ready().await;
            if let Some(namespaces) = &self.namespaces {
                let _ = namespaces.wait_until_ready().await;
            }
            let _ = self.workloads.deployments.wait_until_ready().await;
            let _ = self.workloads.statefulsets.wait_until_ready().await;
            let _ = self.workloads.daemonsets.wait_until_ready().await;
            // Reconciles start as the ClaudeKeys' first list streams in: the pattern budget
            // must see all of a namespace's, or it would let a ClaudeKey past its place.
            let _ = self.claudekeys.wait_until_ready().await;
        };
        tokio::time::timeout(FIRST_LIST, all).await.is_ok()
    }

    /// A managed Secret as the watch last saw it.
    pub fn secret(&self, namespace: &str, name: &str) -> Cached<Secret> {
        if !self.covers(namespace) {
            return Cached::NotCovered;
        }
        let key = ObjectRef::new(name).within(namespace);
        Cached::Known(self.secrets.get(&key).map(|s| (*s).clone()))
    }

    /// Whether the watches reach `namespace`: this controller reconciles the ClaudeKeys there
    /// (its Secret watch has the same scope as its ClaudeKey watch).
    pub fn covers(&self, namespace: &str) -> bool {
        self.secrets_scope
            .as_deref()
            .is_none_or(|scope| scope == namespace)
    }

    /// Every gateway config Secret in `operator_namespace` as the watch last saw them; `None`
    /// when the watch does not cover that namespace.
    pub fn gateway_configs(&self, operator_namespace: &str) -> Option<Vec<Arc<Secret>>> {
        if !self.covers(operator_namespace) {
            return None;
        }
        let is_config = |s: &Secret| {
            s.namespace().as_deref() == Some(operator_namespace)
                && s.labels()
                    .get(annotations::CONFIG_LABEL)
                    .map(String::as_str)
                    == Some(annotations::CONFIG_LABEL_VALUE)
        };
        Some(
            self.secrets
                .state()
                .into_iter()
                .filter(|s| is_config(s))
                .collect(),
        )
    }
}

/// How many of its own versions a ClaudeKey's record remembers as replaced (a chain of status
/// writes by reconciles the watch has not caught up with).
const REPLACED_KEPT: usize = 4;

/// Each ClaudeKey as this controller last wrote it, with the versions that write replaced.
///
/// The ClaudeKey a reconcile gets comes from the controller's own watch, which delivers a write
/// some time after it happened: a moment on a quiet cluster, many seconds when 10,000 ClaudeKeys
/// were applied at once. A reconcile in that time would see the old object and redo what the
/// write recorded (the status again, consumers again). When the object
/// handed in is a version one of our writes replaced, the object that write returned is the
/// truth; any later change by anybody has a version we never replaced, and is taken as it is.
#[derive(Default)]
pub struct WrittenStatus {
    by_uid: std::sync::Mutex<std::collections::HashMap<String, Written>>,
}

struct Written {
    replaced: Vec<String>,
    latest: Arc<ClaudeKey>,
}

impl WrittenStatus {
    /// Remembers that a write over `over` returned `result`.
    pub fn record(&self, over: &ClaudeKey, result: ClaudeKey) {
        let (Some(uid), Some(version)) = (over.uid(), over.resource_version()) else {
            return;
        };
        let mut all = self.lock();
        let mut replaced = match all.remove(&uid) {
            // A chain of our own writes: every link stays replaced.
            Some(w) if w.latest.resource_version().as_deref() == Some(version.as_str()) => {
                w.replaced
            }
            _ => Vec::new(),
        };
        replaced.push(version);
        if replaced.len() > REPLACED_KEPT {
            replaced.remove(0);
        }
        let mut result = result;
        result.metadata.managed_fields = None;
        let latest = Arc::new(result);
        all.insert(uid, Written { replaced, latest });
    }

    /// `ck`, or the object our last write made of it when `ck` is a version that write replaced.
    pub fn overlay(&self, ck: &Arc<ClaudeKey>) -> Arc<ClaudeKey> {
        let (Some(uid), Some(version)) = (ck.uid(), ck.resource_version()) else {
            return ck.clone();
        };
        match self.lock().get(&uid) {
            Some(w) if w.replaced.contains(&version) => w.latest.clone(),
            _ => ck.clone(),
        }
    }

    /// Forgets a deleted ClaudeKey.
    pub fn forget(&self, ck: &ClaudeKey) {
        if let Some(uid) = ck.uid() {
            self.lock().remove(&uid);
        }
    }

    /// Keeps only the ClaudeKeys for which `live` holds (deleted ones are never reconciled
    /// again, so the periodic sweep removes them).
    pub fn retain(&self, live: impl Fn(&str) -> bool) {
        self.lock().retain(|uid, _| live(uid));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, Written>> {
        self.by_uid.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::ClaudeKeyStatus;

    #[test]
    fn a_namespaced_controller_asks_for_secrets_outside_its_namespace() {
        let (stores, _writers) = new(Some("team-a"));
        assert!(matches!(
            stores.secret("team-a", "x-client"),
            Cached::Known(None)
        ));
        assert!(matches!(
            stores.secret("claudekey-system", "claudekey-gw-1"),
            Cached::NotCovered
        ));
        assert!(stores.namespaces.is_none());
    }

    fn claudekey(uid: &str, version: &str, source: &str) -> ClaudeKey {
        let mut ck: ClaudeKey = serde_json::from_value(serde_json::json!({
            "apiVersion": "claudekey.io/v1alpha2", "kind": "ClaudeKey",
            "metadata": { "name": "a", "namespace": "n", "uid": uid, "resourceVersion": version },
            "spec": { "sourceRef": { "kind": "ClusterClaudeKeySource", "name": "s" } },
        }))
        .unwrap();
        ck.status = Some(ClaudeKeyStatus {
            source: Some(source.to_string()),
            ..ClaudeKeyStatus::default()
        });
        ck
    }

    #[test]
    fn our_last_write_replaces_only_the_versions_it_was_written_over() {
        let written = WrittenStatus::default();
        let seen = |ck: ClaudeKey| {
            let ck = written.overlay(&Arc::new(ck));
            (
                ck.resource_version().unwrap(),
                ck.status.clone().unwrap().source.unwrap(),
            )
        };
        // A status over version 10 made 11, the next over 11 made 12.
        written.record(&claudekey("u1", "10", "old"), claudekey("u1", "11", "old"));
        written.record(&claudekey("u1", "11", "old"), claudekey("u1", "12", "new"));
        // The watch has delivered neither write yet, or only the first: the last write is the truth.
        assert_eq!(
            seen(claudekey("u1", "10", "old")),
            ("12".into(), "new".into())
        );
        assert_eq!(
            seen(claudekey("u1", "11", "old")),
            ("12".into(), "new".into())
        );
        // The write itself, or anybody's change after it, is taken as it is.
        assert_eq!(
            seen(claudekey("u1", "12", "new")),
            ("12".into(), "new".into())
        );
        assert_eq!(
            seen(claudekey("u1", "13", "edited")),
            ("13".into(), "edited".into())
        );
        // Another object (a ClaudeKey recreated under the same name) never inherits it.
        assert_eq!(
            seen(claudekey("u2", "10", "other")),
            ("10".into(), "other".into())
        );
        // A write over somebody else's version starts a new chain: 10 and 11 are no longer ours.
        written.record(
            &claudekey("u1", "13", "edited"),
            claudekey("u1", "14", "again"),
        );
        assert_eq!(
            seen(claudekey("u1", "11", "old")),
            ("11".into(), "old".into())
        );
        assert_eq!(
            seen(claudekey("u1", "13", "edited")),
            ("14".into(), "again".into())
        );
        written.forget(&claudekey("u1", "14", "again"));
        assert_eq!(
            seen(claudekey("u1", "13", "edited")),
            ("13".into(), "edited".into())
        );
    }

    #[test]
    fn a_cluster_wide_controller_covers_every_namespace() {
        let (stores, _writers) = new(None);
        assert!(matches!(
            stores.secret("anywhere", "x-client"),
            Cached::Known(None)
        ));
        assert!(stores.namespaces.is_some());
    }
}
