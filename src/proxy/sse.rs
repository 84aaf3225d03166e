//! Server-sent events from the Messages API, passed through as they arrive: at most one partial
//! event is held. Usage is read from `message_start` and `message_delta` (whose usage is
//! cumulative: overwrite, never add); `error` events after a 200 are noted; `ping` and unknown
//! events pass untouched; text deltas are redacted with a carry-over when the policy asks, and
//! citations' `cited_text` whole. Thinking deltas pass unchanged: their signature covers them,
//! and the API refuses a later turn whose thinking was altered.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use serde_json::Value;

use super::{
    json::{Duplicates, Json},
    redact::{Counts, StreamRedactor},
    tenant::Tenant,
    usage::Usage,
};

/// Turns upstream SSE bytes into client SSE bytes, event by event.
pub struct SseTransformer {
    buf: BytesMut,
    /// Set when text deltas are redacted.
    tenant: Option<Arc<Tenant>>,
    /// One carry-over per content block index.
    blocks: Vec<(u64, StreamRedactor)>,
    pub usage: Usage,
    pub counts: Counts,
    /// `error.type` of an `error` event, if one came.
    pub error: Option<String>,
}

impl SseTransformer {
    /// `redact_with` is the tenant whose redactor rewrites text deltas, or `None` to pass them.
    pub fn new(redact_with: Option<Arc<Tenant>>) -> Self {
        let tenant = redact_with.filter(|t| t.redact_responses && !t.redactor.is_empty());
        Self {
            buf: BytesMut::new(),
            tenant,
            blocks: Vec::new(),
            usage: Usage::default(),
            counts: Counts::default(),
            error: None,
        }
    }

    /// Adds upstream bytes; returns every complete event, ready to send (maybe empty).
    pub fn push(&mut self, chunk: &[u8]) -> Bytes {
        self.buf.extend_from_slice(chunk);
        let mut out = BytesMut::new();
        while let Some(end) = event_end(&self.buf) {
            let event = self.buf.split_to(end);
            self.event(&event, &mut out);
        }
        out.freeze()
    }

    /// At the end of the stream: whatever partial event and held-back text remain.
    pub fn finish(&mut self) -> Bytes {
        let mut out = BytesMut::new();
        let rest = std::mem::take(&mut self.buf);
        if !rest.is_empty() {
            self.event(&rest, &mut out);
        }
        let indexes: Vec<u64> = self.blocks.iter().map(|(i, _)| *i).collect();
        for index in indexes {
            self.flush_block(index, &mut out);
        }
        out.freeze()
    }

    fn event(&mut self, raw: &[u8], out: &mut BytesMut) {
        let (name, data) = parse_event(raw);
        match name {
            Some("message_start") | Some("message_delta") | Some("error") | None => {
                if let Some(json) = data.and_then(read) {
                    self.observe(&json);
                }
                out.extend_from_slice(raw);
            }
            Some("content_block_delta") if self.tenant.is_some() => match data {
                Some(d) => self.delta(d, raw, out),
                None => out.extend_from_slice(raw),
            },
            Some("content_block_stop") if self.tenant.is_some() => {
                let index = data
                    .and_then(read)
                    .and_then(|j| j.get("index").and_then(Json::as_u64));
                if let Some(index) = index {
                    self.flush_block(index, out);
                }
                out.extend_from_slice(raw);
            }
            _ => out.extend_from_slice(raw),
        }
    }

    fn observe(&mut self, json: &Json<'_>) {
        match json.get("type").and_then(Json::as_str) {
            Some("message_start") => {
                if let Some(u) = json.get("message").and_then(|m| m.get("usage")) {
                    self.usage.merge(u);
                }
            }
            Some("message_delta") => {
                if let Some(u) = json.get("usage") {
                    self.usage.merge(u);
                }
            }
            Some("error") => {
                let kind = json
                    .get("error")
                    .and_then(|e| e.get("type"))
                    .and_then(Json::as_str)
                    .unwrap_or("error");
                // Bounded: Anthropic's error types are short identifiers.
                self.error = Some(kind.chars().take(64).collect());
            }
            _ => {}
        }
    }

    fn delta(&mut self, data: &str, raw: &[u8], out: &mut BytesMut) {
        let Ok(mut json) = serde_json::from_str::<Value>(data) else {
            out.extend_from_slice(raw);
            return;
        };
        let index = json.get("index").and_then(Value::as_u64).unwrap_or(0);
        if let Some(Value::String(cited)) = json.pointer_mut("/delta/citation/cited_text") {
            // A citation arrives whole in one event: nothing to carry over.
            let redacted = self
                .tenant
                .as_ref()
                .and_then(|t| t.redactor.redact(cited, &mut self.counts));
            match redacted {
                Some(new) => {
                    *cited = new;
                    write_event(out, "content_block_delta", &json);
                }
                None => out.extend_from_slice(raw),
            }
            return;
        }
        let Some(Value::String(text)) = json.pointer_mut("/delta/text") else {
            // input_json_delta, thinking, signature: not text a person reads back.
            out.extend_from_slice(raw);
            return;
        };
        let Some(tenant) = self.tenant.clone() else {
            return;
        };
        let block = match self.blocks.iter().position(|(i, _)| *i == index) {
            Some(p) => p,
            None => {
                self.blocks.push((index, StreamRedactor::default()));
                self.blocks.len() - 1
            }
        };
        let safe = self.blocks[block]
            .1
            .push(&tenant.redactor, text, &mut self.counts);
        if !safe.is_empty() {
            *text = safe;
            write_event(out, "content_block_delta", &json);
        }
    }

    /// Sends a block's held-back text as one more delta, before its `content_block_stop`.
    fn flush_block(&mut self, index: u64, out: &mut BytesMut) {
        let Some(p) = self.blocks.iter().position(|(i, _)| *i == index) else {
            return;
        };
        let (_, mut carry) = self.blocks.swap_remove(p);
        let Some(tenant) = self.tenant.clone() else {
            return;
        };
        let rest = carry.finish(&tenant.redactor, &mut self.counts);
        if !rest.is_empty() {
            let json = serde_json::json!({
                "type": "content_block_delta",
                "index": index,
                "delta": { "type": "text_delta", "text": rest },
            });
            write_event(out, "content_block_delta", &json);
        }
    }
}

fn write_event(out: &mut BytesMut, name: &str, json: &Value) {
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\ndata: ");
    out.extend_from_slice(json.to_string().as_bytes());
    out.extend_from_slice(b"\n\n");
}

/// Index just past the first blank line (`\n\n` or `\r\n\r\n`), i.e. the end of one event.
/// Every byte of a stream passes here, so the newlines are found with `memchr` (a few per
/// event) rather than by looking at each byte.
fn event_end(buf: &[u8]) -> Option<usize> {
    memchr::memchr_iter(b'\n', buf).find_map(|i| match buf.get(i + 1) {
        Some(b'\n') => Some(i + 2),
        Some(b'\r') if buf.get(i + 2) == Some(&b'\n') => Some(i + 3),
        _ => None,
    })
}

/// An event's data read into a borrowed tree: a `message_start` is on the stream's first-byte
/// path, and a `serde_json::Value` of it allocated every key and copied every string. A key
/// the upstream repeats keeps its last value, as a `Value` (and a client) reads it.
fn read(data: &str) -> Option<Json<'_>> {
    Json::parse(data.as_bytes(), Duplicates::LastWins, usize::MAX).ok()
}

/// The `event:` name and the `data:` payload (multi-line data joined is not needed: the API
/// sends one data line per event; the first is taken).
fn parse_event(raw: &[u8]) -> (Option<&str>, Option<&str>) {
    let Ok(text) = std::str::from_utf8(raw) else {
        return (None, None);
    };
    let mut name = None;
    let mut data = None;
    // `str::lines`, with the newlines found by `memchr` (every event passes here).
    let mut rest = text;
    while !rest.is_empty() {
        let (line, next) = match memchr::memchr(b'\n', rest.as_bytes()) {
            Some(i) => (
                rest[..i].strip_suffix('\r').unwrap_or(&rest[..i]),
                &rest[i + 1..],
            ),
            None => (rest, ""),
        };
        rest = next;
        if let Some(v) = line.strip_prefix("event:") {
            name = Some(v.trim());
        } else if let Some(v) = line.strip_prefix("data:") {
            data = data.or(Some(v.trim_start()));
        }
    }
    (name, data)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::{
        crd::{DataProtectionSpec, Detector},
        proxy::limits::Limiters,
        proxyconf::ProxyConfig,
    };

    const STREAM: &str = concat!(
        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"usage\":{\"input_tokens\":25,\"output_tokens\":1,\"cache_read_input_tokens\":3}}}\n\n",
        "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
        "event: ping\ndata: {\"type\":\"ping\"}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"mail jane@exa\"}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"mple.com now\"}}\n\n",
        "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
        "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":7}}\n\n",
        "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{},\"usage\":{\"output_tokens\":15}}\n\n",
        "event: future_thing\ndata: {\"type\":\"future_thing\"}\n\n",
        "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
    );

    /// A tenant whose policy redacts e-mail addresses (in responses too when asked).
    pub(in crate::proxy) fn tenant(redact_responses: bool) -> Arc<Tenant> {
        let mut config: ProxyConfig = serde_json::from_value(serde_json::json!({
            "claudeKey": { "namespace": "ns", "name": "a" },
            "upstream": [{ "key": "sk-ant-api03-u", "fingerprint": "up:x", "validUntil": null }],
            "workloadKeys": [],
            "policy": {}
        }))
        .unwrap();
        config.policy.data_protection = DataProtectionSpec {
            redact: vec![Detector::Email],
            redact_responses,
            ..Default::default()
        };
        Arc::new(Tenant::compile(&config, &Limiters::default()).unwrap())
    }

    fn run(t: &mut SseTransformer, chunk_size: usize) -> String {
        let mut out = Vec::new();
        for chunk in STREAM.as_bytes().chunks(chunk_size) {
            out.extend_from_slice(&t.push(chunk));
        }
        out.extend_from_slice(&t.finish());
        String::from_utf8(out).unwrap()
    }

    fn texts(sse: &str) -> String {
        sse.split("\n\n")
            .filter_map(|e| e.lines().find_map(|l| l.strip_prefix("data: ")))
            .filter_map(|d| serde_json::from_str::<Value>(d).ok())
            .filter_map(|j| {
                j.pointer("/delta/text")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            })
            .collect()
    }

    #[test]
    fn passes_through_unchanged_and_reads_cumulative_usage() {
        for chunk in [1, 7, 64, 10_000] {
            let mut t = SseTransformer::new(None);
            assert_eq!(run(&mut t, chunk), STREAM);
            assert_eq!(
                t.usage,
                Usage {
                    input: 25,
                    output: 15,
                    cache_creation: 0,
                    cache_read: 3
                }
            );
            assert!(t.error.is_none());
        }
    }

    #[test]
    fn never_holds_more_than_the_partial_event() {
        let mut t = SseTransformer::new(None);
        let first_event_len = STREAM.find("\n\n").unwrap() + 2;
        let out = t.push(&STREAM.as_bytes()[..first_event_len + 5]);
        assert_eq!(out.len(), first_event_len);
        assert_eq!(t.buf.len(), 5);
    }

    #[test]
    fn redacts_text_split_across_deltas() {
        for chunk in [1, 13, 10_000] {
            let mut t = SseTransformer::new(Some(tenant(true)));
            let out = run(&mut t, chunk);
            assert_eq!(texts(&out), "mail [REDACTED:email] now");
            assert!(!out.contains("jane"));
            assert_eq!(t.counts.total(), 1);
            // Every other event is still there, in order.
            assert!(out.contains("event: ping") && out.contains("event: future_thing"));
            assert!(out.find("REDACTED").unwrap() < out.find("content_block_stop").unwrap());
        }
    }

    #[test]
    fn redacts_cited_text_in_citation_deltas() {
        let ev = "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"citations_delta\",\"citation\":{\"type\":\"char_location\",\"cited_text\":\"write to jane@example.com\",\"document_index\":0}}}\n\n";
        let mut t = SseTransformer::new(Some(tenant(true)));
        let out = String::from_utf8(t.push(ev.as_bytes()).to_vec()).unwrap();
        assert!(!out.contains("jane@example.com"), "{out}");
        assert!(out.contains("write to [REDACTED:email]"));
        assert!(out.contains("\"document_index\":0"));
        assert_eq!(t.counts.total(), 1);
        let mut t = SseTransformer::new(Some(tenant(false)));
        assert_eq!(&t.push(ev.as_bytes())[..], ev.as_bytes());
    }

    #[test]
    fn thinking_deltas_pass_unchanged() {
        let ev = "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"thinking_delta\",\"thinking\":\"mail jane@example.com\"}}\n\n";
        let mut t = SseTransformer::new(Some(tenant(true)));
        assert_eq!(&t.push(ev.as_bytes())[..], ev.as_bytes());
    }

    #[test]
    fn no_redaction_unless_the_policy_asks() {
        let mut t = SseTransformer::new(Some(tenant(false)));
        assert_eq!(run(&mut t, 10), STREAM);
    }

    #[test]
    fn error_event_after_200_is_noted() {
        let mut t = SseTransformer::new(None);
        let ev = "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n";
        assert_eq!(&t.push(ev.as_bytes())[..], ev.as_bytes());
        assert_eq!(t.error.as_deref(), Some("overloaded_error"));
    }

    /// Usage read as a client's `serde_json::Value` reads it: a repeated key's last value, a
    /// count that is not a whole number left as it was, an event that is not JSON passed on
    /// and ignored.
    #[test]
    fn odd_usage_is_read_as_a_value_reads_it() {
        let mut t = SseTransformer::new(None);
        let events = concat!(
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":1},",
            "\"usage\":{\"input_tokens\":20,\"output_tokens\":\"2\",\"cache_read_input_tokens\":-3}}}\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":4.5}}\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":9,\"output_tokens\":11}}\n\n",
        );
        assert_eq!(&t.push(events.as_bytes())[..], events.as_bytes());
        let mut expected = Usage::default();
        for data in events.lines().filter_map(|l| l.strip_prefix("data: ")) {
            let Ok(value) = serde_json::from_str::<Value>(data) else {
                continue;
            };
            let usage = value.pointer("/message/usage").or(value.get("usage"));
            expected.merge_fields(|name| usage?.get(name)?.as_u64());
        }
        assert_eq!(
            t.usage,
            Usage {
                input: 20,
                output: 11,
                ..Usage::default()
            }
        );
        assert_eq!(t.usage, expected);
    }

    #[test]
    fn crlf_events_are_split() {
        let mut t = SseTransformer::new(None);
        let out = t.push(b"event: ping\r\ndata: {}\r\n\r\nevent: pi");
        assert_eq!(&out[..], b"event: ping\r\ndata: {}\r\n\r\n");
    }

    #[test]
    fn an_event_is_read_as_lines_read_it() {
        for raw in [
            &b"event: ping\ndata: {\"a\":1}\n\n"[..],
            b"event: ping\r\ndata: {\"a\":1}\r\n\r\n",
            b"data: {\"a\":1}\nevent:ping\ndata: {}\n",
            b"event: ping\ndata: {\"a\":1}",
            b"\n\nevent: ping\r\n: comment\ndata:{\"a\":1}\r",
            b"event: pi\rng\n",
            b"",
        ] {
            let text = std::str::from_utf8(raw).unwrap();
            let mut name = None;
            let mut data = None;
            for line in text.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    name = Some(v.trim());
                } else if let Some(v) = line.strip_prefix("data:") {
                    data = data.or(Some(v.trim_start()));
                }
            }
            assert_eq!(parse_event(raw), (name, data), "{text:?}");
        }
        assert_eq!(parse_event(b"event: a\xff\n"), (None, None));
    }

    #[test]
    fn an_event_ends_at_the_first_blank_line() {
        assert_eq!(event_end(b"event: a\ndata: {}\n\nevent: b\n\n"), Some(19));
        assert_eq!(event_end(b"event: a\r\ndata: {}\r\n\r\n"), Some(22));
        assert_eq!(event_end(b"\n\n"), Some(2));
        // Not yet: a line ended, the blank line not (or only half of it) arrived.
        for partial in [
            &b"event: a\ndata: {}\n"[..],
            b"data: {}\r\n\r",
            b"data: {}\n\r",
            b"",
        ] {
            assert_eq!(event_end(partial), None, "{partial:?}");
        }
    }
}
