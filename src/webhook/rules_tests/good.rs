//! The good twins: container snippets that must stay clean in every kind and list (no false
//! positives), many of them the near-miss of a bad case in cases.rs.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde_json::json;

use super::cases::{Case, api_tail, env, good, split, with_volumes};

pub(super) fn good_cases() -> Vec<Case> {
    let filler = STANDARD
        .encode("this is an ordinary configuration blob, long enough to look like base64 data");
    vec![
        good(
            "split key parts referenced before they are defined",
            json!({"env": [
                {"name": "X", "value": "$(A)$(B)"},
                {"name": "A", "value": "sk-ant-api03-"},
                {"name": "B", "value": api_tail()},
            ]}),
        ),
        good(
            "split key parts with one defined later",
            json!({"env": [
                {"name": "A", "value": "sk-ant-api03-"},
                {"name": "X", "value": "$(A)$(B)"},
                {"name": "B", "value": api_tail()},
            ]}),
        ),
        good(
            "split key parts with escaped references",
            split(
                json!({"name": "X", "value": "$$(A)$$(B)"}),
                json!({"args": ["$$(A)$$(B)"]}),
            ),
        ),
        good(
            "key parts around a Secret value in an exec probe",
            json!({"env": [
                {"name": "A", "value": "sk-ant-api03-"},
                {"name": "S", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
                {"name": "B", "value": "short"},
            ], "livenessProbe": {"exec": {"command": ["/check", "$(A)$(S)$(B)"]}}}),
        ),
        good(
            "key variable from a Secret, expanded",
            json!({"env": [
                {"name": "S", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
                {"name": "ANTHROPIC_API_KEY", "value": "$(S)"},
            ]}),
        ),
        good(
            "exec probes and hooks without keys",
            json!({"livenessProbe": {"exec": {"command": ["cat", "/tmp/healthy"]}},
                   "lifecycle": {"preStop": {"exec": {"command": ["sh", "-c", "ANTHROPIC_API_KEY=claudekey-sidecar ./drain"]}}},
                   "readinessProbe": {"httpGet": {"port": 80, "httpHeaders": [{"name": "x-probe", "value": "sk-ant-api03-…AA"}]}}}),
        ),
        good(
            "identity token file alone",
            json!({"env": [
                {"name": "ANTHROPIC_IDENTITY_TOKEN_FILE", "value": "/var/run/secrets/anthropic/token"},
                {"name": "ANTHROPIC_BASE_URL", "value": "https://api.anthropic.com"},
            ]}),
        ),
        good(
            "identity token file beside a key file path",
            json!({"env": [
                {"name": "ANTHROPIC_IDENTITY_TOKEN_FILE", "value": "/t"},
                {"name": "ANTHROPIC_API_KEY_FILE", "value": "/k"},
            ]}),
        ),
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
