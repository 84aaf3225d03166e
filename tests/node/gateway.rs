//! Gateway placement on real pods (DESIGN.md §10): an app in its own namespace, injected with
//! the forwarder, reaches the chart's TLS gateway through the gateway Service.
//!
//! Our node runs no kube-proxy and no DNS: `hack/node.sh service-dnat` routes the gateway
//! Service's ClusterIP to its endpoints as kube-proxy would, and the app pod names the Service
//! (the host of the `<name>-client` Secret's ANTHROPIC_BASE_URL, what the controller writes) in
//! `hostAliases`, so the forwarder's TLS connection goes to the ClusterIP under the Service's
//! DNS name, which the gateway's certificate must carry.

use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::core::v1::{HostAlias, Pod, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{ListParams, PostParams};
use kube::{Api, Client};

use super::fixture::{OPERATOR_NS, RELEASE, installed, node_client};
use super::manifests::app_pod;
use super::{SDK_ONCE, logs, namespace, placed_claudekey};
use crate::support::eventually;

/// The gateway Service's ClusterIP and port, and its Ready endpoints as `ip:port`.
async fn gateway_endpoints(client: &Client) -> (String, i32, Vec<String>) {
    let name = format!("{RELEASE}-gateway");
    let service = Api::<Service>::namespaced(client.clone(), OPERATOR_NS)
        .get(&name)
        .await
        .expect("the gateway Service");
    let spec = service.spec.expect("spec");
    let ip = spec.cluster_ip.expect("a ClusterIP");
    let port = spec.ports.expect("ports")[0].clone();
    let slices = Api::<EndpointSlice>::namespaced(client.clone(), OPERATOR_NS);
    let targets = eventually(
        Duration::from_secs(60),
        "2 Ready gateway endpoints",
        || async {
            let list = slices
                .list(&ListParams::default().labels(&format!("kubernetes.io/service-name={name}")))
                .await
                .ok()?;
            let mut targets = Vec::new();
            for slice in list.items {
                let target_port = slice
                    .ports
                    .iter()
                    .flatten()
                    .find(|p| p.name == port.name)?
                    .port?;
                for e in slice.endpoints {
                    if e.conditions.as_ref()?.ready == Some(true) {
                        targets.extend(e.addresses.iter().map(|a| format!("{a}:{target_port}")));
                    }
                }
            }
            (targets.len() == 2).then_some(targets)
        },
    )
    .await;
    (ip, port.port, targets)
}

#[tokio::test]
#[ignore = "node tier: needs a real node (CLAUDEKEY_NODE=1 hack/control-plane.sh start); hack/test.sh runs it"]
async fn a_gateway_placement_app_reaches_the_gateway_service_over_tls() {
    let fx = installed();
    let client = node_client().await;
    let ns = namespace(&client, "node-gw").await;
    let upstream_key = fx.new_upstream_key();
    placed_claudekey(&client, &ns, "bot", &upstream_key, "20s", "gateway").await;

    let (ip, port, targets) = gateway_endpoints(&client).await;
    // Our own node has no kube-proxy (CLAUDEKEY_TEST_NODE is set by hack/node.sh); another
    // cluster (hack/e2e-cluster.sh) routes Services itself.
    if std::env::var_os("CLAUDEKEY_TEST_NODE").is_some() {
        let node_sh = concat!(env!("CARGO_MANIFEST_DIR"), "/hack/node.sh");
        let status = Command::new("bash")
            .arg(node_sh)
            .args(["service-dnat", &ip, &port.to_string()])
            .args(&targets)
            .status()
            .expect("run hack/node.sh service-dnat");
        assert!(status.success(), "hack/node.sh service-dnat failed");
    }

    // What the controller wrote for the app: the gateway Service's DNS name, over https.
    let client_secret = Api::<Secret>::namespaced(client.clone(), &ns)
        .get("bot-client")
        .await
        .expect("the bot-client Secret");
    let data = client_secret.data.expect("data");
    let base_url = String::from_utf8(data["ANTHROPIC_BASE_URL"].0.clone()).expect("utf-8");
    let expected = format!("https://{RELEASE}-gateway.{OPERATOR_NS}.svc:{port}");
    assert_eq!(base_url, expected);
    let host = format!("{RELEASE}-gateway.{OPERATOR_NS}.svc");

    let mut pod = app_pod("sdk-gw", "bot", SDK_ONCE, "Never");
    pod.spec.as_mut().expect("spec").host_aliases = Some(vec![HostAlias {
        ip: ip.clone(),
        hostnames: Some(vec![host]),
    }]);
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("create the gateway-placement app pod (the webhook injects the forwarder)");
    let pod = eventually(Duration::from_secs(90), "the app pod to finish", || async {
        let p = pods.get("sdk-gw").await.ok()?;
        let phase = p.status.as_ref()?.phase.clone()?;
        (phase == "Succeeded" || phase == "Failed").then_some(p)
    })
    .await;
    let out = logs(&client, &ns, "sdk-gw", "app").await;
    let forwarder = logs(&client, &ns, "sdk-gw", "claudekey-proxy").await;
    let phase = pod.status.as_ref().and_then(|s| s.phase.clone());
    assert_eq!(
        phase.as_deref(),
        Some("Succeeded"),
        "app output:\n{out}\nforwarder:\n{forwarder}"
    );
    assert!(
        out.contains("ANSWER Hello from the fake Anthropic API."),
        "app output:\n{out}"
    );
    // The injected sidecar is the forwarder (it holds no upstream key), so the upstream key
    // the fake saw was sent by the gateway.
    let sidecar = pod
        .spec
        .as_ref()
        .and_then(|s| s.init_containers.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.name == "claudekey-proxy"))
        .expect("the injected sidecar");
    let args = sidecar.args.clone().unwrap_or_default().join(" ");
    assert!(args.contains("forward"), "not the forwarder: {args}");
    assert!(
        fx.upstream
            .received()
            .iter()
            .any(|r| r.header("x-api-key") == Some(upstream_key.as_str()))
    );
}
