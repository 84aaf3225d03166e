//! Gateway consumers (DESIGN.md §3 step 4): workloads whose pod template says
//! `claudekey.io/consumes: <name>` are rolled once per workload key, by stamping the key's
//! fingerprint into `claudekey.io/restartedFor`. Converging on that stamp makes it idempotent.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::PodTemplateSpec;
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{ListParams, Patch, PatchParams},
};
use serde::de::DeserializeOwned;
use tokio::time::Instant;

use chrono::{DateTime, TimeDelta, Utc};

use super::apply::safe_reason;
use super::ledger::Ledger;
use crate::crd::annotations::{CONSUMES, INJECT, RESTARTED_FOR};

#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    #[error("failed to list {kind}s in {namespace}: {reason}")]
    List {
        kind: &'static str,
        namespace: String,
        reason: String,
    },
    #[error("failed to restart {kind} {namespace}/{name}: {reason}")]
    Patch {
        kind: &'static str,
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
pub async fn restart(
    client: &Client,
    namespace: &str,
    name: &str,
    fingerprint: &str,
    limiter: &RestartLimiter,
) -> Result<Outcome, ConsumerError> {
    let mut outcome = Outcome::default();
    let target = Target {
        namespace,
        name,
        fingerprint,
        limiter,
    };
    target
        .pass(
            "Deployment",
            Api::<Deployment>::namespaced(client.clone(), namespace),
            |d| d.spec.as_ref().map(|s| &s.template),
            &mut outcome,
        )
        .await?;
    target
        .pass(
            "StatefulSet",
            Api::<StatefulSet>::namespaced(client.clone(), namespace),
            |d| d.spec.as_ref().map(|s| &s.template),
            &mut outcome,
        )
        .await?;
    target
        .pass(
            "DaemonSet",
            Api::<DaemonSet>::namespaced(client.clone(), namespace),
            |d| d.spec.as_ref().map(|s| &s.template),
            &mut outcome,
        )
        .await?;
    Ok(outcome)
}

struct Target<'a> {
    namespace: &'a str,
    name: &'a str,
    fingerprint: &'a str,
    limiter: &'a RestartLimiter,
}

impl Target<'_> {
    async fn pass<K>(
        &self,
        kind: &'static str,
        api: Api<K>,
        template: fn(&K) -> Option<&PodTemplateSpec>,
        outcome: &mut Outcome,
    ) -> Result<(), ConsumerError>
    where
        K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
    {
        if outcome.deferred.is_some() {
            return Ok(());
        }
        let list = api
            .list(&ListParams::default())
            .await
            .map_err(|e| ConsumerError::List {
                kind,
                namespace: self.namespace.to_string(),
                reason: safe_reason(&e),
            })?;
        for workload in list
            .items
            .iter()
            .filter(|w| needs_restart(template(w), self.name, self.fingerprint))
        {
            if let Err(wait) = self.limiter.try_take(self.namespace) {
                outcome.deferred = Some(wait);
                return Ok(());
            }
            let workload_name = workload.name_any();
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
                kind,
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
