//! A namespace cannot grow the shared gateway without bound through custom patterns: each
//! distinct detector list is compiled on its own there, so a namespace may use only so many
//! (`--max-pattern-lists-per-namespace`). The places go to the oldest ClaudeKeys; one sharing an
//! older ClaudeKey's list takes no place; a freed place goes to the next in line.

use std::time::Duration;

use claudekey::crd::{ClaudeKey, gateway_config_secret_name};
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use serde_json::json;

use crate::{controller_support::*, support};
use crate::{gateway_controller, grant_cluster_source, reason, serial};

async fn apply_with_pattern(
    client: &kube::Client,
    ns: &str,
    name: &str,
    source: &str,
    regex: &str,
) {
    let value = json!({
        "apiVersion": "claudekey.io/v1alpha2",
        "kind": "ClaudeKey",
        "metadata": { "name": name },
        "spec": {
            "sourceRef": { "kind": "ClusterClaudeKeySource", "name": source },
            "rotation": { "interval": "24h", "gracePeriod": "3s" },
            "dataProtection": { "customPatterns": [{ "name": "id", "regex": regex }] },
        },
    });
    apply_claudekey_value(client, ns, name, value).await;
}

fn refused(ck: &ClaudeKey) -> bool {
    reason(ck).as_deref() == Some("PatternListsExceeded")
}

#[tokio::test]
async fn a_namespace_may_use_only_so_many_distinct_pattern_lists() {
    let _one = serial().await;
    let (client, operator) = setup("ck-trust-pat").await;
    let team = support::namespace(&client, "ck-trust-patteam").await;
    let source = grant_cluster_source(&client, &operator, &team, "patterns", &upstream_key()).await;
    let mut cfg = gateway_controller(&operator);
    cfg.max_pattern_lists_per_namespace = 2;
    let controller = start(&client, cfg);
    // In creation order (or, within a second, by name): a, b, c, then d sharing a's list.
    apply_with_pattern(&client, &team, "a", &source, "EMP-[0-9]{6}").await;
    wait_claudekey(&client, &team, "a", "a Ready", is_ready).await;
    apply_with_pattern(&client, &team, "b", &source, "ORD-[0-9]{8}").await;
    wait_claudekey(&client, &team, "b", "b Ready", is_ready).await;
    apply_with_pattern(&client, &team, "c", &source, "INV-[0-9]{7}").await;
    apply_with_pattern(&client, &team, "d", &source, "EMP-[0-9]{6}").await;
    wait_claudekey(&client, &team, "d", "d Ready (shares a's list)", is_ready).await;
    let c = wait_claudekey(&client, &team, "c", "c refused", refused).await;
    let (_, _, message) = condition(&c, "Ready").unwrap();
    assert!(
        message.contains("--max-pattern-lists-per-namespace") && !message.contains("INV-"),
        "{message}"
    );
    // Nothing issued for it: no workload key, no config in the gateway.
    let here = Api::<Secret>::namespaced(client.clone(), &team);
    assert!(here.get_opt("c-client").await.unwrap().is_none());
    let gateway = Api::<Secret>::namespaced(client.clone(), &operator);
    let config = gateway_config_secret_name(&team, "c");
    assert!(gateway.get_opt(&config).await.unwrap().is_none());
    support::eventually(Duration::from_secs(10), "the Warning Event", || async {
        let reasons = event_reasons(&client, &team).await;
        reasons
            .iter()
            .any(|r| r == "PatternListsExceeded")
            .then_some(())
    })
    .await;
    // b goes: its place is c's at once, nothing done to c (the slow poll alone would take
    // minutes). First c's own last reconciles (its status write's event, debounced) pass, so
    // that only b's deletion can bring it back.
    tokio::time::sleep(Duration::from_secs(2)).await;
    Api::<ClaudeKey>::namespaced(client.clone(), &team)
        .delete("b", &Default::default())
        .await
        .unwrap();
    wait_claudekey(&client, &team, "c", "c Ready once b is gone", is_ready).await;
    assert!(gateway.get_opt(&config).await.unwrap().is_some());
    controller.stop().await;
}
