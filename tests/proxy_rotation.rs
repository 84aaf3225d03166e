//! End-to-end key rotation at the proxy: kubelet-style reloads, the upstream 401 fallback during
//! grace, and rotation under load with zero failed requests.

mod proxy_common;

use std::{sync::Arc, time::Duration};

use chrono::Utc;
use claudekey::{fake_upstream::KeyStatus, proxy::Mode};
use proxy_common::*;
use serde_json::json;

fn grace_until() -> String {
    (Utc::now() + chrono::TimeDelta::minutes(15)).to_rfc3339()
}

#[tokio::test]
async fn reload_through_kubelet_data_swap() {
    let h = Harness::start(Mode::Gateway, &[UPSTREAM_A], |dir| {
        kubelet_write(
            dir,
            &proxy_json(
                "bot",
                &[(UPSTREAM_A, None)],
                &[(WORKLOAD_A, None)],
                json!({}),
            ),
        );
    })
    .await;
    let c = client();
    assert_eq!(
        send(&c, &h.url(), "GET", "/v1/models", Some(WORKLOAD_A), None)
            .await
            .status,
        200
    );
    // Revoke: a new key with no grace for the old one.
    kubelet_write(
        h.dir.path(),
        &proxy_json(
            "bot",
            &[(UPSTREAM_A, None)],
            &[(WORKLOAD_B, None)],
            json!({}),
        ),
    );
    let url = h.url();
    for _ in 0..250 {
        if send(&c, &url, "GET", "/v1/models", Some(WORKLOAD_B), None)
            .await
            .status
            == 200
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        send(&c, &url, "GET", "/v1/models", Some(WORKLOAD_B), None)
            .await
            .status,
        200
    );
    assert_eq!(
        send(&c, &url, "GET", "/v1/models", Some(WORKLOAD_A), None)
            .await
            .status,
        401
    );
    // A broken write keeps the last good config.
    kubelet_write(h.dir.path(), "{ not json");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        send(&c, &url, "GET", "/v1/models", Some(WORKLOAD_B), None)
            .await
            .status,
        200
    );
    assert!(
        h.proxy
            .metrics
            .encode()
            .contains(r#"claudekey_proxy_config_reloads_total{result="error"}"#)
    );
}

#[tokio::test]
async fn upstream_401_falls_back_to_the_previous_key_in_grace() {
    // The controller rolled out UPSTREAM_B, but Anthropic does not accept it yet.
    let h = Harness::start(Mode::Sidecar, &[UPSTREAM_A], |dir| {
        kubelet_write(
            dir,
            &proxy_json(
                "bot",
                &[(UPSTREAM_B, None), (UPSTREAM_A, Some(&grace_until()))],
                &[],
                json!({}),
            ),
        );
    })
    .await;
    let r = h.ask("hi").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = h.fake.received();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].header("x-api-key"), Some(UPSTREAM_B));
    assert_eq!(seen[1].header("x-api-key"), Some(UPSTREAM_A));
    assert_eq!(seen[0].body, seen[1].body);
    // Without a key in grace the 401 passes through.
    h.fake.set_key_status(UPSTREAM_A, KeyStatus::Inactive);
    let r = h.ask("hi").await;
    assert_eq!(r.status, 401);
    assert!(
        h.proxy
            .metrics
            .encode()
            .contains(r#"kind="unauthorizedRetried""#)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_under_load_fails_no_request() {
    let h = Harness::start(Mode::Gateway, &[UPSTREAM_A, UPSTREAM_B], |dir| {
        kubelet_write(
            dir,
            &proxy_json(
                "bot",
                &[(UPSTREAM_A, None)],
                &[(WORKLOAD_A, None)],
                json!({}),
            ),
        );
    })
    .await;
    h.fake.set_chunk_chars(4);
    let current = Arc::new(std::sync::Mutex::new(WORKLOAD_A));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for i in 0..12 {
        let (url, current, stop) = (h.url(), current.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let c = client();
            let (mut ok, mut failed) = (0u32, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let key = if i % 2 == 0 {
                    *current.lock().unwrap()
                } else {
                    WORKLOAD_A
                };
                let r = send(
                    &c,
                    &url,
                    "POST",
                    "/v1/messages",
                    Some(key),
                    Some(message("hi", i % 2 == 0)),
                )
                .await;
                if r.status == 200 {
                    ok += 1
                } else {
                    failed.push((r.status, r.text()))
                }
            }
            (ok, failed)
        }));
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    // Rotate both keys: new workload key and new upstream key, the old ones in grace.
    kubelet_write(
        h.dir.path(),
        &proxy_json(
            "bot",
            &[(UPSTREAM_B, None), (UPSTREAM_A, Some(&grace_until()))],
            &[(WORKLOAD_B, None), (WORKLOAD_A, Some(&grace_until()))],
            json!({}),
        ),
    );
    // Once the proxy has the new config, half the clients switch to the new key (restarted
    // consumers); the rest keep the old one, which is in its grace period.
    let probe = client();
    let url = h.url();
    for _ in 0..500 {
        if send(&probe, &url, "GET", "/v1/models", Some(WORKLOAD_B), None)
            .await
            .status
            == 200
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    *current.lock().unwrap() = WORKLOAD_B;
    tokio::time::sleep(Duration::from_millis(400)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for c in clients {
        let (ok, failed) = c.await.unwrap();
        assert!(
            failed.is_empty(),
            "failed requests during rotation: {failed:?}"
        );
        total += ok;
    }
    assert!(total > 50, "only {total} requests ran");
    let seen = h.fake.received();
    assert!(
        seen.iter()
            .any(|r| r.header("x-api-key") == Some(UPSTREAM_B)),
        "new upstream key never used"
    );
    assert!(
        seen.iter()
            .all(|r| r.header("x-api-key") != Some(WORKLOAD_A)
                && r.header("x-api-key") != Some(WORKLOAD_B))
    );
}
