//! Rendering the Helm chart and reading what it rendered, for tests/chart.rs.

pub mod day2;
pub mod metric_names;
pub mod shared_limits;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Container, PodSpec};
use k8s_openapi::api::rbac::v1::PolicyRule;
use serde::Deserialize;
use serde::de::DeserializeOwned;

pub const NS: &str = "ck-test";
pub const RELEASE: &str = "claudekey";

pub fn chart() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("charts/claudekey")
}

pub fn helm() -> String {
    std::env::var("CLAUDEKEY_TEST_HELM").unwrap_or_else(|_| {
        panic!("CLAUDEKEY_TEST_HELM is not set: source the control plane's env file (hack/control-plane.sh), which names the helm built by hack/tools.sh")
    })
}

/// `helm template` text for a ci/ scenario plus extra `--set`s, or the error text.
pub fn try_render_text(scenario: &str, sets: &[&str]) -> Result<String, String> {
    let values = chart().join(format!("ci/{scenario}-values.yaml"));
    let mut cmd = Command::new(helm());
    cmd.args(["template", RELEASE])
        .arg(chart())
        .args(["-n", NS, "-f"])
        .arg(values);
    for s in sets {
        cmd.args(["--set", s]);
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", helm()));
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(String::from_utf8(out.stdout).expect("utf-8"))
}

/// `helm template` output for a ci/ scenario plus extra `--set`s, or the error text.
pub fn try_render(scenario: &str, sets: &[&str]) -> Result<Vec<serde_yaml::Value>, String> {
    let text = try_render_text(scenario, sets)?;
    Ok(serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde_yaml::Value::deserialize(d).expect("rendered YAML parses"))
        .filter(|v| !v.is_null())
        .collect())
}

pub fn render(scenario: &str) -> Vec<serde_yaml::Value> {
    try_render(scenario, &[]).unwrap_or_else(|e| panic!("helm template ({scenario}): {e}"))
}

pub fn all<T: DeserializeOwned>(docs: &[serde_yaml::Value], kind: &str) -> Vec<T> {
    docs.iter()
        .filter(|d| d["kind"].as_str() == Some(kind))
        .map(|d| serde_yaml::from_value(d.clone()).unwrap_or_else(|e| panic!("{kind}: {e}")))
        .collect()
}

pub fn one<T: DeserializeOwned>(docs: &[serde_yaml::Value], kind: &str, name: &str) -> T {
    let d = docs
        .iter()
        .find(|d| d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no {kind} {name}"));
    serde_yaml::from_value(d.clone()).unwrap_or_else(|e| panic!("{kind} {name}: {e}"))
}

pub fn names(docs: &[serde_yaml::Value], kind: &str) -> BTreeSet<String> {
    docs.iter()
        .filter(|d| d["kind"].as_str() == Some(kind))
        .map(|d| d["metadata"]["name"].as_str().expect("name").to_string())
        .collect()
}

/// Whether a rendered document is a `helm test` hook (rendered by `helm template`, created
/// only by `helm test`).
pub fn is_test_hook(d: &serde_yaml::Value) -> bool {
    d["metadata"]["annotations"]["helm.sh/hook"].as_str() == Some("test")
}

/// Names of one kind, without `helm test` hooks.
pub fn non_test(docs: &[serde_yaml::Value], kind: &str) -> BTreeSet<String> {
    let installed: Vec<serde_yaml::Value> =
        docs.iter().filter(|d| !is_test_hook(d)).cloned().collect();
    names(&installed, kind)
}

pub fn pod(d: &Deployment) -> &PodSpec {
    d.spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("pod spec")
}

pub fn args(c: &Container) -> Vec<String> {
    c.args.clone().unwrap_or_default()
}

pub fn assert_hardened(d: &Deployment) {
    let name = d.metadata.name.as_deref().unwrap_or_default();
    let p = pod(d);
    let psc = p
        .security_context
        .as_ref()
        .unwrap_or_else(|| panic!("{name}: pod securityContext"));
    assert_eq!(psc.run_as_non_root, Some(true), "{name}: runAsNonRoot");
    assert_eq!(
        psc.seccomp_profile.as_ref().map(|s| s.type_.as_str()),
        Some("RuntimeDefault"),
        "{name}: seccomp"
    );
    for c in p
        .containers
        .iter()
        .chain(p.init_containers.iter().flatten())
    {
        let sc = c
            .security_context
            .as_ref()
            .unwrap_or_else(|| panic!("{name}/{}: securityContext", c.name));
        assert_eq!(
            sc.allow_privilege_escalation,
            Some(false),
            "{name}/{}",
            c.name
        );
        assert_eq!(
            sc.read_only_root_filesystem,
            Some(true),
            "{name}/{}",
            c.name
        );
        assert_eq!(sc.run_as_non_root, Some(true), "{name}/{}", c.name);
        assert_eq!(sc.run_as_user, Some(65532), "{name}/{}", c.name);
        let drop = sc
            .capabilities
            .as_ref()
            .and_then(|c| c.drop.clone())
            .unwrap_or_default();
        assert_eq!(drop, vec!["ALL".to_string()], "{name}/{}: drop ALL", c.name);
        let res = c
            .resources
            .as_ref()
            .unwrap_or_else(|| panic!("{name}/{}: resources", c.name));
        assert!(
            res.requests
                .as_ref()
                .is_some_and(|r| r.contains_key("cpu") && r.contains_key("memory")),
            "{name}/{}: requests",
            c.name
        );
        assert!(
            res.limits
                .as_ref()
                .is_some_and(|r| r.contains_key("memory")),
            "{name}/{}: memory limit",
            c.name
        );
        assert!(
            c.liveness_probe.is_some() && c.readiness_probe.is_some(),
            "{name}/{}: probes",
            c.name
        );
    }
}

pub fn rules(r: &[PolicyRule]) -> BTreeSet<String> {
    r.iter()
        .flat_map(|p| {
            let groups = p.api_groups.clone().unwrap_or_default();
            let resources = p.resources.clone().unwrap_or_default();
            let names = p.resource_names.clone().unwrap_or_default().join(",");
            groups.into_iter().flat_map(move |g| {
                let names = names.clone();
                let verbs = p.verbs.clone();
                resources.clone().into_iter().flat_map(move |r| {
                    let (g, names) = (g.clone(), names.clone());
                    verbs
                        .clone()
                        .into_iter()
                        .map(move |v| format!("{g}/{r}[{names}]:{v}"))
                })
            })
        })
        .collect()
}

pub fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}
