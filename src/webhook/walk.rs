//! Every string in a JSON document with its JSON path (`spec.containers[0].args[1]`,
//! `data["config.json"]`): what the rules and `scan` search for keys outside the fields they
//! know. A map key that is itself key-shaped appears in paths only as its masked hint.

use serde_json::Value;

use super::keyshape;

/// One string found in a document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found<'a> {
    /// JSON path of the value (for a map key: the path of the entry it names).
    pub path: String,
    /// The text.
    pub text: &'a str,
    /// True when `text` is a map key, not a value.
    pub is_key: bool,
}

/// Appends the path segment of map key `key` to `path`.
pub fn push_key(path: &str, key: &str) -> String {
    let plain = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    let first = key
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if keyshape::find_key(key).is_some() {
        // Never put a key into a message, not even as a path segment.
        let hint = keyshape::find_key(key).map(|m| m.hint).unwrap_or_default();
        return format!("{path}[<{hint}>]");
    }
    match (path.is_empty(), plain && first) {
        (true, true) => key.to_string(),
        (false, true) => format!("{path}.{key}"),
        _ => format!("{path}[{}]", serde_json::Value::String(key.to_string())),
    }
}

/// Appends an array index.
pub fn push_index(path: &str, i: usize) -> String {
    format!("{path}[{i}]")
}

/// Calls `f` for every string (and map key) in `value`, depth first, maps in key order.
pub fn strings<'a>(value: &'a Value, path: &str, f: &mut impl FnMut(Found<'a>)) {
    match value {
        Value::String(text) => f(Found {
            path: path.to_string(),
            text,
            is_key: false,
        }),
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                strings(item, &push_index(path, i), f);
            }
        }
        Value::Object(map) => {
            for (key, item) in map {
                let at = push_key(path, key);
                f(Found {
                    path: at.clone(),
                    text: key,
                    is_key: true,
                });
                strings(item, &at, f);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn paths_name_every_string() {
        let doc = json!({"a": {"b.c": ["x", {"y": "z"}]}, "k-1": 5});
        let mut seen = Vec::new();
        strings(&doc, "", &mut |f| {
            seen.push((f.path, f.text.to_string(), f.is_key))
        });
        let values: Vec<_> = seen
            .iter()
            .filter(|s| !s.2)
            .map(|s| (&s.0[..], &s.1[..]))
            .collect();
        assert_eq!(values, [("a[\"b.c\"][0]", "x"), ("a[\"b.c\"][1].y", "z")]);
        assert!(seen.iter().any(|s| s.0 == "k-1" && s.2));
    }

    #[test]
    fn key_shaped_map_keys_are_masked_in_paths() {
        let key = format!("sk-ant-api03-{}AA", "x".repeat(40));
        let path = push_key("data", &key);
        assert_eq!(path, "data[<sk-ant-api03-…AA>]");
    }
}
