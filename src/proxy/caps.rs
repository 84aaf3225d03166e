//! Size caps of a ClaudeKey's scope (`max_tokens`, input size) and its data-protection rule for
//! content the proxy cannot read.

use super::{error::ApiError, request::Facts};
use crate::crd::{DataProtectionSpec, ScopeSpec};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Caps {
    pub max_tokens: Option<u32>,
    pub max_input_chars: Option<u64>,
    pub refuse_unreadable: bool,
}

impl Caps {
    pub fn new(scope: &ScopeSpec, data_protection: &DataProtectionSpec) -> Self {
        Self {
            max_tokens: scope.max_tokens,
            max_input_chars: scope.max_input_chars,
            refuse_unreadable: data_protection.refuse_unreadable_content,
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
            && facts.input_size() > cap
        {
            return Err(ApiError::TooLarge(format!(
                "input of {} characters exceeds this ClaudeKey's cap of {cap}",
                facts.input_size()
            )));
        }
        if self.refuse_unreadable && facts.unreadable > 0 {
            return Err(ApiError::InvalidRequest(
                "this ClaudeKey redacts what leaves the pod and the proxy cannot read images, PDFs or URL and file references; send text (dataProtection.refuseUnreadableContent)".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(max_tokens: u64, text_chars: u64) -> Facts {
        Facts {
            max_tokens: Some(max_tokens),
            text_chars,
            ..Default::default()
        }
    }

    #[test]
    fn enforces_both_caps() {
        let caps = Caps {
            max_tokens: Some(1000),
            max_input_chars: Some(50),
            ..Default::default()
        };
        assert!(caps.check(&facts(1000, 50), true).is_ok());
        assert_eq!(
            caps.check(&facts(1001, 10), true).unwrap_err().status(),
            400
        );
        assert!(caps.check(&facts(1001, 10), false).is_ok());
        assert_eq!(caps.check(&facts(10, 51), true).unwrap_err().status(), 413);
        // Unreadable content counts by its size.
        let image = Facts {
            text_chars: 10,
            unreadable: 1,
            unreadable_bytes: 41,
            ..Default::default()
        };
        assert_eq!(caps.check(&image, true).unwrap_err().status(), 413);
    }

    #[test]
    fn unreadable_content_is_refused_only_when_asked() {
        let image = Facts {
            unreadable: 1,
            ..Default::default()
        };
        assert!(Caps::default().check(&image, true).is_ok());
        let strict = Caps {
            refuse_unreadable: true,
            ..Default::default()
        };
        assert_eq!(strict.check(&image, true).unwrap_err().status(), 400);
        assert!(strict.check(&Facts::default(), true).is_ok());
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
