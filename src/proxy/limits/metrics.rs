//! The limiter's own metrics: whether a proxy counts at its fallback share, failed Redis calls,
//! and spend per ClaudeKey and budget period (labels: the ClaudeKey and `day`/`month` only).

use std::sync::{Arc, OnceLock, atomic::AtomicU64};

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
}

type SpendGauge = Gauge<f64, AtomicU64>;
const PERIODS: [&str; 2] = ["day", "month"];

/// One ClaudeKey's spend and budget gauges, taken from the families on first use: the spend is
/// shown after every admission and settlement, and looking a label set up in a family hashes it
/// under the family's lock each time (as `super::super::metrics::Series` avoids for the request
/// metrics). A budget's gauge appears only once that budget is set, as before.
pub(super) struct SpendGauges {
    metrics: LimitsMetrics,
    label: Arc<str>,
    spend: OnceLock<[SpendGauge; 2]>,
    budget: [OnceLock<SpendGauge>; 2],
}

impl SpendGauges {
    pub(super) fn new(metrics: LimitsMetrics, label: Arc<str>) -> Self {
        Self {
            metrics,
            label,
            spend: OnceLock::new(),
            budget: Default::default(),
        }
    }

    fn labels(&self, period: usize) -> SpendLabels {
        SpendLabels {
            claudekey: Arc::clone(&self.label),
            period: PERIODS[period],
        }
    }

    /// Sets the day's and month's spend, and each budget that is set.
    pub(super) fn show(&self, budgets: &Budgets, (day, month): (u64, u64)) {
        let spend = self.spend.get_or_init(|| {
            [0, 1].map(|period| {
                self.metrics
                    .spend
                    .get_or_create(&self.labels(period))
                    .clone()
            })
        });
        for (period, spent, budget) in [(0, day, budgets.day), (1, month, budgets.month)] {
            spend[period].set(spent as f64 / NANOS_PER_USD);
            if let Some(budget) = budget {
                self.budget[period]
                    .get_or_init(|| {
                        self.metrics
                            .budget
                            .get_or_create(&self.labels(period))
                            .clone()
                    })
                    .set(budget as f64 / NANOS_PER_USD);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exposition(metrics: &LimitsMetrics) -> String {
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        out
    }

    #[test]
    fn spend_gauges_show_every_spend_and_only_the_budgets_set() {
        let metrics = LimitsMetrics::default();
        let gauges = SpendGauges::new(metrics.clone(), "team-a/app".into());
        let day_only = Budgets {
            day: Some(2_000_000_000),
            month: None,
        };
        gauges.show(&day_only, (250_000_000, 1_500_000_000));
        let text = exposition(&metrics);
        assert!(
            text.contains(r#"spend_usd{claudekey="team-a/app",period="day"} 0.25"#),
            "{text}"
        );
        assert!(
            text.contains(r#"spend_usd{claudekey="team-a/app",period="month"} 1.5"#),
            "{text}"
        );
        assert!(
            text.contains(r#"budget_usd{claudekey="team-a/app",period="day"} 2.0"#),
            "{text}"
        );
        assert!(
            !text.contains(r#"budget_usd{claudekey="team-a/app",period="month"}"#),
            "{text}"
        );

        // The cached handles stay the families' own: a later show is what the exposition says,
        // and a budget set later appears.
        let both = Budgets {
            day: Some(2_000_000_000),
            month: Some(30_000_000_000),
        };
        gauges.show(&both, (500_000_000, 1_750_000_000));
        let text = exposition(&metrics);
        assert!(
            text.contains(r#"spend_usd{claudekey="team-a/app",period="day"} 0.5"#),
            "{text}"
        );
        assert!(
            text.contains(r#"spend_usd{claudekey="team-a/app",period="month"} 1.75"#),
            "{text}"
        );
        assert!(
            text.contains(r#"budget_usd{claudekey="team-a/app",period="month"} 30.0"#),
            "{text}"
        );
        assert_eq!(text.matches("claudekey=").count(), 4, "{text}");
    }
}
