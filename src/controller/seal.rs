//! Authenticated bookkeeping (DESIGN.md §10): the ledger and content stamp on Secrets a namespace
//! team can edit carry an HMAC-SHA256 under a key that lives only in the operator namespace, so
//! an edited ledger (an extra workload-key hash, a forged retirement) is never acted on.

use std::collections::BTreeMap;

use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::{Api, Client, ResourceExt, api::ObjectMeta, api::PostParams};
use rand::RngCore;
use ring::hmac;

use super::apply::safe_reason;
use super::ledger::LEDGER_ANNOTATION;
use super::secrets::CONTENT_ANNOTATION;
use crate::crd::annotations;

/// Annotation with the HMAC of a Secret's bookkeeping.
pub const MAC_ANNOTATION: &str = "claudekey.io/mac";
/// The Secret in the operator namespace that holds the HMAC key.
pub const KEY_SECRET: &str = "claudekey-ledger-hmac";
/// Its data entry.
const KEY_ENTRY: &str = "key";

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("failed to read or create Secret {namespace}/{KEY_SECRET}: {reason}")]
    Api { namespace: String, reason: String },
    #[error(
        "Secret {namespace}/{KEY_SECRET} holds no 32-byte {KEY_ENTRY:?} entry; delete it to have a new one made"
    )]
    Malformed { namespace: String },
}

/// Signs and verifies bookkeeping. `Debug` never shows the key.
pub struct Sealer {
    key: hmac::Key,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer([REDACTED])")
    }
}

impl Sealer {
    pub fn from_bytes(bytes: &[u8]) -> Self {
        Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, bytes),
        }
    }

    /// Reads the key Secret, creating it with 32 random bytes on first start. Two replicas
    /// racing to create it both end up with the one that won.
    pub async fn load_or_create(client: &Client, namespace: &str) -> Result<Self, SealError> {
        let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
        let fail = |e: kube::Error| SealError::Api {
            namespace: namespace.to_string(),
            reason: safe_reason(&e),
        };
        let existing = match api.get_opt(KEY_SECRET).await.map_err(fail)? {
            Some(secret) => secret,
            None => {
                let mut key = [0u8; 32];
                rand::rng().fill_bytes(&mut key);
                match api.create(&PostParams::default(), &key_secret(&key)).await {
                    Ok(created) => created,
                    Err(kube::Error::Api(s)) if s.code == 409 => {
                        api.get(KEY_SECRET).await.map_err(fail)?
                    }
                    Err(e) => return Err(fail(e)),
                }
            }
        };
        let bytes = existing
            .data
            .as_ref()
            .and_then(|d| d.get(KEY_ENTRY))
            .filter(|b| b.0.len() == 32)
            .ok_or_else(|| SealError::Malformed {
                namespace: namespace.to_string(),
            })?;
        Ok(Self::from_bytes(&bytes.0))
    }

    /// The MAC of a Secret's bookkeeping, bound to the ClaudeKey (by uid) and the Secret's own
    /// namespace and name, so a ledger copied from another Secret or ClaudeKey never verifies.
    pub fn mac(&self, owner_uid: &str, secret: &Secret) -> String {
        let tag = hmac::sign(&self.key, &message(owner_uid, secret));
        hex::encode(tag.as_ref())
    }

    /// Whether the Secret's bookkeeping is what this controller wrote for that ClaudeKey.
    pub fn verify(&self, owner_uid: &str, secret: &Secret) -> bool {
        let Some(tag) = secret
            .annotations()
            .get(MAC_ANNOTATION)
            .and_then(|t| hex::decode(t).ok())
        else {
            return false;
        };
        hmac::verify(&self.key, &message(owner_uid, secret), &tag).is_ok()
    }

    /// Stamps the MAC onto a Secret about to be written (after its ledger and content stamp).
    pub fn seal(&self, owner_uid: &str, secret: &mut Secret) {
        let mac = self.mac(owner_uid, secret);
        secret
            .metadata
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(MAC_ANNOTATION.to_string(), mac);
    }

    /// A per-ClaudeKey salt for the proxy's audit user hash (`auditSalt` in `proxy.json`): stable
    /// across rotations and replicas, and unguessable without this key.
    pub fn audit_salt(&self, namespace: &str, name: &str) -> String {
        let tag = hmac::sign(
            &self.key,
            format!("claudekey audit salt\0{namespace}/{name}").as_bytes(),
        );
        hex::encode(tag.as_ref())
    }

    /// The Redis password of a namespace's sidecars (`crate::shared_counters`): derived, so
    /// every replica and restart agrees on it without storing it.
    pub fn redis_password(&self, namespace: &str) -> String {
        crate::shared_counters::namespace_password(&self.key, namespace)
    }
}

/// What the MAC covers: owner, where the Secret is, its ledger and its content stamp (the
/// content stamp is itself a digest of the data, so the data is covered too).
fn message(owner_uid: &str, secret: &Secret) -> Vec<u8> {
    let annotations = secret.annotations();
    let field = |k: &str| annotations.get(k).map(String::as_str).unwrap_or("");
    [
        "claudekey ledger v1",
        owner_uid,
        secret.metadata.namespace.as_deref().unwrap_or(""),
        secret.metadata.name.as_deref().unwrap_or(""),
        field(LEDGER_ANNOTATION),
        field(CONTENT_ANNOTATION),
    ]
    .join("\0")
    .into_bytes()
}

fn key_secret(key: &[u8; 32]) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(KEY_SECRET.to_string()),
            labels: Some(BTreeMap::from([(
                annotations::MANAGED_BY_LABEL.to_string(),
                annotations::MANAGER.to_string(),
            )])),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            KEY_ENTRY.to_string(),
            ByteString(key.to_vec()),
        )])),
        type_: Some("Opaque".to_string()),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(ns: &str, name: &str, ledger: &str) -> Secret {
        Secret {
            metadata: ObjectMeta {
                namespace: Some(ns.into()),
                name: Some(name.into()),
                annotations: Some(BTreeMap::from([
                    (LEDGER_ANNOTATION.to_string(), ledger.to_string()),
                    (CONTENT_ANNOTATION.to_string(), "abc".to_string()),
                ])),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn a_sealed_secret_verifies_and_any_edit_breaks_it() {
        let sealer = Sealer::from_bytes(&[7; 32]);
        let mut s = secret("team-a", "bot-client", "{\"ledger\":1}");
        sealer.seal("uid-1", &mut s);
        assert!(sealer.verify("uid-1", &s));
        // Another ClaudeKey (uid) or another Secret may not reuse it.
        assert!(!sealer.verify("uid-2", &s));
        let mut moved = s.clone();
        moved.metadata.namespace = Some("team-b".into());
        assert!(!sealer.verify("uid-1", &moved));
        // An edited ledger or content stamp fails.
        let mut edited = s.clone();
        edited
            .metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(LEDGER_ANNOTATION.into(), "{\"ledger\":2}".into());
        assert!(!sealer.verify("uid-1", &edited));
        let mut stamp = s.clone();
        stamp
            .metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(CONTENT_ANNOTATION.into(), "abd".into());
        assert!(!sealer.verify("uid-1", &stamp));
        // Another controller key does not verify it, and nothing unsigned verifies.
        assert!(!Sealer::from_bytes(&[8; 32]).verify("uid-1", &s));
        assert!(!sealer.verify("uid-1", &secret("team-a", "bot-client", "{}")));
    }

    #[test]
    fn audit_salts_differ_per_claudekey_and_hide_the_key() {
        let sealer = Sealer::from_bytes(&[7; 32]);
        let a = sealer.audit_salt("team-a", "bot");
        assert_eq!(a.len(), 64);
        assert_eq!(a, sealer.audit_salt("team-a", "bot"));
        assert_ne!(a, sealer.audit_salt("team-b", "bot"));
        assert!(!format!("{sealer:?}").contains("07"));
    }
}
