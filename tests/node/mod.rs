//! End to end on real pods (issue 17): the chart installed with `helm install --wait` from the
//! image hack/image.sh built, on the real node of `CLAUDEKEY_NODE=1 hack/control-plane.sh start`
//! (containerd, kubelet, bridge CNI; hack/node.sh). The app pods run the official Python SDK.
//!
//! Ignored in the plain `cargo test` run, which has no node; hack/test.sh's node tier runs them
//! with `--ignored`. There they fail, never skip, when the node or an image is missing.
//!
//! The fake Anthropic upstream runs in this process on the node's bridge address, the one
//! address pods reach on the host; the chart's proxies are pointed at it with `upstreamURL`.

mod federation;
mod fixture;
mod gateway;
mod ha;
mod isolation;
mod manifests;
mod ops;
mod rotation;
mod shared_limits;

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Secret, ServiceAccount};
use kube::api::{ListParams, LogParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};

use claudekey::crd::ClaudeKey;

use super::support::eventually;
use fixture::{OPERATOR_NS, curl_status, installed, node_client, pod_ready};
use manifests::{app_pod, claudekey, upstream_secret};

const SDK_ONCE: &str = r#"
import anthropic
# max_retries=0: the first call must succeed, so the sidecar was serving when the app started.
client = anthropic.Anthropic(max_retries=0, timeout=10)
msg = client.messages.create(model="claude-haiku-4-5", max_tokens=32,
                             messages=[{"role": "user", "content": "Say hello."}])
print("ANSWER", msg.content[0].text, flush=True)
"#;

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
    placed_claudekey(client, ns, name, upstream_key, grace, "namespace").await
}

/// [`ready_claudekey`] with the source's placement.
async fn placed_claudekey(
    client: &Client,
    ns: &str,
    name: &str,
    upstream_key: &str,
    grace: &str,
    placement: &str,
) {
    let secret_name = format!("upstream-{ns}-{name}");
    Api::<Secret>::namespaced(client.clone(), OPERATOR_NS)
        .create(
            &PostParams::default(),
            &upstream_secret(&secret_name, upstream_key),
        )
        .await
        .expect("create the upstream Secret");
    Api::<claudekey::crd::ClusterClaudeKeySource>::all(client.clone())
        .create(
            &PostParams::default(),
            &manifests::cluster_source(ns, name, &secret_name, placement),
        )
        .await
        .expect("create the ClusterClaudeKeySource");
    Api::<ClaudeKey>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &claudekey(ns, name, grace))
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

    // The webhook gave the sidecar half its memory limit (the chart's 128Mi) as its body
    // budget, and the proxy in the image took the flag: the answer above came through it.
    let spec = pod.spec.as_ref().expect("spec");
    let injected = spec
        .init_containers
        .iter()
        .flatten()
        .find(|c| c.name == "claudekey-proxy")
        .expect("injected");
    let args = injected.args.clone().unwrap_or_default();
    assert!(
        args.windows(2).any(|w| w == ["--body-budget-mib", "64"]),
        "{args:?}"
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
