//! Mutation tests: the patch is applied with json-patch and the resulting Pod inspected.

use super::*;
use crate::webhook::rules::{self, Context, Workload};
use k8s_openapi::api::core::v1::Pod;
use serde_json::json;

fn config() -> SidecarConfig {
    SidecarConfig {
        image: "registry.example/claudekey:test".into(),
        ..SidecarConfig::default()
    }
}

fn pod(value: serde_json::Value) -> Pod {
    serde_json::from_value(value).expect("test pod parses")
}

fn annotated(spec: serde_json::Value) -> Pod {
    pod(
        json!({"metadata": {"name": "p", "namespace": "team-a", "annotations": {"claudekey.io/inject": "bot"}}, "spec": spec}),
    )
}

fn rich_pod() -> Pod {
    annotated(json!({
        "initContainers": [{"name": "migrate", "image": "m:1"}],
        "containers": [
            {"name": "app", "image": "a:1", "env": [
                {"name": "OTHER", "value": "keep"},
                {"name": "ANTHROPIC_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "t"}}},
                {"name": "ANTHROPIC_API_KEY", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
                {"name": "ANTHROPIC_BASE_URL", "value": "https://api.anthropic.com"},
                {"name": "ANTHROPIC_API_KEY", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k2"}}},
                {"name": "LAST", "value": "keep too"}
            ]},
            {"name": "worker", "image": "w:1"}
        ],
        "volumes": [{"name": "data", "emptyDir": {}}]
    }))
}

fn exists(name: &str) -> bool {
    name == "bot"
}

fn apply(pod: &Pod, patch: &json_patch::Patch) -> Pod {
    let mut doc = serde_json::to_value(pod).unwrap();
    json_patch::patch(&mut doc, patch).expect("patch applies cleanly");
    serde_json::from_value(doc).expect("patched pod parses")
}

fn env_of(c: &k8s_openapi::api::core::v1::Container) -> Vec<(String, Option<String>)> {
    c.env
        .iter()
        .flatten()
        .map(|e| (e.name.clone(), e.value.clone()))
        .collect()
}

#[test]
fn injects_a_hardened_native_sidecar_and_app_env() {
    let original = rich_pod();
    let patch = mutate(&original, "team-a", exists, &config())
        .unwrap()
        .expect("a patch");
    let patched = apply(&original, &patch);
    let spec = patched.spec.as_ref().unwrap();

    let init = spec.init_containers.as_ref().unwrap();
    assert_eq!(init.len(), 2);
    assert_eq!(init[1].name, "migrate");
    let sidecar = &init[0];
    assert_eq!(sidecar.name, SIDECAR_NAME);
    assert_eq!(sidecar.restart_policy.as_deref(), Some("Always"));
    assert_eq!(
        sidecar.image.as_deref(),
        Some("registry.example/claudekey:test")
    );
    let args = sidecar.args.as_ref().unwrap().join(" ");
    assert_eq!(
        args,
        "proxy --config-dir /etc/claudekey/proxy --listen 127.0.0.1:8484 --metrics-listen 0.0.0.0:9484 --mode sidecar --upstream https://api.anthropic.com --audit-log - --body-budget-mib 64"
    );
    let sc = sidecar.security_context.as_ref().unwrap();
    assert_eq!(sc.run_as_non_root, Some(true));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(
        sc.capabilities.as_ref().unwrap().drop.as_deref(),
        Some(&["ALL".to_string()][..])
    );
    assert_eq!(sc.seccomp_profile.as_ref().unwrap().type_, "RuntimeDefault");
    let probe = sidecar
        .readiness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(probe.path.as_deref(), Some("/readyz"));
    assert_eq!(probe.port, IntOrString::Int(9484));
    let live = sidecar.liveness_probe.as_ref().unwrap();
    let live_get = live.http_get.as_ref().unwrap();
    assert_eq!(live_get.path.as_deref(), Some("/healthz"));
    assert_eq!(live_get.port, IntOrString::Int(9484));
    assert_eq!(live.failure_threshold, Some(3));
    let requests = sidecar
        .resources
        .as_ref()
        .unwrap()
        .requests
        .as_ref()
        .unwrap();
    assert_eq!(requests["cpu"], Quantity("10m".into()));
    let sidecar_env: Vec<_> = sidecar
        .env
        .iter()
        .flatten()
        .map(|e| e.name.as_str())
        .collect();
    assert_eq!(sidecar_env, ["POD_NAME", "POD_NAMESPACE"]);

    let volumes = spec.volumes.as_ref().unwrap();
    assert_eq!(volumes.len(), 2);
    let volume = volumes.iter().find(|v| v.name == PROXY_VOLUME).unwrap();
    assert_eq!(
        volume.secret.as_ref().unwrap().secret_name.as_deref(),
        Some("bot-proxy")
    );
    let mounters: Vec<_> = init
        .iter()
        .chain(&spec.containers)
        .filter(|c| {
            c.volume_mounts
                .iter()
                .flatten()
                .any(|m| m.name == PROXY_VOLUME)
        })
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(mounters, [SIDECAR_NAME]);

    let placeholder = Some("claudekey-sidecar".to_string());
    let base = Some("http://127.0.0.1:8484".to_string());
    assert_eq!(
        env_of(&spec.containers[0]),
        [
            ("OTHER".to_string(), Some("keep".to_string())),
            ("ANTHROPIC_API_KEY".to_string(), placeholder.clone()),
            ("ANTHROPIC_BASE_URL".to_string(), base.clone()),
            ("LAST".to_string(), Some("keep too".to_string())),
        ]
    );
    assert!(
        spec.containers[0]
            .env
            .iter()
            .flatten()
            .all(|e| e.value_from.is_none())
    );
    assert_eq!(
        env_of(&spec.containers[1]),
        [
            ("ANTHROPIC_BASE_URL".to_string(), base),
            ("ANTHROPIC_API_KEY".to_string(), placeholder)
        ]
    );
    let annotations = patched.metadata.annotations.as_ref().unwrap();
    assert_eq!(
        annotations
            .get(crate::crd::annotations::INJECTED)
            .map(String::as_str),
        Some("bot")
    );
}

#[test]
fn injected_pod_passes_validation() {
    let original = rich_pod();
    let patch = mutate(&original, "team-a", exists, &config())
        .unwrap()
        .unwrap();
    let patched = apply(&original, &patch);
    let claudekeys = vec!["bot".to_string()];
    let ctx = Context {
        claudekeys: &claudekeys,
        sidecar: Some(&sidecar_container(&config())),
    };
    let findings = rules::check(&Workload::Pod(Box::new(patched)), &ctx);
    assert!(findings.is_empty(), "{findings:#?}");
}

#[test]
fn mutation_is_idempotent() {
    let original = rich_pod();
    let patch = mutate(&original, "team-a", exists, &config())
        .unwrap()
        .unwrap();
    let patched = apply(&original, &patch);
    assert_eq!(mutate(&patched, "team-a", exists, &config()), Ok(None));
    // Even without the annotation, an existing sidecar means "already injected".
    let mut stripped = patched.clone();
    stripped
        .metadata
        .annotations
        .as_mut()
        .unwrap()
        .remove(crate::crd::annotations::INJECTED);
    assert_eq!(mutate(&stripped, "team-a", exists, &config()), Ok(None));
}

#[test]
fn bare_pod_gets_whole_arrays() {
    let original = annotated(json!({"containers": [{"name": "app", "image": "a:1"}]}));
    let patch = mutate(&original, "team-a", exists, &config())
        .unwrap()
        .unwrap();
    let paths: Vec<String> = patch.0.iter().map(|op| op.path().to_string()).collect();
    assert_eq!(
        paths,
        [
            "/spec/initContainers",
            "/spec/volumes",
            "/spec/containers/0/env",
            "/metadata/annotations/claudekey.io~1injected"
        ]
    );
    let patched = apply(&original, &patch);
    assert_eq!(patched.spec.unwrap().init_containers.unwrap().len(), 1);
}

#[test]
fn patch_touches_nothing_else() {
    let original = rich_pod();
    let patch = mutate(&original, "team-a", exists, &config())
        .unwrap()
        .unwrap();
    for op in &patch.0 {
        let path = op.path().to_string();
        let allowed = path.starts_with("/spec/initContainers")
            || path.starts_with("/spec/volumes")
            || (path.starts_with("/spec/containers/") && path.contains("/env"))
            || path == "/metadata/annotations/claudekey.io~1injected";
        assert!(allowed, "unexpected patch path {path}");
    }
}

#[test]
fn pods_without_the_annotation_are_left_alone() {
    let plain = pod(
        json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "a", "image": "a"}]}}),
    );
    assert_eq!(mutate(&plain, "team-a", exists, &config()), Ok(None));
}

#[test]
fn host_network_pods_are_refused() {
    let p = annotated(json!({"hostNetwork": true, "containers": [{"name": "a", "image": "a"}]}));
    let refusal = mutate(&p, "team-a", exists, &config()).unwrap_err();
    assert_eq!(refusal, Refusal::HostNetwork("bot".into()));
    assert!(refusal.to_string().contains("hostNetwork"));
}

#[test]
fn missing_claudekey_is_refused_with_its_name() {
    let p = annotated(json!({"containers": [{"name": "a", "image": "a"}]}));
    let refusal = mutate(&p, "team-a", |_| false, &config()).unwrap_err();
    assert_eq!(
        refusal.to_string(),
        "ClaudeKey bot does not exist in namespace team-a: create it first, or fix the claudekey.io/inject annotation"
    );
}

#[test]
fn empty_annotation_and_name_clashes_are_refused() {
    let mut p = annotated(json!({"containers": [{"name": "a", "image": "a"}]}));
    p.metadata
        .annotations
        .as_mut()
        .unwrap()
        .insert("claudekey.io/inject".into(), " ".into());
    assert_eq!(
        mutate(&p, "team-a", exists, &config()),
        Err(Refusal::EmptyAnnotation)
    );
    let clash = annotated(
        json!({"containers": [{"name": "a", "image": "a"}], "volumes": [{"name": PROXY_VOLUME, "emptyDir": {}}]}),
    );
    assert_eq!(
        mutate(&clash, "team-a", exists, &config()),
        Err(Refusal::NameClash("volume"))
    );
    let clash = annotated(json!({"containers": [{"name": SIDECAR_NAME, "image": "a"}]}));
    assert_eq!(
        mutate(&clash, "team-a", exists, &config()),
        Err(Refusal::NameClash("container"))
    );
}

#[test]
fn the_injected_sidecar_gets_flags_the_binary_accepts() {
    use clap::Parser;
    let args = sidecar_container(&config()).args.expect("args");
    let argv = std::iter::once("claudekey".to_string()).chain(args);
    match crate::cli::Cli::try_parse_from(argv) {
        Ok(cli) => assert!(matches!(cli.command, crate::cli::Command::Proxy(_))),
        Err(e) => panic!("the proxy refuses the sidecar's flags: {e}"),
    }
}

#[test]
fn shared_process_namespaces_are_refused() {
    for setting in ["hostPID", "shareProcessNamespace"] {
        let p = annotated(json!({setting: true, "containers": [{"name": "a", "image": "a"}]}));
        let refusal = mutate(&p, "team-a", exists, &config()).unwrap_err();
        assert_eq!(
            refusal,
            Refusal::SharedProcesses {
                setting,
                name: "bot".into()
            }
        );
        let text = refusal.to_string();
        assert!(text.contains(&format!("{setting}: true")), "{text}");
        assert!(
            text.contains("/proc") && text.contains("bot-client"),
            "{text}"
        );
    }
    let off = annotated(
        json!({"hostPID": false, "shareProcessNamespace": false, "containers": [{"name": "a", "image": "a"}]}),
    );
    assert!(mutate(&off, "team-a", exists, &config()).unwrap().is_some());
}

#[test]
fn apps_start_only_once_the_sidecar_passed_its_startup_probe() {
    let sidecar = sidecar_container(&config());
    let startup = sidecar.startup_probe.expect("startupProbe");
    let get = startup.http_get.as_ref().expect("httpGet");
    assert_eq!(get.path.as_deref(), Some("/readyz"));
    assert_eq!(get.port, IntOrString::Int(9484));
    let patience = startup.period_seconds.unwrap_or(10) * startup.failure_threshold.unwrap_or(3);
    assert!(patience >= 30, "{patience}s");
    assert_eq!(
        startup.period_seconds,
        Some(1),
        "apps wait at most a second more than needed"
    );
}

/// With shared limits, the sidecar counts in Redis with its namespace's password from its own
/// `-proxy` Secret volume: the URL in the spec carries none, and the app containers get nothing.
#[test]
fn a_shared_limits_sidecar_reads_its_redis_password_from_its_own_volume() {
    let config = SidecarConfig {
        redis_url: Some("redis://claudekey-redis.claudekey-system.svc:6379/0".into()),
        ..config()
    };
    let args = sidecar_container(&config).args.unwrap();
    let at = |flag: &str| &args[args.iter().position(|a| a == flag).unwrap() + 1];
    assert_eq!(
        at("--redis-url"),
        "redis://claudekey-redis.claudekey-system.svc:6379/0"
    );
    assert_eq!(at("--redis-username"), "claudekey-ns-$(POD_NAMESPACE)");
    let env = sidecar_container(&config).env.unwrap();
    let namespace = env.iter().find(|e| e.name == "POD_NAMESPACE").unwrap();
    let field = namespace.value_from.as_ref().unwrap().field_ref.as_ref();
    assert_eq!(field.unwrap().field_path, "metadata.namespace");
    assert_eq!(
        at("--redis-password-file"),
        "/etc/claudekey/proxy/redis-password"
    );
    let plain = sidecar_container(&super::SidecarConfig::default())
        .args
        .unwrap();
    assert!(!plain.iter().any(|a| a.starts_with("--redis")));
}

/// The sidecar's body budget is half its memory limit: a large request is refused (413, or a
/// retryable 503) rather than the sidecar killed for its memory.
#[test]
fn the_sidecar_body_budget_follows_its_memory_limit() {
    let budget = |limit: Option<&str>| {
        let mut config = config();
        config.limits.remove("memory");
        if let Some(limit) = limit {
            config.limits.insert("memory".into(), limit.into());
        }
        let args = sidecar_container(&config).args.unwrap();
        let at = args.iter().position(|a| a == "--body-budget-mib");
        at.map(|i| args[i + 1].clone())
    };
    assert_eq!(budget(Some("128Mi")).as_deref(), Some("64"));
    assert_eq!(budget(Some("1Gi")).as_deref(), Some("512"));
    assert_eq!(budget(Some("1.5Gi")).as_deref(), Some("768"));
    assert_eq!(budget(Some("500M")).as_deref(), Some("238"));
    assert_eq!(budget(Some("268435456")).as_deref(), Some("128"));
    assert_eq!(budget(Some("1Mi")).as_deref(), Some("1"), "never 0");
    assert_eq!(budget(None), None, "no limit: the proxy's default");
    assert_eq!(budget(Some("1e9")), None, "unread: the proxy's default");
    assert_eq!(budget(Some("-1Gi")), None);
}
