//! Issue 14's gateway placement end to end: a controller issuing from a cluster source, the
//! gateway serving its config Secret over TLS, the official SDK configured only from `-client`, and
//! a rotation under load.

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use serde_json::json;

use crate::proxy_common::UPSTREAM_A;
use crate::{Gateway, REPLY, WAIT, assert_no_keys_logged, call, support, tls_client, until_status};

/// The SDK script of a gateway consumer: only what `<name>-client` gives it (key, https URL and
/// the CA bundle through SSL_CERT_FILE).
const CONSUMER_SCRIPT: &str = r#"
import anthropic
c = anthropic.Anthropic(max_retries=0)
m = c.messages.create(model="claude-sonnet-4-5-20250929", max_tokens=64,
                      messages=[{"role": "user", "content": "Say hello."}])
print("CREATE:" + m.content[0].text)
"#;

/// Issue 14's gateway placement end to end: the controller issues the ClaudeKey from a cluster
/// source, the gateway serves it from the config Secret over TLS, the official SDK configured
/// only from `<name>-client` gets 200, and a rotation under load fails no request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_gateway_and_sdk_end_to_end_with_a_rotation_under_load() {
    use claudekey::crd::ClaudeKey;
    use kube::api::{Patch, PatchParams};
    let gw = Gateway::start("gw-e2e-op").await;
    let client = support::client().await;
    support::install_crd(&client).await;
    let operator = gw.namespace.clone();
    let team = support::namespace(&client, "gw-e2e-team").await;
    let apply = PatchParams::apply("claudekey-tests").force();
    let upstream = json!({ "apiVersion": "v1", "kind": "Secret",
        "metadata": { "name": "upstream", "labels": { "claudekey.io/upstream-key": "true" } },
        "stringData": { "api-key": UPSTREAM_A } });
    gw.secrets
        .patch("upstream", &apply, &Patch::Apply(&upstream))
        .await
        .unwrap();
    let source = format!("{team}.gw");
    let source_body = json!({ "apiVersion": "claudekey.io/v1alpha2", "kind": "ClusterClaudeKeySource",
        "metadata": { "name": source },
        "spec": { "kubernetesSecret": { "name": "upstream" }, "allowedNamespaces": { "names": [&team] } } });
    Api::<claudekey::crd::ClusterClaudeKeySource>::all(client.clone())
        .patch(&source, &apply, &Patch::Apply(&source_body))
        .await
        .unwrap();
    let base = gw.url();
    let dir = tempfile::tempdir().unwrap();

    // The controller, writing that gateway's URL and CA into `-client`.
    let mut config = claudekey::controller::ControllerConfig::new(&operator);
    config.watch_namespace = Some(team.clone());
    config.leader_election = None;
    config.usage_interval = None;
    config.gateway_url = base.clone();
    config.gateway_ca = Some(gw.pki.ca_pem.clone());
    let (stop_controller, controller_stopped) = tokio::sync::oneshot::channel::<()>();
    let controller = tokio::spawn(claudekey::controller::run_with(
        client.clone(),
        config,
        async {
            let _ = controller_stopped.await;
        },
    ));
    let ck = json!({ "apiVersion": "claudekey.io/v1alpha2", "kind": "ClaudeKey", "metadata": { "name": "bot" },
        "spec": { "sourceRef": { "kind": "ClusterClaudeKeySource", "name": &source },
                  "rotation": { "interval": "24h", "gracePeriod": "15s" } } });
    let claudekeys = Api::<ClaudeKey>::namespaced(client.clone(), &team);
    claudekeys
        .patch("bot", &apply, &Patch::Apply(&ck))
        .await
        .unwrap();
    let secrets = Api::<Secret>::namespaced(client.clone(), &team);
    let read_client = || async {
        let data = secrets.get_opt("bot-client").await.ok()??.data?;
        let text = |k: &str| String::from_utf8(data.get(k)?.0.clone()).ok();
        Some((
            text("ANTHROPIC_API_KEY")?,
            text("ANTHROPIC_BASE_URL")?,
            text("ca.crt")?,
        ))
    };
    let (old_key, url, ca) = support::eventually(WAIT, "-client written", read_client).await;
    assert_eq!(url, base);
    assert!(secrets.get_opt("bot-proxy").await.unwrap().is_none());
    let https = tls_client(&ca);
    until_status(&https, &url, &old_key, 200, "the gateway serves bot").await;

    // The official SDK, configured only from `-client`.
    let ca_file = dir.path().join("ca.crt");
    std::fs::write(&ca_file, &ca).unwrap();
    let python = std::env::var("CLAUDEKEY_TEST_PYTHON").expect("CLAUDEKEY_TEST_PYTHON");
    let output = tokio::process::Command::new(&python)
        .args(["-c", CONSUMER_SCRIPT])
        .env("ANTHROPIC_API_KEY", &old_key)
        .env("ANTHROPIC_BASE_URL", &url)
        .env("SSL_CERT_FILE", &ca_file)
        .env_remove("ANTHROPIC_AUTH_TOKEN")
        .env("NO_PROXY", "127.0.0.1,localhost")
        .output()
        .await
        .unwrap();
    let out = String::from_utf8_lossy(&output.stdout).to_string()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the SDK failed through the gateway:\n{out}"
    );
    assert!(out.contains(&format!("CREATE:{REPLY}")), "{out}");

    // A rotation under load: the old key keeps working through its grace, no request fails.
    let load = {
        let (https, url, key) = (https.clone(), url.clone(), old_key.clone());
        tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            let until = std::time::Instant::now() + Duration::from_secs(8);
            while std::time::Instant::now() < until {
                match call(&https, &url, &key).await.0 {
                    200 => ok += 1,
                    other => failed.push(other),
                }
            }
            (ok, failed)
        })
    };
    let rotate = json!({ "metadata": { "annotations": { "claudekey.io/rotate": "1" } } });
    claudekeys
        .patch("bot", &PatchParams::default(), &Patch::Merge(&rotate))
        .await
        .unwrap();
    let new_key = support::eventually(WAIT, "a new workload key", || async {
        read_client().await.map(|c| c.0).filter(|k| *k != old_key)
    })
    .await;
    until_status(&https, &url, &new_key, 200, "the new key served").await;
    let (ok, failed) = load.await.unwrap();
    assert!(
        failed.is_empty(),
        "{} requests failed during the rotation: {failed:?}",
        failed.len()
    );
    assert!(ok > 20, "load too light to mean anything: {ok}");
    until_status(
        &https,
        &url,
        &old_key,
        401,
        "the old key refused after its grace",
    )
    .await;
    assert_eq!(call(&https, &url, &new_key).await.0, 200);

    let _ = stop_controller.send(());
    let _ = tokio::time::timeout(Duration::from_secs(20), controller).await;
    assert_no_keys_logged(&[UPSTREAM_A, &old_key, &new_key]);
}
