//! Controller metrics (prometheus-client, prefix `claudekey_`). Labels are bounded: result and
//! reason enums, plus namespace/name only on the per-ClaudeKey key-age gauge the issue asks for.

use std::sync::atomic::AtomicU64;

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
    pub key_age: Family<KeyLabels, Gauge<f64, AtomicU64>>,
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
