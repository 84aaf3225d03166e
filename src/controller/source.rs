//! Which upstream key a ClaudeKey may use (DESIGN.md §10): its `sourceRef` resolved to a
//! ClusterClaudeKeySource that grants its namespace, or a ClaudeKeySource in its own namespace.
//! `authorize` is the rule, pure; `resolve` only gathers what it needs from the watch caches.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Namespace;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Client, ResourceExt};

use super::apply::{Error, safe_reason};
use super::conditions::{Desired, reason};
use super::stores::Stores;
use crate::crd::{
    AnthropicAdminSpec, ClaudeKey, ClaudeKeySource, ClusterClaudeKeySource, IdentityTokenStatus,
    Placement, SourceKind, SourceRef, SourceSpec, WorkloadIdentityFederationSource, condition,
    federation_ready,
};
use crate::proxyconf::FederationConfig;

/// A source this ClaudeKey may use, in the form the rest of the reconcile needs.
#[derive(Clone, Debug, PartialEq)]
pub struct Granted {
    /// `Kind/name (backend)`, for status and messages.
    pub description: String,
    pub backend: SourceSpec,
    pub placement: Placement,
    /// Only cluster sources can retire keys at Anthropic.
    pub admin: Option<AnthropicAdminSpec>,
    /// The cluster source's name, whose status records its keys.
    pub cluster_source: Option<String>,
    /// Workload identity federation: no upstream key to read; proxies exchange tokens instead.
    pub federation: Option<FederationConfig>,
    /// The projected token a sidecar exchanges (federation only).
    pub identity_token: Option<IdentityTokenStatus>,
    /// The source's `FederationReady` (reported by the gateway), to show on the ClaudeKey.
    pub federation_ready: Option<Desired>,
}

/// The outcome of authorization: a grant, or why not and what to do about it.
#[derive(Clone, Debug, PartialEq)]
pub enum Resolution {
    Granted(Box<Granted>),
    Refused {
        reason: &'static str,
        message: String,
    },
}

/// What the API holds for a sourceRef.
pub enum Found {
    Cluster(Box<ClusterClaudeKeySource>),
    Namespaced(Box<ClaudeKeySource>),
    Missing,
}

/// The rule: a cluster source only for namespaces it allows, a namespaced source only in its own
/// namespace (the lookup is namespaced, so another namespace's source is simply not found).
pub fn authorize(
    namespace: &str,
    namespace_labels: &BTreeMap<String, String>,
    source_ref: &SourceRef,
    found: Found,
) -> Resolution {
    match found {
        Found::Missing => Resolution::Refused {
            reason: reason::SOURCE_NOT_FOUND,
            message: match source_ref.kind {
                SourceKind::ClusterClaudeKeySource => format!(
                    "ClusterClaudeKeySource {} does not exist; ask the platform team for a source granted to namespace {namespace}",
                    source_ref.name
                ),
                SourceKind::ClaudeKeySource => format!(
                    "ClaudeKeySource {namespace}/{} does not exist; a ClaudeKey can only use a ClaudeKeySource of its own namespace",
                    source_ref.name
                ),
            },
        },
        Found::Cluster(source) => {
            let name = source.name_any();
            if !source
                .spec
                .allowed_namespaces
                .allows(namespace, namespace_labels)
            {
                return Resolution::Refused {
                    reason: reason::SOURCE_NOT_ALLOWED,
                    message: format!(
                        "ClusterClaudeKeySource {name} does not allow namespace {namespace}: the platform team must add it to spec.allowedNamespaces.names or label the namespace to match spec.allowedNamespaces.selector"
                    ),
                };
            }
            let backend = source.spec.backend();
            let federation = source
                .spec
                .workload_identity_federation
                .as_ref()
                .map(|f| federation_config(&name, f));
            Resolution::Granted(Box::new(Granted {
                description: format!("ClusterClaudeKeySource/{name} ({})", source.spec.describe()),
                backend,
                placement: source.spec.placement,
                admin: source.spec.anthropic_admin.clone(),
                federation_ready: federation
                    .as_ref()
                    .and_then(|_| reported_federation(&source, &name)),
                cluster_source: Some(name),
                federation,
                identity_token: source.spec.workload_identity_federation.as_ref().map(|f| {
                    IdentityTokenStatus {
                        audience: f.audience.clone(),
                        expiration_seconds: f.token_expiration_seconds,
                    }
                }),
            }))
        }
        Found::Namespaced(source) => {
            let backend = source.spec.backend(namespace);
            Resolution::Granted(Box::new(Granted {
                description: format!(
                    "ClaudeKeySource/{} ({})",
                    source.name_any(),
                    backend.describe()
                ),
                backend,
                placement: Placement::Namespace,
                admin: None,
                cluster_source: None,
                federation: None,
                identity_token: None,
                federation_ready: None,
            }))
        }
    }
}

/// The gateway's report on the source, in the ClaudeKey's terms; `None` when there is none (no
/// gateway exchange yet, or placement namespace, whose sidecars cannot report).
fn reported_federation(source: &ClusterClaudeKeySource, name: &str) -> Option<Desired> {
    let reported = source
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == condition::FEDERATION_READY)?;
    let reason = federation_ready::known(&reported.reason)?;
    Some(Desired::new(
        condition::FEDERATION_READY,
        reported.status == "True",
        reason,
        format!("ClusterClaudeKeySource {name}: {}", reported.message),
    ))
}

/// What a proxy needs to exchange tokens for this source: the ids, never a secret.
pub fn federation_config(
    source: &str,
    spec: &WorkloadIdentityFederationSource,
) -> FederationConfig {
    FederationConfig {
        source: source.to_string(),
        organization_id: spec.organization_id.clone(),
        service_account_id: spec.service_account_id.clone(),
        federation_rule_id: spec.federation_rule_id.clone(),
        workspace_id: spec.workspace_id.clone(),
        audience: spec.audience.clone(),
    }
}

/// Finds the source a ClaudeKey names (and its namespace's labels when a selector needs them) in
/// the watch caches, and authorizes it. Only a namespaced controller, which cannot watch
/// namespaces, asks the apiserver for the labels.
pub async fn resolve(
    client: &Client,
    stores: &Stores,
    ck: &ClaudeKey,
) -> Result<Resolution, Error> {
    let namespace = ck.namespace().ok_or(Error::NoNamespace)?;
    let source_ref = &ck.spec.source_ref;
    let found = match source_ref.kind {
        SourceKind::ClusterClaudeKeySource => stores
            .cluster_sources
            .get(&ObjectRef::new(&source_ref.name))
            .map_or(Found::Missing, |s| Found::Cluster(Box::new((*s).clone()))),
        SourceKind::ClaudeKeySource => stores
            .sources
            .get(&ObjectRef::new(&source_ref.name).within(&namespace))
            .map_or(Found::Missing, |s| {
                Found::Namespaced(Box::new((*s).clone()))
            }),
    };
    let needs_labels = matches!(&found, Found::Cluster(s)
        if s.spec.allowed_namespaces.selector.is_some()
            && !s.spec.allowed_namespaces.names.contains(&namespace));
    let labels = if needs_labels {
        namespace_labels(client, stores, &namespace).await?
    } else {
        BTreeMap::new()
    };
    Ok(authorize(&namespace, &labels, source_ref, found))
}

async fn namespace_labels(
    client: &Client,
    stores: &Stores,
    namespace: &str,
) -> Result<BTreeMap<String, String>, Error> {
    let found = match &stores.namespaces {
        Some(cache) => cache
            .get(&ObjectRef::new(namespace))
            .map(|ns| ns.labels().clone()),
        None => Api::<Namespace>::all(client.clone())
            .get_opt(namespace)
            .await
            .map_err(|e| Error::ReadSource {
                kind: "Namespace",
                name: namespace.to_string(),
                reason: safe_reason(&e),
            })?
            .map(|ns| ns.labels().clone()),
    };
    Ok(found.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{AllowedNamespaces, ClusterClaudeKeySourceSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

    fn cluster(allowed: AllowedNamespaces) -> Found {
        let spec: ClusterClaudeKeySourceSpec = serde_json::from_value(serde_json::json!({
            "kubernetesSecret": { "name": "anthropic-support", "key": "api-key" },
        }))
        .unwrap();
        let mut source = ClusterClaudeKeySource::new(
            "support",
            ClusterClaudeKeySourceSpec {
                allowed_namespaces: allowed,
                ..spec
            },
        );
        source.metadata.name = Some("support".into());
        Found::Cluster(Box::new(source))
    }

    fn cluster_ref() -> SourceRef {
        SourceRef {
            kind: SourceKind::ClusterClaudeKeySource,
            name: "support".into(),
        }
    }

    fn refused_reason(r: &Resolution) -> Option<&'static str> {
        match r {
            Resolution::Refused { reason, .. } => Some(reason),
            Resolution::Granted(_) => None,
        }
    }

    #[test]
    fn a_cluster_source_serves_only_the_namespaces_it_allows() {
        let by_name = AllowedNamespaces {
            names: vec!["team-a".into()],
            selector: None,
        };
        let none = BTreeMap::new();
        let granted = authorize("team-a", &none, &cluster_ref(), cluster(by_name.clone()));
        let Resolution::Granted(g) = granted else {
            panic!("team-a is allowed")
        };
        assert_eq!(g.placement, Placement::Gateway);
        assert_eq!(g.cluster_source.as_deref(), Some("support"));
        assert_eq!(g.backend.secret_namespace, None);
        let refused = authorize("team-b", &none, &cluster_ref(), cluster(by_name));
        assert_eq!(refused_reason(&refused), Some(reason::SOURCE_NOT_ALLOWED));
        let Resolution::Refused { message, .. } = refused else {
            unreachable!()
        };
        assert!(message.contains("allowedNamespaces") && message.contains("team-b"));
        // Nobody when nothing is granted.
        let nobody = authorize(
            "team-a",
            &none,
            &cluster_ref(),
            cluster(AllowedNamespaces::default()),
        );
        assert_eq!(refused_reason(&nobody), Some(reason::SOURCE_NOT_ALLOWED));
    }

    #[test]
    fn a_selector_grant_follows_the_namespace_labels() {
        let by_label = AllowedNamespaces {
            names: vec![],
            selector: Some(LabelSelector {
                match_labels: Some(BTreeMap::from([(
                    "claudekey.io/source-support".to_string(),
                    "allowed".to_string(),
                )])),
                match_expressions: None,
            }),
        };
        let labelled = BTreeMap::from([(
            "claudekey.io/source-support".to_string(),
            "allowed".to_string(),
        )]);
        let yes = authorize(
            "team-c",
            &labelled,
            &cluster_ref(),
            cluster(by_label.clone()),
        );
        assert_eq!(refused_reason(&yes), None);
        let no = authorize(
            "team-c",
            &BTreeMap::new(),
            &cluster_ref(),
            cluster(by_label),
        );
        assert_eq!(refused_reason(&no), Some(reason::SOURCE_NOT_ALLOWED));
    }

    #[test]
    fn a_namespaced_source_reads_its_own_namespace_and_places_there() {
        let spec = serde_json::from_value(serde_json::json!({
            "kubernetesSecret": { "name": "my-key" }
        }))
        .unwrap();
        let mut source = ClaudeKeySource::new("own", spec);
        source.metadata.namespace = Some("team-b".into());
        let r = authorize(
            "team-b",
            &BTreeMap::new(),
            &SourceRef {
                kind: SourceKind::ClaudeKeySource,
                name: "own".into(),
            },
            Found::Namespaced(Box::new(source)),
        );
        let Resolution::Granted(g) = r else {
            panic!("own source")
        };
        assert_eq!(g.placement, Placement::Namespace);
        assert_eq!(g.backend.secret_namespace.as_deref(), Some("team-b"));
        assert_eq!(g.admin, None);
    }

    #[test]
    fn a_federation_source_grants_ids_and_no_backend_to_read() {
        let spec: ClusterClaudeKeySourceSpec = serde_json::from_value(serde_json::json!({
            "workloadIdentityFederation": {
                "organizationId": "0f1e2d3c-aaaa-bbbb-cccc-000000000001",
                "serviceAccountId": "svac_01", "federationRuleId": "fdrl_01",
                "audience": "https://api.anthropic.com"
            },
            "allowedNamespaces": { "names": ["team-a"] },
            "placement": "namespace",
        }))
        .unwrap();
        assert_eq!(
            spec.workload_identity_federation
                .as_ref()
                .unwrap()
                .token_expiration_seconds,
            3600
        );
        let mut source = ClusterClaudeKeySource::new("wif", spec);
        source.metadata.name = Some("wif".into());
        let r = authorize(
            "team-a",
            &BTreeMap::new(),
            &SourceRef {
                kind: SourceKind::ClusterClaudeKeySource,
                name: "wif".into(),
            },
            Found::Cluster(Box::new(source.clone())),
        );
        let Resolution::Granted(g) = r else {
            panic!("team-a is allowed")
        };
        let federation = g.federation.unwrap();
        assert_eq!(federation.source, "wif");
        assert_eq!(federation.federation_rule_id, "fdrl_01");
        assert_eq!(g.placement, Placement::Namespace);
        assert!(
            g.description.contains("federation:fdrl_01"),
            "{}",
            g.description
        );
        assert_eq!(g.federation_ready, None, "nothing reported yet");
        // What the gateway reported on the source shows on the ClaudeKey; unknown reasons not.
        let reported = |reason: &str| {
            let mut source = source.clone();
            source.status = Some(crate::crd::SourceStatus {
                conditions: vec![k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
                    type_: "FederationReady".into(),
                    status: "False".into(),
                    reason: reason.into(),
                    message: "refused (HTTP 401 invalid_grant)".into(),
                    observed_generation: None,
                    last_transition_time: crate::controller::conditions::time(chrono::Utc::now()),
                }],
                ..Default::default()
            });
            let r = authorize(
                "team-a",
                &BTreeMap::new(),
                &SourceRef {
                    kind: SourceKind::ClusterClaudeKeySource,
                    name: "wif".into(),
                },
                Found::Cluster(Box::new(source)),
            );
            let Resolution::Granted(g) = r else {
                panic!("granted")
            };
            g.federation_ready
        };
        let mirrored = reported("ExchangeRefused").expect("mirrored");
        assert!(!mirrored.status);
        assert_eq!(mirrored.reason, "ExchangeRefused");
        assert!(mirrored.message.contains("wif") && mirrored.message.contains("invalid_grant"));
        assert_eq!(reported("SomethingElse"), None);
        // The grant rule is the same as for any cluster source.
        let refused = authorize(
            "team-b",
            &BTreeMap::new(),
            &cluster_ref(),
            Found::Cluster(Box::new(source)),
        );
        assert_eq!(refused_reason(&refused), Some(reason::SOURCE_NOT_ALLOWED));
    }

    #[test]
    fn a_missing_source_says_what_to_ask_for() {
        let r = authorize("team-a", &BTreeMap::new(), &cluster_ref(), Found::Missing);
        assert_eq!(refused_reason(&r), Some(reason::SOURCE_NOT_FOUND));
    }
}
