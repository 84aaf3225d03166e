//! Rate limits and spend budgets per ClaudeKey identity (a key rotation never resets a window):
//! counted in this process (the embedded default, exact for one proxy) or shared by every proxy
//! through Redis (DESIGN.md §12), far from a limit from credit leased from Redis (`lease`), with a
//! local fallback share while Redis is unreachable.

pub mod budget;
mod lease;
mod leasing;
mod local;
mod metrics;
pub mod prices;
pub mod settlements;
pub mod shared;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use sha2::{Digest, Sha256};

use super::{error::ApiError, usage::Usage};
use crate::{crd::LimitsSpec, proxyconf::ClaudeKeyRef};
use budget::{Budgets, Periods};
pub use lease::{Grant, LEAST_UNITS, Wants};
use lease::{Lease, Needs};
pub use local::MAX_USERS;
use local::{Admitted, KeyLimiter};
pub use metrics::LimitsMetrics;
use metrics::SpendGauges;
use prices::PriceTable;
use settlements::Settlements;
use shared::{AdmitCall, Keys, SharedCounters};
pub use shared::{RedisSettings, SharedError};

/// Default share of every limit and budget a proxy enforces alone while Redis is unreachable.
pub const DEFAULT_FALLBACK_SHARE: f64 = 0.5;

/// Which limit refused a request; a bounded metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Requests,
    Tokens,
    User,
    BudgetDay,
    BudgetMonth,
}

impl Limit {
    pub fn label(self) -> &'static str {
        match self {
            Self::Requests => "requestsPerMinute",
            Self::Tokens => "tokensPerMinute",
            Self::User => "perUserRequestsPerHour",
            Self::BudgetDay => "usdPerDay",
            Self::BudgetMonth => "usdPerMonth",
        }
    }
}

/// A refusal: the limit, and the error the client gets.
#[derive(Debug)]
pub struct Refusal {
    pub limit: Limit,
    pub error: ApiError,
}

pub(crate) fn refuse(limit: Limit, what: &str, retry_after: Duration, retryable: bool) -> Refusal {
    Refusal {
        limit,
        error: ApiError::RateLimited {
            message: format!("rate limit exceeded: {what} of this ClaudeKey"),
            retry_after,
            retryable,
        },
    }
}

/// How the proxy counts: in-process, or shared through Redis.
#[derive(Clone, Debug)]
pub struct LimitSettings {
    pub redis: Option<RedisSettings>,
    pub prices: PriceTable,
    /// Share (0 < s <= 1) of each limit and budget one proxy enforces while Redis is down.
    pub fallback_share: f64,
    /// Length of a budget day: 86400 in production; in-process tests shorten it (no flag can).
    pub day_seconds: i64,
    /// How long leased credit lasts (`lease::LEASE_TTL`); in-process tests lengthen it (no
    /// flag can).
    pub lease_ttl: Duration,
}

impl Default for LimitSettings {
    fn default() -> Self {
        Self {
            redis: None,
            prices: PriceTable::default(),
            fallback_share: DEFAULT_FALLBACK_SHARE,
            day_seconds: budget::DAY_SECONDS,
            lease_ttl: lease::LEASE_TTL,
        }
    }
}

/// `spec` with each limit at `share` (rounded up, at least 1): what one proxy enforces alone
/// while the shared counters are unreachable.
pub fn fallback_spec(spec: &LimitsSpec, share: f64) -> LimitsSpec {
    let share = share.clamp(f64::MIN_POSITIVE, 1.0);
    let scale32 = |n: Option<u32>| n.map(|n| ((f64::from(n) * share).ceil() as u32).max(1));
    let scale64 = |n: Option<u64>| n.map(|n| ((n as f64 * share).ceil() as u64).max(1));
    LimitsSpec {
        requests_per_minute: scale32(spec.requests_per_minute),
        tokens_per_minute: scale64(spec.tokens_per_minute),
        per_user_requests_per_hour: scale32(spec.per_user_requests_per_hour),
        budget: spec.budget.clone(),
    }
}

/// Redis's counters, and the settlements queued for them.
#[derive(Clone)]
struct Shared {
    counters: Arc<SharedCounters>,
    settlements: Arc<Settlements>,
}

/// The limiters of every ClaudeKey this proxy serves, kept across config reloads.
pub struct Limiters {
    by_key: Mutex<HashMap<ClaudeKeyRef, Arc<KeyLimits>>>,
    shared: Option<Shared>,
    prices: Arc<PriceTable>,
    fallback_share: f64,
    day_seconds: i64,
    lease_ttl: Duration,
    metrics: LimitsMetrics,
}

impl Default for Limiters {
    fn default() -> Self {
        Self::local(LimitSettings::default(), LimitsMetrics::default())
    }
}

impl Limiters {
    /// Counters as `settings` say; Redis is connected lazily (never blocks the start).
    pub fn new(settings: LimitSettings, metrics: LimitsMetrics) -> Result<Self, SharedError> {
        let shared = match &settings.redis {
            Some(redis) => {
                let counters = Arc::new(SharedCounters::new(redis, metrics.clone())?);
                Some(Shared {
                    settlements: Arc::new(Settlements::new(counters.clone())),
                    counters,
                })
            }
            None => None,
        };
        Ok(Self {
            shared,
            ..Self::local(settings, metrics)
        })
    }

    fn local(settings: LimitSettings, metrics: LimitsMetrics) -> Self {
        Self {
            by_key: Mutex::default(),
            shared: None,
            prices: Arc::new(settings.prices),
            fallback_share: settings.fallback_share,
            day_seconds: settings.day_seconds,
            lease_ttl: settings.lease_ttl,
            metrics,
        }
    }

    /// The limits of this identity: the same before and after a reload or rotation.
    pub fn for_key(&self, id: &ClaudeKeyRef) -> Arc<KeyLimits> {
        let mut map = self.by_key.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(id.clone())
            .or_insert_with(|| {
                let label: Arc<str> = format!("{}/{}", id.namespace, id.name).into();
                Arc::new(KeyLimits {
                    spend: SpendGauges::new(self.metrics.clone(), label.clone()),
                    label,
                    keys: Keys::of(id),
                    local: KeyLimiter::default(),
                    lease: Lease::new(self.lease_ttl),
                    shared: self.shared.clone(),
                    prices: self.prices.clone(),
                    fallback_share: self.fallback_share,
                    day_seconds: self.day_seconds,
                })
            })
            .clone()
    }
}

/// One ClaudeKey's limits. With shared counters, `local` counts only the fallback share.
pub struct KeyLimits {
    label: Arc<str>,
    keys: Keys,
    local: KeyLimiter,
    /// Credit leased from the shared counters (`lease.rs`).
    lease: Lease,
    shared: Option<Shared>,
    prices: Arc<PriceTable>,
    fallback_share: f64,
    day_seconds: i64,
    spend: SpendGauges,
}

impl std::fmt::Debug for KeyLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyLimits")
            .field("claudekey", &self.label)
            .field("shared", &self.shared.is_some())
            .finish_non_exhaustive()
    }
}

/// What a request asks of the limits.
#[derive(Debug, Default, Clone, Copy)]
pub struct Ask<'a> {
    /// The end user of each request (one entry per request of a batch that names one).
    pub users: &'a [&'a str],
    pub reserve_tokens: u64,
    /// The model, to price the usage at settlement.
    pub model: Option<&'a str>,
}

/// Where a reservation was counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    Local,
    Shared,
    /// Locally, at the fallback share, because Redis did not answer.
    Fallback,
}

/// Tokens held for one request until its real usage (and so its cost) is known.
#[derive(Debug)]
pub struct Reservation {
    limits: Arc<KeyLimits>,
    tpm: u64,
    tokens: u64,
    /// The model's list price, looked up once at admission.
    price: prices::Price,
    budgets: Budgets,
    pub counted: Counted,
    /// Some end user of this request was counted in the shared overflow window.
    pub user_overflow: bool,
}

impl KeyLimits {
    /// `namespace/name`: the metric label and audit field, formatted once per ClaudeKey and
    /// shared by its tenant (`super::super::tenant`).
    pub fn label(&self) -> &Arc<str> {
        &self.label
    }

    /// Admits a request or says which limit refuses it and when to retry; with Redis, from
    /// leased credit (`lease.rs`) or with one round trip. Nothing is counted unless every limit
    /// admits the request.
    pub async fn admit(
        self: &Arc<Self>,
        spec: &LimitsSpec,
        ask: Ask<'_>,
    ) -> Result<Reservation, Refusal> {
        let budgets = Budgets::of(spec);
        let reservation = |tokens, counted, user_overflow| Reservation {
            limits: self.clone(),
            tpm: spec.tokens_per_minute.unwrap_or(0),
            tokens,
            price: self.prices.price(ask.model),
            budgets,
            counted,
            user_overflow,
        };
        let Some(shared) = &self.shared else {
            let periods = Periods::now(self.day_seconds);
            let admitted =
                self.local
                    .admit(spec, ask.users, ask.reserve_tokens, &budgets, &periods)?;
            let spent = self.local.spent(&periods);
            self.spend.show(&budgets, spent);
            return Ok(reservation(
                admitted.tokens,
                Counted::Local,
                admitted.user_overflow,
            ));
        };
        let users = match spec.per_user_requests_per_hour {
            Some(_) => user_digests(ask.users),
            None => Vec::new(),
        };
        let reserve = if spec.tokens_per_minute.is_some() {
            ask.reserve_tokens
        } else {
            0
        };
        let needs = Needs {
            requests: u64::from(spec.requests_per_minute.is_some()),
            tokens: reserve,
            users: &users,
        };
        // Budgets are never leased: spend is known only after answers (lease.rs).
        let leasing = budgets.is_empty();
        if leasing {
            if let Some(back) = self.lease.expired() {
                self.give_back(shared, back);
            }
            if let Some(refill) = self.lease.take(&needs) {
                if refill {
                    self.refill(shared, spec, &needs);
                }
                return Ok(reservation(reserve, Counted::Shared, false));
            }
            // A call asking for credit is on its way: its grant likely covers this request.
            if self.lease.is_asking() {
                self.lease.asked().await;
                if let Some(refill) = self.lease.take(&needs) {
                    if refill {
                        self.refill(shared, spec, &needs);
                    }
                    return Ok(reservation(reserve, Counted::Shared, false));
                }
            }
        }
        // One call at a time asks for credit; the others are decided alone.
        let asking = if leasing { self.lease.ask() } else { None };
        let call = AdmitCall {
            requests: 1,
            reserve,
            users: &users,
            wants: match asking {
                Some(_) => self.lease.wants(&needs),
                None => Default::default(),
            },
        };
        // Boxed: the Redis call's future (~1 KB) would otherwise be in every request's future
        // (the local limiter's too); this path costs a round trip to Redis anyway.
        let decided =
            Box::pin(
                shared
                    .counters
                    .admit(&self.keys, spec, &budgets, call, self.day_seconds),
            )
            .await;
        match decided {
            Ok(Ok(admitted)) => {
                self.add_credit(shared, &admitted.grant, spec);
                drop(asking);
                let spent = (admitted.day_spend, admitted.month_spend);
                self.spend.show(&budgets, spent);
                Ok(reservation(
                    reserve,
                    Counted::Shared,
                    admitted.user_overflow,
                ))
            }
            // Credit granted to another request of this proxy may cover it. Replies read
            // together wake their requests in any order: yield once, so a grant answered just
            // before this refusal is counted first.
            Ok(Err(refusal)) if leasing && self.covered_after_refusal(&needs).await => {
                drop(refusal);
                Ok(reservation(reserve, Counted::Shared, false))
            }
            Ok(Err(refusal)) => Err(refusal),
            Err(shared::Unavailable) => {
                let Admitted {
                    tokens,
                    user_overflow,
                } = self.fallback_admit(spec, &budgets, ask)?;
                let mut r = reservation(tokens, Counted::Fallback, user_overflow);
                r.tpm = fallback_spec(spec, self.fallback_share)
                    .tokens_per_minute
                    .unwrap_or(0);
                Ok(r)
            }
        }
    }

    fn fallback_admit(
        &self,
        spec: &LimitsSpec,
        budgets: &Budgets,
        ask: Ask<'_>,
    ) -> Result<Admitted, Refusal> {
        let share = self.fallback_share;
        let periods = Periods::now(self.day_seconds);
        self.local.admit(
            &fallback_spec(spec, share),
            ask.users,
            ask.reserve_tokens,
            &budgets.scaled(share),
            &periods,
        )
    }
}

/// (hex digest, requests) per distinct end user: what the shared windows are keyed by, so no
/// user id, however long or odd, reaches a Redis key.
fn user_digests(users: &[&str]) -> Vec<(String, u32)> {
    let mut out: Vec<(String, u32)> = Vec::with_capacity(users.len());
    for user in users {
        let digest = hex::encode(&Sha256::digest(user.as_bytes())[..16]);
        match out.iter_mut().find(|(d, _)| *d == digest) {
            Some((_, n)) => *n += 1,
            None => out.push((digest, 1)),
        }
    }
    out
}

impl Reservation {
    /// The tokens held.
    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// Returns the unused part of the reservation (or charges what usage exceeded it) and adds
    /// the usage's cost to the spend. Shared settlements are queued and sent within
    /// `settlements::SETTLE_DELAY`, merged per ClaudeKey; one that fails is counted locally.
    pub fn settle(self, used: u64, usage: &Usage) {
        let limits = self.limits.clone();
        let nanos = self.price.nanos(usage);
        let shared = match (&limits.shared, self.counted) {
            (Some(shared), Counted::Shared) => Some(shared.clone()),
            _ => None,
        };
        let runtime = tokio::runtime::Handle::try_current();
        let (Some(shared), Ok(runtime)) = (shared, runtime) else {
            let periods = Periods::now(limits.day_seconds);
            let spent = limits.local.settle(self.tokens, used, nanos, &periods);
            // A fallback's local spend is this proxy's share, not the ClaudeKey's total.
            if self.counted == Counted::Local {
                limits.spend.show(&self.budgets, spent);
            }
            return;
        };
        if self.tokens == 0 && used == 0 && nanos == 0 {
            return;
        }
        let settlement = settlements::Settlement {
            tpm: self.tpm,
            delta: self.tokens as i64 - used as i64,
            nanos,
            day_seconds: limits.day_seconds,
        };
        let (owner, budgets, day_seconds) = (limits.clone(), self.budgets, limits.day_seconds);
        let done = Box::new(move |result: Result<(u64, u64), u64>| match result {
            Ok(spent) => owner.spend.show(&budgets, spent),
            Err(lost) => {
                // Lost to the shared total: counted against this proxy's fallback share.
                let periods = Periods::now(day_seconds);
                owner.local.settle(0, 0, lost, &periods);
            }
        });
        // The keys are cloned only by the first settlement of a batch (`queue`).
        shared
            .settlements
            .queue(&runtime, &limits.keys, settlement, done);
    }
}

impl Limiters {
    /// Sends the shared settlements still queued and gives back the credit held (at shutdown:
    /// no spend left behind, no window left fuller than it is).
    pub async fn flush(&self) {
        let Some(shared) = &self.shared else {
            return;
        };
        shared.settlements.flush().await;
        let held: Vec<Arc<KeyLimits>> = {
            let map = self.by_key.lock().unwrap_or_else(|p| p.into_inner());
            map.values().cloned().collect()
        };
        let backs = held.iter().filter_map(|limits| {
            let back = limits.lease.drain();
            (!back.is_empty()).then(|| {
                let counters = &shared.counters;
                async move {
                    let _ = counters
                        .give_back(&limits.keys, &back, limits.day_seconds)
                        .await;
                }
            })
        });
        futures::future::join_all(backs).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::BudgetSpec;

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
    async fn identity_keeps_its_window_across_lookups() {
        let limiters = Limiters::default();
        let ask = Ask::default();
        limiters
            .for_key(&id("a"))
            .admit(&rpm(1), ask)
            .await
            .unwrap();
        // A reload (or rotation) asks again for the same identity: still limited.
        assert!(
            limiters
                .for_key(&id("a"))
                .admit(&rpm(1), ask)
                .await
                .is_err()
        );
        assert!(limiters.for_key(&id("b")).admit(&rpm(1), ask).await.is_ok());
    }

    #[test]
    fn fallback_share_rounds_up_and_keeps_every_limit() {
        let spec = LimitsSpec {
            requests_per_minute: Some(60),
            tokens_per_minute: Some(1001),
            per_user_requests_per_hour: Some(1),
            budget: None,
        };
        let half = fallback_spec(&spec, 0.5);
        assert_eq!(half.requests_per_minute, Some(30));
        assert_eq!(half.tokens_per_minute, Some(501));
        // Never 0: a limit of 1 stays 1, so a fallback never refuses all traffic.
        assert_eq!(half.per_user_requests_per_hour, Some(1));
        assert_eq!(fallback_spec(&spec, 0.0).requests_per_minute, Some(1));
        assert_eq!(fallback_spec(&spec, 7.0), spec);
        assert_eq!(
            fallback_spec(&LimitsSpec::default(), 0.5),
            LimitsSpec::default()
        );
    }

    #[test]
    fn user_digests_count_each_user_once() {
        let users = user_digests(&["u1", "u2", "u1"]);
        assert_eq!(users.len(), 2);
        assert_eq!(users[0].1, 2);
        assert_eq!(users[0].0.len(), 32);
        assert!(users[0].0.chars().all(|c| c.is_ascii_hexdigit()));
    }

    #[tokio::test]
    async fn a_budget_is_refused_once_spent_in_memory() {
        let limiters = Limiters::default();
        let spec = LimitsSpec {
            budget: Some(BudgetSpec {
                usd_per_day: Some(0.05),
                usd_per_month: None,
            }),
            ..Default::default()
        };
        let limits = limiters.for_key(&id("a"));
        let ask = Ask {
            model: Some("claude-sonnet-4-5"),
            ..Default::default()
        };
        // 10,000 output tokens of Sonnet: $0.15.
        let usage = Usage {
            output: 10_000,
            ..Default::default()
        };
        limits.admit(&spec, ask).await.unwrap().settle(0, &usage);
        let refusal = limits.admit(&spec, ask).await.unwrap_err();
        assert_eq!(refusal.limit, Limit::BudgetDay);
        assert!(refusal.error.to_string().contains("$0.1500 is spent"));
    }
}
