//! Unit tests of building the owned Secrets and recovering state from them.

use std::collections::HashMap;

use secrecy::{ExposeSecret, SecretString};

use super::*;
use crate::controller::ledger::UpstreamLedgerEntry;
use crate::keys::{KeyKind, fingerprint};
use crate::proxyconf::WorkloadKeyEntry;

const WORKLOAD: &str = "ck_live_0123456789abcdefghijklmnopqrstuvwxyzABCDEFG";
const UPSTREAM: &str = "sk-ant-api03-test-upstream-value-AA";

fn claudekey() -> ClaudeKey {
    let mut ck: ClaudeKey = serde_yaml::from_str(
        "apiVersion: claudekey.io/v1alpha1\nkind: ClaudeKey\nmetadata: { name: bot, namespace: team-a, uid: u-1 }\nspec:\n  source: { kubernetesSecret: { name: up } }\n  scope: { maxTokens: 100 }\n",
    )
    .unwrap();
    ck.metadata.uid = Some("u-1".into());
    ck
}

fn ledger() -> Ledger {
    Ledger {
        issued_at: "2026-11-27T10:00:00Z".parse().unwrap(),
        rotate_handled: None,
        revoke_handled: None,
        expiry_handled: None,
        workload_keys: vec![WorkloadKeyEntry {
            sha256: sha256_hex(WORKLOAD),
            fingerprint: fingerprint(KeyKind::Workload, WORKLOAD),
            valid_until: None,
        }],
        upstream_version: "v1".into(),
        upstream_keys: vec![UpstreamLedgerEntry {
            sha256: sha256_hex(UPSTREAM),
            fingerprint: fingerprint(KeyKind::Upstream, UPSTREAM),
            valid_until: None,
            hint: None,
        }],
        retiring: vec![],
    }
}

fn values() -> HashMap<String, SecretString> {
    HashMap::from([(sha256_hex(UPSTREAM), SecretString::from(UPSTREAM))])
}

fn both() -> (Secret, Secret) {
    let ck = claudekey();
    let config = render_config(&ck, &ledger(), &values()).unwrap();
    (
        build_client(
            &ck,
            &SecretString::from(WORKLOAD),
            "http://gw:8080",
            &ledger(),
        ),
        build_proxy(&ck, &config, &ledger()),
    )
}

#[test]
fn secrets_carry_owner_labels_and_exactly_the_designed_entries() {
    let (client, proxy) = both();
    let owner = &client.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.controller),
        ("ClaudeKey", Some(true))
    );
    assert_eq!(client.labels()["app.kubernetes.io/managed-by"], "claudekey");
    assert_eq!(proxy.labels()["claudekey.io/name"], "bot");
    let client_keys: Vec<_> = client.data.as_ref().unwrap().keys().collect();
    assert_eq!(client_keys, ["ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL"]);
    let proxy_data = proxy.data.as_ref().unwrap();
    assert_eq!(proxy_data.keys().collect::<Vec<_>>(), ["proxy.json"]);
    let json = String::from_utf8(proxy_data["proxy.json"].0.clone()).unwrap();
    assert!(!json.contains(WORKLOAD), "proxy.json must hold hashes only");
    assert!(json.contains(&sha256_hex(WORKLOAD)));
    let config: ProxyConfig = serde_json::from_str(&json).unwrap();
    assert_eq!(config.policy.scope.max_tokens, Some(100));
    assert_eq!(config.claude_key.namespace, "team-a");
    for secret in [&client, &proxy] {
        let ledger_text = &secret.annotations()[LEDGER_ANNOTATION];
        assert!(!ledger_text.contains(WORKLOAD) && !ledger_text.contains(UPSTREAM));
    }
}

#[test]
fn recovers_key_ledger_and_upstream_values() {
    let (client, proxy) = both();
    let r = recover(Some(&client), Some(&proxy));
    assert_eq!(r.ledger, Some(ledger()));
    assert_eq!(r.client_key.unwrap().expose_secret(), WORKLOAD);
    assert_eq!(
        r.upstream_values[&sha256_hex(UPSTREAM)].expose_secret(),
        UPSTREAM
    );
}

#[test]
fn edited_or_missing_client_secret_loses_the_key_but_not_the_ledger() {
    let (mut client, proxy) = both();
    let r = recover(None, Some(&proxy));
    assert_eq!((r.ledger, r.client_key.is_none()), (Some(ledger()), true));
    client
        .data
        .as_mut()
        .unwrap()
        .insert(API_KEY_ENTRY.into(), ByteString(b"ck_live_other".to_vec()));
    let r = recover(Some(&client), Some(&proxy));
    assert_eq!((r.ledger, r.client_key.is_none()), (Some(ledger()), true));
}

#[test]
fn missing_proxy_secret_recovers_from_the_client_copy() {
    let (client, _) = both();
    let r = recover(Some(&client), None);
    assert_eq!(r.ledger, Some(ledger()));
    assert!(r.client_key.is_some());
    assert!(r.upstream_values.is_empty());
    let err = render_config(&claudekey(), &ledger(), &r.upstream_values).unwrap_err();
    assert!(!err.to_string().contains(UPSTREAM));
}

#[test]
fn drift_tells_hand_edits_from_progress() {
    let (_, proxy) = both();
    assert_eq!(drift(None, &proxy), Drift::Missing);
    assert_eq!(drift(Some(&proxy), &proxy), Drift::None);
    let mut edited = proxy.clone();
    let data = edited.data.as_mut().unwrap();
    data.insert("proxy.json".into(), ByteString(b"{}".to_vec()));
    assert_eq!(drift(Some(&edited), &proxy), Drift::Edited);
    let mut added = proxy.clone();
    let data = added.data.as_mut().unwrap();
    data.insert("extra".into(), ByteString(b"x".to_vec()));
    assert_eq!(drift(Some(&added), &proxy), Drift::Edited);
    assert_eq!(extra_entries(Some(&added), &proxy), ["extra"]);
    let mut unlabelled = proxy.clone();
    unlabelled.metadata.labels = None;
    assert_eq!(drift(Some(&unlabelled), &proxy), Drift::Edited);
    let mut orphaned = proxy.clone();
    orphaned.metadata.owner_references = None;
    assert_eq!(drift(Some(&orphaned), &proxy), Drift::Edited);
    // A new upstream version, or a new policy from a spec change, is the controller's own doing.
    let ck = claudekey();
    let mut moved = ledger();
    moved.upstream_version = "v2".into();
    let newer = build_proxy(&ck, &render_config(&ck, &moved, &values()).unwrap(), &moved);
    assert_eq!(drift(Some(&proxy), &newer), Drift::Progress);
    let mut respecced = claudekey();
    respecced.spec.scope.max_tokens = Some(200);
    let config = render_config(&respecced, &ledger(), &values()).unwrap();
    let new_policy = build_proxy(&respecced, &config, &ledger());
    assert_eq!(drift(Some(&proxy), &new_policy), Drift::Progress);
}

#[test]
fn a_crash_between_the_two_writes_resumes_from_the_client_copy() {
    let (_, old_proxy) = both();
    let newer_key = "ck_live_ZYXWVUTSRQPONMLKJIHGFEDCBAzyxwvutsrqponmlkjihgf";
    let mut newer = ledger();
    newer.rotate_handled = Some("1".into());
    newer.workload_keys[0].valid_until = Some("2026-11-27T10:15:00Z".parse().unwrap());
    newer.workload_keys.insert(
        0,
        WorkloadKeyEntry {
            sha256: sha256_hex(newer_key),
            fingerprint: fingerprint(KeyKind::Workload, newer_key),
            valid_until: None,
        },
    );
    let new_client = build_client(
        &claudekey(),
        &SecretString::from(newer_key),
        "http://gw",
        &newer,
    );
    let r = recover(Some(&new_client), Some(&old_proxy));
    assert_eq!(
        r.ledger,
        Some(newer),
        "the -client write is the commit point"
    );
    assert_eq!(r.client_key.unwrap().expose_secret(), newer_key);
    assert!(r.upstream_values.contains_key(&sha256_hex(UPSTREAM)));
}

#[test]
fn only_secrets_controlled_by_this_claudekey_count_as_owned() {
    let (client, _) = both();
    assert!(controlled_by(&client, &claudekey()));
    let mut recreated = claudekey();
    recreated.metadata.uid = Some("u-2".into());
    assert!(!controlled_by(&client, &recreated));
    let mut stripped = client.clone();
    stripped.metadata.owner_references = None;
    assert!(
        controlled_by(&stripped, &claudekey()),
        "our labels, owner stripped: repair it"
    );
    let mut foreign = stripped.clone();
    foreign.metadata.labels = None;
    assert!(!controlled_by(&foreign, &claudekey()));
}
