//! The middle of the reconcile (observe -> **plan** -> execute): from everything observed, decide
//! which Secrets to write and delete, which Events to raise, what status to show and which
//! consumers to roll. Pure: no I/O, no clock, no randomness; the candidate key and `now` come in.

use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use secrecy::{ExposeSecret, SecretString};

pub use super::apply::SecretRef;
use super::conditions::{self, Desired, event, reason};
use super::consumers;
use super::decide::{self, Decision, FetchedUpstream, KeyId, Observed, Triggers};
pub use super::in_use::UsedKey;
use super::seal::Sealer;
use super::secrets::{self, GatewayEndpoint, Recovered};
use super::source::{Granted, Resolution};
use crate::backend::{BackendError, cache::CachedKey};
use crate::crd::{
    ClaudeKey, IdentityTokenStatus, Placement, SourceKeyStatus, annotations, condition,
    gateway_config_secret_name, proxy_secret_name,
};
use crate::keys::{self, KeyKind};

/// Everything the reconcile read, before deciding anything.
pub struct Observation {
    pub resolution: Resolution,
    /// The upstream key, when the source was granted and its backend answered.
    pub upstream: Option<CachedKey>,
    pub backend_error: Option<BackendError>,
    pub client: Option<Secret>,
    /// `<name>-proxy` in the ClaudeKey's namespace (placement namespace).
    pub proxy: Option<Secret>,
    /// The config Secret in the operator namespace (placement gateway).
    pub gateway_config: Option<Secret>,
    /// When this ClaudeKey lists custom patterns: the distinct lists of the older ClaudeKeys of
    /// its namespace (`decide::earlier_pattern_lists`); empty otherwise.
    pub earlier_pattern_lists: Vec<String>,
}

/// What the plan needs besides the observation; none of it changes between reconciles.
pub struct Settings<'a> {
    pub operator_namespace: &'a str,
    pub gateway: &'a GatewayEndpoint,
    pub sealer: &'a Sealer,
    pub consumer_restart_delay: std::time::Duration,
    /// Namespace-placement sidecars share limits through Redis (`super::redis_users`).
    pub shared_counters: bool,
    /// Distinct custom-pattern lists a namespace may use (`decide::pattern_budget`).
    pub max_pattern_lists: usize,
}

/// An Event to record on the ClaudeKey.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedEvent {
    pub warning: bool,
    pub reason: &'static str,
    pub note: String,
}

/// How to come back when the plan could not issue keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Retry {
    /// A person must change the spec; watches bring the ClaudeKey back.
    AwaitChange,
    /// Transient: back off.
    Backoff,
    /// Not allowed now; watches on sources and namespaces bring it back, and a slow poll
    /// covers anything they miss.
    Slow,
}

/// Keys issued: everything to write for them.
pub struct Issue {
    pub decision: Decision,
    /// The raw workload key in `-client` (the candidate when the decision rotated).
    pub writes: Vec<Secret>,
    pub had_ledger: bool,
    /// Roll gateway consumers for this fingerprint, not before this time.
    pub consumers: Option<(String, DateTime<Utc>)>,
    /// The cluster source's current key, for its status (and retirement bookkeeping).
    pub source_key: Option<(String, SourceKeyStatus)>,
    pub backend_error: Option<String>,
}

pub enum Outcome {
    Issue(Box<Issue>),
    Refused(Retry),
}

/// The plan of one reconcile.
pub struct Plan {
    pub outcome: Outcome,
    pub deletes: Vec<SecretRef>,
    pub events: Vec<PlannedEvent>,
    pub conditions: Vec<Desired>,
    pub source: String,
    pub placement: Option<Placement>,
    /// The projected token a sidecar needs (federation, placement namespace).
    pub identity_token: Option<IdentityTokenStatus>,
    pub used: Vec<UsedKey>,
}

impl Plan {
    /// Whether it refuses the ClaudeKey a place in its namespace's pattern-list budget: it is
    /// looked at again when another ClaudeKey there changes (`super::place_waits`).
    pub fn waits_for_a_place(&self) -> bool {
        self.conditions
            .iter()
            .any(|c| c.reason == reason::PATTERN_LISTS_EXCEEDED)
    }
}

/// Decides a reconcile. `candidate` is a fresh workload key used only if a rotation is due.
pub fn plan(
    ck: &ClaudeKey,
    observed: &Observation,
    settings: &Settings<'_>,
    candidate: &SecretString,
    now: DateTime<Utc>,
) -> Plan {
    let uid = ck.uid().unwrap_or_default();
    let source_description = match &observed.resolution {
        Resolution::Granted(g) => g.description.clone(),
        Resolution::Refused { .. } => {
            format!("{:?}/{}", ck.spec.source_ref.kind, ck.spec.source_ref.name)
        }
    };
    let refuse = |reason, message: String, retry, deletes, used| Plan {
        outcome: Outcome::Refused(retry),
        deletes,
        events: vec![PlannedEvent {
            warning: true,
            reason,
            note: message.clone(),
        }],
        conditions: conditions::failed(reason, &message),
        source: source_description.clone(),
        placement: None,
        identity_token: None,
        used,
    };
    if let Some(message) = foreign_secret(ck, observed, settings.operator_namespace) {
        return refuse(
            reason::SECRET_CONFLICT,
            message,
            Retry::Backoff,
            vec![],
            vec![],
        );
    }
    let keys_out = || upstream_holders(ck, observed, settings.operator_namespace);
    let granted = match &observed.resolution {
        Resolution::Refused { reason, message } => {
            return refuse(reason, message.clone(), Retry::Slow, keys_out(), vec![]);
        }
        Resolution::Granted(granted) => granted,
    };
    if let Some(BackendError::NotAnUpstreamKey { .. }) = &observed.backend_error {
        let message = observed.backend_error.as_ref().map(|e| e.to_string());
        let message = message.unwrap_or_default();
        return refuse(
            reason::UPSTREAM_KEY_LABEL_MISSING,
            message,
            Retry::Slow,
            keys_out(),
            vec![],
        );
    }
    let recovered = recover(observed, settings.sealer, &uid);
    let used_before = used_keys(recovered.ledger.as_ref());
    if let Err(message) = decide::validate(&ck.spec) {
        let mut plan = refuse(
            reason::INVALID_SPEC,
            message,
            Retry::AwaitChange,
            vec![],
            used_before,
        );
        plan.events[0].reason = event::INVALID_SPEC;
        return plan;
    }
    let namespace = ck.namespace().unwrap_or_default();
    let earlier = &observed.earlier_pattern_lists;
    let max = settings.max_pattern_lists;
    if let Err(message) = decide::pattern_budget(&ck.spec, earlier, max, &namespace) {
        // What was issued before stays (as for an invalid spec); a freed place is noticed when
        // another ClaudeKey of the namespace changes (`super::place_waits`), or by the slow poll.
        return refuse(
            reason::PATTERN_LISTS_EXCEEDED,
            message,
            Retry::Slow,
            vec![],
            used_before,
        );
    }
    let backend_error = observed.backend_error.as_ref().map(|e| e.to_string());
    let mut events = tamper_events(&recovered);
    let federated = granted.federation.is_some();
    let upstream = observed.upstream.as_ref();
    let decision = match decide_next(ck, &recovered, upstream, federated, candidate, now) {
        Ok(decision) => decision,
        Err(_) => {
            let message =
                backend_error.unwrap_or_else(|| "no upstream key has been synced yet".to_string());
            let mut plan = refuse(
                reason::BACKEND_ERROR,
                message,
                Retry::Backoff,
                vec![],
                used_before,
            );
            plan.events.splice(0..0, events);
            return plan;
        }
    };
    let workload_key = match (decision.rotation, &recovered.client_key) {
        (None, Some(key)) => key,
        _ => candidate,
    };
    let mut values = recovered.upstream_values.clone();
    if let Some(c) = &observed.upstream {
        let value = c.key.value.clone();
        values.insert(keys::sha256_hex(value.expose_secret()), value);
    }
    let salt = settings.sealer.audit_salt(&namespace, &ck.name_any());
    let federation = granted.federation.as_ref();
    let config = match secrets::render_config(ck, &decision.ledger, &values, federation, salt) {
        Ok(config) => config,
        Err(missing) => {
            let message = backend_error.unwrap_or_else(|| missing.to_string());
            return refuse(
                reason::BACKEND_ERROR,
                message,
                Retry::Backoff,
                vec![],
                used_before,
            );
        }
    };
    let placement = granted.placement;
    let mut client = secrets::build_client(
        ck,
        workload_key,
        settings.gateway,
        placement,
        &decision.ledger,
    );
    let mut config_secret = match placement {
        Placement::Gateway => secrets::build_gateway_config(
            ck,
            settings.operator_namespace,
            &config,
            &decision.ledger,
        ),
        Placement::Namespace => {
            let redis_password = settings
                .shared_counters
                .then(|| settings.sealer.redis_password(&namespace));
            secrets::build_proxy(ck, &config, redis_password.as_deref(), &decision.ledger)
        }
    };
    settings.sealer.seal(&uid, &mut client);
    settings.sealer.seal(&uid, &mut config_secret);
    let deletes = other_placement(ck, observed, placement, settings.operator_namespace);
    let fingerprint = decision
        .ledger
        .current_workload()
        .map(|c| c.fingerprint.clone())
        .unwrap_or_default();
    let rolled_for = ck
        .status
        .as_ref()
        .and_then(|s| s.consumers_restarted_for.as_deref());
    let consumers = (rolled_for != Some(fingerprint.as_str())).then(|| {
        let at = consumers::restart_at(&decision.ledger, settings.consumer_restart_delay);
        (fingerprint.clone(), at)
    });
    let source_key = source_key(granted, observed.upstream.as_ref());
    let mut conditions = healthy_conditions(&decision, backend_error.as_deref());
    conditions.extend(granted.federation_ready.clone());
    if let Some(message) = &backend_error {
        events.push(PlannedEvent {
            warning: true,
            reason: event::BACKEND_ERROR,
            note: message.clone(),
        });
    }
    let used = used_keys(Some(&decision.ledger));
    Plan {
        outcome: Outcome::Issue(Box::new(Issue {
            decision,
            writes: vec![client, config_secret],
            had_ledger: recovered.ledger.is_some(),
            consumers,
            source_key,
            backend_error,
        })),
        deletes,
        events,
        conditions,
        source: source_description,
        placement: Some(placement),
        identity_token: granted
            .identity_token
            .clone()
            .filter(|_| placement == Placement::Namespace),
        used,
    }
}

/// The name of a Secret this ClaudeKey would write that someone else owns.
fn foreign_secret(ck: &ClaudeKey, observed: &Observation, operator_ns: &str) -> Option<String> {
    let namespace = ck.namespace().unwrap_or_default();
    let ours = format!("{namespace}/{}", ck.name_any());
    let foreign_here = [&observed.client, &observed.proxy]
        .into_iter()
        .flatten()
        .find(|s| !secrets::controlled_by(s, ck))
        .map(|s| format!("{namespace}/{}", s.name_any()));
    let foreign_there = observed
        .gateway_config
        .as_ref()
        .filter(|s| s.annotations().get(annotations::CLAUDEKEY_ANNOTATION) != Some(&ours))
        .map(|s| format!("{operator_ns}/{}", s.name_any()));
    foreign_here.or(foreign_there).map(|s| {
        format!("Secret {s} exists and is not owned by this ClaudeKey; delete or rename it")
    })
}

/// Every Secret this ClaudeKey wrote that holds an upstream key.
fn upstream_holders(ck: &ClaudeKey, observed: &Observation, operator_ns: &str) -> Vec<SecretRef> {
    let namespace = ck.namespace().unwrap_or_default();
    let mut out = Vec::new();
    if observed.proxy.is_some() {
        out.push(SecretRef {
            namespace,
            name: proxy_secret_name(&ck.name_any()),
        });
    }
    if observed.gateway_config.is_some() {
        out.push(gateway_ref(ck, operator_ns));
    }
    out
}

/// The config Secret of the placement not in use, when it exists (the placement changed).
fn other_placement(
    ck: &ClaudeKey,
    observed: &Observation,
    placement: Placement,
    operator_ns: &str,
) -> Vec<SecretRef> {
    match placement {
        Placement::Gateway if observed.proxy.is_some() => vec![SecretRef {
            namespace: ck.namespace().unwrap_or_default(),
            name: proxy_secret_name(&ck.name_any()),
        }],
        Placement::Namespace if observed.gateway_config.is_some() => {
            vec![gateway_ref(ck, operator_ns)]
        }
        _ => vec![],
    }
}

fn gateway_ref(ck: &ClaudeKey, operator_ns: &str) -> SecretRef {
    SecretRef {
        namespace: operator_ns.to_string(),
        name: gateway_config_secret_name(&ck.namespace().unwrap_or_default(), &ck.name_any()),
    }
}

/// The durable state, trusting only bookkeeping this controller signed for this ClaudeKey.
fn recover(observed: &Observation, sealer: &Sealer, uid: &str) -> Recovered {
    let configs: Vec<&Secret> = [&observed.gateway_config, &observed.proxy]
        .into_iter()
        .flatten()
        .collect();
    secrets::recover(observed.client.as_ref(), &configs, |s| {
        sealer.verify(uid, s)
    })
}

fn tamper_events(recovered: &Recovered) -> Vec<PlannedEvent> {
    recovered
        .tampered
        .iter()
        .map(|name| PlannedEvent {
            warning: true,
            reason: event::LEDGER_TAMPERED,
            note: format!(
                "the bookkeeping of Secret {name} was not written by this controller; nothing it claims is trusted, keys it alone vouched for are dropped at once"
            ),
        })
        .collect()
}

fn decide_next(
    ck: &ClaudeKey,
    recovered: &Recovered,
    upstream: Option<&CachedKey>,
    federated: bool,
    candidate: &SecretString,
    now: DateTime<Utc>,
) -> Result<Decision, decide::NoUpstreamKey> {
    let upstream = upstream.map(|c| FetchedUpstream {
        id: key_id(KeyKind::Upstream, &c.key.value),
        version: c.key.version.clone(),
        hint: crate::admin::partial_key_hint(c.key.value.expose_secret()),
    });
    let annotation = |key| ck.annotations().get(key).map(String::as_str);
    let triggers = Triggers {
        rotate: annotation(annotations::ROTATE),
        revoke: annotation(annotations::REVOKE),
    };
    let observed = Observed {
        ledger: recovered.ledger.as_ref(),
        client_key_present: recovered.client_key.is_some(),
        federated,
    };
    let candidate = key_id(KeyKind::Workload, candidate);
    decide::decide(
        &ck.spec,
        triggers,
        observed,
        upstream.as_ref(),
        &candidate,
        now,
    )
}

fn key_id(kind: KeyKind, key: &SecretString) -> KeyId {
    KeyId {
        sha256: keys::sha256_hex(key.expose_secret()),
        fingerprint: keys::fingerprint(kind, key.expose_secret()),
    }
}

fn source_key(
    granted: &Granted,
    upstream: Option<&CachedKey>,
) -> Option<(String, SourceKeyStatus)> {
    let name = granted.cluster_source.clone()?;
    let key = upstream?;
    let value = key.key.value.expose_secret();
    Some((
        name,
        SourceKeyStatus {
            fingerprint: keys::fingerprint(KeyKind::Upstream, value),
            hint: crate::admin::partial_key_hint(value),
        },
    ))
}

fn used_keys(ledger: Option<&super::ledger::Ledger>) -> Vec<UsedKey> {
    ledger
        .map(|l| {
            l.upstream_keys
                .iter()
                .map(|k| UsedKey {
                    fingerprint: k.fingerprint.clone(),
                    until: k.valid_until,
                })
                .collect()
        })
        .unwrap_or_default()
}

fn healthy_conditions(decision: &Decision, backend_error: Option<&str>) -> Vec<Desired> {
    conditions::healthy(
        &decision.ledger,
        decision.expired,
        decision.next_rotation,
        backend_error,
    )
}

/// Overrides Degraded with a non-backend failure of the executor (Admin API, consumers).
pub fn degrade(conditions: &mut [Desired], why: &'static str, message: &str) {
    for c in conditions
        .iter_mut()
        .filter(|c| c.type_ == condition::DEGRADED && !c.status)
    {
        *c = Desired::new(condition::DEGRADED, true, why, message.to_string());
    }
}

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;
