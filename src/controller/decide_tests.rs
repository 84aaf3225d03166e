//! Unit tests of the rotation decision: every trigger, the grace overlap, expiry and requeue.

use chrono::{DateTime, TimeDelta, Utc};

use super::*;
use crate::crd::ClaudeKeySpec;

fn t(s: &str) -> DateTime<Utc> {
    s.parse().unwrap()
}

fn spec(extra: &str) -> ClaudeKeySpec {
    let yaml = format!(
        "sourceRef: {{ kind: ClusterClaudeKeySource, name: up }}\nrotation: {{ interval: 24h, gracePeriod: 15m }}\n{extra}"
    );
    serde_yaml::from_str(&yaml).unwrap()
}

fn key(n: u8) -> KeyId {
    KeyId {
        sha256: format!("{n:02x}").repeat(32),
        fingerprint: format!("ck:{n:02x}{n:02x}{n:02x}{n:02x}"),
    }
}

fn up(n: u8, version: &str) -> FetchedUpstream {
    FetchedUpstream {
        id: key(100 + n),
        version: version.to_string(),
        hint: Some(format!("sk-ant-api03-{n:03}...{n:04}")),
    }
}

const T0: &str = "2026-11-27T10:00:00Z";

fn initial(spec: &ClaudeKeySpec, triggers: Triggers<'_>) -> Decision {
    let observed = Observed {
        ledger: None,
        client_key_present: false,
        federated: false,
    };
    decide(spec, triggers, observed, Some(&up(1, "v1")), &key(1), t(T0)).unwrap()
}

fn next(
    spec: &ClaudeKeySpec,
    triggers: Triggers<'_>,
    ledger: &Ledger,
    upstream: Option<&FetchedUpstream>,
    candidate: u8,
    now: DateTime<Utc>,
) -> Decision {
    let observed = Observed {
        ledger: Some(ledger),
        client_key_present: true,
        federated: false,
    };
    decide(spec, triggers, observed, upstream, &key(candidate), now).unwrap()
}

fn hashes(d: &Decision) -> Vec<(String, Option<DateTime<Utc>>)> {
    d.ledger
        .workload_keys
        .iter()
        .map(|k| (k.fingerprint.clone(), k.valid_until))
        .collect()
}

#[test]
fn first_reconcile_issues_and_records_existing_triggers() {
    let s = spec("");
    let d = initial(
        &s,
        Triggers {
            rotate: Some("a"),
            revoke: Some("b"),
        },
    );
    assert_eq!(d.rotation, Some(RotationReason::Initial));
    assert_eq!(hashes(&d), vec![(key(1).fingerprint, None)]);
    assert_eq!(d.ledger.rotate_handled.as_deref(), Some("a"));
    assert_eq!(d.ledger.revoke_handled.as_deref(), Some("b"));
    assert_eq!(d.ledger.upstream_version, "v1");
    assert_eq!(d.next_rotation, Some(t("2026-11-28T10:00:00Z")));
    assert_eq!(d.wake_at, d.next_rotation);
}

#[test]
fn without_any_upstream_key_nothing_can_be_written() {
    let observed = Observed {
        ledger: None,
        client_key_present: false,
        federated: false,
    };
    let err = decide(
        &spec(""),
        Triggers::default(),
        observed,
        None,
        &key(1),
        t(T0),
    );
    assert_eq!(err, Err(NoUpstreamKey));
}

#[test]
fn steady_state_is_a_fixed_point() {
    let s = spec("");
    let d0 = initial(&s, Triggers::default());
    let later = t(T0) + TimeDelta::hours(1);
    let d1 = next(
        &s,
        Triggers::default(),
        &d0.ledger,
        Some(&up(1, "v1")),
        2,
        later,
    );
    assert_eq!(d1.rotation, None);
    assert!(!d1.upstream_rolled);
    assert_eq!(d1.ledger, d0.ledger);
    // The backend being down changes nothing either.
    let d2 = next(&s, Triggers::default(), &d0.ledger, None, 3, later);
    assert_eq!(d2.ledger, d0.ledger);
}

#[test]
fn rotate_annotation_rotates_once_with_grace() {
    let s = spec("");
    let d0 = initial(
        &s,
        Triggers {
            rotate: Some("1"),
            revoke: None,
        },
    );
    let now = t(T0) + TimeDelta::hours(1);
    let triggers = Triggers {
        rotate: Some("2"),
        revoke: None,
    };
    let d1 = next(&s, triggers, &d0.ledger, Some(&up(1, "v1")), 2, now);
    assert_eq!(d1.rotation, Some(RotationReason::Rotate));
    let until = now + TimeDelta::minutes(15);
    assert_eq!(
        hashes(&d1),
        vec![
            (key(2).fingerprint, None),
            (key(1).fingerprint, Some(until))
        ]
    );
    assert_eq!(d1.ledger.issued_at, now);
    assert_eq!(d1.wake_at, Some(until));
    // Same annotation again (e.g. after a controller restart): no second key.
    let d2 = next(
        &s,
        triggers,
        &d1.ledger,
        Some(&up(1, "v1")),
        3,
        now + TimeDelta::minutes(1),
    );
    assert_eq!(d2.rotation, None);
    assert_eq!(d2.ledger, d1.ledger);
    // After grace the previous key is gone.
    let d3 = next(&s, triggers, &d1.ledger, Some(&up(1, "v1")), 4, until);
    assert_eq!(hashes(&d3), vec![(key(2).fingerprint, None)]);
    assert_eq!(d3.wake_at, Some(now + TimeDelta::hours(24)));
}

#[test]
fn revoke_drops_every_older_key_at_once() {
    let s = spec("");
    let d0 = initial(&s, Triggers::default());
    let now = t(T0) + TimeDelta::hours(1);
    let d1 = next(
        &s,
        Triggers {
            rotate: Some("x"),
            revoke: None,
        },
        &d0.ledger,
        None,
        2,
        now,
    );
    assert_eq!(d1.ledger.workload_keys.len(), 2);
    let both = Triggers {
        rotate: Some("y"),
        revoke: Some("breach"),
    };
    let d2 = next(&s, both, &d1.ledger, None, 3, now + TimeDelta::minutes(1));
    assert_eq!(d2.rotation, Some(RotationReason::Revoke));
    assert_eq!(hashes(&d2), vec![(key(3).fingerprint, None)]);
    assert_eq!(
        d2.ledger.rotate_handled.as_deref(),
        Some("y"),
        "revoke also covers a rotate"
    );
}

#[test]
fn interval_rotation_happens_at_the_deadline_not_before() {
    let s = spec("");
    let d0 = initial(&s, Triggers::default());
    let due = t(T0) + TimeDelta::hours(24);
    let before = next(
        &s,
        Triggers::default(),
        &d0.ledger,
        None,
        2,
        due - TimeDelta::seconds(1),
    );
    assert_eq!(before.rotation, None);
    let at = next(&s, Triggers::default(), &d0.ledger, None, 2, due);
    assert_eq!(at.rotation, Some(RotationReason::Interval));
    assert_eq!(at.next_rotation, Some(due + TimeDelta::hours(24)));
}

#[test]
fn expiry_retires_the_key_once_and_stops_scheduling() {
    let s = spec("expiresAt: \"2026-11-27T12:00:00Z\"");
    let d0 = initial(&s, Triggers::default());
    assert_eq!(
        d0.wake_at,
        Some(t("2026-11-27T12:00:00Z")),
        "expiry comes before the rotation"
    );
    let d1 = next(
        &s,
        Triggers::default(),
        &d0.ledger,
        None,
        2,
        t("2026-11-27T12:00:00Z"),
    );
    assert_eq!(d1.rotation, Some(RotationReason::Expired));
    assert_eq!(hashes(&d1), vec![(key(2).fingerprint, None)]);
    assert!(d1.expired);
    assert_eq!(d1.next_rotation, None);
    assert_eq!(d1.wake_at, None);
    let d2 = next(
        &s,
        Triggers::default(),
        &d1.ledger,
        None,
        3,
        t("2026-12-30T00:00:00Z"),
    );
    assert_eq!(d2.rotation, None, "no interval rotations after expiry");
}

#[test]
fn new_upstream_version_rolls_with_overlap() {
    let s = spec("");
    let d0 = initial(&s, Triggers::default());
    let now = t(T0) + TimeDelta::hours(1);
    let d1 = next(
        &s,
        Triggers::default(),
        &d0.ledger,
        Some(&up(2, "v2")),
        2,
        now,
    );
    assert!(d1.upstream_rolled);
    assert_eq!(
        d1.rotation, None,
        "an upstream roll leaves the workload key alone"
    );
    let fps: Vec<_> = d1
        .ledger
        .upstream_keys
        .iter()
        .map(|k| (k.sha256.clone(), k.valid_until))
        .collect();
    let until = now + TimeDelta::minutes(15);
    assert_eq!(
        fps,
        vec![(key(102).sha256, None), (key(101).sha256, Some(until))]
    );
    assert_eq!(d1.ledger.upstream_version, "v2");
    assert_eq!(d1.wake_at, Some(until));
    // A new version with the same value only updates the recorded version.
    let d2 = next(
        &s,
        Triggers::default(),
        &d1.ledger,
        Some(&up(2, "v3")),
        3,
        now,
    );
    assert!(!d2.upstream_rolled);
    assert_eq!(d2.ledger.upstream_version, "v3");
}

#[test]
fn lost_client_secret_issues_a_new_key_with_grace() {
    let s = spec("");
    let d0 = initial(&s, Triggers::default());
    let now = t(T0) + TimeDelta::hours(1);
    let observed = Observed {
        ledger: Some(&d0.ledger),
        client_key_present: false,
        federated: false,
    };
    let d1 = decide(&s, Triggers::default(), observed, None, &key(2), now).unwrap();
    assert_eq!(d1.rotation, Some(RotationReason::ClientLost));
    assert_eq!(
        d1.ledger.workload_keys[1].valid_until,
        Some(now + TimeDelta::minutes(15))
    );
}

#[test]
fn grace_ends_of_upstream_and_workload_keys_both_wake_the_controller() {
    let s = spec("");
    let d0 = initial(&s, Triggers::default());
    let now = t(T0) + TimeDelta::hours(1);
    let d1 = next(
        &s,
        Triggers {
            rotate: Some("r"),
            revoke: None,
        },
        &d0.ledger,
        None,
        2,
        now,
    );
    let d2 = next(
        &s,
        Triggers {
            rotate: Some("r"),
            revoke: None,
        },
        &d1.ledger,
        Some(&up(2, "v2")),
        3,
        now + TimeDelta::minutes(5),
    );
    assert_eq!(d2.wake_at, Some(now + TimeDelta::minutes(15)));
}

#[test]
fn spec_errors_the_schema_cannot_catch() {
    assert_eq!(validate(&spec("")), Ok(()));
    let bad = spec("dataProtection: { customPatterns: [{ name: broken, regex: \"EMP-[0-9\" }] }");
    let err = validate(&bad).unwrap_err();
    assert!(
        err.contains("broken") && err.contains("failed to compile"),
        "{err}"
    );
    // Each small enough alone, too large together: refused before a proxy compiles them.
    let many = (0..12)
        .map(|i| format!("{{ name: p{i}, regex: '\\w{{10}}-{i}' }}"))
        .collect::<Vec<_>>()
        .join(", ");
    let large = spec(&format!("dataProtection: {{ customPatterns: [{many}] }}"));
    let err = validate(&large).unwrap_err();
    assert!(err.contains("together compile to more than 1 MiB"), "{err}");
    let one = spec("dataProtection: { customPatterns: [{ name: p, regex: '\\w{10}' }] }");
    assert_eq!(validate(&one), Ok(()));
    let hot = spec("").rotation.interval.as_str().to_string();
    assert_eq!(hot, "24h");
    let mut s = spec("");
    s.rotation.interval = "500ms".parse().unwrap();
    assert!(validate(&s).unwrap_err().contains("rotation.interval"));
}

fn with_patterns(regexes: &[&str]) -> ClaudeKeySpec {
    let list = regexes
        .iter()
        .enumerate()
        .map(|(i, r)| format!("{{ name: p{i}, regex: '{r}' }}"))
        .collect::<Vec<_>>()
        .join(", ");
    spec(&format!("dataProtection: {{ customPatterns: [{list}] }}"))
}

fn user<'a>(created: i64, name: &'a str, spec: &'a ClaudeKeySpec) -> PatternUser<'a> {
    PatternUser {
        created: Some(created),
        name,
        protection: &spec.data_protection,
    }
}

#[test]
fn only_custom_patterns_make_a_pattern_list_and_equal_detectors_share_one() {
    assert_eq!(pattern_list(&spec("")), None);
    assert_eq!(
        pattern_list(&spec("dataProtection: { redact: [email, ssn] }")),
        None
    );
    let a = pattern_list(&with_patterns(&["EMP-[0-9]{6}"]));
    assert!(a.is_some());
    assert_eq!(a, pattern_list(&with_patterns(&["EMP-[0-9]{6}"])));
    assert_ne!(a, pattern_list(&with_patterns(&["EMP-[0-9]{7}"])));
    // The built-in detectors are part of what the proxy compiles with them.
    let mut with_email = with_patterns(&["EMP-[0-9]{6}"]);
    with_email.data_protection.redact = vec![crate::crd::Detector::Email];
    assert_ne!(a, pattern_list(&with_email));
}

/// The places go by creation time, then name, whatever order the reconciles run in: only older
/// ClaudeKeys count, a list shared by several takes one place, and only the first `max` matter.
#[test]
fn earlier_lists_are_the_older_claudekeys_distinct_lists_in_order() {
    let [a, b, c, d, a_again] = ["A", "B", "C", "D", "A"].map(|r| with_patterns(&[r]));
    let others = || {
        vec![
            user(30, "late", &c),
            user(10, "b", &b),
            user(10, "a", &a),
            user(20, "again", &a_again),
            user(25, "d", &d),
        ]
    };
    let list = |r: &str| pattern_list(&with_patterns(&[r])).unwrap();
    assert_eq!(
        earlier_pattern_lists(others(), (Some(26), "me"), 8),
        [list("A"), list("B"), list("D")]
    );
    // Same second: the name decides.
    assert_eq!(
        earlier_pattern_lists(others(), (Some(10), "ab"), 8),
        [list("A")]
    );
    assert_eq!(
        earlier_pattern_lists(others(), (Some(99), "me"), 2),
        [list("A"), list("B")]
    );
    assert!(earlier_pattern_lists(others(), (Some(1), "first"), 8).is_empty());
    // The same patterns with other built-in detectors are another list.
    let a_and_email =
        spec("dataProtection: { redact: [email], customPatterns: [{ name: p0, regex: 'A' }] }");
    let mut more = others();
    more.push(user(12, "e", &a_and_email));
    let lists = earlier_pattern_lists(more, (Some(26), "me"), 8);
    assert_eq!(lists.len(), 4, "{lists:?}");
    assert_eq!(lists[2], pattern_list(&a_and_email).unwrap());
}

#[test]
fn a_new_pattern_list_past_the_namespaces_places_is_refused() {
    let list = |r: &str| pattern_list(&with_patterns(&[r])).unwrap();
    let full = [list("A"), list("B")];
    // No custom patterns: never counted.
    assert_eq!(pattern_budget(&spec(""), &full, 2, "team-a"), Ok(()));
    // The list of an older ClaudeKey: it shares its place.
    assert_eq!(
        pattern_budget(&with_patterns(&["B"]), &full, 2, "team-a"),
        Ok(())
    );
    // A place is free.
    assert_eq!(
        pattern_budget(&with_patterns(&["C"]), &full[..1], 2, "team-a"),
        Ok(())
    );
    let err = pattern_budget(&with_patterns(&["C"]), &full, 2, "team-a").unwrap_err();
    assert!(
        err.contains("team-a")
            && err.contains("2 distinct")
            && err.contains("--max-pattern-lists-per-namespace"),
        "{err}"
    );
    // The message names no pattern (they are the team's own, but an Event is widely read).
    assert!(!err.contains("EMP") && !err.contains("\"C\""), "{err}");
}

/// The patterns' verdict is remembered by their key (a reconcile does not compile them again),
/// bad ones included, and no more than the bound is kept.
#[test]
fn pattern_verdicts_are_remembered_within_a_bound() {
    let verdicts = || PATTERN_VERDICTS.lock().unwrap().clone();
    let good = with_patterns(&["REMEMBERED-[0-9]{6}"]);
    let bad = with_patterns(&["REMEMBERED-[0-9"]);
    assert_eq!(validate(&good), Ok(()));
    let err = validate(&bad).unwrap_err();
    let kept = verdicts();
    assert_eq!(kept.get(&pattern_list(&good).unwrap()), Some(&Ok(())));
    assert_eq!(
        kept.get(&pattern_list(&bad).unwrap()),
        Some(&Err(err.clone()))
    );
    assert_eq!(validate(&bad), Err(err));
    for i in 0..PATTERN_VERDICTS_KEPT + 10 {
        assert_eq!(validate(&with_patterns(&[&format!("BOUND-{i}")])), Ok(()));
        assert!(PATTERN_VERDICTS.lock().unwrap().len() <= PATTERN_VERDICTS_KEPT);
    }
}
