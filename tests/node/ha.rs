//! Failures of the chart's own pods on the real node: the leader controller killed in the middle
//! of a rotation, a webhook pod deleted while pods are being created.

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, Client};

use claudekey::crd::ClaudeKey;

use super::fixture::{OPERATOR_NS, RELEASE, installed, node_client};
use super::manifests::app_pod;
use super::{annotate_claudekey, namespace, ready_claudekey, workload_fingerprint};
use crate::support::eventually;

async fn leader(client: &Client) -> Option<String> {
    Api::<Lease>::namespaced(client.clone(), OPERATOR_NS)
        .get("claudekey-controller")
        .await
        .ok()?
        .spec?
        .holder_identity
}

/// Both replicas of a chart Deployment Ready again (for the tests after this one).
async fn deployment_ready(client: &Client, component: &str) {
    let name = format!("{RELEASE}-{component}");
    let api = Api::<Deployment>::namespaced(client.clone(), OPERATOR_NS);
    eventually(
        Duration::from_secs(90),
        &format!("{name} 2/2 Ready"),
        || async {
            let s = api.get(&name).await.ok()?.status?;
            (s.ready_replicas == Some(2) && s.updated_replicas == Some(2) && s.replicas == Some(2))
                .then_some(())
        },
    )
    .await;
}

#[tokio::test]
#[ignore = "node tier: needs a real node (CLAUDEKEY_NODE=1 hack/control-plane.sh start); hack/test.sh runs it"]
async fn leader_killed_mid_rotation_the_other_replica_finishes_it_once() {
    let fx = installed();
    let client = node_client().await;
    deployment_ready(&client, "controller").await;
    let ns = namespace(&client, "node-leader").await;
    let key = fx.new_upstream_key();
    ready_claudekey(&client, &ns, "bot", &key, "30s").await;
    let before = workload_fingerprint(&client, &ns, "bot")
        .await
        .expect("fingerprint");
    let old_leader = leader(&client).await.expect("a leader");

    annotate_claudekey(&client, &ns, "bot", "claudekey.io/rotate", "leader-kill").await;
    Api::<Pod>::namespaced(client.clone(), OPERATOR_NS)
        .delete(&old_leader, &DeleteParams::default().grace_period(0))
        .await
        .expect("kill the leader pod");

    let new_leader = eventually(Duration::from_secs(60), "another leader", || async {
        leader(&client).await.filter(|l| *l != old_leader)
    })
    .await;
    let api = Api::<ClaudeKey>::namespaced(client.clone(), &ns);
    eventually(Duration::from_secs(60), "the rotation finished", || async {
        let wk = api.get("bot").await.ok()?.status?.workload_key?;
        (wk.fingerprint != before).then_some(())
    })
    .await;
    // Converged, and rotated exactly once: the key it replaced is the one from before the
    // rotation, not a key issued in between and replaced again.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let wk = api
        .get("bot")
        .await
        .expect("ClaudeKey")
        .status
        .and_then(|s| s.workload_key)
        .expect("workload key status");
    assert_ne!(wk.fingerprint, before);
    assert_eq!(
        wk.previous_fingerprint.as_deref(),
        Some(before.as_str()),
        "one rotation replaces the original key (leader {old_leader} killed, {new_leader} took over)"
    );
    deployment_ready(&client, "controller").await;
}

#[tokio::test]
#[ignore = "node tier: needs a real node (CLAUDEKEY_NODE=1 hack/control-plane.sh start); hack/test.sh runs it"]
async fn pod_creation_keeps_working_while_a_webhook_pod_is_deleted() {
    let fx = installed();
    let client = node_client().await;
    deployment_ready(&client, "webhook").await;
    let ns = namespace(&client, "node-webhook").await;
    let key = fx.new_upstream_key();
    ready_claudekey(&client, &ns, "bot", &key, "30s").await;

    // Server-side dry runs: every create goes through both webhooks (mutate and validate) but
    // no pod is stored, so the load does not fill the node. The load runs until every round of
    // deletion is over (CLAUDEKEY_NODE_WEBHOOK_ROUNDS, default 1: a webhook pod deleted, the
    // Deployment back to 2/2 Ready).
    let rounds: u32 = std::env::var("CLAUDEKEY_NODE_WEBHOOK_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(1);
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    let (done_tx, mut done) = tokio::sync::watch::channel(false);
    let load = {
        let pods = pods.clone();
        tokio::spawn(async move {
            let params = PostParams {
                dry_run: true,
                ..Default::default()
            };
            let (mut ok, mut failures) = (0u32, Vec::new());
            let mut i = 0;
            while !*done.borrow_and_update() {
                i += 1;
                let pod = app_pod(&format!("load-{i}"), "bot", "pass", "Never");
                match pods.create(&params, &pod).await {
                    Ok(p) if p.spec.as_ref().is_some_and(|s| s.init_containers.is_some()) => {
                        ok += 1
                    }
                    Ok(_) => failures.push(format!("create {i}: admitted without the sidecar")),
                    Err(e) => failures.push(format!("create {i}: {e}")),
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (ok, failures)
        })
    };
    let started = Instant::now();
    let webhook_pods = Api::<Pod>::namespaced(client.clone(), OPERATOR_NS);
    for round in 0..rounds {
        tokio::time::sleep(Duration::from_secs(4)).await;
        let list = webhook_pods
            .list(&ListParams::default().labels("app.kubernetes.io/component=webhook"))
            .await
            .expect("list webhook pods");
        let victim = list.items[round as usize % list.items.len()]
            .metadata
            .name
            .clone()
            .expect("name");
        webhook_pods
            .delete(&victim, &DeleteParams::default())
            .await
            .expect("delete a webhook pod");
        // The pod is gone (its drain over) and its replacement Ready.
        eventually(
            Duration::from_secs(60),
            "the deleted webhook pod gone",
            || async {
                webhook_pods
                    .get_opt(&victim)
                    .await
                    .ok()?
                    .is_none()
                    .then_some(())
            },
        )
        .await;
        deployment_ready(&client, "webhook").await;
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    let _ = done_tx.send(true);
    let (ok, failures) = load.await.expect("load task");
    eprintln!(
        "{rounds} webhook pod(s) deleted under load: {ok} creations in {:?}, {} failed",
        started.elapsed(),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {} creations failed: {failures:#?}",
        failures.len(),
        ok as usize + failures.len()
    );
    assert!(
        ok >= 50 * rounds,
        "only {ok} creations in {:?}",
        started.elapsed()
    );
    deployment_ready(&client, "webhook").await;
}
