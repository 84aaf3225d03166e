//! What the pipeline reads from a Messages request body, in one walk over every place a request
//! carries text (system, message strings and blocks, documents, tool inputs and results, search
//! results, citations) and every piece it cannot read (base64 images and PDFs, URL and file
//! references). The caps count, the injection screen reads and the redactor rewrites exactly
//! what this walk visits, so a new block type cannot slip past one of them alone.

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

use super::error::ApiError;

/// Largest request body the proxy reads (the Messages API's own limit is 32 MB).
pub const MAX_BODY_BYTES: usize = 32 * 1024 * 1024;
/// Longest `metadata.user_id` accepted (the API's own limit is 256 characters).
const MAX_USER_ID_CHARS: usize = 512;

/// The facts of one Messages request.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Facts {
    pub model: Option<String>,
    pub max_tokens: Option<u64>,
    pub stream: bool,
    pub user_id: Option<String>,
    /// Characters of text, everywhere the walk finds it.
    pub text_chars: u64,
    /// Encoded bytes of content the proxy cannot read.
    pub unreadable_bytes: u64,
    /// Pieces of content the proxy cannot read (a URL image counts, whatever its size).
    pub unreadable: u32,
    /// `url` of every `mcp_servers` entry (the MCP connector).
    pub mcp_urls: Vec<String>,
}

impl Facts {
    /// What `maxInputChars` is compared with: text, plus unreadable content by its size.
    pub fn input_size(&self) -> u64 {
        self.text_chars + self.unreadable_bytes
    }

    /// Reads the facts of one request, refusing fields of the wrong JSON type: a cap or a
    /// reservation must never be skipped because `max_tokens` came as `100000.0` or `"100000"`.
    pub fn read(request: &mut Value) -> Result<Self, ApiError> {
        let wrong =
            |field: &str, what: &str| ApiError::InvalidRequest(format!("{field}: must be {what}"));
        let mut facts = Self {
            model: match request.get("model") {
                None => None,
                Some(Value::String(s)) => Some(s.clone()),
                Some(_) => return Err(wrong("model", "a string")),
            },
            max_tokens: match request.get("max_tokens") {
                None => None,
                Some(Value::Number(n)) if n.is_u64() => n.as_u64(),
                Some(_) => return Err(wrong("max_tokens", "a non-negative integer")),
            },
            stream: match request.get("stream") {
                None => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => return Err(wrong("stream", "a boolean")),
            },
            user_id: match request.get("metadata").and_then(|m| m.get("user_id")) {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) if s.chars().count() <= MAX_USER_ID_CHARS => Some(s.clone()),
                Some(_) => {
                    return Err(wrong(
                        "metadata.user_id",
                        "a string of at most 512 characters",
                    ));
                }
            },
            ..Self::default()
        };
        if let Some(servers) = request.get("mcp_servers") {
            let servers = servers
                .as_array()
                .ok_or_else(|| wrong("mcp_servers", "an array"))?;
            for server in servers {
                match server.get("url") {
                    Some(Value::String(url)) => facts.mcp_urls.push(url.clone()),
                    _ => return Err(wrong("mcp_servers[].url", "a string")),
                }
            }
        }
        walk(request, &mut |piece| match piece {
            Piece::Text { text, .. } => facts.text_chars += text.chars().count() as u64,
            Piece::Signed(text) => facts.text_chars += text.chars().count() as u64,
            Piece::Unreadable(bytes) => {
                facts.unreadable += 1;
                facts.unreadable_bytes += bytes as u64;
            }
        });
        Ok(facts)
    }
}

/// One place the walk visits.
pub enum Piece<'a> {
    /// Text a person, a document or a tool wrote; the redactor may rewrite it. `system` marks
    /// the app's own system prompt, which the injection screen leaves alone.
    Text { text: &'a mut String, system: bool },
    /// Text that must reach the upstream unchanged: a thinking block, whose signature covers it.
    Signed(&'a str),
    /// Content the proxy cannot read, by its encoded size in bytes (0 for a URL or file id).
    Unreadable(usize),
}

/// Visits every piece of one Messages request: `system`, then each message's content.
pub fn walk(request: &mut Value, f: &mut dyn FnMut(Piece<'_>)) {
    if let Some(system) = request.get_mut("system") {
        content(system, true, f);
    }
    for message in request
        .get_mut("messages")
        .and_then(Value::as_array_mut)
        .into_iter()
        .flatten()
    {
        if let Some(c) = message.get_mut("content") {
            content(c, false, f);
        }
    }
}

/// Visits a `content` value (a string or an array of blocks): of a message, or of a response.
pub fn walk_content(value: &mut Value, f: &mut dyn FnMut(Piece<'_>)) {
    content(value, false, f);
}

fn content(value: &mut Value, system: bool, f: &mut dyn FnMut(Piece<'_>)) {
    match value {
        Value::String(text) => f(Piece::Text { text, system }),
        Value::Array(blocks) => {
            for b in blocks {
                block(b, system, f);
            }
        }
        _ => {}
    }
}

fn block(value: &mut Value, system: bool, f: &mut dyn FnMut(Piece<'_>)) {
    let map = match value {
        Value::Object(map) => map,
        Value::String(text) => return f(Piece::Text { text, system }),
        _ => return,
    };
    match map.get("type").and_then(Value::as_str) {
        Some("thinking") => {
            if let Some(Value::String(thinking)) = map.get("thinking") {
                f(Piece::Signed(thinking));
            }
            return;
        }
        // Encrypted by the API itself: nothing a client wrote.
        Some("redacted_thinking") => return,
        Some("tool_use" | "server_tool_use" | "mcp_tool_use") => {
            if let Some(input) = map.get_mut("input") {
                strings(input, f);
            }
        }
        _ => {}
    }
    for key in ["text", "title", "context"] {
        if let Some(Value::String(text)) = map.get_mut(key) {
            f(Piece::Text { text, system });
        }
    }
    if let Some(src) = map.get_mut("source") {
        source(src, f);
    }
    if let Some(inner) = map.get_mut("content") {
        content(inner, system, f);
    }
    if let Some(Value::Array(citations)) = map.get_mut("citations") {
        for citation in citations {
            if let Some(Value::String(text)) = citation.get_mut("cited_text") {
                f(Piece::Text {
                    text,
                    system: false,
                });
            }
        }
    }
}

/// The `source` of an image, a document or a search result.
fn source(value: &mut Value, f: &mut dyn FnMut(Piece<'_>)) {
    match value {
        // A search result names its source by URL.
        Value::String(text) => f(Piece::Text {
            text,
            system: false,
        }),
        Value::Object(map) => match map.get("type").and_then(Value::as_str) {
            Some("text") => {
                if let Some(Value::String(text)) = map.get_mut("data") {
                    f(Piece::Text {
                        text,
                        system: false,
                    });
                }
            }
            Some("content") => {
                if let Some(inner) = map.get_mut("content") {
                    content(inner, false, f);
                }
            }
            Some("base64") => f(Piece::Unreadable(
                map.get("data").and_then(Value::as_str).map_or(0, str::len),
            )),
            // url, file and any type this proxy does not know: it cannot see the content.
            _ => f(Piece::Unreadable(0)),
        },
        _ => {}
    }
}

/// Every string value (not key) inside a tool input.
fn strings(value: &mut Value, f: &mut dyn FnMut(Piece<'_>)) {
    match value {
        Value::String(text) => f(Piece::Text {
            text,
            system: false,
        }),
        Value::Array(items) => items.iter_mut().for_each(|v| strings(v, f)),
        Value::Object(map) => map.values_mut().for_each(|v| strings(v, f)),
        _ => {}
    }
}

/// Parses a request body. A key repeated in one object is refused: the proxy and the upstream
/// could otherwise read different values of it (one checks the first, the other forwards the
/// last).
pub fn parse(body: &[u8]) -> Result<Value, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let parsed = Strict::deserialize(&mut de).and_then(|v| de.end().map(|()| v.0));
    parsed.map_err(|e| {
        let what = if e.is_data() && e.to_string().starts_with(DUPLICATE) {
            "repeats a key in one object"
        } else {
            "is not valid JSON"
        };
        ApiError::InvalidRequest(format!(
            "request body {what} (line {}, column {})",
            e.line(),
            e.column()
        ))
    })
}

const DUPLICATE: &str = "duplicate key";

/// A `serde_json::Value` that refuses duplicate keys while it is built (no second pass).
struct Strict(Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        Strict::deserialize(d).map(|s| s.0)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
        while let Some(Strict(v)) = seq.next_element()? {
            items.push(v);
        }
        Ok(Value::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Value, A::Error> {
        let mut map = Map::new();
        while let Some(key) = access.next_key::<String>()? {
            if map.contains_key(&key) {
                return Err(de::Error::custom(DUPLICATE));
            }
            let Strict(value) = access.next_value()?;
            map.insert(key, value);
        }
        Ok(Value::Object(map))
    }
}

/// The Messages requests inside a body: the body itself, or each `requests[].params` of a
/// batch, which are full Messages requests and get every check one gets.
pub fn messages_mut(body: &mut Value, batch: bool) -> Result<Vec<&mut Value>, ApiError> {
    if !batch {
        return Ok(vec![body]);
    }
    let requests = body
        .get_mut("requests")
        .and_then(Value::as_array_mut)
        .ok_or_else(|| ApiError::InvalidRequest("requests: must be an array".into()))?;
    requests
        .iter_mut()
        .map(|r| match r.get_mut("params") {
            Some(params @ Value::Object(_)) => Ok(params),
            _ => Err(ApiError::InvalidRequest(
                "requests[].params: must be an object".into(),
            )),
        })
        .collect()
}

#[cfg(test)]
#[path = "request_tests.rs"]
mod tests;
