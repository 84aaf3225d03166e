//! A gateway config Secret outlives nothing: ClaudeKeys carry no finalizer, and the orphan sweep
//! removes the config of a deleted ClaudeKey (at once while a controller leads, at start for
//! deletions made while none did); the finalizer older releases put on ClaudeKeys still works. A ClaudeKey created again under a deleted one's name
//! inherits none of its accepted workload keys, and is not told its bookkeeping was forged.

use std::time::Duration;

use claudekey::crd::{ClaudeKey, gateway_config_secret_name};
use claudekey::proxyconf::ProxyConfig;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::json;

use crate::{apply_ref, gateway_controller, grant_cluster_source, serial};
use crate::{controller_support::*, support};

const UID_ANNOTATION: &str = "claudekey.io/claudekey-uid";

/// The workload-key hashes a gateway config accepts.
fn accepted(config: &Secret) -> Vec<String> {
    let json = &config.data.as_ref().unwrap()["proxy.json"].0;
    let parsed: ProxyConfig = serde_json::from_slice(json).unwrap();
    parsed.workload_keys.into_iter().map(|k| k.sha256).collect()
}

fn written_for(config: &Secret) -> Option<&str> {
    config
        .metadata
        .annotations
        .as_ref()?
        .get(UID_ANNOTATION)
        .map(String::as_str)
}

async fn delete_claudekey(api: &Api<ClaudeKey>, name: &str) {
    api.delete(name, &Default::default()).await.unwrap();
    support::eventually(Duration::from_secs(10), "ClaudeKey gone", || async {
        api.get_opt(name).await.ok()?.is_none().then_some(())
    })
    .await;
}

async fn config_gone(configs: &Api<Secret>, name: &str, what: &str) {
    support::eventually(Duration::from_secs(20), what, || async {
        configs.get_opt(name).await.ok()?.is_none().then_some(())
    })
    .await;
}

/// An operator namespace, a team namespace and a cluster source placed at the gateway that
/// grants it; the team's ClaudeKey is to be called "bot".
struct Scene {
    client: kube::Client,
    operator: String,
    team: String,
    source: String,
    configs: Api<Secret>,
    claudekeys: Api<ClaudeKey>,
    config_name: String,
}

async fn scene(operator_prefix: &str, team_prefix: &str) -> Scene {
    let (client, operator) = setup(operator_prefix).await;
    let team = support::namespace(&client, team_prefix).await;
    let source = grant_cluster_source(&client, &operator, &team, "orphan", &upstream_key()).await;
    Scene {
        configs: Api::namespaced(client.clone(), &operator),
        claudekeys: Api::namespaced(client.clone(), &team),
        config_name: gateway_config_secret_name(&team, "bot"),
        client,
        operator,
        team,
        source,
    }
}

#[tokio::test]
async fn a_deleted_claudekeys_gateway_config_goes_and_its_namesake_inherits_nothing() {
    let _one = serial().await;
    let Scene {
        client,
        operator,
        team,
        source,
        configs,
        claudekeys,
        config_name,
    } = scene("ck-trust-orphan", "ck-trust-oteam").await;

    // No finalizer; the config names its ClaudeKey by uid.
    let controller = start(&client, gateway_controller(&operator));
    apply_ref(&client, &team, "bot", "ClusterClaudeKeySource", &source).await;
    let first = wait_claudekey(&client, &team, "bot", "Ready", is_ready).await;
    assert!(first.metadata.finalizers.unwrap_or_default().is_empty());
    let config = configs.get(&config_name).await.unwrap();
    assert_eq!(written_for(&config), first.metadata.uid.as_deref());

    // Deleted while no controller runs: the ClaudeKey goes at once, its config stays...
    controller.stop().await;
    delete_claudekey(&claudekeys, "bot").await;
    assert!(configs.get_opt(&config_name).await.unwrap().is_some());
    // ...until a controller leads again.
    let controller = start(&client, gateway_controller(&operator));
    config_gone(
        &configs,
        &config_name,
        "config removed by the sweep at start",
    )
    .await;

    // Deleted and created again while no controller runs: the new ClaudeKey finds the earlier
    // one's config, which it neither reads nor keeps.
    apply_ref(&client, &team, "bot", "ClusterClaudeKeySource", &source).await;
    wait_claudekey(&client, &team, "bot", "Ready again", is_ready).await;
    let earlier = configs.get(&config_name).await.unwrap();
    controller.stop().await;
    delete_claudekey(&claudekeys, "bot").await;
    apply_ref(&client, &team, "bot", "ClusterClaudeKeySource", &source).await;
    let uid = claudekeys.get("bot").await.unwrap().metadata.uid;
    let controller = start(&client, gateway_controller(&operator));
    wait_claudekey(&client, &team, "bot", "the namesake Ready", |ck| {
        is_ready(ck) && ck.metadata.uid == uid
    })
    .await;
    let config = configs.get(&config_name).await.unwrap();
    assert_eq!(written_for(&config), uid.as_deref());
    let inherited: Vec<_> = accepted(&config)
        .into_iter()
        .filter(|h| accepted(&earlier).contains(h))
        .collect();
    assert!(inherited.is_empty(), "an earlier workload key is accepted");
    let reasons = event_reasons(&client, &team).await;
    assert!(
        !reasons.iter().any(|r| r == "LedgerTampered"),
        "{reasons:?}"
    );

    // Deleted while a controller leads, carrying the finalizer of an older release: the
    // controller removes the config and the finalizer, and the ClaudeKey goes.
    let legacy = json!({ "metadata": { "finalizers": ["claudekey.io/gateway-config"] } });
    claudekeys
        .patch("bot", &PatchParams::default(), &Patch::Merge(&legacy))
        .await
        .unwrap();
    delete_claudekey(&claudekeys, "bot").await;
    config_gone(&configs, &config_name, "config removed on the deletion").await;
    controller.stop().await;
}

/// A controller watching one namespace has no cache of the operator namespace: the sweep lists
/// the configs there at start and reads one by name on a deletion.
#[tokio::test]
async fn a_namespaced_controller_sweeps_the_operator_namespace_through_the_api() {
    let _one = serial().await;
    let Scene {
        client,
        operator,
        team,
        source,
        configs,
        claudekeys,
        config_name,
    } = scene("ck-trust-orphan-ns", "ck-trust-onsteam").await;
    let namespaced = || {
        let mut cfg = gateway_controller(&operator);
        cfg.watch_namespace = Some(team.clone());
        cfg
    };

    // The config of a ClaudeKey in a namespace this controller does not watch (another
    // controller's, sharing the operator namespace): not this one's to remove.
    let elsewhere = gateway_config_secret_name("ck-trust-not-watched", "ghost");
    let ghost = json!({ "apiVersion": "v1", "kind": "Secret",
        "metadata": { "name": &elsewhere,
            "labels": { "claudekey.io/config": "gateway" },
            "annotations": { "claudekey.io/claudekey": "ck-trust-not-watched/ghost",
                             UID_ANNOTATION: "gone" } } });
    configs
        .create(&Default::default(), &serde_json::from_value(ghost).unwrap())
        .await
        .unwrap();

    let controller = start(&client, namespaced());
    apply_ref(&client, &team, "bot", "ClusterClaudeKeySource", &source).await;
    wait_claudekey(&client, &team, "bot", "Ready", is_ready).await;
    assert!(configs.get_opt(&config_name).await.unwrap().is_some());
    controller.stop().await;
    delete_claudekey(&claudekeys, "bot").await;
    let controller = start(&client, namespaced());
    config_gone(
        &configs,
        &config_name,
        "config removed by the sweep at start",
    )
    .await;
    assert!(configs.get_opt(&elsewhere).await.unwrap().is_some());

    apply_ref(&client, &team, "bot", "ClusterClaudeKeySource", &source).await;
    wait_claudekey(&client, &team, "bot", "Ready again", is_ready).await;
    assert!(configs.get_opt(&config_name).await.unwrap().is_some());
    delete_claudekey(&claudekeys, "bot").await;
    config_gone(&configs, &config_name, "config removed on the deletion").await;
    controller.stop().await;
}
