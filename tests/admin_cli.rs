//! `claudekey revoke` and `claudekey drill` against the real apiserver and the fake upstream.
//! No controller runs here: the test plays its part by patching status after the revoke
//! annotation appears (what the controller does on revoke: new key, zero grace).

mod support;

use std::{process::Stdio, time::Duration};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use serde_json::json;

use claudekey::crd::ClaudeKey;
use claudekey::fake_upstream::{FakeUpstream, KeyStatus};

const ADMIN: &str = "sk-ant-admin01-cliadminkeyvalue-AAAA";
const OLD: &str = "sk-ant-api03-OLDoldoldoldoldoldoldoldoldoldold-o1AA";
const NEW: &str = "sk-ant-api03-NEWnewnewnewnewnewnewnewnewnewnew-n2BB";

fn secret(name: &str, ns: &str, key: &str, value: &[u8]) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(ns.into()),
            ..Default::default()
        },
        data: Some([(key.to_string(), ByteString(value.to_vec()))].into()),
        ..Default::default()
    }
}

/// A ClaudeKey with workload key `ck:00000001`, its `-proxy` Secret holding NEW (current) and
/// OLD (previous), and the admin key Secret in a fresh "operator" namespace.
async fn setup(client: &kube::Client) -> (String, String, Api<ClaudeKey>) {
    support::install_crd(client).await;
    let ns = support::namespace(client, "admin-cli").await;
    let op = support::namespace(client, "admin-op").await;
    let cks: Api<ClaudeKey> = Api::namespaced(client.clone(), &ns);
    let source = format!("{ns}.bot");
    let cluster_source: claudekey::crd::ClusterClaudeKeySource = serde_json::from_value(json!({
        "apiVersion": "claudekey.io/v1alpha2", "kind": "ClusterClaudeKeySource",
        "metadata": { "name": source },
        "spec": {
            "kubernetesSecret": { "name": "up", "key": "api-key" },
            "allowedNamespaces": { "names": [ns] },
            "placement": "namespace",
            "anthropicAdmin": { "adminKeySecretRef": { "name": "anthropic-admin", "key": "admin-key" } }
        }
    }))
    .unwrap();
    Api::<claudekey::crd::ClusterClaudeKeySource>::all(client.clone())
        .create(&PostParams::default(), &cluster_source)
        .await
        .expect("create ClusterClaudeKeySource");
    let ck: ClaudeKey = serde_json::from_value(json!({
        "apiVersion": "claudekey.io/v1alpha2", "kind": "ClaudeKey",
        "metadata": { "name": "bot", "namespace": ns },
        "spec": { "sourceRef": { "kind": "ClusterClaudeKeySource", "name": source } }
    }))
    .unwrap();
    cks.create(&PostParams::default(), &ck)
        .await
        .expect("create ClaudeKey");
    set_workload_status(&cks, "ck:00000001", Some("ck:00000000")).await;
    let until = (chrono::Utc::now() + chrono::TimeDelta::minutes(15)).to_rfc3339();
    let proxy = json!({
        "claudeKey": { "namespace": ns, "name": "bot" },
        "upstream": [
            { "key": NEW, "fingerprint": "up:new", "validUntil": null },
            { "key": OLD, "fingerprint": "up:old", "validUntil": until }
        ],
        "workloadKeys": [],
        "policy": {}
    });
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    secrets
        .create(
            &PostParams::default(),
            &secret("bot-proxy", &ns, "proxy.json", proxy.to_string().as_bytes()),
        )
        .await
        .expect("proxy Secret");
    Api::<Secret>::namespaced(client.clone(), &op)
        .create(
            &PostParams::default(),
            &secret("anthropic-admin", &op, "admin-key", ADMIN.as_bytes()),
        )
        .await
        .expect("admin Secret");
    (ns, op, cks)
}

async fn set_workload_status(cks: &Api<ClaudeKey>, fp: &str, previous: Option<&str>) {
    let patch = json!({ "status": { "workloadKey": {
        "fingerprint": fp, "issuedAt": chrono::Utc::now().to_rfc3339(), "previousFingerprint": previous,
    } } });
    cks.patch_status("bot", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("patch status");
}

fn cli(args: &[&str], ns: &str, op: &str, url: &str) -> tokio::process::Command {
    let kubeconfig = std::env::var(support::KUBECONFIG_ENV).expect("test kubeconfig");
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_claudekey"));
    cmd.args(args)
        .args(["bot", "-n", ns])
        .env("KUBECONFIG", kubeconfig)
        .env("CLAUDEKEY_ANTHROPIC_URL", url)
        .env("CLAUDEKEY_OPERATOR_NAMESPACE", op)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

#[tokio::test]
async fn revoke_waits_for_the_new_key_then_retires_the_old_upstream_key_and_drill_passes() {
    let client = support::client().await;
    let (ns, op, cks) = setup(&client).await;
    let fake = FakeUpstream::start(&[OLD, NEW]).await.unwrap();
    fake.add_admin_key(ADMIN);

    let child = cli(&["revoke", "--timeout", "60s"], &ns, &op, &fake.url())
        .spawn()
        .unwrap();
    // Play the controller: once the annotation is there, issue a new key with zero grace.
    support::eventually(Duration::from_secs(30), "revoke annotation", || async {
        let ck = cks.get("bot").await.ok()?;
        ck.metadata.annotations?.get("claudekey.io/revoke").cloned()
    })
    .await;
    assert_eq!(
        fake.key_status(OLD),
        Some(KeyStatus::Active),
        "nothing retired before the new key is out"
    );
    set_workload_status(&cks, "ck:00000002", None).await;
    let out = child.wait_with_output().await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "revoke failed: {stdout}\n{stderr}");
    assert!(stdout.contains("ck:00000002"), "{stdout}");
    assert_eq!(fake.key_status(OLD), Some(KeyStatus::Inactive));
    assert_eq!(fake.key_status(NEW), Some(KeyStatus::Active));
    for secret in [OLD, NEW, ADMIN] {
        assert!(
            !stdout.contains(secret) && !stderr.contains(secret),
            "a key leaked to output"
        );
    }

    let out = cli(&["drill"], &ns, &op, &fake.url())
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "drill: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ck = cks.get("bot").await.unwrap();
    let cond = ck
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "RetiredKeyLive")
        .expect("condition");
    assert_eq!(cond.status, "False");
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), &ns);
    let reasons: Vec<String> = support::eventually(Duration::from_secs(10), "events", || async {
        let list = events.list(&Default::default()).await.ok()?;
        let r: Vec<String> = list.items.into_iter().filter_map(|e| e.reason).collect();
        (r.len() >= 2).then_some(r)
    })
    .await;
    assert!(
        reasons.iter().any(|r| r == "UpstreamKeyRetired"),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r == "RevocationDrillPassed"),
        "{reasons:?}"
    );
    let _ = Api::<Namespace>::all(client)
        .delete(&ns, &Default::default())
        .await;
}

#[tokio::test]
async fn drill_is_loud_when_the_retired_key_still_works() {
    let client = support::client().await;
    let (ns, op, cks) = setup(&client).await;
    let fake = FakeUpstream::start(&[OLD, NEW]).await.unwrap();
    let out = cli(&["drill"], &ns, &op, &fake.url())
        .output()
        .await
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("STILL WORKS"));
    let ck = cks.get("bot").await.unwrap();
    let cond = ck
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "RetiredKeyLive")
        .expect("condition");
    assert_eq!(cond.status, "True");
    assert!(!cond.message.contains(OLD));
}
