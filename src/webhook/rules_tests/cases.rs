//! The bad and good container snippets the rule-engine tables run through every kind and list.

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde_json::{Value, json};

use crate::webhook::rules::RuleId;

pub(super) const KINDS: [&str; 9] = [
    "Pod",
    "Deployment",
    "StatefulSet",
    "DaemonSet",
    "ReplicaSet",
    "Job",
    "CronJob",
    "PodTemplate",
    "ReplicationController",
];
pub(super) const LISTS: [&str; 3] = ["containers", "initContainers", "ephemeralContainers"];
pub(super) const CLAUDEKEYS: &[&str] = &["bot"];
pub(super) const IMAGE: &str = "registry.example/claudekey:test";

pub(super) fn key(kind: &str) -> String {
    format!("sk-ant-{kind}-{}AA", "Qw3_rT-9zX".repeat(9) + "abc")
}

/// A container snippet, the rule it must trip (None: clean), and the value that must never
/// appear in a message.
pub(super) struct Case {
    pub(super) name: &'static str,
    pub(super) container: Value,
    pub(super) volumes: Value,
    pub(super) expect: Option<RuleId>,
    pub(super) secret: Option<String>,
}

pub(super) fn env(name: &str, value: &str) -> Value {
    json!({"env": [{"name": name, "value": value}]})
}

pub(super) fn bad(name: &'static str, container: Value, rule: RuleId, secret: &str) -> Case {
    Case {
        name,
        container,
        volumes: json!([]),
        expect: Some(rule),
        secret: Some(secret.to_string()),
    }
}

pub(super) fn good(name: &'static str, container: Value) -> Case {
    Case {
        name,
        container,
        volumes: json!([]),
        expect: None,
        secret: None,
    }
}

pub(super) fn with_volumes(mut case: Case, volumes: Value) -> Case {
    case.volumes = volumes;
    case
}

pub(super) fn bad_cases() -> Vec<Case> {
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
        bad(
            "key in a postStart exec hook",
            json!({"lifecycle": {"postStart": {"exec": {"command": ["sh", "-c", format!("echo {api} > /tmp/k")]}}}}),
            KeyInCommand,
            &api,
        ),
        bad(
            "key in a preStop exec hook",
            json!({"lifecycle": {"preStop": {"exec": {"command": ["/bin/notify", &api]}}}}),
            KeyInCommand,
            &api,
        ),
        bad(
            "key in a liveness probe exec",
            json!({"livenessProbe": {"exec": {"command": ["/check", "--key", &api]}}}),
            KeyInCommand,
            &api,
        ),
        bad(
            "key in a readiness probe exec",
            json!({"readinessProbe": {"exec": {"command": ["/check", &key("oat01")]}}}),
            KeyInCommand,
            &key("oat01"),
        ),
        bad(
            "key in a startup probe exec",
            json!({"startupProbe": {"exec": {"command": [format!("--token={api}")]}}}),
            KeyInCommand,
            &api,
        ),
        bad(
            "key in a probe's HTTP header",
            json!({"readinessProbe": {"httpGet": {"port": 80, "httpHeaders": [{"name": "x-api-key", "value": &api}]}}}),
            KeyInCommand,
            &api,
        ),
        bad(
            "oauth token in command",
            json!({"command": ["/app", format!("--oauth={}", key("oat01"))]}),
            KeyInCommand,
            &key("oat01"),
        ),
        bad(
            "key split across variables",
            split(
                json!({"name": "ANTHROPIC_API_KEY", "value": "$(A)$(B)"}),
                json!({}),
            ),
            KeyInEnv,
            &api,
        ),
        bad(
            "key split across variables under a neutral name",
            split(json!({"name": "SETTING", "value": "x=$(A)$(B)"}), json!({})),
            KeyInEnv,
            &api,
        ),
        bad(
            "oauth token split across variables",
            json!({"env": [{"name": "P", "value": "sk-ant-oat01-"}, {"name": "T", "value": api_tail()}, {"name": "TOKEN", "value": "$(P)$(T)"}]}),
            KeyInEnv,
            &key("oat01"),
        ),
        bad(
            "key split across variables, joined in args",
            split(
                json!({"name": "LOG", "value": "1"}),
                json!({"args": ["--key=$(A)$(B)"]}),
            ),
            KeyInCommand,
            &api,
        ),
        bad(
            "key split across variables, joined in an exec probe",
            split(
                json!({"name": "LOG", "value": "1"}),
                json!({"livenessProbe": {"exec": {"command": ["/check", "$(A)$(B)"]}}}),
            ),
            KeyInCommand,
            &api,
        ),
        bad(
            "literal through a variable",
            json!({"env": [{"name": "A", "value": "hunter2-but-longer"}, {"name": "ANTHROPIC_API_KEY", "value": "$(A)"}]}),
            LiteralKeyVariable,
            "hunter2-but-longer",
        ),
        bad(
            "empty API key beside an identity token file",
            json!({"env": [{"name": "ANTHROPIC_IDENTITY_TOKEN_FILE", "value": "/var/run/secrets/anthropic/token"}, {"name": "ANTHROPIC_API_KEY", "value": ""}]}),
            CredentialBesideIdentityToken,
            "never",
        ),
        bad(
            "auth token from a Secret beside an identity token file",
            json!({"env": [{"name": "ANTHROPIC_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {"name": "anthropic", "key": "t"}}}, {"name": "ANTHROPIC_IDENTITY_TOKEN_FILE", "value": "/t"}]}),
            CredentialBesideIdentityToken,
            "never",
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

/// The tail of [`key`] after `sk-ant-<kind>-`.
pub(super) fn api_tail() -> String {
    key("api03")["sk-ant-api03-".len()..].to_string()
}

/// A container whose env defines `A` (the key's prefix) and `B` (its tail), then `last`;
/// `extra` adds other fields.
pub(super) fn split(last: Value, extra: Value) -> Value {
    let mut container = json!({"env": [
        {"name": "A", "value": "sk-ant-api03-"},
        {"name": "B", "value": api_tail()},
        last,
    ]});
    if let (Some(c), Some(e)) = (container.as_object_mut(), extra.as_object()) {
        c.extend(e.clone());
    }
    container
}
