//! Size caps of a ClaudeKey's scope: `max_tokens` and the characters of input text.

use super::{error::ApiError, request::Facts};
use crate::crd::ScopeSpec;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Caps {
    pub max_tokens: Option<u32>,
    pub max_input_chars: Option<u64>,
}

impl Caps {
    pub fn new(spec: &ScopeSpec) -> Self {
        Self {
            max_tokens: spec.max_tokens,
            max_input_chars: spec.max_input_chars,
        }
    }

    /// `max_tokens` above the cap is a 400 (the request itself is wrong); input above the cap a
    /// 413, as the API answers for oversized requests. `check_max_tokens` is false for
    /// count_tokens, which takes no `max_tokens`.
    pub fn check(&self, facts: &Facts, check_max_tokens: bool) -> Result<(), ApiError> {
        if let (true, Some(cap), Some(asked)) =
            (check_max_tokens, self.max_tokens, facts.max_tokens)
            && asked > u64::from(cap)
        {
            return Err(ApiError::InvalidRequest(format!(
                "max_tokens: {asked} exceeds this ClaudeKey's cap of {cap}"
            )));
        }
        if let Some(cap) = self.max_input_chars
            && facts.input_chars > cap
        {
            return Err(ApiError::TooLarge(format!(
                "input of {} characters exceeds this ClaudeKey's cap of {cap}",
                facts.input_chars
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(max_tokens: u64, input_chars: u64) -> Facts {
        Facts {
            max_tokens: Some(max_tokens),
            input_chars,
            ..Default::default()
        }
    }

    #[test]
    fn enforces_both_caps() {
        let caps = Caps {
            max_tokens: Some(1000),
            max_input_chars: Some(50),
        };
        assert!(caps.check(&facts(1000, 50), true).is_ok());
        assert_eq!(
            caps.check(&facts(1001, 10), true).unwrap_err().status(),
            400
        );
        assert!(caps.check(&facts(1001, 10), false).is_ok());
        assert_eq!(caps.check(&facts(10, 51), true).unwrap_err().status(), 413);
    }

    #[test]
    fn no_caps_allow_anything() {
        assert!(
            Caps::default()
                .check(&facts(u64::MAX, u64::MAX), true)
                .is_ok()
        );
    }
}
