//! Sidecar injection for Pods annotated `claudekey.io/inject: <ClaudeKey>` (DESIGN.md §5): a pure
//! function from a Pod to a minimal RFC 6902 patch, or a refusal that says what to fix.

use std::collections::BTreeMap;

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation, RemoveOperation, ReplaceOperation};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, EnvVar, EnvVarSource, HTTPGetAction, ObjectFieldSelector, Pod, Probe,
    ResourceRequirements, SeccompProfile, SecretVolumeSource, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::{Value, json};

use super::keyshape::SIDECAR_PLACEHOLDER;
use super::rules::SIDECAR_NAME;
use crate::crd::{annotations, proxy_secret_name};
use crate::shared_counters::{SIDECAR_PASSWORD_ENTRY, namespace_user};

/// Volume that carries the `<name>-proxy` Secret into the sidecar alone.
pub const PROXY_VOLUME: &str = "claudekey-proxy-config";
/// Where the sidecar reads `proxy.json` (its `--config-dir`).
pub const PROXY_CONFIG_DIR: &str = "/etc/claudekey/proxy";
/// Variables the mutator owns in every app container.
const BASE_URL: &str = "ANTHROPIC_BASE_URL";
const API_KEY: &str = "ANTHROPIC_API_KEY";
const AUTH_TOKEN: &str = "ANTHROPIC_AUTH_TOKEN";
/// The non-root user the sidecar runs as (distroless `nonroot`).
const SIDECAR_UID: i64 = 65532;

/// How the injected sidecar looks; from the webhook's flags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SidecarConfig {
    /// Image of the sidecar; its entrypoint is the `claudekey` binary.
    pub image: String,
    /// Loopback port the proxy listens on inside the pod.
    pub port: u16,
    /// Port of `/metrics` and `/readyz`.
    pub metrics_port: u16,
    /// The Anthropic API the proxy forwards to.
    pub upstream: String,
    /// Resource requests (e.g. `cpu: 10m`, `memory: 32Mi`).
    pub requests: BTreeMap<String, String>,
    /// Resource limits (e.g. `memory: 128Mi`).
    pub limits: BTreeMap<String, String>,
    /// Shared limits: the Redis the sidecar counts in, without a password (the sidecar reads
    /// its namespace's from the `-proxy` Secret). `None`: each sidecar counts alone.
    pub redis_url: Option<String>,
}

impl Default for SidecarConfig {
    fn default() -> Self {
        Self {
            image: "ghcr.io/claudekey/claudekey:latest".to_string(),
            port: 8484,
            metrics_port: 9484,
            upstream: "https://api.anthropic.com".to_string(),
            requests: [("cpu", "10m"), ("memory", "32Mi")]
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .into(),
            limits: [("memory", "128Mi")]
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .into(),
            redis_url: None,
        }
    }
}

/// Why a pod asking for injection is refused; each message says what to do.
#[derive(thiserror::Error, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The annotation is there but empty.
    #[error(
        "annotation {} is empty: set it to the name of a ClaudeKey in this namespace",
        annotations::INJECT
    )]
    EmptyAnnotation,
    /// No such ClaudeKey in the namespace.
    #[error(
        "ClaudeKey {name} does not exist in namespace {namespace}: create it first, or fix the {} annotation",
        annotations::INJECT
    )]
    MissingClaudeKey {
        /// The annotation's value.
        name: String,
        /// The pod's namespace.
        namespace: String,
    },
    /// Loopback in a hostNetwork pod is the node's, so the sidecar would serve the whole node.
    #[error(
        "cannot inject the claudekey proxy into a hostNetwork pod (its 127.0.0.1 is the node's): use a gateway proxy and Secret {0}-client instead"
    )]
    HostNetwork(String),
    /// With the host's or a shared PID namespace, other processes read the proxy's
    /// `/proc/<pid>/root` (its mounted `proxy.json`) and memory (DESIGN.md §10).
    #[error(
        "cannot inject the claudekey proxy into a pod with {setting}: true (other containers could read the proxy's files and memory through /proc, and with them the upstream key): remove {setting}, or use a gateway proxy and Secret {name}-client instead"
    )]
    SharedProcesses {
        /// `hostPID` or `shareProcessNamespace`.
        setting: &'static str,
        /// The ClaudeKey.
        name: String,
    },
    /// The pod already uses a name the sidecar needs.
    #[error(
        "the pod already has a {0} named {SIDECAR_NAME:?} or {PROXY_VOLUME:?}: rename it so the claudekey proxy can be injected"
    )]
    NameClash(&'static str),
}

/// The injection patch for `pod`, or `None` when it asks for none or already has it.
/// `claudekey_exists` answers from the webhook's cache whether a ClaudeKey is in the namespace.
pub fn mutate(
    pod: &Pod,
    namespace: &str,
    claudekey_exists: impl Fn(&str) -> bool,
    config: &SidecarConfig,
) -> Result<Option<Patch>, Refusal> {
    let annotations = pod.metadata.annotations.clone().unwrap_or_default();
    let Some(name) = annotations
        .get(annotations::INJECT)
        .map(|n| n.trim().to_string())
    else {
        return Ok(None);
    };
    let Some(spec) = pod.spec.as_ref() else {
        return Ok(None);
    };
    let init = spec.init_containers.as_deref().unwrap_or_default();
    if annotations.contains_key(annotations::INJECTED)
        || init.iter().any(|c| c.name == SIDECAR_NAME)
    {
        return Ok(None);
    }
    if name.is_empty() {
        return Err(Refusal::EmptyAnnotation);
    }
    if spec.host_network == Some(true) {
        return Err(Refusal::HostNetwork(name));
    }
    for (setting, value) in [
        ("hostPID", spec.host_pid),
        ("shareProcessNamespace", spec.share_process_namespace),
    ] {
        if value == Some(true) {
            return Err(Refusal::SharedProcesses { setting, name });
        }
    }
    if !claudekey_exists(&name) {
        return Err(Refusal::MissingClaudeKey {
            name,
            namespace: namespace.to_string(),
        });
    }
    if spec.containers.iter().any(|c| c.name == SIDECAR_NAME) {
        return Err(Refusal::NameClash("container"));
    }
    if spec
        .volumes
        .iter()
        .flatten()
        .any(|v| v.name == PROXY_VOLUME)
    {
        return Err(Refusal::NameClash("volume"));
    }

    let mut ops = Vec::new();
    let sidecar = to_value(&sidecar_container(config));
    if spec.init_containers.is_none() {
        ops.push(add(&["spec", "initContainers"], json!([sidecar])));
    } else {
        // First, so regular init containers and app containers all start after it.
        ops.push(add(&["spec", "initContainers", "0"], sidecar));
    }
    let volume = to_value(&proxy_volume(&name));
    match &spec.volumes {
        None => ops.push(add(&["spec", "volumes"], json!([volume]))),
        Some(_) => ops.push(add(&["spec", "volumes", "-"], volume)),
    }
    for (i, container) in spec.containers.iter().enumerate() {
        env_ops(&mut ops, i, container, config);
    }
    ops.push(add(
        &["metadata", "annotations", annotations::INJECTED],
        Value::String(name),
    ));
    Ok(Some(Patch(ops)))
}

/// Replaces ANTHROPIC_BASE_URL / ANTHROPIC_API_KEY in place, drops ANTHROPIC_AUTH_TOKEN (which
/// SDKs would prefer over the placeholder), and appends whichever of the two was missing.
fn env_ops(ops: &mut Vec<PatchOperation>, i: usize, container: &Container, config: &SidecarConfig) {
    let idx = i.to_string();
    let wanted = [
        (BASE_URL, format!("http://127.0.0.1:{}", config.port)),
        (API_KEY, SIDECAR_PLACEHOLDER.to_string()),
    ];
    let Some(env) = &container.env else {
        let vars: Vec<Value> = wanted
            .iter()
            .map(|(n, v)| to_value(&plain_env(n, v)))
            .collect();
        ops.push(add(
            &["spec", "containers", &idx, "env"],
            Value::Array(vars),
        ));
        return;
    };
    let mut removals = Vec::new();
    let mut present = [false; 2];
    for (j, var) in env.iter().enumerate() {
        let at = j.to_string();
        if let Some(w) = wanted.iter().position(|(n, _)| *n == var.name) {
            let value = to_value(&plain_env(wanted[w].0, &wanted[w].1));
            if present[w] {
                removals.push(at);
            } else {
                present[w] = true;
                ops.push(replace(&["spec", "containers", &idx, "env", &at], value));
            }
        } else if var.name == AUTH_TOKEN {
            removals.push(at);
        }
    }
    for at in removals.iter().rev() {
        ops.push(PatchOperation::Remove(RemoveOperation {
            path: pointer(&["spec", "containers", &idx, "env", at]),
        }));
    }
    for (w, (name, value)) in wanted.iter().enumerate() {
        if !present[w] {
            ops.push(add(
                &["spec", "containers", &idx, "env", "-"],
                to_value(&plain_env(name, value)),
            ));
        }
    }
}

fn pointer(tokens: &[&str]) -> PointerBuf {
    PointerBuf::from_tokens(tokens.iter().copied())
}

fn add(tokens: &[&str], value: Value) -> PatchOperation {
    PatchOperation::Add(AddOperation {
        path: pointer(tokens),
        value,
    })
}

fn replace(tokens: &[&str], value: Value) -> PatchOperation {
    PatchOperation::Replace(ReplaceOperation {
        path: pointer(tokens),
        value,
    })
}

fn to_value<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).expect("k8s-openapi types always serialize")
}

fn plain_env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value: Some(value.to_string()),
        value_from: None,
    }
}

fn field_env(name: &str, path: &str) -> EnvVar {
    let field_ref = ObjectFieldSelector {
        field_path: path.to_string(),
        api_version: None,
    };
    EnvVar {
        name: name.to_string(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(field_ref),
            ..Default::default()
        }),
    }
}

fn quantities(map: &BTreeMap<String, String>) -> Option<BTreeMap<String, Quantity>> {
    (!map.is_empty()).then(|| {
        map.iter()
            .map(|(k, v)| (k.clone(), Quantity(v.clone())))
            .collect()
    })
}

/// The sidecar's body budget for its memory limit: half of it (the other half is the proxy's
/// own few MiB and the responses it buffers), so a large request is refused rather than the
/// sidecar killed for its memory. `None` (the proxy's default) for no limit or one this does
/// not read.
fn body_budget_mib(memory_limit: &str) -> Option<u64> {
    let bytes = memory_bytes(memory_limit)?;
    Some(((bytes / 2) >> 20).max(1))
}

/// The bytes of a Kubernetes memory quantity: a number with an optional binary (`Ki`…`Ei`) or
/// decimal (`k`…`E`) suffix. Others (milli-bytes, exponents) give `None`.
fn memory_bytes(quantity: &str) -> Option<u64> {
    let split = quantity
        .find(|c: char| c.is_ascii_alphabetic())
        .unwrap_or(quantity.len());
    let (number, suffix) = quantity.split_at(split);
    let scale: u64 = match suffix {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        "Ei" => 1 << 60,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "P" => 1_000_000_000_000_000,
        "E" => 1_000_000_000_000_000_000,
        _ => return None,
    };
    let number: f64 = number
        .parse()
        .ok()
        .filter(|n: &f64| n.is_finite() && *n >= 0.0)?;
    Some((number * scale as f64).min(u64::MAX as f64) as u64)
}

/// The proxy as a native sidecar: an init container with `restartPolicy: Always`, hardened.
pub fn sidecar_container(config: &SidecarConfig) -> Container {
    let mut args = vec![
        "proxy".to_string(),
        "--config-dir".to_string(),
        PROXY_CONFIG_DIR.to_string(),
        "--listen".to_string(),
        format!("127.0.0.1:{}", config.port),
        "--metrics-listen".to_string(),
        format!("0.0.0.0:{}", config.metrics_port),
        "--mode".to_string(),
        "sidecar".to_string(),
        "--upstream".to_string(),
        config.upstream.clone(),
        "--audit-log".to_string(),
        "-".to_string(),
    ];
    if let Some(mib) = config.limits.get("memory").and_then(|q| body_budget_mib(q)) {
        args.extend(["--body-budget-mib".to_string(), mib.to_string()]);
    }
    if let Some(url) = &config.redis_url {
        // The kubelet expands $(POD_NAMESPACE) from the env below: one spec for every
        // namespace, and each sidecar logs in as its own namespace's user.
        args.extend([
            "--redis-url".to_string(),
            url.clone(),
            "--redis-username".to_string(),
            namespace_user("$(POD_NAMESPACE)"),
            "--redis-password-file".to_string(),
            format!("{PROXY_CONFIG_DIR}/{SIDECAR_PASSWORD_ENTRY}"),
        ]);
    }
    let probe = Probe {
        http_get: Some(HTTPGetAction {
            path: Some("/readyz".to_string()),
            port: IntOrString::Int(i32::from(config.metrics_port)),
            ..Default::default()
        }),
        period_seconds: Some(5),
        ..Default::default()
    };
    let security_context = SecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(SIDECAR_UID),
        run_as_group: Some(SIDECAR_UID),
        read_only_root_filesystem: Some(true),
        allow_privilege_escalation: Some(false),
        privileged: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".to_string()]),
            add: None,
        }),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".to_string(),
            localhost_profile: None,
        }),
        ..Default::default()
    };
    Container {
        name: SIDECAR_NAME.to_string(),
        image: Some(config.image.clone()),
        args: Some(args),
        restart_policy: Some("Always".to_string()),
        env: Some(vec![
            field_env("POD_NAME", "metadata.name"),
            field_env("POD_NAMESPACE", "metadata.namespace"),
        ]),
        ports: Some(vec![k8s_openapi::api::core::v1::ContainerPort {
            name: Some("ck-metrics".to_string()),
            container_port: i32::from(config.metrics_port),
            ..Default::default()
        }]),
        // Native sidecar semantics: the kubelet starts the next container only once the
        // startupProbe passed, so apps never start before the proxy listens (up to 60 s).
        startup_probe: Some(Probe {
            period_seconds: Some(1),
            failure_threshold: Some(60),
            ..probe.clone()
        }),
        // `/healthz` fails only when the proxy can no longer serve at all (its audit writer has
        // stopped): restarting the sidecar is the mend.
        liveness_probe: Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/healthz".to_string()),
                ..probe.http_get.clone().unwrap_or_default()
            }),
            period_seconds: Some(10),
            failure_threshold: Some(3),
            ..probe.clone()
        }),
        readiness_probe: Some(probe),
        resources: Some(ResourceRequirements {
            requests: quantities(&config.requests),
            limits: quantities(&config.limits),
            ..Default::default()
        }),
        security_context: Some(security_context),
        volume_mounts: Some(vec![VolumeMount {
            name: PROXY_VOLUME.to_string(),
            mount_path: PROXY_CONFIG_DIR.to_string(),
            read_only: Some(true),
            ..Default::default()
        }]),
        ..Default::default()
    }
}

fn proxy_volume(claudekey: &str) -> Volume {
    Volume {
        name: PROXY_VOLUME.to_string(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(proxy_secret_name(claudekey)),
            optional: Some(false),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
#[path = "mutate_tests.rs"]
mod tests;
