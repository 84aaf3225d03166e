//! Usage per upstream key from Anthropic's Admin API (the leader polls it): what Anthropic
//! billed each ClaudeKey's upstream keys over the last hour, exported as gauges, so the cost
//! panel and the usage alerts also see traffic that bypassed the proxy. *How* the report is read
//! and summed lives in [`crate::admin::usage`]; this module decides *which* keys to ask for and
//! records what happened.
//!
//! One poll lists the keys and reads the report once per admin-key Secret, not per ClaudeKey:
//! the Admin API is organization-wide and rate-limited.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::events::EventType;
use kube::runtime::reflector::Store;
use kube::{Api, ResourceExt};

use super::context::Context;
use super::secrets::ledger_of;
use crate::admin::{
    AdminClient, KeyUsage, Unmatched, UsageMetrics, admin_client_for, report_window, resolve_hints,
};
use crate::crd::{
    AnthropicAdminSpec, ClaudeKey, ClusterClaudeKeySource, SourceKind, gateway_config_secret_name,
    proxy_secret_name,
};

/// Event reasons of the poller, recorded when a ClaudeKey's result changes (not every poll).
pub mod reason {
    pub const USAGE_UNAVAILABLE: &str = "UpstreamUsageUnavailable";
    pub const USAGE_RESTORED: &str = "UpstreamUsageAvailable";
}

/// What one poll found for one ClaudeKey.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Exported(KeyUsage),
    /// Its hints do not name keys at Anthropic uniquely: nothing exported rather than a guess.
    Unmatched(String),
    /// The admin key or the Admin API failed; the text never holds a key.
    Failed(String),
}

impl Outcome {
    /// The `result` label of `claudekey_upstream_usage_polls_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Exported(_) => "ok",
            Self::Unmatched(_) => "unmatched",
            Self::Failed(_) => "error",
        }
    }
}

/// A ClaudeKey with an admin key, and the hints of the upstream keys it holds now (the current
/// one and any still in their grace period).
struct Polled {
    id: String,
    hints: Vec<String>,
    admin: AnthropicAdminSpec,
}

/// Polls every `interval` until the controller stops (the caller drops this future).
pub async fn poll_forever(store: Store<ClaudeKey>, ctx: Arc<Context>, interval: Duration) {
    let mut last: HashMap<String, &'static str> = HashMap::new();
    // A first poll soon after start (the store fills first), then every interval.
    tokio::time::sleep(interval.min(FIRST_POLL)).await;
    loop {
        let claudekeys = store.state();
        let outcomes = poll_once(&ctx, &claudekeys).await;
        report(&ctx, &claudekeys, &outcomes, &mut last).await;
        tokio::time::sleep(interval).await;
    }
}

/// How soon after start the first poll runs.
const FIRST_POLL: Duration = Duration::from_secs(5);

/// Reads the report for every ClaudeKey whose ClusterClaudeKeySource has `anthropicAdmin`,
/// grouped by admin key.
pub async fn poll_once(ctx: &Context, claudekeys: &[Arc<ClaudeKey>]) -> BTreeMap<String, Outcome> {
    // By admin-key Secret (name, key): one Admin API conversation each.
    let mut groups: BTreeMap<(String, String), Vec<Polled>> = BTreeMap::new();
    let mut sources: HashMap<String, Option<AnthropicAdminSpec>> = HashMap::new();
    for ck in claudekeys {
        if ck.spec.source_ref.kind != SourceKind::ClusterClaudeKeySource {
            continue;
        }
        let name = &ck.spec.source_ref.name;
        if !sources.contains_key(name) {
            let admin = Api::<ClusterClaudeKeySource>::all(ctx.client.clone())
                .get_opt(name)
                .await
                .ok()
                .flatten()
                .and_then(|s| s.spec.anthropic_admin);
            sources.insert(name.clone(), admin);
        }
        let Some(Some(admin)) = sources.get(name) else {
            continue;
        };
        let hints = upstream_hints(ctx, ck).await;
        groups
            .entry((
                admin.admin_key_secret_ref.name.clone(),
                admin.admin_key_secret_ref.key.clone(),
            ))
            .or_default()
            .push(Polled {
                id: claudekey_id(ck),
                hints,
                admin: admin.clone(),
            });
    }
    let mut outcomes = BTreeMap::new();
    for polled in groups.into_values() {
        outcomes.extend(poll_group(ctx, &polled).await);
    }
    outcomes
}

/// One admin key: list the keys and read the report once, then split it per ClaudeKey.
async fn poll_group(ctx: &Context, polled: &[Polled]) -> Vec<(String, Outcome)> {
    let failed = |message: String| {
        polled
            .iter()
            .map(|p| (p.id.clone(), Outcome::Failed(message.clone())))
            .collect()
    };
    let admin: AdminClient = match admin_client_for(
        &ctx.client,
        &ctx.namespace,
        &polled[0].admin,
        &ctx.anthropic_url,
    )
    .await
    {
        Ok(admin) => admin,
        Err(e) => return failed(e.to_string()),
    };
    let keys = match admin.list_keys().await {
        Ok(keys) => keys,
        Err(e) => return failed(e.to_string()),
    };
    let resolved: Vec<Result<Vec<String>, Unmatched>> = polled
        .iter()
        .map(|p| match p.hints.as_slice() {
            [] => Err(Unmatched::NotFound(
                "(no upstream key synced yet)".to_string(),
            )),
            hints => resolve_hints(&keys, hints),
        })
        .collect();
    let mut ids: Vec<String> = resolved.iter().flatten().flatten().cloned().collect();
    ids.sort();
    ids.dedup();
    let report = if ids.is_empty() {
        BTreeMap::new()
    } else {
        let (from, to) = report_window(Utc::now());
        match admin.usage_by_key(from, to, &ids).await {
            Ok(report) => report,
            Err(e) => return failed(e.to_string()),
        }
    };
    polled
        .iter()
        .zip(resolved)
        .map(|(p, ids)| {
            let outcome = match ids {
                Ok(ids) => Outcome::Exported(KeyUsage::of(&ids, &report)),
                Err(unmatched) => Outcome::Unmatched(unmatched.to_string()),
            };
            (p.id.clone(), outcome)
        })
        .collect()
}

/// The partial hints of the upstream keys in the ClaudeKey's ledger, read from the Secret the
/// proxies use: its gateway config Secret, else its `-proxy` Secret (hints are what the Console
/// shows, never keys).
async fn upstream_hints(ctx: &Context, ck: &ClaudeKey) -> Vec<String> {
    let Some(ns) = ck.namespace() else {
        return Vec::new();
    };
    let gateway = gateway_config_secret_name(&ns, &ck.name_any());
    let secret = match Api::<Secret>::namespaced(ctx.client.clone(), &ctx.namespace)
        .get_opt(&gateway)
        .await
    {
        Ok(Some(found)) => Ok(Some(found)),
        _ => {
            Api::<Secret>::namespaced(ctx.client.clone(), &ns)
                .get_opt(&proxy_secret_name(&ck.name_any()))
                .await
        }
    };
    let ledger = match secret {
        Ok(Some(secret)) if ctx.sealer.verify(&ck.uid().unwrap_or_default(), &secret) => {
            ledger_of(&secret)
        }
        Ok(_) => None,
        Err(error) => {
            tracing::debug!(%error, namespace = ns, name = ck.name_any(), "usage: cannot read the -proxy Secret");
            None
        }
    };
    ledger
        .map(|l| l.upstream_keys.into_iter().filter_map(|k| k.hint).collect())
        .unwrap_or_default()
}

fn claudekey_id(ck: &ClaudeKey) -> String {
    format!("{}/{}", ck.namespace().unwrap_or_default(), ck.name_any())
}

/// Sets the gauges, drops series of ClaudeKeys that are gone or have no admin key any more,
/// and records an Event when a ClaudeKey's result changes.
async fn report(
    ctx: &Context,
    claudekeys: &[Arc<ClaudeKey>],
    outcomes: &BTreeMap<String, Outcome>,
    last: &mut HashMap<String, &'static str>,
) {
    let metrics: &UsageMetrics = &ctx.usage_metrics;
    metrics.retain(|id| matches!(outcomes.get(id), Some(Outcome::Exported(_))));
    last.retain(|id, _| outcomes.contains_key(id));
    for ck in claudekeys {
        let id = claudekey_id(ck);
        let Some(outcome) = outcomes.get(&id) else {
            continue;
        };
        metrics.polled(outcome.label());
        let before = last.insert(id.clone(), outcome.label());
        match outcome {
            Outcome::Exported(usage) => {
                metrics.set(&id, usage);
                if before.is_some_and(|b| b != "ok") {
                    ctx.event(
                        ck,
                        EventType::Normal,
                        reason::USAGE_RESTORED,
                        "Anthropic's usage report for the upstream keys is exported again"
                            .to_string(),
                    )
                    .await;
                }
            }
            Outcome::Unmatched(why) | Outcome::Failed(why) => {
                tracing::warn!(claudekey = id, result = outcome.label(), reason = %why, "upstream usage not exported");
                if before != Some(outcome.label()) {
                    ctx.event(
                        ck,
                        EventType::Warning,
                        reason::USAGE_UNAVAILABLE,
                        format!("Upstream usage is not exported: {why}"),
                    )
                    .await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcome_labels_are_the_documented_results() {
        assert_eq!(Outcome::Exported(KeyUsage::default()).label(), "ok");
        assert_eq!(Outcome::Unmatched("x".into()).label(), "unmatched");
        assert_eq!(Outcome::Failed("x".into()).label(), "error");
    }
}
