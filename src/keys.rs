//! Key material rules shared by every role: issuing workload keys, hashing, fingerprints and the
//! masked hints that are the most of a key we ever print.

use rand::{Rng, TryRngCore, distr::Alphanumeric, rngs::OsRng};
use secrecy::SecretString;
use sha2::{Digest, Sha256};

/// Prefix of every workload key claudekey issues.
pub const WORKLOAD_KEY_PREFIX: &str = "ck_live_";

/// 43 base62 characters carry 256.04 bits, the entropy DESIGN.md §1 asks for.
const WORKLOAD_KEY_CHARS: usize = 43;

/// Which kind of key a fingerprint names; the prefix keeps `ck:` and `up:` apart in status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    /// A workload key issued by claudekey.
    Workload,
    /// An upstream Anthropic key.
    Upstream,
}

/// A new workload key: `ck_live_` and 256 random bits in base62, from the OS CSPRNG.
pub fn generate_workload_key() -> SecretString {
    let key: String = OsRng
        .unwrap_err()
        .sample_iter(Alphanumeric)
        .take(WORKLOAD_KEY_CHARS)
        .map(char::from)
        .collect();
    format!("{WORKLOAD_KEY_PREFIX}{key}").into()
}

/// Lower-case hex SHA-256, the form in which the proxy stores workload keys.
pub fn sha256_hex(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// `ck:`/`up:` and the first 8 hex digits of SHA-256: safe to show, enough to tell keys apart.
pub fn fingerprint(kind: KeyKind, key: &str) -> String {
    let prefix = match kind {
        KeyKind::Workload => "ck",
        KeyKind::Upstream => "up",
    };
    format!("{prefix}:{}", &sha256_hex(key)[..8])
}

/// A hint such as `sk-ant-api03-…AA`: the non-secret prefix up to the kind segment and the last
/// two characters, so a user can find the key without the message revealing it.
pub fn masked_hint(key: &str) -> String {
    let chars: Vec<char> = key.chars().collect();
    if chars.len() < 12 {
        return "…".to_string();
    }
    let prefix_len = if key.starts_with("sk-ant-") {
        // sk-ant-<kind><digits>- : keep through the third dash, at most 16 chars.
        key.match_indices('-').nth(2).map_or(7, |(i, _)| i + 1).min(16)
    } else if key.starts_with(WORKLOAD_KEY_PREFIX) {
        WORKLOAD_KEY_PREFIX.len()
    } else {
        0
    };
    let tail: String = chars[chars.len() - 2..].iter().collect();
    format!("{}…{tail}", &key[..prefix_len])
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    #[test]
    fn workload_keys_are_prefixed_base62_and_distinct() {
        let a = generate_workload_key();
        let b = generate_workload_key();
        let a = a.expose_secret();
        assert!(a.starts_with(WORKLOAD_KEY_PREFIX));
        let body = &a[WORKLOAD_KEY_PREFIX.len()..];
        assert_eq!(body.len(), WORKLOAD_KEY_CHARS);
        assert!(body.chars().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(a, b.expose_secret());
    }

    #[test]
    fn fingerprints_are_short_and_kind_prefixed() {
        assert_eq!(sha256_hex("abc").len(), 64);
        assert_eq!(fingerprint(KeyKind::Workload, "abc"), "ck:ba7816bf");
        assert_eq!(fingerprint(KeyKind::Upstream, "abc"), "up:ba7816bf");
    }

    #[test]
    fn hints_never_show_the_secret_part() {
        let key = format!("sk-ant-api03-{}AA", "x".repeat(93));
        assert_eq!(masked_hint(&key), "sk-ant-api03-…AA");
        assert_eq!(masked_hint("ck_live_abcdefghijklmnop"), "ck_live_…op");
        assert_eq!(masked_hint("supersecretvalue"), "…ue");
        assert_eq!(masked_hint("short"), "…");
    }
}
