//! One process's own counters of a ClaudeKey: requests/min by GCRA, tokens/min as a bucket that
//! reserves before forwarding and settles on real usage, requests/hour per end user as a sliding
//! window of one-minute buckets, and spend per budget period. Exact for one process; the embedded
//! default, and the fallback share while Redis is unreachable.

use std::{
    collections::HashMap,
    sync::{Mutex, MutexGuard},
    time::Duration,
};

use tokio::time::Instant;

use super::{
    Limit, Refusal,
    budget::{Budgets, Periods},
    refuse,
};
use crate::crd::LimitsSpec;

const MINUTE: Duration = Duration::from_secs(60);
/// Most end users tracked per ClaudeKey. Past it, idle users are dropped first; if all are
/// active, new users share one overflow window (counted, and shown by a metric), so a flood of
/// invented user ids neither grows memory nor resets anyone else's window.
pub const MAX_USERS: usize = 10_000;
/// End users are tracked by a fixed-size digest of their id, whatever its length.
type UserKey = [u8; 16];
const OVERFLOW_USER: UserKey = [0xff; 16];

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
    users: HashMap<UserKey, HourWindow>,
    /// When idle users were last dropped: at most once a minute, so a full table costs one
    /// sweep a minute, not one per request.
    swept: Option<Instant>,
    /// Spend (nano-USD) of the current day and month.
    spend: Spend,
}

/// Spend of one budget period pair: (period id, nano-USD), reset when a period ends.
#[derive(Default, Debug, Clone, Copy)]
struct Spend {
    day: (i64, u64),
    month: (i64, u64),
}

impl Spend {
    /// Spend in the periods of `periods` (an older period counts as nothing spent).
    fn current(&self, periods: &Periods) -> (u64, u64) {
        let pick = |(id, n): (i64, u64), now: i64| if id == now { n } else { 0 };
        (
            pick(self.day, periods.day.id),
            pick(self.month, periods.month.id),
        )
    }

    fn add(&mut self, periods: &Periods, nanos: u64) -> (u64, u64) {
        let (day, month) = self.current(periods);
        self.day = (periods.day.id, day.saturating_add(nanos));
        self.month = (periods.month.id, month.saturating_add(nanos));
        (self.day.1, self.month.1)
    }
}

/// What a local admission counted.
#[derive(Debug, Default, Clone, Copy)]
pub struct Admitted {
    /// Tokens reserved (0 when no token limit applies).
    pub tokens: u64,
    /// Some end user of this request was counted in the shared overflow window.
    pub user_overflow: bool,
}

impl KeyLimiter {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits a request (one request per entry of `users`, for a batch) or says which limit
    /// refuses it and when to retry. Nothing is counted unless every limit admits the request,
    /// so a refusal never uses up another limit. `budgets` are in nano-USD; `periods` is now.
    pub fn admit(
        &self,
        spec: &LimitsSpec,
        users: &[&str],
        reserve_tokens: u64,
        budgets: &Budgets,
        periods: &Periods,
    ) -> Result<Admitted, Refusal> {
        let now = Instant::now();
        let mut state = self.lock();
        let (day, month) = state.spend.current(periods);
        budgets.check(day, month, periods)?;
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
        let mut user_overflow = false;
        if let Some(per_hour) = spec.per_user_requests_per_hour
            && !users.is_empty()
        {
            let mut wanted: Vec<(UserKey, u32)> = Vec::with_capacity(users.len());
            for user in users {
                let key = state.user_key(user, now);
                user_overflow |= key == OVERFLOW_USER;
                match wanted.iter_mut().find(|(k, _)| *k == key) {
                    Some((_, n)) => *n += 1,
                    None => wanted.push((key, 1)),
                }
            }
            for (key, n) in &wanted {
                let window = state
                    .users
                    .entry(*key)
                    .or_insert_with(|| HourWindow::new(now));
                if let Err(retry_after) = window.room(per_hour, *n, now) {
                    return Err(refuse(
                        Limit::User,
                        "this end user's requests per hour",
                        retry_after,
                        true,
                    ));
                }
            }
            for (key, n) in wanted {
                if let Some(window) = state.users.get_mut(&key) {
                    window.add(n, now);
                }
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
        Ok(Admitted {
            tokens: reserved,
            user_overflow,
        })
    }

    /// Returns the unused part of a reservation of `reserved` tokens, or charges what usage
    /// exceeded it; adds `nanos` to the spend. Returns the spend of the day and the month.
    pub fn settle(&self, reserved: u64, used: u64, nanos: u64, periods: &Periods) -> (u64, u64) {
        let mut state = self.lock();
        if (reserved != 0 || used != 0)
            && let Some((level, _)) = state.tokens.as_mut()
        {
            *level += reserved as f64 - used as f64;
        }
        state.spend.add(periods, nanos)
    }

    /// Spend of the day and the month so far.
    pub fn spent(&self, periods: &Periods) -> (u64, u64) {
        self.lock().spend.current(periods)
    }

    /// How many end users are tracked (for tests of the bound).
    #[cfg(test)]
    pub fn tracked_users(&self) -> usize {
        self.lock().users.len()
    }
}

impl State {
    /// The window key of `user`: its digest, or the overflow window when the table is full of
    /// active users.
    fn user_key(&mut self, user: &str, now: Instant) -> UserKey {
        use sha2::{Digest, Sha256};
        let digest = Sha256::digest(user.as_bytes());
        let mut key = [0u8; 16];
        key.copy_from_slice(&digest[..16]);
        if self.users.contains_key(&key) || self.users.len() < MAX_USERS {
            return key;
        }
        if self.swept.is_none_or(|at| now.duration_since(at) >= MINUTE) {
            self.swept = Some(now);
            self.users.retain(|_, w| !w.is_idle(now));
        }
        if self.users.len() < MAX_USERS {
            key
        } else {
            OVERFLOW_USER
        }
    }
}

/// One end user's requests over the last hour, counted in 60 one-minute buckets: memory is
/// fixed per user whatever the limit (a log of timestamps grows with it), and a request leaves
/// the window between 59 and 60 minutes after it was made.
#[derive(Debug)]
struct HourWindow {
    origin: Instant,
    /// Requests per minute, indexed by minute (since `origin`) modulo 60.
    counts: [u32; 60],
    /// The newest minute the buckets describe; older buckets belong to the 59 before it.
    newest: u64,
}

impl HourWindow {
    fn new(now: Instant) -> Self {
        Self {
            origin: now,
            counts: [0; 60],
            newest: 0,
        }
    }

    fn minute(&self, now: Instant) -> u64 {
        now.duration_since(self.origin).as_secs() / 60
    }

    /// Moves the window to `now`'s minute, emptying the buckets of minutes that left the hour.
    fn advance(&mut self, now: Instant) -> u64 {
        let minute = self.minute(now);
        let stale = (minute - self.newest).min(60);
        for m in minute + 1 - stale..=minute {
            self.counts[(m % 60) as usize] = 0;
        }
        self.newest = minute;
        minute
    }

    /// Whether `n` more requests fit, or the time until the oldest counted minute leaves.
    fn room(&mut self, per_hour: u32, n: u32, now: Instant) -> Result<(), Duration> {
        let minute = self.advance(now);
        let total: u64 = self.counts.iter().map(|&c| u64::from(c)).sum();
        if total + u64::from(n) > u64::from(per_hour) {
            let oldest = (minute.saturating_sub(59)..=minute)
                .find(|m| self.counts[(m % 60) as usize] > 0)
                .unwrap_or(minute);
            let leaves = self.origin + MINUTE * (oldest + 60) as u32;
            return Err(leaves.saturating_duration_since(now).max(MINUTE / 60));
        }
        Ok(())
    }

    fn add(&mut self, n: u32, now: Instant) {
        let minute = self.advance(now);
        let bucket = &mut self.counts[(minute % 60) as usize];
        *bucket = bucket.saturating_add(n);
    }

    /// Counts one request, or refuses it with the time until the oldest counted minute leaves.
    #[cfg(test)]
    fn admit(&mut self, per_hour: u32, now: Instant) -> Result<(), Duration> {
        self.room(per_hour, 1, now)?;
        self.add(1, now);
        Ok(())
    }

    fn is_idle(&self, now: Instant) -> bool {
        self.minute(now) >= self.newest + 60
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::error::ApiError;

    /// The limiter without budgets, at one fixed budget period.
    #[derive(Default)]
    struct T(KeyLimiter);

    impl T {
        fn admit(
            &self,
            spec: &LimitsSpec,
            users: &[&str],
            reserve: u64,
        ) -> Result<Admitted, Refusal> {
            self.0.admit(
                spec,
                users,
                reserve,
                &Budgets::default(),
                &Periods::at(0, 86_400),
            )
        }

        fn settle(&self, admitted: Admitted, used: u64) {
            self.0
                .settle(admitted.tokens, used, 0, &Periods::at(0, 86_400));
        }

        fn tracked_users(&self) -> usize {
            self.0.tracked_users()
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
        let limiter = T::default();
        for _ in 0..3 {
            limiter.admit(&rpm(3), &[], 0).unwrap();
        }
        let refusal = limiter.admit(&rpm(3), &[], 0).unwrap_err();
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
        limiter.admit(&rpm(3), &[], 0).unwrap();
        assert!(limiter.admit(&rpm(3), &[], 0).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_reserve_then_settle() {
        let limiter = T::default();
        let spec = LimitsSpec {
            tokens_per_minute: Some(1000),
            ..Default::default()
        };
        let first = limiter.admit(&spec, &[], 600).unwrap();
        // Concurrent request cannot overrun: 400 left.
        let refusal = limiter.admit(&spec, &[], 600).unwrap_err();
        assert_eq!(refusal.limit, Limit::Tokens);
        // Real usage was 100: 500 come back.
        limiter.settle(first, 100);
        let second = limiter.admit(&spec, &[], 600).unwrap();
        // Usage above the reservation is charged.
        limiter.settle(second, 900);
        let ApiError::RateLimited { retry_after, .. } =
            limiter.admit(&spec, &[], 100).unwrap_err().error
        else {
            panic!()
        };
        // 1000 - 600 + 500 - 600 + (600 - 900) = 0 left; 100 tokens take 6 s to refill.
        assert_eq!(retry_after.as_secs(), 6);
        tokio::time::advance(Duration::from_secs(6)).await;
        limiter.admit(&spec, &[], 100).unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn request_larger_than_the_budget_is_not_retryable() {
        let limiter = T::default();
        let spec = LimitsSpec {
            tokens_per_minute: Some(1000),
            ..Default::default()
        };
        let ApiError::RateLimited { retryable, .. } =
            limiter.admit(&spec, &[], 1001).unwrap_err().error
        else {
            panic!()
        };
        assert!(!retryable);
    }

    #[tokio::test(start_paused = true)]
    async fn per_user_sliding_hour() {
        let limiter = T::default();
        let spec = LimitsSpec {
            per_user_requests_per_hour: Some(2),
            ..Default::default()
        };
        limiter.admit(&spec, &["u1"], 0).unwrap();
        tokio::time::advance(Duration::from_secs(1800)).await;
        limiter.admit(&spec, &["u1"], 0).unwrap();
        assert_eq!(
            limiter.admit(&spec, &["u1"], 0).unwrap_err().limit,
            Limit::User
        );
        // Other users and requests without a user are not affected.
        limiter.admit(&spec, &["u2"], 0).unwrap();
        limiter.admit(&spec, &[], 0).unwrap();
        tokio::time::advance(Duration::from_secs(1800)).await;
        limiter.admit(&spec, &["u1"], 0).unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn hour_window_refuses_until_the_oldest_minute_leaves() {
        let start = Instant::now();
        let mut window = HourWindow::new(start);
        window.admit(2, start + Duration::from_secs(90)).unwrap(); // minute 1
        window.admit(2, start + Duration::from_secs(600)).unwrap(); // minute 10
        // Minute 1 leaves the hour at 61:00.
        let at = start + Duration::from_secs(3000);
        assert_eq!(
            window.admit(2, at).unwrap_err(),
            Duration::from_secs(61 * 60 - 3000)
        );
        assert!(
            window
                .admit(2, start + Duration::from_secs(61 * 60 - 1))
                .is_err()
        );
        window
            .admit(2, start + Duration::from_secs(61 * 60))
            .unwrap();
        // Now minutes 10 and 61 are counted: full again until minute 10 leaves.
        assert_eq!(
            window
                .admit(2, start + Duration::from_secs(62 * 60))
                .unwrap_err(),
            Duration::from_secs(8 * 60)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn hour_window_counts_a_flood_in_fixed_memory() {
        let start = Instant::now();
        let mut window = HourWindow::new(start);
        for i in 0..200_000u64 {
            window
                .admit(200_000, start + Duration::from_millis(i * 10))
                .unwrap();
        }
        // 200,000 requests over 33 minutes: the limit is reached, not one more fits.
        let at = start + Duration::from_secs(2000);
        assert!(window.admit(200_000, at).is_err());
        assert!(!window.is_idle(at));
        // An hour after the last minute, nothing is left and the user counts as idle.
        let later = start + Duration::from_secs(2000 + 3600);
        assert!(window.is_idle(later));
        window.admit(1, later).unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn users_are_bounded_and_overflow_shares_a_window() {
        let limiter = T::default();
        let spec = LimitsSpec {
            per_user_requests_per_hour: Some(3),
            ..Default::default()
        };
        let long = "x".repeat(1000);
        for i in 0..MAX_USERS {
            let user = format!("{long}{i}");
            assert!(!limiter.admit(&spec, &[&user], 0).unwrap().user_overflow);
        }
        assert_eq!(limiter.tracked_users(), MAX_USERS);
        // All active: new users share the overflow window, memory stays bounded.
        for i in 0..3 {
            let r = limiter.admit(&spec, &[&format!("new-{i}")], 0).unwrap();
            assert!(r.user_overflow);
        }
        assert_eq!(
            limiter.admit(&spec, &["new-3"], 0).unwrap_err().limit,
            Limit::User
        );
        assert_eq!(limiter.tracked_users(), MAX_USERS + 1);
        // Known users keep their own windows.
        limiter.admit(&spec, &[&format!("{long}0")], 0).unwrap();
        // An hour later the idle ones make room again.
        tokio::time::advance(Duration::from_secs(2 * 3600)).await;
        assert!(!limiter.admit(&spec, &["late"], 0).unwrap().user_overflow);
        assert!(limiter.tracked_users() < 10);
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_counts_each_request_of_a_user() {
        let limiter = T::default();
        let spec = LimitsSpec {
            per_user_requests_per_hour: Some(3),
            ..Default::default()
        };
        limiter.admit(&spec, &["u1", "u2", "u1"], 0).unwrap();
        // u1 has 1 left: a batch naming u1 twice is refused whole, and counts nothing.
        assert!(limiter.admit(&spec, &["u2", "u1", "u1"], 0).is_err());
        limiter.admit(&spec, &["u2", "u1"], 0).unwrap();
        assert!(limiter.admit(&spec, &["u1"], 0).is_err());
        limiter.admit(&spec, &["u2"], 0).unwrap();
        assert!(limiter.admit(&spec, &["u2"], 0).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusal_uses_up_no_other_limit() {
        let limiter = T::default();
        let spec = LimitsSpec {
            requests_per_minute: Some(1),
            per_user_requests_per_hour: Some(1),
            ..Default::default()
        };
        limiter.admit(&spec, &["u1"], 0).unwrap();
        // Refused by requests/min: u2's hourly window must stay empty.
        assert!(limiter.admit(&spec, &["u2"], 0).is_err());
        tokio::time::advance(MINUTE).await;
        limiter.admit(&spec, &["u2"], 0).unwrap();
    }
}
