//! Injection by placement: the patch is applied with json-patch and the resulting Pod inspected.

use super::*;
use crate::crd::proxy_secret_name;
use crate::webhook::keyshape::SIDECAR_PLACEHOLDER;
use crate::webhook::rules::{self, Context, Workload};
use serde_json::json;

fn config() -> SidecarConfig {
    SidecarConfig {
        image: "registry.example/claudekey:test".into(),
        ..SidecarConfig::default()
    }
}

fn annotated(spec: Value) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": "p", "namespace": "team-a", "annotations": {"claudekey.io/inject": "bot"}},
        "spec": spec
    }))
    .unwrap()
}

fn app_pod() -> Pod {
    annotated(json!({
        "containers": [{"name": "app", "image": "a:1", "env": [
            {"name": "ANTHROPIC_API_KEY", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}
        ]}],
        "volumes": [{"name": "data", "emptyDir": {}}]
    }))
}

fn placed(p: Placement) -> impl Fn(&str) -> Found {
    move |name| {
        if name == "bot" {
            Found::Placed(p)
        } else {
            Found::Missing
        }
    }
}

fn apply(pod: &Pod, patch: &Patch) -> Pod {
    let mut doc = serde_json::to_value(pod).unwrap();
    json_patch::patch(&mut doc, patch).expect("patch applies cleanly");
    serde_json::from_value(doc).unwrap()
}

fn secret_names(pod: &Pod) -> Vec<String> {
    pod.spec
        .as_ref()
        .unwrap()
        .volumes
        .iter()
        .flatten()
        .filter_map(|v| v.secret.as_ref()?.secret_name.clone())
        .collect()
}

#[test]
fn gateway_placement_injects_the_forwarder_with_the_client_secret_only() {
    for pod in [
        app_pod(),
        annotated(json!({"containers": [{"name": "app", "image": "a:1"}]})),
    ] {
        let patch = inject(&pod, "team-a", placed(Placement::Gateway), &config())
            .unwrap()
            .expect("a patch");
        let patched = apply(&pod, &patch);
        let spec = patched.spec.as_ref().unwrap();
        let sidecar = &spec.init_containers.as_ref().unwrap()[0];
        assert_eq!(sidecar, &forwarder_container(&config()));
        let args = sidecar.args.as_ref().unwrap().join(" ");
        assert!(args.contains("--mode forward"), "{args}");
        assert!(
            args.contains(&format!("--config-dir {CLIENT_DIR}")),
            "{args}"
        );
        assert!(args.contains("--listen 127.0.0.1:8484"), "{args}");
        assert!(!args.contains("--upstream"), "{args}");
        let mounts = sidecar.volume_mounts.as_ref().unwrap();
        assert_eq!(mounts.len(), 1);
        assert_eq!(
            (mounts[0].name.as_str(), mounts[0].read_only),
            (CLIENT_VOLUME, Some(true))
        );
        // Only `-client` is mounted: no `-proxy` (there is none in gateway placement).
        assert_eq!(secret_names(&patched), [client_secret_name("bot")]);
        assert!(!secret_names(&patched).contains(&proxy_secret_name("bot")));
        let env: Vec<_> = spec.containers[0]
            .env
            .iter()
            .flatten()
            .map(|e| (e.name.as_str(), e.value.as_deref()))
            .collect();
        assert!(env.contains(&("ANTHROPIC_API_KEY", Some(SIDECAR_PLACEHOLDER))));
        assert!(env.contains(&("ANTHROPIC_BASE_URL", Some("http://127.0.0.1:8484"))));
        // The validating rules admit the result.
        let names = ["bot".to_string()];
        let proxy = mutate::sidecar_container(&config());
        let ctx = Context {
            claudekeys: &names,
            sidecar: Some(&proxy),
        };
        let findings = rules::check(&Workload::Pod(Box::new(patched.clone())), &ctx);
        assert!(findings.is_empty(), "{findings:?}");
    }
}

#[test]
fn namespace_placement_is_exactly_todays_sidecar() {
    let pod = app_pod();
    let ours = inject(&pod, "team-a", placed(Placement::Namespace), &config()).unwrap();
    let today = mutate::mutate(&pod, "team-a", |n| n == "bot", &config()).unwrap();
    assert_eq!(ours, today);
    assert!(secret_names(&apply(&pod, &ours.unwrap())).contains(&proxy_secret_name("bot")));
}

#[test]
fn not_ready_and_missing_are_refused_with_what_to_do() {
    let pod = app_pod();
    let error = inject(&pod, "team-a", |_| Found::NotReady, &config()).unwrap_err();
    assert_eq!(
        error.to_string(),
        "ClaudeKey team-a/bot is not Ready yet: retry once its status shows Ready"
    );
    let error = inject(&pod, "team-a", |_| Found::Missing, &config()).unwrap_err();
    assert!(matches!(
        error,
        InjectError::Refusal(Refusal::MissingClaudeKey { .. })
    ));
    // No annotation: nothing asked, nothing looked up matters.
    let plain: Pod = serde_json::from_value(json!({"spec": {"containers": []}})).unwrap();
    assert_eq!(
        inject(&plain, "team-a", |_| Found::NotReady, &config()),
        Ok(None)
    );
}

#[test]
fn a_pod_volume_named_like_the_client_volume_is_refused() {
    let pod = annotated(json!({
        "containers": [{"name": "app", "image": "a:1"}],
        "volumes": [{"name": CLIENT_VOLUME, "emptyDir": {}}]
    }));
    assert_eq!(
        inject(&pod, "team-a", placed(Placement::Gateway), &config()),
        Err(InjectError::ClientVolumeClash)
    );
}

#[test]
fn placement_is_read_from_status() {
    assert_eq!(Found::of(None), Found::Missing);
    assert_eq!(Found::placed(None), Found::NotReady);
    for (value, found) in [
        ("gateway", Found::Placed(Placement::Gateway)),
        ("namespace", Found::Placed(Placement::Namespace)),
        ("Gateway", Found::NotReady),
        ("", Found::NotReady),
    ] {
        assert_eq!(Found::placed(Some(value)), found, "{value}");
    }
}

#[test]
fn the_binary_accepts_the_forwarders_flags() {
    use clap::Parser;
    let args = forwarder_container(&config()).args.expect("args");
    let argv = std::iter::once("claudekey".to_string()).chain(args);
    match crate::cli::Cli::try_parse_from(argv) {
        Ok(cli) => match cli.command {
            crate::cli::Command::Proxy(args) => {
                assert_eq!(args.mode, crate::proxy::RunMode::Forward);
                crate::proxy::forwarder::check_listen(args.listen).unwrap();
            }
            _ => panic!("not the proxy"),
        },
        Err(e) => panic!("the proxy refuses the forwarder's flags: {e}"),
    }
}

fn federated() -> impl Fn(&str) -> Found {
    |name| {
        if name == "bot" {
            Found::Federated(crate::crd::IdentityTokenStatus {
                audience: "https://api.anthropic.com".into(),
                expiration_seconds: 1200,
            })
        } else {
            Found::Missing
        }
    }
}

#[test]
fn a_federation_source_gives_the_sidecar_alone_its_projected_token() {
    for pod in [
        app_pod(),
        annotated(
            json!({"containers": [{"name": "app", "image": "a:1"}, {"name": "b", "image": "b:1"}]}),
        ),
    ] {
        let patch = inject(&pod, "team-a", federated(), &config())
            .unwrap()
            .expect("a patch");
        let patched = apply(&pod, &patch);
        let spec = patched.spec.as_ref().unwrap();
        let sidecar = &spec.init_containers.as_ref().unwrap()[0];
        let args = sidecar.args.as_ref().unwrap().join(" ");
        assert!(args.contains("--mode sidecar"), "{args}");
        assert!(
            args.ends_with(&format!("--identity-token-file {IDENTITY_TOKEN_PATH}")),
            "{args}"
        );
        let mounts: Vec<_> = sidecar
            .volume_mounts
            .iter()
            .flatten()
            .map(|m| (m.name.as_str(), m.mount_path.as_str(), m.read_only))
            .collect();
        assert!(
            mounts.contains(&(IDENTITY_VOLUME, IDENTITY_DIR, Some(true))),
            "{mounts:?}"
        );
        assert_eq!(mounts.len(), 2, "{mounts:?}");
        assert!(
            mounts.contains(&(mutate::PROXY_VOLUME, mutate::PROXY_CONFIG_DIR, Some(true))),
            "{mounts:?}"
        );
        // No app container mounts it.
        for app in &spec.containers {
            assert!(
                !app.volume_mounts
                    .iter()
                    .flatten()
                    .any(|m| m.name == IDENTITY_VOLUME),
                "{} mounts the identity token",
                app.name
            );
        }
        let volume = spec
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == IDENTITY_VOLUME)
            .expect("the projected volume");
        let projection = volume.projected.as_ref().unwrap().sources.as_ref().unwrap()[0]
            .service_account_token
            .as_ref()
            .unwrap();
        assert_eq!(
            projection.audience.as_deref(),
            Some("https://api.anthropic.com")
        );
        assert_eq!(projection.expiration_seconds, Some(1200));
        assert_eq!(projection.path, "token");
        // The `-proxy` Secret still carries the policy.
        assert!(secret_names(&patched).contains(&proxy_secret_name("bot")));
        // The token is the pod's ServiceAccount's (`default` when none is named).
        assert_eq!(spec.service_account_name.as_deref(), Some("default"));
        assert_eq!(
            spec.volumes
                .iter()
                .flatten()
                .filter(|v| v.name == IDENTITY_VOLUME)
                .count(),
            1
        );
        // The validating rules admit the result.
        let names = ["bot".to_string()];
        let proxy = mutate::sidecar_container(&config());
        let ctx = Context {
            claudekeys: &names,
            sidecar: Some(&proxy),
        };
        let findings = rules::check(&Workload::Pod(Box::new(patched.clone())), &ctx);
        assert!(findings.is_empty(), "{findings:?}");
        // Any other extra flag makes it a container that may not read `-proxy`.
        let mut tampered = patched.clone();
        let args = tampered
            .spec
            .as_mut()
            .unwrap()
            .init_containers
            .as_mut()
            .unwrap()[0]
            .args
            .as_mut()
            .unwrap();
        *args.last_mut().unwrap() = "/tmp/token".into();
        let findings = rules::check(&Workload::Pod(Box::new(tampered)), &ctx);
        assert!(
            findings
                .iter()
                .any(|f| f.rule == rules::RuleId::ProxySecretReference),
            "{findings:?}"
        );
    }
}

#[test]
fn a_named_service_account_is_kept() {
    let pod = annotated(json!({
        "serviceAccountName": "research-agent",
        "containers": [{"name": "app", "image": "a:1"}]
    }));
    let patch = inject(&pod, "team-a", federated(), &config())
        .unwrap()
        .unwrap();
    let patched = apply(&pod, &patch);
    assert_eq!(
        patched.spec.unwrap().service_account_name.as_deref(),
        Some("research-agent")
    );
}

#[test]
fn a_pod_volume_named_like_the_identity_volume_is_refused() {
    let pod = annotated(json!({
        "containers": [{"name": "app", "image": "a:1"}],
        "volumes": [{"name": IDENTITY_VOLUME, "emptyDir": {}}]
    }));
    assert_eq!(
        inject(&pod, "team-a", federated(), &config()),
        Err(InjectError::IdentityVolumeClash)
    );
    // Without federation the name is the pod's own business.
    assert!(inject(&pod, "team-a", placed(Placement::Namespace), &config()).is_ok());
}

#[test]
fn federation_is_read_from_status_for_namespace_placement_only() {
    let ck = |placement: &str, token: bool| -> ClaudeKey {
        let mut status = json!({ "placement": placement });
        if token {
            status["identityToken"] = json!({ "audience": "aud", "expirationSeconds": 600 });
        }
        serde_json::from_value(json!({
            "apiVersion": "claudekey.io/v1alpha2", "kind": "ClaudeKey",
            "metadata": { "name": "bot", "namespace": "team-a" },
            "spec": { "sourceRef": { "kind": "ClusterClaudeKeySource", "name": "wif" } },
            "status": status,
        }))
        .unwrap()
    };
    assert_eq!(
        Found::of(Some(&ck("namespace", true))),
        Found::Federated(crate::crd::IdentityTokenStatus {
            audience: "aud".into(),
            expiration_seconds: 600
        })
    );
    assert_eq!(
        Found::of(Some(&ck("gateway", true))),
        Found::Placed(Placement::Gateway)
    );
    assert_eq!(
        Found::of(Some(&ck("namespace", false))),
        Found::Placed(Placement::Namespace)
    );
}
