//! Tests of the redactor: each detector, the streaming carry-over, the compile limits.

use super::*;
use crate::crd::CustomPattern;

fn all() -> Redactor {
    Redactor::new(&DataProtectionSpec {
        redact: vec![
            Detector::Email,
            Detector::Ssn,
            Detector::Phone,
            Detector::CreditCard,
        ],
        custom_patterns: vec![CustomPattern {
            name: "employee-id".into(),
            regex: "EMP-[0-9]{6}".into(),
        }],
        ..Default::default()
    })
    .unwrap()
}

fn redact(r: &Redactor, text: &str) -> String {
    r.redact(text, &mut Counts::default())
        .unwrap_or_else(|| text.to_string())
}

/// Text of many scripts makes a Unicode pattern's lazy DFA build many states: with its cache
/// bounded ([`DFA_CACHE_LIMIT`]) it is cleared or set aside, and every match is still found.
#[test]
fn a_bounded_dfa_cache_finds_every_match_in_text_of_many_scripts() {
    let r = Redactor::new(&DataProtectionSpec {
        custom_patterns: vec![CustomPattern {
            name: "tag".into(),
            regex: r"\w{10}Q".into(),
        }],
        ..Default::default()
    })
    .unwrap();
    let scripts = [
        0x41u32, 0xc0, 0x391, 0x410, 0x4e00, 0x3041, 0xac00, 0x627, 0x905,
    ];
    let mut text = String::new();
    let mut expected = 0;
    for i in 0..40_000u32 {
        let base = scripts[(i as usize * 7) % scripts.len()];
        let word: String = (0..3 + i % 9)
            .filter_map(|k| char::from_u32(base + (i * 31 + k * 17) % 24))
            .collect();
        text.push_str(&word);
        if i % 997 == 0 {
            text.push_str("ЖЖЖЖЖЖЖЖЖЖQ");
            expected += 1;
        }
        text.push(' ');
    }
    let plain = regex::Regex::new(r"\w{10}Q").unwrap();
    assert_eq!(
        plain.find_iter(&text).count(),
        expected,
        "the fixture's matches"
    );
    let mut counts = Counts::default();
    let out = r.redact(&text, &mut counts).expect("redacted");
    assert_eq!(counts.total() as usize, expected);
    assert_eq!(out.matches("[REDACTED:tag]").count(), expected);
}

#[test]
fn patterns_too_large_together_are_refused_and_a_bad_one_is_named() {
    let spec = |patterns: Vec<(String, String)>| DataProtectionSpec {
        redact: vec![Detector::Email],
        custom_patterns: patterns
            .into_iter()
            .map(|(name, regex)| CustomPattern { name, regex })
            .collect(),
        ..Default::default()
    };
    // ~550 KiB each: one fits, twelve together (or three) do not.
    let large = |n: usize| {
        (0..n)
            .map(|i| (format!("p{i}"), format!(r"\w{{10}}-{i}")))
            .collect::<Vec<_>>()
    };
    assert!(Redactor::new(&spec(large(1))).is_ok());
    for many in [spec(large(3)), spec(large(12)), spec(large(1_000))] {
        assert!(matches!(Redactor::new(&many), Err(RedactError::TooLarge)));
        assert!(matches!(Redactor::check(&many), Err(RedactError::TooLarge)));
    }
    // A pattern that does not compile is named, even when the set fails for it.
    let mut broken = large(1);
    broken.push(("broken".into(), "EMP-[0-9".into()));
    for result in [
        Redactor::new(&spec(broken.clone())).map(drop),
        Redactor::check(&spec(broken)),
    ] {
        let error = result.unwrap_err().to_string();
        assert!(error.contains("custom pattern broken"), "{error}");
    }
    // One pattern too large alone is too large together too: the set says so first.
    let alone = vec![("huge".to_string(), r"\w{40}".to_string())];
    assert!(matches!(
        Redactor::check(&spec(alone)),
        Err(RedactError::TooLarge)
    ));
}

#[test]
fn tenants_with_the_same_detectors_share_one_redactor() {
    let spec = |custom: &str, redact_responses: bool| DataProtectionSpec {
        redact: vec![Detector::Email, Detector::Ssn],
        custom_patterns: vec![CustomPattern {
            name: "ticket".into(),
            regex: custom.into(),
        }],
        // Not part of the compiled detectors: may differ between sharing tenants.
        redact_responses,
        ..Default::default()
    };
    let a = Redactor::shared(&spec("T-[0-9]{4}", true)).unwrap();
    let b = Redactor::shared(&spec("T-[0-9]{4}", false)).unwrap();
    let other = Redactor::shared(&spec("T-[0-9]{5}", true)).unwrap();
    assert!(Arc::ptr_eq(&a, &b));
    assert!(!Arc::ptr_eq(&a, &other));
    assert_eq!(redact(&a, "see T-1234"), "see [REDACTED:ticket]");
    assert_eq!(redact(&other, "see T-1234"), "see T-1234");
}

/// The built-in detectors are ASCII (a Unicode `\b` or `\d` made each tenant's redactor
/// over 1 MiB): a number glued to a non-ASCII letter is still redacted, and digits of other
/// scripts are not a US SSN or a card number.
#[test]
fn builtin_detectors_read_ascii() {
    let r = all();
    assert_eq!(redact(&r, "né123-45-6789"), "né[REDACTED:ssn]");
    assert_eq!(redact(&r, "Ünïa.b@example.com"), "Ünï[REDACTED:email]");
    let arabic = "١٢٣-٤٥-٦٧٨٩";
    assert_eq!(redact(&r, arabic), arabic);
}

#[test]
fn redacts_each_detector() {
    let r = all();
    assert_eq!(
        redact(&r, "mail jane.doe@example.com now"),
        "mail [REDACTED:email] now"
    );
    assert_eq!(redact(&r, "ssn 123-45-6789."), "ssn [REDACTED:ssn].");
    assert_eq!(redact(&r, "call (555) 123-4567"), "call [REDACTED:phone]");
    assert_eq!(redact(&r, "call +1 555-123-4567"), "call [REDACTED:phone]");
    assert_eq!(
        redact(&r, "card 4111 1111 1111 1111 ok"),
        "card [REDACTED:creditCard] ok"
    );
    assert_eq!(
        redact(&r, "card 4111-1111-1111-1111"),
        "card [REDACTED:creditCard]"
    );
    assert_eq!(redact(&r, "id EMP-123456"), "id [REDACTED:employee-id]");
}

#[test]
fn leaves_look_alikes_alone() {
    let r = all();
    // Fails Luhn.
    assert_eq!(
        redact(&r, "order 4111 1111 1111 1112"),
        "order 4111 1111 1111 1112"
    );
    // Reserved SSN areas.
    assert_eq!(
        redact(&r, "ref 000-12-3456 and 666-12-3456"),
        "ref 000-12-3456 and 666-12-3456"
    );
    assert!(
        r.redact("nothing to see here", &mut Counts::default())
            .is_none()
    );
}

#[test]
fn counts_per_detector() {
    let r = all();
    let mut counts = Counts::default();
    r.redact("a@b.io c@d.io 123-45-6789", &mut counts).unwrap();
    let named: Vec<_> = counts.named(&r).collect();
    assert_eq!(named, vec![("ssn", 1), ("email", 2)]);
    assert_eq!(counts.total(), 3);
}

#[test]
fn only_configured_detectors_run() {
    let r = Redactor::new(&DataProtectionSpec {
        redact: vec![Detector::Email],
        ..Default::default()
    })
    .unwrap();
    assert_eq!(
        redact(&r, "x@y.com 123-45-6789"),
        "[REDACTED:email] 123-45-6789"
    );
    assert!(
        Redactor::new(&DataProtectionSpec::default())
            .unwrap()
            .is_empty()
    );
}

#[test]
fn bad_custom_pattern_is_named() {
    let err = Redactor::new(&DataProtectionSpec {
        custom_patterns: vec![CustomPattern {
            name: "broken".into(),
            regex: "(".into(),
        }],
        ..Default::default()
    })
    .err()
    .unwrap();
    assert!(
        err.to_string()
            .starts_with("failed to compile custom pattern broken")
    );
}

#[test]
fn luhn() {
    assert!(luhn_valid("4111111111111111"));
    assert!(luhn_valid("5500 0000 0000 0004"));
    assert!(!luhn_valid("4111111111111112"));
    assert!(!luhn_valid("41111"));
}

fn stream(r: &Redactor, pieces: &[&str]) -> (String, u32) {
    let mut s = StreamRedactor::default();
    let mut counts = Counts::default();
    let mut out = String::new();
    for p in pieces {
        out.push_str(&s.push(r, p, &mut counts));
    }
    out.push_str(&s.finish(r, &mut counts));
    (out, counts.total())
}

#[test]
fn stream_catches_matches_split_across_pieces() {
    let r = all();
    let (out, n) = stream(
        &r,
        &[
            "write to jane.d",
            "oe@exam",
            "ple.com or call 555-",
            "123-4567 today",
        ],
    );
    assert_eq!(
        out,
        "write to [REDACTED:email] or call [REDACTED:phone] today"
    );
    assert_eq!(n, 2);
}

#[test]
fn stream_emits_early_text_before_the_end() {
    let r = all();
    let mut s = StreamRedactor::default();
    let mut counts = Counts::default();
    let long = "word ".repeat(60);
    let first = s.push(&r, &long, &mut counts);
    assert!(!first.is_empty() && first.len() <= long.len() - STREAM_HOLD_BYTES + 4);
    let rest = s.finish(&r, &mut counts);
    assert_eq!(format!("{first}{rest}"), long);
}

#[test]
fn stream_handles_multibyte_text() {
    let r = all();
    let text = "é".repeat(200) + " a@b.io";
    let pieces: Vec<String> = text
        .chars()
        .collect::<Vec<_>>()
        .chunks(7)
        .map(|c| c.iter().collect())
        .collect();
    let refs: Vec<&str> = pieces.iter().map(String::as_str).collect();
    let (out, n) = stream(&r, &refs);
    assert_eq!(out, "é".repeat(200) + " [REDACTED:email]");
    assert_eq!(n, 1);
}

proptest::proptest! {
    /// However the text is split into deltas, the stream gives the same result as redacting
    /// the whole text at once.
    #[test]
    fn stream_equals_whole(cuts in proptest::collection::vec(0usize..340, 0..12)) {
        let r = all();
        let text = "Hi, I'm at jane@example.com, card 4111 1111 1111 1111, ssn 123-45-6789, phone (555) 123-4567, EMP-004211. ".repeat(3);
        let text = text.as_str();
        let mut points: Vec<usize> = cuts.into_iter().map(|c| c.min(text.len())).collect();
        points.sort();
        points.dedup();
        let mut pieces = Vec::new();
        let mut at = 0;
        for p in points { pieces.push(&text[at..p]); at = p; }
        pieces.push(&text[at..]);
        let (out, n) = stream(&r, &pieces);
        proptest::prop_assert_eq!(out, redact(&r, text));
        proptest::prop_assert_eq!(n, 15);
    }
}
