//! Credit leased from the shared counters (`limits::lease`): far from its limits a proxy admits
//! from credit, without a round trip; the proxies together still never pass a limit, and credit
//! left unused goes back to Redis when its lease ends, so nothing is lost to it.

use std::{
    future::Future,
    time::{Duration, Instant},
};

use claudekey::{
    crd::LimitsSpec,
    fake_upstream::FakeUpstream,
    proxy::{
        Mode,
        limits::{
            Grant, LEAST_UNITS, LimitSettings, LimitsMetrics, RedisSettings, Wants,
            budget::Budgets,
            shared::{AdmitCall, Keys, SharedCounters},
        },
    },
    proxyconf::ClaudeKeyRef,
};
use secrecy::SecretString;
use serde_json::{Value, json};

use crate::{
    proxy_common::{redis_server::RedisServer, *},
    shared_limits::{Running, body, four, shared, start_proxy},
};

/// `per_proxy` requests through each proxy, `concurrency` at a time per proxy, all as end user
/// `user`; the statuses.
async fn load(proxies: &[Running], per_proxy: usize, concurrency: usize, user: &str) -> Vec<u16> {
    let client = client();
    let mut tasks = tokio::task::JoinSet::new();
    for proxy in proxies {
        for worker in 0..concurrency {
            let (client, url, key, user) =
                (client.clone(), proxy.url(), proxy.key(), user.to_string());
            let count = per_proxy / concurrency + usize::from(worker < per_proxy % concurrency);
            tasks.spawn(async move {
                let mut statuses = Vec::with_capacity(count);
                for _ in 0..count {
                    let body = body(false, &user, 16);
                    let r =
                        send(&client, &url, "POST", "/v1/messages", Some(key), Some(body)).await;
                    assert!(r.status < 500, "{}: {}", r.status, r.text());
                    statuses.push(r.status);
                }
                statuses
            });
        }
    }
    tasks.join_all().await.into_iter().flatten().collect()
}

/// EVALSHA calls Redis has counted (since start or `CONFIG RESETSTAT`).
pub(crate) async fn script_calls(redis: &RedisServer) -> u64 {
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .unwrap();
    stats
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
        .and_then(|rest| rest.split(',').next()?.parse().ok())
        .unwrap_or(0)
}

/// The benchmark's shape: every limit set, far above the load. After its first admission a
/// proxy admits from credit (refilled in the background at half), so 200 requests one at a
/// time cost a few admission calls and the merged settlements, not 200 round trips.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn far_from_its_limits_a_proxy_admits_from_credit() {
    let redis = RedisServer::start(None);
    let fake = FakeUpstream::start(&[UPSTREAM_A]).await.unwrap();
    let policy = json!({ "limits": { "requestsPerMinute": 1_000_000,
        "tokensPerMinute": 1_000_000_000u64, "perUserRequestsPerHour": 1_000_000 } });
    let proxy = start_proxy(Mode::Gateway, &fake, "far", &policy, shared(&redis, 86_400)).await;
    let proxies = std::slice::from_ref(&proxy);
    let before = script_calls(&redis).await;
    let statuses = load(proxies, 200, 1, "end-user").await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let calls = script_calls(&redis).await - before;
    eprintln!("leases: 200 requests one at a time cost {calls} script calls");
    // Settlements are merged per 20 ms; admissions are a handful of grants and refills.
    assert!(
        calls < 100,
        "{calls} script calls for 200 requests: admissions did not come from credit"
    );
    assert_eq!(proxy.metric("claudekey_proxy_limits_fallback "), Some(0.0));
}

/// requestsPerMinute 1200 across four proxies, 1,400 requests at once: credit is counted in
/// Redis like admissions, so the upstream sees at most 1200 (plus the refill, 20 a second). A
/// moment later (leases over, what was left given back) another load fills the window: all
/// the credit came back, none was lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leased_requests_never_pass_the_limit_and_unused_credit_comes_back() {
    let (rpm, per_second) = (1200usize, 20.0);
    let policy = json!({ "limits": { "requestsPerMinute": rpm } });
    let (admitted, elapsed) = fill_twice("rpm-lease", policy).await;
    let refill = |s: f64| (s * per_second).ceil() as usize;
    let (first, total) = admitted;
    assert!(
        first <= rpm + refill(elapsed.0),
        "{first} admitted in {:.1} s: over {rpm} + the refill",
        elapsed.0
    );
    // The pause alone refills 30; credit given back adds what the first load left unused.
    assert!(
        (rpm + 28..=rpm + refill(elapsed.1) + 2).contains(&total),
        "{total} admitted in {:.1} s, want {rpm} plus about 20 a second: credit was lost",
        elapsed.1
    );
}

/// perUserRequestsPerHour 1000 for one end user, who does not refill within the hour: one
/// request through the first proxy leaves it holding credit (31 units), which the others
/// cannot use while its lease lasts (10 s here, so the load ends within it even on a loaded
/// two-core machine, where 1,200 requests once took over 4 s); the lease
/// ends with no further request there, the credit goes back, and the window then admits
/// exactly its 1000, not 1000 less the credit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unused_credit_goes_back_when_its_lease_ends() {
    let redis = RedisServer::start(None);
    let fake = FakeUpstream::start(&[UPSTREAM_A]).await.unwrap();
    let policy = json!({ "limits": { "perUserRequestsPerHour": 1000 } });
    let proxies = four(&fake, "user-lease", policy, &leased_for(&redis, LONG_LEASE)).await;
    let ok = |statuses: Vec<u16>| statuses.iter().filter(|s| **s == 200).count();
    let started = Instant::now();
    let holder = ok(load(&proxies[..1], 1, 1, "end-user").await);
    let others = ok(load(&proxies[1..], 400, 8, "end-user").await);
    let took = started.elapsed();
    assert!(
        took < LONG_LEASE,
        "the load took {took:?}, longer than the lease it must end within"
    );
    assert!(
        holder + others < 1000,
        "{} admitted while the first proxy held credit: its credit was not counted",
        holder + others
    );
    tokio::time::sleep(LONG_LEASE + Duration::from_millis(500)).await;
    let after = ok(load(&proxies[1..], 40, 8, "end-user").await);
    let total = holder + others + after;
    eprintln!(
        "leases (user window): {holder} + {others} while credit was held ({took:?}), {after} after"
    );
    assert_eq!(
        total, 1000,
        "credit given back must fill the window exactly"
    );
    assert_eq!(fake.received().len(), total);
}

/// A proxy stopped as on SIGTERM (a rollout) gives back the credit it holds before it exits:
/// the user's hour admits exactly its 1000 through the others, as if it had never held any.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_proxy_gives_its_credit_back_before_it_exits() {
    let admitted = after_the_holder_ends("stopped-lease", |holder| async move {
        holder.stop().await;
    })
    .await;
    assert_eq!(
        admitted, 1000,
        "a proxy stopped gracefully must give back what it held"
    );
}

/// A proxy killed holding credit cannot give it back (docs/limits.md): the user's hour stays
/// that much fuller, and the others never pass the limit because of it. What is lost is one
/// grant at most: 1/32 of what the window had left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_proxy_loses_its_credit_and_the_others_never_pass_the_limit() {
    let admitted = after_the_holder_ends("killed-lease", |holder| async move {
        holder.crash().await;
    })
    .await;
    let most_lost = (1000 - 1) / 32;
    assert!(
        (1000 - most_lost..1000).contains(&admitted),
        "{admitted} admitted: a killed proxy's credit is counted, at most {most_lost} of it"
    );
}

/// perUserRequestsPerHour 1000 for one end user: one request through a holder (credit leased
/// for [`HOLDER_LEASE`]), the holder ended by `end`, then the other three proxies load the
/// window until it is full, past the end of every lease; the requests admitted in all.
async fn after_the_holder_ends<F: Future<Output = ()>>(
    name: &str,
    end: impl FnOnce(Running) -> F,
) -> usize {
    let redis = RedisServer::start(None);
    let fake = FakeUpstream::start(&[UPSTREAM_A]).await.unwrap();
    let policy = json!({ "limits": { "perUserRequestsPerHour": 1000 } });
    let holding = leased_for(&redis, HOLDER_LEASE);
    let holder = start_proxy(Mode::Gateway, &fake, name, &policy, holding).await;
    let mut others = Vec::new();
    for mode in [Mode::Gateway, Mode::Sidecar, Mode::Sidecar] {
        others.push(start_proxy(mode, &fake, name, &policy, shared(&redis, 86_400)).await);
    }
    let ok = |statuses: Vec<u16>| statuses.iter().filter(|s| **s == 200).count();
    let held = ok(load(std::slice::from_ref(&holder), 1, 1, "end-user").await);
    assert_eq!(held, 1);
    assert!(
        holder.metric("claudekey_proxy_limits_fallback ") == Some(0.0),
        "the holder must have been admitted by Redis"
    );
    end(holder).await;
    let during = ok(load(&others, 400, 8, "end-user").await);
    // Every lease is over (the holder's too, had it survived) and its rest given back.
    tokio::time::sleep(HOLDER_LEASE + LEASE_END).await;
    let after = ok(load(&others, 40, 8, "end-user").await);
    let admitted = held + during + after;
    eprintln!("leases ({name}): 1 through the holder, {during} after it ended, {after} later");
    assert_eq!(fake.received().len(), admitted);
    admitted
}

/// The holder's lease in `after_the_holder_ends`: long enough that a stop or a crash comes
/// well within it.
const HOLDER_LEASE: Duration = Duration::from_secs(3);

const LONG_LEASE: Duration = Duration::from_secs(10);

/// Shared limits in `redis` whose credit lasts `ttl` instead of `LEASE_TTL`.
fn leased_for(redis: &RedisServer, ttl: Duration) -> LimitSettings {
    LimitSettings {
        lease_ttl: ttl,
        ..shared(redis, 86_400)
    }
}

/// Longer than a lease (`limits::lease::LEASE_TTL`, 1 s) and its give-back.
const LEASE_END: Duration = Duration::from_millis(1500);

/// Two loads of 350 requests per proxy (8 at a time each) with 1.5 s between them (every
/// lease ends, its rest is given back); (admitted by the first, by both) and (seconds to the
/// end of the first, of the second).
async fn fill_twice(name: &str, policy: Value) -> ((usize, usize), (f64, f64)) {
    let redis = RedisServer::start(None);
    let fake = FakeUpstream::start(&[UPSTREAM_A]).await.unwrap();
    let proxies = four(&fake, name, policy, &shared(&redis, 86_400)).await;
    let start = Instant::now();
    let first = load(&proxies, 350, 8, "end-user").await;
    let first_elapsed = start.elapsed().as_secs_f64();
    let ok = |statuses: &[u16]| statuses.iter().filter(|s| **s == 200).count();
    let first = ok(&first);
    tokio::time::sleep(LEASE_END).await;
    let second = ok(&load(&proxies, 350, 8, "end-user").await);
    let elapsed = start.elapsed().as_secs_f64();
    assert_eq!(fake.received().len(), first + second);
    eprintln!(
        "leases ({name}): first load {first} admitted in {first_elapsed:.2} s, both {} in {elapsed:.2} s",
        first + second
    );
    for p in &proxies {
        assert_eq!(p.metric("claudekey_proxy_limits_fallback "), Some(0.0));
    }
    ((first, first + second), (first_elapsed, elapsed))
}

/// What one call of the admission script grants a proxy whose want has grown to 1,024 units
/// (`limits::lease`): at most 1/32 of what is left, at least `LEAST_UNITS` units of each kind
/// or nothing. A big want still gets credit from a window with less than 32 times it left
/// (the grant is what the window can spare), and near a limit none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grown_want_gets_what_the_window_can_spare_and_nothing_near_a_limit() {
    let redis = RedisServer::start(None);
    let counters = SharedCounters::new(
        &RedisSettings {
            url: SecretString::from(redis.url()),
            username: None,
            password: None,
            timeout: Duration::from_secs(1),
        },
        LimitsMetrics::default(),
    )
    .unwrap();
    // The figures below assume grants of at least 8 units.
    const { assert!(LEAST_UNITS == 8) };
    let (want, reservation) = (1024, 100);
    let grant = |name: &'static str, rpm: u32, tpm: u64, per_hour: u32| {
        let counters = &counters;
        async move {
            let id = ClaudeKeyRef {
                namespace: "team".into(),
                name: name.into(),
            };
            let spec = LimitsSpec {
                requests_per_minute: Some(rpm),
                tokens_per_minute: Some(tpm),
                per_user_requests_per_hour: Some(per_hour),
                budget: None,
            };
            let users = [("0123abcd".to_string(), 1)];
            let call = AdmitCall {
                requests: 1,
                reserve: reservation,
                users: &users,
                wants: Wants {
                    requests: want,
                    tokens: want * reservation,
                    user_units: want,
                    token_unit: reservation,
                },
            };
            let budgets = Budgets::of(&spec);
            let admitted = counters
                .admit(&Keys::of(&id), &spec, &budgets, call, 86_400)
                .await
                .expect("redis answers")
                .expect("admitted");
            let Grant {
                requests, tokens, ..
            } = admitted.grant;
            (requests, tokens, admitted.grant.users[0].1)
        }
    };
    // Far from every limit: the whole want.
    let far = grant("far", 1_000_000, 1_000_000_000, 1_000_000).await;
    assert_eq!(far, (1024, 102_400, 1024));
    // 3,000 a minute, 200,000 tokens, 2,000 an hour: 1/32 of what is left, under an eighth
    // of the want (a rule of "an eighth of the want or nothing" would grant nothing here).
    let spare = grant("spare", 3_000, 200_000, 2_000).await;
    assert_eq!(spare, (93, (200_000 - 100) / 32, (2_000 - 1) / 32));
    // Less than 256 units (or 256 reservations) left: nothing.
    let near = grant("near", 60, 25_000, 255).await;
    assert_eq!(near, (0, 0, 0));
}
