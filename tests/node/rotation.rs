//! Keys changing under running pods: rotations and revokes reach the injected sidecar through
//! the kubelet's Secret volume updates, and consumer Deployments are rolled once per new key.

use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::Api;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};

use claudekey::crd::ClaudeKey;
use claudekey::fake_upstream::KeyStatus;

use super::fixture::{OPERATOR_NS, installed, node_client};
use super::manifests::{app_pod, consumer_deployment};
use super::{annotate_claudekey, logs, namespace, ready_claudekey, workload_fingerprint};
use crate::support::eventually;

/// Calls the API every 200 ms for `seconds`, then idles: one line per 10 successes, and one per
/// failure at once. Bounded, so a test that dies never leaves a pod sending requests forever.
fn sdk_loop(seconds: u32) -> String {
    format!(
        r#"
import time, anthropic
client = anthropic.Anthropic(max_retries=0, timeout=10)
ok = 0
end = time.time() + {seconds}
while time.time() < end:
    try:
        client.messages.create(model="claude-haiku-4-5", max_tokens=16,
                               messages=[{{"role": "user", "content": "ping"}}])
        ok += 1
        if ok % 10 == 1:
            print("OK", ok, flush=True)
    except Exception as e:
        print("FAIL", type(e).__name__, e, flush=True)
    time.sleep(0.2)
print("DONE", ok, flush=True)
while True:
    time.sleep(3600)
"#
    )
}

/// The most answers the looping app reported so far.
fn answers(out: &str) -> u32 {
    out.lines()
        .filter_map(|l| l.strip_prefix("OK ")?.trim().parse().ok())
        .max()
        .unwrap_or(0)
}

fn restart_counts(pod: &Pod) -> Vec<(String, i32)> {
    let status = pod.status.as_ref().expect("pod status");
    status
        .init_container_statuses
        .iter()
        .flatten()
        .chain(status.container_statuses.iter().flatten())
        .map(|s| (s.name.clone(), s.restart_count))
        .collect()
}

#[tokio::test]
#[ignore = "node tier: needs a real node (CLAUDEKEY_NODE=1 hack/control-plane.sh start); hack/test.sh runs it"]
async fn rotations_reach_the_sidecar_through_kubelet_secret_updates_without_a_failure() {
    let fx = installed();
    let client = node_client().await;
    let ns = namespace(&client, "node-rot").await;
    let old_upstream = fx.new_upstream_key();
    ready_claudekey(&client, &ns, "bot", &old_upstream, "15s").await;
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    pods.create(
        &PostParams::default(),
        &app_pod("loop", "bot", &sdk_loop(90), "Always"),
    )
    .await
    .expect("create the looping app pod");
    eventually(
        Duration::from_secs(60),
        "the loop's first answer",
        || async {
            logs(&client, &ns, "loop", "app")
                .await
                .contains("OK 1")
                .then_some(())
        },
    )
    .await;

    // 1. The upstream key changes in its source: the controller rewrites <name>-proxy, the
    //    kubelet swaps the sidecar's mounted Secret (..data), the sidecar reloads.
    let new_upstream = fx.new_upstream_key();
    let patch = serde_json::json!({ "stringData": { "api-key": new_upstream } });
    Api::<Secret>::namespaced(client.clone(), OPERATOR_NS)
        .patch(
            &format!("upstream-{ns}-bot"),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
        .expect("change the upstream key");
    eventually(
        Duration::from_secs(60),
        "a request with the new upstream key",
        || async {
            let seen = fx.upstream.received();
            seen.iter()
                .any(|r| r.header("x-api-key") == Some(new_upstream.as_str()))
                .then_some(())
        },
    )
    .await;
    // Refused upstream from now on: a sidecar still using it would make the loop fail.
    fx.upstream
        .set_key_status(&old_upstream, KeyStatus::Inactive);
    let at_switch = answers(&logs(&client, &ns, "loop", "app").await);

    // 2. The workload key rotates, then is revoked: every rewrite of the Secret is reloaded.
    let before = workload_fingerprint(&client, &ns, "bot")
        .await
        .expect("fingerprint");
    annotate_claudekey(&client, &ns, "bot", "claudekey.io/rotate", "node-1").await;
    eventually(
        Duration::from_secs(60),
        "the rotated workload key",
        || async {
            let now = workload_fingerprint(&client, &ns, "bot").await?;
            (now != before).then_some(())
        },
    )
    .await;
    annotate_claudekey(&client, &ns, "bot", "claudekey.io/revoke", "node-1").await;
    eventually(
        Duration::from_secs(60),
        "the revoke (no previous workload key)",
        || async {
            let ck = Api::<ClaudeKey>::namespaced(client.clone(), &ns)
                .get("bot")
                .await
                .ok()?;
            let wk = ck.status?.workload_key?;
            wk.previous_fingerprint.is_none().then_some(())
        },
    )
    .await;
    // A few more kubelet sync periods of traffic after the last rewrite.
    tokio::time::sleep(Duration::from_secs(12)).await;

    let out = logs(&client, &ns, "loop", "app").await;
    assert!(!out.contains("FAIL"), "the app saw failures:\n{out}");
    let pod = pods.get("loop").await.expect("pod");
    for (name, restarts) in restart_counts(&pod) {
        assert_eq!(
            restarts, 0,
            "container {name} restarted; app output:\n{out}"
        );
    }
    assert!(
        answers(&out) >= at_switch + 20,
        "too few answers after the upstream key changed ({at_switch} before):\n{out}"
    );
    let _ = pods.delete("loop", &DeleteParams::default()).await;
}

#[tokio::test]
#[ignore = "node tier: needs a real node (CLAUDEKEY_NODE=1 hack/control-plane.sh start); hack/test.sh runs it"]
async fn consumer_deployment_rolls_exactly_once_per_new_workload_key() {
    let fx = installed();
    let client = node_client().await;
    let ns = namespace(&client, "node-consumer").await;
    let key = fx.new_upstream_key();
    ready_claudekey(&client, &ns, "bot", &key, "30s").await;
    let deployments = Api::<Deployment>::namespaced(client.clone(), &ns);
    deployments
        .create(
            &PostParams::default(),
            &consumer_deployment("consumer", "bot"),
        )
        .await
        .expect("create the consumer Deployment");
    let replica_sets = Api::<ReplicaSet>::namespaced(client.clone(), &ns);
    // Rolled out, every pod on the template stamped for workload key `fingerprint`; the number
    // of ReplicaSets (one per pod template the Deployment ever had) then.
    // `None`: running, whatever its stamp.
    let rolled_for = |fingerprint: Option<String>| {
        let deployments = deployments.clone();
        let replica_sets = replica_sets.clone();
        async move {
            let d = deployments.get("consumer").await.ok()?;
            let s = d.status.as_ref()?;
            let stamp = d
                .spec
                .as_ref()?
                .template
                .metadata
                .as_ref()?
                .annotations
                .as_ref()
                .and_then(|a| a.get("claudekey.io/restartedFor"))
                .cloned();
            let done = (fingerprint.is_none() || stamp == fingerprint)
                && s.updated_replicas == Some(1)
                && s.ready_replicas == Some(1)
                && s.replicas == Some(1)
                && s.observed_generation == d.metadata.generation;
            let rs = replica_sets.list(&ListParams::default()).await.ok()?;
            done.then_some(rs.items.len())
        }
    };
    // A consumer created after the key was issued already reads the current key: it is not
    // rolled for it (the controller records which key its consumers were rolled for, so a
    // steady state lists nothing), only for each new key.
    let mut count = eventually(Duration::from_secs(90), "the consumer running", || {
        rolled_for(None)
    })
    .await;

    for round in 1..=2 {
        let before = workload_fingerprint(&client, &ns, "bot")
            .await
            .expect("fingerprint");
        annotate_claudekey(
            &client,
            &ns,
            "bot",
            "claudekey.io/rotate",
            &format!("r{round}"),
        )
        .await;
        let new = eventually(
            Duration::from_secs(60),
            "the rotated workload key",
            || async {
                workload_fingerprint(&client, &ns, "bot")
                    .await
                    .filter(|f| *f != before)
            },
        )
        .await;
        let rolled = eventually(Duration::from_secs(90), "the consumer rolled", || {
            rolled_for(Some(new.clone()))
        })
        .await;
        assert_eq!(
            rolled,
            count + 1,
            "one new ReplicaSet for the key of rotation {round}"
        );
        // Quiet for a while: a second roll for the same key would add a ReplicaSet.
        tokio::time::sleep(Duration::from_secs(8)).await;
        let now = replica_sets
            .list(&ListParams::default())
            .await
            .expect("list")
            .items
            .len();
        assert_eq!(
            now,
            count + 1,
            "rolled again for the same key after rotation {round}"
        );
        count = now;
    }
}
