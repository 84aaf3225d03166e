//! The rotation decision (DESIGN.md §3 step 2 and 5) as a pure function of the spec, the trigger
//! annotations, the durable ledger, the upstream key just read and `now`. No I/O here.

use chrono::{DateTime, TimeDelta, Utc};

use super::ledger::{Ledger, UpstreamLedgerEntry};
use crate::crd::{ClaudeKeySpec, DataProtectionSpec};
use crate::proxy::redact::Redactor;
use crate::proxyconf::WorkloadKeyEntry;

/// Why a new workload key is issued. `as_str` values are the bounded `reason` metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RotationReason {
    /// No key existed yet.
    Initial,
    /// The key reached `spec.rotation.interval`.
    Interval,
    /// The `claudekey.io/rotate` annotation changed.
    Rotate,
    /// The `claudekey.io/revoke` annotation changed: zero grace.
    Revoke,
    /// `spec.expiresAt` passed: the key is retired with zero grace.
    Expired,
    /// The `-client` Secret holding the raw key was deleted or edited by hand; its key cannot be
    /// recovered from hashes, so a new one is issued and the old one gets the normal grace.
    ClientLost,
}

impl RotationReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Initial => "initial",
            Self::Interval => "interval",
            Self::Rotate => "rotate",
            Self::Revoke => "revoke",
            Self::Expired => "expired",
            Self::ClientLost => "clientLost",
        }
    }

    /// Revocation and expiry end the old key at once, and with it any older key still in grace.
    pub fn zero_grace(self) -> bool {
        matches!(self, Self::Revoke | Self::Expired)
    }
}

/// The values of the trigger annotations on the ClaudeKey.
#[derive(Clone, Copy, Debug, Default)]
pub struct Triggers<'a> {
    pub rotate: Option<&'a str>,
    pub revoke: Option<&'a str>,
}

/// A key identified by hash only: a freshly generated candidate or the upstream key just read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyId {
    pub sha256: String,
    pub fingerprint: String,
}

/// The upstream key the backend returned this time, by hash, with its backend version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FetchedUpstream {
    pub id: KeyId,
    pub version: String,
    /// The Admin API's partial hint of the key, kept so the key can be retired later.
    pub hint: Option<String>,
}

/// What the controller found in its Secrets.
#[derive(Clone, Copy, Debug)]
pub struct Observed<'a> {
    /// The committed ledger, if any Secret held a readable one.
    pub ledger: Option<&'a Ledger>,
    /// Whether the raw current workload key is available (the `-client` Secret matches the ledger).
    pub client_key_present: bool,
    /// The source is workload identity federation: no upstream key exists, none is needed, and
    /// any left from an earlier backend is dropped from the ledger (and so from proxy.json).
    pub federated: bool,
}

/// The outcome: the ledger to write and what happened, for Events, metrics and requeue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub ledger: Ledger,
    /// Set when the candidate key becomes the current workload key.
    pub rotation: Option<RotationReason>,
    /// Whether a new upstream key became current.
    pub upstream_rolled: bool,
    /// When the key is next rotated on schedule; `None` once the ClaudeKey has expired.
    pub next_rotation: Option<DateTime<Utc>>,
    /// Whether `spec.expiresAt` has passed.
    pub expired: bool,
    /// The earliest time something changes without outside events (rotation, end of a grace
    /// period, expiry). Backend refreshes are added by the caller, which owns the cache.
    pub wake_at: Option<DateTime<Utc>>,
}

/// Nothing can be written: there is no upstream key, neither from the backend nor from before.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("no upstream key has been synced yet")]
pub struct NoUpstreamKey;

/// Decides the next ledger. `candidate` is a freshly generated key the caller uses only when
/// `rotation` is set, which keeps key generation (I/O) out of this function.
pub fn decide(
    spec: &ClaudeKeySpec,
    triggers: Triggers<'_>,
    observed: Observed<'_>,
    upstream: Option<&FetchedUpstream>,
    candidate: &KeyId,
    now: DateTime<Utc>,
) -> Result<Decision, NoUpstreamKey> {
    let grace = spec.rotation.grace_period.as_chrono();
    let expired = spec.expires_at.is_some_and(|t| now >= t);
    let (mut ledger, rotation, upstream_rolled) = match observed.ledger {
        None => {
            let upstream = match upstream {
                Some(upstream) => Some(upstream),
                None if observed.federated => None,
                None => return Err(NoUpstreamKey),
            };
            let ledger = Ledger {
                issued_at: now,
                rotate_handled: triggers.rotate.map(str::to_string),
                revoke_handled: triggers.revoke.map(str::to_string),
                expiry_handled: spec.expires_at.filter(|_| expired),
                workload_keys: vec![current_workload(candidate)],
                upstream_version: upstream.map(|u| u.version.clone()).unwrap_or_default(),
                upstream_keys: upstream.map(current_upstream).into_iter().collect(),
            };
            (ledger, Some(RotationReason::Initial), false)
        }
        Some(previous) => {
            let mut ledger = prune(previous, now);
            let rotation = rotation_reason(spec, triggers, observed, previous, now);
            ledger.rotate_handled = triggers.rotate.map(str::to_string);
            ledger.revoke_handled = triggers.revoke.map(str::to_string);
            if let Some(reason) = rotation {
                if reason == RotationReason::Expired {
                    ledger.expiry_handled = spec.expires_at;
                }
                let grace = if reason.zero_grace() {
                    TimeDelta::zero()
                } else {
                    grace
                };
                rotate_workload(
                    &mut ledger,
                    candidate,
                    reason.zero_grace(),
                    now + grace,
                    grace,
                );
                ledger.issued_at = now;
            }
            let rolled = if observed.federated {
                ledger.upstream_keys.clear();
                ledger.upstream_version.clear();
                false
            } else {
                roll_upstream(&mut ledger, upstream, now, grace)?
            };
            (ledger, rotation, rolled)
        }
    };
    if let Some(upstream) = upstream {
        ledger.upstream_version = upstream.version.clone();
    }
    let next_rotation = (!expired).then(|| ledger.issued_at + spec.rotation.interval.as_chrono());
    let wake_at = wake_at(&ledger, next_rotation, spec.expires_at.filter(|_| !expired));
    Ok(Decision {
        ledger,
        rotation,
        upstream_rolled,
        next_rotation,
        expired,
        wake_at,
    })
}

fn rotation_reason(
    spec: &ClaudeKeySpec,
    triggers: Triggers<'_>,
    observed: Observed<'_>,
    ledger: &Ledger,
    now: DateTime<Utc>,
) -> Option<RotationReason> {
    let changed = |value: Option<&str>, handled: &Option<String>| {
        value.is_some_and(|v| handled.as_deref() != Some(v))
    };
    let expires_now = spec
        .expires_at
        .filter(|t| now >= *t && ledger.expiry_handled != Some(*t));
    let expired = spec.expires_at.is_some_and(|t| now >= t);
    if changed(triggers.revoke, &ledger.revoke_handled) {
        Some(RotationReason::Revoke)
    } else if expires_now.is_some() {
        Some(RotationReason::Expired)
    } else if !observed.client_key_present || ledger.current_workload().is_none() {
        Some(RotationReason::ClientLost)
    } else if changed(triggers.rotate, &ledger.rotate_handled) {
        Some(RotationReason::Rotate)
    } else if !expired && now >= ledger.issued_at + spec.rotation.interval.as_chrono() {
        Some(RotationReason::Interval)
    } else {
        None
    }
}

/// Drops every previous entry whose grace period has ended.
fn prune(ledger: &Ledger, now: DateTime<Utc>) -> Ledger {
    let alive = |until: Option<DateTime<Utc>>| until.is_none_or(|t| now < t);
    let mut ledger = ledger.clone();
    ledger.workload_keys.retain(|k| alive(k.valid_until));
    ledger.upstream_keys.retain(|k| alive(k.valid_until));
    ledger
}

fn rotate_workload(
    ledger: &mut Ledger,
    candidate: &KeyId,
    zero_grace: bool,
    until: DateTime<Utc>,
    grace: TimeDelta,
) {
    if zero_grace {
        ledger.workload_keys.clear();
    } else {
        for key in &mut ledger.workload_keys {
            if key.valid_until.is_none() {
                key.valid_until = Some(until);
            }
        }
        if grace <= TimeDelta::zero() {
            ledger.workload_keys.retain(|k| k.valid_until.is_none());
        }
    }
    ledger
        .workload_keys
        .retain(|k| k.sha256 != candidate.sha256);
    ledger.workload_keys.insert(0, current_workload(candidate));
}

/// Makes a new upstream key current with the same overlap as a workload rotation.
fn roll_upstream(
    ledger: &mut Ledger,
    upstream: Option<&FetchedUpstream>,
    now: DateTime<Utc>,
    grace: TimeDelta,
) -> Result<bool, NoUpstreamKey> {
    let Some(upstream) = upstream else {
        return ledger
            .current_upstream()
            .map(|_| false)
            .ok_or(NoUpstreamKey);
    };
    if ledger
        .current_upstream()
        .is_some_and(|c| c.sha256 == upstream.id.sha256)
    {
        return Ok(false);
    }
    for key in &mut ledger.upstream_keys {
        if key.valid_until.is_none() {
            key.valid_until = Some(now + grace);
        }
    }
    ledger
        .upstream_keys
        .retain(|k| k.sha256 != upstream.id.sha256 && k.valid_until.is_some_and(|t| now < t));
    ledger.upstream_keys.insert(0, current_upstream(upstream));
    Ok(true)
}

fn wake_at(
    ledger: &Ledger,
    next_rotation: Option<DateTime<Utc>>,
    expires_at: Option<DateTime<Utc>>,
) -> Option<DateTime<Utc>> {
    let grace_ends = ledger
        .workload_keys
        .iter()
        .filter_map(|k| k.valid_until)
        .chain(ledger.upstream_keys.iter().filter_map(|k| k.valid_until));
    grace_ends.chain(next_rotation).chain(expires_at).min()
}

fn current_workload(key: &KeyId) -> WorkloadKeyEntry {
    WorkloadKeyEntry {
        sha256: key.sha256.clone(),
        fingerprint: key.fingerprint.clone(),
        valid_until: None,
    }
}

fn current_upstream(upstream: &FetchedUpstream) -> UpstreamLedgerEntry {
    UpstreamLedgerEntry {
        sha256: upstream.id.sha256.clone(),
        fingerprint: upstream.id.fingerprint.clone(),
        valid_until: None,
        hint: upstream.hint.clone(),
    }
}

#[cfg(test)]
#[path = "decide_tests.rs"]
mod tests;

/// The key of the compiled redactor a ClaudeKey's spec needs of its own (the proxy shares one
/// per key), or `None` when it lists no custom patterns: the built-in detectors alone are few
/// and small.
pub fn pattern_list(spec: &ClaudeKeySpec) -> Option<String> {
    let protection = &spec.data_protection;
    (!protection.custom_patterns.is_empty()).then(|| Redactor::key(protection))
}

/// One ClaudeKey of a namespace with custom patterns, as the pattern budget orders it.
pub struct PatternUser<'a> {
    /// `metadata.creationTimestamp`, in seconds since the epoch (its precision).
    pub created: Option<i64>,
    pub name: &'a str,
    pub protection: &'a DataProtectionSpec,
}

/// The distinct pattern lists of the ClaudeKeys created before `this` one (by creation time, then
/// name), in that order, at most `max`: the lists that hold the namespace's first places. A
/// later ClaudeKey cannot take an earlier one's place, so which ClaudeKeys are refused does not
/// depend on the order they were reconciled in, and a new one never refuses an old one.
pub fn earlier_pattern_lists(
    mut others: Vec<PatternUser<'_>>,
    this: (Option<i64>, &str),
    max: usize,
) -> Vec<String> {
    others.retain(|o| (o.created, o.name) < this);
    others.sort_by(|a, b| (a.created, a.name).cmp(&(b.created, b.name)));
    // Compared as they are and written out only once distinct: a namespace's ClaudeKeys mostly
    // share one list, and writing each out (for every reconcile of each) made the budget
    // quadratic in the namespace's size.
    let mut firsts: Vec<&DataProtectionSpec> = Vec::new();
    for other in others {
        if firsts.len() == max {
            break;
        }
        if !firsts.iter().any(|p| same_detectors(p, other.protection)) {
            firsts.push(other.protection);
        }
    }
    firsts.into_iter().map(Redactor::key).collect()
}

/// Whether two specs compile to one redactor: what [`Redactor::key`] tells apart.
fn same_detectors(a: &DataProtectionSpec, b: &DataProtectionSpec) -> bool {
    a.redact == b.redact && a.custom_patterns == b.custom_patterns
}

/// A namespace may use at most `max` distinct custom-pattern lists: each one is compiled on its
/// own in a gateway all namespaces share (up to ~3.6 MB, see `proxy::redact`), and a
/// namespace with edit rights on ClaudeKeys must not be able to grow that process until it
/// is killed. ClaudeKeys with the same detectors share one place.
pub fn pattern_budget(
    spec: &ClaudeKeySpec,
    earlier: &[String],
    max: usize,
    namespace: &str,
) -> Result<(), String> {
    let Some(list) = pattern_list(spec) else {
        return Ok(());
    };
    if earlier.len() < max || earlier[..max].contains(&list) {
        return Ok(());
    }
    Err(format!(
        "namespace {namespace} already uses {max} distinct dataProtection detector lists with \
         customPatterns in ClaudeKeys older than this one, the most a namespace may (the \
         controller's --max-pattern-lists-per-namespace): give this ClaudeKey the same redact \
         and customPatterns as one of them, or remove one; this ClaudeKey is tried again as \
         soon as another ClaudeKey of the namespace changes its spec or is deleted"
    ))
}

/// Verdicts of [`crate::proxy::redact::Redactor::check`] by [`pattern_list`] key: the check
/// compiles the detectors (about 1 ms for a few small patterns, several for large ones), and
/// every reconcile of a ClaudeKey with custom patterns validates them, so 10,000 such ClaudeKeys
/// would cost a resync seconds of CPU. The verdict is a function of the key alone; forgotten
/// all at once when [`PATTERN_VERDICTS_KEPT`] are held.
static PATTERN_VERDICTS: std::sync::LazyLock<
    std::sync::Mutex<std::collections::HashMap<String, Result<(), String>>>,
> = std::sync::LazyLock::new(Default::default);

/// At most this many verdicts are kept (keys are at most a few KB: 32 patterns of the CRD).
const PATTERN_VERDICTS_KEPT: usize = 1024;

fn check_patterns(list: String, protection: &crate::crd::DataProtectionSpec) -> Result<(), String> {
    let verdicts = || PATTERN_VERDICTS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(verdict) = verdicts().get(&list) {
        return verdict.clone();
    }
    // Compiled without the lock: reconciles of other lists go on meanwhile.
    let verdict = crate::proxy::redact::Redactor::check(protection)
        .map_err(|e| format!("dataProtection.customPatterns: {e}"));
    let mut kept = verdicts();
    if kept.len() >= PATTERN_VERDICTS_KEPT {
        kept.clear();
    }
    kept.insert(list, verdict.clone());
    verdict
}

/// Spec errors the schema cannot express. The reconcile reports them as Ready=False InvalidSpec
/// and waits for a spec change instead of retrying.
pub fn validate(spec: &ClaudeKeySpec) -> Result<(), String> {
    // The proxy's own check, so a spec that is Ready always compiles where it is used (a
    // gateway many namespaces share included); the built-in detectors alone always do.
    if let Some(list) = pattern_list(spec) {
        check_patterns(list, &spec.data_protection)?;
    }
    let second = std::time::Duration::from_secs(1);
    if spec.rotation.interval.as_duration() < second {
        return Err(format!(
            "rotation.interval {} is shorter than 1s",
            spec.rotation.interval
        ));
    }
    Ok(())
}
