//! The one rule engine behind the validating webhook, the mutating webhook's refusals and
//! `claudekey scan` (DESIGN.md §5): pure functions from k8s-openapi objects to [`Finding`]s.
//! A finding names resource, container and field, says what to do instead, and carries at most a
//! masked hint of the offending value.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{Container, EnvFromSource, EnvVar, Pod, PodSpec, VolumeMount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Serialize;

use super::keyshape::{self, Encoding};
use crate::crd::{annotations, proxy_secret_name};

/// Name of the proxy sidecar the mutating webhook injects.
pub const SIDECAR_NAME: &str = "claudekey-proxy";

/// What to do instead of putting a key into a spec; part of every key finding.
const KEY_ADVICE: &str = "keep keys out of pod specs: create a ClaudeKey and annotate the pod with claudekey.io/inject: <ClaudeKey>, or read the key from a Secret with valueFrom.secretKeyRef";

/// Which rule a finding comes from; stable identifiers for `scan --format json`.
#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "kebab-case")]
pub enum RuleId {
    /// (a) an env literal that looks like an Anthropic credential.
    KeyInEnv,
    /// (a) a key-named variable with a literal value.
    LiteralKeyVariable,
    /// (b) a credential (or a literal key assignment) in command or args.
    KeyInCommand,
    /// (c) a container other than the sidecar reads a `<name>-proxy` Secret.
    ProxySecretReference,
}

/// One problem in one container; `message` is what users see, everywhere.
#[derive(Serialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Finding {
    /// Which rule.
    pub rule: RuleId,
    /// `Kind/name` of the object.
    pub resource: String,
    /// Container name.
    pub container: String,
    /// Where in the container: `env NAME`, `args[2]`, `volume NAME`, `envFrom`.
    pub field: String,
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

/// The kinds whose pod specs the rules look at.
#[derive(Clone, Debug)]
pub enum Workload {
    /// A Pod.
    Pod(Box<Pod>),
    /// A Deployment's pod template.
    Deployment(Box<Deployment>),
    /// A StatefulSet's pod template.
    StatefulSet(Box<StatefulSet>),
    /// A DaemonSet's pod template.
    DaemonSet(Box<DaemonSet>),
    /// A ReplicaSet's pod template.
    ReplicaSet(Box<ReplicaSet>),
    /// A Job's pod template.
    Job(Box<Job>),
    /// A CronJob's job template's pod template.
    CronJob(Box<CronJob>),
}

impl Workload {
    /// Parses `value` as the workload `kind` of API `group` (`""` for core); `Ok(None)` for
    /// kinds the rules do not cover, an error when a covered kind does not parse.
    pub fn from_parts(
        group: &str,
        kind: &str,
        value: serde_json::Value,
    ) -> Result<Option<Self>, serde_json::Error> {
        fn boxed<T: serde::de::DeserializeOwned>(
            v: serde_json::Value,
        ) -> Result<Box<T>, serde_json::Error> {
            serde_json::from_value(v).map(Box::new)
        }
        Ok(Some(match (group, kind) {
            ("", "Pod") => Self::Pod(boxed(value)?),
            ("apps", "Deployment") => Self::Deployment(boxed(value)?),
            ("apps", "StatefulSet") => Self::StatefulSet(boxed(value)?),
            ("apps", "DaemonSet") => Self::DaemonSet(boxed(value)?),
            ("apps", "ReplicaSet") => Self::ReplicaSet(boxed(value)?),
            ("batch", "Job") => Self::Job(boxed(value)?),
            ("batch", "CronJob") => Self::CronJob(boxed(value)?),
            _ => return Ok(None),
        }))
    }

    /// Parses a manifest by its own `apiVersion` and `kind` (what `scan` reads).
    pub fn from_manifest(value: serde_json::Value) -> Result<Option<Self>, serde_json::Error> {
        let api_version = value
            .get("apiVersion")
            .and_then(|v| v.as_str())
            .unwrap_or_default();
        let kind = value
            .get("kind")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string();
        let group = api_version
            .rsplit_once('/')
            .map_or("", |(g, _)| g)
            .to_string();
        Self::from_parts(&group, &kind, value)
    }

    /// The kind, as users write it.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Pod(_) => "Pod",
            Self::Deployment(_) => "Deployment",
            Self::StatefulSet(_) => "StatefulSet",
            Self::DaemonSet(_) => "DaemonSet",
            Self::ReplicaSet(_) => "ReplicaSet",
            Self::Job(_) => "Job",
            Self::CronJob(_) => "CronJob",
        }
    }

    /// The object's own metadata.
    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            Self::Pod(o) => &o.metadata,
            Self::Deployment(o) => &o.metadata,
            Self::StatefulSet(o) => &o.metadata,
            Self::DaemonSet(o) => &o.metadata,
            Self::ReplicaSet(o) => &o.metadata,
            Self::Job(o) => &o.metadata,
            Self::CronJob(o) => &o.metadata,
        }
    }

    /// `Kind/name` (or `Kind/<generateName>…` before the apiserver names it).
    pub fn resource(&self) -> String {
        let meta = self.metadata();
        let name = match (&meta.name, &meta.generate_name) {
            (Some(name), _) if !name.is_empty() => name.clone(),
            (_, Some(prefix)) => format!("{prefix}…"),
            _ => "<unnamed>".to_string(),
        };
        format!("{}/{name}", self.kind())
    }

    /// The pod metadata and spec the rules check: the Pod's own, or the template's.
    pub fn pod(&self) -> Option<(Option<&ObjectMeta>, &PodSpec)> {
        let template = match self {
            Self::Pod(o) => return o.spec.as_ref().map(|s| (Some(&o.metadata), s)),
            Self::Deployment(o) => o.spec.as_ref().map(|s| &s.template),
            Self::StatefulSet(o) => o.spec.as_ref().map(|s| &s.template),
            Self::DaemonSet(o) => o.spec.as_ref().map(|s| &s.template),
            Self::ReplicaSet(o) => o.spec.as_ref().and_then(|s| s.template.as_ref()),
            Self::Job(o) => o.spec.as_ref().map(|s| &s.template),
            Self::CronJob(o) => o
                .spec
                .as_ref()
                .and_then(|s| s.job_template.spec.as_ref())
                .map(|s| &s.template),
        }?;
        template
            .spec
            .as_ref()
            .map(|s| (template.metadata.as_ref(), s))
    }
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

/// Runs rules (a)–(c) on a workload.
pub fn check(workload: &Workload, ctx: &Context<'_>) -> Vec<Finding> {
    match workload.pod() {
        Some((meta, spec)) => check_pod_spec(&workload.resource(), meta, spec, ctx),
        None => Vec::new(),
    }
}

/// A container of any of the three lists, seen through the fields the rules read.
struct ContainerView<'a> {
    label: String,
    name: &'a str,
    env: &'a [EnvVar],
    env_from: &'a [EnvFromSource],
    command: &'a [String],
    args: &'a [String],
    mounts: &'a [VolumeMount],
    /// The `-proxy` Secret this container may read: only the injected sidecar has one.
    exempt_secret: Option<String>,
}

fn slice<T>(v: &Option<Vec<T>>) -> &[T] {
    v.as_deref().unwrap_or_default()
}

/// The view of one container of any of the three lists: `Container` and `EphemeralContainer`
/// share these fields but no trait.
macro_rules! view {
    ($what:literal, $c:expr, $exempt_secret:expr) => {{
        let c = $c;
        ContainerView {
            label: format!(concat!($what, " \"{}\""), c.name),
            name: &c.name,
            env: slice(&c.env),
            env_from: slice(&c.env_from),
            command: slice(&c.command),
            args: slice(&c.args),
            mounts: slice(&c.volume_mounts),
            exempt_secret: $exempt_secret,
        }
    }};
}

fn containers<'a>(
    meta: Option<&ObjectMeta>,
    spec: &'a PodSpec,
    ctx: &Context<'_>,
) -> Vec<ContainerView<'a>> {
    let inject = meta
        .and_then(|m| m.annotations.as_ref())
        .and_then(|a| a.get(annotations::INJECT));
    let mut views = Vec::new();
    for c in slice(&spec.init_containers) {
        let is_sidecar = c.name == SIDECAR_NAME
            && c.restart_policy.as_deref() == Some("Always")
            && ctx
                .sidecar
                .is_none_or(|expected| runs_injected_sidecar(c, expected));
        let exempt = inject
            .filter(|_| is_sidecar)
            .map(|ck| proxy_secret_name(ck));
        views.push(view!("init container", c, exempt));
    }
    for c in &spec.containers {
        views.push(view!("container", c, None));
    }
    for c in slice(&spec.ephemeral_containers) {
        views.push(view!("ephemeral container", c, None));
    }
    views
}

/// True when `c` runs exactly the injected proxy (fields the apiserver does not default).
fn runs_injected_sidecar(c: &Container, expected: &Container) -> bool {
    c.image == expected.image
        && c.command == expected.command
        && c.args == expected.args
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
    let protected: BTreeMap<String, &str> = ctx
        .claudekeys
        .iter()
        .map(|ck| (proxy_secret_name(ck), ck.as_str()))
        .collect();
    let secret_volumes = protected_volumes(spec, &protected);
    let mut findings = Vec::new();
    for view in containers(meta, spec, ctx) {
        let mut out = Out {
            resource,
            view: &view,
            findings: &mut findings,
        };
        check_env(&mut out);
        check_command(&mut out);
        check_proxy_secret(&mut out, &protected, &secret_volumes);
    }
    findings
}

/// Collects findings for one container.
struct Out<'a, 'b> {
    resource: &'a str,
    view: &'a ContainerView<'b>,
    findings: &'a mut Vec<Finding>,
}

impl Out<'_, '_> {
    fn push(
        &mut self,
        rule: RuleId,
        field: String,
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
            hint,
            message,
        });
    }
}

fn encoded(encoding: Encoding) -> &'static str {
    match encoding {
        Encoding::Plain => "an",
        Encoding::Base64 => "a base64-encoded",
    }
}

fn check_env(out: &mut Out<'_, '_>) {
    for var in out.view.env {
        let Some(value) = var.value.as_deref() else {
            continue;
        };
        let field = format!("env {}", var.name);
        if let Some(found) = keyshape::find_key(value) {
            let what = format!(
                "holds {} Anthropic key ({})",
                encoded(found.encoding),
                found.hint
            );
            out.push(RuleId::KeyInEnv, field, Some(found.hint), what, KEY_ADVICE);
        } else if keyshape::is_key_variable(&var.name) && !keyshape::is_allowed_literal(value) {
            let hint = crate::keys::masked_hint(value);
            let what = format!("is a key variable set to a literal value ({hint})");
            out.push(
                RuleId::LiteralKeyVariable,
                field,
                Some(hint),
                what,
                KEY_ADVICE,
            );
        }
    }
}

fn check_command(out: &mut Out<'_, '_>) {
    let lists = [("command", out.view.command), ("args", out.view.args)];
    for (list, items) in lists {
        for (i, item) in items.iter().enumerate() {
            let field = format!("{list}[{i}]");
            if let Some(found) = keyshape::find_key(item) {
                let what = format!(
                    "holds {} Anthropic key ({})",
                    encoded(found.encoding),
                    found.hint
                );
                out.push(
                    RuleId::KeyInCommand,
                    field,
                    Some(found.hint),
                    what,
                    KEY_ADVICE,
                );
            } else if let Some((var, hint)) =
                keyshape::find_key_assignments(item).into_iter().next()
            {
                let what = format!("assigns a literal value to {var} ({hint})");
                out.push(RuleId::KeyInCommand, field, Some(hint), what, KEY_ADVICE);
            }
        }
    }
}

/// Volume name → (protected Secret, its ClaudeKey) for Secret and projected volumes.
fn protected_volumes<'a>(
    spec: &PodSpec,
    protected: &BTreeMap<String, &'a str>,
) -> BTreeMap<String, (String, &'a str)> {
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
            out.insert(volume.name.clone(), (secret.clone(), *ck));
        }
    }
    out
}

fn check_proxy_secret(
    out: &mut Out<'_, '_>,
    protected: &BTreeMap<String, &str>,
    volumes: &BTreeMap<String, (String, &str)>,
) {
    let exempt = out.view.exempt_secret.clone();
    let allowed = |secret: &str| exempt.as_deref() == Some(secret);
    let mut hits: Vec<(String, String, &str)> = Vec::new();
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
                ck,
            ));
        }
    }
    for source in out.view.env_from {
        let secret = source.secret_ref.as_ref().map(|r| r.name.as_str());
        if let Some((secret, ck)) = secret.and_then(|s| protected.get_key_value(s)) {
            hits.push(("envFrom".to_string(), format!("loads Secret {secret}"), ck));
        }
    }
    for mount in out.view.mounts {
        if let Some((secret, ck)) = volumes.get(&mount.name) {
            let what = format!("mounts Secret {secret} at {}", mount.mount_path);
            hits.push((format!("volume {}", mount.name), what, ck));
        }
    }
    let unique: BTreeSet<_> = hits.into_iter().collect();
    for (field, what, ck) in unique {
        if allowed(&proxy_secret_name(ck)) {
            continue;
        }
        let what = format!("{what}, which only the claudekey proxy sidecar may read");
        let advice = format!(
            "annotate the pod with claudekey.io/inject: {ck} instead, or use Secret {ck}-client with a gateway proxy"
        );
        out.push(RuleId::ProxySecretReference, field, None, what, &advice);
    }
}
