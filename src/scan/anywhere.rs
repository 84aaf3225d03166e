//! The secret-scanner half of `scan` (DESIGN.md §10): any key-shaped string anywhere in any
//! document, reported with the document's `Kind/name` and a JSON path, never the key. Secret
//! manifests count (a committed Secret is a leak too): `data` is base64-decoded first.

use std::collections::BTreeSet;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde_json::Value;

use crate::webhook::keyshape::{self, KeyMatch};
use crate::webhook::rules::{Finding, RuleId};
use crate::webhook::walk;

const ADVICE: &str = "a key in a manifest is a leak: revoke it, keep keys in a ClaudeKey source, and annotate pods with claudekey.io/inject: <ClaudeKey>";

/// `Kind/name` of any document, as findings name it.
pub fn resource(value: &Value) -> String {
    let kind = value.get("kind").and_then(Value::as_str).unwrap_or("?");
    let meta = |f: &str| {
        value
            .pointer(&format!("/metadata/{f}"))
            .and_then(Value::as_str)
    };
    let name = match (meta("name"), meta("generateName")) {
        (Some(name), _) if !name.is_empty() => name.to_string(),
        (_, Some(prefix)) => format!("{prefix}…"),
        _ => "<unnamed>".to_string(),
    };
    format!("{kind}/{name}")
}

fn finding(resource: &str, path: String, found: KeyMatch, how: &str) -> Finding {
    let message = format!(
        "{resource}: {path}{how} holds {} Anthropic key ({}); {ADVICE}",
        match found.encoding {
            keyshape::Encoding::Plain => "an",
            keyshape::Encoding::Base64 => "a base64-encoded",
        },
        found.hint
    );
    Finding {
        rule: RuleId::KeyShapedString,
        resource: resource.to_string(),
        container: String::new(),
        field: path.clone(),
        path: Some(path),
        hint: Some(found.hint),
        message,
    }
}

/// Key-shaped strings in `value` at paths not in `known` (paths the rules already reported).
pub fn find(value: &Value, known: &BTreeSet<String>) -> Vec<Finding> {
    let resource = resource(value);
    let is_secret = value.get("kind").and_then(Value::as_str) == Some("Secret")
        && value.get("apiVersion").and_then(Value::as_str) == Some("v1");
    let mut out = Vec::new();
    walk::strings(value, "", &mut |f| {
        if known.contains(&f.path) {
            return;
        }
        let in_data = is_secret && !f.is_key && is_direct_child(&f.path, "data");
        if in_data && let Ok(bytes) = STANDARD.decode(f.text.trim()) {
            let text = String::from_utf8_lossy(&bytes);
            if let Some(found) = keyshape::find_key(&text) {
                out.push(finding(&resource, f.path, found, " (base64-decoded)"));
                return;
            }
        }
        if let Some(found) = keyshape::find_key(f.text) {
            let how = if f.is_key { " (a map key)" } else { "" };
            out.push(finding(&resource, f.path, found, how));
        }
    });
    out
}

/// True for `data.x` and `data["x.y"]`, not `data.x.y` or `metadata.data`.
fn is_direct_child(path: &str, parent: &str) -> bool {
    let Some(rest) = path.strip_prefix(parent) else {
        return false;
    };
    if let Some(name) = rest.strip_prefix('.') {
        return !name.contains(['.', '[']);
    }
    rest.starts_with("[\"")
        && rest.ends_with("\"]")
        && serde_json::from_str::<String>(&rest[1..rest.len() - 1]).is_ok()
}
