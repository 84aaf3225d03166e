//! The controller with its enterprise backends, end to end: AWS Secrets Manager (moto server) and
//! Vault KV v2 (OpenBao dev server), both started by `hack/control-plane.sh start`. A ClaudeKey
//! syncs, a new backend version rolls with the grace overlap, and a missing secret degrades the
//! ClaudeKey with an actionable message while the last good key keeps being served.

mod controller_support;
mod support;

use std::sync::Arc;

use aws_config::{BehaviorVersion, Region};
use aws_sdk_secretsmanager::config::Credentials;
use claudekey::backend::aws::AwsSecretsManagerBackend;
use claudekey::backend::vault::{VaultAuth, VaultBackend, VaultSettings};
use claudekey::keys::{KeyKind, fingerprint};
use controller_support::*;
use vaultrs::client::{VaultClient, VaultClientSettingsBuilder};

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run through hack/test.sh, which starts moto and OpenBao")
    })
}

fn suffix() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..10].to_string()
}

async fn aws() -> (aws_sdk_secretsmanager::Client, AwsSecretsManagerBackend) {
    let config = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(
            std::env::var("CLAUDEKEY_TEST_AWS_REGION").unwrap_or("us-east-1".into()),
        ))
        .endpoint_url(env("CLAUDEKEY_TEST_AWS_ENDPOINT"))
        .credentials_provider(Credentials::new(
            "testing",
            "testing",
            None,
            None,
            "claudekey-tests",
        ))
        .load()
        .await;
    (
        aws_sdk_secretsmanager::Client::new(&config),
        AwsSecretsManagerBackend::from_sdk_config(config),
    )
}

/// The previous upstream key is kept with an end, the new one is current: the grace overlap.
async fn wait_rolled(client: &kube::Client, ns: &str, old: &str, new: &str) {
    let (old_fp, new_fp) = (
        fingerprint(KeyKind::Upstream, old),
        fingerprint(KeyKind::Upstream, new),
    );
    wait_owned(
        client,
        ns,
        "bot",
        "new upstream version rolled with overlap",
        |o| {
            let up = &o.config.upstream;
            up.len() == 2
                && up[0].fingerprint == new_fp
                && up[0].valid_until.is_none()
                && up[1].fingerprint == old_fp
                && up[1].valid_until.is_some()
        },
    )
    .await;
}

#[tokio::test]
async fn aws_secret_syncs_rolls_and_degrades_without_losing_the_key() {
    let (client, ns) = setup("ck-aws").await;
    let (sm, backend) = aws().await;
    let secret_id = format!("prod/claude/{}", suffix());
    let (first, second) = (upstream_key(), upstream_key());
    sm.create_secret()
        .name(&secret_id)
        .secret_string(format!(r#"{{"api_key":"{first}"}}"#))
        .send()
        .await
        .expect("create secret");

    let mut config = config(&ns);
    config.aws = Some(Arc::new(backend));
    let controller = start(&client, config);
    let spec = format!(
        "  source:\n    awsSecretsManager: {{ secretId: {secret_id}, jsonField: api_key }}\n    refreshInterval: 1s\n  rotation: {{ interval: 24h, gracePeriod: 30s }}\n"
    );
    apply_claudekey(&client, &ns, "bot", &spec).await;
    let ck = wait_claudekey(&client, &ns, "bot", "Ready", is_ready).await;
    assert_eq!(
        ck.status.as_ref().unwrap().source.as_deref(),
        Some(format!("ClusterClaudeKeySource/{ns}.bot (aws:{secret_id})").as_str())
    );
    assert_eq!(
        ck.status
            .as_ref()
            .unwrap()
            .upstream
            .as_ref()
            .unwrap()
            .fingerprint,
        fingerprint(KeyKind::Upstream, &first)
    );

    sm.put_secret_value()
        .secret_id(&secret_id)
        .secret_string(format!(r#"{{"api_key":"{second}"}}"#))
        .send()
        .await
        .expect("put new version");
    wait_rolled(&client, &ns, &first, &second).await;

    // The secret disappears: Degraded with what to fix, and the proxy keeps the last good key.
    sm.delete_secret()
        .secret_id(&secret_id)
        .force_delete_without_recovery(true)
        .send()
        .await
        .expect("delete secret");
    let ck = wait_claudekey(&client, &ns, "bot", "Degraded=True", |ck| {
        condition(ck, "Degraded").is_some_and(|c| c.0 == "True")
    })
    .await;
    let (_, _, message) = condition(&ck, "Degraded").unwrap();
    assert!(
        message.contains(&secret_id) && message.contains("not found"),
        "{message}"
    );
    let kept = owned(&client, &ns, "bot")
        .await
        .expect("Secrets still there");
    assert_eq!(
        kept.config.current_upstream().unwrap().fingerprint,
        fingerprint(KeyKind::Upstream, &second)
    );

    assert_no_leaks(&client, &ns, &[first, second, kept.workload_key]).await;
    controller.stop().await;
}

#[tokio::test]
async fn vault_secret_syncs_rolls_and_degrades_without_losing_the_key() {
    let (client, ns) = setup("ck-vault").await;
    let addr = env("CLAUDEKEY_TEST_VAULT_ADDR");
    let token = env("CLAUDEKEY_TEST_VAULT_TOKEN");
    let admin = VaultClient::new(
        VaultClientSettingsBuilder::default()
            .address(&addr)
            .token(&token)
            .build()
            .unwrap(),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, &token).unwrap();
    let path = format!("claude/{}", suffix());
    let (first, second) = (upstream_key(), upstream_key());
    vaultrs::kv2::set(
        &admin,
        "secret",
        &path,
        &serde_json::json!({ "api_key": first }),
    )
    .await
    .expect("write v1");

    let mut config = config(&ns);
    let vault = VaultBackend::new(VaultSettings {
        addr,
        ca_cert: None,
        auth: VaultAuth::TokenFile(token_file),
    })
    .expect("vault backend");
    config.vault = Some(Arc::new(vault));
    let controller = start(&client, config);
    let spec = format!(
        "  source:\n    vault: {{ path: {path} }}\n    refreshInterval: 1s\n  rotation: {{ interval: 24h, gracePeriod: 30s }}\n"
    );
    apply_claudekey(&client, &ns, "bot", &spec).await;
    let ck = wait_claudekey(&client, &ns, "bot", "Ready", is_ready).await;
    assert_eq!(
        ck.status
            .as_ref()
            .unwrap()
            .upstream
            .as_ref()
            .unwrap()
            .version,
        "1"
    );

    vaultrs::kv2::set(
        &admin,
        "secret",
        &path,
        &serde_json::json!({ "api_key": second }),
    )
    .await
    .expect("write v2");
    wait_rolled(&client, &ns, &first, &second).await;
    let ck = wait_claudekey(&client, &ns, "bot", "version 2 in status", |ck| {
        ck.status
            .as_ref()
            .and_then(|s| s.upstream.as_ref())
            .is_some_and(|u| u.version == "2")
    })
    .await;
    assert!(is_ready(&ck));

    vaultrs::kv2::delete_metadata(&admin, "secret", &path)
        .await
        .expect("delete secret");
    let ck = wait_claudekey(&client, &ns, "bot", "Degraded=True", |ck| {
        condition(ck, "Degraded").is_some_and(|c| c.0 == "True")
    })
    .await;
    let (_, _, message) = condition(&ck, "Degraded").unwrap();
    assert!(message.contains(&path), "{message}");
    let kept = owned(&client, &ns, "bot")
        .await
        .expect("Secrets still there");
    assert_eq!(
        kept.config.current_upstream().unwrap().fingerprint,
        fingerprint(KeyKind::Upstream, &second)
    );

    assert_no_leaks(&client, &ns, &[first, second, kept.workload_key]).await;
    controller.stop().await;
}
