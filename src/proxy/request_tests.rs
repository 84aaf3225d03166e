use super::*;
use serde_json::{Value, json};

/// A request tree built with `json!`.
fn tree(value: Value) -> Json<'static> {
    Json::owned(&value)
}

/// The tree as a `Value`, to index into.
fn value(tree: &Json<'_>) -> Value {
    serde_json::from_slice(&tree.to_vec()).unwrap()
}

fn sample() -> Json<'static> {
    tree(json!({
        "model": "claude-sonnet-4-5",
        "max_tokens": 100,
        "stream": true,
        "metadata": { "user_id": "u-1" },
        "system": [{ "type": "text", "text": "sys" }],
        "messages": [
            { "role": "user", "content": "hello" },
            { "role": "assistant", "content": [
                { "type": "thinking", "thinking": "hmm", "signature": "sig" },
                { "type": "text", "text": "hi", "citations": [{ "type": "char_location", "cited_text": "cite" }] },
                { "type": "tool_use", "id": "t1", "name": "lookup", "input": { "q": "x", "n": 3, "deep": ["y"] } }
            ] },
            { "role": "user", "content": [
                { "type": "tool_result", "tool_use_id": "t1", "content": [{ "type": "text", "text": "res" }] },
                { "type": "image", "source": { "type": "base64", "media_type": "image/png", "data": "AAAA" } },
                { "type": "document", "title": "doc", "source": { "type": "text", "media_type": "text/plain", "data": "plain" } },
                { "type": "document", "source": { "type": "base64", "media_type": "application/pdf", "data": "JVBERi0x" } },
                { "type": "document", "source": { "type": "content", "content": [{ "type": "text", "text": "chunk" }] } },
                { "type": "image", "source": { "type": "url", "url": "https://example.com/a.png" } },
                { "type": "search_result", "source": "https://example.com", "title": "t", "content": [{ "type": "text", "text": "found" }] },
                { "type": "redacted_thinking", "data": "opaque" }
            ] }
        ]
    }))
}

fn texts(body: &mut Json<'_>) -> Vec<String> {
    let mut seen = Vec::new();
    walk(body, &mut |p| match p {
        Piece::Text { text, system } => {
            seen.push(format!("{}{text}", if system { "S:" } else { "" }))
        }
        Piece::Signed(text) => seen.push(format!("signed:{text}")),
        Piece::Unreadable(n) => seen.push(format!("unreadable:{n}")),
    });
    seen
}

#[test]
fn walk_visits_every_place_a_request_carries_text() {
    assert_eq!(
        texts(&mut sample()),
        [
            "S:sys",
            "hello",
            "signed:hmm",
            "hi",
            "cite",
            "y",
            "x",
            "res",
            "unreadable:4",
            "doc",
            "plain",
            "unreadable:8",
            "chunk",
            "unreadable:0",
            "t",
            "https://example.com",
            "found",
        ]
    );
}

#[test]
fn reads_facts() {
    let f = Facts::read(&mut sample()).unwrap();
    assert_eq!(f.model.as_deref(), Some("claude-sonnet-4-5"));
    assert_eq!(f.max_tokens, Some(100));
    assert!(f.stream);
    assert_eq!(f.user_id.as_deref(), Some("u-1"));
    let text = "sys hello hmm hi cite y x res doc plain chunk t https://example.com found";
    assert_eq!(f.text_chars, text.replace(' ', "").len() as u64);
    assert_eq!((f.unreadable, f.unreadable_bytes), (3, 12));
    assert_eq!(f.input_size(), f.text_chars + 12);
}

#[test]
fn rewrites_text_but_never_signed_thinking_ids_or_data() {
    let mut body = sample();
    walk(&mut body, &mut |p| {
        if let Piece::Text { text, .. } = p {
            *text = text.to_uppercase().into();
        }
    });
    let body = value(&body);
    assert_eq!(body["system"][0]["text"], "SYS");
    assert_eq!(body["messages"][0]["content"], "HELLO");
    let assistant = &body["messages"][1]["content"];
    assert_eq!(assistant[0]["thinking"], "hmm");
    assert_eq!(assistant[1]["citations"][0]["cited_text"], "CITE");
    assert_eq!(
        assistant[2]["input"],
        json!({ "q": "X", "n": 3, "deep": ["Y"] })
    );
    assert_eq!(assistant[2]["id"], "t1");
    let user = &body["messages"][2]["content"];
    assert_eq!(user[0]["content"][0]["text"], "RES");
    assert_eq!(user[1]["source"]["data"], "AAAA");
    assert_eq!(user[2]["source"]["data"], "PLAIN");
    assert_eq!(user[2]["source"]["media_type"], "text/plain");
    assert_eq!(user[3]["source"]["data"], "JVBERi0x");
    assert_eq!(user[7]["data"], "opaque");
}

#[test]
fn max_tokens_must_be_an_integer() {
    for bad in [
        json!(100000.0),
        json!("100000"),
        json!(-1),
        json!(null),
        json!(1e5),
    ] {
        let mut body = tree(json!({ "max_tokens": bad, "messages": [] }));
        let err = Facts::read(&mut body).unwrap_err();
        assert_eq!(err.status(), 400, "{bad}");
        assert_eq!(err.kind(), "invalid_request_error");
    }
    let (mut body, _) = parse(br#"{"max_tokens": 100000.0}"#).unwrap();
    assert!(Facts::read(&mut body).is_err());
    let mut body = tree(json!({ "model": 5 }));
    assert!(Facts::read(&mut body).is_err());
    let mut body = tree(json!({ "metadata": { "user_id": 42 } }));
    assert!(Facts::read(&mut body).is_err());
    let mut body = tree(json!({ "metadata": { "user_id": "u".repeat(513) } }));
    assert!(Facts::read(&mut body).is_err());
}

#[test]
fn duplicate_keys_are_refused_at_any_depth() {
    for body in [
        r#"{"model":"claude-opus-4-1","model":"claude-sonnet-4-5"}"#,
        r#"{"max_tokens":10,"max_tokens":100000}"#,
        r#"{"messages":[{"role":"user","content":"a","content":"b"}]}"#,
    ] {
        let err = parse(body.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("repeats a key"), "{err}");
    }
    assert!(parse(br#"{"a":{"k":1},"b":{"k":2}}"#).is_ok());
    assert!(parse(br#"{"a":1} trailing"#).is_err());
}

#[test]
fn mcp_servers_are_read() {
    let mut body = tree(
        json!({ "mcp_servers": [{ "type": "url", "url": "https://mcp.example.com/sse", "name": "x", "authorization_token": "tok" }] }),
    );
    let f = Facts::read(&mut body).unwrap();
    assert_eq!(f.mcp_urls, ["https://mcp.example.com/sse"]);
    let mut body = tree(json!({ "mcp_servers": [{ "type": "url" }] }));
    assert!(Facts::read(&mut body).is_err());
}

#[test]
fn batch_params_are_messages_requests() {
    let mut body = tree(json!({ "requests": [
        { "custom_id": "a", "params": { "model": "m1", "messages": [] } },
        { "custom_id": "b", "params": { "model": "m2", "messages": [] } }
    ] }));
    let all: Vec<_> = messages_mut(&mut body, true).unwrap().collect();
    assert_eq!(all.len(), 2);
    assert_eq!(all[1].get("model").and_then(Json::as_str), Some("m2"));
    assert_eq!(messages_mut(&mut body, false).unwrap().count(), 1);
    let mut bad = tree(json!({ "requests": [{ "custom_id": "a" }, { "params": "x" }] }));
    assert!(messages_mut(&mut bad, true).is_err());
    let mut bad = tree(json!({ "requests": [{ "params": {} }, { "custom_id": "b" }] }));
    assert!(messages_mut(&mut bad, true).is_err());
    assert!(messages_mut(&mut tree(json!({})), true).is_err());
}

#[test]
fn bad_json_is_a_400_without_echoing_the_body() {
    let err = parse(b"{\"secret\": sk-ant-").unwrap_err();
    assert_eq!(err.status(), 400);
    assert!(!err.to_string().contains("sk-ant"));
}

#[test]
fn a_body_of_more_values_than_the_budget_is_a_413() {
    let values = |n: usize| format!("[{}0]", "0,".repeat(n - 2)); // the array counts too
    let (_, counted) = parse(values(MAX_JSON_VALUES).as_bytes()).unwrap();
    assert_eq!(
        counted, MAX_JSON_VALUES,
        "the tree's values are counted for the body budget"
    );
    let (_, counted) = parse(br#"{"a": [1, {"b": null}], "c": "d"}"#).unwrap();
    assert_eq!(counted, 6);
    let err = parse(values(MAX_JSON_VALUES + 1).as_bytes()).unwrap_err();
    assert_eq!(err.status(), 413);
    assert_eq!(err.kind(), "request_too_large");
    // What the budget is for: a value costs tens of bytes once built.
    assert!(std::mem::size_of::<Json>() <= 32);
    assert!(std::mem::size_of::<(Cow<str>, Json)>() <= 56);
}
