//! What the proxies and the controller agree on about the counters they share in Redis
//! (DESIGN.md §12): the key names, the two scripts, and the Redis user of a namespace's
//! sidecars.
//!
//! Gateway replicas reach Redis as its admin (their config lives in the operator namespace).
//! A sidecar of namespace placement runs in a namespace a team controls, so its Redis password
//! is readable there: it gets a user of its own namespace, which may run only the product's
//! scripts (by SHA, never arbitrary Lua) and the commands they call, and only on keys under
//! `claudekey:{<namespace>/`. Such a team already holds its upstream key (that is what
//! namespace placement means), so the user gives it nothing over its own limits it did not
//! have, and nothing at all over another namespace's counters or the server.

use ring::hmac;

mod connect;

pub use connect::{RedisSettings, RedisUrl, SharedError, connect};

use crate::keys::sha256_hex;

const COMMON: &str = include_str!("../proxy/limits/lua/common.lua");
const ADMIT: &str = include_str!("../proxy/limits/lua/admit.lua");
const SETTLE: &str = include_str!("../proxy/limits/lua/settle.lua");

/// The admission script: one call decides a request against every limit of a ClaudeKey.
pub fn admit_script() -> String {
    format!("{COMMON}\n{ADMIT}")
}

/// The settlement script: returns unused reserved tokens and adds the real cost to the spend.
pub fn settle_script() -> String {
    format!("{COMMON}\n{SETTLE}")
}

/// Every command the scripts call. A namespace user may run exactly these (and EVALSHA), so a
/// script that starts calling another command must be listed here (a test reads the scripts).
pub const SCRIPT_COMMANDS: &[&str] = &[
    "time",
    "hget",
    "hmget",
    "hgetall",
    "hset",
    "hdel",
    "hincrby",
    "expire",
    "expireat",
    "zscore",
    "zcard",
    "zadd",
    "zremrangebyscore",
];

/// What a client may send besides the scripts: liveness and the database of its URL. (The
/// client's `CLIENT SETINFO` on connect may fail: it ignores the answer, and Redis 7.0 knows no
/// such command to grant.)
const CONNECTION_COMMANDS: &[&str] = &["ping", "select"];

/// The prefix of every key of one ClaudeKey. The hash tag `{namespace/name}` keeps them in one
/// Redis Cluster slot (a script may touch only one), and the identity, not a key fingerprint,
/// names them: a rotation never resets a window.
pub fn key_prefix(namespace: &str, name: &str) -> String {
    format!("claudekey:{{{namespace}/{name}}}")
}

/// The key pattern of every ClaudeKey of a namespace. Namespace names are DNS labels, so they
/// hold no glob character, and the `/` after the name keeps `team-a` from matching `team-ab`.
pub fn namespace_key_pattern(namespace: &str) -> String {
    format!("claudekey:{{{namespace}/*")
}

/// The entry of a `-proxy` Secret that holds its namespace's Redis password: the webhook points
/// the sidecar's `--redis-password-file` at it.
pub const SIDECAR_PASSWORD_ENTRY: &str = "redis-password";

/// The Redis user of the sidecars of one namespace.
pub fn namespace_user(namespace: &str) -> String {
    format!("claudekey-ns-{namespace}")
}

/// The password of a namespace's user: an HMAC of the namespace under a key that never leaves
/// the operator namespace, so the controller derives the same password after every restart and
/// needs no state for it, and one namespace's password says nothing about another's.
pub fn namespace_password(key: &hmac::Key, namespace: &str) -> String {
    let tag = hmac::sign(
        key,
        format!("claudekey redis user v1\0{namespace}").as_bytes(),
    );
    hex::encode(tag.as_ref())
}

/// The `ACL SETUSER` arguments that (re)define a namespace's user from scratch: `reset` first,
/// so re-applying it also takes back anything granted by hand. The password goes as its
/// SHA-256 (`#…`), so the command never carries it.
pub fn namespace_acl(namespace: &str, password: &str) -> Vec<String> {
    let mut rules = vec![
        namespace_user(namespace),
        "reset".to_string(),
        "on".to_string(),
        format!("#{}", sha256_hex(password)),
        format!("~{}", namespace_key_pattern(namespace)),
        "resetchannels".to_string(),
        "-@all".to_string(),
        "+evalsha".to_string(),
    ];
    rules.extend(
        SCRIPT_COMMANDS
            .iter()
            .chain(CONNECTION_COMMANDS)
            .map(|c| format!("+{c}")),
    );
    rules
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_namespace_pattern_covers_its_keys_and_no_other_namespace() {
        let pattern = namespace_key_pattern("team-a");
        let prefix = pattern.trim_end_matches('*');
        assert!(key_prefix("team-a", "bot").starts_with(prefix));
        assert!(!key_prefix("team-ab", "bot").starts_with(prefix));
        assert!(!key_prefix("team", "a/bot").starts_with(&namespace_key_pattern("team-a")));
    }

    #[test]
    fn passwords_differ_per_namespace_and_key_and_stay_put() {
        let key = hmac::Key::new(hmac::HMAC_SHA256, &[7; 32]);
        let other = hmac::Key::new(hmac::HMAC_SHA256, &[8; 32]);
        let a = namespace_password(&key, "team-a");
        assert_eq!(a, namespace_password(&key, "team-a"));
        assert_eq!(a.len(), 64);
        assert_ne!(a, namespace_password(&key, "team-b"));
        assert_ne!(a, namespace_password(&other, "team-a"));
    }

    #[test]
    fn the_acl_never_carries_the_password_and_grants_no_eval() {
        let rules = namespace_acl("team-a", "pw-plain-text");
        assert!(!rules.iter().any(|r| r.contains("pw-plain-text")));
        assert_eq!(rules[..3], ["claudekey-ns-team-a", "reset", "on"]);
        assert!(rules.contains(&"~claudekey:{team-a/*".to_string()));
        for refused in ["+eval", "+script", "+@all", "+keys", "+flushall", "+acl"] {
            assert!(!rules.iter().any(|r| r == refused), "{refused}");
        }
    }

    /// Every `redis.call('CMD'` in the scripts is granted: a script change that calls a new
    /// command fails here, not in a namespace's sidecar at run time.
    #[test]
    fn every_command_the_scripts_call_is_granted() {
        for script in [admit_script(), settle_script()] {
            for call in script.split("redis.call(").skip(1) {
                let command = call
                    .trim_start_matches(['\'', '"'])
                    .split(['\'', '"'])
                    .next()
                    .unwrap()
                    .to_ascii_lowercase();
                assert!(
                    SCRIPT_COMMANDS.contains(&command.as_str()),
                    "the scripts call {command}, which a namespace user may not run"
                );
            }
        }
    }
}
