//! End to end on real pods (issue 17): the chart installed with `helm install --wait` from the
//! image hack/image.sh built, on the real node of `CLAUDEKEY_NODE=1 hack/control-plane.sh start`
//! (containerd, kubelet, bridge CNI; hack/node.sh). The app pods run the official Python SDK.
//!
//! Ignored in the plain `cargo test` run, which has no node; hack/test.sh's node tier runs them
//! with `--ignored`. There they fail, never skip, when the node or an image is missing.
//!
//! The fake Anthropic upstream runs in this process on the node's bridge address, the one
//! address pods reach on the host; the chart's proxies are pointed at it with `upstreamURL`.

mod fixture;
mod ha;
mod manifests;

use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Secret, ServiceAccount};
use kube::api::{DeleteParams, ListParams, LogParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};

use claudekey::crd::ClaudeKey;
use claudekey::fake_upstream::KeyStatus;

use super::support::eventually;
use fixture::{OPERATOR_NS, curl_status, installed, node_client, pod_ready};
use manifests::{app_pod, claudekey, consumer_deployment, upstream_secret};

const SDK_ONCE: &str = r#"
import anthropic
# max_retries=0: the first call must succeed, so the sidecar was serving when the app started.
client = anthropic.Anthropic(max_retries=0, timeout=10)
msg = client.messages.create(model="claude-haiku-4-5", max_tokens=32,
                             messages=[{"role": "user", "content": "Say hello."}])
print("ANSWER", msg.content[0].text, flush=True)
"#;

/// Calls the API every 200 ms for `seconds`, then idles: one line per 25 successes, and one per
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
        if ok % 25 == 1:
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

/// A fresh namespace whose `default` ServiceAccount exists: the ServiceAccount admission plugin
/// refuses pods until kube-controller-manager has created it.
async fn namespace(client: &Client, prefix: &str) -> String {
    let ns = super::support::namespace(client, prefix).await;
    let accounts = Api::<ServiceAccount>::namespaced(client.clone(), &ns);
    eventually(
        Duration::from_secs(30),
        "the default ServiceAccount",
        || async { accounts.get_opt("default").await.ok().flatten().map(|_| ()) },
    )
    .await;
    ns
}

async fn logs(client: &Client, ns: &str, pod: &str, container: &str) -> String {
    Api::<Pod>::namespaced(client.clone(), ns)
        .logs(
            pod,
            &LogParams {
                container: Some(container.into()),
                ..Default::default()
            },
        )
        .await
        .unwrap_or_default()
}

/// The ClaudeKey NS/NAME Ready, on a fresh upstream key the fake knows.
async fn ready_claudekey(client: &Client, ns: &str, name: &str, upstream_key: &str, grace: &str) {
    let secret_name = format!("upstream-{ns}-{name}");
    Api::<Secret>::namespaced(client.clone(), OPERATOR_NS)
        .create(
            &PostParams::default(),
            &upstream_secret(&secret_name, upstream_key),
        )
        .await
        .expect("create the upstream Secret");
    Api::<ClaudeKey>::namespaced(client.clone(), ns)
        .create(
            &PostParams::default(),
            &claudekey(ns, name, &secret_name, grace),
        )
        .await
        .expect("create the ClaudeKey");
    wait_claudekey_ready(client, ns, name).await;
}

async fn wait_claudekey_ready(client: &Client, ns: &str, name: &str) -> ClaudeKey {
    let api = Api::<ClaudeKey>::namespaced(client.clone(), ns);
    eventually(Duration::from_secs(60), "the ClaudeKey Ready", || async {
        let ck = api.get(name).await.ok()?;
        let ready = ck
            .status
            .as_ref()?
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        ready.then_some(ck)
    })
    .await
}

async fn workload_fingerprint(client: &Client, ns: &str, name: &str) -> Option<String> {
    let ck = Api::<ClaudeKey>::namespaced(client.clone(), ns)
        .get(name)
        .await
        .ok()?;
    Some(ck.status?.workload_key?.fingerprint)
}

async fn annotate_claudekey(client: &Client, ns: &str, name: &str, key: &str, value: &str) {
    let patch = serde_json::json!({ "metadata": { "annotations": { key: value } } });
    Api::<ClaudeKey>::namespaced(client.clone(), ns)
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("annotate the ClaudeKey");
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
async fn chart_pods_run_ready_and_every_probe_answers() {
    let fx = installed();
    let client = node_client().await;
    let pods = Api::<Pod>::namespaced(client.clone(), OPERATOR_NS);
    let mut controller_pods = Vec::new();
    for component in ["controller", "webhook"] {
        let list = pods
            .list(
                &ListParams::default().labels(&format!("app.kubernetes.io/component={component}")),
            )
            .await
            .expect("list pods");
        let ready: Vec<&Pod> = list.items.iter().filter(|p| pod_ready(p)).collect();
        assert_eq!(
            ready.len(),
            2,
            "{component}: 2 Ready pods expected after helm install --wait"
        );
        for pod in ready {
            let ip = pod
                .status
                .as_ref()
                .and_then(|s| s.pod_ip.clone())
                .expect("pod IP");
            let spec = pod.spec.as_ref().expect("spec");
            for c in &spec.containers {
                let probes = [&c.liveness_probe, &c.readiness_probe, &c.startup_probe];
                let mut asked = 0;
                for probe in probes.into_iter().flatten() {
                    let get = probe
                        .http_get
                        .as_ref()
                        .expect("the chart's probes are httpGet");
                    let port = fixture::resolve_port(c, &get.port);
                    let scheme = get.scheme.as_deref().unwrap_or("HTTP").to_lowercase();
                    let path = get.path.as_deref().unwrap_or("/");
                    let url = format!("{scheme}://{ip}:{port}{path}");
                    assert_eq!(curl_status(&url), 200, "{component} probe {url}");
                    asked += 1;
                }
                assert!(
                    asked >= 2,
                    "{component}/{}: liveness and readiness probes expected",
                    c.name
                );
            }
            if component == "controller" {
                controller_pods.push(pod.metadata.name.clone().expect("name"));
            }
        }
    }
    let lease = Api::<Lease>::namespaced(client.clone(), OPERATOR_NS)
        .get("claudekey-controller")
        .await
        .expect("the controller's leader Lease");
    let holder = lease
        .spec
        .and_then(|s| s.holder_identity)
        .expect("a leader");
    assert!(
        controller_pods.contains(&holder),
        "leader {holder} is not one of the controller pods {controller_pods:?}"
    );
    eprintln!("helm install --wait took {:?}", fx.install_time);
}

#[tokio::test]
#[ignore = "node tier: needs a real node (CLAUDEKEY_NODE=1 hack/control-plane.sh start); hack/test.sh runs it"]
async fn injected_app_gets_answers_through_the_sidecar_with_the_placeholder_key() {
    let fx = installed();
    let client = node_client().await;
    let ns = namespace(&client, "node-sdk").await;
    let upstream_key = fx.new_upstream_key();
    ready_claudekey(&client, &ns, "bot", &upstream_key, "20s").await;

    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    pods.create(
        &PostParams::default(),
        &app_pod("sdk-once", "bot", SDK_ONCE, "Never"),
    )
    .await
    .expect("create the app pod (the webhook injects the sidecar)");
    let pod = eventually(Duration::from_secs(90), "the app pod to finish", || async {
        let p = pods.get("sdk-once").await.ok()?;
        let phase = p.status.as_ref()?.phase.clone()?;
        (phase == "Succeeded" || phase == "Failed").then_some(p)
    })
    .await;
    let out = logs(&client, &ns, "sdk-once", "app").await;
    let phase = pod.status.as_ref().and_then(|s| s.phase.clone());
    assert_eq!(phase.as_deref(), Some("Succeeded"), "app output:\n{out}");
    assert!(
        out.contains("ANSWER Hello from the fake Anthropic API."),
        "app output:\n{out}"
    );

    // The sidecar is a native sidecar (an init container that keeps running) started first.
    let status = pod.status.as_ref().expect("status");
    let sidecar = status
        .init_container_statuses
        .iter()
        .flatten()
        .find(|s| s.name == "claudekey-proxy")
        .expect("the injected claudekey-proxy sidecar");
    let app = status
        .container_statuses
        .iter()
        .flatten()
        .find(|s| s.name == "app")
        .expect("app status");
    let sidecar_started = sidecar.state.as_ref().and_then(|s| {
        s.running
            .as_ref()
            .and_then(|r| r.started_at.clone())
            .or_else(|| s.terminated.as_ref().and_then(|t| t.started_at.clone()))
    });
    let app_started = app
        .state
        .as_ref()
        .and_then(|s| s.terminated.as_ref())
        .and_then(|t| t.started_at.clone());
    assert!(
        sidecar_started.is_some() && sidecar_started <= app_started,
        "sidecar started {sidecar_started:?}, app {app_started:?}"
    );

    // The upstream saw the real upstream key, never the placeholder the app sent.
    let seen = fx.upstream.received();
    assert!(
        seen.iter()
            .any(|r| r.header("x-api-key") == Some(upstream_key.as_str()))
    );
    assert!(
        !seen
            .iter()
            .any(|r| r.header("x-api-key") == Some("claudekey-sidecar"))
    );
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
    let oks = out.lines().filter(|l| l.starts_with("OK ")).count();
    assert!(oks >= 4, "too few answers during the rotations:\n{out}");
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
    let rolled_for = |fingerprint: String| {
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
                .as_ref()?
                .get("claudekey.io/restartedFor")?
                .clone();
            let done = stamp == fingerprint
                && s.updated_replicas == Some(1)
                && s.ready_replicas == Some(1)
                && s.replicas == Some(1)
                && s.observed_generation == d.metadata.generation;
            let rs = replica_sets.list(&ListParams::default()).await.ok()?;
            done.then_some(rs.items.len())
        }
    };
    // A consumer seen for the first time is stamped (and so rolled once) for the current key.
    let current = workload_fingerprint(&client, &ns, "bot")
        .await
        .expect("fingerprint");
    let mut count = eventually(
        Duration::from_secs(90),
        "the consumer stamped and running",
        || rolled_for(current.clone()),
    )
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
            rolled_for(new.clone())
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
