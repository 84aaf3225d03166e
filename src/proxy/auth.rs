//! Gateway-mode authentication: the workload key arrives as `x-api-key` (older SDKs) or
//! `Authorization: Bearer` (current ones); its SHA-256 is looked up among the accepted hashes,
//! and the match names the ClaudeKey the request belongs to. The lookup is by the digest of what
//! the client sent, never by the secret itself, so its timing tells a client nothing about any
//! accepted key (finding a stored hash would need a SHA-256 preimage).

use std::sync::Arc;

use chrono::{DateTime, Utc};
use http::HeaderMap;
use sha2::{Digest, Sha256};

use super::{config::ConfigSet, error::ApiError, tenant::Tenant};
use crate::proxyconf::still_valid;

/// The credential the client presented, from either header.
pub fn presented_key(headers: &HeaderMap) -> Option<&str> {
    if let Some(key) = headers.get("x-api-key").and_then(|v| v.to_str().ok()) {
        return Some(key.trim());
    }
    let auth = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = auth.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// The ClaudeKey whose current or in-grace workload key this is.
pub fn authenticate<'a>(
    set: &'a ConfigSet,
    headers: &HeaderMap,
    now: DateTime<Utc>,
) -> Result<&'a Arc<Tenant>, ApiError> {
    let key = presented_key(headers).ok_or_else(|| {
        ApiError::Authentication("x-api-key header or Authorization: Bearer is required".into())
    })?;
    let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
    match set.by_key.get(&digest) {
        Some((index, until)) if still_valid(*until, now) => {
            let tenant = &set.tenants[*index];
            if tenant.expired(now) {
                Err(ApiError::Authentication(
                    "this ClaudeKey has expired".into(),
                ))
            } else {
                Ok(tenant)
            }
        }
        Some(_) => Err(ApiError::Authentication(
            "this workload key was rotated and its grace period has ended; use the current key"
                .into(),
        )),
        None => Err(ApiError::Authentication("invalid x-api-key".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{keys::sha256_hex, proxy::limits::Limiters, proxyconf::ProxyConfig};
    use http::HeaderValue;

    fn tenant(name: &str, keys: &[(&str, Option<&str>)], expires: Option<&str>) -> Arc<Tenant> {
        let workload: Vec<_> = keys
            .iter()
            .map(|(k, until)| serde_json::json!({ "sha256": sha256_hex(k), "fingerprint": "ck:x", "validUntil": until }))
            .collect();
        let config: ProxyConfig = serde_json::from_value(serde_json::json!({
            "claudeKey": { "namespace": "ns", "name": name },
            "upstream": [{ "key": "sk-ant-api03-u", "fingerprint": "up:x", "validUntil": null }],
            "workloadKeys": workload,
            "policy": { "expiresAt": expires }
        }))
        .unwrap();
        Arc::new(Tenant::compile(&config, &Limiters::default()).unwrap())
    }

    fn headers(name: &str, value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(value).unwrap(),
        );
        h
    }

    fn now() -> DateTime<Utc> {
        "2026-12-01T10:00:00Z".parse().unwrap()
    }

    #[test]
    fn both_header_styles_pick_the_right_claudekey() {
        let tenants = ConfigSet::new(vec![
            tenant("a", &[("ck_a", None)], None),
            tenant("b", &[("ck_b", None)], None),
        ]);
        let t = authenticate(&tenants, &headers("x-api-key", "ck_b"), now()).unwrap();
        assert_eq!(&*t.label, "ns/b");
        let t = authenticate(&tenants, &headers("authorization", "Bearer ck_a"), now()).unwrap();
        assert_eq!(&*t.label, "ns/a");
    }

    #[test]
    fn previous_key_until_valid_until() {
        let tenants = ConfigSet::new(vec![tenant(
            "a",
            &[("new", None), ("old", Some("2026-12-01T10:15:00Z"))],
            None,
        )]);
        assert!(authenticate(&tenants, &headers("x-api-key", "old"), now()).is_ok());
        let later: DateTime<Utc> = "2026-12-01T10:15:00Z".parse().unwrap();
        let err = authenticate(&tenants, &headers("x-api-key", "old"), later).unwrap_err();
        assert!(err.to_string().contains("grace period has ended"));
        assert!(authenticate(&tenants, &headers("x-api-key", "new"), later).is_ok());
    }

    #[test]
    fn refusals_are_401() {
        let tenants = ConfigSet::new(vec![tenant(
            "a",
            &[("k", None)],
            Some("2026-11-01T00:00:00Z"),
        )]);
        for h in [
            HeaderMap::new(),
            headers("x-api-key", "wrong"),
            headers("authorization", "Basic k"),
            headers("x-api-key", "k"),
        ] {
            assert_eq!(authenticate(&tenants, &h, now()).unwrap_err().status(), 401);
        }
    }
}
