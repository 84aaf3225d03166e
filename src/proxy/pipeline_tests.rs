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

/// The borrowing pass must never skip a message the full path would change, nor read its usage
/// differently: both ways agree on every body, for a policy with and without response redaction.
fn both_ways_agree(body: &str) {
    let redacting = tenant();
    let mut plain = tenant();
    plain.redact_responses = false;
    for t in [&redacting, &plain] {
        let bytes = Bytes::from(body.to_string());
        assert_eq!(
            read_message(t, bytes.clone()),
            read_message_fully(t, bytes),
            "{body}"
        );
    }
}

#[test]
fn the_borrowing_pass_agrees_with_the_full_path() {
    for body in [
        r#"{"content":[{"type":"text","text":"Hello."}],"usage":{"input_tokens":3,"output_tokens":4}}"#,
        r#"{"content":[{"type":"text","text":"mail a@b.io"}],"usage":{"output_tokens":4}}"#,
        r#"{"content":[{"type":"text","text":"x","citations":[{"cited_text":"a@b.io"}]}]}"#,
        r#"{"content":[{"type":"tool_use","input":{"to":{"list":["a@b.io"]}}}]}"#,
        r#"{"content":[{"type":"thinking","thinking":"a@b.io","signature":"s"}]}"#,
        r#"{"content":"mail a\u0040b.io"}"#,
        r#"{"content":"clean","content":"a@b.io","usage":{"input_tokens":1},"usage":{"output_tokens":2}}"#,
        r#"{"id":"a@b.io","content":[],"usage":{"input_tokens":"7","output_tokens":7.0}}"#,
        r#"{"content":[],"usage":{"output_tokens":1,"output_tokens":3,"input_tokens":-1}}"#,
        r#"{"content":[],"usage":{"input_tokens":5},"usage":null}"#,
        r#"{"content":[],"usage":[{"input_tokens":5}]}"#,
        r#"{"content":[],"usage":{"input_tokens":18446744073709551615,"output_tokens":1e2}}"#,
        r#"[{"content":"a@b.io"}]"#,
        r#"{"content":"a@b.io""#,
        "not json",
    ] {
        both_ways_agree(body);
    }
}

proptest::proptest! {
    #[test]
    fn the_borrowing_pass_agrees_on_generated_messages(
        texts in proptest::collection::vec(
            proptest::sample::select(vec!["Hello", "a@b.io", "a\\u0040b.io", "x@y", "", "\\n", "é"]),
            0..6,
        ),
        places in proptest::collection::vec(0usize..4, 0..6),
    ) {
        let blocks: Vec<String> = texts
            .iter()
            .zip(places.iter().chain(std::iter::repeat(&0)))
            .map(|(text, place)| match place {
                0 => format!(r#"{{"type":"text","text":"{text}"}}"#),
                1 => format!(r#"{{"type":"text","text":"ok","citations":[{{"cited_text":"{text}"}}]}}"#),
                2 => format!(r#"{{"type":"tool_use","input":{{"q":["{text}"]}}}}"#),
                _ => format!(r#"{{"type":"thinking","thinking":"{text}","signature":"s"}}"#),
            })
            .collect();
        both_ways_agree(&format!(
            r#"{{"content":[{}],"usage":{{"input_tokens":1,"output_tokens":2}}}}"#,
            blocks.join(",")
        ));
    }
}
