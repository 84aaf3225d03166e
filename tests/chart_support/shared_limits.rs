//! The chart's shared limits for namespace-placement sidecars (`redis.sidecars`): the
//! controller holds the Redis admin password, the webhook points sidecars at Redis without one,
//! and the chart's own Redis admits every namespace only then, and only behind a password.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::networking::v1::NetworkPolicy;

use super::*;

#[test]
fn redis_sidecars_wire_the_controller_and_the_webhook_never_a_password() {
    let docs = render("redis");
    let url = "redis://claudekey-redis.ck-test.svc:6379/0";
    let controller: Deployment = one(&docs, "Deployment", "claudekey-controller");
    let c = &pod(&controller).containers[0];
    assert!(args(c).contains(&"--redis-password-file=/etc/claudekey/redis/password".into()));
    let env = c.env.as_ref().unwrap();
    let redis_url = env
        .iter()
        .find(|e| e.name == "CLAUDEKEY_REDIS_URL")
        .unwrap();
    assert_eq!(redis_url.value.as_deref(), Some(url));
    let volume = pod(&controller)
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.name == "redis-auth")
        .unwrap();
    assert_eq!(
        volume.secret.as_ref().unwrap().secret_name.as_deref(),
        Some("claudekey-redis")
    );
    let webhook: Deployment = one(&docs, "Deployment", "claudekey-webhook");
    let a = args(&pod(&webhook).containers[0]);
    assert!(a.contains(&format!("--sidecar-redis-url={url}")), "{a:?}");
    // The webhook never holds the Redis password: it is not mounted there.
    assert!(
        pod(&webhook)
            .volumes
            .iter()
            .flatten()
            .all(|v| v.name != "redis-auth")
    );
}

#[test]
fn the_charts_redis_admits_every_namespace_only_for_sidecars() {
    let from = |sets: &[&str]| {
        let mut sets = sets.to_vec();
        sets.push("networkPolicy.enabled=true");
        let docs = try_render("redis", &sets).unwrap();
        let np: NetworkPolicy = one(&docs, "NetworkPolicy", "claudekey-redis");
        np.spec.unwrap().ingress.unwrap()[0].from.clone()
    };
    assert!(
        from(&[]).is_none(),
        "redis.sidecars in ci/redis-values.yaml"
    );
    let gateway_only = from(&["redis.sidecars=false"]).expect("gateway pods only");
    assert!(gateway_only[0].pod_selector.is_some());
}

#[test]
fn redis_sidecars_need_a_redis_and_its_password() {
    for (sets, why) in [
        (
            vec!["redis.deploy=false", "redis.url="],
            "redis.sidecars needs a Redis",
        ),
        (
            vec!["redis.existingSecret="],
            "redis.sidecars needs redis.existingSecret",
        ),
    ] {
        let err = try_render("redis", &sets).expect_err(why);
        assert!(err.contains(why), "{err}");
    }
    let docs = try_render("redis", &["redis.sidecars=false"]).unwrap();
    let webhook: Deployment = one(&docs, "Deployment", "claudekey-webhook");
    assert!(
        !args(&pod(&webhook).containers[0])
            .iter()
            .any(|a| a.starts_with("--sidecar-redis-url"))
    );
}
