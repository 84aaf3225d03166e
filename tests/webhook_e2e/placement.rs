//! What the webhook injects per placement, through the real apiserver: the forwarder and only the
//! `-client` Secret for gateway placement (refused while the ClaudeKey is not Ready), and the
//! projected token of a federation source for the sidecar alone.

use claudekey::crd::ClaudeKey;
use claudekey::webhook::Mode;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;

use crate::{Harness, WAIT, inject_pod, support};

#[tokio::test]
async fn gateway_placement_injects_the_forwarder_and_not_ready_is_refused() {
    let h = Harness::start(Mode::Enforce, "wh-gateway").await;
    h.create_claudekey("gw", None).await;
    let pods = h.pods();
    let message = support::eventually(WAIT, "the webhook cache to see ClaudeKey gw", || {
        let pods = pods.clone();
        async move {
            match pods
                .create(&PostParams::default(), &inject_pod("early", "gw"))
                .await
            {
                Err(kube::Error::Api(status)) if status.message.contains("not Ready") => {
                    Some(status.message)
                }
                _ => None,
            }
        }
    })
    .await;
    assert!(
        message.contains(&format!("ClaudeKey {}/gw is not Ready yet", h.namespace)),
        "{message}"
    );

    h.set_placement("gw", "gateway").await;
    let pod = support::eventually(WAIT, "the webhook cache to see placement gateway", || {
        let pods = pods.clone();
        async move {
            pods.create(&PostParams::default(), &inject_pod("forwarded", "gw"))
                .await
                .ok()
        }
    })
    .await;
    let spec = pod.spec.expect("spec");
    let sidecar = &spec.init_containers.as_ref().expect("init containers")[0];
    assert_eq!(sidecar.name, "claudekey-proxy");
    assert_eq!(sidecar.restart_policy.as_deref(), Some("Always"));
    let args = sidecar.args.as_ref().expect("args").join(" ");
    assert!(
        args.contains("--mode forward") && args.contains("--config-dir /var/run/claudekey/client"),
        "{args}"
    );
    let secrets: Vec<String> = spec
        .volumes
        .iter()
        .flatten()
        .filter_map(|v| v.secret.as_ref()?.secret_name.clone())
        .collect();
    assert_eq!(secrets, ["gw-client"], "only the client Secret is mounted");
    let env: Vec<(String, Option<String>)> = spec.containers[0]
        .env
        .iter()
        .flatten()
        .map(|e| (e.name.clone(), e.value.clone()))
        .collect();
    assert!(env.contains(&(
        "ANTHROPIC_API_KEY".to_string(),
        Some("claudekey-sidecar".to_string())
    )));
    assert!(env.contains(&(
        "ANTHROPIC_BASE_URL".to_string(),
        Some("http://127.0.0.1:8484".to_string())
    )));
    h.cleanup().await;
}

/// A ClaudeKey of a federation source (placement namespace): through the real apiserver, the
/// sidecar alone gets the projected token of the source's audience, and both webhooks admit it.
#[tokio::test]
async fn a_federation_claudekey_gives_the_sidecar_its_projected_token() {
    let h = Harness::start(Mode::Enforce, "wh-wif").await;
    h.create_claudekey("wif", None).await;
    Api::<ClaudeKey>::namespaced(h.client.clone(), &h.namespace)
        .patch_status(
            "wif",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {
                "placement": "namespace",
                "identityToken": { "audience": "https://api.anthropic.com", "expirationSeconds": 1800 },
            }})),
        )
        .await
        .expect("set status");
    let pods = h.pods();
    let pod = support::eventually(WAIT, "the webhook cache to see the federation", || {
        let pods = pods.clone();
        async move {
            let pod = match pods
                .create(&PostParams::default(), &inject_pod("federated", "wif"))
                .await
            {
                Ok(pod) => pod,
                Err(_) => return None,
            };
            let has_token = pod
                .spec
                .as_ref()?
                .volumes
                .iter()
                .flatten()
                .any(|v| v.projected.is_some());
            if !has_token {
                // Created before the cache saw the status: delete and try again.
                let _ = pods.delete("federated", &DeleteParams::default()).await;
                return None;
            }
            Some(pod)
        }
    })
    .await;
    let spec = pod.spec.expect("spec");
    let sidecar = &spec.init_containers.as_ref().expect("init containers")[0];
    let args = sidecar.args.as_ref().expect("args").join(" ");
    assert!(
        args.ends_with("--identity-token-file /var/run/secrets/claudekey.io/identity/token"),
        "{args}"
    );
    let volume = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.projected.is_some())
        .expect("projected volume");
    let projection = volume.projected.as_ref().unwrap().sources.as_ref().unwrap()[0]
        .service_account_token
        .clone()
        .expect("serviceAccountToken");
    assert_eq!(
        (
            projection.audience.as_deref(),
            projection.expiration_seconds
        ),
        (Some("https://api.anthropic.com"), Some(1800))
    );
    assert!(
        sidecar
            .volume_mounts
            .iter()
            .flatten()
            .any(|m| m.name == volume.name
                && m.mount_path == "/var/run/secrets/claudekey.io/identity")
    );
    for app in &spec.containers {
        assert!(
            !app.volume_mounts
                .iter()
                .flatten()
                .any(|m| m.name == volume.name),
            "an app container mounts the identity token"
        );
    }
    assert_eq!(spec.service_account_name.as_deref(), Some("default"));
    h.cleanup().await;
}
