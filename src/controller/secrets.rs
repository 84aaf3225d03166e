//! The two Secrets a ClaudeKey owns (DESIGN.md §3 step 3): building `<name>-client` and
//! `<name>-proxy` from the ledger, and reading the durable state back out of them.

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::{Resource, ResourceExt, api::ObjectMeta};
use secrecy::{ExposeSecret, SecretString};

use super::ledger::{LEDGER_ANNOTATION, Ledger};
use crate::crd::{
    ClaudeKey, Placement, annotations, client_secret_name, gateway_config_secret_name,
    proxy_secret_name,
};
use crate::keys::sha256_hex;
use crate::proxyconf::{self, ClaudeKeyRef, FederationConfig, Policy, ProxyConfig, UpstreamEntry};

/// Data key of the workload key in the `-client` Secret.
pub const API_KEY_ENTRY: &str = "ANTHROPIC_API_KEY";
/// Annotation with the digest of the data the controller wrote, to recognise hand edits.
pub const CONTENT_ANNOTATION: &str = "claudekey.io/content-sha256";
/// Data key of the gateway URL in the `-client` Secret.
pub const BASE_URL_ENTRY: &str = "ANTHROPIC_BASE_URL";
/// Data key of the gateway's CA bundle in the `-client` Secret (placement gateway).
pub const CA_ENTRY: &str = "ca.crt";

/// The durable state recovered from the owned Secrets.
#[derive(Clone, Debug, Default)]
pub struct Recovered {
    /// The committed ledger: the `-client` copy when it verifies and matches the key stored
    /// beside it, otherwise the copy beside `proxy.json` when that verifies.
    pub ledger: Option<Ledger>,
    /// The raw current workload key, present only when it matches the committed ledger.
    pub client_key: Option<SecretString>,
    /// Upstream key values found in existing `proxy.json` files, by SHA-256.
    pub upstream_values: HashMap<String, SecretString>,
    /// Names of Secrets whose bookkeeping failed verification: never acted on.
    pub tampered: Vec<String>,
}

/// Reads the state back from the Secrets as found (any may be missing or edited by hand).
/// `configs` are the Secrets holding `proxy.json` (the `-proxy` Secret, the gateway config
/// Secret); `verified` says whether a Secret's bookkeeping carries this controller's MAC. A
/// ledger that does not verify is never used: the reconcile then issues afresh, with zero grace
/// for whatever only that ledger claimed.
pub fn recover(
    client: Option<&Secret>,
    configs: &[&Secret],
    verified: impl Fn(&Secret) -> bool,
) -> Recovered {
    let mut tampered = Vec::new();
    let mut trusted_ledger = |secret: &Secret| {
        if verified(secret) {
            ledger_of(secret)
        } else {
            tampered.push(secret.name_any());
            None
        }
    };
    let client_ledger = client.and_then(&mut trusted_ledger);
    let config_ledger = configs.iter().filter_map(|s| trusted_ledger(s)).next();
    let client_key = client.and_then(|s| data_str(s, API_KEY_ENTRY));
    let upstream_values = configs
        .iter()
        .filter_map(|s| proxy_config_of(s))
        .flat_map(|config| config.upstream)
        .map(|u| (sha256_hex(u.key.expose_secret()), u.key))
        .collect();
    let consistent = match (&client_ledger, &client_key) {
        (Some(ledger), Some(key)) => ledger
            .current_workload()
            .is_some_and(|c| c.sha256 == sha256_hex(key.expose_secret())),
        _ => false,
    };
    if consistent {
        Recovered {
            ledger: client_ledger,
            client_key,
            upstream_values,
            tampered,
        }
    } else {
        Recovered {
            ledger: config_ledger.or(client_ledger),
            client_key: None,
            upstream_values,
            tampered,
        }
    }
}

/// Why `proxy.json` cannot be rendered.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("the value of the current upstream key {fingerprint} is no longer available")]
pub struct MissingUpstream {
    pub fingerprint: String,
}

/// Renders `proxy.json` from the ledger and the upstream values at hand. Previous upstream keys
/// whose values are gone (the `-proxy` Secret was deleted) are left out.
pub fn render_config(
    ck: &ClaudeKey,
    ledger: &Ledger,
    upstream_values: &HashMap<String, SecretString>,
    federation: Option<&FederationConfig>,
    audit_salt: String,
) -> Result<ProxyConfig, MissingUpstream> {
    let mut upstream = Vec::new();
    for entry in &ledger.upstream_keys {
        match upstream_values.get(&entry.sha256) {
            Some(key) => upstream.push(UpstreamEntry {
                key: key.clone(),
                fingerprint: entry.fingerprint.clone(),
                valid_until: entry.valid_until,
            }),
            None if entry.valid_until.is_none() => {
                return Err(MissingUpstream {
                    fingerprint: entry.fingerprint.clone(),
                });
            }
            None => {}
        }
    }
    Ok(ProxyConfig {
        claude_key: ClaudeKeyRef {
            namespace: ck.namespace().unwrap_or_default(),
            name: ck.name_any(),
        },
        upstream,
        workload_keys: ledger.workload_keys.clone(),
        audit_salt: Some(audit_salt),
        federation: federation.cloned(),
        policy: Policy {
            scope: ck.spec.scope.clone(),
            limits: ck.spec.limits.clone(),
            data_protection: ck.spec.data_protection.clone(),
            expires_at: ck.spec.expires_at,
        },
    })
}

/// Where gateway consumers send requests, and the CA bundle that verifies the gateway.
#[derive(Clone, Debug, Default)]
pub struct GatewayEndpoint {
    pub url: String,
    /// PEM; written as `ca.crt` for placement gateway.
    pub ca: Option<String>,
}

/// The `-client` Secret: the workload key and where the gateway is, for consumers' env (and,
/// placed at the gateway, for the injected forwarder, with the gateway's CA bundle).
pub fn build_client(
    ck: &ClaudeKey,
    key: &SecretString,
    gateway: &GatewayEndpoint,
    placement: Placement,
    ledger: &Ledger,
) -> Secret {
    let mut data = BTreeMap::new();
    data.insert(API_KEY_ENTRY.to_string(), bytes(key.expose_secret()));
    data.insert(BASE_URL_ENTRY.to_string(), bytes(&gateway.url));
    if let (Placement::Gateway, Some(ca)) = (placement, &gateway.ca) {
        data.insert(CA_ENTRY.to_string(), bytes(ca));
    }
    owned_secret(ck, client_secret_name(&ck.name_any()), data, ledger)
}

/// The `-proxy` Secret (placement namespace): `proxy.json`, one entry so the proxy reloads a
/// consistent whole, and with shared limits the namespace's Redis password, which the sidecar
/// reads once at start.
pub fn build_proxy(
    ck: &ClaudeKey,
    config: &ProxyConfig,
    redis_password: Option<&str>,
    ledger: &Ledger,
) -> Secret {
    let mut data = config_data(config);
    if let Some(password) = redis_password {
        data.insert(
            crate::shared_counters::SIDECAR_PASSWORD_ENTRY.to_string(),
            bytes(password),
        );
    }
    owned_secret(ck, proxy_secret_name(&ck.name_any()), data, ledger)
}

/// The gateway config Secret (placement gateway), in the operator namespace where no
/// namespace team can read it. It cannot carry an owner reference across namespaces: it
/// carries the ClaudeKey's uid instead, and `super::orphans` removes it once that is gone.
pub fn build_gateway_config(
    ck: &ClaudeKey,
    operator_namespace: &str,
    config: &ProxyConfig,
    ledger: &Ledger,
) -> Secret {
    let namespace = ck.namespace().unwrap_or_default();
    let name = ck.name_any();
    let data = config_data(config);
    Secret {
        metadata: ObjectMeta {
            name: Some(gateway_config_secret_name(&namespace, &name)),
            namespace: Some(operator_namespace.to_string()),
            labels: Some(BTreeMap::from([
                (
                    annotations::MANAGED_BY_LABEL.to_string(),
                    annotations::MANAGER.to_string(),
                ),
                (
                    annotations::CONFIG_LABEL.to_string(),
                    annotations::CONFIG_LABEL_VALUE.to_string(),
                ),
                (annotations::NAMESPACE_LABEL.to_string(), namespace.clone()),
            ])),
            annotations: Some(BTreeMap::from([
                (
                    annotations::CLAUDEKEY_ANNOTATION.to_string(),
                    format!("{namespace}/{name}"),
                ),
                (
                    annotations::CLAUDEKEY_UID_ANNOTATION.to_string(),
                    ck.uid().unwrap_or_default(),
                ),
                (LEDGER_ANNOTATION.to_string(), ledger.to_annotation()),
                (CONTENT_ANNOTATION.to_string(), content_digest(Some(&data))),
            ])),
            ..Default::default()
        },
        data: Some(data),
        type_: Some("Opaque".to_string()),
        ..Default::default()
    }
}

fn config_data(config: &ProxyConfig) -> BTreeMap<String, ByteString> {
    let json = serde_json::to_string_pretty(config).expect("the proxy config always serializes");
    BTreeMap::from([(proxyconf::FILE_NAME.to_string(), bytes(&json))])
}

fn owned_secret(
    ck: &ClaudeKey,
    name: String,
    data: BTreeMap<String, ByteString>,
    ledger: &Ledger,
) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: ck.namespace(),
            labels: Some(labels(&ck.name_any())),
            annotations: Some(BTreeMap::from([
                (LEDGER_ANNOTATION.to_string(), ledger.to_annotation()),
                (CONTENT_ANNOTATION.to_string(), content_digest(Some(&data))),
            ])),
            owner_references: ck.controller_owner_ref(&()).map(|r| vec![r]),
            ..Default::default()
        },
        data: Some(data),
        type_: Some("Opaque".to_string()),
        ..Default::default()
    }
}

/// Whether `secret` belongs to this very ClaudeKey: controlled by its uid, or carrying our
/// labels with its owner reference stripped by hand (repaired like any other edit). A Secret of
/// the same name that someone else created, or that an earlier ClaudeKey of the same name still
/// owns, is never taken over or read as state.
pub fn controlled_by(secret: &Secret, ck: &ClaudeKey) -> bool {
    let uid = ck.uid();
    let controller = secret
        .owner_references()
        .iter()
        .find(|r| r.controller == Some(true));
    match controller {
        Some(owner) => uid.as_deref() == Some(owner.uid.as_str()),
        None => labels(&ck.name_any())
            .iter()
            .all(|(k, v)| secret.labels().get(k) == Some(v)),
    }
}

/// Labels on both owned Secrets; the controller's Secret watch selects on the first.
pub fn labels(name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            annotations::MANAGED_BY_LABEL.to_string(),
            annotations::MANAGER.to_string(),
        ),
        (annotations::NAME_LABEL.to_string(), name.to_string()),
    ])
}

/// How an existing Secret differs from the one about to be written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Drift {
    /// Identical data and ledger.
    None,
    /// The Secret does not exist.
    Missing,
    /// The ledger moved on (a rotation, a grace period ending, an interrupted write finishing).
    Progress,
    /// Same ledger, different data: someone edited the Secret by hand.
    Edited,
}

/// Compares an existing Secret with the desired one. Each Secret carries a digest of the data
/// the controller wrote ([`CONTENT_ANNOTATION`]), so a hand edit (data no longer matching its own
/// stamp) is told apart from a change the controller makes itself (a new spec, a rotation, an
/// interrupted write being finished).
pub fn drift(existing: Option<&Secret>, desired: &Secret) -> Drift {
    let Some(existing) = existing else {
        return Drift::Missing;
    };
    let stamp = existing.annotations().get(CONTENT_ANNOTATION);
    let actual = content_digest(existing.data.as_ref());
    let labels_kept = desired
        .labels()
        .iter()
        .all(|(k, v)| existing.labels().get(k) == Some(v));
    let owner_kept = desired
        .owner_references()
        .iter()
        .all(|r| existing.owner_references().contains(r));
    if stamp != Some(&actual) || !labels_kept || !owner_kept {
        Drift::Edited
    } else if actual == content_digest(desired.data.as_ref())
        && ledger_of(existing) == ledger_of(desired)
    {
        Drift::None
    } else {
        Drift::Progress
    }
}

/// SHA-256 over the sorted data entries: the stamp the controller puts on what it writes.
pub fn content_digest(data: Option<&BTreeMap<String, ByteString>>) -> String {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    for (key, value) in data.into_iter().flatten() {
        hasher.update((key.len() as u64).to_be_bytes());
        hasher.update(key.as_bytes());
        hasher.update((value.0.len() as u64).to_be_bytes());
        hasher.update(&value.0);
    }
    hex::encode(hasher.finalize())
}

/// Data entries someone added by hand, which server-side apply would leave in place.
pub fn extra_entries(existing: Option<&Secret>, desired: &Secret) -> Vec<String> {
    let wanted = desired.data.as_ref();
    existing
        .and_then(|s| s.data.as_ref())
        .into_iter()
        .flatten()
        .map(|(k, _)| k)
        .filter(|k| !wanted.is_some_and(|w| w.contains_key(*k)))
        .cloned()
        .collect()
}

/// The ledger annotation of an owned Secret, if it parses.
pub fn ledger_of(secret: &Secret) -> Option<Ledger> {
    secret
        .annotations()
        .get(LEDGER_ANNOTATION)
        .and_then(|a| Ledger::from_annotation(a))
}

pub fn proxy_config_of(secret: &Secret) -> Option<ProxyConfig> {
    let raw = secret.data.as_ref()?.get(proxyconf::FILE_NAME)?;
    serde_json::from_slice(&raw.0).ok()
}

fn data_str(secret: &Secret, key: &str) -> Option<SecretString> {
    let raw = secret.data.as_ref()?.get(key)?;
    String::from_utf8(raw.0.clone())
        .ok()
        .map(SecretString::from)
}

fn bytes(s: &str) -> ByteString {
    ByteString(s.as_bytes().to_vec())
}

#[cfg(test)]
#[path = "secrets_tests.rs"]
mod tests;
