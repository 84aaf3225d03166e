//! A complete (non-streamed) Messages response read in one borrowing pass: its `usage`, and
//! whether any string under `content` is one the redactor might rewrite. Most responses have
//! none; they are then forwarded as they came, never built into a `serde_json::Value` (about
//! two dozen allocations and a copy of every text, for a response nobody changes).
//!
//! The pass asks about every string value under `content`, a superset of the texts
//! `request::walk_content` hands the redactor, so "nothing suspect" means the full path would
//! change nothing. Anything unexpected (not JSON, not an object) is an error: the caller then
//! takes the full path, which decides as it always did.

use std::{cell::Cell, fmt};

use serde::de::{
    self, DeserializeSeed, Deserializer as _, IgnoredAny, MapAccess, SeqAccess, Visitor,
};

use super::{json::Node, usage::Usage};

/// What one pass over a complete message found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Scanned {
    pub usage: Usage,
    /// Some string under `content` may hold something to redact: take the full path.
    pub suspect: bool,
}

/// A question about one text: might the redactor rewrite it?
pub type Suspect<'f> = &'f dyn Fn(&str) -> bool;

/// Reads `body` as one JSON object, asking `suspect` about the strings under `content` until it
/// says yes.
pub fn scan(body: &[u8], suspect: Suspect<'_>) -> serde_json::Result<Scanned> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let scanned = (&mut de).deserialize_map(Message { suspect })?;
    de.end()?;
    Ok(scanned)
}

struct Message<'f> {
    suspect: Suspect<'f>,
}

impl<'de> Visitor<'de> for Message<'_> {
    type Value = Scanned;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a Messages response object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Scanned, A::Error> {
        let mut scanned = Scanned::default();
        // Read into a borrowed tree as the full path reads it (a `Value` copied its four keys
        // into a `BTreeMap`: ~3k instructions a response).
        let unbounded = Cell::new(usize::MAX);
        while let Some(key) = map.next_key::<Key>()? {
            match key {
                Key::Content => {
                    let ask = (!scanned.suspect).then_some(self.suspect);
                    scanned.suspect |= map.next_value_seed(Strings { ask })?;
                }
                // The last `usage` wins, as it does in the full path's tree.
                Key::Usage => {
                    let usage = map.next_value_seed(Node::last_wins(&unbounded))?;
                    scanned.usage = Usage::default();
                    scanned.usage.merge(&usage);
                }
                Key::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(scanned)
    }
}

/// The two top-level fields the proxy reads, compared without copying the key.
enum Key {
    Content,
    Usage,
    Other,
}

impl<'de> de::Deserialize<'de> for Key {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_identifier(KeyVisitor)
    }
}

struct KeyVisitor;

impl Visitor<'_> for KeyVisitor {
    type Value = Key;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a field name")
    }

    fn visit_str<E: de::Error>(self, name: &str) -> Result<Key, E> {
        Ok(match name {
            "content" => Key::Content,
            "usage" => Key::Usage,
            _ => Key::Other,
        })
    }
}

/// Every string value inside one JSON value (object keys are never redacted); `true` as soon as
/// `ask` says yes, after which the rest is only read (`ask` is `None`).
struct Strings<'f> {
    ask: Option<Suspect<'f>>,
}

impl<'de> DeserializeSeed<'de> for Strings<'_> {
    type Value = bool;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Strings<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<bool, E> {
        Ok(self.ask.is_some_and(|ask| ask(text)))
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<bool, E> {
        Ok(false)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<bool, E> {
        Ok(false)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<bool, E> {
        Ok(false)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<bool, E> {
        Ok(false)
    }

    fn visit_unit<E: de::Error>(self) -> Result<bool, E> {
        Ok(false)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<bool, A::Error> {
        let mut found = false;
        loop {
            let ask = if found { None } else { self.ask };
            match seq.next_element_seed(Strings { ask })? {
                Some(hit) => found |= hit,
                None => return Ok(found),
            }
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
        let mut found = false;
        while map.next_key::<IgnoredAny>()?.is_some() {
            let ask = if found { None } else { self.ask };
            found |= map.next_value_seed(Strings { ask })?;
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::json::Json;
    use std::cell::RefCell;

    fn asked(body: &str) -> (serde_json::Result<Scanned>, Vec<String>) {
        let seen = RefCell::new(Vec::new());
        let result = scan(body.as_bytes(), &|text| {
            seen.borrow_mut().push(text.to_string());
            text.contains('@')
        });
        (result, seen.into_inner())
    }

    #[test]
    fn asks_about_every_string_under_content_and_nothing_else() {
        let (scanned, seen) = asked(
            r#"{"id":"msg_1","content":[{"type":"text","text":"hi","citations":[{"cited_text":"c"}]},
                {"type":"tool_use","input":{"to":["x",{"deep":"y"}],"n":1.5,"ok":true,"none":null}}],
                "model":"m","usage":{"input_tokens":3,"output_tokens":4,"cache_read_input_tokens":2}}"#,
        );
        let scanned = scanned.unwrap();
        assert_eq!(seen, ["text", "hi", "c", "tool_use", "x", "y"]);
        assert!(!scanned.suspect);
        assert_eq!(
            scanned.usage,
            Usage {
                input: 3,
                output: 4,
                cache_creation: 0,
                cache_read: 2
            }
        );
    }

    #[test]
    fn a_suspect_string_stops_the_questions_but_not_the_reading() {
        let (scanned, seen) = asked(
            r#"{"content":[{"text":"a@b.io"},{"text":"later"}],"usage":{"output_tokens":9}}"#,
        );
        let scanned = scanned.unwrap();
        assert!(scanned.suspect);
        assert_eq!(seen, ["a@b.io"]);
        assert_eq!(scanned.usage.output, 9);
    }

    #[test]
    fn escaped_strings_are_asked_about_decoded() {
        let (scanned, seen) = asked(r#"{"content":"mail a\u0040b.io\nnow"}"#);
        assert!(scanned.unwrap().suspect);
        assert_eq!(seen, ["mail a@b.io\nnow"]);
    }

    #[test]
    fn the_last_usage_wins_as_in_a_value() {
        let body = r#"{"usage":{"input_tokens":1,"output_tokens":2},"usage":{"output_tokens":5}}"#;
        let (scanned, _) = asked(body);
        let mut expected = Usage::default();
        let value = serde_json::from_str::<serde_json::Value>(body).unwrap();
        expected.merge(&Json::owned(&value["usage"]));
        assert_eq!(scanned.unwrap().usage, expected);
        assert_eq!(expected.input, 0);
    }

    #[test]
    fn anything_but_one_json_object_is_an_error() {
        for body in [
            "[1]",
            "\"text\"",
            "{\"content\":",
            "{} trailing",
            "not json",
            "",
        ] {
            assert!(asked(body).0.is_err(), "{body:?}");
        }
    }
}
