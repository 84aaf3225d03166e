//! What the pipeline reads from a Messages request body: model, max_tokens, stream, the end
//! user id, and the text a person wrote (system and message text, tool results), which is what
//! the caps count, the injection screen reads and the redactor rewrites.

use serde_json::Value;

use super::error::ApiError;

/// Largest request body the proxy reads (the Messages API's own limit is 32 MB).
pub const MAX_BODY_BYTES: usize = 32 * 1024 * 1024;

/// The facts of one request, borrowed from its parsed body.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Facts {
    pub model: Option<String>,
    pub max_tokens: Option<u64>,
    pub stream: bool,
    pub user_id: Option<String>,
    /// Characters of system and message text.
    pub input_chars: u64,
}

pub fn parse(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::InvalidRequest(format!(
            "request body is not valid JSON (line {}, column {})",
            e.line(),
            e.column()
        ))
    })
}

pub fn facts(body: &Value) -> Facts {
    let mut input_chars = 0u64;
    visit_texts(body, true, &mut |t| input_chars += t.chars().count() as u64);
    Facts {
        model: body.get("model").and_then(Value::as_str).map(str::to_owned),
        max_tokens: body.get("max_tokens").and_then(Value::as_u64),
        stream: body.get("stream").and_then(Value::as_bool).unwrap_or(false),
        user_id: body
            .pointer("/metadata/user_id")
            .and_then(Value::as_str)
            .map(str::to_owned),
        input_chars,
    }
}

/// The `params` of every request in a batch-create body.
pub fn batch_params(body: &Value) -> impl Iterator<Item = &Value> {
    body.get("requests")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|r| r.get("params"))
}

/// Calls `f` with every piece of human text: `system` (when `with_system`) and every message's
/// content. Only `text` fields and string contents are visited, never ids, base64 data or JSON
/// tool inputs, so redaction cannot corrupt them.
pub fn visit_texts(body: &Value, with_system: bool, f: &mut dyn FnMut(&str)) {
    if with_system && let Some(system) = body.get("system") {
        visit_content(system, f);
    }
    for message in body
        .get("messages")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(content) = message.get("content") {
            visit_content(content, f);
        }
    }
}

fn visit_content(content: &Value, f: &mut dyn FnMut(&str)) {
    match content {
        Value::String(s) => f(s),
        Value::Array(blocks) => {
            for block in blocks {
                if let Some(Value::String(text)) = block.get("text") {
                    f(text);
                }
                // tool_result blocks nest their own content.
                if let Some(inner) = block.get("content") {
                    visit_content(inner, f);
                }
            }
        }
        _ => {}
    }
}

/// The mutable twin of [`visit_texts`] (system always included); `f` returns a replacement.
/// Returns whether anything was replaced.
pub fn rewrite_texts(body: &mut Value, f: &mut dyn FnMut(&str) -> Option<String>) -> bool {
    let mut changed = false;
    if let Some(system) = body.get_mut("system") {
        changed |= rewrite_content(system, f);
    }
    if let Some(messages) = body.get_mut("messages").and_then(Value::as_array_mut) {
        for message in messages {
            if let Some(content) = message.get_mut("content") {
                changed |= rewrite_content(content, f);
            }
        }
    }
    changed
}

pub fn rewrite_content(content: &mut Value, f: &mut dyn FnMut(&str) -> Option<String>) -> bool {
    match content {
        Value::String(s) => replace(s, f),
        Value::Array(blocks) => {
            let mut changed = false;
            for block in blocks {
                if let Some(Value::String(text)) = block.get_mut("text") {
                    changed |= replace(text, f);
                }
                if let Some(inner) = block.get_mut("content") {
                    changed |= rewrite_content(inner, f);
                }
            }
            changed
        }
        _ => false,
    }
}

fn replace(s: &mut String, f: &mut dyn FnMut(&str) -> Option<String>) -> bool {
    match f(s) {
        Some(new) => {
            *s = new;
            true
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> Value {
        json!({
            "model": "claude-sonnet-4-5",
            "max_tokens": 100,
            "stream": true,
            "metadata": { "user_id": "u-1" },
            "system": [{ "type": "text", "text": "sys" }],
            "messages": [
                { "role": "user", "content": "hello" },
                { "role": "assistant", "content": [{ "type": "text", "text": "hi" }, { "type": "tool_use", "id": "t1", "input": { "q": "x" } }] },
                { "role": "user", "content": [
                    { "type": "tool_result", "tool_use_id": "t1", "content": [{ "type": "text", "text": "res" }] },
                    { "type": "image", "source": { "type": "base64", "data": "AAAA" } }
                ] }
            ]
        })
    }

    #[test]
    fn reads_facts() {
        let f = facts(&sample());
        assert_eq!(f.model.as_deref(), Some("claude-sonnet-4-5"));
        assert_eq!(f.max_tokens, Some(100));
        assert!(f.stream);
        assert_eq!(f.user_id.as_deref(), Some("u-1"));
        assert_eq!(
            f.input_chars,
            ("sys".len() + "hello".len() + "hi".len() + "res".len()) as u64
        );
    }

    #[test]
    fn rewrites_only_text() {
        let mut body = sample();
        let changed = rewrite_texts(&mut body, &mut |t| Some(t.to_uppercase()));
        assert!(changed);
        assert_eq!(body["system"][0]["text"], "SYS");
        assert_eq!(body["messages"][0]["content"], "HELLO");
        assert_eq!(body["messages"][1]["content"][1]["input"]["q"], "x");
        assert_eq!(
            body["messages"][2]["content"][0]["content"][0]["text"],
            "RES"
        );
        assert_eq!(body["messages"][2]["content"][1]["source"]["data"], "AAAA");
        assert!(!rewrite_texts(&mut body, &mut |_| None));
    }

    #[test]
    fn visit_without_system() {
        let mut seen = Vec::new();
        visit_texts(&sample(), false, &mut |t| seen.push(t.to_string()));
        assert_eq!(seen, ["hello", "hi", "res"]);
    }

    #[test]
    fn bad_json_is_a_400_without_echoing_the_body() {
        let err = parse(b"{\"secret\": sk-ant-").unwrap_err();
        assert_eq!(err.status(), 400);
        assert!(!err.to_string().contains("sk-ant"));
    }
}
