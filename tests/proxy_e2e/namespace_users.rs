//! Shared limits of namespace-placement sidecars (DESIGN.md §12, `claudekey::shared_counters`):
//! the controller's Redis users, against a real redis-server that requires a password. A
//! sidecar counts together with a gateway through its namespace's user, and that user, in the
//! hands of a hostile namespace team, reaches nothing but its own namespace's counters.

use std::{sync::Arc, time::Duration};

use claudekey::{
    controller::redis_users::NamespaceUsers,
    fake_upstream::FakeUpstream,
    proxy::{Mode, limits::LimitSettings},
    shared_counters::{self, RedisSettings},
};
use ring::hmac;
use secrecy::SecretString;
use serde_json::json;

use crate::{
    proxy_common::{redis_server::RedisServer, *},
    shared_limits::{burst, start_proxy},
};

const ADMIN_PASSWORD: &str = "admin-password-of-the-platform";

fn password(namespace: &str) -> String {
    shared_counters::namespace_password(&hmac::Key::new(hmac::HMAC_SHA256, &[9; 32]), namespace)
}

/// Redis as `user` (`None`: the admin, Redis's `default` user).
fn settings(redis: &RedisServer, user: Option<&str>, password: &str) -> RedisSettings {
    RedisSettings {
        url: SecretString::from(redis.url_without_password()),
        username: user.map(str::to_owned),
        password: Some(SecretString::from(password.to_string())),
        timeout: Duration::from_secs(1),
    }
}

/// The controller's user task for `namespaces`, resyncing every `resync`.
fn controller_users(
    redis: &RedisServer,
    namespaces: &[&str],
    resync: Duration,
) -> Arc<NamespaceUsers> {
    let users = Arc::new(
        NamespaceUsers::new(&settings(redis, None, ADMIN_PASSWORD))
            .unwrap()
            .with_resync(resync),
    );
    for ns in namespaces {
        users.want(ns);
    }
    let running = users.clone();
    tokio::spawn(async move { running.run(password, None, |_| true).await });
    users
}

/// A connection as `user`; `Err` while the user does not exist (yet).
async fn connect_as(
    redis: &RedisServer,
    user: &str,
    password: &str,
) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
    let url = format!("redis://{user}:{password}@127.0.0.1:{}/", redis.port);
    let mut conn = redis::Client::open(url)?
        .get_multiplexed_async_connection()
        .await?;
    redis::cmd("PING").query_async::<String>(&mut conn).await?;
    Ok(conn)
}

async fn wait_for_user(redis: &RedisServer, namespace: &str) -> redis::aio::MultiplexedConnection {
    let user = shared_counters::namespace_user(namespace);
    for _ in 0..100 {
        if let Ok(conn) = connect_as(redis, &user, &password(namespace)).await {
            return conn;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the controller never defined Redis user {user}");
}

/// A gateway (Redis admin) and a sidecar of namespace team-a (its namespace user) serve one
/// ClaudeKey: they count one requestsPerMinute together, and the sidecar never falls back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_sidecar_counts_with_the_gateway() {
    let redis = RedisServer::start(Some(ADMIN_PASSWORD));
    let _users = controller_users(&redis, &["team-a"], Duration::from_secs(30));
    wait_for_user(&redis, "team-a").await;
    let fake = FakeUpstream::start(&[UPSTREAM_A]).await.unwrap();
    let policy = json!({ "limits": { "requestsPerMinute": 20 } });
    let limits = |user: Option<&str>, password: &str| LimitSettings {
        redis: Some(settings(&redis, user, password)),
        ..LimitSettings::default()
    };
    let proxies = vec![
        start_proxy(
            Mode::Gateway,
            &fake,
            "bot",
            &policy,
            limits(None, ADMIN_PASSWORD),
        )
        .await,
        start_proxy(
            Mode::Sidecar,
            &fake,
            "bot",
            &policy,
            limits(
                Some(&shared_counters::namespace_user("team-a")),
                &password("team-a"),
            ),
        )
        .await,
    ];
    let statuses = burst(&proxies, 20, "u", 16).await;
    for (p, what) in proxies.iter().zip(["gateway", "sidecar"]) {
        assert_eq!(
            p.metric("claudekey_proxy_limits_shared_errors_total "),
            Some(0.0),
            "the {what} failed to count in Redis"
        );
        assert_eq!(p.metric("claudekey_proxy_limits_fallback "), Some(0.0));
    }
    let upstream = fake.received().len();
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), upstream);
    assert!(
        (20..=23).contains(&upstream),
        "upstream saw {upstream}, want 20 (+ a refill or two): the two proxies counted apart"
    );
}

/// What a namespace team can do with the password it reads from its `-proxy` Secret: its own
/// counters, through the product's scripts; nothing of another namespace, no Lua of its own,
/// nothing of the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_user_reaches_only_its_own_counters() {
    let redis = RedisServer::start(Some(ADMIN_PASSWORD));
    let _users = controller_users(&redis, &["team-a", "team-b"], Duration::from_secs(30));
    let mut team_a = wait_for_user(&redis, "team-a").await;
    let own = format!("{}:rate", shared_counters::key_prefix("team-a", "bot"));
    let theirs = format!("{}:rate", shared_counters::key_prefix("team-b", "bot"));
    let lookalike = format!("{}:rate", shared_counters::key_prefix("team-ab", "bot"));
    let admit_sha = sha1(&shared_counters::admit_script());
    let admit_args = ["1", "0", "0", "0", "-1", "-1", "86400", "100"];
    let mut evalsha_theirs = vec![
        "EVALSHA", &admit_sha, "4", &theirs, &theirs, &theirs, &theirs,
    ];
    evalsha_theirs.extend(admit_args);
    let attempts: [&[&str]; 18] = [
        &["HSET", &theirs, "tat", "0"],
        &["HSET", &lookalike, "tat", "0"],
        &["DEL", &own],
        &["EVAL", "return 1", "0"],
        &["SCRIPT", "LOAD", "return redis.call('FLUSHALL')"],
        &["SCRIPT", "FLUSH"],
        &["FUNCTION", "LIST"],
        &["FLUSHALL"],
        &["KEYS", "*"],
        &["SCAN", "0"],
        &["CONFIG", "GET", "requirepass"],
        &["ACL", "LIST"],
        &["ACL", "SETUSER", "claudekey-ns-team-a", "+@all"],
        &["CLIENT", "LIST"],
        &["PUBLISH", "x", "y"],
        &["SHUTDOWN"],
        &["SWAPDB", "0", "1"],
        // The admission script by SHA, on another namespace's keys.
        &evalsha_theirs,
    ];
    let mut refused = Vec::new();
    for parts in attempts {
        let mut cmd = redis::cmd(parts[0]);
        for part in &parts[1..] {
            cmd.arg(*part);
        }
        match cmd.query_async::<redis::Value>(&mut team_a).await {
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoPerm) => {
                refused.push(parts[0])
            }
            other => panic!("{parts:?}: the namespace user got {other:?}, want NOPERM"),
        }
    }
    assert_eq!(refused.len(), 18);
    // Its own counters, through the product's admission script: allowed (by SHA only).
    let reply: Vec<i64> = redis::cmd("EVALSHA")
        .arg(&admit_sha)
        .arg(4)
        .arg(&own)
        .arg(format!(
            "{}:spend",
            shared_counters::key_prefix("team-a", "bot")
        ))
        .arg(format!(
            "{}:users",
            shared_counters::key_prefix("team-a", "bot")
        ))
        .arg(format!(
            "{}:user:overflow",
            shared_counters::key_prefix("team-a", "bot")
        ))
        .arg(&admit_args[..])
        .query_async(&mut team_a)
        .await
        .unwrap();
    assert_eq!(reply[0], 0, "admitted");
    // Another namespace's password is not team-a's.
    assert!(
        connect_as(&redis, "claudekey-ns-team-b", &password("team-a"))
            .await
            .is_err()
    );
    assert!(
        connect_as(&redis, "default", &password("team-a"))
            .await
            .is_err()
    );
}

/// A restarted Redis has no users and no scripts: the controller defines them again by itself
/// (until then the namespace's sidecars count their fallback share, as in any outage).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_and_scripts_come_back_after_a_redis_restart() {
    let mut redis = RedisServer::start(Some(ADMIN_PASSWORD));
    let _users = controller_users(&redis, &["team-a"], Duration::from_millis(500));
    wait_for_user(&redis, "team-a").await;
    redis.restart();
    let mut conn = wait_for_user(&redis, "team-a").await;
    let loaded: Vec<bool> = redis::cmd("SCRIPT")
        .arg("EXISTS")
        .arg(sha1(&shared_counters::admit_script()))
        .arg(sha1(&shared_counters::settle_script()))
        .query_async(&mut connect_as(&redis, "default", ADMIN_PASSWORD).await.unwrap())
        .await
        .unwrap();
    assert_eq!(loaded, [true, true]);
    let pong: String = redis::cmd("PING").query_async(&mut conn).await.unwrap();
    assert_eq!(pong, "PONG");
}

fn sha1(script: &str) -> String {
    redis::Script::new(script).get_hash().to_string()
}
