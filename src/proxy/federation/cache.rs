//! One access token per federation source, in memory only: when to refresh it (pure, tested),
//! and the single-flight rule that keeps concurrent requests from exchanging at once.

use std::time::{Duration, Instant};

use http::HeaderValue;

/// Refresh no later than this before expiry when the lifetime allows (the SDK's advisory
/// refresh is 2 min).
const REFRESH_MARGIN: Duration = Duration::from_secs(120);
/// A token this close to its end is not sent: a request must reach Anthropic before it ends.
pub const EXPIRY_MARGIN: Duration = Duration::from_secs(5);
/// After an exchange that failed, no new attempt (and no re-read) before this.
pub const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(5);

/// When an access token of `lifetime` should be replaced: at 80 % of its life, or 2 min before
/// its end when that is earlier, but never before half of it (so a 60 s token lives 30 s, a
/// 1 h token 48 min).
pub fn refresh_after(lifetime: Duration) -> Duration {
    let by_share = lifetime.mul_f64(0.8);
    let by_margin = lifetime.saturating_sub(REFRESH_MARGIN);
    by_share.min(by_margin).max(lifetime / 2)
}

/// An access token as the proxy holds it: a sensitive header value, never logged.
#[derive(Clone)]
pub struct Access {
    /// `Bearer sk-ant-oat01-…`
    pub header: HeaderValue,
    pub refresh_at: Instant,
    pub usable_until: Instant,
}

impl Access {
    pub fn new(token: &str, lifetime: Duration, now: Instant) -> Option<Self> {
        let mut header = HeaderValue::from_str(&format!("Bearer {token}")).ok()?;
        header.set_sensitive(true);
        Some(Self {
            header,
            refresh_at: now + refresh_after(lifetime),
            usable_until: now + lifetime.saturating_sub(EXPIRY_MARGIN),
        })
    }

    pub fn fresh(&self, now: Instant) -> bool {
        now < self.refresh_at
    }

    pub fn usable(&self, now: Instant) -> bool {
        now < self.usable_until
    }
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Access").finish_non_exhaustive()
    }
}

/// What the single flight remembers between exchanges.
#[derive(Debug, Default)]
pub struct Flight {
    /// SHA-256 of the last identity token sent that got an answer (accepted or refused): it is
    /// never sent again (Anthropic refuses a reused `jti`, and a refused token stays refused).
    pub last_sent: Option<String>,
    /// The last failure, with the client-facing message, until a retry is due.
    pub failure: Option<(Instant, String)>,
}

/// What to do with an identity token just read.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Exchange it.
    Exchange,
    /// It was already sent: keep serving the current token (if any) until the kubelet writes
    /// a new one.
    AwaitNew,
}

impl Flight {
    pub fn next(&self, token_sha256: &str) -> Next {
        if self.last_sent.as_deref() == Some(token_sha256) {
            Next::AwaitNew
        } else {
            Next::Exchange
        }
    }

    /// The failure to repeat instead of trying again, while it is recent.
    pub fn recent_failure(&self, now: Instant) -> Option<&str> {
        self.failure
            .as_ref()
            .filter(|(at, _)| now < *at + RETRY_AFTER_FAILURE)
            .map(|(_, m)| m.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_comes_well_before_the_end() {
        let s = Duration::from_secs;
        assert_eq!(refresh_after(s(60)), s(30));
        assert_eq!(refresh_after(s(300)), s(180));
        assert_eq!(refresh_after(s(3600)), s(2880));
        assert_eq!(refresh_after(s(86400)), s(69120));
        for lifetime in [60, 61, 120, 600, 3600, 86400] {
            let at = refresh_after(s(lifetime));
            assert!(at < s(lifetime) - EXPIRY_MARGIN, "{lifetime}");
            assert!(at >= s(lifetime) / 2, "{lifetime}");
        }
    }

    #[test]
    fn an_identity_token_is_sent_once() {
        let mut flight = Flight::default();
        assert_eq!(flight.next("a"), Next::Exchange);
        flight.last_sent = Some("a".into());
        assert_eq!(flight.next("a"), Next::AwaitNew);
        assert_eq!(flight.next("b"), Next::Exchange);
    }

    #[test]
    fn failures_are_repeated_for_a_while_only() {
        let now = Instant::now();
        let flight = Flight {
            last_sent: None,
            failure: Some((now, "refused".into())),
        };
        assert_eq!(flight.recent_failure(now), Some("refused"));
        assert_eq!(flight.recent_failure(now + RETRY_AFTER_FAILURE), None);
    }

    #[test]
    fn access_tokens_never_show_in_debug() {
        let access = Access::new(
            "sk-ant-oat01-secret",
            Duration::from_secs(60),
            Instant::now(),
        )
        .unwrap();
        assert!(!format!("{access:?}").contains("secret"));
        assert!(access.header.is_sensitive());
    }
}
