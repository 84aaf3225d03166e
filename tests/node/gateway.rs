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

/// Routes the Service `ip:port` to `targets`, as kube-proxy would. Our own node has no
/// kube-proxy (CLAUDEKEY_TEST_NODE is set by hack/node.sh); another cluster
/// (hack/e2e-cluster.sh) routes Services itself, and this does nothing.
fn route(ip: &str, port: i32, targets: &[String]) {
    if std::env::var_os("CLAUDEKEY_TEST_NODE").is_none() {
        return;
    }
    let node_sh = concat!(env!("CARGO_MANIFEST_DIR"), "/hack/node.sh");
    let status = Command::new("bash")
        .arg(node_sh)
        .args(["service-dnat", ip, &port.to_string()])
        .args(targets)
        .status()
        .expect("run hack/node.sh service-dnat");
    assert!(status.success(), "hack/node.sh service-dnat failed");
}

/// An app pod of gateway placement in `ns` running `script`, naming the gateway Service's DNS
/// name (the host of the controller's ANTHROPIC_BASE_URL) at the Service's ClusterIP.
fn gateway_app(name: &str, script: &str, service_ip: &str) -> Pod {
    let mut pod = app_pod(name, "bot", script, "Never");
    pod.spec.as_mut().expect("spec").host_aliases = Some(vec![HostAlias {
        ip: service_ip.to_string(),
        hostnames: Some(vec![format!("{RELEASE}-gateway.{OPERATOR_NS}.svc")]),
    }]);
    pod
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
    route(&ip, port, &targets);

    // What the controller wrote for the app: the gateway Service's DNS name, over https.
    let client_secret = Api::<Secret>::namespaced(client.clone(), &ns)
        .get("bot-client")
        .await
        .expect("the bot-client Secret");
    let data = client_secret.data.expect("data");
    let base_url = String::from_utf8(data["ANTHROPIC_BASE_URL"].0.clone()).expect("utf-8");
    let expected = format!("https://{RELEASE}-gateway.{OPERATOR_NS}.svc:{port}");
    assert_eq!(base_url, expected);

    let pod = gateway_app("sdk-gw", SDK_ONCE, &ip);
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

/// Requests through the forwarder to the gateway for `DURATION` seconds, one at a time, no
/// retries: every failure is printed.
const SDK_LOOP: &str = r#"
import anthropic, time
client = anthropic.Anthropic(max_retries=0, timeout=20)
ok = fail = 0
end = time.time() + 30
print("STARTED", flush=True)
while time.time() < end:
    try:
        client.messages.create(model="claude-haiku-4-5", max_tokens=8,
                               messages=[{"role": "user", "content": "hi"}])
        ok += 1
    except Exception as e:
        fail += 1
        print("FAIL", type(e).__name__, e, flush=True)
    time.sleep(0.05)
print("DONE", ok, fail, flush=True)
"#;

/// A gateway pod deleted while an app sends requests through the Service: for 3 s the Service
/// still routes new connections to it (kube-proxy lags behind the endpoint change), then no
/// longer. The pod keeps accepting during its shutdown delay and drains every connection
/// (GOAWAY / `Connection: close`, requests in flight answered), so the app, without retries,
/// sees no failure.
#[tokio::test]
#[ignore = "node tier: needs a real node (CLAUDEKEY_NODE=1 hack/control-plane.sh start); hack/test.sh runs it"]
async fn a_gateway_pod_deleted_under_load_drains_without_a_failed_request() {
    let fx = installed();
    let client = node_client().await;
    let ns = namespace(&client, "node-gw-drain").await;
    let upstream_key = fx.new_upstream_key();
    placed_claudekey(&client, &ns, "bot", &upstream_key, "20s", "gateway").await;
    let (ip, port, targets) = gateway_endpoints(&client).await;
    route(&ip, port, &targets);

    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    pods.create(
        &PostParams::default(),
        &gateway_app("sdk-loop", SDK_LOOP, &ip),
    )
    .await
    .expect("create the app pod");
    eventually(Duration::from_secs(60), "the app sending", || async {
        logs(&client, &ns, "sdk-loop", "app")
            .await
            .contains("STARTED")
            .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;

    let gateway_pods = Api::<Pod>::namespaced(client.clone(), OPERATOR_NS);
    let list = gateway_pods
        .list(&ListParams::default().labels("app.kubernetes.io/component=gateway"))
        .await
        .expect("gateway pods");
    // The replica serving the app now (its forwarder keeps one pooled connection): the one whose
    // audit lines name the ClaudeKey most.
    let mut served = Vec::new();
    for pod in &list.items {
        let name = pod.metadata.name.clone().expect("name");
        let audit = logs(&client, OPERATOR_NS, &name, "claudekey-proxy").await;
        served.push((audit.matches(&format!("{ns}/bot")).count(), pod.clone()));
    }
    served.sort_by_key(|(n, _)| std::cmp::Reverse(*n));
    assert!(
        served[0].0 > 0,
        "no gateway replica audited the app's requests"
    );
    let victim = served[0].1.clone();
    let victim_ip = victim
        .status
        .and_then(|s| s.pod_ip)
        .expect("the victim's IP");
    let survivors: Vec<String> = targets
        .iter()
        .filter(|t| !t.starts_with(&format!("{victim_ip}:")))
        .cloned()
        .collect();
    assert_eq!(survivors.len(), 1, "{targets:?} without {victim_ip}");
    gateway_pods
        .delete(
            &victim.metadata.name.expect("name"),
            &kube::api::DeleteParams::default(),
        )
        .await
        .expect("delete a gateway pod");
    // kube-proxy lags behind: new connections still reach the terminating pod for a while,
    // which must accept and serve them (--shutdown-delay, 5 s), then it is taken out.
    tokio::time::sleep(Duration::from_secs(3)).await;
    route(&ip, port, &survivors);

    let done = eventually(Duration::from_secs(90), "the app to finish", || async {
        let out = logs(&client, &ns, "sdk-loop", "app").await;
        out.contains("DONE").then_some(out)
    })
    .await;
    let summary = done.lines().find(|l| l.starts_with("DONE")).expect("DONE");
    let counts: Vec<u32> = summary
        .split_whitespace()
        .skip(1)
        .map(|n| n.parse().expect("count"))
        .collect();
    eprintln!("gateway pod deleted under load: {summary}");
    assert_eq!(counts[1], 0, "requests failed:\n{done}");
    assert!(
        counts[0] >= 50,
        "only {} requests in 30 s:\n{done}",
        counts[0]
    );
    // The Service routed to both endpoints again, for the tests after this one.
    let (_, _, targets) = gateway_endpoints(&client).await;
    route(&ip, port, &targets);
}

/// A gateway pod closes, on accept, connections beyond 1,024 from one client address (here the
/// node's own, 198.18.0.1, connecting to one pod's endpoint), and a freed place is taken
/// again: one pod cannot hold every slot of a gateway all namespaces share. No credential is
/// needed to hold a connection, so none is sent.
#[tokio::test]
#[ignore = "node tier: needs a real node (CLAUDEKEY_NODE=1 hack/control-plane.sh start); hack/test.sh runs it"]
async fn a_gateway_pod_closes_connections_beyond_its_per_client_cap() {
    let _fx = installed();
    let client = node_client().await;
    let (_, _, targets) = gateway_endpoints(&client).await;
    let target: std::net::SocketAddr = targets[0].parse().expect("ip:port");
    let mut opened = Vec::new();
    for _ in 0..1030 {
        opened.push(
            tokio::net::TcpStream::connect(target)
                .await
                .expect("connect"),
        );
    }
    // The pod has accepted (or closed) them all well before its TLS handshake timeout (10 s).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut buf = [0u8; 1];
    let open = opened
        .iter()
        .filter(|c| matches!(c.try_read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock))
        .count();
    assert_eq!(open, 1024, "connections kept open from one address");
    drop(opened);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let again = tokio::net::TcpStream::connect(target)
        .await
        .expect("connect");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        matches!(again.try_read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "a freed place was not taken again (the pod waits for a TLS ClientHello)"
    );
}
