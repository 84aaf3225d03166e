//! One audit line encoded by hand, byte for byte what `serde_json` makes of the derived
//! `Serialize` of [`AuditRecord`] (the test below holds the two equal on generated records).
//!
//! Why by hand: serde_json escapes every key and value a byte at a time through its formatter,
//! about 7.5k instructions a line, 6% of a request (`hack/hotpath.sh`). Here the keys are
//! literals, and a value is copied whole when a vectorized scan finds nothing to escape (nearly
//! always: names, ids and digests); only a value that needs escaping goes through serde_json.

use super::audit::{AuditRecord, time_text};

impl AuditRecord {
    /// Appends this record as one JSON object (no newline).
    pub fn encode(&self, out: &mut Vec<u8>) {
        let time = time_text(&self.time);
        out.extend_from_slice(b"{\"time\":");
        string(out, &time);
        field(out, "claudeKey", &self.claude_key);
        field(out, "namespace", &self.namespace);
        optional(out, "pod", self.pod.as_deref());
        field(out, "requestId", &self.request_id);
        optional(
            out,
            "upstreamRequestId",
            self.upstream_request_id.as_deref(),
        );
        field(out, "method", &self.method);
        field(out, "endpoint", self.endpoint);
        optional(out, "model", self.model.as_deref());
        boolean(out, "stream", self.stream);
        number(out, "status", self.status.into());
        field(out, "outcome", self.outcome);
        optional(out, "error", self.error.as_deref());
        number(out, "inputTokens", self.input_tokens);
        number(out, "outputTokens", self.output_tokens);
        number(
            out,
            "cacheCreationInputTokens",
            self.cache_creation_input_tokens,
        );
        number(out, "cacheReadInputTokens", self.cache_read_input_tokens);
        key(out, "latencyMs");
        float(out, self.latency_ms);
        optional(out, "userHash", self.user_hash.as_deref());
        key(out, "redactions");
        out.push(b'{');
        for (i, (detector, count)) in self.redactions.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            string(out, detector);
            out.push(b':');
            out.extend_from_slice(itoa::Buffer::new().format(*count).as_bytes());
        }
        out.push(b'}');
        boolean(out, "injectionFlagged", self.injection_flagged);
        optional(out, "upstreamKey", self.upstream_key.as_deref());
        out.push(b'}');
    }
}

/// `,"name":` — every key is a plain camelCase literal, never escaped.
fn key(out: &mut Vec<u8>, name: &str) {
    out.extend_from_slice(b",\"");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\":");
}

fn field(out: &mut Vec<u8>, name: &str, value: &str) {
    key(out, name);
    string(out, value);
}

/// An absent value is left out, as `skip_serializing_if = "Option::is_none"` does.
fn optional(out: &mut Vec<u8>, name: &str, value: Option<&str>) {
    if let Some(value) = value {
        field(out, name, value);
    }
}

fn boolean(out: &mut Vec<u8>, name: &str, value: bool) {
    key(out, name);
    out.extend_from_slice(if value { b"true" } else { b"false" });
}

fn number(out: &mut Vec<u8>, name: &str, value: u64) {
    key(out, name);
    out.extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
}

/// As serde_json writes an `f64` (its own shortest form, `null` when not finite): by serde_json,
/// one call, so the text can never drift from the derived line's.
fn float(out: &mut Vec<u8>, value: f64) {
    // Writing into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, &value);
}

/// A JSON string: copied whole when nothing in it needs escaping, else escaped by serde_json.
fn string(out: &mut Vec<u8>, value: &str) {
    // A fold without an early exit, so the compiler checks many bytes at a time.
    let plain = !value.bytes().fold(false, |found, b| {
        found | (b < 0x20) | (b == b'"') | (b == b'\\')
    });
    if plain {
        out.push(b'"');
        out.extend_from_slice(value.as_bytes());
        out.push(b'"');
    } else {
        // Writing into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, value);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use chrono::{TimeZone, Utc};
    use proptest::prelude::*;

    use super::*;

    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z0-9/_-]{0,24}",
            any::<String>(),
            proptest::sample::select(vec![
                "\"quoted\"".to_string(),
                "back\\slash".into(),
                "tab\tnew\nline\r\u{8}\u{c}\u{1}\u{1f}\u{7f}".into(),
                "é ☃ 😀".into(),
            ]),
        ]
    }

    fn record() -> impl Strategy<Value = AuditRecord> {
        let names = (text(), text(), proptest::option::of(text()), text());
        let more = (
            proptest::option::of(text()),
            text(),
            proptest::option::of(text()),
            proptest::option::of(text()),
            proptest::option::of(text()),
            proptest::option::of(text()),
        );
        let numbers = (
            any::<u16>(),
            any::<[u64; 4]>(),
            prop_oneof![
                any::<f64>(),
                0.0..10_000.0f64,
                Just(f64::NAN),
                Just(f64::INFINITY)
            ],
            0i64..4_000_000_000_000_000_000,
            any::<(bool, bool)>(),
            proptest::collection::btree_map(text(), any::<u32>(), 0..4),
        );
        (names, more, numbers).prop_map(|(names, more, numbers)| {
            let (claude_key, namespace, pod, request_id) = names;
            let (upstream_request_id, method, model, error, user_hash, upstream_key) = more;
            let (status, tokens, latency_ms, nanos, (stream, injection_flagged), redactions) =
                numbers;
            AuditRecord {
                time: Utc.timestamp_nanos(nanos),
                claude_key: claude_key.into(),
                namespace: namespace.into(),
                pod: pod.map(Into::into),
                request_id,
                upstream_request_id,
                method: method.into(),
                endpoint: "messages",
                model,
                stream,
                status,
                outcome: "completed",
                error,
                input_tokens: tokens[0],
                output_tokens: tokens[1],
                cache_creation_input_tokens: tokens[2],
                cache_read_input_tokens: tokens[3],
                latency_ms,
                user_hash,
                redactions,
                injection_flagged,
                upstream_key: upstream_key.map(|k| Arc::from(k.as_str())),
            }
        })
    }

    proptest! {
        #[test]
        fn the_line_is_what_serde_json_writes(record in record()) {
            let mut ours = Vec::new();
            record.encode(&mut ours);
            let theirs = serde_json::to_vec(&record).unwrap();
            prop_assert_eq!(String::from_utf8(ours).unwrap(), String::from_utf8(theirs).unwrap());
        }
    }

    #[test]
    fn a_default_record_is_what_serde_json_writes() {
        let record = AuditRecord::default();
        let mut ours = Vec::new();
        record.encode(&mut ours);
        assert_eq!(ours, serde_json::to_vec(&record).unwrap());
    }
}
