//! Unit tests of the plan: given an observation, what is written, deleted and refused. Each
//! reads "given this observation, the plan is this", with no cluster.

use std::time::Duration;

use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};

use super::*;
use crate::backend::UpstreamKey;
use crate::controller::ledger::LEDGER_ANNOTATION;
use crate::crd::{ClaudeKeyStatus, Placement, SourceSpec};

const UPSTREAM: &str = "sk-ant-api03-plan-test-upstream-key-AA";
const OPERATOR_NS: &str = "claudekey-system";

fn now() -> DateTime<Utc> {
    "2026-12-01T10:00:00Z".parse().unwrap()
}

fn claudekey() -> ClaudeKey {
    let mut ck: ClaudeKey = serde_yaml::from_str(
        "apiVersion: claudekey.io/v1alpha2\nkind: ClaudeKey\nmetadata: { name: bot, namespace: team-a }\nspec:\n  sourceRef: { kind: ClusterClaudeKeySource, name: support }\n  rotation: { interval: 24h, gracePeriod: 15m }\n",
    )
    .unwrap();
    ck.metadata.uid = Some("u-1".into());
    ck
}

fn granted(placement: Placement) -> Resolution {
    let backend: SourceSpec =
        serde_yaml::from_str("{ kubernetesSecret: { name: anthropic-support } }").unwrap();
    Resolution::Granted(Box::new(Granted {
        description: "ClusterClaudeKeySource/support (kubernetes:anthropic-support)".into(),
        backend,
        placement,
        admin: None,
        cluster_source: Some("support".into()),
        federation: None,
        identity_token: None,
        federation_ready: None,
    }))
}

fn upstream() -> CachedKey {
    CachedKey {
        key: UpstreamKey {
            value: SecretString::from(UPSTREAM),
            version: "v1".into(),
        },
        synced_at: now(),
        refresh_in: Duration::from_secs(300),
    }
}

fn observation(resolution: Resolution) -> Observation {
    Observation {
        resolution,
        upstream: Some(upstream()),
        backend_error: None,
        client: None,
        proxy: None,
        gateway_config: None,
        earlier_pattern_lists: Vec::new(),
    }
}

struct Fixture {
    sealer: Sealer,
    gateway: GatewayEndpoint,
    shared_counters: bool,
}

impl Fixture {
    fn new() -> Self {
        Self {
            sealer: Sealer::from_bytes(&[3; 32]),
            gateway: GatewayEndpoint {
                url: "https://claudekey-gateway.claudekey-system.svc:8443".into(),
                ca: Some("-----BEGIN CERTIFICATE-----\nX\n-----END CERTIFICATE-----\n".into()),
            },
            shared_counters: false,
        }
    }

    fn plan(&self, ck: &ClaudeKey, observed: &Observation, candidate: &str) -> Plan {
        let settings = Settings {
            operator_namespace: OPERATOR_NS,
            gateway: &self.gateway,
            sealer: &self.sealer,
            consumer_restart_delay: Duration::from_secs(90),
            shared_counters: self.shared_counters,
            max_pattern_lists: 2,
        };
        plan(
            ck,
            observed,
            &settings,
            &SecretString::from(candidate.to_string()),
            now(),
        )
    }
}

fn issue(plan: &Plan) -> &Issue {
    match &plan.outcome {
        Outcome::Issue(issue) => issue,
        Outcome::Refused(retry) => panic!("refused ({retry:?}): {:?}", plan.conditions),
    }
}

fn ready_reason(plan: &Plan) -> &'static str {
    plan.conditions
        .iter()
        .find(|c| c.type_ == condition::READY)
        .map(|c| c.reason)
        .unwrap()
}

fn holds_upstream(secret: &Secret) -> bool {
    secret
        .data
        .iter()
        .flatten()
        .any(|(_, v)| String::from_utf8_lossy(&v.0).contains(UPSTREAM))
}

const KEY_1: &str = "ck_live_00000000000000000000000000000000000000001";
const KEY_2: &str = "ck_live_00000000000000000000000000000000000000002";

#[test]
fn gateway_placement_writes_the_upstream_key_only_in_the_operator_namespace() {
    let f = Fixture::new();
    let plan = f.plan(
        &claudekey(),
        &observation(granted(Placement::Gateway)),
        KEY_1,
    );
    let issue = issue(&plan);
    let [client, config] = &issue.writes[..] else {
        panic!("two writes")
    };
    assert_eq!(client.name_any(), "bot-client");
    assert_eq!(client.namespace().as_deref(), Some("team-a"));
    assert!(!holds_upstream(client));
    assert!(client.data.as_ref().unwrap().contains_key("ca.crt"));
    assert_eq!(config.namespace().as_deref(), Some(OPERATOR_NS));
    assert!(holds_upstream(config));
    assert_eq!(plan.placement, Some(Placement::Gateway));
    // Both are signed for this ClaudeKey, and the config names it by uid for the orphan sweep.
    assert!(f.sealer.verify("u-1", client) && f.sealer.verify("u-1", config));
    assert_eq!(config.annotations()["claudekey.io/claudekey-uid"], "u-1");
}

/// With shared limits, a namespace-placement `-proxy` Secret carries its namespace's Redis
/// password (and nothing else new); a gateway config never does, nor any `-client` Secret.
#[test]
fn namespace_sidecars_get_their_namespace_redis_password() {
    let mut f = Fixture::new();
    let entry = crate::shared_counters::SIDECAR_PASSWORD_ENTRY;
    let has_entry = |s: &Secret| s.data.as_ref().unwrap().contains_key(entry);
    let plan = f.plan(
        &claudekey(),
        &observation(granted(Placement::Namespace)),
        KEY_1,
    );
    assert!(!issue(&plan).writes.iter().any(has_entry), "off by default");
    f.shared_counters = true;
    let plan = f.plan(
        &claudekey(),
        &observation(granted(Placement::Namespace)),
        KEY_1,
    );
    let [client, proxy] = &issue(&plan).writes[..] else {
        panic!("two writes")
    };
    assert!(!has_entry(client));
    let password = &proxy.data.as_ref().unwrap()[entry].0;
    assert_eq!(password, f.sealer.redis_password("team-a").as_bytes());
    assert!(f.sealer.verify("u-1", proxy));
    let plan = f.plan(
        &claudekey(),
        &observation(granted(Placement::Gateway)),
        KEY_1,
    );
    assert!(!issue(&plan).writes.iter().any(has_entry));
}

#[test]
fn a_refused_source_removes_every_upstream_key_written_for_the_namespace() {
    let f = Fixture::new();
    let ck = claudekey();
    let before = f.plan(&ck, &observation(granted(Placement::Namespace)), KEY_1);
    let [client, proxy] = issue(&before).writes.clone().try_into().unwrap();
    let mut observed = observation(Resolution::Refused {
        reason: reason::SOURCE_NOT_ALLOWED,
        message: "ClusterClaudeKeySource support does not allow namespace team-a".into(),
    });
    observed.upstream = None;
    observed.client = Some(client);
    observed.proxy = Some(proxy);
    let plan = f.plan(&ck, &observed, KEY_2);
    assert!(matches!(plan.outcome, Outcome::Refused(Retry::Slow)));
    assert_eq!(ready_reason(&plan), reason::SOURCE_NOT_ALLOWED);
    assert_eq!(
        plan.deletes,
        [SecretRef {
            namespace: "team-a".into(),
            name: "bot-proxy".into()
        }]
    );
    assert_eq!(plan.events[0].reason, reason::SOURCE_NOT_ALLOWED);
    assert!(plan.used.is_empty(), "it uses no upstream key any more");
}

#[test]
fn an_unlabelled_operator_secret_is_refused_and_removed() {
    let f = Fixture::new();
    let mut observed = observation(granted(Placement::Gateway));
    let first = f.plan(&claudekey(), &observed, KEY_1);
    observed.gateway_config = Some(issue(&first).writes[1].clone());
    observed.upstream = None;
    observed.backend_error = Some(crate::backend::BackendError::NotAnUpstreamKey {
        source_name: "Secret claudekey-system/anthropic-admin".into(),
    });
    let plan = f.plan(&claudekey(), &observed, KEY_2);
    assert_eq!(ready_reason(&plan), reason::UPSTREAM_KEY_LABEL_MISSING);
    assert_eq!(plan.deletes.len(), 1);
    assert_eq!(plan.deletes[0].namespace, OPERATOR_NS);
}

#[test]
fn a_forged_workload_key_hash_never_reaches_the_proxy() {
    let f = Fixture::new();
    let ck = claudekey();
    let mut observed = observation(granted(Placement::Gateway));
    let first = f.plan(&ck, &observed, KEY_1);
    let [client, config] = issue(&first).writes.clone().try_into().unwrap();
    // The namespace team edits the ledger on its -client Secret: a backdoor hash.
    let mut forged = client.clone();
    let annotations = forged.metadata.annotations.as_mut().unwrap();
    let backdoor = "ff".repeat(32);
    let ledger = annotations[LEDGER_ANNOTATION].replacen(
        "\"workloadKeys\":[",
        &format!("\"workloadKeys\":[{{\"sha256\":\"{backdoor}\",\"fingerprint\":\"ck:ffffffff\",\"validUntil\":\"2099-01-01T00:00:00Z\"}},"),
        1,
    );
    annotations.insert(LEDGER_ANNOTATION.into(), ledger);
    observed.client = Some(forged);
    observed.gateway_config = Some(config);
    let plan = f.plan(&ck, &observed, KEY_2);
    let written = &issue(&plan).writes[1];
    let json = String::from_utf8(written.data.as_ref().unwrap()["proxy.json"].0.clone()).unwrap();
    assert!(!json.contains(&backdoor), "the forged hash is not accepted");
    assert!(
        plan.events
            .iter()
            .any(|e| e.reason == event::LEDGER_TAMPERED)
    );
    // The verified copy in the operator namespace still holds the real key: no rotation.
    assert_eq!(
        issue(&plan).decision.rotation,
        Some(decide::RotationReason::ClientLost)
    );
}

#[test]
fn consumers_are_rolled_once_per_workload_key() {
    let f = Fixture::new();
    let mut ck = claudekey();
    let first = f.plan(&ck, &observation(granted(Placement::Namespace)), KEY_1);
    let (fingerprint, _) = issue(&first).consumers.clone().expect("first key: roll");
    ck.status = Some(ClaudeKeyStatus {
        consumers_restarted_for: Some(fingerprint),
        ..Default::default()
    });
    let mut observed = observation(granted(Placement::Namespace));
    let [client, proxy] = issue(&first).writes.clone().try_into().unwrap();
    observed.client = Some(client);
    observed.proxy = Some(proxy);
    let steady = f.plan(&ck, &observed, KEY_2);
    assert_eq!(issue(&steady).decision.rotation, None);
    assert_eq!(issue(&steady).consumers, None, "no LIST in a steady state");
}

#[test]
fn switching_placement_deletes_the_other_config() {
    let f = Fixture::new();
    let ck = claudekey();
    let first = f.plan(&ck, &observation(granted(Placement::Namespace)), KEY_1);
    let mut observed = observation(granted(Placement::Gateway));
    let [client, proxy] = issue(&first).writes.clone().try_into().unwrap();
    observed.client = Some(client);
    observed.proxy = Some(proxy);
    let plan = f.plan(&ck, &observed, KEY_2);
    assert_eq!(issue(&plan).decision.rotation, None, "same workload key");
    assert_eq!(plan.deletes[0].name, "bot-proxy");
    assert_eq!(
        issue(&plan).writes[1].namespace().as_deref(),
        Some(OPERATOR_NS)
    );
}

#[test]
fn nothing_in_a_plan_prints_a_key() {
    let f = Fixture::new();
    let plan = f.plan(
        &claudekey(),
        &observation(granted(Placement::Gateway)),
        KEY_1,
    );
    let text = format!("{:?} {:?}", plan.events, plan.conditions);
    assert!(!text.contains(UPSTREAM) && !text.contains(KEY_1));
    assert!(!format!("{:?}", issue(&plan).decision).contains(UPSTREAM));
    let _ = upstream().key.value.expose_secret();
}

fn federated(placement: Placement) -> Resolution {
    let Resolution::Granted(mut g) = granted(placement) else {
        unreachable!()
    };
    g.federation = Some(crate::proxyconf::FederationConfig {
        source: "support".into(),
        organization_id: "0f1e2d3c-aaaa-bbbb-cccc-000000000001".into(),
        service_account_id: "svac_01".into(),
        federation_rule_id: "fdrl_01".into(),
        workspace_id: None,
        audience: "https://api.anthropic.com".into(),
    });
    g.identity_token = Some(crate::crd::IdentityTokenStatus {
        audience: "https://api.anthropic.com".into(),
        expiration_seconds: 3600,
    });
    Resolution::Granted(g)
}

fn written_config(secret: &Secret) -> crate::proxyconf::ProxyConfig {
    let raw = &secret.data.as_ref().unwrap()[crate::proxyconf::FILE_NAME].0;
    serde_json::from_slice(raw).unwrap()
}

#[test]
fn a_federation_source_issues_workload_keys_and_writes_no_upstream_key() {
    let f = Fixture::new();
    for placement in [Placement::Gateway, Placement::Namespace] {
        let observed = Observation {
            upstream: None,
            ..observation(federated(placement))
        };
        let plan = f.plan(&claudekey(), &observed, KEY_1);
        let issue = issue(&plan);
        assert_eq!(ready_reason(&plan), reason::KEYS_ISSUED, "{placement:?}");
        let [client, config] = &issue.writes[..] else {
            panic!("two writes")
        };
        assert!(
            client
                .data
                .as_ref()
                .unwrap()
                .contains_key(crate::controller::secrets::API_KEY_ENTRY)
        );
        let written = written_config(config);
        assert!(written.upstream.is_empty());
        assert_eq!(
            written
                .federation
                .as_ref()
                .map(|f| f.federation_rule_id.as_str()),
            Some("fdrl_01")
        );
        assert_eq!(written.workload_keys.len(), 1);
        assert!(issue.decision.ledger.upstream_keys.is_empty());
        assert!(issue.source_key.is_none() && issue.backend_error.is_none());
        assert!(plan.used.is_empty());
        // Only a namespace-placed sidecar exchanges a projected token; the gateway its own.
        assert_eq!(
            plan.identity_token.is_some(),
            placement == Placement::Namespace
        );
    }
}

#[test]
fn switching_a_source_to_federation_drops_the_old_upstream_key_at_once() {
    let f = Fixture::new();
    let first = f.plan(
        &claudekey(),
        &observation(granted(Placement::Namespace)),
        KEY_1,
    );
    let [client, proxy] = &issue(&first).writes[..] else {
        panic!("two writes")
    };
    assert!(holds_upstream(proxy));
    let observed = Observation {
        upstream: None,
        client: Some(client.clone()),
        proxy: Some(proxy.clone()),
        ..observation(federated(Placement::Namespace))
    };
    let plan = f.plan(&claudekey(), &observed, KEY_2);
    let issue = issue(&plan);
    let proxy = &issue.writes[1];
    assert!(
        !holds_upstream(proxy),
        "no grace for a key the source no longer has"
    );
    assert!(written_config(proxy).federation.is_some());
    // The workload key is kept: nothing about the app changes.
    assert!(issue.decision.rotation.is_none());
}

/// A ClaudeKey whose custom patterns would be its namespace's third distinct list (the fixture
/// allows two) is refused, writes nothing and is polled again; one sharing an older list is not.
#[test]
fn a_pattern_list_past_the_namespaces_places_is_refused_and_writes_nothing() {
    let f = Fixture::new();
    let mut ck = claudekey();
    ck.spec = serde_yaml::from_str(
        "sourceRef: { kind: ClusterClaudeKeySource, name: support }\nrotation: { interval: 24h, gracePeriod: 15m }\ndataProtection: { customPatterns: [{ name: emp, regex: 'EMP-[0-9]{6}' }] }",
    )
    .unwrap();
    let own = super::decide::pattern_list(&ck.spec).unwrap();
    let mut observed = observation(granted(Placement::Gateway));
    observed.earlier_pattern_lists = vec!["[[],[\"a\"]]".into(), "[[],[\"b\"]]".into()];
    let plan = f.plan(&ck, &observed, KEY_1);
    assert!(matches!(plan.outcome, Outcome::Refused(Retry::Slow)));
    assert_eq!(ready_reason(&plan), reason::PATTERN_LISTS_EXCEEDED);
    assert_eq!(plan.events[0].reason, reason::PATTERN_LISTS_EXCEEDED);
    assert!(plan.events[0].warning);
    assert!(plan.deletes.is_empty(), "what was issued before stays");
    assert!(plan.waits_for_a_place());
    observed.earlier_pattern_lists[1] = own;
    let plan = f.plan(&ck, &observed, KEY_1);
    assert!(!plan.waits_for_a_place());
    issue(&plan);
}
