//! Credit a proxy leases from the shared counters, so most admissions need no round trip.
//!
//! Each call of the admission script may grant, besides the request it decides, a little
//! credit: extra requests of the GCRA window, extra tokens of the bucket and extra units of the
//! end users' hourly windows. Redis counts credit exactly like admissions, so every proxy
//! together still never passes a limit; the proxy then admits from its credit alone, and asks
//! for more in the background when half is used. How much it asks for follows how fast credit
//! is used: a grant used up before its refill came doubles the next want (up to
//! [`LEASE_REQUESTS_MOST`]), so at 64 connections a refill lands before the credit runs out; a
//! lease that ends mostly unused halves it. The script grants at most 1/32 of what a
//! window has left (so near a limit credit shrinks to nothing and every admission is decided in
//! Redis, as without leases), and credit is good for [`LEASE_TTL`]: then what is left goes back
//! (the settlement script moves the windows back, never past empty) and a rate window cannot
//! refill under credit held from an earlier moment. Budgets are never leased: spend is known
//! only after an answer, so a ClaudeKey with a budget asks Redis on every admission.

use std::{
    collections::HashMap,
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::{sync::Notify, time::Instant};

use crate::crd::LimitsSpec;

/// How long granted credit may be used by default; then the rest goes back.
pub const LEASE_TTL: Duration = Duration::from_secs(1);
/// The requests (and end-user units) one call asks for as credit at first; tokens: this many
/// reservations of the request that asks.
pub const LEASE_REQUESTS: u64 = 64;
/// The most a want grows to: at 16 times the first want a proxy holds at most about 1,500
/// requests of credit for a second, still at most 1/32 of what a window has left.
pub const LEASE_REQUESTS_MOST: u64 = 16 * LEASE_REQUESTS;
/// Users whose credit is used up are forgotten once this many are remembered: a flood of
/// invented user ids cannot grow the map (users with credit are bounded by the users Redis
/// tracks, `local::MAX_USERS`).
const USERS_KEPT: usize = 1024;
/// A refill is asked for only while grants are at least this big: near a limit, grants are
/// small and admissions go to Redis anyway.
const REFILL_FROM: u64 = 8;

/// What one admission takes: 1 request if requests are limited, its token reservation if
/// tokens are, and (digest, requests) per end user if users are.
#[derive(Debug, Clone, Copy, Default)]
pub struct Needs<'a> {
    pub requests: u64,
    pub tokens: u64,
    pub users: &'a [(String, u32)],
}

/// Credit asked of one call, and the size of a token unit (the asking request's reservation):
/// the script grants at least [`LEAST_UNITS`] units of each kind or nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Wants {
    pub requests: u64,
    pub tokens: u64,
    pub user_units: u64,
    pub token_unit: u64,
}

/// The smallest grant worth holding, in requests, end-user units or token units (the script's
/// rule, passed to it so the two cannot disagree): with at most 1/32 of what is left granted,
/// a window with fewer than 256 units left grants nothing.
pub const LEAST_UNITS: u64 = 8;

impl Needs<'_> {
    /// The credit to ask for with an admission that needs this, `scale` units of each kind.
    fn wants(&self, scale: u64) -> Wants {
        Wants {
            requests: if self.requests > 0 { scale } else { 0 },
            tokens: self.tokens.saturating_mul(scale),
            user_units: if self.users.is_empty() { 0 } else { scale },
            token_unit: self.tokens,
        }
    }
}

/// Credit granted by one call: counted in Redis at `minute` (the users' windows' bucket).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grant {
    pub requests: u64,
    pub tokens: u64,
    pub minute: i64,
    /// (digest, units) per end user.
    pub users: Vec<(String, u32)>,
}

/// Credit to give back: requests (of a window of `rpm`), tokens (of a bucket of `tpm`), and
/// (digest, minute, units) per end user.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GiveBack {
    pub rpm: u32,
    pub tpm: u64,
    pub requests: u64,
    pub tokens: u64,
    pub users: Vec<(String, i64, u32)>,
}

impl GiveBack {
    pub fn is_empty(&self) -> bool {
        self.requests == 0 && self.tokens == 0 && self.users.is_empty()
    }
}

#[derive(Debug, Clone, Copy)]
struct UserCredit {
    units: u32,
    /// The oldest minute its units were counted in: giving back there keeps the window at
    /// least as full as it should be.
    minute: i64,
}

/// The credit one proxy holds for one ClaudeKey.
#[derive(Debug, Default)]
struct Credit {
    requests: u64,
    tokens: u64,
    users: HashMap<String, UserCredit>,
    expires: Option<Instant>,
    /// The limits the credit was granted under (the largest, if the spec changed meanwhile:
    /// giving requests back at it moves the window back the least).
    rpm: u32,
    tpm: u64,
    /// The largest grants of this lease (requests, tokens, user units): a refill is due when
    /// the credit needed falls under half of them.
    full: (u64, u64, u32),
    /// Units of each kind the next call asks for (0: [`LEASE_REQUESTS`]).
    scale: u64,
    /// The want already grew since the last grant: requests missing together grow it once.
    grown: bool,
}

impl Credit {
    /// Takes `needs` if all of it is held and not expired; then whether a refill is due.
    fn take(&mut self, needs: &Needs, now: Instant) -> Option<bool> {
        if self.expires.is_none_or(|at| at <= now) && !needs.is_nothing() {
            return None;
        }
        let short = self.requests < needs.requests
            || self.tokens < needs.tokens
            || needs
                .users
                .iter()
                .any(|(digest, n)| self.users.get(digest).is_none_or(|c| c.units < *n));
        if short {
            self.used_up();
            return None;
        }
        self.requests -= needs.requests;
        self.tokens -= needs.tokens;
        let mut low = (needs.requests > 0 && low(self.requests, self.full.0))
            || (needs.tokens > 0 && low(self.tokens, self.full.1));
        for (digest, n) in needs.users {
            if let Some(credit) = self.users.get_mut(digest) {
                credit.units -= n;
                low |= low_units(credit.units, self.full.2);
            }
        }
        Some(low)
    }

    /// A request found the credit of a live lease used up: its refill came too late, so the
    /// next want doubles. Only while grants are big (far from the limits): near a limit
    /// admissions are decided in Redis anyway.
    fn used_up(&mut self) {
        let big = self.full.0 >= REFILL_FROM
            || self.full.1 >= REFILL_FROM
            || u64::from(self.full.2) >= REFILL_FROM;
        if self.expires.is_some() && big && !self.grown {
            self.scale = (self.scale() * 2).min(LEASE_REQUESTS_MOST);
            self.grown = true;
        }
    }

    fn scale(&self) -> u64 {
        self.scale.max(LEASE_REQUESTS)
    }

    /// Adds a grant; `true` if it starts a lease (nothing was held).
    fn add(&mut self, grant: &Grant, spec: &LimitsSpec, until: Instant) -> bool {
        let units = grant.users.iter().map(|(_, n)| *n).max().unwrap_or(0);
        if grant.requests == 0 && grant.tokens == 0 && units == 0 {
            return false;
        }
        let starts = self.expires.is_none();
        if self.users.len() >= USERS_KEPT {
            self.users.retain(|_, c| c.units > 0);
        }
        self.requests += grant.requests;
        self.tokens += grant.tokens;
        self.rpm = self.rpm.max(spec.requests_per_minute.unwrap_or(0));
        self.tpm = self.tpm.max(spec.tokens_per_minute.unwrap_or(0));
        for (digest, n) in grant.users.iter().filter(|(_, n)| *n > 0) {
            let credit = self.users.entry(digest.clone()).or_insert(UserCredit {
                units: 0,
                minute: grant.minute,
            });
            if credit.units == 0 {
                credit.minute = grant.minute;
            }
            credit.units += n;
        }
        self.full = (
            self.full.0.max(grant.requests),
            self.full.1.max(grant.tokens),
            self.full.2.max(units),
        );
        self.expires = Some(until);
        self.grown = false;
        starts
    }

    /// The lease is over: everything held, emptied, to give back. A lease that ends with more
    /// than half of its largest grants unused asked for too much: the next want halves.
    fn end(&mut self) -> GiveBack {
        let unused = |left: u64, full: u64| full == 0 || left * 2 > full;
        if unused(self.requests, self.full.0) && unused(self.tokens, self.full.1) {
            self.scale = (self.scale() / 2).max(LEASE_REQUESTS);
        }
        self.drain()
    }

    /// Everything held, emptied: what to give back.
    fn drain(&mut self) -> GiveBack {
        let back = GiveBack {
            rpm: std::mem::take(&mut self.rpm),
            tpm: std::mem::take(&mut self.tpm),
            requests: std::mem::take(&mut self.requests),
            tokens: std::mem::take(&mut self.tokens),
            users: self
                .users
                .drain()
                .filter(|(_, c)| c.units > 0)
                .map(|(digest, c)| (digest, c.minute, c.units))
                .collect(),
        };
        self.full = (0, 0, 0);
        self.expires = None;
        back
    }
}

fn low(left: u64, full: u64) -> bool {
    full >= REFILL_FROM && left * 2 < full
}

fn low_units(left: u32, full: u32) -> bool {
    low(u64::from(left), u64::from(full))
}

impl Needs<'_> {
    /// Nothing limited: admitted without Redis or credit.
    fn is_nothing(&self) -> bool {
        self.requests == 0 && self.tokens == 0 && self.users.is_empty()
    }
}

/// One ClaudeKey's credit in this proxy, and whether a call asking for credit is on its way.
#[derive(Debug)]
pub struct Lease {
    credit: Mutex<Credit>,
    /// One call at a time asks for credit, so a proxy holds at most about a grant and a half,
    /// however many requests miss at once; requests that miss meanwhile wait for its answer
    /// (`asked`) before they are decided alone.
    asking: AtomicBool,
    asked: Notify,
    ttl: Duration,
}

impl Lease {
    /// Credit good for `ttl` after each grant.
    pub fn new(ttl: Duration) -> Self {
        Self {
            credit: Mutex::default(),
            asking: AtomicBool::new(false),
            asked: Notify::new(),
            ttl,
        }
    }

    fn credit(&self) -> std::sync::MutexGuard<'_, Credit> {
        self.credit.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes `needs` from the credit: `None` if it is not all there; else whether to refill.
    pub fn take(&self, needs: &Needs) -> Option<bool> {
        self.credit().take(needs, Instant::now())
    }

    /// Adds credit granted under `spec`; `true` if it starts a lease, whose end the caller
    /// watches (`expires`).
    pub fn add(&self, grant: &Grant, spec: &LimitsSpec) -> bool {
        self.credit().add(grant, spec, Instant::now() + self.ttl)
    }

    /// When the credit held expires (`None`: nothing held).
    pub fn expires(&self) -> Option<Instant> {
        self.credit().expires
    }

    /// The credit past its time, emptied, to give back.
    pub fn expired(&self) -> Option<GiveBack> {
        let mut credit = self.credit();
        let expired = credit.expires.is_some_and(|at| at <= Instant::now());
        expired.then(|| credit.end()).filter(|b| !b.is_empty())
    }

    /// The credit to ask for with an admission that needs this (`Credit::used_up`).
    pub fn wants(&self, needs: &Needs) -> Wants {
        needs.wants(self.credit().scale())
    }

    /// All the credit, emptied (at shutdown).
    pub fn drain(&self) -> GiveBack {
        self.credit().drain()
    }

    /// Claims the one call that may ask for credit, until the guard is dropped (a request's
    /// future dropped mid-call releases it too); `None` if another call is asking.
    pub fn ask(&self) -> Option<Asking<'_>> {
        // `then`, not `then_some`: a guard built and dropped here would release another's claim.
        (!self.asking.swap(true, Ordering::AcqRel)).then(|| Asking(self))
    }

    /// Waits until no call is asking for credit (the asking call is bounded by the Redis
    /// timeout, and a dropped one releases its claim).
    pub async fn asked(&self) {
        let notified = self.asked.notified();
        tokio::pin!(notified);
        // Registered before the check, so a claim released in between still wakes us.
        notified.as_mut().enable();
        if self.is_asking() {
            notified.await;
        }
    }

    /// Whether a call is asking for credit now.
    pub fn is_asking(&self) -> bool {
        self.asking.load(Ordering::Acquire)
    }
}

/// The claim of [`Lease::ask`].
#[derive(Debug)]
pub struct Asking<'a>(&'a Lease);

impl Drop for Asking<'_> {
    fn drop(&mut self) {
        self.0.asking.store(false, Ordering::Release);
        self.0.asked.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RPM60: LimitsSpec = LimitsSpec {
        requests_per_minute: Some(60),
        tokens_per_minute: None,
        per_user_requests_per_hour: None,
        budget: None,
    };

    fn grant(requests: u64, tokens: u64, users: &[(&str, u32)]) -> Grant {
        Grant {
            requests,
            tokens,
            minute: 7,
            users: users.iter().map(|(d, n)| (d.to_string(), *n)).collect(),
        }
    }

    #[test]
    fn credit_admits_only_what_it_holds() {
        let now = Instant::now();
        let mut credit = Credit::default();
        let users = vec![("u1".to_string(), 1)];
        let needs = Needs {
            requests: 1,
            tokens: 100,
            users: &users,
        };
        assert_eq!(credit.take(&needs, now), None, "no credit yet");
        credit.add(&grant(2, 150, &[("u1", 5)]), &RPM60, now + LEASE_TTL);
        // Taken, and with two thirds of the tokens gone a refill is due.
        assert_eq!(credit.take(&needs, now), Some(true));
        // 50 tokens left: a reservation of 100 is not covered, and nothing is taken.
        assert_eq!(credit.take(&needs, now), None);
        assert_eq!((credit.requests, credit.tokens), (1, 50));
        // Another end user has no credit of its own.
        let other = vec![("u2".to_string(), 1)];
        let needs = Needs {
            requests: 1,
            tokens: 0,
            users: &other,
        };
        assert_eq!(credit.take(&needs, now), None);
    }

    #[test]
    fn credit_expires_and_everything_held_goes_back() {
        let now = Instant::now();
        let mut credit = Credit::default();
        credit.add(&grant(3, 0, &[("u1", 4)]), &RPM60, now + LEASE_TTL);
        let needs = Needs {
            requests: 1,
            ..Default::default()
        };
        assert!(credit.take(&needs, now + LEASE_TTL / 2).is_some());
        assert_eq!(credit.take(&needs, now + LEASE_TTL), None, "expired");
        let back = credit.drain();
        assert_eq!(
            back,
            GiveBack {
                rpm: 60,
                tpm: 0,
                requests: 2,
                tokens: 0,
                users: vec![("u1".to_string(), 7, 4)],
            }
        );
        assert!(credit.drain().is_empty(), "given back once");
    }

    #[test]
    fn a_refill_is_due_at_half_of_a_big_grant_only() {
        let now = Instant::now();
        let needs = Needs {
            requests: 1,
            ..Default::default()
        };
        let mut credit = Credit::default();
        credit.add(&grant(64, 0, &[]), &RPM60, now + LEASE_TTL);
        let lows: Vec<bool> = (0..40).map(|_| credit.take(&needs, now).unwrap()).collect();
        assert_eq!(lows.iter().position(|low| *low), Some(32), "{lows:?}");
        // Small grants (near the limit): no refill, admissions go to Redis when they run out.
        let mut credit = Credit::default();
        credit.add(&grant(3, 0, &[]), &RPM60, now + LEASE_TTL);
        assert!((0..3).all(|_| credit.take(&needs, now) == Some(false)));
        assert_eq!(credit.take(&needs, now), None);
    }

    #[test]
    fn unlimited_needs_nothing() {
        let mut credit = Credit::default();
        assert_eq!(credit.take(&Needs::default(), Instant::now()), Some(false));
    }

    #[test]
    fn a_user_keeps_the_oldest_minute_of_its_units() {
        let now = Instant::now();
        let mut credit = Credit::default();
        credit.add(&grant(0, 0, &[("u1", 2)]), &RPM60, now + LEASE_TTL);
        let mut later = grant(0, 0, &[("u1", 3)]);
        later.minute = 8;
        credit.add(&later, &RPM60, now + LEASE_TTL);
        assert_eq!(credit.drain().users, vec![("u1".to_string(), 7, 5)]);
    }

    #[test]
    fn users_whose_credit_is_used_up_are_forgotten() {
        let now = Instant::now();
        let mut credit = Credit::default();
        for i in 0..3 * USERS_KEPT {
            let user = format!("u{i}");
            credit.add(&grant(0, 0, &[(user.as_str(), 1)]), &RPM60, now + LEASE_TTL);
            let users = vec![(user, 1)];
            let needs = Needs {
                users: &users,
                ..Default::default()
            };
            assert!(credit.take(&needs, now).is_some());
        }
        assert!(credit.users.len() <= USERS_KEPT, "{}", credit.users.len());
    }

    #[test]
    fn one_call_at_a_time_asks_for_credit() {
        let lease = Lease::new(LEASE_TTL);
        let first = lease.ask().expect("nobody asking");
        assert!(lease.ask().is_none());
        assert!(lease.is_asking());
        drop(first);
        assert!(lease.ask().is_some());
    }

    #[tokio::test]
    async fn a_miss_waits_for_the_call_asking_then_goes_on() {
        let lease = std::sync::Arc::new(Lease::new(LEASE_TTL));
        lease.asked().await; // nobody asking: at once
        let claim = lease.ask().unwrap();
        let waiter = tokio::spawn({
            let lease = lease.clone();
            async move { lease.asked().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(claim);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken when the claim is released")
            .unwrap();
    }

    #[test]
    fn wants_follow_needs() {
        let users = vec![("u".to_string(), 1)];
        let needs = Needs {
            requests: 1,
            tokens: 10,
            users: &users,
        };
        assert_eq!(
            Lease::new(LEASE_TTL).wants(&needs),
            Wants {
                requests: LEASE_REQUESTS,
                tokens: 10 * LEASE_REQUESTS,
                user_units: LEASE_REQUESTS,
                token_unit: 10,
            }
        );
        assert_eq!(Needs::default().wants(LEASE_REQUESTS), Wants::default());
    }

    /// Requests that find a live lease's credit used up double the want, once per grant, up
    /// to the most; leases that end mostly unused halve it back to the first want.
    #[test]
    fn wants_grow_when_credit_runs_out_and_shrink_when_it_goes_unused() {
        let now = Instant::now();
        let needs = Needs {
            requests: 1,
            ..Default::default()
        };
        let mut credit = Credit::default();
        assert_eq!(credit.take(&needs, now), None, "no lease: nothing learnt");
        assert_eq!(credit.scale(), LEASE_REQUESTS);
        let mut wants = Vec::new();
        for _ in 0..6 {
            credit.add(&grant(64, 0, &[]), &RPM60, now + LEASE_TTL);
            while credit.take(&needs, now).is_some() {}
            assert_eq!(credit.take(&needs, now), None, "a second miss");
            wants.push(credit.scale());
        }
        assert_eq!(wants, [128, 256, 512, 1024, 1024, 1024]);
        // Near a limit (small grants) a miss teaches nothing.
        let mut near = Credit::default();
        near.add(&grant(3, 0, &[]), &RPM60, now + LEASE_TTL);
        while near.take(&needs, now).is_some() {}
        assert_eq!(near.scale(), LEASE_REQUESTS);
        // A lease that ends with most of its grant unused halves the want; one used up does not.
        credit.add(&grant(64, 0, &[]), &RPM60, now + LEASE_TTL);
        credit.take(&needs, now);
        credit.end();
        assert_eq!(credit.scale(), 512);
        credit.add(&grant(64, 0, &[]), &RPM60, now + LEASE_TTL);
        while credit.take(&needs, now).is_some() {}
        credit.end();
        assert_eq!(credit.scale(), 1024, "a used-up miss grew it back");
        for _ in 0..6 {
            credit.add(&grant(64, 0, &[]), &RPM60, now + LEASE_TTL);
            credit.end();
        }
        assert_eq!(credit.scale(), LEASE_REQUESTS);
    }
}
