//! Unit tests of building the owned Secrets and recovering state from them.

use std::collections::HashMap;

use secrecy::{ExposeSecret, SecretString};

use super::*;
use crate::controller::ledger::UpstreamLedgerEntry;
use crate::controller::seal::Sealer;
use crate::keys::{KeyKind, fingerprint};
use crate::proxyconf::WorkloadKeyEntry;

const WORKLOAD: &str = "ck_live_0123456789abcdefghijklmnopqrstuvwxyzABCDEFG";
const UPSTREAM: &str = "sk-ant-api03-test-upstream-value-AA";

fn claudekey() -> ClaudeKey {
    let mut ck: ClaudeKey = serde_yaml::from_str(
        "apiVersion: claudekey.io/v1alpha2\nkind: ClaudeKey\nmetadata: { name: bot, namespace: team-a, uid: u-1 }\nspec:\n  sourceRef: { kind: ClusterClaudeKeySource, name: up }\n  scope: { maxTokens: 100 }\n",
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
    }
}

fn values() -> HashMap<String, SecretString> {
    HashMap::from([(sha256_hex(UPSTREAM), SecretString::from(UPSTREAM))])
}

fn sealer() -> Sealer {
    Sealer::from_bytes(&[9; 32])
}

fn gateway() -> GatewayEndpoint {
    GatewayEndpoint {
        url: "https://gw:8443".into(),
        ca: Some("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into()),
    }
}

fn config() -> ProxyConfig {
    render_config(&claudekey(), &ledger(), &values(), None, "ab".repeat(32)).unwrap()
}

fn sealed(mut secret: Secret) -> Secret {
    sealer().seal("u-1", &mut secret);
    secret
}

fn both() -> (Secret, Secret) {
    let ck = claudekey();
    (
        sealed(build_client(
            &ck,
            &SecretString::from(WORKLOAD),
            &gateway(),
            Placement::Namespace,
            &ledger(),
        )),
        sealed(build_proxy(&ck, &config(), None, &ledger())),
    )
}

fn recover_with(client: Option<&Secret>, configs: &[&Secret]) -> Recovered {
    let sealer = sealer();
    recover(client, configs, |s| sealer.verify("u-1", s))
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
    let r = recover_with(Some(&client), &[&proxy]);
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
    let r = recover_with(None, &[&proxy]);
    assert_eq!((r.ledger, r.client_key.is_none()), (Some(ledger()), true));
    client
        .data
        .as_mut()
        .unwrap()
        .insert(API_KEY_ENTRY.into(), ByteString(b"ck_live_other".to_vec()));
    let r = recover_with(Some(&client), &[&proxy]);
    assert_eq!((r.ledger, r.client_key.is_none()), (Some(ledger()), true));
}

#[test]
fn missing_proxy_secret_recovers_from_the_client_copy() {
    let (client, _) = both();
    let r = recover_with(Some(&client), &[]);
    assert_eq!(r.ledger, Some(ledger()));
    assert!(r.client_key.is_some());
    assert!(r.upstream_values.is_empty());
    let err = render_config(
        &claudekey(),
        &ledger(),
        &r.upstream_values,
        None,
        String::new(),
    )
    .unwrap_err();
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
    let newer = build_proxy(
        &ck,
        &render_config(&ck, &moved, &values(), None, "ab".repeat(32)).unwrap(),
        None,
        &moved,
    );
    assert_eq!(drift(Some(&proxy), &newer), Drift::Progress);
    let mut respecced = claudekey();
    respecced.spec.scope.max_tokens = Some(200);
    let config = render_config(&respecced, &ledger(), &values(), None, "ab".repeat(32)).unwrap();
    let new_policy = build_proxy(&respecced, &config, None, &ledger());
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
    let new_client = sealed(build_client(
        &claudekey(),
        &SecretString::from(newer_key),
        &gateway(),
        Placement::Namespace,
        &newer,
    ));
    let r = recover_with(Some(&new_client), &[&old_proxy]);
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

#[test]
fn a_forged_ledger_is_never_recovered() {
    let (client, proxy) = both();
    let forge = |secret: &Secret| {
        let mut forged = secret.clone();
        let mut ledger = ledger();
        ledger.workload_keys.push(WorkloadKeyEntry {
            sha256: "ee".repeat(32),
            fingerprint: "ck:backdoor".into(),
            valid_until: Some("2099-01-01T00:00:00Z".parse().unwrap()),
        });
        forged
            .metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(LEDGER_ANNOTATION.into(), ledger.to_annotation());
        forged
    };
    // The -client copy forged: the -proxy copy (verified) wins; the forgery is reported.
    let r = recover_with(Some(&forge(&client)), &[&proxy]);
    assert_eq!(r.ledger, Some(ledger()));
    assert_eq!(r.tampered, ["bot-client"]);
    // Both forged: nothing is trusted, so the reconcile issues afresh (zero grace).
    let r = recover_with(Some(&forge(&client)), &[&forge(&proxy)]);
    assert_eq!(r.ledger, None);
    assert_eq!(r.tampered.len(), 2);
    // Unsigned bookkeeping counts as forged too.
    let (unsigned_client, _) = (
        build_client(
            &claudekey(),
            &SecretString::from(WORKLOAD),
            &gateway(),
            Placement::Namespace,
            &ledger(),
        ),
        (),
    );
    let r = recover_with(Some(&unsigned_client), &[]);
    assert_eq!(r.ledger, None);
}

#[test]
fn gateway_placement_keeps_the_upstream_key_in_the_operator_namespace() {
    let ck = claudekey();
    let client = build_client(
        &ck,
        &SecretString::from(WORKLOAD),
        &gateway(),
        Placement::Gateway,
        &ledger(),
    );
    let entries: Vec<_> = client.data.as_ref().unwrap().keys().collect();
    assert_eq!(
        entries,
        ["ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL", "ca.crt"]
    );
    let data = client.data.as_ref().unwrap();
    assert!(
        !data
            .values()
            .any(|v| String::from_utf8_lossy(&v.0).contains(UPSTREAM))
    );
    let config = build_gateway_config(&ck, "claudekey-system", &config(), &ledger());
    assert_eq!(config.namespace().as_deref(), Some("claudekey-system"));
    assert!(config.name_any().starts_with("claudekey-gw-"));
    assert_eq!(config.labels()["claudekey.io/config"], "gateway");
    assert_eq!(config.labels()["claudekey.io/namespace"], "team-a");
    assert_eq!(config.annotations()["claudekey.io/claudekey"], "team-a/bot");
    assert!(config.metadata.owner_references.is_none());
    let json = String::from_utf8(config.data.as_ref().unwrap()["proxy.json"].0.clone()).unwrap();
    assert!(json.contains(UPSTREAM) && json.contains("auditSalt"));
    // In placement namespace the CA bundle is not written.
    let plain = build_client(
        &ck,
        &SecretString::from(WORKLOAD),
        &gateway(),
        Placement::Namespace,
        &ledger(),
    );
    assert!(!plain.data.as_ref().unwrap().contains_key("ca.crt"));
}
