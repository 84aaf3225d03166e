//! What every admission rule produces and shares: findings, their rule ids and message parts,
//! the view of a container the rules read, and the collector they push to. A leaf, so the rule
//! modules (`rules`, `keyrules`, `preconditions`) depend on it and never on each other's core.

use k8s_openapi::api::core::v1::{EnvFromSource, EnvVar, VolumeMount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Serialize;

use super::keyshape::Encoding;
use crate::crd::annotations;

/// Name of the proxy sidecar the mutating webhook injects.
pub const SIDECAR_NAME: &str = "claudekey-proxy";

/// Where the proxy sidecar of a federation source reads its projected identity token
/// (CONTRACT.md); the only extra flag an injected sidecar may carry.
pub const IDENTITY_TOKEN_PATH: &str = "/var/run/secrets/claudekey.io/identity/token";

/// What to do instead of putting a key into a spec; part of every key finding.
pub(super) const KEY_ADVICE: &str = "keep keys out of pod specs: create a ClaudeKey and annotate the pod with claudekey.io/inject: <ClaudeKey>, or read the key from a Secret with valueFrom.secretKeyRef";

/// Which rule a finding comes from; stable identifiers for `scan --format json`.
#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "kebab-case")]
pub enum RuleId {
    /// (a) an env value that looks like an Anthropic credential (after `$(VAR)` expansion).
    KeyInEnv,
    /// (a) a key-named variable with a literal value.
    LiteralKeyVariable,
    /// (b) a credential (or a literal key assignment) in command, args, a probe's or hook's
    /// `exec` command, or any other string of the container.
    KeyInCommand,
    /// (c) a container other than the sidecar reads a `<name>-proxy` Secret.
    ProxySecretReference,
    /// An ephemeral container joins the proxy sidecar's process namespace.
    TargetsSidecar,
    /// `ANTHROPIC_API_KEY`/`ANTHROPIC_AUTH_TOKEN` beside `ANTHROPIC_IDENTITY_TOKEN_FILE`.
    CredentialBesideIdentityToken,
    /// A pod asking for injection that the mutating webhook refuses (host namespaces,
    /// a shared process namespace, an empty annotation, a name clash).
    InjectionPrecondition,
    /// A ConfigMap's `data` or `binaryData` holds a credential.
    KeyInConfigMap,
    /// `scan` only: a key-shaped string anywhere else in a document (Secrets included).
    KeyShapedString,
}

/// One problem in one container; `message` is what users see, everywhere.
#[derive(Serialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Finding {
    /// Which rule.
    pub rule: RuleId,
    /// `Kind/name` of the object.
    pub resource: String,
    /// Container name; empty for findings about the pod or the object.
    pub container: String,
    /// Where in the container: `env NAME`, `args[2]`, `volume NAME`, `envFrom`; or in the
    /// pod (`spec.hostPID`) or object (`data.config`).
    pub field: String,
    /// JSON path of the offending string in the object, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Masked hint of the offending value, never the value.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
    /// The full, user-facing sentence.
    pub message: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// A container of any of the three lists, seen through the fields the rules read.
pub(super) struct ContainerView<'a> {
    pub(super) label: String,
    pub(super) name: &'a str,
    pub(super) env: &'a [EnvVar],
    pub(super) env_from: &'a [EnvFromSource],
    pub(super) mounts: &'a [VolumeMount],
    /// The whole container, for the strings no rule names.
    pub(super) value: serde_json::Value,
    /// JSON path of the container in the object.
    pub(super) path: String,
    /// `targetContainerName` of an ephemeral container.
    pub(super) target: Option<&'a str>,
    /// The `-proxy` Secret this container may read: only the injected sidecar has one.
    pub(super) exempt_secret: Option<String>,
}

/// The ClaudeKey a pod asks to be injected with, if any (trimmed; maybe empty).
pub(super) fn inject_annotation(meta: Option<&ObjectMeta>) -> Option<&str> {
    meta.and_then(|m| m.annotations.as_ref())
        .and_then(|a| a.get(annotations::INJECT))
        .map(|s| s.trim())
}

/// Collects findings for one container.
pub(super) struct Out<'a, 'b> {
    pub(super) resource: &'a str,
    pub(super) view: &'a ContainerView<'b>,
    pub(super) findings: &'a mut Vec<Finding>,
}

impl Out<'_, '_> {
    pub(super) fn push(
        &mut self,
        rule: RuleId,
        field: String,
        hint: Option<String>,
        what: String,
        advice: &str,
    ) {
        self.push_at(rule, field, None, hint, what, advice);
    }

    pub(super) fn push_at(
        &mut self,
        rule: RuleId,
        field: String,
        path: Option<String>,
        hint: Option<String>,
        what: String,
        advice: &str,
    ) {
        let message = format!(
            "{}: {} {field} {what}; {advice}",
            self.resource, self.view.label
        );
        self.findings.push(Finding {
            rule,
            resource: self.resource.to_string(),
            container: self.view.name.to_string(),
            field,
            path,
            hint,
            message,
        });
    }
}

pub(super) fn encoded(encoding: Encoding) -> &'static str {
    match encoding {
        Encoding::Plain => "an",
        Encoding::Base64 => "a base64-encoded",
    }
}
