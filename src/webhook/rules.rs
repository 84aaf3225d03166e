//! The one rule engine behind the validating webhook, the mutating webhook's refusals and
//! `claudekey scan` (DESIGN.md §5): pure functions from k8s-openapi objects to [`Finding`]s.
//! A finding names resource, container and field, says what to do instead, and carries at most a
//! masked hint of the offending value.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Container, PodSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::{keyrules, preconditions};
use crate::crd::proxy_secret_name;

pub(super) use super::finding::{ContainerView, Out, inject_annotation};
pub use super::finding::{Finding, IDENTITY_TOKEN_PATH, RuleId, SIDECAR_NAME};
pub use super::workload::Workload;

/// What the rules need to know beyond the object itself.
#[derive(Clone, Copy, Debug, Default)]
pub struct Context<'a> {
    /// Names of the ClaudeKeys in the object's namespace, whose `-proxy` Secrets are protected.
    pub claudekeys: &'a [String],
    /// The sidecar the webhook injects. When set, only an init container that runs exactly it
    /// (image, command, args, securityContext, no lifecycle hooks) is exempt from rule (c), so
    /// a look-alike named `claudekey-proxy` cannot run other code with the proxy Secret mounted.
    /// `scan` does not know it and exempts any native sidecar of that name.
    pub sidecar: Option<&'a Container>,
}

/// A parse error safe to show: serde quotes offending values (`invalid type: string "sk-ant-…"`),
/// and such a value may be the very key the rules exist to keep out of messages.
pub fn scrub_parse_error(error: &serde_json::Error) -> String {
    scrub_quoted(&error.to_string())
}

/// Replaces quoted values in a parser message with `"…"`, keeping short backticked field names.
pub fn scrub_quoted(text: &str) -> String {
    static QUOTED: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
        regex::Regex::new(r#""(?:[^"\\]|\\.)*"|`[^`]*`"#).expect("static regex")
    });
    QUOTED
        .replace_all(text, |c: &regex::Captures<'_>| {
            let m = &c[0];
            let is_name = m.starts_with('`')
                && m.len() <= 42
                && m[1..m.len() - 1]
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || ch == '_');
            if is_name {
                m.to_string()
            } else {
                "\"…\"".to_string()
            }
        })
        .into_owned()
}

/// Runs every rule on an object: rules (a)–(c) and the injection guards on its pod spec, or
/// the ConfigMap rule.
pub fn check(workload: &Workload, ctx: &Context<'_>) -> Vec<Finding> {
    if let Workload::ConfigMap(cm) = workload {
        return keyrules::check_configmap(&workload.resource(), cm);
    }
    match workload.pod_at() {
        Some((meta, spec, path)) => {
            let mut findings = preconditions::check(&workload.resource(), meta, spec, path);
            findings.extend(check_pod_spec_at(
                &workload.resource(),
                meta,
                spec,
                path,
                ctx,
            ));
            findings
        }
        None => Vec::new(),
    }
}

fn slice<T>(v: &Option<Vec<T>>) -> &[T] {
    v.as_deref().unwrap_or_default()
}

/// The view of one container of any of the three lists: `Container` and `EphemeralContainer`
/// share these fields but no trait.
macro_rules! view {
    ($what:literal, $c:expr, $path:expr, $target:expr, $exempt_secret:expr) => {{
        let c = $c;
        ContainerView {
            label: format!(concat!($what, " \"{}\""), c.name),
            name: &c.name,
            env: slice(&c.env),
            env_from: slice(&c.env_from),
            mounts: slice(&c.volume_mounts),
            value: serde_json::to_value(c).unwrap_or_default(),
            path: $path,
            target: $target,
            exempt_secret: $exempt_secret,
        }
    }};
}

fn containers<'a>(
    meta: Option<&ObjectMeta>,
    spec: &'a PodSpec,
    path: &str,
    ctx: &Context<'_>,
) -> Vec<ContainerView<'a>> {
    let inject = inject_annotation(meta);
    let mut views = Vec::new();
    for (i, c) in slice(&spec.init_containers).iter().enumerate() {
        let is_sidecar = c.name == SIDECAR_NAME
            && c.restart_policy.as_deref() == Some("Always")
            && ctx
                .sidecar
                .is_none_or(|expected| runs_injected_sidecar(c, expected));
        let exempt = inject.filter(|_| is_sidecar).map(proxy_secret_name);
        let at = format!("{path}.initContainers[{i}]");
        views.push(view!("init container", c, at, None, exempt));
    }
    for (i, c) in spec.containers.iter().enumerate() {
        let at = format!("{path}.containers[{i}]");
        views.push(view!("container", c, at, None, None));
    }
    for (i, c) in slice(&spec.ephemeral_containers).iter().enumerate() {
        let at = format!("{path}.ephemeralContainers[{i}]");
        let target = c.target_container_name.as_deref();
        views.push(view!("ephemeral container", c, at, target, None));
    }
    views
}

/// True when the container named `name` (empty: the pod-level settings) is the same in both
/// pods, in whichever list it is.
pub fn same_container(
    old: &k8s_openapi::api::core::v1::Pod,
    new: &k8s_openapi::api::core::v1::Pod,
    name: &str,
) -> bool {
    fn find(pod: &k8s_openapi::api::core::v1::Pod, name: &str) -> Option<serde_json::Value> {
        let spec = pod.spec.as_ref()?;
        if name.is_empty() {
            let mut pod_level = serde_json::to_value(spec).ok()?;
            for list in ["initContainers", "containers", "ephemeralContainers"] {
                pod_level.as_object_mut()?.remove(list);
            }
            return Some(pod_level);
        }
        let init = slice(&spec.init_containers).iter();
        let found = init
            .chain(spec.containers.iter())
            .find(|c| c.name == name)
            .map(serde_json::to_value);
        match found {
            Some(v) => v.ok(),
            None => slice(&spec.ephemeral_containers)
                .iter()
                .find(|c| c.name == name)
                .and_then(|c| serde_json::to_value(c).ok()),
        }
    }
    find(old, name).is_some_and(|o| Some(o) == find(new, name))
}

/// True when `c` runs exactly the injected proxy (fields the apiserver does not default).
fn runs_injected_sidecar(c: &Container, expected: &Container) -> bool {
    // A federation source's sidecar has one more flag, with the one fixed path.
    let federated = expected.args.as_ref().map(|args| {
        let mut args = args.clone();
        args.extend([
            "--identity-token-file".to_string(),
            IDENTITY_TOKEN_PATH.to_string(),
        ]);
        args
    });
    c.image == expected.image
        && c.command == expected.command
        && (c.args == expected.args || c.args == federated)
        && c.security_context == expected.security_context
        && c.lifecycle.is_none()
}

/// Runs rules (a)–(c) on one pod spec; `resource` is the `Kind/name` findings name.
pub fn check_pod_spec(
    resource: &str,
    meta: Option<&ObjectMeta>,
    spec: &PodSpec,
    ctx: &Context<'_>,
) -> Vec<Finding> {
    check_pod_spec_at(resource, meta, spec, "spec", ctx)
}

fn check_pod_spec_at(
    resource: &str,
    meta: Option<&ObjectMeta>,
    spec: &PodSpec,
    path: &str,
    ctx: &Context<'_>,
) -> Vec<Finding> {
    let mut protected: BTreeMap<String, String> = ctx
        .claudekeys
        .iter()
        .map(|ck| (proxy_secret_name(ck), ck.clone()))
        .collect();
    // The ClaudeKey a pod is injected with stays protected even if the cache does not (yet, or
    // any more) know it: its Secret is mounted in the pod.
    if let Some(ck) = inject_annotation(meta).filter(|ck| !ck.is_empty()) {
        protected.insert(proxy_secret_name(ck), ck.to_string());
    }
    let secret_volumes = protected_volumes(spec, &protected);
    let mut findings = Vec::new();
    for view in containers(meta, spec, path, ctx) {
        let mut out = Out {
            resource,
            view: &view,
            findings: &mut findings,
        };
        keyrules::check_env(&mut out);
        keyrules::check_identity_token(&mut out);
        keyrules::check_strings(&mut out);
        check_proxy_secret(&mut out, &protected, &secret_volumes);
        check_target(&mut out);
    }
    findings
}

/// `kubectl debug --target=claudekey-proxy` puts the debugger into the proxy's process
/// namespace, where `/proc/<pid>/root` and `/proc/<pid>/mem` hold the upstream key.
fn check_target(out: &mut Out<'_, '_>) {
    if out.view.target == Some(SIDECAR_NAME) {
        out.push(
            RuleId::TargetsSidecar,
            "targetContainerName".to_string(),
            None,
            format!("joins the process namespace of {SIDECAR_NAME:?}, where the proxy's files and memory hold the upstream key"),
            "debug the app container instead (kubectl debug --target=<app container>); claudekey.io/inject pods keep the proxy out of reach",
        );
    }
}

/// Volume name → (protected Secret, its ClaudeKey) for Secret and projected volumes.
fn protected_volumes(
    spec: &PodSpec,
    protected: &BTreeMap<String, String>,
) -> BTreeMap<String, (String, String)> {
    let mut out = BTreeMap::new();
    for volume in slice(&spec.volumes) {
        let mut names: Vec<&str> = Vec::new();
        if let Some(name) = volume
            .secret
            .as_ref()
            .and_then(|s| s.secret_name.as_deref())
        {
            names.push(name);
        }
        if let Some(projected) = &volume.projected {
            names.extend(
                slice(&projected.sources)
                    .iter()
                    .filter_map(|s| s.secret.as_ref())
                    .map(|s| s.name.as_str()),
            );
        }
        if let Some((secret, ck)) = names.into_iter().find_map(|n| protected.get_key_value(n)) {
            out.insert(volume.name.clone(), (secret.clone(), ck.clone()));
        }
    }
    out
}

fn check_proxy_secret(
    out: &mut Out<'_, '_>,
    protected: &BTreeMap<String, String>,
    volumes: &BTreeMap<String, (String, String)>,
) {
    let exempt = out.view.exempt_secret.clone();
    let allowed = |secret: &str| exempt.as_deref() == Some(secret);
    let mut hits: Vec<(String, String, String)> = Vec::new();
    for var in out.view.env {
        let secret = var
            .value_from
            .as_ref()
            .and_then(|v| v.secret_key_ref.as_ref())
            .map(|r| r.name.as_str());
        if let Some((secret, ck)) = secret.and_then(|s| protected.get_key_value(s)) {
            hits.push((
                format!("env {}", var.name),
                format!("reads Secret {secret} (secretKeyRef)"),
                ck.clone(),
            ));
        }
    }
    for source in out.view.env_from {
        let secret = source.secret_ref.as_ref().map(|r| r.name.as_str());
        if let Some((secret, ck)) = secret.and_then(|s| protected.get_key_value(s)) {
            hits.push((
                "envFrom".to_string(),
                format!("loads Secret {secret}"),
                ck.clone(),
            ));
        }
    }
    for mount in out.view.mounts {
        if let Some((secret, ck)) = volumes.get(&mount.name) {
            let what = format!("mounts Secret {secret} at {}", mount.mount_path);
            hits.push((format!("volume {}", mount.name), what, ck.clone()));
        }
    }
    let unique: BTreeSet<_> = hits.into_iter().collect();
    for (field, what, ck) in unique {
        if allowed(&proxy_secret_name(&ck)) {
            continue;
        }
        let what = format!("{what}, which only the claudekey proxy sidecar may read");
        let advice = format!(
            "annotate the pod with claudekey.io/inject: {ck} instead, or use Secret {ck}-client with a gateway proxy"
        );
        out.push(RuleId::ProxySecretReference, field, None, what, &advice);
    }
}
