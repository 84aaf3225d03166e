//! `ClusterClaudeKeySource` and `ClaudeKeySource` (DESIGN.md §10): where upstream keys come from
//! and who may use them. The platform team owns cluster sources; a namespaced source lets a team
//! bring its own key, which already lives in its namespace.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{AnthropicAdminSpec, GoDuration, KubernetesSecretSource, SourceSpec};

/// A source of upstream Anthropic keys that the platform team grants to namespaces.
// clippy reads the repeated `type_` of each printcolumn as a duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "claudekey.io",
    version = "v1alpha2",
    kind = "ClusterClaudeKeySource",
    shortname = "ccks",
    category = "claudekey",
    status = "SourceStatus",
    doc = "ClusterClaudeKeySource says where an upstream Anthropic key lives (a Kubernetes Secret in the operator namespace, AWS Secrets Manager or Vault) or that there is none (workload identity federation), which namespaces' ClaudeKeys may use it, and where the key may be placed. Created by the platform team.",
    printcolumn(name = "Backend", type_ = "string", json_path = ".status.backend"),
    printcolumn(name = "Placement", type_ = "string", json_path = ".spec.placement"),
    printcolumn(
        name = "Upstream",
        type_ = "string",
        json_path = ".status.current.fingerprint"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new("[has(self.kubernetesSecret), has(self.awsSecretsManager), has(self.vault), has(self.workloadIdentityFederation)].filter(x, x).size() == 1").message("set exactly one of kubernetesSecret, awsSecretsManager, vault, workloadIdentityFederation"))]
#[serde(rename_all = "camelCase")]
pub struct ClusterClaudeKeySourceSpec {
    /// A Secret in the claudekey operator's namespace. It must carry the label
    /// claudekey.io/upstream-key: "true", so no source can ever name another Secret there
    /// (the admin key, a TLS key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes_secret: Option<KubernetesSecretSource>,
    /// A secret in AWS Secrets Manager, read with the controller's AWS credentials (IRSA / Pod Identity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws_secrets_manager: Option<super::AwsSecretsManagerSource>,
    /// A HashiCorp Vault (or OpenBao) KV version 2 secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vault: Option<super::VaultSource>,
    /// No upstream key at all: each proxy exchanges a projected service-account token for a
    /// short-lived Anthropic access token (OIDC workload identity federation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_identity_federation: Option<super::WorkloadIdentityFederationSource>,
    /// How often the backend is read for a new version of the upstream key (at least 10s),
    /// e.g. 5m. One read serves every ClaudeKey of this source.
    #[serde(default = "default_refresh_interval")]
    #[x_kube(validation = Rule::new("duration(self) >= duration('10s')").message("refreshInterval must be at least 10s"))]
    pub refresh_interval: GoDuration,
    /// Namespaces whose ClaudeKeys may use this source: those named, and those whose labels
    /// match the selector. Nobody may when both are empty.
    #[serde(default)]
    pub allowed_namespaces: AllowedNamespaces,
    /// Where the upstream key may live. gateway (default): only in the operator namespace,
    /// served by the claudekey gateway; workload namespaces get a workload key only. namespace:
    /// the key is written into each ClaudeKey's <name>-proxy Secret in its own namespace.
    #[serde(default)]
    pub placement: Placement,
    /// Optional: deactivate this source's replaced upstream keys at Anthropic through the Admin
    /// API, once no ClaudeKey anywhere uses them any more.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anthropic_admin: Option<AnthropicAdminSpec>,
}

/// A team's own upstream key, in a Secret of the team's namespace. Only ClaudeKeys of the same
/// namespace may use it, and the key is always placed in that namespace.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "claudekey.io",
    version = "v1alpha2",
    kind = "ClaudeKeySource",
    namespaced,
    shortname = "cks",
    category = "claudekey",
    status = "SourceStatus",
    doc = "ClaudeKeySource is a team's own upstream Anthropic key, in a Secret of its own namespace. Only ClaudeKeys of the same namespace can use it.",
    printcolumn(
        name = "Upstream",
        type_ = "string",
        json_path = ".status.current.fingerprint"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ClaudeKeySourceSpec {
    /// A Secret in this source's own namespace holding the Anthropic key.
    pub kubernetes_secret: KubernetesSecretSource,
    /// How often the Secret is read for a new version of the key (at least 10s), e.g. 5m.
    #[serde(default = "default_refresh_interval")]
    #[x_kube(validation = Rule::new("duration(self) >= duration('10s')").message("refreshInterval must be at least 10s"))]
    pub refresh_interval: GoDuration,
}

/// Who may reference a cluster source.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AllowedNamespaces {
    /// Namespaces allowed by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub names: Vec<String>,
    /// Namespaces allowed by their labels (matchLabels / matchExpressions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
}

/// Where an upstream key may be written.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
pub enum Placement {
    /// Only in the operator namespace; the claudekey gateway serves every namespace.
    #[default]
    Gateway,
    /// In each ClaudeKey's own namespace, in its <name>-proxy Secret (direct sidecar).
    Namespace,
}

impl Placement {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Gateway => "gateway",
            Self::Namespace => "namespace",
        }
    }
}

/// What the controller knows of a source: fingerprints only, never keys.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SourceStatus {
    /// Short description of the backend, e.g. kubernetes:anthropic-support.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// The upstream key last read from the backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<SourceKeyStatus>,
    /// Keys that left the backend and are deactivated at Anthropic (with anthropicAdmin) once no
    /// ClaudeKey uses them any more.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retiring: Vec<SourceKeyStatus>,
    /// The last key retirements through the Admin API (newest last, at most 5).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retired: Vec<crate::admin::RetiredKeyStatus>,
    /// Standard conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// An upstream key of a source, by fingerprint and the Admin API's partial hint.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SourceKeyStatus {
    /// up: followed by the first 8 hex digits of the key's SHA-256.
    pub fingerprint: String,
    /// The Admin API's partial hint of the key, as the Console shows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

impl ClusterClaudeKeySourceSpec {
    /// A short, non-secret description of the backend, e.g. `kubernetes:anthropic-support` or
    /// `federation:fdrl_…`.
    pub fn describe(&self) -> String {
        match &self.workload_identity_federation {
            Some(f) => f.describe(),
            None => self.backend().describe(),
        }
    }

    /// The backend part, in the form the backends read.
    pub fn backend(&self) -> SourceSpec {
        SourceSpec {
            kubernetes_secret: self.kubernetes_secret.clone(),
            aws_secrets_manager: self.aws_secrets_manager.clone(),
            vault: self.vault.clone(),
            refresh_interval: self.refresh_interval.clone(),
            secret_namespace: None,
        }
    }
}

impl ClaudeKeySourceSpec {
    /// The backend part, in the form the backends read: a Secret in `namespace`.
    pub fn backend(&self, namespace: &str) -> SourceSpec {
        SourceSpec {
            kubernetes_secret: Some(self.kubernetes_secret.clone()),
            aws_secrets_manager: None,
            vault: None,
            refresh_interval: self.refresh_interval.clone(),
            secret_namespace: Some(namespace.to_string()),
        }
    }
}

impl AllowedNamespaces {
    /// Whether a namespace with these labels may use the source. A selector with no terms
    /// selects nothing here (unlike the Kubernetes convention), so `selector: {}` is never a
    /// grant to everyone by accident.
    pub fn allows(&self, namespace: &str, labels: &BTreeMap<String, String>) -> bool {
        self.names.iter().any(|n| n == namespace)
            || self
                .selector
                .as_ref()
                .is_some_and(|s| selector_matches(s, labels))
    }
}

/// Label-selector semantics of Kubernetes (matchLabels AND every matchExpression), except that a
/// selector without terms matches nothing.
pub fn selector_matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let match_labels = selector.match_labels.iter().flatten();
    let expressions = selector.match_expressions.iter().flatten();
    let mut terms = 0;
    for (key, value) in match_labels {
        terms += 1;
        if labels.get(key) != Some(value) {
            return false;
        }
    }
    for expr in expressions {
        terms += 1;
        let values = expr.values.as_deref().unwrap_or_default();
        let present = labels.get(&expr.key);
        let ok = match expr.operator.as_str() {
            "In" => present.is_some_and(|v| values.contains(v)),
            "NotIn" => present.is_none_or(|v| !values.contains(v)),
            "Exists" => present.is_some(),
            "DoesNotExist" => present.is_none(),
            _ => false,
        };
        if !ok {
            return false;
        }
    }
    terms > 0
}

fn default_refresh_interval() -> GoDuration {
    "5m".parse().expect("valid literal")
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn names_and_selector_grant_and_nothing_else_does() {
        let allowed = AllowedNamespaces {
            names: vec!["team-a".into()],
            selector: Some(LabelSelector {
                match_labels: Some(labels(&[("claudekey.io/source-support", "allowed")])),
                match_expressions: None,
            }),
        };
        assert!(allowed.allows("team-a", &labels(&[])));
        assert!(allowed.allows(
            "team-c",
            &labels(&[("claudekey.io/source-support", "allowed")])
        ));
        assert!(!allowed.allows("team-c", &labels(&[("claudekey.io/source-support", "no")])));
        assert!(!allowed.allows("team-a-evil", &labels(&[])));
        assert!(!AllowedNamespaces::default().allows("team-a", &labels(&[])));
    }

    #[test]
    fn an_empty_selector_selects_nobody() {
        let empty = AllowedNamespaces {
            names: vec![],
            selector: Some(LabelSelector::default()),
        };
        assert!(!empty.allows("anyone", &labels(&[("a", "b")])));
    }

    #[test]
    fn match_expressions_follow_kubernetes() {
        let expr = |key: &str, op: &str, values: &[&str]| LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: Some(values.iter().map(|v| v.to_string()).collect()),
        };
        let selector = LabelSelector {
            match_labels: None,
            match_expressions: Some(vec![
                expr("tier", "In", &["prod", "staging"]),
                expr("blocked", "DoesNotExist", &[]),
            ]),
        };
        assert!(selector_matches(&selector, &labels(&[("tier", "prod")])));
        assert!(!selector_matches(
            &selector,
            &labels(&[("tier", "prod"), ("blocked", "x")])
        ));
        assert!(!selector_matches(&selector, &labels(&[("tier", "dev")])));
        let unknown = LabelSelector {
            match_labels: None,
            match_expressions: Some(vec![expr("tier", "Bogus", &[])]),
        };
        assert!(!selector_matches(&unknown, &labels(&[("tier", "prod")])));
    }
}
