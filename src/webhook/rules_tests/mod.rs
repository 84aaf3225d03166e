//! Table tests of the rule engine: every bad and good container snippet is checked in every
//! container list of every workload kind, and no message may contain the offending value.

mod cases;
mod good;
mod guards;

use serde_json::{Value, json};

use crate::webhook::mutate::{SidecarConfig, sidecar_container};
use crate::webhook::rules::{self, Context, RuleId, Workload};
use cases::*;
use good::good_cases;

fn workload(kind: &str, list: &str, case: &Case) -> Workload {
    let mut container = case.container.clone();
    container
        .as_object_mut()
        .expect("container snippets are objects")
        .entry("name")
        .or_insert(json!("c"));
    container
        .as_object_mut()
        .expect("object")
        .entry("image")
        .or_insert(json!("app:1"));
    let mut spec =
        json!({"containers": [{"name": "main", "image": "app:1"}], "volumes": case.volumes});
    if list == "containers" {
        spec["containers"] = json!([container]);
    } else {
        spec[list] = json!([container]);
    }
    let selector = json!({"matchLabels": {"app": "demo"}});
    let template = json!({"metadata": {"labels": {"app": "demo"}}, "spec": spec});
    if kind == "PodTemplate" {
        let manifest = json!({"apiVersion": "v1", "kind": kind, "metadata": {"name": "demo", "namespace": "team-a"}, "template": template});
        return Workload::from_manifest(manifest)
            .expect("manifest parses")
            .expect("kind is covered");
    }
    let (api_version, spec) = match kind {
        "Pod" => ("v1", spec),
        "ReplicationController" => (
            "v1",
            json!({"selector": {"app": "demo"}, "template": template}),
        ),
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" => (
            "apps/v1",
            json!({"selector": selector, "template": template}),
        ),
        "Job" => ("batch/v1", json!({"template": template})),
        "CronJob" => (
            "batch/v1",
            json!({"schedule": "*/5 * * * *", "jobTemplate": {"spec": {"template": template}}}),
        ),
        other => panic!("unknown kind {other}"),
    };
    let manifest = json!({"apiVersion": api_version, "kind": kind, "metadata": {"name": "demo", "namespace": "team-a"}, "spec": spec});
    Workload::from_manifest(manifest)
        .expect("manifest parses")
        .expect("kind is covered")
}

fn injected() -> k8s_openapi::api::core::v1::Container {
    let config = SidecarConfig {
        image: IMAGE.to_string(),
        ..SidecarConfig::default()
    };
    sidecar_container(&config)
}

fn context() -> (Vec<String>, Option<k8s_openapi::api::core::v1::Container>) {
    (
        CLAUDEKEYS.iter().map(|s| s.to_string()).collect(),
        Some(injected()),
    )
}

#[test]
fn tables_are_big_enough() {
    assert!(bad_cases().len() >= 30, "{}", bad_cases().len());
    assert!(good_cases().len() >= 30, "{}", good_cases().len());
    // Each snippet runs in 9 kinds x 3 lists: far over 40 bad and 40 good specs.
    assert!(bad_cases().len() * KINDS.len() * LISTS.len() >= 40);
}

#[test]
fn bad_specs_are_found_in_every_kind_and_list() {
    let (claudekeys, image) = context();
    let ctx = Context {
        claudekeys: &claudekeys,
        sidecar: image.as_ref(),
    };
    for case in bad_cases() {
        for kind in KINDS {
            for list in LISTS {
                let findings = rules::check(&workload(kind, list, &case), &ctx);
                let what = format!("{} in {kind}.{list}", case.name);
                assert_eq!(findings.len(), 1, "{what}: {findings:#?}");
                let finding = &findings[0];
                assert_eq!(Some(finding.rule), case.expect, "{what}");
                assert_eq!(finding.resource, format!("{kind}/demo"), "{what}");
                let container = case
                    .container
                    .get("name")
                    .and_then(Value::as_str)
                    .unwrap_or("c");
                assert_eq!(finding.container, container, "{what}");
                assert!(
                    finding.message.starts_with(&format!("{kind}/demo: ")),
                    "{what}: {}",
                    finding.message
                );
                assert!(
                    finding.message.contains(&format!("\"{container}\"")),
                    "{what}"
                );
                assert!(finding.message.contains(&finding.field), "{what}");
                assert!(
                    finding.message.contains("claudekey.io/inject"),
                    "{what}: says what to do instead"
                );
                let secret = case.secret.as_deref().expect("bad cases name their secret");
                assert!(
                    !finding.message.contains(secret),
                    "{what}: message leaks the value: {}",
                    finding.message
                );
                let json = serde_json::to_string(finding).expect("findings serialize");
                assert!(!json.contains(secret), "{what}: JSON leaks the value");
                if let Some(hint) = &finding.hint {
                    assert!(hint.contains('…'), "{what}: hint is masked: {hint}");
                    assert!(hint.chars().count() <= 18, "{what}: hint is short: {hint}");
                }
            }
        }
    }
}

#[test]
fn good_specs_are_clean_in_every_kind_and_list() {
    let (claudekeys, image) = context();
    let ctx = Context {
        claudekeys: &claudekeys,
        sidecar: image.as_ref(),
    };
    for case in good_cases() {
        for kind in KINDS {
            for list in LISTS {
                let findings = rules::check(&workload(kind, list, &case), &ctx);
                assert!(
                    findings.is_empty(),
                    "{} in {kind}.{list}: {findings:#?}",
                    case.name
                );
            }
        }
    }
}

#[test]
fn key_hints_show_kind_and_tail_only() {
    let (claudekeys, image) = context();
    let ctx = Context {
        claudekeys: &claudekeys,
        sidecar: image.as_ref(),
    };
    let case = bad("hint", env("X", &key("api03")), RuleId::KeyInEnv, "");
    let findings = rules::check(&workload("Pod", "containers", &case), &ctx);
    assert_eq!(findings[0].hint.as_deref(), Some("sk-ant-api03-…AA"));
    assert!(findings[0].message.contains("(sk-ant-api03-…AA)"));
}

/// A pod whose `claudekey-proxy` init container is the injected one, changed by `edit`.
fn sidecar_pod(annotation: Option<&str>, edit: impl FnOnce(&mut Value)) -> Workload {
    let mut sidecar = serde_json::to_value(injected()).unwrap();
    sidecar["volumeMounts"] = json!([{"name": "cfg", "mountPath": "/etc/claudekey/proxy"}]);
    edit(&mut sidecar);
    let mut metadata = json!({"name": "p"});
    if let Some(ck) = annotation {
        metadata["annotations"] = json!({"claudekey.io/inject": ck});
    }
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": {
        "initContainers": [sidecar],
        "containers": [{"name": "app", "image": "app:1"}],
        "volumes": [{"name": "cfg", "secret": {"secretName": "bot-proxy"}}],
    }});
    Workload::from_manifest(pod).unwrap().unwrap()
}

#[test]
fn only_the_real_sidecar_of_the_injected_claudekey_may_mount_its_secret() {
    let claudekeys = vec!["bot".to_string(), "other".to_string()];
    let expected = injected();
    let ctx = Context {
        claudekeys: &claudekeys,
        sidecar: Some(&expected),
    };
    assert!(rules::check(&sidecar_pod(Some("bot"), |_| ()), &ctx).is_empty());
    let cases: Vec<(&str, Workload)> = vec![
        ("no annotation", sidecar_pod(None, |_| ())),
        (
            "another ClaudeKey's sidecar",
            sidecar_pod(Some("other"), |_| ()),
        ),
        (
            "not a native sidecar",
            sidecar_pod(Some("bot"), |c| c["restartPolicy"] = Value::Null),
        ),
        (
            "another image",
            sidecar_pod(Some("bot"), |c| c["image"] = json!("evil:1")),
        ),
        (
            "a command override",
            sidecar_pod(Some("bot"), |c| {
                c["command"] = json!(["/bin/sh", "-c", "cat /etc/claudekey/proxy/proxy.json"])
            }),
        ),
        (
            "other args",
            sidecar_pod(Some("bot"), |c| {
                c["args"] = json!(["proxy", "--mode", "gateway", "--listen", "0.0.0.0:8484"])
            }),
        ),
        (
            "a weaker securityContext",
            sidecar_pod(Some("bot"), |c| {
                c["securityContext"] = json!({"privileged": true})
            }),
        ),
        (
            "a lifecycle hook",
            sidecar_pod(
                Some("bot"),
                |c| c["lifecycle"] = json!({"postStart": {"exec": {"command": ["cp", "-r", "/etc/claudekey", "/tmp"]}}}),
            ),
        ),
    ];
    for (what, pod) in cases {
        let findings = rules::check(&pod, &ctx);
        assert_eq!(findings.len(), 1, "{what}: {findings:#?}");
        assert_eq!(findings[0].rule, RuleId::ProxySecretReference, "{what}");
    }
    // scan does not know the injected sidecar: any native sidecar named claudekey-proxy counts.
    let offline = Context {
        claudekeys: &claudekeys,
        sidecar: None,
    };
    let other_image = sidecar_pod(Some("bot"), |c| c["image"] = json!("any:1"));
    assert!(rules::check(&other_image, &offline).is_empty());
}

#[test]
fn several_findings_in_one_container_are_all_reported() {
    let ctx = Context {
        claudekeys: &[],
        sidecar: None,
    };
    let case = good(
        "many",
        json!({"env": [{"name": "A", "value": key("api03")}, {"name": "ANTHROPIC_API_KEY", "value": "literal-value"}], "args": [key("oat01")]}),
    );
    let findings = rules::check(&workload("Deployment", "containers", &case), &ctx);
    let rules: Vec<_> = findings.iter().map(|f| f.rule).collect();
    assert_eq!(
        rules,
        [
            RuleId::KeyInEnv,
            RuleId::LiteralKeyVariable,
            RuleId::KeyInCommand
        ]
    );
}

#[test]
fn uncovered_kinds_and_specless_objects_are_ignored() {
    let secret = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "x"}, "stringData": {"k": key("api03")}});
    assert!(Workload::from_manifest(secret).unwrap().is_none());
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}});
    let ctx = Context::default();
    assert!(rules::check(&Workload::from_manifest(pod).unwrap().unwrap(), &ctx).is_empty());
}

#[test]
fn parse_errors_never_echo_values() {
    let bad = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": {"containers": [{"name": 5, "image": key("api03")}], "hostNetwork": key("api03")}});
    let error = Workload::from_manifest(bad).unwrap_err();
    let text = rules::scrub_parse_error(&error);
    assert!(!text.contains("sk-ant"), "{text}");
    assert!(text.contains("invalid type"), "{text}");
}
