//! Day 2 on the real node (issue 20): `helm test` of the release installed from the packaged
//! chart and the built image, its hook running `claudekey self-check` from that same image.

use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::Api;

use claudekey::crd::{ClaudeKey, ClusterClaudeKeySource};

use super::fixture::{OPERATOR_NS, RELEASE, diagnostics, installed, node_client};
use crate::support::eventually;

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set: source the node's env file"))
}

#[tokio::test]
#[ignore = "node tier: needs a real node (CLAUDEKEY_NODE=1 hack/control-plane.sh start); hack/test.sh runs it"]
async fn helm_test_passes_running_the_claudekey_image_itself() {
    installed();
    let client = node_client().await;
    let hook = format!("{RELEASE}-helm-test");
    let out = Command::new(env("CLAUDEKEY_TEST_HELM"))
        .args(["test", RELEASE, "-n", OPERATOR_NS, "--timeout", "180s"])
        .args(["--kubeconfig", &env("CLAUDEKEY_TEST_KUBECONFIG")])
        .output()
        .expect("run helm test");
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // A failed hook Pod is kept: its log says which check failed.
        let log = Api::<Pod>::namespaced(client.clone(), OPERATOR_NS)
            .logs(&hook, &Default::default())
            .await
            .unwrap_or_else(|e| format!("(no log: {e})"));
        panic!(
            "helm test failed:\n{stdout}\n{}\nhook log:\n{log}\n{}",
            String::from_utf8_lossy(&out.stderr),
            diagnostics()
        );
    }
    assert!(
        stdout.contains(&format!("TEST SUITE:     {hook}"))
            && stdout.contains("Phase:          Succeeded"),
        "{stdout}"
    );
    // hook-succeeded: the throwaway ClaudeKey, its source and the Pod are removed again.
    eventually(
        Duration::from_secs(60),
        "the test's objects removed",
        || async {
            let gone = Api::<ClaudeKey>::namespaced(client.clone(), OPERATOR_NS)
                .get_opt(&hook)
                .await
                .ok()?
                .is_none()
                && Api::<ClusterClaudeKeySource>::all(client.clone())
                    .get_opt(&hook)
                    .await
                    .ok()?
                    .is_none()
                && Api::<Pod>::namespaced(client.clone(), OPERATOR_NS)
                    .get_opt(&hook)
                    .await
                    .ok()?
                    .is_none();
            gone.then_some(())
        },
    )
    .await;
}
