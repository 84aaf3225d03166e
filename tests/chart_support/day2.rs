//! The chart's day-2 surface (issue 20): CRDs as templates, NetworkPolicies, alerts and
//! dashboard as values, namespaced RBAC, the common values every chart is expected to have,
//! and the `helm test` hook.

use std::collections::BTreeSet;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::rbac::v1::{ClusterRole, Role, RoleBinding};
use serde::Deserialize;

use super::*;

fn yaml_docs(text: &str) -> Vec<serde_yaml::Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|d| serde_yaml::Value::deserialize(d).expect("YAML parses"))
        .filter(|v| !v.is_null())
        .collect()
}

/// The value with every number as f64, so `1` and `1.0` compare equal (as the apiserver sees them).
fn numbers_as_f64(v: &serde_yaml::Value) -> serde_json::Value {
    match v {
        serde_yaml::Value::Number(n) => serde_json::json!(n.as_f64()),
        serde_yaml::Value::Sequence(items) => items.iter().map(numbers_as_f64).collect(),
        serde_yaml::Value::Mapping(m) => m
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().unwrap_or_default().to_string(),
                    numbers_as_f64(v),
                )
            })
            .collect::<serde_json::Map<_, _>>()
            .into(),
        other => serde_json::to_value(other).expect("plain value"),
    }
}

fn chart_file(rel: &str) -> String {
    std::fs::read_to_string(chart().join(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
}

fn of_kind<'a>(docs: &'a [serde_yaml::Value], kind: &str) -> Vec<&'a serde_yaml::Value> {
    docs.iter()
        .filter(|d| d["kind"].as_str() == Some(kind))
        .collect()
}

/// Every document `claudekey crd` prints is rendered, with the same spec, Helm's labels and
/// the keep policy; however many kinds the binary defines.
#[test]
fn crds_are_every_document_of_claudekey_crd_kept_on_uninstall() {
    let generated = yaml_docs(&claudekey::crd::crd_yaml());
    assert!(!generated.is_empty());
    assert_eq!(
        chart_file("files/crds.yaml"),
        claudekey::crd::crd_yaml(),
        "charts/claudekey/files/crds.yaml is stale: cargo run -- crd > charts/claudekey/files/crds.yaml"
    );
    let docs = render("default");
    let rendered = of_kind(&docs, "CustomResourceDefinition");
    assert_eq!(rendered.len(), generated.len(), "one template per CRD");
    for want in &generated {
        let name = want["metadata"]["name"].as_str().expect("CRD name");
        let got = rendered
            .iter()
            .find(|d| d["metadata"]["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("CRD {name} not rendered"));
        // Helm's fromYaml/toYaml keeps values, not spellings (`1.0` comes back as `1`).
        assert!(
            numbers_as_f64(&got["spec"]) == numbers_as_f64(&want["spec"]),
            "{name}: spec differs from `claudekey crd`"
        );
        assert_eq!(
            got["metadata"]["annotations"]["helm.sh/resource-policy"].as_str(),
            Some("keep"),
            "{name}"
        );
        assert_eq!(
            got["metadata"]["labels"]["app.kubernetes.io/managed-by"].as_str(),
            Some("Helm"),
            "{name}"
        );
    }
    // Helm and kubectl read YAML 1.1: a bare off/on/yes/no value would reach the apiserver as a
    // boolean (an enum of strings holding `false`).
    let yaml11_bool = regex::Regex::new(
        r"^\s*(- |[A-Za-z0-9_.-]+: )(y|Y|yes|Yes|YES|n|N|no|No|NO|on|On|ON|off|Off|OFF)\s*$",
    )
    .expect("regex");
    let text = try_render_text("default", &[]).expect("render");
    for crd in text
        .split("\n---")
        .filter(|d| d.contains("kind: CustomResourceDefinition"))
    {
        if let Some(line) = crd.lines().find(|l| yaml11_bool.is_match(l)) {
            panic!("a YAML 1.1 parser reads {line:?} as a boolean");
        }
    }
    if claudekey::crd::crd_yaml().contains("- off\n") {
        assert!(text.contains("- \"off\""), "the enum value off is quoted");
    }
    let docs = try_render("default", &["crds.keep=false"]).expect("render");
    for d in of_kind(&docs, "CustomResourceDefinition") {
        assert!(d["metadata"]["annotations"]["helm.sh/resource-policy"].is_null());
    }
    assert!(of_kind(&render("namespaced"), "CustomResourceDefinition").is_empty());
}

fn policy_ports(p: &NetworkPolicy) -> Vec<(i32, bool)> {
    p.spec
        .as_ref()
        .and_then(|s| s.ingress.clone())
        .unwrap_or_default()
        .into_iter()
        .flat_map(|rule| {
            let open = rule.from.as_ref().is_none_or(|f| f.is_empty());
            rule.ports
                .unwrap_or_default()
                .into_iter()
                .map(move |port| match port.port {
                    Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n)) => {
                        (n, open)
                    }
                    other => panic!("port {other:?} is not a number"),
                })
        })
        .collect()
}

/// Ingress only, exactly the ports each component serves, selecting that component's pods.
#[test]
fn network_policies_admit_exactly_the_served_ports() {
    let docs = render("default");
    let want = [
        ("claudekey-controller", vec![(8080, true)]),
        ("claudekey-webhook", vec![(8443, true), (9443, true)]),
        ("claudekey-gateway", vec![(8443, true), (9484, true)]),
    ];
    assert_eq!(names(&docs, "NetworkPolicy").len(), want.len());
    for (name, ports) in want {
        let p: NetworkPolicy = one(&docs, "NetworkPolicy", name);
        let spec = p.spec.clone().expect("spec");
        assert_eq!(
            spec.policy_types,
            Some(vec!["Ingress".to_string()]),
            "{name}"
        );
        assert_eq!(policy_ports(&p), ports, "{name}");
        let d: Deployment = one(&docs, "Deployment", name);
        let selector = d.spec.expect("spec").selector.match_labels;
        assert_eq!(
            spec.pod_selector.and_then(|s| s.match_labels),
            selector,
            "{name} selects its pods"
        );
    }
    // Restricted metrics peers; the webhook port stays open to the apiserver.
    let docs = render("gateway");
    let p: NetworkPolicy = one(&docs, "NetworkPolicy", "claudekey-webhook");
    assert_eq!(policy_ports(&p), vec![(8443, true), (9443, false)]);
    assert!(names(&render("namespaced"), "NetworkPolicy").is_empty());
}

/// The alerts and the dashboard, from the chart's files, with the Grafana sidecar's label.
#[test]
fn alerts_and_dashboard_are_chart_values() {
    let docs = render("default");
    for kind in [
        "PrometheusRule",
        "ServiceMonitor",
        "PodMonitor",
        "ConfigMap",
    ] {
        assert!(
            non_test(&docs, kind).is_empty(),
            "{kind} rendered by default"
        );
    }
    let docs = render("gateway");
    let rule = of_kind(&docs, "PrometheusRule");
    assert_eq!(rule.len(), 1);
    let groups: serde_yaml::Value =
        serde_yaml::from_str(&chart_file("files/prometheus-rules.yaml")).expect("rules");
    assert_eq!(
        rule[0]["spec"], groups,
        "PrometheusRule spec = files/prometheus-rules.yaml"
    );
    assert_eq!(
        rule[0]["metadata"]["labels"]["release"].as_str(),
        Some("prometheus")
    );
    let cm: k8s_openapi::api::core::v1::ConfigMap = one(&docs, "ConfigMap", "claudekey-dashboard");
    let labels = cm.metadata.labels.clone().expect("labels");
    assert_eq!(
        labels.get("grafana_dashboard").map(String::as_str),
        Some("1")
    );
    assert_eq!(
        cm.metadata
            .annotations
            .clone()
            .expect("annotations")
            .get("grafana_folder")
            .map(String::as_str),
        Some("claudekey")
    );
    let json = cm.data.expect("data")["claudekey.json"].clone();
    let got: serde_json::Value = serde_json::from_str(&json).expect("dashboard JSON");
    let want: serde_json::Value =
        serde_json::from_str(&chart_file("files/grafana-dashboard.json")).expect("file JSON");
    assert_eq!(got, want);
    assert_eq!(
        names(&docs, "ServiceMonitor"),
        set(&[
            "claudekey-controller",
            "claudekey-webhook",
            "claudekey-gateway"
        ])
    );
    assert_eq!(names(&docs, "PodMonitor").len(), 1);
}

/// logLevel, commonAnnotations, extraVolumes/extraVolumeMounts and extraObjects.
#[test]
fn common_values_reach_every_object() {
    let docs = render("gateway");
    for d in all::<Deployment>(&docs, "Deployment") {
        let c = &pod(&d).containers[0];
        let env = c.env.clone().unwrap_or_default();
        let level = env.iter().find(|e| e.name == "RUST_LOG");
        assert_eq!(
            level.and_then(|e| e.value.as_deref()),
            Some("info,claudekey::controller=debug"),
            "{:?}",
            d.metadata.name
        );
    }
    for d in docs
        .iter()
        .filter(|d| d["metadata"]["name"].as_str() != Some("claudekey-company-ca"))
    {
        let name = (d["kind"].as_str(), d["metadata"]["name"].as_str());
        assert_eq!(
            d["metadata"]["annotations"]["example.com/team"].as_str(),
            Some("platform"),
            "{name:?} lacks commonAnnotations"
        );
    }
    let gw: Deployment = one(&docs, "Deployment", "claudekey-gateway");
    let p = pod(&gw);
    assert!(p.volumes.iter().flatten().any(|v| v.name == "extra-ca"));
    assert!(
        p.containers[0]
            .volume_mounts
            .iter()
            .flatten()
            .any(|m| m.name == "extra-ca" && m.mount_path == "/etc/company-ca")
    );
    let extra: k8s_openapi::api::core::v1::ConfigMap =
        one(&docs, "ConfigMap", "claudekey-company-ca");
    assert_eq!(extra.metadata.namespace.as_deref(), Some(NS), "through tpl");
    let svc: k8s_openapi::api::core::v1::Service = one(&docs, "Service", "claudekey-gateway");
    let ann = svc.metadata.annotations.expect("annotations");
    assert_eq!(
        ann.get("example.com/owner").map(String::as_str),
        Some("platform")
    );
}

/// rbac.namespaces: the namespaced rules move to a Role in that namespace, the controller
/// watches only it, and the ClusterRole keeps only cluster-scoped reads.
#[test]
fn namespaced_rbac_mode_uses_roles_in_the_listed_namespace() {
    let docs = render("namespaced");
    let cr: ClusterRole = one(&docs, "ClusterRole", "claudekey-controller");
    assert_eq!(
        rules(cr.rules.as_deref().unwrap_or_default()),
        set(&[
            "claudekey.io/clusterclaudekeysources[]:get",
            "claudekey.io/clusterclaudekeysources[]:list",
            "claudekey.io/clusterclaudekeysources[]:watch",
            "claudekey.io/clusterclaudekeysources/status[]:get",
            "claudekey.io/clusterclaudekeysources/status[]:update",
            "claudekey.io/clusterclaudekeysources/status[]:patch",
            "/namespaces[]:get",
            "/namespaces[]:list",
            "/namespaces[]:watch",
        ])
    );
    let default_cr: ClusterRole = one(&render("default"), "ClusterRole", "claudekey-controller");
    let role: Role = one(&docs, "Role", "claudekey-controller-workloads");
    assert_eq!(role.metadata.namespace.as_deref(), Some("team-a"));
    let namespaced: BTreeSet<String> = rules(default_cr.rules.as_deref().unwrap_or_default())
        .into_iter()
        .filter(|r| !r.contains("clusterclaudekeysources") && !r.starts_with("/namespaces"))
        .collect();
    assert_eq!(rules(role.rules.as_deref().unwrap_or_default()), namespaced);
    let rb: RoleBinding = one(&docs, "RoleBinding", "claudekey-controller-workloads");
    let subject = &rb.subjects.expect("subjects")[0];
    assert_eq!(
        (subject.name.as_str(), subject.namespace.as_deref()),
        ("claudekey-controller", Some(NS))
    );
    let ctl: Deployment = one(&docs, "Deployment", "claudekey-controller");
    assert!(args(&pod(&ctl).containers[0]).contains(&"--watch-namespace=team-a".to_string()));
}

/// `helm test`: a hook Pod that checks both webhooks answer and a ClaudeKey becomes Ready, on a
/// source granted to the release namespace only, reading a labelled placeholder Secret.
#[test]
fn helm_test_hook_checks_webhooks_and_a_ready_claudekey() {
    let docs = render("default");
    let hooks: Vec<&serde_yaml::Value> = docs.iter().filter(|d| is_test_hook(d)).collect();
    let find = |kind: &str| -> &serde_yaml::Value {
        hooks
            .iter()
            .find(|d| d["kind"].as_str() == Some(kind))
            .unwrap_or_else(|| panic!("no test hook {kind}"))
    };
    let name = "claudekey-helm-test";
    for d in &hooks {
        let policy = d["metadata"]["annotations"]["helm.sh/hook-delete-policy"].as_str();
        assert_eq!(policy, Some("before-hook-creation,hook-succeeded"));
    }
    let secret = find("Secret");
    assert_eq!(
        secret["metadata"]["labels"]["claudekey.io/upstream-key"].as_str(),
        Some("true")
    );
    let placeholder = secret["stringData"]["api-key"].as_str().expect("api-key");
    assert!(
        !placeholder.starts_with("sk-ant-"),
        "a placeholder, not key-shaped"
    );
    let source = find("ClusterClaudeKeySource");
    assert_eq!(source["metadata"]["name"].as_str(), Some(name));
    assert_eq!(
        source["spec"]["kubernetesSecret"]["name"].as_str(),
        secret["metadata"]["name"].as_str()
    );
    assert_eq!(
        source["spec"]["allowedNamespaces"]["names"],
        serde_yaml::to_value([NS]).expect("yaml"),
        "granted to the release namespace only"
    );
    let ck = find("ClaudeKey");
    assert_eq!(ck["apiVersion"].as_str(), Some("claudekey.io/v1alpha2"));
    assert_eq!(ck["metadata"]["namespace"].as_str(), Some(NS));
    assert_eq!(
        ck["spec"]["sourceRef"]["kind"].as_str(),
        Some("ClusterClaudeKeySource")
    );
    assert_eq!(ck["spec"]["sourceRef"]["name"].as_str(), Some(name));
    // Once this branch's crate speaks v1alpha2 (after the CRD change is merged), the hook's
    // ClaudeKey must be one the crate's own type accepts.
    use kube::Resource;
    if claudekey::crd::ClaudeKey::api_version(&()) == "claudekey.io/v1alpha2" {
        serde_yaml::from_value::<claudekey::crd::ClaudeKey>((*ck).clone())
            .expect("the hook's ClaudeKey parses as the crate's ClaudeKey");
    }
    let weight = |d: &serde_yaml::Value| {
        d["metadata"]["annotations"]["helm.sh/hook-weight"]
            .as_str()
            .and_then(|w| w.parse::<i32>().ok())
            .expect("hook weight")
    };
    let pod_doc = find("Pod");
    assert!(
        weight(source) < weight(ck) && weight(ck) < weight(pod_doc),
        "created in order"
    );
    let pod: Pod = serde_yaml::from_value(pod_doc.clone()).expect("Pod");
    let spec = pod.spec.expect("spec");
    assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
    let c = &spec.containers[0];
    // The release's own image runs `claudekey self-check`: no other image to pull.
    assert_eq!(
        c.image.as_deref(),
        Some(format!("ghcr.io/claudekey/claudekey:{}", env!("CARGO_PKG_VERSION")).as_str())
    );
    assert_eq!(
        c.args.clone().unwrap_or_default(),
        [
            "self-check".to_string(),
            "--probe-namespace=default".into(),
            format!("--claudekey={NS}/{name}"),
            "--timeout=120s".into(),
        ]
    );
    assert!(c.command.is_none(), "the image's entrypoint is claudekey");
    // The flags are the binary's own.
    <claudekey::cli::Cli as clap::Parser>::try_parse_from(
        std::iter::once("claudekey".to_string()).chain(c.args.clone().unwrap_or_default()),
    )
    .expect("claudekey accepts the hook's arguments");
    let sc = c.security_context.clone().expect("securityContext");
    assert_eq!(
        (sc.read_only_root_filesystem, sc.allow_privilege_escalation),
        (Some(true), Some(false))
    );
    // The test's own rights: read its ClaudeKey, dry-run Pods in the probe namespace.
    let roles: Vec<Role> = hooks
        .iter()
        .filter(|d| d["kind"].as_str() == Some("Role"))
        .map(|d| serde_yaml::from_value((*d).clone()).expect("Role"))
        .collect();
    let all_rules: BTreeSet<String> = roles
        .iter()
        .flat_map(|r| rules(r.rules.as_deref().unwrap_or_default()))
        .collect();
    assert_eq!(
        all_rules,
        set(&[
            "claudekey.io/claudekeys[claudekey-helm-test]:get",
            "claudekey.io/claudekeys[claudekey-helm-test]:list",
            "claudekey.io/claudekeys[claudekey-helm-test]:watch",
            "/pods[]:create",
        ])
    );
}
