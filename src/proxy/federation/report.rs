//! The `FederationReady` condition of a ClusterClaudeKeySource, from the gateway's exchanges.
//! Only the gateway writes it (it has API access, limited by its ClusterRole to the status of
//! these sources); a sidecar has none and is seen through its metric, log and 503s. The
//! controller copies the condition onto the ClaudeKeys of the source.

use std::{collections::HashMap, sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{Api, Client, ResourceExt, api::Patch, api::PatchParams};

use super::{Federation, Health};
use crate::crd::{ClusterClaudeKeySource, condition::FEDERATION_READY};

/// How often the gateway looks for a changed outcome to report.
const EVERY: Duration = Duration::from_secs(5);

/// The conditions with `FederationReady` set from `health` (the transition time moves only
/// when the status does); `None` when nothing would change.
pub fn with_health(
    existing: &[Condition],
    health: &Health,
    generation: Option<i64>,
    now: DateTime<Utc>,
) -> Option<Vec<Condition>> {
    let ok = health.outcome == super::Outcome::Ok;
    let status = if ok { "True" } else { "False" };
    let message = health.message.chars().take(1024).collect::<String>();
    let previous = existing.iter().find(|c| c.type_ == FEDERATION_READY);
    if previous.is_some_and(|c| {
        c.status == status && c.reason == health.outcome.reason() && c.message == message
    }) {
        return None;
    }
    let since = previous
        .filter(|c| c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| time(now));
    let mut conditions: Vec<Condition> = existing
        .iter()
        .filter(|c| c.type_ != FEDERATION_READY)
        .cloned()
        .collect();
    conditions.push(Condition {
        type_: FEDERATION_READY.to_string(),
        status: status.to_string(),
        reason: health.outcome.reason().to_string(),
        message,
        observed_generation: generation,
        last_transition_time: since,
    });
    Some(conditions)
}

fn time(at: DateTime<Utc>) -> Time {
    Time(
        k8s_openapi::jiff::Timestamp::from_second(at.timestamp())
            .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
    )
}

/// Reports each source's last outcome when it changed; runs until aborted.
pub fn spawn(client: Client, federation: Arc<Federation>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let api: Api<ClusterClaudeKeySource> = Api::all(client);
        let mut reported: HashMap<String, Health> = HashMap::new();
        loop {
            tokio::time::sleep(EVERY).await;
            for (source, health) in federation.health() {
                if reported.get(&source) == Some(&health) {
                    continue;
                }
                match report(&api, &source, &health).await {
                    Ok(()) => {
                        reported.insert(source, health);
                    }
                    Err(reason) => {
                        tracing::warn!(source, reason, "failed to report FederationReady")
                    }
                }
            }
        }
    })
}

/// A read-modify-write of the status' conditions, guarded by the resourceVersion.
async fn report(
    api: &Api<ClusterClaudeKeySource>,
    source: &str,
    health: &Health,
) -> Result<(), String> {
    let reason = |e: kube::Error| match e {
        kube::Error::Api(s) => format!("HTTP {} {}", s.code, s.reason),
        _ => "request failed".to_string(),
    };
    let fresh = api.get_status(source).await.map_err(reason)?;
    let existing = fresh
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    let Some(conditions) = with_health(&existing, health, fresh.metadata.generation, Utc::now())
    else {
        return Ok(());
    };
    let patch = serde_json::json!({
        "metadata": { "resourceVersion": fresh.resource_version() },
        "status": { "conditions": conditions },
    });
    api.patch_status(source, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(|_| ())
        .map_err(reason)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::federation::Outcome;

    fn health(outcome: Outcome) -> Health {
        Health {
            outcome,
            message: "m".into(),
        }
    }

    #[test]
    fn the_condition_follows_the_outcome_and_keeps_others() {
        let t0: DateTime<Utc> = "2026-12-01T10:00:00Z".parse().unwrap();
        let t1: DateTime<Utc> = "2026-12-01T11:00:00Z".parse().unwrap();
        let other = Condition {
            type_: "Other".into(),
            status: "True".into(),
            reason: "R".into(),
            message: String::new(),
            observed_generation: None,
            last_transition_time: time(t0),
        };
        let refused = with_health(
            std::slice::from_ref(&other),
            &health(Outcome::Refused),
            Some(2),
            t0,
        )
        .unwrap();
        assert_eq!(refused.len(), 2);
        let c = &refused[1];
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "ExchangeRefused")
        );
        assert_eq!(
            with_health(&refused, &health(Outcome::Refused), Some(2), t1),
            None
        );
        let unreachable =
            with_health(&refused, &health(Outcome::Unreachable), Some(2), t1).unwrap();
        assert_eq!(unreachable[1].last_transition_time, time(t0), "still False");
        let ok = with_health(&unreachable, &health(Outcome::Ok), Some(2), t1).unwrap();
        assert_eq!(
            (ok[1].status.as_str(), ok[1].reason.as_str()),
            ("True", "TokenExchanged")
        );
        assert_eq!(ok[1].last_transition_time, time(t1));
        assert_eq!(ok[0], other);
    }
}
