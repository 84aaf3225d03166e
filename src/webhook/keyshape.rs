//! What an Anthropic credential looks like, and which variable names hold one: the string
//! tests behind rules (a) and (b). Pure and allocation-light, since they run on every env value.
//!
//! Decision on look-alikes (DESIGN.md §5): a value under a variable that is *not* key-named is
//! flagged only when it contains something shaped like a real credential, `sk-ant-<kind><2
//! digits>-` followed by at least [`MIN_BODY`] key characters (plain, or inside a base64 run).
//! Documentation text that merely mentions the prefix (`keys start with sk-ant-`,
//! `sk-ant-api03-…`, `sk-ant-api03-xxxx`) is allowed; a literal under a key-named variable is
//! refused whatever it looks like.

use std::sync::LazyLock;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
use regex::Regex;

/// Shortest credential body we treat as a key. Real keys have ~95 characters; 32 keeps truncated
/// examples in docs from matching while any real (or lightly truncated) key still does.
pub const MIN_BODY: usize = 32;

/// The placeholder the mutating webhook gives app containers; never a secret.
pub const SIDECAR_PLACEHOLDER: &str = "claudekey-sidecar";

/// Any `sk-ant-<kind><2 digits>-<body>` credential: gitleaks' `anthropic-api-key`
/// (`sk-ant-api03-…{93}AA`) and `anthropic-admin-api-key` (`sk-ant-admin01-…`) are special cases,
/// as are OAuth tokens (`oat01`, `ort01`) and older `api01` keys.
static KEY: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(&format!(
        r"sk-ant-[a-z]{{2,10}}[0-9]{{2}}-[A-Za-z0-9_-]{{{MIN_BODY},}}"
    ))
    .expect("static regex")
});

/// Runs long enough to be base64 of a credential (`sk-ant-api03-` + 32 bytes encode to > 60).
static BASE64_RUN: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"[A-Za-z0-9+/_-]{56,}={0,2}").expect("static regex"));

/// A shell assignment of a literal to a key-named variable inside command or args,
/// e.g. `export ANTHROPIC_API_KEY=abc`.
static ASSIGNMENT: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r#"\b([A-Z][A-Z0-9_]*)=("[^"]*"|'[^']*'|[^\s;&|]+)"#).expect("static regex")
});

/// Exact variable names that carry an Anthropic credential.
const KEY_VARIABLES: &[&str] = &[
    "ANTHROPIC_API_KEY",
    "ANTHROPIC_AUTH_TOKEN",
    "ANTHROPIC_ADMIN_KEY",
    "ANTHROPIC_ADMIN_API_KEY",
    "CLAUDE_API_KEY",
    "CLAUDE_CODE_OAUTH_TOKEN",
];

/// Suffixes that make any variable key-named (`SUPPORT_BOT_ANTHROPIC_KEY`).
const KEY_SUFFIXES: &[&str] = &[
    "_ANTHROPIC_KEY",
    "_CLAUDE_KEY",
    "_ANTHROPIC_API_KEY",
    "_CLAUDE_API_KEY",
];

/// How a credential was found in a value; decides the wording of the message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    /// The key itself appears in the value (alone or embedded, e.g. `Bearer sk-ant-…`).
    Plain,
    /// The key appears once a base64 run in the value is decoded.
    Base64,
}

/// A credential found in a string: only its masked hint ever leaves this module.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyMatch {
    /// `sk-ant-api03-…AA`, from [`crate::keys::masked_hint`].
    pub hint: String,
    /// Plain or base64.
    pub encoding: Encoding,
}

/// True when `name` is a variable that holds an Anthropic credential.
pub fn is_key_variable(name: &str) -> bool {
    let upper = name.to_ascii_uppercase();
    KEY_VARIABLES.contains(&upper.as_str()) || KEY_SUFFIXES.iter().any(|s| upper.ends_with(s))
}

/// True when a literal under a key-named variable is acceptable: empty, the sidecar placeholder,
/// or nothing but `$(OTHER_VAR)` expansions (Kubernetes dependent variables, which only refer to
/// values defined elsewhere in the container, e.g. from a secretKeyRef).
pub fn is_allowed_literal(value: &str) -> bool {
    let trimmed = value.trim();
    trimmed.is_empty() || trimmed == SIDECAR_PLACEHOLDER || is_only_references(trimmed)
}

fn is_only_references(value: &str) -> bool {
    let mut rest = value;
    while !rest.is_empty() {
        let Some(inner) = rest.strip_prefix("$(") else {
            return false;
        };
        let Some(end) = inner.find(')') else {
            return false;
        };
        let name = &inner[..end];
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
        {
            return false;
        }
        rest = &inner[end + 1..];
    }
    true
}

/// Finds an Anthropic credential in `value`, plain or base64-encoded.
pub fn find_key(value: &str) -> Option<KeyMatch> {
    if let Some(m) = KEY.find(value) {
        return Some(KeyMatch {
            hint: crate::keys::masked_hint(m.as_str()),
            encoding: Encoding::Plain,
        });
    }
    for run in BASE64_RUN.find_iter(value) {
        if let Some(decoded) = decode_base64(run.as_str())
            && let Some(m) = KEY.find(&decoded)
        {
            return Some(KeyMatch {
                hint: crate::keys::masked_hint(m.as_str()),
                encoding: Encoding::Base64,
            });
        }
    }
    None
}

/// Decodes standard or URL-safe base64, padded or not, into text (lossy: a key is ASCII, and
/// whatever surrounds it in the encoded blob may be anything).
fn decode_base64(run: &str) -> Option<String> {
    let unpadded = run.trim_end_matches('=');
    let bytes = STANDARD_NO_PAD
        .decode(unpadded)
        .or_else(|_| URL_SAFE_NO_PAD.decode(unpadded))
        .ok()?;
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

/// Key-named variables assigned a literal inside a shell snippet in command or args; yields
/// the variable name and the masked hint of the literal.
pub fn find_key_assignments(text: &str) -> Vec<(String, String)> {
    ASSIGNMENT
        .captures_iter(text)
        .filter_map(|c| {
            let name = c.get(1)?.as_str();
            let raw = c.get(2)?.as_str();
            let value = raw.trim_matches(|ch| ch == '"' || ch == '\'');
            let is_expansion = value.starts_with('$');
            (is_key_variable(name) && !is_expansion && !is_allowed_literal(value))
                .then(|| (name.to_string(), crate::keys::masked_hint(value)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::STANDARD;

    fn api_key() -> String {
        format!("sk-ant-api03-{}AA", "aB3_-x".repeat(15) + "abc")
    }

    #[test]
    fn finds_plain_embedded_and_encoded_keys() {
        let key = api_key();
        assert_eq!(find_key(&key).unwrap().hint, "sk-ant-api03-…AA");
        assert_eq!(
            find_key(&format!("Bearer {key}")).unwrap().encoding,
            Encoding::Plain
        );
        let encoded = STANDARD.encode(format!("{{\"token\":\"{key}\"}}"));
        let found = find_key(&format!("auth={encoded}")).unwrap();
        assert_eq!(found.encoding, Encoding::Base64);
        assert_eq!(found.hint, "sk-ant-api03-…AA");
    }

    #[test]
    fn other_credential_kinds_match() {
        for kind in ["admin01", "api01", "oat01", "ort01"] {
            let key = format!("sk-ant-{kind}-{}", "Z".repeat(40));
            assert!(find_key(&key).is_some(), "{kind}");
        }
    }

    #[test]
    fn prose_and_truncated_examples_do_not_match() {
        for text in [
            "keys start with sk-ant-",
            "sk-ant-api03-…",
            "sk-ant-api03-xxxx",
            "sk-ant-api03-",
        ] {
            assert!(find_key(text).is_none(), "{text}");
        }
    }

    #[test]
    fn key_variable_names() {
        assert!(is_key_variable("ANTHROPIC_API_KEY"));
        assert!(is_key_variable("support_bot_claude_key"));
        assert!(!is_key_variable("ANTHROPIC_BASE_URL"));
        assert!(!is_key_variable("ANTHROPIC_KEY_ID"));
    }

    #[test]
    fn allowed_literals() {
        assert!(is_allowed_literal(""));
        assert!(is_allowed_literal(SIDECAR_PLACEHOLDER));
        assert!(is_allowed_literal("$(FROM_SECRET)"));
        assert!(!is_allowed_literal("$(A)x"));
        assert!(!is_allowed_literal("hunter2"));
    }

    #[test]
    fn assignments_in_shell() {
        let found = find_key_assignments("export ANTHROPIC_API_KEY=hunter2222 && run");
        assert_eq!(
            found,
            vec![("ANTHROPIC_API_KEY".to_string(), "…".to_string())]
        );
        assert!(find_key_assignments("ANTHROPIC_API_KEY=$KEY run").is_empty());
        assert!(find_key_assignments("OTHER=hunter2222 run").is_empty());
    }
}
