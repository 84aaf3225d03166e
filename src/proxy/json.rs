//! A JSON tree that borrows its strings from the body it was parsed from: what the pipeline
//! reads a Messages request into (and a complete response it may redact). A string without
//! escapes, which is nearly every string, is a slice of the body rather than a copy, and an
//! object keeps its keys in the client's order, so a body re-encoded after redaction differs
//! from the client's only where a text was rewritten (issue 21: the request is parsed once,
//! borrowed where possible, re-serialized only when something changed).
//!
//! Written here rather than taken from `serde_json_borrow`: the pipeline rewrites strings in
//! place and must refuse a key repeated in one object while the tree is built, and that crate's
//! objects offer neither.

use std::{
    borrow::Cow,
    cell::Cell,
    collections::{HashMap, HashSet},
    fmt,
};

use serde::{
    Serialize, Serializer,
    de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor},
    ser::{SerializeMap, SerializeSeq},
};
use serde_json::Number;

/// One JSON value; strings borrow from the parsed body where they can.
#[derive(Debug, Clone, PartialEq)]
pub enum Json<'a> {
    Null,
    Bool(bool),
    Number(Number),
    Str(Cow<'a, str>),
    Array(Vec<Json<'a>>),
    /// Members in the order they came (no key twice: see [`Duplicates`]).
    Object(Vec<(Cow<'a, str>, Json<'a>)>),
}

/// What a key repeated in one object does to the parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Duplicates {
    /// The parse fails: the proxy and the upstream could read different values of the key.
    Refuse,
    /// The last value is kept, as `serde_json::Value` does (for bodies the upstream wrote).
    LastWins,
}

/// Why a body is not a JSON tree.
#[derive(Debug)]
pub struct ParseError {
    pub failure: Failure,
    pub line: usize,
    pub column: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Not one JSON document.
    Syntax,
    /// A key repeated in one object, under [`Duplicates::Refuse`].
    DuplicateKey,
    /// More values than the parse allows.
    TooManyValues,
}

impl<'a> Json<'a> {
    /// Parses one JSON document (nothing but whitespace after it) of at most `max_values`
    /// values (every scalar, array and object counts one).
    ///
    /// The body is checked to be UTF-8 once, whole, and parsed as text: parsed as bytes, each
    /// string is checked on its own, and a request's few dozen short strings cost more than
    /// the one pass (`hack/hotpath.sh`: 0.7% of a request's instructions).
    pub fn parse(
        body: &'a [u8],
        duplicates: Duplicates,
        max_values: usize,
    ) -> Result<Self, ParseError> {
        Self::parse_counted(body, duplicates, max_values).map(|(json, _)| json)
    }

    /// [`Json::parse`], also saying how many values the tree holds (what it costs in memory).
    pub fn parse_counted(
        body: &'a [u8],
        duplicates: Duplicates,
        max_values: usize,
    ) -> Result<(Self, usize), ParseError> {
        let text = std::str::from_utf8(body).map_err(|e| not_utf8(body, e.valid_up_to()))?;
        let mut de = serde_json::Deserializer::from_str(text);
        let budget = Cell::new(max_values);
        let parsed = Node {
            duplicates,
            budget: &budget,
        }
        .deserialize(&mut de)
        .and_then(|v| de.end().map(|()| (v, max_values - budget.get())));
        parsed.map_err(|e| {
            let said = |what: &str| e.is_data() && e.to_string().starts_with(what);
            let failure = if said(DUPLICATE) {
                Failure::DuplicateKey
            } else if said(TOO_MANY) {
                Failure::TooManyValues
            } else {
                Failure::Syntax
            };
            ParseError {
                failure,
                line: e.line(),
                column: e.column(),
            }
        })
    }

    /// The member `key` of an object (`None` for anything else).
    pub fn get(&self, key: &str) -> Option<&Json<'a>> {
        match self {
            Json::Object(members) => members.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn get_mut(&mut self, key: &str) -> Option<&mut Json<'a>> {
        match self {
            Json::Object(members) => members.iter_mut().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Json::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Json::Number(n) => n.as_u64(),
            _ => None,
        }
    }

    pub fn as_array_mut(&mut self) -> Option<&mut Vec<Json<'a>>> {
        match self {
            Json::Array(items) => Some(items),
            _ => None,
        }
    }

    /// The encoded tree.
    pub fn to_vec(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a JSON tree always encodes")
    }
}

#[cfg(test)]
impl Json<'static> {
    /// An owned copy of a `serde_json::Value` (tests build requests with `json!`).
    pub fn owned(value: &serde_json::Value) -> Self {
        use serde_json::Value;
        match value {
            Value::Null => Json::Null,
            Value::Bool(b) => Json::Bool(*b),
            Value::Number(n) => Json::Number(n.clone()),
            Value::String(s) => Json::Str(Cow::Owned(s.clone())),
            Value::Array(items) => Json::Array(items.iter().map(Json::owned).collect()),
            Value::Object(map) => Json::Object(
                map.iter()
                    .map(|(k, v)| (Cow::Owned(k.clone()), Json::owned(v)))
                    .collect(),
            ),
        }
    }
}

impl Serialize for Json<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Json::Null => s.serialize_unit(),
            Json::Bool(b) => s.serialize_bool(*b),
            Json::Number(n) => n.serialize(s),
            Json::Str(text) => s.serialize_str(text),
            Json::Array(items) => {
                let mut seq = s.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(item)?;
                }
                seq.end()
            }
            Json::Object(members) => {
                let mut map = s.serialize_map(Some(members.len()))?;
                for (key, value) in members {
                    map.serialize_entry(key.as_ref(), value)?;
                }
                map.end()
            }
        }
    }
}

/// JSON is UTF-8: a body that is not fails as a syntax error at its first byte that is not.
fn not_utf8(body: &[u8], at: usize) -> ParseError {
    let before = &body[..at];
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    ParseError {
        failure: Failure::Syntax,
        line: 1 + before.iter().filter(|&&b| b == b'\n').count(),
        column: at - line_start + 1,
    }
}

const DUPLICATE: &str = "duplicate key";
const TOO_MANY: &str = "too many values";

/// Objects up to this many members are checked for a repeated key pair by pair; larger ones
/// through a set, so a hostile object of a million keys costs a million steps, not 10^12.
const PAIRWISE_MEMBERS: usize = 16;

/// Whether some key appears twice among `members`.
fn has_duplicate(members: &[(Cow<'_, str>, Json<'_>)]) -> bool {
    if members.len() <= PAIRWISE_MEMBERS {
        return members
            .iter()
            .enumerate()
            .any(|(i, (k, _))| members[..i].iter().any(|(seen, _)| seen == k));
    }
    let mut seen = HashSet::with_capacity(members.len());
    !members.iter().all(|(k, _)| seen.insert(k.as_ref()))
}

/// `members` with only the last member of each repeated key (linear: the body may be hostile).
fn last_wins<'a>(members: Vec<(Cow<'a, str>, Json<'a>)>) -> Vec<(Cow<'a, str>, Json<'a>)> {
    let last: HashMap<Cow<'a, str>, usize> = members
        .iter()
        .enumerate()
        .map(|(i, (key, _))| (key.clone(), i))
        .collect();
    members
        .into_iter()
        .enumerate()
        .filter(|(i, (key, _))| last[key] == *i)
        .map(|(_, member)| member)
        .collect()
}

/// Builds one [`Json`] node (a seed, so the duplicate rule and the budget of values reach
/// every nested value).
#[derive(Clone, Copy)]
pub struct Node<'c> {
    duplicates: Duplicates,
    /// Values the parse may still build.
    budget: &'c Cell<usize>,
}

impl<'c> Node<'c> {
    /// One value inside another parse (`next_value_seed`), read as [`Json::parse`] with
    /// [`Duplicates::LastWins`] reads it, its values counted against `budget`.
    pub fn last_wins(budget: &'c Cell<usize>) -> Self {
        Self {
            duplicates: Duplicates::LastWins,
            budget,
        }
    }
}

impl<'de> DeserializeSeed<'de> for Node<'_> {
    type Value = Json<'de>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Json<'de>, D::Error> {
        let left = self.budget.get();
        if left == 0 {
            return Err(de::Error::custom(TOO_MANY));
        }
        self.budget.set(left - 1);
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Node<'_> {
    type Value = Json<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Json<'de>, E> {
        Ok(Json::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Json<'de>, E> {
        Ok(Json::Number(v.into()))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Json<'de>, E> {
        Ok(Json::Number(v.into()))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Json<'de>, E> {
        Ok(Number::from_f64(v).map_or(Json::Null, Json::Number))
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Json<'de>, E> {
        Ok(Json::Str(Cow::Borrowed(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Json<'de>, E> {
        Ok(Json::Str(Cow::Owned(v.to_owned())))
    }
    fn visit_string<E>(self, v: String) -> Result<Json<'de>, E> {
        Ok(Json::Str(Cow::Owned(v)))
    }
    fn visit_unit<E>(self) -> Result<Json<'de>, E> {
        Ok(Json::Null)
    }
    fn visit_none<E>(self) -> Result<Json<'de>, E> {
        Ok(Json::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Json<'de>, D::Error> {
        self.deserialize(d)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Json<'de>, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
        while let Some(item) = seq.next_element_seed(self)? {
            items.push(item);
        }
        Ok(Json::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Json<'de>, A::Error> {
        let mut members = Vec::new();
        while let Some(key) = access.next_key_seed(Key)? {
            members.push((key, access.next_value_seed(self)?));
        }
        if !has_duplicate(&members) {
            return Ok(Json::Object(members));
        }
        match self.duplicates {
            Duplicates::Refuse => Err(de::Error::custom(DUPLICATE)),
            Duplicates::LastWins => Ok(Json::Object(last_wins(members))),
        }
    }
}

/// An object key, borrowed when it has no escapes (serde's own `Cow<str>` always copies).
struct Key;

impl<'de> DeserializeSeed<'de> for Key {
    type Value = Cow<'de, str>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Cow<'de, str>, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Key {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object key")
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Borrowed(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Owned(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Owned(v))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn parse(text: &str) -> Result<Json<'_>, ParseError> {
        Json::parse(text.as_bytes(), Duplicates::Refuse, usize::MAX)
    }

    fn failure(text: &str) -> Failure {
        parse(text).unwrap_err().failure
    }

    #[test]
    fn strings_without_escapes_borrow_from_the_body() {
        let tree = parse(r#"{"plain": "hello", "escaped": "a\nb"}"#).unwrap();
        assert!(matches!(
            tree.get("plain"),
            Some(Json::Str(Cow::Borrowed("hello")))
        ));
        assert!(matches!(tree.get("escaped"), Some(Json::Str(Cow::Owned(s))) if s == "a\nb"));
        let Json::Object(members) = &tree else {
            panic!("an object")
        };
        assert!(members.iter().all(|(k, _)| matches!(k, Cow::Borrowed(_))));
    }

    #[test]
    fn a_body_that_is_not_utf8_is_a_syntax_error_where_it_stops_being_so() {
        for (body, line, column) in [
            (&b"{\"a\":\n \"x\xffy\"}"[..], 2, 4),
            (b"\xc3", 1, 1),
            (b"{\"a\": 1} \xe2\x82", 1, 10),
        ] {
            let e = Json::parse(body, Duplicates::Refuse, 100).unwrap_err();
            assert_eq!(
                (e.failure, e.line, e.column),
                (Failure::Syntax, line, column)
            );
        }
        // Every other character, in strings and keys, still reads as serde_json reads it.
        let text = r#"{"é…": "日本語 \ud83d\ude00 😀"}"#;
        let ours: Value = serde_json::from_slice(&parse(text).unwrap().to_vec()).unwrap();
        assert_eq!(ours, serde_json::from_str::<Value>(text).unwrap());
    }

    #[test]
    fn encodes_as_serde_json_reads_it_keeping_the_clients_key_order() {
        let text = r#"{"z":1,"a":[true,null,-2,1.5,"x\u0001"],"m":{"k":"\"q\""},"e":{}}"#;
        let tree = parse(text).unwrap();
        assert_eq!(String::from_utf8(tree.to_vec()).unwrap(), text);
        let ours: Value = serde_json::from_slice(&tree.to_vec()).unwrap();
        let theirs: Value = serde_json::from_str(text).unwrap();
        assert_eq!(ours, theirs);
    }

    #[test]
    fn a_repeated_key_is_refused_at_any_depth_and_any_object_size() {
        for text in [
            r#"{"model": "a", "model": "b"}"#,
            r#"{"messages": [{"content": "x", "role": "user", "content": "y"}]}"#,
            r#"{"k": 1, "k\u0000": 2, "k": 3}"#,
        ] {
            assert_eq!(failure(text), Failure::DuplicateKey, "{text}");
        }
        let mut big: serde_json::Map<String, Value> =
            (0..100).map(|i| (format!("k{i}"), json!(i))).collect();
        let unique = Value::Object(big.clone()).to_string();
        assert!(parse(&unique).is_ok());
        big.insert("k99x".into(), json!(0));
        let repeated = Value::Object(big).to_string().replace("k99x", "k7");
        assert_eq!(failure(&repeated), Failure::DuplicateKey);
        // The same key spelled with an escape is the same key.
        assert_eq!(failure(r#"{"ab": 1, "a\u0062": 2}"#), Failure::DuplicateKey);
        // Equal keys in different objects are fine.
        assert!(parse(r#"{"a":{"k":1},"b":{"k":2}}"#).is_ok());
    }

    #[test]
    fn last_wins_keeps_one_member_per_key_as_serde_json_does() {
        let text = r#"{"a": 1, "b": 2, "a": {"c": 3, "c": 4}}"#;
        let tree = Json::parse(text.as_bytes(), Duplicates::LastWins, usize::MAX).unwrap();
        assert_eq!(
            String::from_utf8(tree.to_vec()).unwrap(),
            r#"{"b":2,"a":{"c":4}}"#
        );
        let theirs: Value = serde_json::from_str(text).unwrap();
        assert_eq!(
            serde_json::from_slice::<Value>(&tree.to_vec()).unwrap(),
            theirs
        );
    }

    #[test]
    fn refuses_what_is_not_one_json_document() {
        for text in [
            "{",
            r#"{"a":1} trailing"#,
            "[1,]",
            r#"{"a" 1}"#,
            "\"\\ud800\"",
        ] {
            assert_eq!(failure(text), Failure::Syntax, "{text}");
        }
        let deep = "[".repeat(200) + &"]".repeat(200);
        assert!(parse(&deep).is_err(), "serde_json's depth limit holds");
    }

    #[test]
    fn every_value_counts_against_the_budget() {
        // The object, the array, its 3 elements and the empty object: 6 values (keys do not
        // count).
        let text = r#"{"a": [1, "x", null], "b": {}}"#;
        let at = |max| Json::parse(text.as_bytes(), Duplicates::Refuse, max);
        assert!(at(6).is_ok());
        assert_eq!(at(5).unwrap_err().failure, Failure::TooManyValues);
        assert_eq!(at(0).unwrap_err().failure, Failure::TooManyValues);
        // A flat array of a million zeros is refused long before it is built.
        let zeros = format!("[{}0]", "0,".repeat(1_000_000));
        let err = Json::parse(zeros.as_bytes(), Duplicates::Refuse, 1000).unwrap_err();
        assert_eq!(err.failure, Failure::TooManyValues);
        assert!(err.column < 2100, "stopped at column {}", err.column);
    }
}
