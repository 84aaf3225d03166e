//! Table tests of the rule engine: every bad and good container snippet is checked in every
//! container list of every workload kind, and no message may contain the offending value.

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde_json::{Value, json};

use super::mutate::{SidecarConfig, sidecar_container};
use super::rules::{self, Context, RuleId, Workload};

const KINDS: [&str; 7] = [
    "Pod",
    "Deployment",
    "StatefulSet",
    "DaemonSet",
    "ReplicaSet",
    "Job",
    "CronJob",
];
const LISTS: [&str; 3] = ["containers", "initContainers", "ephemeralContainers"];
const CLAUDEKEYS: &[&str] = &["bot"];
const IMAGE: &str = "registry.example/claudekey:test";

fn key(kind: &str) -> String {
    format!("sk-ant-{kind}-{}AA", "Qw3_rT-9zX".repeat(9) + "abc")
}

/// A container snippet, the rule it must trip (None: clean), and the value that must never
/// appear in a message.
struct Case {
    name: &'static str,
    container: Value,
    volumes: Value,
    expect: Option<RuleId>,
    secret: Option<String>,
}

fn env(name: &str, value: &str) -> Value {
    json!({"env": [{"name": name, "value": value}]})
}

fn bad(name: &'static str, container: Value, rule: RuleId, secret: &str) -> Case {
    Case {
        name,
        container,
        volumes: json!([]),
        expect: Some(rule),
        secret: Some(secret.to_string()),
    }
}

fn good(name: &'static str, container: Value) -> Case {
    Case {
        name,
        container,
        volumes: json!([]),
        expect: None,
        secret: None,
    }
}

fn with_volumes(mut case: Case, volumes: Value) -> Case {
    case.volumes = volumes;
    case
}

fn bad_cases() -> Vec<Case> {
    use RuleId::*;
    let api = key("api03");
    let b64 = STANDARD.encode(&api);
    let b64_json = STANDARD.encode(format!("{{\"anthropic\":{{\"apiKey\":\"{api}\"}}}}"));
    let b64_url = URL_SAFE_NO_PAD.encode(format!("token={api}"));
    let proxy_volume = json!([{"name": "cfg", "secret": {"secretName": "bot-proxy"}}]);
    let projected = json!([{"name": "cfg", "projected": {"sources": [{"configMap": {"name": "x"}}, {"secret": {"name": "bot-proxy"}}]}}]);
    let mount = json!({"volumeMounts": [{"name": "cfg", "mountPath": "/etc/cfg"}]});
    vec![
        bad(
            "api key under key variable",
            env("ANTHROPIC_API_KEY", &api),
            KeyInEnv,
            &api,
        ),
        bad(
            "api key under other variable",
            env("MY_SETTING", &api),
            KeyInEnv,
            &api,
        ),
        bad(
            "admin key",
            env("ADMIN", &key("admin01")),
            KeyInEnv,
            &key("admin01"),
        ),
        bad(
            "oauth access token",
            env("TOKEN", &key("oat01")),
            KeyInEnv,
            &key("oat01"),
        ),
        bad(
            "oauth refresh token",
            env("REFRESH", &key("ort01")),
            KeyInEnv,
            &key("ort01"),
        ),
        bad(
            "older api01 key",
            env("OLD", &key("api01")),
            KeyInEnv,
            &key("api01"),
        ),
        bad(
            "bearer header",
            env("AUTH_HEADER", &format!("Bearer {api}")),
            KeyInEnv,
            &api,
        ),
        bad(
            "key in a URL",
            env("DSN", &format!("https://x.example/?key={api}&a=b")),
            KeyInEnv,
            &api,
        ),
        bad(
            "key in JSON",
            env("CONFIG", &format!("{{\"apiKey\":\"{api}\"}}")),
            KeyInEnv,
            &api,
        ),
        bad("base64 key", env("ENCODED", &b64), KeyInEnv, &b64),
        bad(
            "base64 JSON holding a key",
            env("CONFIG_B64", &b64_json),
            KeyInEnv,
            &b64_json,
        ),
        bad(
            "url-safe base64 unpadded",
            env("TOKEN_B64", &b64_url),
            KeyInEnv,
            &b64_url,
        ),
        bad(
            "literal under ANTHROPIC_API_KEY",
            env("ANTHROPIC_API_KEY", "hunter2-but-longer"),
            LiteralKeyVariable,
            "hunter2-but-longer",
        ),
        bad(
            "literal under CLAUDE_API_KEY",
            env("CLAUDE_API_KEY", "abc123abc123abc"),
            LiteralKeyVariable,
            "abc123abc123abc",
        ),
        bad(
            "literal under ANTHROPIC_AUTH_TOKEN",
            env("ANTHROPIC_AUTH_TOKEN", "tok-9f8e7d6c5b4a"),
            LiteralKeyVariable,
            "tok-9f8e7d6c5b4a",
        ),
        bad(
            "literal under _ANTHROPIC_KEY",
            env("SUPPORT_BOT_ANTHROPIC_KEY", "plainvalue99"),
            LiteralKeyVariable,
            "plainvalue99",
        ),
        bad(
            "literal under lower-case _claude_key",
            env("my_claude_key", "lowercase-secret"),
            LiteralKeyVariable,
            "lowercase-secret",
        ),
        bad(
            "expansion plus literal",
            env("ANTHROPIC_API_KEY", "$(BASE)suffix-secret"),
            LiteralKeyVariable,
            "suffix-secret",
        ),
        bad(
            "claude code oauth token literal",
            env("CLAUDE_CODE_OAUTH_TOKEN", "oauth-literal-1"),
            LiteralKeyVariable,
            "oauth-literal-1",
        ),
        bad(
            "workload key as a literal",
            env("ANTHROPIC_API_KEY", "ck_live_0123456789abcdefXYZ"),
            LiteralKeyVariable,
            "ck_live_0123456789abcdefXYZ",
        ),
        bad(
            "key in command",
            json!({"command": ["/app", &api]}),
            KeyInCommand,
            &api,
        ),
        bad(
            "key in args",
            json!({"args": ["--api-key", &api]}),
            KeyInCommand,
            &api,
        ),
        bad(
            "key in a header arg",
            json!({"args": [format!("--header=x-api-key: {api}")]}),
            KeyInCommand,
            &api,
        ),
        bad(
            "shell export of a literal",
            json!({"command": ["sh", "-c", "export ANTHROPIC_API_KEY=hunter2hunter2 && ./app"]}),
            KeyInCommand,
            "hunter2hunter2",
        ),
        bad(
            "quoted shell assignment",
            json!({"args": ["CLAUDE_API_KEY='quoted-secret-1' run"]}),
            KeyInCommand,
            "quoted-secret-1",
        ),
        bad(
            "base64 key in args",
            json!({"args": [&b64]}),
            KeyInCommand,
            &b64,
        ),
        bad(
            "curl with key",
            json!({"command": ["curl", "-H", format!("x-api-key: {}", key("admin01"))]}),
            KeyInCommand,
            &key("admin01"),
        ),
        bad(
            "secretKeyRef to a proxy Secret",
            json!({"env": [{"name": "CFG", "valueFrom": {"secretKeyRef": {"name": "bot-proxy", "key": "proxy.json"}}}]}),
            ProxySecretReference,
            "never",
        ),
        bad(
            "envFrom a proxy Secret",
            json!({"envFrom": [{"secretRef": {"name": "bot-proxy"}}]}),
            ProxySecretReference,
            "never",
        ),
        with_volumes(
            bad(
                "mounts a proxy Secret",
                mount.clone(),
                ProxySecretReference,
                "never",
            ),
            proxy_volume.clone(),
        ),
        with_volumes(
            bad(
                "mounts a projected proxy Secret",
                mount.clone(),
                ProxySecretReference,
                "never",
            ),
            projected,
        ),
        with_volumes(
            bad(
                "impostor sidecar with another image",
                json!({"name": "claudekey-proxy", "image": "evil:1", "restartPolicy": "Always", "volumeMounts": [{"name": "cfg", "mountPath": "/etc/claudekey/proxy"}]}),
                ProxySecretReference,
                "never",
            ),
            proxy_volume,
        ),
    ]
}

fn good_cases() -> Vec<Case> {
    let filler = STANDARD
        .encode("this is an ordinary configuration blob, long enough to look like base64 data");
    vec![
        good("no env", json!({})),
        good(
            "key from secretKeyRef",
            json!({"env": [{"name": "ANTHROPIC_API_KEY", "valueFrom": {"secretKeyRef": {"name": "anthropic", "key": "api-key"}}}]}),
        ),
        good(
            "auth token from secretKeyRef",
            json!({"env": [{"name": "ANTHROPIC_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {"name": "anthropic", "key": "t"}}}]}),
        ),
        good(
            "sidecar placeholder",
            env("ANTHROPIC_API_KEY", "claudekey-sidecar"),
        ),
        good("empty value", env("ANTHROPIC_API_KEY", "")),
        good(
            "dependent variable",
            env("ANTHROPIC_API_KEY", "$(FROM_SECRET)"),
        ),
        good("two dependent variables", env("CLAUDE_API_KEY", "$(A)$(B)")),
        good(
            "base URL",
            env("ANTHROPIC_BASE_URL", "http://127.0.0.1:8484"),
        ),
        good("model name", env("ANTHROPIC_MODEL", "claude-sonnet-4-5")),
        good(
            "prose mentioning the prefix",
            env("HELP", "Anthropic keys start with sk-ant-"),
        ),
        good(
            "masked example in prose",
            env("DOCS", "keys look like sk-ant-api03-…AA"),
        ),
        good(
            "truncated example",
            env("EXAMPLE", "sk-ant-api03-xxxxxxxxxxxx"),
        ),
        good("prefix only", env("PREFIX", "sk-ant-api03-")),
        good(
            "not key-named id",
            env("ANTHROPIC_KEY_ID", "apikey_01Rj2N8SVvo6BePZj99NhmiT"),
        ),
        good(
            "key file path",
            env("ANTHROPIC_API_KEY_FILE", "/var/run/secrets/anthropic/key"),
        ),
        good(
            "random token under a neutral name",
            env("SESSION_SECRET", "Zq8vN2pLx7RtY4mWc9BfK3hJd6GsA1eU"),
        ),
        good("ordinary base64", env("BLOB", &filler)),
        good(
            "client Secret reference",
            json!({"env": [{"name": "ANTHROPIC_API_KEY", "valueFrom": {"secretKeyRef": {"name": "bot-client", "key": "ANTHROPIC_API_KEY"}}}]}),
        ),
        good(
            "envFrom client Secret",
            json!({"envFrom": [{"secretRef": {"name": "bot-client"}}]}),
        ),
        good(
            "envFrom ConfigMap",
            json!({"envFrom": [{"configMapRef": {"name": "bot-proxy"}}]}),
        ),
        good(
            "secretKeyRef to a similarly named Secret",
            json!({"env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "bot-proxy-extra", "key": "k"}}}]}),
        ),
        good(
            "proxy Secret of an unknown ClaudeKey",
            json!({"envFrom": [{"secretRef": {"name": "other-proxy"}}]}),
        ),
        with_volumes(
            good(
                "mounts a ConfigMap named like a proxy Secret",
                json!({"volumeMounts": [{"name": "cfg", "mountPath": "/c"}]}),
            ),
            json!([{"name": "cfg", "configMap": {"name": "bot-proxy"}}]),
        ),
        with_volumes(
            good(
                "proxy Secret volume mounted by nobody here",
                json!({"volumeMounts": [{"name": "data", "mountPath": "/d"}]}),
            ),
            json!([{"name": "cfg", "secret": {"secretName": "bot-proxy"}}, {"name": "data", "emptyDir": {}}]),
        ),
        good(
            "model args",
            json!({"args": ["--model", "claude-sonnet-4-5", "--max-tokens", "1024"]}),
        ),
        good(
            "shell using a variable",
            json!({"command": ["sh", "-c", "ANTHROPIC_API_KEY=$KEY ./run"]}),
        ),
        good(
            "shell using a braced variable",
            json!({"command": ["sh", "-c", "export ANTHROPIC_API_KEY=\"${KEY}\"; ./run"]}),
        ),
        good(
            "echo of the prefix",
            json!({"args": ["echo", "keys begin with sk-ant-"]}),
        ),
        good(
            "placeholder assignment in shell",
            json!({"args": ["ANTHROPIC_API_KEY=claudekey-sidecar ./run"]}),
        ),
        good(
            "neutral assignment in shell",
            json!({"args": ["LOG_LEVEL=debug ./run"]}),
        ),
        good(
            "downward API env",
            json!({"env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]}),
        ),
        good(
            "configMapKeyRef under a key name",
            json!({"env": [{"name": "CLAUDE_API_KEY", "valueFrom": {"configMapKeyRef": {"name": "c", "key": "k"}}}]}),
        ),
        good(
            "URL with sk-ant in the path",
            env("DOC_URL", "https://docs.example/keys/sk-ant-api03"),
        ),
    ]
}

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
    let (api_version, spec) = match kind {
        "Pod" => ("v1", spec),
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
    // Each snippet runs in 7 kinds x 3 lists: far over 40 bad and 40 good specs.
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
    let cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "data": {"k": key("api03")}});
    assert!(Workload::from_manifest(cm).unwrap().is_none());
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
