//! The limiter's own metrics: whether a proxy counts at its fallback share, failed Redis calls,
//! and spend per ClaudeKey and budget period (labels: the ClaudeKey and `day`/`month` only).

use std::sync::{Arc, atomic::AtomicU64};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use super::budget::{Budgets, NANOS_PER_USD};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SpendLabels {
    /// Shared with the limiter: a label set costs no allocation per request.
    claudekey: Arc<str>,
    period: &'static str,
}

/// The limiter's metrics; registered by `metrics.rs` under `claudekey_proxy_`.
#[derive(Clone, Default)]
pub struct LimitsMetrics {
    /// 1 while this proxy counts its fallback share locally because Redis is unreachable.
    pub fallback: Gauge,
    pub shared_errors: Counter,
    spend: Family<SpendLabels, Gauge<f64, AtomicU64>>,
    budget: Family<SpendLabels, Gauge<f64, AtomicU64>>,
}

impl LimitsMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "limits_fallback",
            "1 while this proxy counts limits and budgets locally at its fallback share because Redis is unreachable",
            self.fallback.clone(),
        );
        registry.register(
            "limits_shared_errors",
            "Calls to the shared counters (Redis) that failed or timed out",
            self.shared_errors.clone(),
        );
        registry.register(
            "spend_usd",
            "Spend of the ClaudeKey in the current UTC day or month at list prices, as last seen by this proxy",
            self.spend.clone(),
        );
        registry.register(
            "budget_usd",
            "Spend budget of the ClaudeKey per UTC day or month",
            self.budget.clone(),
        );
    }

    pub(super) fn show_spend(&self, label: &Arc<str>, budgets: &Budgets, (day, month): (u64, u64)) {
        for (period, spent, budget) in [("day", day, budgets.day), ("month", month, budgets.month)]
        {
            let labels = SpendLabels {
                claudekey: Arc::clone(label),
                period,
            };
            self.spend
                .get_or_create(&labels)
                .set(spent as f64 / NANOS_PER_USD);
            if let Some(budget) = budget {
                self.budget
                    .get_or_create(&labels)
                    .set(budget as f64 / NANOS_PER_USD);
            }
        }
    }
}
