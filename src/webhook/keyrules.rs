//! Rules (a) and (b) of DESIGN.md §5 as §10 widens them: keys in env after the kubelet's
//! `$(VAR)` expansion, in every other string a container carries (command, args, probe and
//! lifecycle `exec` commands, headers…), next to a federation token file, and in ConfigMaps.

use k8s_openapi::api::core::v1::ConfigMap;

use super::envexpand::{ExpandedEnv, UNKNOWN};
use super::finding::{Finding, KEY_ADVICE, Out, RuleId, encoded};
use super::keyshape::{self, KeyMatch};
use super::walk;

/// The variable that switches SDKs to workload identity federation (DESIGN.md §11).
pub const IDENTITY_TOKEN_FILE: &str = "ANTHROPIC_IDENTITY_TOKEN_FILE";
/// Variables SDKs prefer over federation when both are set, even when empty.
const FEDERATION_OVERRIDES: [&str; 2] = ["ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN"];

fn key_what(found: &KeyMatch, expanded: bool) -> String {
    let after = if expanded {
        " after $(VAR) expansion"
    } else {
        ""
    };
    format!(
        "holds {} Anthropic key ({}){after}",
        encoded(found.encoding),
        found.hint
    )
}

/// Finds a key in `raw`, or else in what the kubelet turns it into.
fn find(raw: &str, expanded: &str) -> Option<(KeyMatch, bool)> {
    keyshape::find_key(raw)
        .map(|m| (m, false))
        .or_else(|| (expanded != raw).then(|| keyshape::find_key(expanded).map(|m| (m, true)))?)
}

/// Rule (a): every env value as the container will see it.
pub(super) fn check_env(out: &mut Out<'_, '_>) {
    let env = ExpandedEnv::new(out.view.env, !out.view.env_from.is_empty());
    for (i, var) in out.view.env.iter().enumerate() {
        let (Some(raw), Some(expanded)) = (var.value.as_deref(), env.values[i].as_deref()) else {
            continue;
        };
        let field = format!("env {}", var.name);
        let path = Some(format!("{}.env[{i}].value", out.view.path));
        if let Some((found, after)) = find(raw, expanded) {
            let what = key_what(&found, after);
            out.push_at(
                RuleId::KeyInEnv,
                field,
                path,
                Some(found.hint),
                what,
                KEY_ADVICE,
            );
        } else if keyshape::is_key_variable(&var.name) {
            // What is left once values we cannot see are taken out: a literal, or nothing but
            // references the kubelet leaves unresolved.
            let visible: String = expanded.chars().filter(|c| *c != UNKNOWN).collect();
            if keyshape::is_allowed_literal(&visible) && keyshape::is_allowed_literal(raw) {
                continue;
            }
            let shown = if keyshape::is_allowed_literal(raw) {
                &visible
            } else {
                raw
            };
            let hint = crate::keys::masked_hint(shown);
            let what = format!("is a key variable set to a literal value ({hint})");
            out.push_at(
                RuleId::LiteralKeyVariable,
                field,
                path,
                Some(hint),
                what,
                KEY_ADVICE,
            );
        }
    }
}

/// DESIGN.md §11: either variable, even empty, silently wins over federation.
pub(super) fn check_identity_token(out: &mut Out<'_, '_>) {
    if !out.view.env.iter().any(|v| v.name == IDENTITY_TOKEN_FILE) {
        return;
    }
    let mut named: Vec<&str> = out
        .view
        .env
        .iter()
        .map(|v| v.name.as_str())
        .filter(|n| FEDERATION_OVERRIDES.contains(n))
        .collect();
    named.dedup();
    for name in named {
        out.push(
            RuleId::CredentialBesideIdentityToken,
            format!("env {name}"),
            None,
            format!("is set (even empty, SDKs prefer it) beside {IDENTITY_TOKEN_FILE}, which silently turns workload identity federation off"),
            "remove ANTHROPIC_API_KEY and ANTHROPIC_AUTH_TOKEN from this container, or drop the token file and annotate the pod with claudekey.io/inject: <ClaudeKey>",
        );
    }
}

/// The kubelet expansion a container string gets, by its path in the container.
fn expand_as_kubelet(field: &str, text: &str, env: &ExpandedEnv) -> String {
    if field.starts_with("command[") || field.starts_with("args[") {
        return env.command(text);
    }
    let probe = ["livenessProbe", "readinessProbe", "startupProbe"]
        .iter()
        .any(|p| field.starts_with(&format!("{p}.exec.command[")));
    if probe {
        env.probe_command(text)
    } else {
        // Lifecycle hooks and everything else reach the process unexpanded.
        text.to_string()
    }
}

/// Rule (b): every string of the container other than env, with the expansion the kubelet
/// gives it (command and args: the container's env; exec probes: literal env values only).
pub(super) fn check_strings(out: &mut Out<'_, '_>) {
    let env = ExpandedEnv::new(out.view.env, !out.view.env_from.is_empty());
    let mut value = out.view.value.clone();
    if let Some(map) = value.as_object_mut() {
        map.remove("env");
    }
    let mut hits: Vec<(String, KeyMatch, bool)> = Vec::new();
    let mut assignments: Vec<(String, String, String)> = Vec::new();
    walk::strings(&value, "", &mut |f| {
        let expanded = expand_as_kubelet(&f.path, f.text, &env);
        if let Some((found, after)) = find(f.text, &expanded) {
            hits.push((f.path, found, after));
        } else if !f.is_key
            && let Some((var, hint)) = keyshape::find_key_assignments(f.text).into_iter().next()
        {
            assignments.push((f.path, var, hint));
        }
    });
    for (field, found, after) in hits {
        let path = Some(format!("{}.{field}", out.view.path));
        let what = key_what(&found, after);
        out.push_at(
            RuleId::KeyInCommand,
            field,
            path,
            Some(found.hint),
            what,
            KEY_ADVICE,
        );
    }
    for (field, var, hint) in assignments {
        let path = Some(format!("{}.{field}", out.view.path));
        let what = format!("assigns a literal value to {var} ({hint})");
        out.push_at(
            RuleId::KeyInCommand,
            field,
            path,
            Some(hint),
            what,
            KEY_ADVICE,
        );
    }
}

/// ConfigMaps are readable by anyone with `get configmaps`, and mounted as plain files.
pub(super) fn check_configmap(resource: &str, cm: &ConfigMap) -> Vec<Finding> {
    let mut findings = Vec::new();
    let mut push = |field: String, found: KeyMatch, decoded: bool| {
        let how = if decoded { " (base64-decoded)" } else { "" };
        let message = format!(
            "{resource}: {field}{how} holds {} Anthropic key ({}); keep keys out of ConfigMaps: put them in a ClaudeKey source and annotate pods with claudekey.io/inject: <ClaudeKey>",
            encoded(found.encoding),
            found.hint
        );
        findings.push(Finding {
            rule: RuleId::KeyInConfigMap,
            resource: resource.to_string(),
            container: String::new(),
            path: Some(field.clone()),
            field,
            hint: Some(found.hint),
            message,
        });
    };
    for (name, value) in cm.data.iter().flatten() {
        let field = walk::push_key("data", name);
        if let Some(found) = keyshape::find_key(name).or_else(|| keyshape::find_key(value)) {
            push(field, found, false);
        }
    }
    for (name, bytes) in cm.binary_data.iter().flatten() {
        let field = walk::push_key("binaryData", name);
        let text = String::from_utf8_lossy(&bytes.0);
        if let Some(found) = keyshape::find_key(name).or_else(|| keyshape::find_key(&text)) {
            push(field, found, true);
        }
    }
    findings
}
