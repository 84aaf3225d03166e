//! Controller metrics (prometheus-client, prefix `claudekey_`). Labels are bounded: result and
//! reason enums, plus namespace/name only on the per-ClaudeKey key-age and rotation-interval gauges
//! (the dashboard and the rotation-overdue alert; deploy/monitoring/README.md lists every name).

use std::collections::HashSet;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::{
    counter::Counter,
    family::Family,
    gauge::Gauge,
    histogram::{Histogram, exponential_buckets},
};
use prometheus_client::registry::Registry;
use tokio::time::Instant;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub error: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RotationLabels {
    pub reason: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KeyLabels {
    pub namespace: String,
    pub name: String,
}

/// The controller's own metrics, registered once per process (or per in-process test controller).
#[derive(Clone)]
pub struct Metrics {
    pub reconciles: Counter,
    pub errors: Family<ErrorLabels, Counter>,
    pub duration: Histogram,
    pub rotations: Family<RotationLabels, Counter>,
    key_age: Family<KeyLabels, Gauge<f64, AtomicU64>>,
    /// `spec.rotation.interval` per ClaudeKey: the rotation-overdue alert compares the age with it.
    rotation_interval: Family<KeyLabels, Gauge<f64, AtomicU64>>,
    /// The label sets of `key_age` and `rotation_interval`, so deleted ClaudeKeys can be dropped.
    key_age_labels: Arc<Mutex<HashSet<KeyLabels>>>,
    pub consumer_restarts: Counter,
    pub leader: Gauge,
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Self {
        let metrics = Self {
            reconciles: Counter::default(),
            errors: Family::default(),
            duration: Histogram::new(exponential_buckets(0.005, 2.0, 12)),
            rotations: Family::default(),
            key_age: Family::default(),
            rotation_interval: Family::default(),
            key_age_labels: Arc::default(),
            consumer_restarts: Counter::default(),
            leader: Gauge::default(),
        };
        registry.register(
            "reconciles",
            "ClaudeKey reconciles started",
            metrics.reconciles.clone(),
        );
        registry.register(
            "reconcile_errors",
            "ClaudeKey reconciles that failed, by error kind",
            metrics.errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Duration of ClaudeKey reconciles",
            metrics.duration.clone(),
        );
        registry.register(
            "rotations",
            "Workload and upstream key rotations, by reason and result",
            metrics.rotations.clone(),
        );
        registry.register(
            "workload_key_age_seconds",
            "Age of the current workload key per ClaudeKey",
            metrics.key_age.clone(),
        );
        registry.register(
            "workload_key_rotation_interval_seconds",
            "spec.rotation.interval per ClaudeKey, for comparing the key age with",
            metrics.rotation_interval.clone(),
        );
        registry.register(
            "consumer_restarts",
            "Gateway consumer workloads restarted for a new key",
            metrics.consumer_restarts.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica holds the controller Lease",
            metrics.leader.clone(),
        );
        metrics
    }

    /// Sets the age of a ClaudeKey's current workload key and its rotation interval.
    pub fn set_key_age(&self, namespace: &str, name: &str, seconds: f64, interval: f64) {
        let labels = KeyLabels {
            namespace: namespace.to_string(),
            name: name.to_string(),
        };
        self.key_age.get_or_create(&labels).set(seconds);
        self.rotation_interval.get_or_create(&labels).set(interval);
        self.key_age_labels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(labels);
    }

    /// Drops the key-age series of ClaudeKeys for which `exists` is false (deleted ones), so the
    /// gauge's cardinality follows the cluster instead of growing forever.
    pub fn retain_key_ages(&self, exists: impl Fn(&str, &str) -> bool) {
        let mut known = self
            .key_age_labels
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        known.retain(|labels| {
            let keep = exists(&labels.namespace, &labels.name);
            if !keep {
                self.key_age.remove(labels);
                self.rotation_interval.remove(labels);
            }
            keep
        });
    }

    /// Counts a reconcile and times it until the returned guard drops.
    pub fn start_reconcile(&self) -> ReconcileTimer<'_> {
        self.reconciles.inc();
        ReconcileTimer {
            histogram: &self.duration,
            started: Instant::now(),
        }
    }
}

/// Records the reconcile duration on drop, so early returns are timed too.
pub struct ReconcileTimer<'a> {
    histogram: &'a Histogram,
    started: Instant,
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        self.histogram.observe(self.started.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_ages_of_deleted_claudekeys_are_dropped() {
        let mut registry = Registry::with_prefix("claudekey");
        let metrics = Metrics::new(&mut registry);
        metrics.set_key_age("a", "kept", 5.0, 60.0);
        metrics.set_key_age("a", "gone", 7.0, 60.0);
        metrics.retain_key_ages(|_, name| name == "kept");
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains("claudekey_workload_key_age_seconds{namespace=\"a\",name=\"kept\"} 5.0"),
            "{text}"
        );
        assert!(
            text.contains(
                "claudekey_workload_key_rotation_interval_seconds{namespace=\"a\",name=\"kept\"} 60.0"
            ),
            "{text}"
        );
        assert!(!text.contains("gone"));
    }
}
