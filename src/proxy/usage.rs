//! Token usage of one request: a leaf value type shared by the SSE reader, the audit line, the
//! limiter's settlement and the metrics, so none of them has to import another.

use super::json::Json;

/// Token counts of one request by direction.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub input: u64,
    pub output: u64,
    pub cache_creation: u64,
    pub cache_read: u64,
}

impl Usage {
    pub fn total(&self) -> u64 {
        self.input + self.output + self.cache_creation + self.cache_read
    }

    /// What a token limit charges: cache reads are billed apart and do not count.
    pub fn charged(&self) -> u64 {
        self.input + self.output + self.cache_creation
    }

    /// Reads the usage fields present in a `usage` object, leaving absent ones as they were (a
    /// `message_delta` may carry only `output_tokens`; its values are cumulative, so overwrite).
    pub fn merge(&mut self, usage: &Json<'_>) {
        self.merge_fields(|name| usage.get(name).and_then(Json::as_u64));
    }

    /// [`Usage::merge`] over any JSON object, given how to read one of its counts.
    pub fn merge_fields(&mut self, field: impl Fn(&str) -> Option<u64>) {
        if let Some(n) = field("input_tokens") {
            self.input = n;
        }
        if let Some(n) = field("output_tokens") {
            self.output = n;
        }
        if let Some(n) = field("cache_creation_input_tokens") {
            self.cache_creation = n;
        }
        if let Some(n) = field("cache_read_input_tokens") {
            self.cache_read = n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_overwrites_present_fields_only() {
        let mut u = Usage::default();
        let json = |v| Json::owned(&v);
        u.merge(&json(
            serde_json::json!({ "input_tokens": 5, "cache_read_input_tokens": 2 }),
        ));
        u.merge(&json(serde_json::json!({ "output_tokens": 7 })));
        u.merge(&json(
            serde_json::json!({ "output_tokens": 9, "input_tokens": "5" }),
        ));
        assert_eq!(
            u,
            Usage {
                input: 5,
                output: 9,
                cache_creation: 0,
                cache_read: 2
            }
        );
        assert_eq!(u.total(), 16);
        assert_eq!(u.charged(), 14);
    }
}
