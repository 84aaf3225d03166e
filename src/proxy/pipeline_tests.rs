use super::*;
use crate::{proxy::limits::Limiters, proxyconf::ProxyConfig};
use serde_json::json;

fn tenant() -> Tenant {
    let config: ProxyConfig = serde_json::from_value(json!({
        "claudeKey": { "namespace": "ns", "name": "a" },
        "upstream": [{ "key": "sk-ant-api03-u", "fingerprint": "up:x", "validUntil": null }],
        "workloadKeys": [],
        "policy": { "dataProtection": { "redact": ["email"], "redactResponses": true } }
    }))
    .unwrap();
    Tenant::compile(&config, &Limiters::default()).unwrap()
}

#[test]
fn complete_responses_redact_text_citations_and_tool_input_but_not_thinking() {
    let message = json!({
        "type": "message",
        "content": [
            { "type": "thinking", "thinking": "a@b.io", "signature": "sig" },
            { "type": "text", "text": "mail a@b.io", "citations": [{ "type": "char_location", "cited_text": "a@b.io wrote" }] },
            { "type": "tool_use", "id": "t", "name": "send", "input": { "to": "a@b.io" } }
        ],
        "usage": { "input_tokens": 3, "output_tokens": 4 }
    });
    let (bytes, usage, counts) = read_message(&tenant(), Bytes::from(message.to_string()));
    let out: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(out["content"][0]["thinking"], "a@b.io");
    assert_eq!(out["content"][1]["text"], "mail [REDACTED:email]");
    assert_eq!(
        out["content"][1]["citations"][0]["cited_text"],
        "[REDACTED:email] wrote"
    );
    assert_eq!(out["content"][2]["input"]["to"], "[REDACTED:email]");
    assert_eq!(counts.total(), 3);
    assert_eq!((usage.input, usage.output), (3, 4));
}
