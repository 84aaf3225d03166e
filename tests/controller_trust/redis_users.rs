//! Shared limits of namespace-placement sidecars (DESIGN.md §12) against the real control plane
//! and a real redis-server that requires a password: the controller writes the namespace's Redis
//! password into the `-proxy` Secret (never the `-client` one), defines that user in Redis, and
//! prints neither password.

use std::time::Duration;

use claudekey::crd::ClaudeKey;
use claudekey::shared_counters::{self, RedisSettings};
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, api::DeleteParams};
use secrecy::SecretString;
use serde_json::json;

use crate::redis_server::RedisServer;
use crate::{apply_ref, cluster_wide, serial, unique};
use crate::{controller_support::*, support};

const ADMIN_PASSWORD: &str = "platform-admin-password-for-redis";
const WAIT: Duration = Duration::from_secs(60);

/// A connection that answered PING as the user and password in `url`.
async fn connect_as_url(url: &str) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
    let mut conn = redis::Client::open(url)?
        .get_multiplexed_async_connection()
        .await?;
    redis::cmd("PING").query_async::<String>(&mut conn).await?;
    Ok(conn)
}

#[tokio::test]
async fn namespace_sidecars_get_a_redis_user_of_their_own() {
    let _one = serial().await;
    let (client, operator) = setup("ck-trust-redis").await;
    let team = support::namespace(&client, "ck-trust-rteam").await;
    let redis = RedisServer::start(Some(ADMIN_PASSWORD));
    let source = unique("redis");
    put_upstream(&client, &operator, &source, &upstream_key()).await;
    let allowing = |namespace: &str| {
        json!({ "kubernetesSecret": { "name": &source }, "placement": "namespace",
                "allowedNamespaces": { "names": [namespace] } })
    };
    apply_cluster_source(&client, &source, allowing(&team)).await;
    let mut config = cluster_wide(&operator, None);
    config.redis = Some(RedisSettings {
        url: SecretString::from(redis.url_without_password()),
        username: None,
        password: Some(SecretString::from(ADMIN_PASSWORD.to_string())),
        timeout: Duration::from_secs(2),
    });
    // A user an earlier controller defined for a namespace that has no such ClaudeKey now.
    let leftover = shared_counters::namespace_user(&unique("ck-trust-gone"));
    let mut admin = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    redis::cmd("ACL")
        .arg("SETUSER")
        .arg(&leftover)
        .arg("on")
        .arg(">left-behind-password")
        .query_async::<()>(&mut admin)
        .await
        .unwrap();
    let controller = start(&client, config);
    apply_ref(&client, &team, "bot", "ClusterClaudeKeySource", &source).await;
    wait_claudekey(&client, &team, "bot", "Ready", is_ready).await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &team);
    let entry = shared_counters::SIDECAR_PASSWORD_ENTRY;
    let proxy = secrets.get("bot-proxy").await.unwrap();
    let password = String::from_utf8(proxy.data.unwrap()[entry].0.clone()).unwrap();
    assert_eq!(password.len(), 64);
    let client_secret = secrets.get("bot-client").await.unwrap();
    assert!(!client_secret.data.unwrap().contains_key(entry));

    // The user works with that password, for this namespace's counters only.
    let user = shared_counters::namespace_user(&team);
    let url = format!("redis://{user}:{password}@127.0.0.1:{}/", redis.port);
    let mut conn = support::eventually(WAIT, "the namespace's Redis user", || async {
        connect_as_url(&url).await.ok()
    })
    .await;
    let other = format!("{}:rate", shared_counters::key_prefix("other-ns", "bot"));
    let refused = redis::cmd("HSET")
        .arg(&other)
        .arg("tat")
        .arg(0)
        .query_async::<i64>(&mut conn)
        .await
        .unwrap_err();
    assert_eq!(
        refused.kind(),
        redis::ErrorKind::Server(redis::ServerErrorKind::NoPerm)
    );

    // Once every ClaudeKey is decided, the leftover goes; the namespace's own user stays.
    let user_list = || {
        let mut admin = admin.clone();
        async move {
            redis::cmd("ACL")
                .arg("USERS")
                .query_async::<Vec<String>>(&mut admin)
                .await
                .unwrap()
        }
    };
    support::eventually(WAIT, "the leftover Redis user deleted", || async {
        (!user_list().await.contains(&leftover)).then_some(())
    })
    .await;
    assert!(user_list().await.contains(&user));
    // Access ends with the grant, within the resync period (30 s): the source's or the
    // deletion's watch event triggers the pass. First the namespace taken off the source...
    let prompt = Duration::from_secs(15);
    let user_gone = |what: &'static str| {
        let (user_list, user) = (&user_list, &user);
        support::eventually(prompt, what, move || async move {
            (!user_list().await.contains(user)).then_some(())
        })
    };
    apply_cluster_source(&client, &source, allowing("someone-else")).await;
    user_gone("the revoked namespace's Redis user deleted").await;
    // ...then given back (the user comes back), then its last such ClaudeKey deleted.
    apply_cluster_source(&client, &source, allowing(&team)).await;
    support::eventually(prompt, "the namespace's Redis user again", || async {
        connect_as_url(&url).await.ok()
    })
    .await;
    let claudekeys: Api<ClaudeKey> = Api::namespaced(client.clone(), &team);
    claudekeys
        .delete("bot", &DeleteParams::default())
        .await
        .unwrap();
    user_gone("the namespace's Redis user deleted").await;
    assert!(
        connect_as_url(&url).await.is_err(),
        "the deleted user's password still works"
    );
    controller.stop().await;
    let logs = logs();
    for secret in [password.as_str(), ADMIN_PASSWORD] {
        assert!(!logs.contains(secret), "a Redis password was logged");
    }
}
