//! Shared limits of namespace-placement sidecars on real pods (DESIGN.md §12, docs/limits.md):
//! the chart runs with `redis.sidecars` against the node's Redis (hack/node.sh), so two pods of
//! one ClaudeKey, each with its injected sidecar, count one `requestsPerMinute` together, each
//! sidecar logged in as its namespace's Redis user with the password the controller wrote.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::Api;
use kube::api::PostParams;

use claudekey::crd::{ClaudeKey, ClusterClaudeKeySource};

use super::fixture::{OPERATOR_NS, installed, node_client};
use super::manifests::{app_pod, cluster_source, limited_claudekey, upstream_secret};
use super::{eventually, logs, namespace, wait_claudekey_ready};

/// Three calls, no retries; one line per answer.
const SDK_THREE: &str = r#"
import anthropic
client = anthropic.Anthropic(max_retries=0, timeout=10)
for _ in range(3):
    try:
        client.messages.create(model="claude-haiku-4-5", max_tokens=8,
                               messages=[{"role": "user", "content": "hi"}])
        print("STATUS 200", flush=True)
    except anthropic.RateLimitError:
        print("STATUS 429", flush=True)
"#;

/// `requestsPerMinute: 1` and two pods of three calls each, started together: counted
/// together, one call in the minute passes; counted per pod (or a sidecar on its fallback
/// share, 0.5 of 1 rounded up), one per pod would.
#[tokio::test]
#[ignore = "node tier: needs a real node (CLAUDEKEY_NODE=1 hack/control-plane.sh start); hack/test.sh runs it"]
async fn two_sidecar_pods_share_one_limit_through_redis() {
    assert!(
        std::env::var_os("CLAUDEKEY_TEST_NODE_REDIS_URL").is_some(),
        "CLAUDEKEY_TEST_NODE_REDIS_URL unset: the node's Redis (hack/node.sh start) is missing"
    );
    let fx = installed();
    let client = node_client().await;
    let ns = namespace(&client, "node-shared").await;
    let upstream_key = fx.new_upstream_key();
    let secret = format!("upstream-{ns}-bot");
    Api::<Secret>::namespaced(client.clone(), OPERATOR_NS)
        .create(
            &PostParams::default(),
            &upstream_secret(&secret, &upstream_key),
        )
        .await
        .expect("create the upstream Secret");
    Api::<ClusterClaudeKeySource>::all(client.clone())
        .create(
            &PostParams::default(),
            &cluster_source(&ns, "bot", &secret, "namespace"),
        )
        .await
        .expect("create the ClusterClaudeKeySource");
    let limits = serde_json::json!({ "requestsPerMinute": 1 });
    Api::<ClaudeKey>::namespaced(client.clone(), &ns)
        .create(
            &PostParams::default(),
            &limited_claudekey(&ns, "bot", limits),
        )
        .await
        .expect("create the ClaudeKey");
    wait_claudekey_ready(&client, &ns, "bot").await;
    let proxy = Api::<Secret>::namespaced(client.clone(), &ns)
        .get("bot-proxy")
        .await
        .expect("the bot-proxy Secret");
    assert!(
        proxy.data.expect("data").contains_key("redis-password"),
        "the controller wrote the namespace's Redis password"
    );

    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    let start = Instant::now();
    for name in ["shared-a", "shared-b"] {
        pods.create(
            &PostParams::default(),
            &app_pod(name, "bot", SDK_THREE, "Never"),
        )
        .await
        .expect("create an app pod (the webhook injects the sidecar)");
    }
    let mut statuses = Vec::new();
    for name in ["shared-a", "shared-b"] {
        let pod = eventually(Duration::from_secs(90), "an app pod to finish", || async {
            let p = pods.get(name).await.ok()?;
            let phase = p.status.as_ref()?.phase.clone()?;
            (phase == "Succeeded" || phase == "Failed").then_some(p)
        })
        .await;
        let out = logs(&client, &ns, name, "app").await;
        let sidecar = logs(&client, &ns, name, "claudekey-proxy").await;
        let phase = pod.status.as_ref().and_then(|s| s.phase.clone());
        assert_eq!(phase.as_deref(), Some("Succeeded"), "{name}:\n{out}");
        assert!(
            !sidecar.contains("Redis unreachable"),
            "{name}'s sidecar could not count in Redis:\n{sidecar}"
        );
        let args = pod
            .spec
            .as_ref()
            .expect("spec")
            .init_containers
            .as_ref()
            .expect("sidecar")[0]
            .args
            .clone()
            .unwrap_or_default();
        assert!(
            args.contains(&"claudekey-ns-$(POD_NAMESPACE)".to_string()),
            "{args:?}"
        );
        statuses.extend(
            out.lines()
                .filter_map(|l| l.strip_prefix("STATUS "))
                .map(str::to_owned),
        );
    }
    let elapsed = start.elapsed();
    assert!(
        elapsed < Duration::from_secs(55),
        "the pods took {elapsed:?}: past a minute the limit refills and the count proves nothing"
    );
    let passed = statuses.iter().filter(|s| *s == "200").count();
    assert_eq!(statuses.len(), 6, "{statuses:?}");
    assert_eq!(
        passed, 1,
        "{passed} of 6 calls passed a requestsPerMinute of 1 across two pods: the sidecars counted apart ({statuses:?})"
    );
}
