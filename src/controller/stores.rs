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

use crate::crd::{ClaudeKey, ClaudeKeySource, ClaudeKeyStatus, ClusterClaudeKeySource};

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
        };
        tokio::time::timeout(FIRST_LIST, all).await.is_ok()
    }

    /// A managed Secret as the watch last saw it.
    pub fn secret(&self, namespace: &str, name: &str) -> Cached<Secret> {
        if self
            .secrets_scope
            .as_deref()
            .is_some_and(|scope| scope != namespace)
        {
            return Cached::NotCovered;
        }
        let key = ObjectRef::new(name).within(namespace);
        Cached::Known(self.secrets.get(&key).map(|s| (*s).clone()))
    }
}

/// The status each ClaudeKey was last given, with the resourceVersion it was written over.
///
/// The ClaudeKey a reconcile gets comes from the controller's own watch, which delivers a status
/// write a moment after it happened; a reconcile in that moment would see the old status and
/// redo what the write recorded (write it again, roll consumers again). When the object handed
/// in is exactly the version the last write replaced, the written status is the truth.
#[derive(Default)]
pub struct WrittenStatus {
    by_uid: std::sync::Mutex<std::collections::HashMap<String, (String, ClaudeKeyStatus)>>,
}

impl WrittenStatus {
    /// Remembers a status applied over resourceVersion `over`.
    pub fn record(&self, ck: &ClaudeKey, status: &ClaudeKeyStatus) {
        if let (Some(uid), Some(over)) = (ck.uid(), ck.resource_version()) {
            self.lock().insert(uid, (over, status.clone()));
        }
    }

    /// `ck`, with the status last written over exactly this version of it.
    pub fn overlay(&self, ck: &Arc<ClaudeKey>) -> Arc<ClaudeKey> {
        let (Some(uid), Some(version)) = (ck.uid(), ck.resource_version()) else {
            return ck.clone();
        };
        match self.lock().get(&uid) {
            Some((over, status)) if *over == version => {
                let mut fresher = (**ck).clone();
                fresher.status = Some(status.clone());
                Arc::new(fresher)
            }
            _ => ck.clone(),
        }
    }

    /// Forgets a deleted ClaudeKey.
    pub fn forget(&self, ck: &ClaudeKey) {
        if let Some(uid) = ck.uid() {
            self.lock().remove(&uid);
        }
    }

    /// Keeps only the ClaudeKeys for which `live` holds (deleted ones without a finalizer are
    /// never reconciled again, so the periodic sweep removes them).
    pub fn retain(&self, live: impl Fn(&str) -> bool) {
        self.lock().retain(|uid, _| live(uid));
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, (String, ClaudeKeyStatus)>>
    {
        self.by_uid.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn claudekey(uid: &str, version: &str, source: &str) -> Arc<ClaudeKey> {
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
        Arc::new(ck)
    }

    #[test]
    fn the_written_status_replaces_only_the_version_it_was_written_over() {
        let written = WrittenStatus::default();
        let old = claudekey("u1", "10", "old");
        let new_status = ClaudeKeyStatus {
            source: Some("new".into()),
            ..ClaudeKeyStatus::default()
        };
        written.record(&old, &new_status);
        let seen = |ck: &Arc<ClaudeKey>| written.overlay(ck).status.clone().unwrap().source;
        // The watch has not delivered the write yet: the written status is the truth.
        assert_eq!(seen(&old).as_deref(), Some("new"));
        // A later version (the write itself, or anybody's change after it) is taken as it is.
        assert_eq!(
            seen(&claudekey("u1", "11", "edited")).as_deref(),
            Some("edited")
        );
        // Another object (a ClaudeKey recreated under the same name) never inherits it.
        assert_eq!(
            seen(&claudekey("u2", "10", "other")).as_deref(),
            Some("other")
        );
        written.forget(&old);
        assert_eq!(seen(&old).as_deref(), Some("old"));
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
