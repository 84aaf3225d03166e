//! Every object the node tests create. The ClaudeKey manifests are all in [`claudekey`] and
//! [`upstream_secret`], so an API version change touches only this file.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Secret};

use claudekey::crd::{ClaudeKey, ClusterClaudeKeySource};

/// An upstream key in the operator namespace, for the kubernetesSecret source.
pub fn upstream_secret(name: &str, key: &str) -> Secret {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": name,
            "namespace": super::fixture::OPERATOR_NS,
            "labels": { "claudekey.io/upstream-key": "true" }
        },
        "stringData": { "api-key": key }
    }))
    .expect("Secret")
}

/// The ClusterClaudeKeySource `{ns}.{name}` on the upstream Secret `secret` (key `api-key`),
/// granted to `ns` only, with `placement` namespace (the direct sidecar) or gateway (the
/// forwarder sidecar in front of the chart's TLS gateway).
pub fn cluster_source(
    ns: &str,
    name: &str,
    secret: &str,
    placement: &str,
) -> ClusterClaudeKeySource {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "claudekey.io/v1alpha2",
        "kind": "ClusterClaudeKeySource",
        "metadata": { "name": format!("{ns}.{name}") },
        "spec": {
            "kubernetesSecret": { "name": secret, "key": "api-key" },
            "refreshInterval": "10s",
            "allowedNamespaces": { "names": [ns] },
            "placement": placement
        }
    }))
    .expect("ClusterClaudeKeySource")
}

/// The ClusterClaudeKeySource `{ns}.{name}` of workload identity federation (DESIGN.md §11),
/// placement namespace, granted to `ns` only: no upstream key anywhere, the injected sidecar
/// exchanges its pod's projected token under `rule` (ids of the fake's rule).
pub fn federation_source(
    ns: &str,
    name: &str,
    (organization, service_account, rule): (&str, &str, &str),
    audience: &str,
    token_seconds: i64,
) -> ClusterClaudeKeySource {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "claudekey.io/v1alpha2",
        "kind": "ClusterClaudeKeySource",
        "metadata": { "name": format!("{ns}.{name}") },
        "spec": {
            "workloadIdentityFederation": {
                "organizationId": organization,
                "serviceAccountId": service_account,
                "federationRuleId": rule,
                "audience": audience,
                "tokenExpirationSeconds": token_seconds
            },
            "allowedNamespaces": { "names": [ns] },
            "placement": "namespace"
        }
    }))
    .expect("ClusterClaudeKeySource")
}

/// A ClaudeKey on the source of [`cluster_source`].
pub fn claudekey(ns: &str, name: &str, grace: &str) -> ClaudeKey {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "claudekey.io/v1alpha2",
        "kind": "ClaudeKey",
        "metadata": { "name": name, "namespace": ns },
        "spec": {
            "sourceRef": { "kind": "ClusterClaudeKeySource", "name": format!("{ns}.{name}") },
            "scope": { "models": ["claude-haiku-*"], "endpoints": ["messages"] },
            "rotation": { "interval": "2160h", "gracePeriod": grace }
        }
    }))
    .expect("ClaudeKey")
}

/// [`claudekey`] with `spec.limits`.
pub fn limited_claudekey(ns: &str, name: &str, limits: serde_json::Value) -> ClaudeKey {
    let mut ck = claudekey(ns, name, "20s");
    ck.spec.limits = serde_json::from_value(limits).expect("limits");
    ck
}

/// The hardened pod securityContext every app pod uses.
fn pod_security() -> serde_json::Value {
    serde_json::json!({
        "runAsNonRoot": true,
        "runAsUser": 1000,
        "runAsGroup": 1000,
        "seccompProfile": { "type": "RuntimeDefault" }
    })
}

fn container_security() -> serde_json::Value {
    serde_json::json!({
        "allowPrivilegeEscalation": false,
        "readOnlyRootFilesystem": true,
        "capabilities": { "drop": ["ALL"] }
    })
}

fn app_image() -> String {
    std::env::var("CLAUDEKEY_TEST_APP_IMAGE")
        .expect("CLAUDEKEY_TEST_APP_IMAGE (hack/node.sh's env file)")
}

/// A pod running `script` with the SDK image, annotated for sidecar injection of `claudekey`.
pub fn app_pod(name: &str, claudekey: &str, script: &str, restart: &str) -> Pod {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": name, "annotations": { "claudekey.io/inject": claudekey } },
        "spec": {
            "restartPolicy": restart,
            "terminationGracePeriodSeconds": 1,
            "securityContext": pod_security(),
            "containers": [{
                "name": "app",
                "image": app_image(),
                "imagePullPolicy": "Never",
                "args": ["-c", script],
                "securityContext": container_security()
            }]
        }
    }))
    .expect("Pod")
}

/// A Deployment reading the workload key from `<claudekey>-client` in its env, marked
/// `claudekey.io/consumes` so the controller rolls it when the key changes.
pub fn consumer_deployment(name: &str, claudekey: &str) -> Deployment {
    let client = format!("{claudekey}-client");
    serde_json::from_value(serde_json::json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": { "name": name },
        "spec": {
            "replicas": 1,
            "revisionHistoryLimit": 10,
            "selector": { "matchLabels": { "app": name } },
            "template": {
                "metadata": {
                    "labels": { "app": name },
                    "annotations": { "claudekey.io/consumes": claudekey }
                },
                "spec": {
                    "terminationGracePeriodSeconds": 1,
                    "securityContext": pod_security(),
                    "containers": [{
                        "name": "consumer",
                        "image": app_image(),
                        "imagePullPolicy": "Never",
                        "args": ["-c", "import time\nwhile True: time.sleep(3600)"],
                        "env": [{
                            "name": "ANTHROPIC_API_KEY",
                            "valueFrom": { "secretKeyRef": { "name": client, "key": "ANTHROPIC_API_KEY" } }
                        }],
                        "securityContext": container_security()
                    }]
                }
            }
        }
    }))
    .expect("Deployment")
}
