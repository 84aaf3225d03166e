//! Counters shared by every proxy serving a ClaudeKey, in Redis (or Valkey): one atomic Lua
//! script per admission decision and one per settlement (`lua/`, named in
//! `crate::shared_counters`), run by EVALSHA with a fallback to loading the script (a restarted
//! Redis has none; a namespace's sidecar may not load one, so the controller does). Every call is bounded by a
//! short timeout; a failed call makes the caller count locally (`mod.rs`) and keeps Redis out
//! of the request path for `RETRY_AFTER` before the next try, so an outage never hangs or
//! fails a request, and the connection manager reconnects by itself.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

use redis::{Script, aio::ConnectionManager};

use super::{
    Limit, LimitsMetrics, Refusal,
    budget::{self, Budgets, Period},
    lease::{GiveBack, Grant, LEAST_UNITS, Wants},
    local::MAX_USERS,
    refuse,
};
pub use crate::shared_counters::{RedisSettings, SharedError};
use crate::{
    crd::LimitsSpec,
    proxyconf::ClaudeKeyRef,
    shared_counters::{self, connect},
};

/// How long Redis stays out of the request path after a failed call.
pub const RETRY_AFTER: Duration = Duration::from_millis(500);
/// Default bound of one call (connect included): well under any client's patience, well over
/// a loopback or in-cluster round trip.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(100);

/// The Redis keys of one ClaudeKey. All share the hash tag `{namespace/name}`, so a Redis
/// Cluster keeps them in one slot (a script may touch only one slot), and the identity, not a
/// key fingerprint, names them: a rotation never resets a window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
    pub rate: String,
    pub spend: String,
    pub users: String,
    pub overflow: String,
}

impl Keys {
    pub fn of(id: &ClaudeKeyRef) -> Self {
        let prefix = shared_counters::key_prefix(&id.namespace, &id.name);
        Self {
            rate: format!("{prefix}:rate"),
            spend: format!("{prefix}:spend"),
            users: format!("{prefix}:users"),
            overflow: format!("{prefix}:user:overflow"),
            prefix,
        }
    }

    /// The hourly window of the end user with this digest (hex of the user id's SHA-256).
    pub fn user(&self, digest: &str) -> String {
        format!("{}:user:{digest}", self.prefix)
    }
}

/// What the shared admission counted, and the credit it granted (users' units in the order of
/// the users asked for).
#[derive(Debug, Clone, Default)]
pub struct SharedAdmit {
    pub day_spend: u64,
    pub month_spend: u64,
    pub user_overflow: bool,
    pub grant: Grant,
}

/// One call of the admission script: the requests it counts now (1, or 0 for a credit refill
/// alone), its token reservation, its end users as (digest, requests) with distinct digests,
/// and the credit it asks for.
#[derive(Debug, Clone, Copy)]
pub struct AdmitCall<'a> {
    pub requests: u32,
    pub reserve: u64,
    pub users: &'a [(String, u32)],
    pub wants: Wants,
}

/// The shared counters: a multiplexed, self-reconnecting connection and the two scripts.
pub struct SharedCounters {
    conn: ConnectionManager,
    admit: Script,
    settle: Script,
    timeout: Duration,
    /// Set after a failed call: Redis is not asked again before then.
    down_until: Mutex<Option<Instant>>,
    metrics: LimitsMetrics,
}

/// The shared counters could not answer (logged and counted where it happened).
#[derive(Debug)]
pub struct Unavailable;

impl SharedCounters {
    /// Configures the client; connects lazily (on the first request), so a proxy starts and
    /// serves (on its fallback share) while Redis is still coming up.
    pub fn new(settings: &RedisSettings, metrics: LimitsMetrics) -> Result<Self, SharedError> {
        let conn = connect(settings)?;
        // Connect now, in the background: the first requests should not pay for it.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let mut warm = conn.clone();
            runtime.spawn(async move {
                let _: redis::RedisResult<String> = redis::cmd("PING").query_async(&mut warm).await;
            });
        }
        Ok(Self {
            conn,
            admit: Script::new(&shared_counters::admit_script()),
            settle: Script::new(&shared_counters::settle_script()),
            timeout: settings.timeout,
            down_until: Mutex::new(None),
            metrics,
        })
    }

    /// One admission decision (and the credit it grants).
    pub async fn admit(
        &self,
        keys: &Keys,
        spec: &LimitsSpec,
        budgets: &Budgets,
        ask: AdmitCall<'_>,
        day_seconds: i64,
    ) -> Result<Result<SharedAdmit, Refusal>, Unavailable> {
        let users = ask.users;
        let mut call = self.admit.prepare_invoke();
        call.key(&keys.rate)
            .key(&keys.spend)
            .key(&keys.users)
            .key(&keys.overflow);
        let per_user = spec.per_user_requests_per_hour.unwrap_or(0);
        if per_user > 0 {
            for (digest, _) in users {
                call.key(keys.user(digest));
            }
        }
        let budget = |b: Option<u64>| b.map_or(-1, |n| n.min(i64::MAX as u64) as i64);
        call.arg(spec.requests_per_minute.unwrap_or(0))
            .arg(spec.tokens_per_minute.unwrap_or(0))
            .arg(ask.reserve)
            .arg(per_user)
            .arg(budget(budgets.day))
            .arg(budget(budgets.month))
            .arg(day_seconds)
            .arg(MAX_USERS)
            .arg(ask.requests)
            .arg(ask.wants.requests)
            .arg(ask.wants.tokens)
            .arg(ask.wants.user_units)
            .arg(ask.wants.token_unit)
            .arg(LEAST_UNITS);
        if per_user > 0 {
            for (digest, n) in users {
                call.arg(digest).arg(*n);
            }
        }
        let reply: Vec<i64> = self.run(call.invoke_async(&mut self.conn.clone())).await?;
        let users = if per_user > 0 { users } else { &[] };
        Ok(decode_admit(&reply, budgets, users))
    }

    /// Returns `delta` (reserved minus used) tokens to the bucket and adds `nanos` to the
    /// spend; returns the day's and month's spend. Callers queue settlements
    /// (`super::settlements`) rather than call this per answer.
    pub(super) async fn settle(
        &self,
        keys: &Keys,
        tpm: u64,
        delta: i64,
        nanos: u64,
        day_seconds: i64,
    ) -> Result<(u64, u64), Unavailable> {
        self.settle_and_give_back(keys, (tpm, delta, nanos, day_seconds), &GiveBack::default())
            .await
    }

    /// Gives back credit that was not used (its tokens with the settlement's `delta`).
    pub(super) async fn give_back(
        &self,
        keys: &Keys,
        back: &GiveBack,
        day_seconds: i64,
    ) -> Result<(), Unavailable> {
        let tokens = back.tokens.min(i64::MAX as u64) as i64;
        self.settle_and_give_back(keys, (back.tpm, tokens, 0, day_seconds), back)
            .await
            .map(|_| ())
    }

    async fn settle_and_give_back(
        &self,
        keys: &Keys,
        (tpm, delta, nanos, day_seconds): (u64, i64, u64, i64),
        back: &GiveBack,
    ) -> Result<(u64, u64), Unavailable> {
        let mut call = self.settle.prepare_invoke();
        call.key(&keys.rate)
            .key(&keys.spend)
            .arg(tpm)
            .arg(delta)
            .arg(nanos)
            .arg(day_seconds)
            .arg(back.rpm)
            .arg(back.requests);
        for (digest, minute, units) in &back.users {
            call.key(keys.user(digest)).arg(*minute).arg(*units);
        }
        let reply: Vec<i64> = self.run(call.invoke_async(&mut self.conn.clone())).await?;
        let at = |i: usize| reply.get(i).copied().unwrap_or(0).max(0) as u64;
        Ok((at(0), at(1)))
    }

    /// Whether Redis may be asked now (not within `RETRY_AFTER` of a failure).
    fn available(&self) -> bool {
        let down = self.down_until.lock().unwrap_or_else(|p| p.into_inner());
        down.is_none_or(|until| Instant::now() >= until)
    }

    async fn run<T>(
        &self,
        call: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, Unavailable> {
        if !self.available() {
            return Err(Unavailable);
        }
        let failure = match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(value)) => {
                self.mark_up();
                return Ok(value);
            }
            Ok(Err(e)) => e.category().to_string(),
            Err(_) => "timeout".to_string(),
        };
        self.mark_down(&failure);
        Err(Unavailable)
    }

    fn mark_up(&self) {
        let mut down = self.down_until.lock().unwrap_or_else(|p| p.into_inner());
        if down.take().is_some() {
            tracing::info!("shared limits: Redis answers again; counting shared");
        }
        self.metrics.fallback.set(0);
    }

    /// Logs the failure's category only (never a URL or a server's message).
    fn mark_down(&self, category: &str) {
        let mut down = self.down_until.lock().unwrap_or_else(|p| p.into_inner());
        if down.is_none() {
            tracing::warn!(
                error = category,
                "shared limits: Redis unreachable; each proxy counts its fallback share of every limit until it answers again"
            );
        }
        *down = Some(Instant::now() + RETRY_AFTER);
        self.metrics.fallback.set(1);
        self.metrics.shared_errors.inc();
    }
}

/// Decodes `admit.lua`'s reply into the admission (with its credit for `users`, the users
/// asked for) or the refusal it describes.
fn decode_admit(
    reply: &[i64],
    budgets: &Budgets,
    users: &[(String, u32)],
) -> Result<SharedAdmit, Refusal> {
    let at = |i: usize| reply.get(i).copied().unwrap_or(0);
    let ms = |i: usize| Duration::from_millis(at(i).max(1) as u64);
    match at(0) {
        1 => Err(refuse(Limit::Requests, "requests per minute", ms(1), true)),
        2 if at(2) == 0 => Err(refuse(
            Limit::Tokens,
            "tokens per minute (this request alone needs more)",
            ms(1),
            false,
        )),
        2 => Err(refuse(Limit::Tokens, "tokens per minute", ms(1), true)),
        3 => Err(refuse(
            Limit::User,
            "this end user's requests per hour",
            ms(1),
            true,
        )),
        code @ (4 | 5) => {
            let (limit, budget) = if code == 4 {
                (Limit::BudgetDay, budgets.day)
            } else {
                (Limit::BudgetMonth, budgets.month)
            };
            let period = Period { id: 0, ends: at(1) };
            Err(budget::spent(
                limit,
                budget.unwrap_or(0),
                at(2).max(0) as u64,
                period,
                at(3),
            ))
        }
        _ => Ok(SharedAdmit {
            day_spend: at(1).max(0) as u64,
            month_spend: at(2).max(0) as u64,
            user_overflow: at(3) == 1,
            grant: Grant {
                requests: at(4).max(0) as u64,
                tokens: at(5).max(0) as u64,
                minute: at(6),
                users: users
                    .iter()
                    .enumerate()
                    .map(|(i, (digest, _))| {
                        (digest.clone(), at(7 + i).clamp(0, u32::MAX as i64) as u32)
                    })
                    .collect(),
            },
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::error::ApiError;

    #[test]
    fn keys_are_hash_tagged_by_identity() {
        let keys = Keys::of(&ClaudeKeyRef {
            namespace: "team-a".into(),
            name: "bot".into(),
        });
        assert_eq!(keys.rate, "claudekey:{team-a/bot}:rate");
        assert_eq!(keys.spend, "claudekey:{team-a/bot}:spend");
        assert_eq!(keys.user("ab12"), "claudekey:{team-a/bot}:user:ab12");
        // Every key of the ClaudeKey hashes to one Redis Cluster slot: same tag.
        for key in [&keys.rate, &keys.spend, &keys.users, &keys.overflow] {
            assert!(key.contains("{team-a/bot}"), "{key}");
        }
    }

    #[test]
    fn replies_decode_to_refusals() {
        let budgets = Budgets {
            day: Some(50_000_000),
            month: None,
        };
        let r = decode_admit(&[1, 1500], &budgets, &[]).unwrap_err();
        assert_eq!(r.limit, Limit::Requests);
        let ApiError::RateLimited {
            retry_after,
            retryable,
            ..
        } = r.error
        else {
            panic!()
        };
        assert_eq!(retry_after, Duration::from_millis(1500));
        assert!(retryable);
        assert!(matches!(
            decode_admit(&[2, 60000, 0], &budgets, &[])
                .unwrap_err()
                .error,
            ApiError::RateLimited {
                retryable: false,
                ..
            }
        ));
        assert_eq!(
            decode_admit(&[3, 10], &budgets, &[]).unwrap_err().limit,
            Limit::User
        );
        let r = decode_admit(&[4, 1_000_000, 60_000_000, 999_000], &budgets, &[]).unwrap_err();
        assert_eq!(r.limit, Limit::BudgetDay);
        assert!(
            r.error.to_string().contains("$0.0600 is spent"),
            "{}",
            r.error
        );
        let users = [("d1".to_string(), 1), ("d2".to_string(), 2)];
        let ok = decode_admit(&[0, 7, 9, 1, 64, 500, 42, 3, 0], &budgets, &users).unwrap();
        assert_eq!(
            (ok.day_spend, ok.month_spend, ok.user_overflow),
            (7, 9, true)
        );
        assert_eq!(
            ok.grant,
            Grant {
                requests: 64,
                tokens: 500,
                minute: 42,
                users: vec![("d1".into(), 3), ("d2".into(), 0)],
            }
        );
        // A reply of an older script (no credit) grants none.
        assert_eq!(
            decode_admit(&[0, 0, 0, 0], &budgets, &users)
                .unwrap()
                .grant
                .requests,
            0
        );
    }
}
