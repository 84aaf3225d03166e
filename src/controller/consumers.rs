//! Gateway consumers (DESIGN.md §3 step 4): workloads whose pod template says
//! `claudekey.io/consumes: <name>` are rolled once per workload key, by stamping the key's
//! fingerprint into `claudekey.io/restartedFor`. Converging on that stamp makes it idempotent.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::{
    DaemonSet, DaemonSetSpec, Deployment, DeploymentSpec, StatefulSet, StatefulSetSpec,
};
use k8s_openapi::api::core::v1::PodTemplateSpec;
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{ObjectMeta, Patch, PatchParams},
    runtime::reflector::Store,
};
use serde::{Serialize, de::DeserializeOwned};
use tokio::time::Instant;

use chrono::{DateTime, TimeDelta, Utc};

use super::apply::safe_reason;
use super::ledger::Ledger;
use super::stores::Workloads;
use crate::crd::annotations::{CONSUMES, INJECT, RESTARTED_FOR};

#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    #[error("failed to restart {kind} {namespace}/{name}: {reason}")]
    Patch {
        kind: String,
        namespace: String,
        name: String,
        reason: String,
    },
}

/// Whether a pod template must be rolled for workload key `fingerprint` of ClaudeKey `name`.
/// Templates with the injected sidecar never are: their key changes inside the sidecar.
pub fn needs_restart(template: Option<&PodTemplateSpec>, name: &str, fingerprint: &str) -> bool {
    let Some(annotations) = template
        .and_then(|t| t.metadata.as_ref())
        .and_then(|m| m.annotations.as_ref())
    else {
        return false;
    };
    annotations.get(CONSUMES).is_some_and(|c| c == name)
        && !annotations.contains_key(INJECT)
        && annotations
            .get(RESTARTED_FOR)
            .is_none_or(|f| f != fingerprint)
}

/// When the consumers of the current key may be rolled. While a previous key is still in its
/// grace period, wait `delay` (at most half the grace): gateway proxies read the `-proxy` Secret
/// through a volume the kubelet refreshes only periodically, so pods started at once with the new
/// key could be refused. With no previous key (first issue, revoke) there is nothing to wait for.
pub fn restart_at(ledger: &Ledger, delay: Duration) -> DateTime<Utc> {
    let delay = TimeDelta::from_std(delay).unwrap_or(TimeDelta::MAX);
    match ledger.previous_workload().and_then(|p| p.valid_until) {
        Some(until) => ledger.issued_at + delay.min((until - ledger.issued_at) / 2),
        None => ledger.issued_at,
    }
}

/// One token bucket per namespace, shared by all reconciles: a wave of rotations cannot restart
/// everything at once, and one namespace rotating often cannot use up the restarts of others.
pub struct RestartLimiter {
    per_minute: u32,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl RestartLimiter {
    pub fn new(per_minute: u32) -> Self {
        Self {
            per_minute: per_minute.max(1),
            buckets: Mutex::default(),
        }
    }

    /// Takes one restart in `namespace`, or says how long until one is available there.
    pub fn try_take(&self, namespace: &str) -> Result<(), Duration> {
        let full = f64::from(self.per_minute);
        let rate = full / 60.0;
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let state = buckets.entry(namespace.to_string()).or_insert((full, now));
        let tokens = (state.0 + now.duration_since(state.1).as_secs_f64() * rate).min(full);
        *state = (tokens, now);
        if tokens >= 1.0 {
            state.0 -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - tokens) / rate))
        }
    }
}

/// What one pass over the consumers did.
#[derive(Debug, Default)]
pub struct Outcome {
    /// `Kind/name` of every workload stamped.
    pub restarted: Vec<String>,
    /// Set when the limiter ran dry: come back after this long for the rest.
    pub deferred: Option<Duration>,
}

/// Stamps every consumer of `name` in `namespace` that was not yet rolled for `fingerprint`.
///
/// The consumers come from the controller's watch cache of workloads, not from a LIST per
/// ClaudeKey (three per first key, the largest share of the API traffic at 10,000 ClaudeKeys).
/// A cache that is behind can only miss a workload created in the last moment, and such a
/// workload's pods start with the current `-client` Secret anyway: a restart exists for pods
/// that hold an older key, which only a workload older than that key has.
pub async fn restart(
    client: &Client,
    workloads: &Workloads<Store<Deployment>, Store<StatefulSet>, Store<DaemonSet>>,
    namespace: &str,
    name: &str,
    fingerprint: &str,
    limiter: &RestartLimiter,
) -> Result<Outcome, ConsumerError> {
    let mut outcome = Outcome::default();
    let target = Target {
        client,
        namespace,
        name,
        fingerprint,
        limiter,
    };
    target.pass(&workloads.deployments, &mut outcome).await?;
    target.pass(&workloads.statefulsets, &mut outcome).await?;
    target.pass(&workloads.daemonsets, &mut outcome).await?;
    Ok(outcome)
}

/// A workload kind whose pods a consumer restart rolls.
pub trait Workload:
    Resource<DynamicType = (), Scope = NamespaceResourceScope>
    + Clone
    + DeserializeOwned
    + Serialize
    + Debug
    + Send
    + Sync
    + 'static
{
    fn template(&self) -> Option<&PodTemplateSpec>;

    /// Keeps what a consumer restart reads (name, namespace and the three annotations of the
    /// pod template it looks at), so the cache of every workload in the cluster stays small.
    fn strip(&mut self);
}

macro_rules! workload {
    ($kind:ty, $spec:ident) => {
        impl Workload for $kind {
            fn template(&self) -> Option<&PodTemplateSpec> {
                self.spec.as_ref().map(|s| &s.template)
            }

            fn strip(&mut self) {
                keep_identity(&mut self.metadata);
                self.status = None;
                self.spec = self.spec.take().map(|spec| $spec {
                    template: kept(spec.template),
                    ..$spec::default()
                });
            }
        }
    };
}

workload!(Deployment, DeploymentSpec);
workload!(StatefulSet, StatefulSetSpec);
workload!(DaemonSet, DaemonSetSpec);

fn keep_identity(meta: &mut ObjectMeta) {
    *meta = ObjectMeta {
        name: meta.name.take(),
        namespace: meta.namespace.take(),
        uid: meta.uid.take(),
        resource_version: meta.resource_version.take(),
        ..ObjectMeta::default()
    };
}

/// A pod template with only the annotations [`needs_restart`] reads.
fn kept(template: PodTemplateSpec) -> PodTemplateSpec {
    let annotations = template
        .metadata
        .and_then(|m| m.annotations)
        .map(|mut all| {
            all.retain(|k, _| [CONSUMES, INJECT, RESTARTED_FOR].contains(&k.as_str()));
            all
        })
        .filter(|kept| !kept.is_empty());
    PodTemplateSpec {
        metadata: annotations.map(|annotations| ObjectMeta {
            annotations: Some(annotations),
            ..ObjectMeta::default()
        }),
        spec: None,
    }
}

struct Target<'a> {
    client: &'a Client,
    namespace: &'a str,
    name: &'a str,
    fingerprint: &'a str,
    limiter: &'a RestartLimiter,
}

impl Target<'_> {
    async fn pass<K: Workload>(
        &self,
        cache: &Store<K>,
        outcome: &mut Outcome,
    ) -> Result<(), ConsumerError> {
        if outcome.deferred.is_some() {
            return Ok(());
        }
        let kind = K::kind(&());
        let due: Vec<String> = cache
            .state()
            .iter()
            .filter(|w| w.namespace().as_deref() == Some(self.namespace))
            .filter(|w| needs_restart(w.template(), self.name, self.fingerprint))
            .map(|w| w.name_any())
            .collect();
        let api = Api::<K>::namespaced(self.client.clone(), self.namespace);
        for workload_name in due {
            if let Err(wait) = self.limiter.try_take(self.namespace) {
                outcome.deferred = Some(wait);
                return Ok(());
            }
            let patch = serde_json::json!({
                "spec": { "template": { "metadata": { "annotations": { RESTARTED_FOR: self.fingerprint } } } }
            });
            api.patch(
                &workload_name,
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
            .map_err(|e| ConsumerError::Patch {
                kind: kind.to_string(),
                namespace: self.namespace.to_string(),
                name: workload_name.clone(),
                reason: safe_reason(&e),
            })?;
            outcome.restarted.push(format!("{kind}/{workload_name}"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use kube::api::ObjectMeta;

    use super::*;

    fn template(pairs: &[(&str, &str)]) -> PodTemplateSpec {
        let annotations: BTreeMap<_, _> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        PodTemplateSpec {
            metadata: Some(ObjectMeta {
                annotations: Some(annotations),
                ..Default::default()
            }),
            spec: None,
        }
    }

    #[test]
    fn the_cache_keeps_only_what_a_consumer_restart_reads() {
        let mut deployment: Deployment = serde_json::from_value(serde_json::json!({
            "metadata": { "name": "web", "namespace": "team-a", "uid": "u1", "resourceVersion": "7",
                          "labels": { "app": "web" }, "annotations": { "big": "x".repeat(4096) },
                          "managedFields": [ { "manager": "kubectl" } ] },
            "spec": {
                "replicas": 3,
                "selector": { "matchLabels": { "app": "web" } },
                "template": {
                    "metadata": { "labels": { "app": "web" },
                                  "annotations": { CONSUMES: "bot", RESTARTED_FOR: "ck:1", "other": "y" } },
                    "spec": { "containers": [ { "name": "app", "image": "app:1",
                                                "env": [ { "name": "A", "value": "b" } ] } ] }
                }
            },
            "status": { "replicas": 3 }
        }))
        .unwrap();
        deployment.strip();
        let kept = serde_json::to_value(&deployment).unwrap();
        assert_eq!(
            kept,
            serde_json::json!({
                "apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": { "name": "web", "namespace": "team-a", "uid": "u1", "resourceVersion": "7" },
                "spec": {
                    "selector": {},
                    "template": { "metadata": { "annotations": { CONSUMES: "bot", RESTARTED_FOR: "ck:1" } } }
                }
            })
        );
        assert!(needs_restart(deployment.template(), "bot", "ck:2"));
        assert!(!needs_restart(deployment.template(), "bot", "ck:1"));

        // A workload that consumes nothing keeps no template metadata at all.
        let mut plain: StatefulSet = serde_json::from_value(serde_json::json!({
            "metadata": { "name": "db", "namespace": "team-a" },
            "spec": { "selector": {}, "serviceName": "db",
                      "template": { "metadata": { "annotations": { "other": "y" } } } }
        }))
        .unwrap();
        plain.strip();
        assert_eq!(plain.template().and_then(|t| t.metadata.as_ref()), None);
    }

    #[test]
    fn only_unstamped_consumers_without_a_sidecar_are_rolled() {
        assert!(needs_restart(
            Some(&template(&[(CONSUMES, "bot")])),
            "bot",
            "ck:1"
        ));
        assert!(needs_restart(
            Some(&template(&[(CONSUMES, "bot"), (RESTARTED_FOR, "ck:0")])),
            "bot",
            "ck:1"
        ));
        assert!(!needs_restart(
            Some(&template(&[(CONSUMES, "bot"), (RESTARTED_FOR, "ck:1")])),
            "bot",
            "ck:1"
        ));
        assert!(!needs_restart(
            Some(&template(&[(CONSUMES, "other")])),
            "bot",
            "ck:1"
        ));
        assert!(!needs_restart(
            Some(&template(&[(CONSUMES, "bot"), (INJECT, "bot")])),
            "bot",
            "ck:1"
        ));
        assert!(!needs_restart(
            Some(&template(&[(INJECT, "bot")])),
            "bot",
            "ck:1"
        ));
        assert!(!needs_restart(None, "bot", "ck:1"));
    }

    #[test]
    fn consumers_wait_for_the_proxies_only_while_the_old_key_still_works() {
        use crate::proxyconf::WorkloadKeyEntry;
        let issued: DateTime<Utc> = "2026-11-27T10:00:00Z".parse().unwrap();
        let entry = |until: Option<DateTime<Utc>>| WorkloadKeyEntry {
            sha256: String::new(),
            fingerprint: String::new(),
            valid_until: until,
        };
        let mut ledger = Ledger {
            issued_at: issued,
            rotate_handled: None,
            revoke_handled: None,
            expiry_handled: None,
            workload_keys: vec![entry(None)],
            upstream_version: String::new(),
            upstream_keys: vec![],
        };
        let delay = Duration::from_secs(90);
        assert_eq!(
            restart_at(&ledger, delay),
            issued,
            "first issue or revoke: at once"
        );
        ledger
            .workload_keys
            .push(entry(Some(issued + TimeDelta::minutes(15))));
        assert_eq!(restart_at(&ledger, delay), issued + TimeDelta::seconds(90));
        ledger.workload_keys[1].valid_until = Some(issued + TimeDelta::seconds(60));
        assert_eq!(
            restart_at(&ledger, delay),
            issued + TimeDelta::seconds(30),
            "half the grace"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn limiter_refills_at_the_configured_rate() {
        let limiter = RestartLimiter::new(2);
        assert!(limiter.try_take("a").is_ok());
        assert!(limiter.try_take("a").is_ok());
        let wait = limiter.try_take("a").unwrap_err();
        assert_eq!(wait, Duration::from_secs(30));
        tokio::time::advance(Duration::from_secs(30)).await;
        assert!(limiter.try_take("a").is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn one_namespace_cannot_use_up_the_restarts_of_another() {
        let limiter = RestartLimiter::new(2);
        for _ in 0..2 {
            limiter.try_take("noisy").unwrap();
        }
        assert!(limiter.try_take("noisy").is_err());
        assert!(limiter.try_take("quiet").is_ok());
        assert!(limiter.try_take("quiet").is_ok());
    }
}
