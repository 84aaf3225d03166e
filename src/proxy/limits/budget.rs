//! Spend budgets: the UTC day and month a spend belongs to, and the refusal once a budget is
//! spent. Pure; the shared Lua script computes the same periods from Redis's clock (`admit.lua`).

use std::time::Duration;

use chrono::{DateTime, Datelike, TimeZone, Utc};

use super::{Limit, Refusal};
use crate::{crd::LimitsSpec, proxy::error::ApiError};

/// Length of a budget day in production. In-process tests shorten it (`LimitSettings`); no flag
/// or environment variable does.
pub const DAY_SECONDS: i64 = 86_400;
/// With a shortened day, a "month" is this many of them (a calendar month otherwise).
pub const TEST_DAYS_PER_MONTH: i64 = 30;
/// Nano-USD per USD: spend is counted in integers, so it adds up exactly across processes.
pub const NANOS_PER_USD: f64 = 1e9;

/// One budget period: its id (changes when it resets) and when it ends (Unix seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Period {
    pub id: i64,
    pub ends: i64,
}

/// The day and month of one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Periods {
    pub now: i64,
    pub day: Period,
    pub month: Period,
}

impl Periods {
    /// The periods of Unix second `now`, with days of `day_seconds` (86400: UTC days and
    /// calendar months).
    pub fn at(now: i64, day_seconds: i64) -> Self {
        let day_seconds = day_seconds.max(1);
        let day_id = now.div_euclid(day_seconds);
        let day = Period {
            id: day_id,
            ends: (day_id + 1) * day_seconds,
        };
        let month = if day_seconds == DAY_SECONDS {
            calendar_month(now)
        } else {
            let len = day_seconds * TEST_DAYS_PER_MONTH;
            let id = now.div_euclid(len);
            Period {
                id,
                ends: (id + 1) * len,
            }
        };
        Self { now, day, month }
    }

    /// The periods of this process's clock.
    pub fn now(day_seconds: i64) -> Self {
        Self::at(Utc::now().timestamp(), day_seconds)
    }
}

/// Calendar month of `now`: id `year * 12 + month0`, ending at the 1st of the next month.
fn calendar_month(now: i64) -> Period {
    let at = DateTime::from_timestamp(now, 0).unwrap_or_default();
    let id = i64::from(at.year()) * 12 + i64::from(at.month0());
    let (year, month) = if at.month() == 12 {
        (at.year() + 1, 1)
    } else {
        (at.year(), at.month() + 1)
    };
    let ends = Utc
        .with_ymd_and_hms(year, month, 1, 0, 0, 0)
        .single()
        .map_or(now + DAY_SECONDS, |t| t.timestamp());
    Period { id, ends }
}

/// A ClaudeKey's budgets in nano-USD; `None` is unlimited.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Budgets {
    pub day: Option<u64>,
    pub month: Option<u64>,
}

impl Budgets {
    pub fn of(spec: &LimitsSpec) -> Self {
        let nanos = |usd: Option<f64>| usd.map(|u| (u.max(0.0) * NANOS_PER_USD).round() as u64);
        match &spec.budget {
            Some(b) => Self {
                day: nanos(b.usd_per_day),
                month: nanos(b.usd_per_month),
            },
            None => Self::default(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.day.is_none() && self.month.is_none()
    }

    /// This share of each budget (the fallback while shared counters are unreachable).
    pub fn scaled(&self, share: f64) -> Self {
        let scale = |n: Option<u64>| n.map(|n| (n as f64 * share).floor() as u64);
        Self {
            day: scale(self.day),
            month: scale(self.month),
        }
    }

    /// Refuses once the day's or the month's spend has reached its budget.
    pub fn check(&self, day: u64, month: u64, periods: &Periods) -> Result<(), Refusal> {
        if let Some(budget) = self.day
            && day >= budget
        {
            return Err(spent(
                Limit::BudgetDay,
                budget,
                day,
                periods.day,
                periods.now,
            ));
        }
        if let Some(budget) = self.month
            && month >= budget
        {
            return Err(spent(
                Limit::BudgetMonth,
                budget,
                month,
                periods.month,
                periods.now,
            ));
        }
        Ok(())
    }
}

/// The refusal of a spent budget: not retryable (waiting seconds does not help), naming the
/// budget and when it resets.
pub fn spent(limit: Limit, budget: u64, spent: u64, period: Period, now: i64) -> Refusal {
    let resets = DateTime::from_timestamp(period.ends, 0)
        .unwrap_or_default()
        .format("%Y-%m-%dT%H:%M:%SZ");
    let which = match limit {
        Limit::BudgetMonth => "UTC month",
        _ => "UTC day",
    };
    Refusal {
        limit,
        error: ApiError::RateLimited {
            message: format!(
                "spend budget exceeded: {} of this ClaudeKey is ${} and ${} is spent; it resets at {resets} (start of the next {which})",
                limit.label(),
                usd(budget),
                usd(spent),
            ),
            retry_after: Duration::from_secs((period.ends - now).max(1) as u64),
            retryable: false,
        },
    }
}

/// Nano-USD as dollars for people: cents, or more digits below a cent.
pub fn usd(nanos: u64) -> String {
    let dollars = nanos as f64 / NANOS_PER_USD;
    if dollars >= 1.0 || nanos == 0 {
        format!("{dollars:.2}")
    } else {
        format!("{dollars:.4}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::BudgetSpec;

    fn ts(s: &str) -> i64 {
        DateTime::parse_from_rfc3339(s).unwrap().timestamp()
    }

    #[test]
    fn utc_days_and_calendar_months() {
        let p = Periods::at(ts("2026-12-31T23:59:59Z"), DAY_SECONDS);
        assert_eq!(p.day.ends, ts("2027-01-01T00:00:00Z"));
        assert_eq!(p.month.ends, ts("2027-01-01T00:00:00Z"));
        let q = Periods::at(ts("2027-01-01T00:00:00Z"), DAY_SECONDS);
        assert_eq!(q.day.id, p.day.id + 1);
        assert_eq!(q.month.id, p.month.id + 1);
        let feb = Periods::at(ts("2028-02-15T12:00:00Z"), DAY_SECONDS);
        assert_eq!(feb.month.ends, ts("2028-03-01T00:00:00Z"));
        assert_eq!(feb.day.ends, ts("2028-02-16T00:00:00Z"));
        // The Lua script's month id is year * 12 + month0 too.
        assert_eq!(feb.month.id, 2028 * 12 + 1);
    }

    #[test]
    fn a_short_test_day_and_its_month() {
        let p = Periods::at(1000, 10);
        assert_eq!(
            p.day,
            Period {
                id: 100,
                ends: 1010
            }
        );
        assert_eq!(p.month, Period { id: 3, ends: 1200 });
    }

    #[test]
    fn budgets_in_nanos_and_their_share() {
        let spec = LimitsSpec {
            budget: Some(BudgetSpec {
                usd_per_day: Some(0.05),
                usd_per_month: Some(100.0),
            }),
            ..Default::default()
        };
        let b = Budgets::of(&spec);
        assert_eq!(b.day, Some(50_000_000));
        assert_eq!(b.month, Some(100_000_000_000));
        assert_eq!(b.scaled(0.5).day, Some(25_000_000));
        assert!(Budgets::of(&LimitsSpec::default()).is_empty());
    }

    #[test]
    fn refusal_names_the_budget_and_its_reset() {
        let b = Budgets {
            day: Some(50_000_000),
            month: None,
        };
        let p = Periods::at(ts("2026-12-02T10:00:00Z"), DAY_SECONDS);
        assert!(b.check(49_999_999, u64::MAX, &p).is_ok());
        let refusal = b.check(50_000_000, 0, &p).unwrap_err();
        assert_eq!(refusal.limit, Limit::BudgetDay);
        let ApiError::RateLimited {
            message,
            retry_after,
            retryable,
        } = refusal.error
        else {
            panic!()
        };
        assert!(!retryable);
        assert_eq!(retry_after, Duration::from_secs(14 * 3600));
        assert!(message.contains("usdPerDay"), "{message}");
        assert!(message.contains("$0.0500"), "{message}");
        assert!(message.contains("2026-12-03T00:00:00Z"), "{message}");
        let month = Budgets {
            day: None,
            month: Some(0),
        };
        let refusal = month.check(0, 0, &p).unwrap_err();
        assert_eq!(refusal.limit, Limit::BudgetMonth);
        assert!(refusal.error.to_string().contains("2027-01-01T00:00:00Z"));
    }
}
