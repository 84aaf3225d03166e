//! Rate and token limits per ClaudeKey identity (so a key rotation never resets a window):
//! requests/min by GCRA, tokens/min as a bucket that reserves before forwarding and settles on
//! real usage, and requests/hour per end user as a sliding window.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use tokio::time::Instant;

use super::error::ApiError;
use crate::{crd::LimitsSpec, proxyconf::ClaudeKeyRef};

const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);
/// Past this many tracked end users, idle ones are dropped so memory stays bounded.
const MAX_IDLE_USERS: usize = 10_000;

/// Which limit refused a request; a bounded metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Requests,
    Tokens,
    User,
}

impl Limit {
    pub fn label(self) -> &'static str {
        match self {
            Self::Requests => "requestsPerMinute",
            Self::Tokens => "tokensPerMinute",
            Self::User => "perUserRequestsPerHour",
        }
    }
}

/// A refusal: the limit, and the error the client gets.
#[derive(Debug)]
pub struct Refusal {
    pub limit: Limit,
    pub error: ApiError,
}

/// The limiter of every ClaudeKey this proxy serves, kept across config reloads.
#[derive(Default)]
pub struct Limiters {
    by_key: Mutex<HashMap<ClaudeKeyRef, Arc<KeyLimiter>>>,
}

impl Limiters {
    /// The limiter of this identity: the same one before and after a reload or rotation.
    pub fn for_key(&self, id: &ClaudeKeyRef) -> Arc<KeyLimiter> {
        let mut map = self.by_key.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(id.clone()).or_default().clone()
    }
}

#[derive(Default, Debug)]
pub struct KeyLimiter {
    state: Mutex<State>,
}

#[derive(Default, Debug)]
struct State {
    /// GCRA theoretical arrival time.
    tat: Option<Instant>,
    /// Token bucket: level at `tokens_at`; may go below zero when usage exceeded a reservation.
    tokens: Option<(f64, Instant)>,
    users: HashMap<String, VecDeque<Instant>>,
}

/// Tokens held for one request until its real usage is known.
#[derive(Debug)]
pub struct Reservation {
    limiter: Arc<KeyLimiter>,
    tokens: u64,
}

impl Reservation {
    /// Returns the unused part of the reservation, or charges what usage exceeded it.
    pub fn settle(self, used: u64) {
        if self.tokens == 0 && used == 0 {
            return;
        }
        let mut state = self.limiter.lock();
        if let Some((level, _)) = state.tokens.as_mut() {
            *level += self.tokens as f64 - used as f64;
        }
    }
}

impl KeyLimiter {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits a request or says which limit refuses it and when to retry. Nothing is counted
    /// unless every limit admits the request, so a refusal never uses up another limit.
    pub fn admit(
        self: &Arc<Self>,
        spec: &LimitsSpec,
        user: Option<&str>,
        reserve_tokens: u64,
    ) -> Result<Reservation, Refusal> {
        let now = Instant::now();
        let mut state = self.lock();
        let new_tat = match spec.requests_per_minute {
            Some(rpm) => Some(gcra(state.tat, rpm, now)?),
            None => None,
        };
        let new_level = match spec.tokens_per_minute {
            Some(tpm) if reserve_tokens > 0 => {
                Some(bucket(state.tokens, tpm, reserve_tokens, now)?)
            }
            _ => None,
        };
        if let (Some(per_hour), Some(user)) = (spec.per_user_requests_per_hour, user) {
            let window = state.users.entry(user.to_owned()).or_default();
            while window
                .front()
                .is_some_and(|t| now.duration_since(*t) >= HOUR)
            {
                window.pop_front();
            }
            if window.len() >= per_hour as usize {
                let oldest = window.front().copied().unwrap_or(now);
                let retry_after = HOUR.saturating_sub(now.duration_since(oldest));
                return Err(refuse(
                    Limit::User,
                    "this end user's requests per hour",
                    retry_after,
                    true,
                ));
            }
            window.push_back(now);
            if state.users.len() > MAX_IDLE_USERS {
                state
                    .users
                    .retain(|_, w| w.back().is_some_and(|t| now.duration_since(*t) < HOUR));
            }
        }
        if let Some(tat) = new_tat {
            state.tat = Some(tat);
        }
        let reserved = match new_level {
            Some(level) => {
                state.tokens = Some((level, now));
                reserve_tokens
            }
            None => 0,
        };
        Ok(Reservation {
            limiter: self.clone(),
            tokens: reserved,
        })
    }
}

/// GCRA with a burst of a whole minute's requests: returns the new theoretical arrival time.
fn gcra(tat: Option<Instant>, rpm: u32, now: Instant) -> Result<Instant, Refusal> {
    let interval = MINUTE / rpm.max(1);
    let tolerance = MINUTE.saturating_sub(interval);
    let tat = tat.map_or(now, |t| t.max(now));
    let ahead = tat.duration_since(now);
    if ahead > tolerance {
        return Err(refuse(
            Limit::Requests,
            "requests per minute",
            ahead - tolerance,
            true,
        ));
    }
    Ok(tat + interval)
}

/// A bucket of `tpm` tokens refilled continuously over a minute: returns the level after the
/// reservation.
fn bucket(
    current: Option<(f64, Instant)>,
    tpm: u64,
    want: u64,
    now: Instant,
) -> Result<f64, Refusal> {
    let capacity = tpm as f64;
    let per_sec = capacity / MINUTE.as_secs_f64();
    let level = match current {
        Some((level, at)) => (level + now.duration_since(at).as_secs_f64() * per_sec).min(capacity),
        None => capacity,
    };
    let want = want as f64;
    if want > capacity {
        return Err(refuse(
            Limit::Tokens,
            "tokens per minute (this request alone needs more)",
            MINUTE,
            false,
        ));
    }
    if level < want {
        let wait = Duration::from_secs_f64(((want - level) / per_sec).max(0.001));
        return Err(refuse(Limit::Tokens, "tokens per minute", wait, true));
    }
    Ok(level - want)
}

fn refuse(limit: Limit, what: &str, retry_after: Duration, retryable: bool) -> Refusal {
    Refusal {
        limit,
        error: ApiError::RateLimited {
            message: format!("rate limit exceeded: {what} of this ClaudeKey"),
            retry_after,
            retryable,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(name: &str) -> ClaudeKeyRef {
        ClaudeKeyRef {
            namespace: "ns".into(),
            name: name.into(),
        }
    }

    fn rpm(n: u32) -> LimitsSpec {
        LimitsSpec {
            requests_per_minute: Some(n),
            ..Default::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn requests_per_minute_burst_then_refill() {
        let limiter = Limiters::default().for_key(&id("a"));
        for _ in 0..3 {
            limiter.admit(&rpm(3), None, 0).unwrap();
        }
        let refusal = limiter.admit(&rpm(3), None, 0).unwrap_err();
        assert_eq!(refusal.limit, Limit::Requests);
        let ApiError::RateLimited {
            retry_after,
            retryable,
            ..
        } = refusal.error
        else {
            panic!()
        };
        assert!(retryable);
        assert_eq!(retry_after, Duration::from_secs(20));
        tokio::time::advance(Duration::from_secs(20)).await;
        limiter.admit(&rpm(3), None, 0).unwrap();
        assert!(limiter.admit(&rpm(3), None, 0).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn identity_keeps_its_window_across_lookups() {
        let limiters = Limiters::default();
        limiters.for_key(&id("a")).admit(&rpm(1), None, 0).unwrap();
        // A reload (or rotation) asks again for the same identity: still limited.
        assert!(limiters.for_key(&id("a")).admit(&rpm(1), None, 0).is_err());
        assert!(limiters.for_key(&id("b")).admit(&rpm(1), None, 0).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_reserve_then_settle() {
        let limiter = Limiters::default().for_key(&id("a"));
        let spec = LimitsSpec {
            tokens_per_minute: Some(1000),
            ..Default::default()
        };
        let first = limiter.admit(&spec, None, 600).unwrap();
        // Concurrent request cannot overrun: 400 left.
        let refusal = limiter.admit(&spec, None, 600).unwrap_err();
        assert_eq!(refusal.limit, Limit::Tokens);
        // Real usage was 100: 500 come back.
        first.settle(100);
        let second = limiter.admit(&spec, None, 600).unwrap();
        // Usage above the reservation is charged.
        second.settle(900);
        let ApiError::RateLimited { retry_after, .. } =
            limiter.admit(&spec, None, 100).unwrap_err().error
        else {
            panic!()
        };
        // 1000 - 600 + 500 - 600 + (600 - 900) = 0 left; 100 tokens take 6 s to refill.
        assert_eq!(retry_after.as_secs(), 6);
        tokio::time::advance(Duration::from_secs(6)).await;
        limiter.admit(&spec, None, 100).unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn request_larger_than_the_budget_is_not_retryable() {
        let limiter = Limiters::default().for_key(&id("a"));
        let spec = LimitsSpec {
            tokens_per_minute: Some(1000),
            ..Default::default()
        };
        let ApiError::RateLimited { retryable, .. } =
            limiter.admit(&spec, None, 1001).unwrap_err().error
        else {
            panic!()
        };
        assert!(!retryable);
    }

    #[tokio::test(start_paused = true)]
    async fn per_user_sliding_hour() {
        let limiter = Limiters::default().for_key(&id("a"));
        let spec = LimitsSpec {
            per_user_requests_per_hour: Some(2),
            ..Default::default()
        };
        limiter.admit(&spec, Some("u1"), 0).unwrap();
        tokio::time::advance(Duration::from_secs(1800)).await;
        limiter.admit(&spec, Some("u1"), 0).unwrap();
        assert_eq!(
            limiter.admit(&spec, Some("u1"), 0).unwrap_err().limit,
            Limit::User
        );
        // Other users and requests without a user are not affected.
        limiter.admit(&spec, Some("u2"), 0).unwrap();
        limiter.admit(&spec, None, 0).unwrap();
        tokio::time::advance(Duration::from_secs(1800)).await;
        limiter.admit(&spec, Some("u1"), 0).unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusal_uses_up_no_other_limit() {
        let limiter = Limiters::default().for_key(&id("a"));
        let spec = LimitsSpec {
            requests_per_minute: Some(1),
            per_user_requests_per_hour: Some(1),
            ..Default::default()
        };
        limiter.admit(&spec, Some("u1"), 0).unwrap();
        // Refused by requests/min: u2's hourly window must stay empty.
        assert!(limiter.admit(&spec, Some("u2"), 0).is_err());
        tokio::time::advance(MINUTE).await;
        limiter.admit(&spec, Some("u2"), 0).unwrap();
    }
}
