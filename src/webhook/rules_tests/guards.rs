//! Bad and good twins of the guards around injected pods (DESIGN.md §10) in every kind that
//! embeds a pod template, ephemeral containers that target the sidecar, and ConfigMaps.

use serde_json::{Value, json};

use super::cases::{KINDS, good, key};
use super::workload;
use crate::webhook::rules::{self, Context, RuleId, Workload};

/// A pod (or template) with `annotations` and pod-level `settings`.
fn pod_with(kind: &str, annotations: Value, settings: Value, containers: Value) -> Workload {
    let case = good("base", json!({}));
    let w = workload(kind, "containers", &case);
    let mut v = match &w {
        Workload::Pod(p) => serde_json::to_value(p),
        Workload::Deployment(d) => serde_json::to_value(d),
        Workload::StatefulSet(d) => serde_json::to_value(d),
        Workload::DaemonSet(d) => serde_json::to_value(d),
        Workload::ReplicaSet(d) => serde_json::to_value(d),
        Workload::Job(d) => serde_json::to_value(d),
        Workload::CronJob(d) => serde_json::to_value(d),
        Workload::PodTemplate(d) => serde_json::to_value(d),
        Workload::ReplicationController(d) => serde_json::to_value(d),
        Workload::ConfigMap(d) => serde_json::to_value(d),
    }
    .unwrap();
    v["kind"] = json!(kind);
    v["apiVersion"] = json!(match kind {
        "Pod" | "PodTemplate" | "ReplicationController" => "v1",
        "Job" | "CronJob" => "batch/v1",
        _ => "apps/v1",
    });
    let (_, _, path) = w.pod_at().expect("pod spec");
    let pointer = format!("/{}", path.replace('.', "/"));
    let meta_pointer = if kind == "Pod" {
        "/metadata".to_string()
    } else {
        pointer.trim_end_matches("/spec").to_string() + "/metadata"
    };
    v.pointer_mut(&meta_pointer).expect("metadata")["annotations"] = annotations;
    let spec = v.pointer_mut(&pointer).expect("spec");
    for (k, val) in settings.as_object().unwrap() {
        spec[k] = val.clone();
    }
    if !containers.is_null() {
        spec["containers"] = containers;
    }
    Workload::from_manifest(v).unwrap().unwrap()
}

fn check(w: &Workload) -> Vec<rules::Finding> {
    let claudekeys = vec!["bot".to_string()];
    rules::check(
        w,
        &Context {
            claudekeys: &claudekeys,
            sidecar: None,
        },
    )
}

#[test]
fn injection_preconditions_in_every_kind() {
    let inject = json!({"claudekey.io/inject": "bot"});
    let bad: Vec<(&str, Value, Value, Value, &str)> = vec![
        (
            "hostPID",
            inject.clone(),
            json!({"hostPID": true}),
            Value::Null,
            "hostPID",
        ),
        (
            "shared PID namespace",
            inject.clone(),
            json!({"shareProcessNamespace": true}),
            Value::Null,
            "shareProcessNamespace",
        ),
        (
            "hostNetwork",
            inject.clone(),
            json!({"hostNetwork": true}),
            Value::Null,
            "hostNetwork",
        ),
        (
            "empty annotation",
            json!({"claudekey.io/inject": " "}),
            json!({}),
            Value::Null,
            "is empty",
        ),
        (
            "container named like the sidecar",
            inject.clone(),
            json!({}),
            json!([{"name": "claudekey-proxy", "image": "x"}]),
            "claudekey-proxy",
        ),
        (
            "volume named like the proxy volume",
            inject.clone(),
            json!({"volumes": [{"name": "claudekey-proxy-config", "emptyDir": {}}]}),
            Value::Null,
            "claudekey-proxy-config",
        ),
        (
            "federation token file in an injected pod",
            inject.clone(),
            json!({}),
            json!([{"name": "app", "image": "x", "env": [{"name": "ANTHROPIC_IDENTITY_TOKEN_FILE", "value": "/t"}]}]),
            "ANTHROPIC_IDENTITY_TOKEN_FILE",
        ),
        // Claims to be injected already: the mutating webhook skips it, the guard does not.
        (
            "already-injected claim with a shared PID namespace",
            json!({"claudekey.io/inject": "bot", "claudekey.io/injected": "bot"}),
            json!({"shareProcessNamespace": true}),
            Value::Null,
            "shareProcessNamespace",
        ),
    ];
    let good: Vec<(&str, Value, Value, Value)> = vec![
        (
            "hostPID without injection",
            json!({}),
            json!({"hostPID": true}),
            Value::Null,
        ),
        (
            "shared PID namespace without injection",
            json!({"other": "x"}),
            json!({"shareProcessNamespace": true}),
            Value::Null,
        ),
        (
            "injection with the settings false",
            inject.clone(),
            json!({"hostPID": false, "shareProcessNamespace": false, "hostNetwork": false}),
            Value::Null,
        ),
        (
            "sidecar-named container without injection",
            json!({}),
            json!({}),
            json!([{"name": "claudekey-proxy", "image": "x"}]),
        ),
        (
            "federation token file without injection",
            json!({}),
            json!({}),
            json!([{"name": "app", "image": "x", "env": [{"name": "ANTHROPIC_IDENTITY_TOKEN_FILE", "value": "/t"}]}]),
        ),
        (
            "proxy volume in an already-injected pod",
            json!({"claudekey.io/inject": "bot", "claudekey.io/injected": "bot"}),
            json!({"volumes": [{"name": "claudekey-proxy-config", "secret": {"secretName": "bot-proxy"}}]}),
            Value::Null,
        ),
    ];
    for kind in KINDS {
        for (name, annotations, settings, containers, says) in &bad {
            let w = pod_with(
                kind,
                annotations.clone(),
                settings.clone(),
                containers.clone(),
            );
            let findings = check(&w);
            assert_eq!(findings.len(), 1, "{name} in {kind}: {findings:#?}");
            let f = &findings[0];
            assert_eq!(f.rule, RuleId::InjectionPrecondition, "{name} in {kind}");
            assert!(
                f.message.starts_with(&format!("{kind}/demo: ")),
                "{}",
                f.message
            );
            assert!(f.message.contains(says), "{name} in {kind}: {}", f.message);
        }
        for (name, annotations, settings, containers) in &good {
            let w = pod_with(
                kind,
                annotations.clone(),
                settings.clone(),
                containers.clone(),
            );
            assert!(check(&w).is_empty(), "{name} in {kind}: {:#?}", check(&w));
        }
    }
    assert_eq!(
        crate::webhook::preconditions::PROXY_VOLUME,
        crate::webhook::mutate::PROXY_VOLUME
    );
}

#[test]
fn ephemeral_containers_may_not_join_the_sidecar() {
    let pod = |target: &str| {
        let v = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {
            "containers": [{"name": "app", "image": "a"}],
            "ephemeralContainers": [{"name": "debugger", "image": "busybox", "targetContainerName": target}],
        }});
        Workload::from_manifest(v).unwrap().unwrap()
    };
    let findings = check(&pod("claudekey-proxy"));
    assert_eq!(findings.len(), 1, "{findings:#?}");
    assert_eq!(findings[0].rule, RuleId::TargetsSidecar);
    assert!(
        findings[0]
            .message
            .contains("ephemeral container \"debugger\" targetContainerName")
    );
    assert!(check(&pod("app")).is_empty(), "debugging the app is fine");
}

#[test]
fn the_injected_claudekey_is_protected_even_when_unknown() {
    let v = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "annotations": {"claudekey.io/inject": "gone", "claudekey.io/injected": "gone"}}, "spec": {
        "containers": [{"name": "app", "image": "a"}],
        "ephemeralContainers": [{"name": "debugger", "image": "busybox", "volumeMounts": [{"name": "claudekey-proxy-config", "mountPath": "/x"}]}],
        "volumes": [{"name": "claudekey-proxy-config", "secret": {"secretName": "gone-proxy"}}],
    }});
    let findings = check(&Workload::from_manifest(v).unwrap().unwrap());
    assert_eq!(findings.len(), 1, "{findings:#?}");
    assert_eq!(findings[0].rule, RuleId::ProxySecretReference);
}

fn configmap(data: Value, binary: Value) -> Workload {
    let v = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"}, "data": data, "binaryData": binary});
    Workload::from_manifest(v).unwrap().unwrap()
}

#[test]
fn configmaps_with_keys_are_found_and_twins_are_clean() {
    use base64::Engine as _;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let api = key("api03");
    let bad = [
        ("raw key", json!({"key": api}), json!({}), "data.key"),
        (
            "oauth token",
            json!({"t": key("oat01")}),
            json!({}),
            "data.t",
        ),
        (
            "key in a file",
            json!({"app.yaml": format!("anthropic:\n  apiKey: {api}\n")}),
            json!({}),
            "data[\"app.yaml\"]",
        ),
        (
            "key in binaryData",
            json!({}),
            json!({"blob": b64(&format!("k={api}"))}),
            "binaryData.blob",
        ),
        (
            "key as a map key",
            json!({api.clone(): "x"}),
            json!({}),
            "data[<sk-ant-api03-…AA>]",
        ),
    ];
    for (name, data, binary, field) in bad {
        let findings = check(&configmap(data, binary));
        assert_eq!(findings.len(), 1, "{name}: {findings:#?}");
        let f = &findings[0];
        assert_eq!(f.rule, RuleId::KeyInConfigMap, "{name}");
        assert_eq!(f.field, field, "{name}");
        assert!(f.message.starts_with("ConfigMap/cfg: "), "{}", f.message);
        assert!(
            !f.message.contains(&api) && !f.message.contains(&key("oat01")),
            "{name}: {}",
            f.message
        );
        assert!(f.message.contains("claudekey.io/inject"), "{name}");
    }
    let good = [
        (
            "prose",
            json!({"README": "keys start with sk-ant-api03-…"}),
            json!({}),
        ),
        (
            "truncated example",
            json!({"example": "sk-ant-api03-xxxx"}),
            json!({}),
        ),
        (
            "base URL",
            json!({"ANTHROPIC_BASE_URL": "http://127.0.0.1:8484"}),
            json!({}),
        ),
        (
            "ordinary binary",
            json!({}),
            json!({"blob": b64("just some bytes, nothing secret here at all, really")}),
        ),
    ];
    for (name, data, binary) in good {
        assert!(check(&configmap(data, binary)).is_empty(), "{name}");
    }
}
