//! The guards around injected pods (DESIGN.md §10, issue 15) through the real apiserver, with
//! the chart's rendered webhook configurations: shared process namespaces, `kubectl debug`,
//! pods injected by an older webhook, federation conflicts, and every kind with a key.

use tokio::process::Command;

use k8s_openapi::api::core::v1::{ConfigMap, Pod, PodTemplate, ReplicationController};
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use super::{Harness, Mode, WAIT, denial, inject_pod, raw_key, support};

fn pod(value: Value) -> Pod {
    serde_json::from_value(value).expect("pod")
}

/// Waits until the webhook's cache knows ClaudeKey bot, by creating an injected pod `name`.
async fn injected(h: &Harness, name: &str) -> Pod {
    let pods = h.pods();
    let name = name.to_string();
    support::eventually(WAIT, "the webhook cache to see ClaudeKey bot", || {
        let pods = pods.clone();
        let name = name.clone();
        async move {
            pods.create(&PostParams::default(), &inject_pod(&name, "bot"))
                .await
                .ok()
        }
    })
    .await
}

/// `kubectl debug` as users run it, against the test control plane (asynchronously: the
/// webhook it ends up calling runs on this test's runtime).
async fn kubectl_debug(h: &Harness, pod: &str, extra: &[&str]) -> std::process::Output {
    let kubectl = std::env::var("CLAUDEKEY_TEST_KUBECTL").unwrap_or_else(|_| {
        panic!("CLAUDEKEY_TEST_KUBECTL is not set: source the control plane's env file")
    });
    let kubeconfig = std::env::var(support::KUBECONFIG_ENV).expect("kubeconfig");
    Command::new(kubectl)
        .args([
            "--kubeconfig",
            &kubeconfig,
            "-n",
            &h.namespace,
            "debug",
            pod,
        ])
        .args(["--image=busybox:1.36", "--attach=false", "--stdin=false"])
        .args(["--profile=general"])
        .args(extra)
        .output()
        .await
        .expect("run kubectl debug")
}

#[tokio::test]
async fn guards_around_injected_pods_hold_through_the_apiserver() {
    let h = Harness::start(Mode::Enforce, "wh-guards").await;
    let pp = PostParams::default();
    h.create_claudekey("bot", Some("namespace")).await;
    injected(&h, "target").await;

    // Shared PID namespaces expose the proxy's /proc/<pid>/root: refused, twins admitted.
    for setting in ["shareProcessNamespace", "hostPID"] {
        let bad = pod(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("bad-{}", setting.to_lowercase()), "annotations": {"claudekey.io/inject": "bot"}},
            "spec": {setting: true, "containers": [{"name": "a", "image": "x"}]}
        }));
        let message = denial(h.pods().create(&pp, &bad).await);
        assert!(message.contains(&format!("{setting}: true")), "{message}");
        assert!(message.contains("/proc"), "{message}");
        let twin = pod(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("good-{}", setting.to_lowercase())},
            "spec": {setting: true, "containers": [{"name": "a", "image": "x"}]}
        }));
        h.pods()
            .create(&pp, &twin)
            .await
            .unwrap_or_else(|e| panic!("{setting} without injection is admitted: {e}"));
    }

    // kubectl debug patches pods/ephemeralcontainers: joining the proxy is refused...
    let out = kubectl_debug(&h, "target", &["--target=claudekey-proxy"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "kubectl debug --target=claudekey-proxy was admitted"
    );
    assert!(
        stderr.contains("claudekey:") && stderr.contains("targetContainerName"),
        "{stderr}"
    );
    // ...and so is mounting the proxy's Secret volume...
    let custom = h.dir.path().join("debug.json");
    std::fs::write(
        &custom,
        r#"{"volumeMounts": [{"name": "claudekey-proxy-config", "mountPath": "/stolen"}]}"#,
    )
    .expect("write custom");
    let custom_flag = format!("--custom={}", custom.display());
    let out = kubectl_debug(&h, "target", &[&custom_flag]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a debugger mounting the proxy Secret was admitted"
    );
    assert!(stderr.contains("mounts Secret bot-proxy"), "{stderr}");
    // ...while debugging the app container is fine.
    let out = kubectl_debug(&h, "target", &["--target=app"]).await;
    assert!(
        out.status.success(),
        "kubectl debug --target=app: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A token file with a (even empty) key variable beside it: refused; alone: admitted.
    let federated = |name: &str, with_key: bool| {
        let mut env = vec![
            json!({"name": "ANTHROPIC_IDENTITY_TOKEN_FILE", "value": "/var/run/secrets/anthropic/token"}),
        ];
        if with_key {
            env.push(json!({"name": "ANTHROPIC_API_KEY", "value": ""}));
        }
        pod(
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"containers": [{"name": "a", "image": "x", "env": env}]}}),
        )
    };
    let message = denial(h.pods().create(&pp, &federated("fed-bad", true)).await);
    assert!(
        message.contains("env ANTHROPIC_API_KEY is set (even empty"),
        "{message}"
    );
    h.pods()
        .create(&pp, &federated("fed-good", false))
        .await
        .expect("a token file alone is admitted");

    // Every kind with a pod template, and ConfigMaps.
    let ns = h.namespace.clone();
    let template = json!({"spec": {"containers": [{"name": "a", "image": "x", "env": [{"name": "T", "value": raw_key()}]}]}});
    let pt: PodTemplate = serde_json::from_value(
        json!({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "pt"}, "template": template}),
    )
    .expect("PodTemplate");
    let message = denial(
        Api::<PodTemplate>::namespaced(h.client.clone(), &ns)
            .create(&pp, &pt)
            .await,
    );
    assert!(
        message.contains("PodTemplate/pt: container \"a\" env T holds an Anthropic key"),
        "{message}"
    );
    let mut rc_template = template.clone();
    rc_template["metadata"] = json!({"labels": {"app": "rc"}});
    let rc: ReplicationController =
        serde_json::from_value(json!({"apiVersion": "v1", "kind": "ReplicationController",
        "metadata": {"name": "rc"}, "spec": {"selector": {"app": "rc"}, "template": rc_template}}))
        .expect("RC");
    let message = denial(
        Api::<ReplicationController>::namespaced(h.client.clone(), &ns)
            .create(&pp, &rc)
            .await,
    );
    assert!(message.contains("ReplicationController/rc:"), "{message}");
    let cms = Api::<ConfigMap>::namespaced(h.client.clone(), &ns);
    let cm = |name: &str, value: String| -> ConfigMap {
        serde_json::from_value(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": {"app.yaml": value}}))
            .expect("ConfigMap")
    };
    let message = denial(
        cms.create(&pp, &cm("leaky", format!("apiKey: {}\n", raw_key())))
            .await,
    );
    assert!(
        message.contains("ConfigMap/leaky: data[\"app.yaml\"] holds an Anthropic key"),
        "{message}"
    );
    assert!(!message.contains(&raw_key()));
    cms.create(&pp, &cm("clean", "apiKeyFile: /var/run/key\n".to_string()))
        .await
        .expect("a clean ConfigMap is admitted");
    h.cleanup().await;
}

/// A pod injected by an older webhook image (its sidecar differs from today's) stays
/// updatable after an upgrade: labels and owner references change; its sidecar cannot.
#[tokio::test]
async fn pods_injected_by_an_older_webhook_stay_updatable() {
    let h = Harness::start(Mode::Enforce, "wh-upgrade").await;
    h.create_claudekey("bot", Some("namespace")).await;
    let current = injected(&h, "current").await;
    // What the previous release injected: the same pod with another sidecar image.
    let mut legacy = serde_json::to_value(&current).expect("json");
    legacy["metadata"] = json!({"name": "legacy", "annotations": current.metadata.annotations});
    legacy["spec"]["initContainers"][0]["image"] = json!("registry.example/claudekey:previous");
    legacy.as_object_mut().expect("object").remove("status");
    let legacy: Pod = serde_json::from_value(legacy).expect("pod");
    // Created while no webhook was registered, as it was before the upgrade.
    h.unregister().await;
    h.pods()
        .create(&PostParams::default(), &legacy)
        .await
        .expect("create the legacy pod");
    h.register(&h.ca_pem).await;
    h.wait_until_called().await;

    // An owner that exists, so the garbage collector leaves the pod alone.
    let owner: ConfigMap = serde_json::from_value(
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "owner"}}),
    )
    .expect("ConfigMap");
    let owner = Api::<ConfigMap>::namespaced(h.client.clone(), &h.namespace)
        .create(&PostParams::default(), &owner)
        .await
        .expect("create owner");
    let pp = PatchParams::default();
    let relabel = json!({"metadata": {"labels": {"rollout": "2"}, "ownerReferences": [
        {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid}
    ]}});
    h.pods()
        .patch("legacy", &pp, &Patch::Merge(&relabel))
        .await
        .expect("labels and owner references of a legacy pod still change");
    let swap = json!({"spec": {"initContainers": [{"name": "claudekey-proxy", "image": "evil.example/proxy:1"}]}});
    let message = denial(
        h.pods()
            .patch("legacy", &pp, &Patch::Strategic(&swap))
            .await,
    );
    assert!(
        message.contains("init container \"claudekey-proxy\"") && message.contains("bot-proxy"),
        "{message}"
    );
    h.cleanup().await;
}
