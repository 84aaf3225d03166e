//! What keeps the upstream key away from the app on real pods (DESIGN.md §10): a pod that would
//! share its process namespace with the sidecar is refused, and in an injected pod the app sees
//! neither the proxy's process nor its mounted config.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::PostParams;

use super::fixture::{installed, node_client};
use super::manifests::app_pod;
use super::{logs, namespace, ready_claudekey};
use crate::support::eventually;

/// Looks everywhere the app could find the proxy's config or key: every process it can see
/// (cmdline, environ, root filesystem), and the proxy's mount path in its own filesystem.
const SNOOP: &str = r#"
import os
me = os.getpid()
pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
for pid in pids:
    try:
        cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")[0].decode(errors="replace")
    except OSError:
        cmd = "?"
    print("PROC", pid, cmd, flush=True)
paths = ["/etc/claudekey/proxy/proxy.json", "/etc/claudekey"]
paths += [f"/proc/{pid}/root/etc/claudekey/proxy/proxy.json" for pid in pids]
paths += [f"/proc/{pid}/environ" for pid in pids]
for path in paths:
    try:
        data = open(path, "rb").read() if not os.path.isdir(path) else str(os.listdir(path)).encode()
    except OSError:
        continue
    if path.endswith("proxy.json") or path == "/etc/claudekey" or b"sk-ant-" in data:
        print("FOUND", path, flush=True)
print("DONE", flush=True)
"#;

#[tokio::test]
#[ignore = "node tier: needs a real node (CLAUDEKEY_NODE=1 hack/control-plane.sh start); hack/test.sh runs it"]
async fn a_shared_process_namespace_is_refused_and_the_app_cannot_reach_the_sidecars_config() {
    let fx = installed();
    let client = node_client().await;
    let ns = namespace(&client, "node-isolation").await;
    let upstream_key = fx.new_upstream_key();
    ready_claudekey(&client, &ns, "bot", &upstream_key, "20s").await;
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);

    let mut shared = app_pod("shared", "bot", "pass", "Never");
    shared.spec.as_mut().expect("spec").share_process_namespace = Some(true);
    let refused = pods
        .create(&PostParams::default(), &shared)
        .await
        .expect_err("a shareProcessNamespace pod asking for the sidecar is refused");
    let message = refused.to_string();
    assert!(
        message.contains("shareProcessNamespace") && message.contains("claudekey.io"),
        "{message}"
    );
    assert!(pods.get_opt("shared").await.expect("get").is_none());

    // The same app without it: injected, and from inside the app container nothing of the
    // proxy is visible.
    pods.create(
        &PostParams::default(),
        &app_pod("snoop", "bot", SNOOP, "Never"),
    )
    .await
    .expect("create the snooping app pod");
    eventually(
        Duration::from_secs(90),
        "the snooping app to finish",
        || async {
            let phase = pods.get("snoop").await.ok()?.status?.phase?;
            (phase == "Succeeded" || phase == "Failed").then_some(())
        },
    )
    .await;
    let out = logs(&client, &ns, "snoop", "app").await;
    assert!(out.contains("DONE"), "{out}");
    assert!(
        !out.contains("FOUND"),
        "the app reached the proxy's config:\n{out}"
    );
    assert!(!out.contains(&upstream_key));
    let procs: Vec<&str> = out.lines().filter(|l| l.starts_with("PROC ")).collect();
    assert!(!procs.is_empty(), "{out}");
    assert!(
        procs.iter().all(|l| !l.contains("claudekey")),
        "the app sees the proxy's process: {procs:#?}"
    );
}
