//! AdmissionReview round trips through [`Admission`], and property tests: arbitrary input never
//! panics, every answer keeps the request's uid, and no answer contains a key from the request.

use std::sync::Arc;

use proptest::prelude::*;
use serde_json::{Value, json};

use super::mutate::SidecarConfig;
use super::validate::{Admission, Mode, Outcome};

const UID: &str = "0c9a8d74-9cb7-44dd-b98e-09fd62def2f4";

fn key() -> String {
    format!("sk-ant-api03-{}AA", "P".repeat(93))
}

fn admission(mode: Mode) -> Admission {
    let claudekeys: Vec<(String, String)> = vec![("team-a".into(), "bot".into())];
    Admission {
        mode,
        sidecar: SidecarConfig {
            image: "claudekey:test".into(),
            ..SidecarConfig::default()
        },
        claudekeys: Arc::new(claudekeys),
    }
}

fn review(operation: &str, group: &str, kind: &str, object: Value) -> Vec<u8> {
    let version = "v1";
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": UID,
            "kind": {"group": group, "version": version, "kind": kind},
            "resource": {"group": group, "version": version, "resource": format!("{}s", kind.to_lowercase())},
            "name": object.pointer("/metadata/name").cloned().unwrap_or(json!("")),
            "namespace": "team-a",
            "operation": operation,
            "userInfo": {"username": "tester"},
            "object": object,
            "oldObject": null,
        }
    })
    .to_string()
    .into_bytes()
}

fn deployment(env_value: &str) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "team-a"},
        "spec": {"selector": {"matchLabels": {"a": "b"}}, "template": {"metadata": {"labels": {"a": "b"}}, "spec": {
            "containers": [{"name": "app", "image": "app:1", "env": [{"name": "ANTHROPIC_API_KEY", "value": env_value}]}]
        }}}
    })
}

fn inject_pod(claudekey: &str, env_value: Option<&str>) -> Value {
    let mut container = json!({"name": "app", "image": "app:1"});
    if let Some(v) = env_value {
        container["env"] = json!([{"name": "ANTHROPIC_API_KEY", "value": v}]);
    }
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "p", "namespace": "team-a", "annotations": {"claudekey.io/inject": claudekey}},
        "spec": {"containers": [container]}
    })
}

/// An UPDATE review of `kind` from `old` to `new`, for `sub_resource` when given.
fn update(kind: &str, old: Value, new: Value, sub_resource: Option<&str>) -> Vec<u8> {
    let mut r: Value = serde_json::from_slice(&review("UPDATE", "", kind, new)).unwrap();
    r["request"]["oldObject"] = old;
    if let Some(sub) = sub_resource {
        r["request"]["subResource"] = json!(sub);
    }
    r.to_string().into_bytes()
}

/// A pod injected with ClaudeKey bot by a webhook whose sidecar image was `image`.
fn injected_pod(image: &str) -> Value {
    let mut sidecar = serde_json::to_value(super::mutate::sidecar_container(&SidecarConfig {
        image: image.into(),
        ..SidecarConfig::default()
    }))
    .unwrap();
    sidecar["volumeMounts"] = json!([{"name": "claudekey-proxy-config", "mountPath": "/etc/claudekey/proxy", "readOnly": true}]);
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "p", "namespace": "team-a", "annotations": {"claudekey.io/inject": "bot", "claudekey.io/injected": "bot"}},
        "spec": {
            "initContainers": [sidecar],
            "containers": [{"name": "app", "image": "app:1", "env": [{"name": "ANTHROPIC_API_KEY", "value": "claudekey-sidecar"}]}],
            "volumes": [{"name": "claudekey-proxy-config", "secret": {"secretName": "bot-proxy"}}],
        }
    })
}

fn response(review: &kube::core::admission::AdmissionReview<kube::core::DynamicObject>) -> Value {
    serde_json::to_value(review).unwrap()["response"].clone()
}

#[test]
fn raw_key_is_denied_with_a_masked_message() {
    let (answer, outcome) = admission(Mode::Enforce).validate(&review(
        "CREATE",
        "apps",
        "Deployment",
        deployment(&key()),
    ));
    assert_eq!(outcome, Outcome::Denied);
    let r = response(&answer);
    assert_eq!(r["uid"], UID);
    assert_eq!(r["allowed"], false);
    let message = r["status"]["message"].as_str().unwrap();
    assert!(message.starts_with("claudekey: Deployment/web: container \"app\" env ANTHROPIC_API_KEY holds an Anthropic key (sk-ant-api03-…AA)"), "{message}");
    assert!(!answer_text(&answer).contains(&key()));
}

fn answer_text(
    review: &kube::core::admission::AdmissionReview<kube::core::DynamicObject>,
) -> String {
    serde_json::to_string(review).unwrap()
}

#[test]
fn clean_object_is_allowed_and_warn_mode_warns() {
    let (answer, outcome) = admission(Mode::Enforce).validate(&review(
        "CREATE",
        "apps",
        "Deployment",
        deployment("claudekey-sidecar"),
    ));
    assert_eq!(outcome, Outcome::Allowed);
    assert_eq!(response(&answer)["allowed"], true);

    let (answer, outcome) =
        admission(Mode::Warn).validate(&review("UPDATE", "apps", "Deployment", deployment(&key())));
    assert_eq!(outcome, Outcome::Warned);
    let r = response(&answer);
    assert_eq!(r["allowed"], true);
    let warning = r["warnings"][0].as_str().unwrap();
    assert!(
        warning.contains("ANTHROPIC_API_KEY") && !warning.contains(&key()),
        "{warning}"
    );
}

#[test]
fn garbage_is_invalid_and_delete_is_allowed() {
    let (answer, outcome) = admission(Mode::Enforce).validate(b"{not json");
    assert_eq!(outcome, Outcome::Invalid);
    assert_eq!(response(&answer)["allowed"], false);
    let (_, outcome) = admission(Mode::Enforce).validate(&review("DELETE", "", "Pod", Value::Null));
    assert_eq!(outcome, Outcome::Allowed);
}

#[test]
fn mutate_answers_with_a_base64_json_patch() {
    let (answer, outcome) =
        admission(Mode::Enforce).mutate(&review("CREATE", "", "Pod", inject_pod("bot", None)));
    assert_eq!(outcome, Outcome::Patched);
    let r = response(&answer);
    assert_eq!(r["patchType"], "JSONPatch");
    let bytes: Vec<u8> = serde_json::from_value(r["patch"].clone()).expect("patch bytes");
    let patch: json_patch::Patch = serde_json::from_slice(&bytes).expect("a JSON patch");
    let mut pod = inject_pod("bot", None);
    json_patch::patch(&mut pod, &patch).expect("applies");
    assert_eq!(pod["spec"]["initContainers"][0]["name"], "claudekey-proxy");
}

#[test]
fn mutate_refuses_missing_claudekeys_and_raw_keys() {
    let (answer, outcome) =
        admission(Mode::Enforce).mutate(&review("CREATE", "", "Pod", inject_pod("nope", None)));
    assert_eq!(outcome, Outcome::Denied);
    let message = response(&answer)["status"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        message.contains("ClaudeKey nope does not exist in namespace team-a"),
        "{message}"
    );

    let (answer, outcome) = admission(Mode::Enforce).mutate(&review(
        "CREATE",
        "",
        "Pod",
        inject_pod("bot", Some(&key())),
    ));
    assert_eq!(outcome, Outcome::Denied);
    assert!(!answer_text(&answer).contains(&key()));

    let (answer, outcome) =
        admission(Mode::Warn).mutate(&review("CREATE", "", "Pod", inject_pod("nope", None)));
    assert_eq!(outcome, Outcome::Warned);
    assert_eq!(response(&answer)["allowed"], true);
}

#[test]
fn mutate_leaves_other_pods_and_updates_alone() {
    let plain = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": [{"name": "a", "image": "a"}]}});
    let (_, outcome) = admission(Mode::Enforce).mutate(&review("CREATE", "", "Pod", plain));
    assert_eq!(outcome, Outcome::Allowed);
    let (_, outcome) =
        admission(Mode::Enforce).mutate(&review("UPDATE", "", "Pod", inject_pod("bot", None)));
    assert_eq!(outcome, Outcome::Allowed);
}

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        ".{0,20}".prop_map(Value::from),
        "sk-ant-(api03|oat01)-[A-Za-z0-9_-]{30,40}".prop_map(Value::from),
    ];
    let names = prop_oneof![
        Just("containers"),
        Just("initContainers"),
        Just("ephemeralContainers"),
        Just("env"),
        Just("name"),
        Just("value"),
        Just("valueFrom"),
        Just("args"),
        Just("command"),
        Just("volumes"),
        Just("hostNetwork"),
        Just("annotations"),
        Just("claudekey.io/inject"),
        Just("secretKeyRef"),
        Just("envFrom"),
        Just("image"),
    ]
    .prop_map(str::to_string);
    leaf.prop_recursive(5, 96, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::from),
            prop::collection::btree_map(names.clone(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn kinds() -> impl Strategy<Value = (&'static str, &'static str)> {
    prop_oneof![
        Just(("", "Pod")),
        Just(("apps", "Deployment")),
        Just(("apps", "StatefulSet")),
        Just(("apps", "DaemonSet")),
        Just(("apps", "ReplicaSet")),
        Just(("batch", "Job")),
        Just(("batch", "CronJob")),
        Just(("", "ConfigMap")),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..512)) {
        let a = admission(Mode::Enforce);
        let _ = a.validate(&body);
        let _ = a.mutate(&body);
    }

    #[test]
    fn arbitrary_objects_never_panic_or_leak(
        (group, kind) in kinds(),
        spec in arb_json(),
        op in prop_oneof![Just("CREATE"), Just("UPDATE"), Just("DELETE")],
        body in "[A-Za-z0-9_-]{32,40}",
        warn in any::<bool>(),
    ) {
        let key = format!("sk-ant-api03-{body}");
        let object = json!({
            "apiVersion": "v1", "kind": kind,
            "metadata": {"name": "x", "annotations": {"claudekey.io/inject": "bot"}},
            "spec": {"template": {"spec": spec.clone()}, "containers": [{"name": "a", "env": [{"name": "K", "value": key}]}]},
        });
        let a = admission(if warn { Mode::Warn } else { Mode::Enforce });
        for answer in [a.validate(&review(op, group, kind, object.clone())).0, a.mutate(&review(op, group, kind, object)).0] {
            let text = answer_text(&answer);
            prop_assert!(!text.contains(&body), "answer leaks a key: {}", text);
            let r = response(&answer);
            prop_assert!(r["uid"] == UID || r["allowed"] == false);
        }
    }

    #[test]
    fn arbitrary_pod_specs_never_panic(spec in arb_json()) {
        let object = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x", "annotations": {"claudekey.io/inject": "bot"}}, "spec": spec});
        let a = admission(Mode::Enforce);
        let _ = a.validate(&review("CREATE", "", "Pod", object.clone()));
        let _ = a.mutate(&review("CREATE", "", "Pod", object));
    }
}

#[test]
fn updates_of_pods_injected_by_an_older_webhook_are_admitted() {
    let a = admission(Mode::Enforce);
    let old = injected_pod("claudekey:old");
    // The current webhook would not exempt that sidecar on CREATE...
    let (_, outcome) = a.validate(&review("CREATE", "", "Pod", old.clone()));
    assert_eq!(outcome, Outcome::Denied);
    // ...but labels, owner references and finalizers of the running pod still change.
    let mut relabelled = old.clone();
    relabelled["metadata"]["labels"] = json!({"rollout": "2"});
    relabelled["metadata"]["ownerReferences"] =
        json!([{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "rs", "uid": "u-1"}]);
    let (answer, outcome) = a.validate(&update("Pod", old.clone(), relabelled, None));
    assert_eq!(outcome, Outcome::Allowed, "{}", answer_text(&answer));
    // Pointing the old sidecar at another image is judged afresh.
    let mut swapped = old.clone();
    swapped["spec"]["initContainers"][0]["image"] = json!("evil:1");
    let (answer, outcome) = a.validate(&update("Pod", old.clone(), swapped, None));
    assert_eq!(outcome, Outcome::Denied);
    assert!(
        answer_text(&answer).contains("bot-proxy"),
        "{}",
        answer_text(&answer)
    );
    // The current sidecar needs no such allowance.
    let current = injected_pod("claudekey:test");
    let (_, outcome) = a.validate(&review("CREATE", "", "Pod", current));
    assert_eq!(outcome, Outcome::Allowed);
}

#[test]
fn ephemeral_containers_are_judged_like_any_other() {
    let a = admission(Mode::Enforce);
    let old = injected_pod("claudekey:test");
    let with = |debugger: Value| {
        let mut new = old.clone();
        new["spec"]["ephemeralContainers"] = json!([debugger]);
        update("Pod", old.clone(), new, Some("ephemeralcontainers"))
    };
    let bad = [
        json!({"name": "dbg", "image": "busybox", "volumeMounts": [{"name": "claudekey-proxy-config", "mountPath": "/x"}]}),
        json!({"name": "dbg", "image": "busybox", "targetContainerName": "claudekey-proxy"}),
        json!({"name": "dbg", "image": "busybox", "env": [{"name": "K", "value": key()}]}),
        json!({"name": "dbg", "image": "busybox", "envFrom": [{"secretRef": {"name": "bot-proxy"}}]}),
    ];
    for debugger in bad {
        let (answer, outcome) = a.validate(&with(debugger.clone()));
        assert_eq!(outcome, Outcome::Denied, "{debugger}");
        let text = answer_text(&answer);
        assert!(
            text.contains("ephemeral container") && text.contains("dbg"),
            "{text}"
        );
        assert!(!text.contains(&key()), "{text}");
    }
    let good = json!({"name": "dbg", "image": "busybox", "targetContainerName": "app"});
    let (answer, outcome) = a.validate(&with(good));
    assert_eq!(outcome, Outcome::Allowed, "{}", answer_text(&answer));
}

#[test]
fn configmaps_and_federation_conflicts_are_denied() {
    let a = admission(Mode::Enforce);
    let cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg", "namespace": "team-a"}, "data": {"k": key()}});
    let (answer, outcome) = a.validate(&review("CREATE", "", "ConfigMap", cm));
    assert_eq!(outcome, Outcome::Denied);
    assert!(answer_text(&answer).contains("ConfigMap/cfg: data.k holds an Anthropic key"));
    assert!(!answer_text(&answer).contains(&key()));
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "team-a"}, "spec": {"containers": [{"name": "app", "image": "a", "env": [
        {"name": "ANTHROPIC_IDENTITY_TOKEN_FILE", "value": "/var/run/secrets/anthropic/token"},
        {"name": "ANTHROPIC_AUTH_TOKEN", "value": ""},
    ]}]}});
    let (answer, outcome) = a.validate(&review("CREATE", "", "Pod", pod));
    assert_eq!(outcome, Outcome::Denied);
    assert!(
        answer_text(&answer).contains("env ANTHROPIC_AUTH_TOKEN is set (even empty"),
        "{}",
        answer_text(&answer)
    );
}

#[test]
fn injection_next_to_a_federation_token_file_is_refused_before_the_patch() {
    let mut pod = inject_pod("bot", None);
    pod["spec"]["containers"][0]["env"] = json!([{"name": "ANTHROPIC_IDENTITY_TOKEN_FILE", "value": "/var/run/secrets/anthropic/token"}]);
    let (answer, outcome) = admission(Mode::Enforce).mutate(&review("CREATE", "", "Pod", pod));
    assert_eq!(outcome, Outcome::Denied);
    let text = answer_text(&answer);
    assert!(
        text.contains("sets ANTHROPIC_IDENTITY_TOKEN_FILE in a pod with claudekey.io/inject: bot"),
        "{text}"
    );
    assert!(!text.contains("\"patch\""), "{text}");
}
