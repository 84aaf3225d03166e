//! The mutating webhook's refusals (DESIGN.md §5, §10) as findings, so the validating webhook
//! refuses pod templates that could never be injected, and `scan` reports them offline: host
//! namespaces and a shared process namespace put the proxy's files and memory within the app's
//! reach, so a pod that asks for (or already carries) the sidecar must not have them.

use k8s_openapi::api::core::v1::PodSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::finding::{Finding, RuleId, SIDECAR_NAME, inject_annotation};
use super::keyrules::IDENTITY_TOKEN_FILE;
use crate::crd::annotations;

/// Name of the volume the mutating webhook adds (`mutate::PROXY_VOLUME`; a test keeps them equal).
pub const PROXY_VOLUME: &str = "claudekey-proxy-config";

/// Why each pod-level setting is refused, and what to use instead.
const HOST_SETTINGS: [(&str, &str); 3] = [
    (
        "hostNetwork",
        "its 127.0.0.1 is the node's, so the proxy would serve every process on the node",
    ),
    (
        "hostPID",
        "processes see the proxy's /proc/<pid>/root and memory, which hold the upstream key",
    ),
    (
        "shareProcessNamespace",
        "the app containers see the proxy's /proc/<pid>/root and memory, which hold the upstream key",
    ),
];

fn finding(resource: &str, field: String, what: String, advice: &str) -> Finding {
    Finding {
        rule: RuleId::InjectionPrecondition,
        resource: resource.to_string(),
        container: String::new(),
        message: format!("{resource}: {field} {what}; {advice}"),
        field,
        path: None,
        hint: None,
    }
}

/// Findings for a pod (or template) that asks for injection but would be refused, or that
/// carries an injected sidecar in a setting where it is not safe.
pub fn check(
    resource: &str,
    meta: Option<&ObjectMeta>,
    spec: &PodSpec,
    path: &str,
) -> Vec<Finding> {
    let Some(ck) = inject_annotation(meta) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let advice = if ck.is_empty() {
        "use a gateway proxy and the ClaudeKey's <name>-client Secret instead".to_string()
    } else {
        format!(
            "use a gateway proxy and Secret {ck}-client instead, or remove {}",
            annotations::INJECT
        )
    };
    let set = [
        spec.host_network,
        spec.host_pid,
        spec.share_process_namespace,
    ];
    for ((name, why), value) in HOST_SETTINGS.iter().zip(set) {
        if value == Some(true) {
            let what = format!(
                "is true in a pod with {}: {ck}, but {why}",
                annotations::INJECT
            );
            out.push(finding(resource, format!("{path}.{name}"), what, &advice));
        }
    }
    // The mutating webhook gives every app container ANTHROPIC_API_KEY, which SDKs prefer over
    // a federation token file: the two cannot both be meant (DESIGN.md §11).
    for (i, c) in spec.containers.iter().enumerate() {
        let env = c.env.as_deref().unwrap_or_default();
        if env.iter().any(|v| v.name == IDENTITY_TOKEN_FILE) {
            out.push(finding(
                resource,
                format!("{path}.containers[{i}].env"),
                format!(
                    "of container {:?} sets {IDENTITY_TOKEN_FILE} in a pod with {}: {ck}, whose injected ANTHROPIC_API_KEY would silently turn federation off",
                    c.name,
                    annotations::INJECT
                ),
                &format!("remove {IDENTITY_TOKEN_FILE} (the claudekey proxy holds the credential), or remove {}", annotations::INJECT),
            ));
        }
    }
    let init = spec.init_containers.as_deref().unwrap_or_default();
    let already = meta
        .and_then(|m| m.annotations.as_ref())
        .is_some_and(|a| a.contains_key(annotations::INJECTED))
        || init.iter().any(|c| c.name == SIDECAR_NAME);
    if already {
        return out;
    }
    if ck.is_empty() {
        out.push(finding(
            resource,
            format!("metadata.annotations[{:?}]", annotations::INJECT),
            "is empty".to_string(),
            "set it to the name of a ClaudeKey in this namespace",
        ));
    }
    if spec.containers.iter().any(|c| c.name == SIDECAR_NAME) {
        out.push(finding(
            resource,
            format!("{path}.containers"),
            format!("has a container named {SIDECAR_NAME:?}, the name of the injected sidecar"),
            "rename it so the claudekey proxy can be injected",
        ));
    }
    if spec
        .volumes
        .iter()
        .flatten()
        .any(|v| v.name == PROXY_VOLUME)
    {
        out.push(finding(
            resource,
            format!("{path}.volumes"),
            format!("has a volume named {PROXY_VOLUME:?}, the name of the injected proxy volume"),
            "rename it so the claudekey proxy can be injected",
        ));
    }
    out
}
