//! Durations written the Kubernetes way (`5m`, `15m`, `2160h`, `1h30m`), so CEL's `duration()`
//! and our own parser agree on every value the schema admits.

use std::{fmt, str::FromStr, time::Duration};

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Go `time.ParseDuration` syntax restricted to non-negative values: what both the apiserver's
/// CEL `duration()` and [`GoDuration::from_str`] accept.
pub const PATTERN: &str = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$";

/// A non-negative duration kept in the text form the user wrote it in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GoDuration {
    text: String,
    value: Duration,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid duration {text:?}: use a number with a unit such as 30s, 15m or 2160h")]
pub struct DurationError {
    text: String,
}

impl GoDuration {
    pub fn as_duration(&self) -> Duration {
        self.value
    }

    /// The same span as a chrono duration, for arithmetic on timestamps.
    pub fn as_chrono(&self) -> chrono::TimeDelta {
        chrono::TimeDelta::from_std(self.value).unwrap_or(chrono::TimeDelta::MAX)
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl FromStr for GoDuration {
    type Err = DurationError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let err = || DurationError { text: text.to_string() };
        let mut total = 0f64;
        let mut rest = text;
        if rest.is_empty() {
            return Err(err());
        }
        while !rest.is_empty() {
            let number_len = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .ok_or_else(err)?;
            let number: f64 = rest[..number_len].parse().map_err(|_| err())?;
            rest = &rest[number_len..];
            let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
            let seconds_per_unit = match &rest[..unit_len] {
                "ns" => 1e-9,
                "us" | "µs" => 1e-6,
                "ms" => 1e-3,
                "s" => 1.0,
                "m" => 60.0,
                "h" => 3600.0,
                _ => return Err(err()),
            };
            rest = &rest[unit_len..];
            total += number * seconds_per_unit;
        }
        let value = Duration::try_from_secs_f64(total).map_err(|_| err())?;
        Ok(Self { text: text.to_string(), value })
    }
}

impl fmt::Display for GoDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Serialize for GoDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for GoDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for GoDuration {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "GoDuration".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({ "type": "string", "pattern": PATTERN })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(text: &str) -> Option<f64> {
        text.parse::<GoDuration>().ok().map(|d| d.as_duration().as_secs_f64())
    }

    #[test]
    fn parses_kubernetes_style() {
        assert_eq!(secs("5m"), Some(300.0));
        assert_eq!(secs("2160h"), Some(2160.0 * 3600.0));
        assert_eq!(secs("1h30m"), Some(5400.0));
        assert_eq!(secs("0s"), Some(0.0));
        assert_eq!(secs("1.5s"), Some(1.5));
        assert_eq!(secs("250ms"), Some(0.25));
    }

    #[test]
    fn rejects_what_the_schema_rejects() {
        let pattern = regex::Regex::new(PATTERN).unwrap();
        for bad in ["", "5", "m", "-5m", "5 m", "5d", "1h-30m", "abc"] {
            assert_eq!(secs(bad), None, "{bad:?} parsed");
            assert!(!pattern.is_match(bad), "{bad:?} matched the schema pattern");
        }
        for good in ["5m", "2160h", "1h30m", "0s", "1.5s", "10us", "10µs"] {
            assert!(pattern.is_match(good) && secs(good).is_some(), "{good:?}");
        }
    }

    #[test]
    fn round_trips_its_text() {
        let d: GoDuration = serde_json::from_str("\"1h30m\"").unwrap();
        assert_eq!(serde_json::to_string(&d).unwrap(), "\"1h30m\"");
    }
}
