//! `$(VAR)` expansion exactly as the kubelet does it (k8s.io/kubernetes
//! third_party/forked/golang/expansion), so a key split across variables is seen whole:
//! a reference resolves only to a variable defined *earlier* in the same container's `env`,
//! `$$` is an escaped `$`, and anything that is not a resolvable reference stays verbatim.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::EnvVar;

/// Stands for a value the admission request does not show (secretKeyRef, fieldRef, envFrom…).
/// It is no key character, so nothing key-shaped can be assembled across it.
pub const UNKNOWN: char = '\u{1}';

/// Expands `input` with `mapping` (the Go algorithm, byte for byte on ASCII operators).
pub fn expand(input: &str, mapping: impl Fn(&str) -> Option<String>) -> String {
    let bytes = input.as_bytes();
    let mut out = String::with_capacity(input.len());
    let mut checkpoint = 0;
    let mut cursor = 0;
    while cursor < bytes.len() {
        if bytes[cursor] == b'$' && cursor + 1 < bytes.len() {
            out.push_str(&input[checkpoint..cursor]);
            let rest = &input[cursor + 1..];
            let advance = match rest.as_bytes()[0] {
                b'$' => {
                    out.push('$');
                    1
                }
                b'(' => match rest.find(')') {
                    Some(end) => {
                        let name = &rest[1..end];
                        match mapping(name) {
                            Some(value) => out.push_str(&value),
                            None => {
                                out.push_str("$(");
                                out.push_str(name);
                                out.push(')');
                            }
                        }
                        end + 1
                    }
                    None => {
                        out.push_str("$(");
                        1
                    }
                },
                _ => {
                    // `$x`: both characters stay (Go writes "$" + the next byte).
                    let ch = rest.chars().next().map_or(1, char::len_utf8);
                    out.push('$');
                    out.push_str(&rest[..ch]);
                    ch
                }
            };
            cursor += advance + 1;
            checkpoint = cursor;
        } else {
            cursor += 1;
        }
    }
    out.push_str(&input[checkpoint..]);
    out
}

/// A container's environment as the kubelet resolves it, with [`UNKNOWN`] for values that come
/// from elsewhere.
#[derive(Debug, Default)]
pub struct ExpandedEnv {
    /// The value of each `env` entry after expansion, by index (`None` for `valueFrom`).
    pub values: Vec<Option<String>>,
    /// The final environment: later entries override earlier ones.
    pub all: BTreeMap<String, String>,
    /// Raw literal values (what exec probes expand with: `valueFrom` counts as empty).
    pub static_values: BTreeMap<String, String>,
    /// True when `envFrom` may define variables we cannot see.
    pub has_env_from: bool,
}

impl ExpandedEnv {
    /// Resolves `env` in order; `has_env_from`: the container also has `envFrom` sources.
    pub fn new(env: &[EnvVar], has_env_from: bool) -> Self {
        let mut all: BTreeMap<String, String> = BTreeMap::new();
        let mut values = Vec::with_capacity(env.len());
        let mut static_values = BTreeMap::new();
        for var in env {
            let value = match &var.value {
                Some(raw) if var.value_from.is_none() => {
                    let expanded = expand(raw, |name| {
                        all.get(name)
                            .cloned()
                            .or_else(|| has_env_from.then(|| UNKNOWN.to_string()))
                    });
                    values.push(Some(expanded.clone()));
                    expanded
                }
                _ => {
                    values.push(None);
                    UNKNOWN.to_string()
                }
            };
            all.insert(var.name.clone(), value);
            static_values.insert(var.name.clone(), var.value.clone().unwrap_or_default());
        }
        Self {
            values,
            all,
            static_values,
            has_env_from,
        }
    }

    /// A `command`/`args` entry as the container will see it (expanded with the final env).
    pub fn command(&self, item: &str) -> String {
        expand(item, |name| {
            self.all
                .get(name)
                .cloned()
                .or_else(|| self.has_env_from.then(|| UNKNOWN.to_string()))
        })
    }

    /// An exec probe's command entry (the kubelet expands it with literal values only).
    pub fn probe_command(&self, item: &str) -> String {
        expand(item, |name| self.static_values.get(name).cloned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn var(name: &str, value: &str) -> EnvVar {
        EnvVar {
            name: name.to_string(),
            value: Some(value.to_string()),
            value_from: None,
        }
    }

    fn secret(name: &str) -> EnvVar {
        EnvVar {
            name: name.to_string(),
            value: None,
            value_from: Some(Default::default()),
        }
    }

    #[test]
    fn go_expansion_cases() {
        // Cases from the kubelet's own expansion tests.
        let map = |n: &str| match n {
            "VAR_A" => Some("A".to_string()),
            "VAR_B" => Some("B".to_string()),
            "VAR_EMPTY" => Some(String::new()),
            _ => None,
        };
        for (input, want) in [
            ("$(VAR_A)", "A"),
            ("___$(VAR_B)___", "___B___"),
            ("$(VAR_A)-$(VAR_B)", "A-B"),
            ("$$(VAR_B)_$(VAR_A)", "$(VAR_B)_A"),
            ("$$$$$$(VAR_A)", "$$$(VAR_A)"),
            ("$$$$$$$(VAR_A)", "$$$A"),
            ("$(VAR_DNE)", "$(VAR_DNE)"),
            ("$(VAR_A", "$(VAR_A"),
            ("$VAR_A", "$VAR_A"),
            ("$", "$"),
            ("foo$", "foo$"),
            ("$(VAR_EMPTY)x", "x"),
            ("$()", "$()"),
            ("$$", "$"),
            ("é$é$(VAR_A)", "é$éA"),
        ] {
            assert_eq!(expand(input, map), want, "{input}");
        }
    }

    #[test]
    fn only_earlier_variables_resolve() {
        let env = [
            var("A", "sk-ant-"),
            var("KEY", "$(A)$(B)"),
            var("B", "rest"),
            var("ESCAPED", "$$(A)"),
            var("LATER", "$(A)$(B)"),
        ];
        let e = ExpandedEnv::new(&env, false);
        assert_eq!(e.values[1].as_deref(), Some("sk-ant-$(B)"));
        assert_eq!(e.values[3].as_deref(), Some("$(A)"));
        assert_eq!(e.values[4].as_deref(), Some("sk-ant-rest"));
        assert_eq!(e.command("--k=$(A)$(B)"), "--k=sk-ant-rest");
        assert_eq!(e.command("$(NOPE)"), "$(NOPE)");
    }

    #[test]
    fn hidden_values_are_unknown_and_probes_use_literals_only() {
        let env = [var("A", "x"), secret("S"), var("B", "$(A)$(S)y")];
        let e = ExpandedEnv::new(&env, false);
        assert_eq!(e.values[2].as_deref(), Some("x\u{1}y"));
        assert_eq!(e.probe_command("$(A)$(S)$(B)"), "x$(A)$(S)y");
        let from = ExpandedEnv::new(&[var("K", "$(FROM_CM)")], true);
        assert_eq!(from.values[0].as_deref(), Some("\u{1}"));
    }
}
