//! What the pipeline reads from a Messages request body, in one walk over every place a request
//! carries text (system, message strings and blocks, documents, tool inputs and results, search
//! results, citations) and every piece it cannot read (base64 images and PDFs, URL and file
//! references). The caps count, the injection screen reads and the redactor rewrites exactly
//! what this walk visits, so a new block type cannot slip past one of them alone.

use std::borrow::Cow;

use super::{
    error::ApiError,
    json::{Duplicates, Failure, Json},
};

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
    pub fn read(request: &mut Json<'_>) -> Result<Self, ApiError> {
        let wrong =
            |field: &str, what: &str| ApiError::InvalidRequest(format!("{field}: must be {what}"));
        let mut facts = Self {
            model: match request.get("model") {
                None => None,
                Some(Json::Str(s)) => Some(s.to_string()),
                Some(_) => return Err(wrong("model", "a string")),
            },
            max_tokens: match request.get("max_tokens") {
                None => None,
                Some(Json::Number(n)) if n.is_u64() => n.as_u64(),
                Some(_) => return Err(wrong("max_tokens", "a non-negative integer")),
            },
            stream: match request.get("stream") {
                None => false,
                Some(Json::Bool(b)) => *b,
                Some(_) => return Err(wrong("stream", "a boolean")),
            },
            user_id: match request.get("metadata").and_then(|m| m.get("user_id")) {
                None | Some(Json::Null) => None,
                Some(Json::Str(s)) if s.chars().count() <= MAX_USER_ID_CHARS => Some(s.to_string()),
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
            let Json::Array(servers) = servers else {
                return Err(wrong("mcp_servers", "an array"));
            };
            for server in servers {
                match server.get("url") {
                    Some(Json::Str(url)) => facts.mcp_urls.push(url.to_string()),
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

/// One place the walk visits; `'b` is the body the tree borrows from.
pub enum Piece<'p, 'b> {
    /// Text a person, a document or a tool wrote; the redactor may rewrite it. `system` marks
    /// the app's own system prompt, which the injection screen leaves alone.
    Text {
        text: &'p mut Cow<'b, str>,
        system: bool,
    },
    /// Text that must reach the upstream unchanged: a thinking block, whose signature covers it.
    Signed(&'p str),
    /// Content the proxy cannot read, by its encoded size in bytes (0 for a URL or file id).
    Unreadable(usize),
}

/// What the walk hands each piece to.
pub type Visit<'f, 'b> = dyn FnMut(Piece<'_, 'b>) + 'f;

/// Visits every piece of one Messages request: `system`, then each message's content.
pub fn walk<'b>(request: &mut Json<'b>, f: &mut Visit<'_, 'b>) {
    if let Some(system) = request.get_mut("system") {
        content(system, true, f);
    }
    for message in request
        .get_mut("messages")
        .and_then(Json::as_array_mut)
        .into_iter()
        .flatten()
    {
        if let Some(c) = message.get_mut("content") {
            content(c, false, f);
        }
    }
}

/// Visits a `content` value (a string or an array of blocks): of a message, or of a response.
pub fn walk_content<'b>(value: &mut Json<'b>, f: &mut Visit<'_, 'b>) {
    content(value, false, f);
}

fn content<'b>(value: &mut Json<'b>, system: bool, f: &mut Visit<'_, 'b>) {
    match value {
        Json::Str(text) => f(Piece::Text { text, system }),
        Json::Array(blocks) => {
            for b in blocks {
                block(b, system, f);
            }
        }
        _ => {}
    }
}

fn block<'b>(value: &mut Json<'b>, system: bool, f: &mut Visit<'_, 'b>) {
    match value {
        Json::Object(_) => {}
        Json::Str(text) => return f(Piece::Text { text, system }),
        _ => return,
    }
    match value.get("type").and_then(Json::as_str) {
        Some("thinking") => {
            if let Some(Json::Str(thinking)) = value.get("thinking") {
                f(Piece::Signed(thinking));
            }
            return;
        }
        // Encrypted by the API itself: nothing a client wrote.
        Some("redacted_thinking") => return,
        Some("tool_use" | "server_tool_use" | "mcp_tool_use") => {
            if let Some(input) = value.get_mut("input") {
                strings(input, f);
            }
        }
        _ => {}
    }
    for key in ["text", "title", "context"] {
        if let Some(Json::Str(text)) = value.get_mut(key) {
            f(Piece::Text { text, system });
        }
    }
    if let Some(src) = value.get_mut("source") {
        source(src, f);
    }
    if let Some(inner) = value.get_mut("content") {
        content(inner, system, f);
    }
    if let Some(Json::Array(citations)) = value.get_mut("citations") {
        for citation in citations {
            if let Some(Json::Str(text)) = citation.get_mut("cited_text") {
                f(Piece::Text {
                    text,
                    system: false,
                });
            }
        }
    }
}

/// The `source` of an image, a document or a search result.
fn source<'b>(value: &mut Json<'b>, f: &mut Visit<'_, 'b>) {
    match value {
        // A search result names its source by URL.
        Json::Str(text) => f(Piece::Text {
            text,
            system: false,
        }),
        Json::Object(_) => match value.get("type").and_then(Json::as_str) {
            Some("text") => {
                if let Some(Json::Str(text)) = value.get_mut("data") {
                    f(Piece::Text {
                        text,
                        system: false,
                    });
                }
            }
            Some("content") => {
                if let Some(inner) = value.get_mut("content") {
                    content(inner, false, f);
                }
            }
            Some("base64") => f(Piece::Unreadable(
                value.get("data").and_then(Json::as_str).map_or(0, str::len),
            )),
            // url, file and any type this proxy does not know: it cannot see the content.
            _ => f(Piece::Unreadable(0)),
        },
        _ => {}
    }
}

/// Every string value (not key) inside a tool input.
fn strings<'b>(value: &mut Json<'b>, f: &mut Visit<'_, 'b>) {
    match value {
        Json::Str(text) => f(Piece::Text {
            text,
            system: false,
        }),
        Json::Array(items) => items.iter_mut().for_each(|v| strings(v, f)),
        Json::Object(members) => members.iter_mut().for_each(|(_, v)| strings(v, f)),
        _ => {}
    }
}

/// Most JSON values one request body may hold: one per 16 bytes of the largest body. A tree
/// costs 30 to 60 bytes a value, so a body of nothing but small values (`[0,0,0,...]`, 2 bytes
/// each) would be built into about 16 times its size: 512 MiB for a 32 MiB body, on a gateway
/// that many tenants share. At this bound the tree stays within a few times the body limit,
/// while real bodies stay below it: a text is one value however long, so their values average
/// well over 16 bytes, and a batch of 100,000 requests (the API's largest) may hold 20 values
/// in each.
pub const MAX_JSON_VALUES: usize = MAX_BODY_BYTES / 16;
const _: () = assert!(
    2 + 100_000 * 20 <= MAX_JSON_VALUES,
    "a batch of 100,000 requests of 20 values each must fit"
);

/// What one value of a parsed body's tree is counted as in the body budget: its node, and an
/// object member's key beside it (30 to 60 bytes, above).
pub const TREE_BYTES_PER_VALUE: usize = 48;
const _: () = assert!(std::mem::size_of::<Json<'static>>() <= TREE_BYTES_PER_VALUE);

/// Parses a request body, borrowing its strings, and says how many values its tree holds. A
/// key repeated in one object is refused: the proxy and the upstream could otherwise read
/// different values of it (one checks the first, the other forwards the last).
pub fn parse(body: &[u8]) -> Result<(Json<'_>, usize), ApiError> {
    Json::parse_counted(body, Duplicates::Refuse, MAX_JSON_VALUES).map_err(|e| {
        let invalid = |what: &str| {
            ApiError::InvalidRequest(format!(
                "request body {what} (line {}, column {})",
                e.line, e.column
            ))
        };
        match e.failure {
            Failure::TooManyValues => ApiError::TooLarge(format!(
                "request body holds more than {MAX_JSON_VALUES} JSON values"
            )),
            Failure::DuplicateKey => invalid("repeats a key in one object"),
            Failure::Syntax => invalid("is not valid JSON"),
        }
    })
}

/// The Messages requests inside a body: the body itself, or each `requests[].params` of a
/// batch, which are full Messages requests and get every check one gets.
pub fn messages_mut<'t, 'b>(
    body: &'t mut Json<'b>,
    batch: bool,
) -> Result<impl Iterator<Item = &'t mut Json<'b>>, ApiError> {
    // Both shapes are one iterator type: the body alone, chained to no params; or nothing,
    // chained to every params.
    if !batch {
        return Ok(Some(body).into_iter().chain(None.into_iter().flatten()));
    }
    let requests = body
        .get_mut("requests")
        .and_then(Json::as_array_mut)
        .ok_or_else(|| ApiError::InvalidRequest("requests: must be an array".into()))?;
    if !requests
        .iter()
        .all(|r| matches!(r.get("params"), Some(Json::Object(_))))
    {
        return Err(ApiError::InvalidRequest(
            "requests[].params: must be an object".into(),
        ));
    }
    let params = requests.iter_mut().filter_map(|r| r.get_mut("params"));
    Ok(None.into_iter().chain(Some(params).into_iter().flatten()))
}

#[cfg(test)]
#[path = "request_tests.rs"]
mod tests;
