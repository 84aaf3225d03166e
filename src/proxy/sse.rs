//! Server-sent events from the Messages API, passed through as they arrive: at most one partial
//! event is held. Usage is read from `message_start` and `message_delta` (whose usage is
//! cumulative: overwrite, never add); `error` events after a 200 are noted; `ping` and unknown
//! events pass untouched; text deltas are redacted with a carry-over when the policy asks, and
//! citations' `cited_text` whole. Thinking deltas pass unchanged: their signature covers them,
//! and the API refuses a later turn whose thinking was altered.
//!
//! Events that pass unchanged (all of them, unless responses are redacted) leave as slices of
//! the buffer they arrived in: a stream's bytes are not copied on their way through.

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
    /// The start of an event whose end has not arrived yet.
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

/// What became of one event.
#[derive(Debug, PartialEq, Eq)]
enum Event {
    /// It goes to the client as it came.
    Passed,
    /// Its replacement (maybe nothing, maybe more than one event) was written out.
    Rewritten,
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
    pub fn push(&mut self, chunk: Bytes) -> Bytes {
        let data = if self.buf.is_empty() {
            chunk
        } else {
            self.buf.extend_from_slice(&chunk);
            std::mem::take(&mut self.buf).freeze()
        };
        let (out, used) = self.events(&data);
        if used < data.len() {
            self.buf.extend_from_slice(&data[used..]);
        }
        out
    }

    /// The complete events at the start of `data`, and how many bytes they took. While every
    /// event passes, what goes out is `data`'s own prefix; from the first rewritten one on, the
    /// client's bytes are copied together.
    fn events(&mut self, data: &Bytes) -> (Bytes, usize) {
        let mut used = 0;
        let mut copied: Option<BytesMut> = None;
        let mut rewritten = BytesMut::new();
        while let Some(len) = event_end(&data[used..]) {
            let raw = &data[used..used + len];
            match (self.event(raw, &mut rewritten), &mut copied) {
                (Event::Passed, Some(out)) => out.extend_from_slice(raw),
                (Event::Passed, None) => {}
                (Event::Rewritten, out) => {
                    let out = out.get_or_insert_with(|| BytesMut::from(&data[..used]));
                    out.extend_from_slice(&rewritten);
                    rewritten.clear();
                }
            }
            used += len;
        }
        let out = match copied {
            Some(out) => out.freeze(),
            None => data.slice(..used),
        };
        (out, used)
    }

    /// At the end of the stream: whatever partial event and held-back text remain.
    pub fn finish(&mut self) -> Bytes {
        let mut out = BytesMut::new();
        let rest = std::mem::take(&mut self.buf);
        if !rest.is_empty() && self.event(&rest, &mut out) == Event::Passed {
            out.extend_from_slice(&rest);
        }
        let indexes: Vec<u64> = self.blocks.iter().map(|(i, _)| *i).collect();
        for index in indexes {
            self.flush_block(index, &mut out);
        }
        out.freeze()
    }

    /// Reads one event; writes to `out` only when it is [`Event::Rewritten`].
    fn event(&mut self, raw: &[u8], out: &mut BytesMut) -> Event {
        let (name, data) = parse_event(raw);
        match name {
            Some(b"message_start" | b"message_delta" | b"error") | None => {
                if let Some(json) = data.and_then(read) {
                    self.observe(&json);
                }
                Event::Passed
            }
            Some(b"content_block_delta") if self.tenant.is_some() => match data {
                Some(d) => self.delta(d, out),
                None => Event::Passed,
            },
            Some(b"content_block_stop") if self.tenant.is_some() => {
                let index = data
                    .and_then(read)
                    .and_then(|j| j.get("index").and_then(Json::as_u64));
                let Some(index) = index else {
                    return Event::Passed;
                };
                self.flush_block(index, out);
                out.extend_from_slice(raw);
                Event::Rewritten
            }
            _ => Event::Passed,
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

    fn delta(&mut self, data: &[u8], out: &mut BytesMut) -> Event {
        let Ok(mut json) = serde_json::from_slice::<Value>(data) else {
            return Event::Passed;
        };
        let index = json.get("index").and_then(Value::as_u64).unwrap_or(0);
        if let Some(Value::String(cited)) = json.pointer_mut("/delta/citation/cited_text") {
            // A citation arrives whole in one event: nothing to carry over.
            let redacted = self
                .tenant
                .as_ref()
                .and_then(|t| t.redactor.redact(cited, &mut self.counts));
            let Some(new) = redacted else {
                return Event::Passed;
            };
            *cited = new;
            write_event(out, "content_block_delta", &json);
            return Event::Rewritten;
        }
        let Some(Value::String(text)) = json.pointer_mut("/delta/text") else {
            // input_json_delta, thinking, signature: not text a person reads back.
            return Event::Passed;
        };
        let Some(tenant) = self.tenant.clone() else {
            return Event::Passed;
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
        // All of it held back (it may be the start of an address): the event is dropped.
        if !safe.is_empty() {
            *text = safe;
            write_event(out, "content_block_delta", &json);
        }
        Event::Rewritten
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
fn read(data: &[u8]) -> Option<Json<'_>> {
    Json::parse(data, Duplicates::LastWins, usize::MAX).ok()
}

/// The `event:` name and the `data:` payload, read as `str::lines` would read them but on
/// bytes: an event that nothing reads (a text delta when responses are not redacted) is never
/// checked for UTF-8, and a name with a byte that is not ASCII matches no name claudekey reads.
/// Multi-line data joined is not needed: the API sends one data line per event; the first is
/// taken.
fn parse_event(raw: &[u8]) -> (Option<&[u8]>, Option<&[u8]>) {
    let mut name = None;
    let mut data = None;
    let mut rest = raw;
    while !rest.is_empty() {
        let (line, next) = match memchr::memchr(b'\n', rest) {
            Some(i) => (
                rest[..i].strip_suffix(b"\r").unwrap_or(&rest[..i]),
                &rest[i + 1..],
            ),
            None => (rest, &[][..]),
        };
        rest = next;
        if let Some(v) = line.strip_prefix(b"event:") {
            name = Some(v.trim_ascii());
        } else if let Some(v) = line.strip_prefix(b"data:") {
            data = data.or(Some(v.trim_ascii_start()));
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
            out.extend_from_slice(&t.push(Bytes::copy_from_slice(chunk)));
        }
        out.extend_from_slice(&t.finish());
        String::from_utf8(out).unwrap()
    }

    /// One push of a whole test stream.
    fn push_static(t: &mut SseTransformer, sse: &'static (impl AsRef<[u8]> + ?Sized)) -> Bytes {
        t.push(Bytes::from_static(sse.as_ref()))
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
        let out = push_static(&mut t, &STREAM[..first_event_len + 5]);
        assert_eq!(out.len(), first_event_len);
        assert_eq!(t.buf.len(), 5);
    }

    /// Events that pass leave as the very bytes they came in; a chunk that ends inside an event
    /// hands on the complete ones and keeps the rest.
    #[test]
    fn passed_events_are_not_copied() {
        for tenant in [None, Some(tenant(false))] {
            let mut t = SseTransformer::new(tenant);
            let chunk = Bytes::from_static(STREAM.as_bytes());
            let out = t.push(chunk.clone());
            assert_eq!((out.as_ptr(), out.len()), (chunk.as_ptr(), chunk.len()));
        }
        let mut t = SseTransformer::new(None);
        let cut = STREAM.len() - 10;
        let chunk = Bytes::from_static(&STREAM.as_bytes()[..cut]);
        let out = t.push(chunk.clone());
        assert_eq!(out.as_ptr(), chunk.as_ptr());
        assert!(STREAM[..cut].ends_with(std::str::from_utf8(&t.buf).unwrap()));
        assert_eq!(out.len() + t.buf.len(), cut);
    }

    /// A rewritten event between passed ones: everything in its order, nothing lost or repeated.
    #[test]
    fn a_rewritten_event_keeps_its_place() {
        let ping = "event: ping\ndata: {\"type\":\"ping\"}\n\n";
        let cited = "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"citations_delta\",\"citation\":{\"type\":\"char_location\",\"cited_text\":\"jane@example.com\"}}}\n\n";
        let stream = [ping, cited, ping, cited, ping].concat();
        let mut t = SseTransformer::new(Some(tenant(true)));
        let out = t.push(Bytes::from(stream));
        let out = std::str::from_utf8(&out).unwrap();
        let events: Vec<&str> = out.split_inclusive("\n\n").collect();
        assert_eq!(events.len(), 5, "{out}");
        for i in [0, 2, 4] {
            assert_eq!(events[i], ping);
        }
        for i in [1, 3] {
            assert!(events[i].contains("[REDACTED:email]"), "{}", events[i]);
        }
        assert_eq!(t.counts.total(), 2);
    }

    /// An event that is not UTF-8 is neither read nor rewritten: it reaches the client as it
    /// came (a client's own decoder decides what to make of it), and its usage is not counted.
    #[test]
    fn an_event_that_is_not_utf8_passes_unread() {
        let usage = b"event: message_delta\ndata: {\"type\":\"message_delta\",\"x\":\"\xff\",\"usage\":{\"output_tokens\":5}}\n\n";
        let delta = b"event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"\xff\"}}\n\n";
        for event in [&usage[..], &delta[..]] {
            let mut t = SseTransformer::new(Some(tenant(true)));
            assert_eq!(&t.push(Bytes::copy_from_slice(event))[..], event);
            assert_eq!(t.usage, Usage::default());
            assert!(t.finish().is_empty());
        }
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
        let out = String::from_utf8(push_static(&mut t, ev).to_vec()).unwrap();
        assert!(!out.contains("jane@example.com"), "{out}");
        assert!(out.contains("write to [REDACTED:email]"));
        assert!(out.contains("\"document_index\":0"));
        assert_eq!(t.counts.total(), 1);
        let mut t = SseTransformer::new(Some(tenant(false)));
        assert_eq!(&push_static(&mut t, ev)[..], ev.as_bytes());
    }

    #[test]
    fn thinking_deltas_pass_unchanged() {
        let ev = "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"thinking_delta\",\"thinking\":\"mail jane@example.com\"}}\n\n";
        let mut t = SseTransformer::new(Some(tenant(true)));
        assert_eq!(&push_static(&mut t, ev)[..], ev.as_bytes());
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
        assert_eq!(&push_static(&mut t, ev)[..], ev.as_bytes());
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
        assert_eq!(&push_static(&mut t, events)[..], events.as_bytes());
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
        let out = push_static(&mut t, b"event: ping\r\ndata: {}\r\n\r\nevent: pi");
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
            let (name, data) = (name.map(str::as_bytes), data.map(str::as_bytes));
            assert_eq!(parse_event(raw), (name, data), "{text:?}");
        }
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
