//! The controller across crashes and replicas, against the real control plane: a crash between
//! the Secret writes and the status write never issues a second key, only the Lease holder
//! reconciles, and gateway consumers are rolled exactly once per key, also across restarts.

mod controller_support;
mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use claudekey::controller::decide::RotationReason;
use claudekey::keys::{KeyKind, fingerprint, sha256_hex};
use k8s_openapi::api::apps::v1::Deployment;
use kube::{Api, Client, api::PostParams};
use tokio::sync::mpsc;

use controller_support::*;

#[tokio::test]
async fn crash_between_secret_write_and_status_write_never_issues_twice() {
    let (client, ns) = setup("ck-crash").await;
    put_upstream(&client, &ns, "upstream", &upstream_key()).await;
    let armed = Arc::new(AtomicBool::new(false));
    let (reached_tx, mut reached) = mpsc::unbounded_channel();
    let mut cfg = config(&ns);
    let hook_armed = armed.clone();
    cfg.after_secrets = Some(Arc::new(move |rotation| {
        let armed = hook_armed.load(Ordering::SeqCst) && rotation == Some(RotationReason::Rotate);
        let reached_tx = reached_tx.clone();
        Box::pin(async move {
            if armed {
                let _ = reached_tx.send(());
                futures::future::pending::<()>().await;
            }
        })
    }));
    let first_controller = start(&client, cfg);
    apply_claudekey(&client, &ns, "bot", SPEC_FAST).await;
    let ck = wait_claudekey(&client, &ns, "bot", "Ready", is_ready).await;
    let first = owned(&client, &ns, "bot").await.unwrap();
    let first_fp = fingerprint(KeyKind::Workload, &first.workload_key);
    assert_eq!(
        controller_support::fingerprint(&ck).as_deref(),
        Some(first_fp.as_str())
    );

    armed.store(true, Ordering::SeqCst);
    annotate(&client, &ns, "bot", "claudekey.io/rotate", "crash-1").await;
    tokio::time::timeout(Duration::from_secs(30), reached.recv())
        .await
        .expect("rotation reached the hook");
    first_controller.crash();

    // Killed after both Secrets were written: the new key is out, status still shows the old one.
    let written = owned(&client, &ns, "bot").await.unwrap();
    assert_ne!(written.workload_key, first.workload_key);
    let api = Api::<claudekey::crd::ClaudeKey>::namespaced(client.clone(), &ns);
    let stale = api.get("bot").await.unwrap();
    assert_eq!(
        controller_support::fingerprint(&stale).as_deref(),
        Some(first_fp.as_str())
    );

    let second_controller = start(&client, config(&ns));
    let new_fp = fingerprint(KeyKind::Workload, &written.workload_key);
    wait_claudekey(
        &client,
        &ns,
        "bot",
        "status converged on the issued key",
        |ck| {
            controller_support::fingerprint(ck).as_deref() == Some(new_fp.as_str()) && is_ready(ck)
        },
    )
    .await;
    let after = owned(&client, &ns, "bot").await.unwrap();
    assert_eq!(
        after.workload_key, written.workload_key,
        "no second key issued"
    );
    let hashes = after.workload_hashes();
    assert_eq!(hashes[0], sha256_hex(&written.workload_key));
    assert!(
        hashes
            .iter()
            .all(|h| *h == sha256_hex(&written.workload_key)
                || *h == sha256_hex(&first.workload_key))
    );
    second_controller.stop().await;
}

fn lease_config(ns: &str) -> claudekey::controller::ControllerConfig {
    let mut cfg = config(ns);
    cfg.leader_election = Some(("claudekey-controller".to_string(), Duration::from_secs(3)));
    cfg.metrics_listen = Some(SocketAddr::from(([127, 0, 0, 1], free_port())));
    cfg
}

#[tokio::test]
async fn only_the_lease_holder_reconciles_and_a_standby_takes_over() {
    let (client, ns) = setup("ck-leader").await;
    put_upstream(&client, &ns, "upstream", &upstream_key()).await;
    let leader = start(&client, lease_config(&ns));
    support::eventually(Duration::from_secs(20), "first replica leads", || async {
        (metric(&leader.metrics().await, "claudekey_leader") == 1.0).then_some(())
    })
    .await;
    let standby = start(&client, lease_config(&ns));
    support::eventually(
        Duration::from_secs(10),
        "standby serves /readyz",
        || async {
            http_get(standby.metrics_port.unwrap(), "/readyz")
                .await
                .filter(|r| r.contains("200 OK"))
        },
    )
    .await;

    apply_claudekey(&client, &ns, "bot", SPEC_FAST).await;
    wait_claudekey(&client, &ns, "bot", "Ready", is_ready).await;
    let first = owned(&client, &ns, "bot").await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(metric(&leader.metrics().await, "claudekey_reconciles_total") >= 1.0);
    let standby_metrics = standby.metrics().await;
    assert_eq!(
        metric(&standby_metrics, "claudekey_reconciles_total"),
        0.0,
        "the standby must not reconcile"
    );
    assert_eq!(metric(&standby_metrics, "claudekey_leader"), 0.0);

    // The leader dies without releasing the Lease: the standby takes over once it expires.
    leader.crash();
    support::eventually(Duration::from_secs(20), "standby leads", || async {
        (metric(&standby.metrics().await, "claudekey_leader") == 1.0).then_some(())
    })
    .await;
    annotate(&client, &ns, "bot", "claudekey.io/rotate", "after-failover").await;
    let rotated = wait_owned(&client, &ns, "bot", "rotation by the new leader", |o| {
        o.workload_key != first.workload_key
    })
    .await;
    assert_eq!(rotated.workload_hashes().len(), 2);
    assert!(metric(&standby.metrics().await, "claudekey_reconciles_total") >= 1.0);
    standby.stop().await;
}

async fn deployment(client: &Client, ns: &str, name: &str, annotations: &[(&str, &str)]) {
    let annotations: BTreeMap<String, String> = annotations
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let deployment: Deployment = serde_json::from_value(serde_json::json!({
        "metadata": { "name": name },
        "spec": {
            "selector": { "matchLabels": { "app": name } },
            "template": {
                "metadata": { "labels": { "app": name }, "annotations": annotations },
                "spec": { "containers": [{
                    "name": "app", "image": "example.invalid/app:1",
                    "envFrom": [{ "secretRef": { "name": "bot-client" } }]
                }] }
            }
        }
    }))
    .unwrap();
    Api::<Deployment>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &deployment)
        .await
        .unwrap();
}

fn template_state(d: &Deployment) -> (Option<String>, i64) {
    let restarted = d
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.annotations.as_ref())
        .and_then(|a| a.get("claudekey.io/restartedFor").cloned());
    (restarted, d.metadata.generation.unwrap_or_default())
}

#[tokio::test]
async fn gateway_consumers_roll_once_per_key_also_across_a_restart() {
    let (client, ns) = setup("ck-consumers").await;
    put_upstream(&client, &ns, "upstream", &upstream_key()).await;
    deployment(
        &client,
        &ns,
        "gateway-user",
        &[("claudekey.io/consumes", "bot")],
    )
    .await;
    deployment(
        &client,
        &ns,
        "sidecar-user",
        &[("claudekey.io/inject", "bot")],
    )
    .await;
    deployment(
        &client,
        &ns,
        "unrelated",
        &[("claudekey.io/consumes", "other")],
    )
    .await;
    let deployments = Api::<Deployment>::namespaced(client.clone(), &ns);

    let mut cfg = config(&ns);
    cfg.metrics_listen = Some(SocketAddr::from(([127, 0, 0, 1], free_port())));
    let controller = start(&client, cfg);
    let spec = SPEC_FAST.replace("gracePeriod: 3s", "gracePeriod: 20s");
    apply_claudekey(&client, &ns, "bot", &spec).await;
    wait_claudekey(&client, &ns, "bot", "Ready", is_ready).await;
    let first = owned(&client, &ns, "bot").await.unwrap();
    let fp1 = fingerprint(KeyKind::Workload, &first.workload_key);
    let stamped = support::eventually(Duration::from_secs(20), "consumer stamped", || async {
        let d = deployments.get("gateway-user").await.ok()?;
        let state = template_state(&d);
        (state.0.as_deref() == Some(fp1.as_str())).then_some(state)
    })
    .await;

    // A restarted controller reconciles again but rolls nothing.
    controller.stop().await;
    let mut cfg = config(&ns);
    let port = free_port();
    cfg.metrics_listen = Some(SocketAddr::from(([127, 0, 0, 1], port)));
    cfg.consumer_restart_delay = Duration::from_secs(3);
    let restarted = start(&client, cfg);
    support::eventually(
        Duration::from_secs(20),
        "restarted controller reconciled",
        || async {
            (metric(&restarted.metrics().await, "claudekey_reconciles_total") >= 1.0).then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        template_state(&deployments.get("gateway-user").await.unwrap()),
        stamped,
        "no second roll"
    );
    assert_eq!(
        metric(
            &restarted.metrics().await,
            "claudekey_consumer_restarts_total"
        ),
        0.0
    );

    // A rotation rolls it exactly once more.
    annotate(&client, &ns, "bot", "claudekey.io/rotate", "1").await;
    let second = wait_owned(&client, &ns, "bot", "rotated", |o| {
        o.workload_key != first.workload_key
    })
    .await;
    let fp2 = fingerprint(KeyKind::Workload, &second.workload_key);
    // Not at once: the old key is still valid, so gateway proxies get time to learn the new one.
    assert_eq!(
        template_state(&deployments.get("gateway-user").await.unwrap()),
        stamped,
        "rolled before the restart delay"
    );
    let rolled = support::eventually(
        Duration::from_secs(20),
        "consumer stamped for the new key",
        || async {
            let state = template_state(&deployments.get("gateway-user").await.ok()?);
            (state.0.as_deref() == Some(fp2.as_str())).then_some(state)
        },
    )
    .await;
    assert_eq!(rolled.1, stamped.1 + 1, "one template change per rotation");

    for untouched in ["sidecar-user", "unrelated"] {
        let (restarted_for, generation) =
            template_state(&deployments.get(untouched).await.unwrap());
        assert_eq!(
            (restarted_for, generation),
            (None, 1),
            "{untouched} must be left alone"
        );
    }
    restarted.stop().await;
}

#[tokio::test]
async fn admin_port_serves_metrics_health_and_readiness() {
    let (client, ns) = setup("ck-admin").await;
    put_upstream(&client, &ns, "upstream", &upstream_key()).await;
    let mut cfg = config(&ns);
    let port = free_port();
    cfg.metrics_listen = Some(SocketAddr::from(([127, 0, 0, 1], port)));
    let controller = start(&client, cfg);
    apply_claudekey(&client, &ns, "bot", SPEC_FAST).await;
    wait_claudekey(&client, &ns, "bot", "Ready", is_ready).await;
    let health = support::eventually(Duration::from_secs(10), "/healthz", || {
        http_get(port, "/healthz")
    })
    .await;
    assert!(health.starts_with("HTTP/1.0 200"), "{health}");
    let ready = http_get(port, "/readyz").await.unwrap();
    assert!(ready.starts_with("HTTP/1.0 200"), "{ready}");
    let text = controller.metrics().await;
    for name in [
        "claudekey_reconciles_total",
        "claudekey_reconcile_duration_seconds_count",
        "claudekey_rotations_total{reason=\"initial\",result=\"ok\"} 1",
        "claudekey_backend_requests_total{backend=\"kubernetes\",result=\"ok\"}",
        "claudekey_backend_request_duration_seconds_count{backend=\"kubernetes\"}",
        &format!("claudekey_workload_key_age_seconds{{namespace=\"{ns}\",name=\"bot\"}}"),
    ] {
        assert!(text.contains(name), "missing {name} in\n{text}");
    }
    let key = owned(&client, &ns, "bot").await.unwrap().workload_key;
    assert!(!text.contains(&key[8..]));
    controller.stop().await;
}

#[tokio::test]
async fn the_binary_reconciles_and_releases_its_lease_on_sigterm() {
    use k8s_openapi::api::coordination::v1::Lease;
    let (client, ns) = setup("ck-binary").await;
    put_upstream(&client, &ns, "upstream", &upstream_key()).await;
    let port = free_port();
    let kubeconfig = std::env::var(support::KUBECONFIG_ENV).unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_claudekey"))
        .args(["controller", "--namespace", &ns, "--watch-namespace", &ns])
        .args(["--metrics-listen", &format!("127.0.0.1:{port}")])
        .args(["--lease-duration", "5s", "--identity", "binary-test"])
        .env("KUBECONFIG", kubeconfig)
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .expect("start claudekey controller");
    apply_claudekey(&client, &ns, "bot", SPEC_FAST).await;
    wait_claudekey(&client, &ns, "bot", "Ready", is_ready).await;
    let leases = Api::<Lease>::namespaced(client.clone(), &ns);
    let holder = |l: Lease| l.spec.and_then(|s| s.holder_identity);
    let lease = leases.get("claudekey-controller").await.unwrap();
    assert_eq!(holder(lease).as_deref(), Some("binary-test"));
    assert!(
        http_get(port, "/healthz")
            .await
            .unwrap()
            .starts_with("HTTP/1.0 200")
    );

    let pid = child.id().expect("running").to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("exits after SIGTERM")
        .unwrap();
    assert!(status.success(), "graceful exit, got {status}");
    let lease = leases.get("claudekey-controller").await.unwrap();
    assert_eq!(holder(lease), None, "the Lease is released for a successor");
}
