//! Metrics of retirements and drills, for the controller's registry: outcomes by reason
//! (bounded: five values) and a per-ClaudeKey gauge that is 1 while a retired key still works.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use super::retire::{DrillResult, RetireOutcome};

/// A ClaudeKey by namespace and name, like the controller's other per-key gauges.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KeyLabels {
    pub namespace: String,
    pub name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// An Event reason constant from [`super::retire::reason`].
    pub reason: &'static str,
}

#[derive(Clone, Default)]
pub struct AdminMetrics {
    pub retirements: Family<ReasonLabels, Counter>,
    pub drills: Family<ReasonLabels, Counter>,
    pub retired_key_live: Family<KeyLabels, Gauge<i64, std::sync::atomic::AtomicI64>>,
}

impl AdminMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "upstream_retirements",
            "Upstream key retirements through the Admin API, by outcome",
            m.retirements.clone(),
        );
        registry.register(
            "revocation_drills",
            "Revocation drills on retired upstream keys, by result",
            m.drills.clone(),
        );
        registry.register(
            "retired_key_live",
            "1 while a retired upstream key of the ClaudeKey still works at Anthropic",
            m.retired_key_live.clone(),
        );
        m
    }

    pub fn retired(&self, outcome: &RetireOutcome) {
        self.retirements
            .get_or_create(&ReasonLabels {
                reason: outcome.reason(),
            })
            .inc();
    }

    pub fn drilled(&self, namespace: &str, name: &str, result: &DrillResult) {
        self.drills
            .get_or_create(&ReasonLabels {
                reason: result.reason(),
            })
            .inc();
        let labels = KeyLabels {
            namespace: namespace.to_string(),
            name: name.to_string(),
        };
        match result {
            DrillResult::Live => {
                self.retired_key_live.get_or_create(&labels).set(1);
            }
            DrillResult::Dead => {
                self.retired_key_live.get_or_create(&labels).set(0);
            }
            DrillResult::Inconclusive(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_key_is_loud_and_labels_are_bounded() {
        let mut registry = Registry::with_prefix("claudekey");
        let m = AdminMetrics::register(&mut registry);
        m.retired(&RetireOutcome::Ambiguous {
            key_ids: vec!["apikey_a".into(), "apikey_b".into()],
        });
        m.drilled("team-a", "bot", &DrillResult::Live);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains(r#"claudekey_retired_key_live{namespace="team-a",name="bot"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"reason="UpstreamKeyAmbiguous""#), "{text}");
        assert!(!text.contains("apikey_"), "no key ids in labels");
        m.drilled("team-a", "bot", &DrillResult::Dead);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(text.contains(r#"claudekey_retired_key_live{namespace="team-a",name="bot"} 0"#));
    }
}
