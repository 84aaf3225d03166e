//! Checks on the files users copy: the chart's CRD copy, deploy/samples and deploy/monitoring.
//! No cluster or helm needed; hack/chart-test.sh adds apiserver and promtool checks on top.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use claudekey::crd::{ClaudeKey, ClusterClaudeKeySource, annotations, client_secret_name};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use regex::Regex;
use serde::Deserialize;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
}

/// Every YAML document of a file, skipping empty ones.
fn docs(path: &Path) -> Vec<serde_yaml::Value> {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| {
            serde_yaml::Value::deserialize(d)
                .unwrap_or_else(|e| panic!("parse {}: {e}", path.display()))
        })
        .filter(|v| !v.is_null())
        .collect()
}

fn yaml_files(dir: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join(dir))
        .unwrap_or_else(|e| panic!("list {dir}: {e}"))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    files
}

fn kind(v: &serde_yaml::Value) -> &str {
    v["kind"].as_str().unwrap_or_default()
}

/// The public secret scanners' Anthropic API key rule (gitleaks `anthropic-api-key`).
fn raw_key_regex() -> Regex {
    Regex::new(r"sk-ant-api03-[a-zA-Z0-9_\-]{93}AA").expect("regex")
}

#[test]
fn chart_crds_are_what_claudekey_crd_prints() {
    let chart = read("charts/claudekey/files/crds.yaml");
    assert!(
        chart == claudekey::crd::crd_yaml(),
        "charts/claudekey/files/crds.yaml differs from `claudekey crd`: \
         cargo run -- crd > charts/claudekey/files/crds.yaml"
    );
    // crds/ holds the same documents, one file per CRD.
    let mut top: Vec<serde_yaml::Value> = yaml_files("crds").iter().flat_map(|f| docs(f)).collect();
    let mut generated: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&chart)
        .map(|d| serde_yaml::Value::deserialize(d).expect("CRD YAML"))
        .filter(|v| !v.is_null())
        .collect();
    let by_name = |v: &serde_yaml::Value| {
        v["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    top.sort_by_key(by_name);
    generated.sort_by_key(by_name);
    assert_eq!(top, generated, "crds/ differs from `claudekey crd`");
    assert!(
        !root().join("charts/claudekey/crds").exists(),
        "charts/claudekey/crds/ would make Helm install CRDs it never upgrades; they are templates"
    );
}

/// The standalone PrometheusRule carries the chart's rule groups.
#[test]
fn standalone_prometheus_rule_matches_the_charts_rules() {
    let rule = &docs(&root().join("deploy/monitoring/prometheusrule.yaml"))[0];
    let chart: serde_yaml::Value =
        serde_yaml::from_str(&read("charts/claudekey/files/prometheus-rules.yaml")).expect("rules");
    assert_eq!(
        rule["spec"], chart,
        "deploy/monitoring/prometheusrule.yaml spec differs from charts/claudekey/files/prometheus-rules.yaml"
    );
}

#[test]
fn samples_cover_every_backend_and_every_claudekey_has_a_granted_source() {
    let mut backends = BTreeSet::new();
    let mut sources: BTreeMap<String, ClusterClaudeKeySource> = BTreeMap::new();
    let mut claudekeys = Vec::new();
    let files = yaml_files("deploy/samples")
        .into_iter()
        .chain(yaml_files("deploy/samples/backends"));
    for file in files {
        for doc in docs(&file) {
            let parse_error = |e: serde_yaml::Error| -> ! { panic!("{}: {e}", file.display()) };
            match kind(&doc) {
                "ClusterClaudeKeySource" => {
                    let source: ClusterClaudeKeySource =
                        serde_yaml::from_value(doc.clone()).unwrap_or_else(|e| parse_error(e));
                    backends.insert(
                        source
                            .spec
                            .describe()
                            .split(':')
                            .next()
                            .unwrap()
                            .to_string(),
                    );
                    sources.insert(source.metadata.name.clone().unwrap(), source);
                }
                "ClaudeKey" => {
                    let ck: ClaudeKey =
                        serde_yaml::from_value(doc.clone()).unwrap_or_else(|e| parse_error(e));
                    claudekeys.push(ck);
                }
                "Namespace" => assert_ne!(
                    doc["metadata"]["name"].as_str(),
                    Some("claudekey-system"),
                    "{}: deleting the samples must never delete the operator namespace",
                    file.display()
                ),
                _ => {}
            }
        }
    }
    assert_eq!(
        backends,
        BTreeSet::from([
            "aws".to_string(),
            "federation".to_string(),
            "kubernetes".to_string(),
            "vault".to_string()
        ])
    );
    for ck in &claudekeys {
        let source = &sources[&ck.spec.source_ref.name];
        let ns = ck.metadata.namespace.clone().expect("namespace");
        assert!(
            source.spec.allowed_namespaces.allows(&ns, &BTreeMap::new()),
            "{} is not granted to {ns}",
            ck.spec.source_ref.name
        );
    }
    assert!(
        claudekeys
            .iter()
            .any(|c| c.metadata.name.as_deref() == Some("support-bot"))
    );
}

#[test]
fn sample_upstream_secret_is_an_obvious_placeholder() {
    let docs = docs(&root().join("deploy/samples/10-upstream-key-secret.yaml"));
    let secret: Secret = serde_yaml::from_value(docs[0].clone()).expect("Secret");
    let value = &secret.string_data.as_ref().expect("stringData")["api-key"];
    assert!(
        !value.starts_with("sk-ant"),
        "the sample must not look like a real key"
    );
    assert!(
        value.contains("REPLACE-ME"),
        "the placeholder should say what to do"
    );
    assert_eq!(
        secret.metadata.namespace.as_deref(),
        Some("claudekey-system"),
        "source Secrets live in the operator namespace"
    );
}

fn deployment(file: &str) -> Deployment {
    serde_yaml::from_value(docs(&root().join(file))[0].clone())
        .unwrap_or_else(|e| panic!("{file}: {e}"))
}

#[test]
fn inject_sample_names_an_existing_sample_claudekey_and_holds_no_key() {
    let d = deployment("deploy/samples/30-deployment-inject.yaml");
    let tmpl = d.spec.expect("spec").template;
    let ann = tmpl
        .metadata
        .expect("template metadata")
        .annotations
        .expect("annotations");
    assert_eq!(
        ann.get(annotations::INJECT).map(String::as_str),
        Some("support-bot")
    );
    assert_eq!(d.metadata.namespace.as_deref(), Some("team-a"));
    for c in tmpl.spec.expect("pod spec").containers {
        for e in c.env.unwrap_or_default() {
            assert!(
                !e.name.starts_with("ANTHROPIC_"),
                "the webhook sets {} itself",
                e.name
            );
        }
    }
}

#[test]
fn gateway_consumer_reads_the_client_secret_and_declares_it() {
    let d = deployment("deploy/samples/31-deployment-gateway-consumer.yaml");
    let tmpl = d.spec.expect("spec").template;
    let ann = tmpl
        .metadata
        .expect("template metadata")
        .annotations
        .expect("annotations");
    let name = ann
        .get(annotations::CONSUMES)
        .expect("claudekey.io/consumes annotation");
    let refs: BTreeSet<(String, String)> = tmpl.spec.expect("pod spec").containers[0]
        .env
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|e| {
            assert!(
                e.value.is_none(),
                "{} must come from the Secret, not a literal",
                e.name
            );
            let r = e
                .value_from
                .and_then(|v| v.secret_key_ref)
                .expect("secretKeyRef");
            (r.name, r.key)
        })
        .collect();
    let secret = client_secret_name(name);
    assert_eq!(
        refs,
        BTreeSet::from([
            (secret.clone(), "ANTHROPIC_API_KEY".into()),
            (secret, "ANTHROPIC_BASE_URL".into())
        ])
    );
}

#[test]
fn only_the_bad_sample_carries_a_raw_looking_key() {
    let re = raw_key_regex();
    for file in yaml_files("deploy/samples") {
        let text = std::fs::read_to_string(&file).expect("read");
        assert!(
            !re.is_match(&text) && !text.contains("sk-ant-"),
            "{} must scan clean",
            file.display()
        );
    }
    let bad = read("deploy/samples/bad/deployment-raw-key.yaml");
    let key = re
        .find(&bad)
        .expect("the bad sample must match the scanners' rule")
        .as_str();
    assert_eq!(
        key,
        format!("sk-ant-api03-{}AA", "X".repeat(93)),
        "keep the fake obviously fake"
    );
    let d = deployment("deploy/samples/bad/deployment-raw-key.yaml");
    let env = d
        .spec
        .expect("spec")
        .template
        .spec
        .expect("pod spec")
        .containers[0]
        .env
        .clone()
        .expect("env");
    assert_eq!(env[0].name, "ANTHROPIC_API_KEY");
    assert_eq!(
        env[0].value.as_deref(),
        Some(key),
        "the key must be an env literal, the case the webhook refuses"
    );
}

/// Metric names the README documents for the binaries to export.
fn documented_metrics() -> BTreeSet<String> {
    let readme = read("deploy/monitoring/README.md");
    let re = Regex::new(r"^\| `([a-z_]+)` \|").expect("regex");
    readme
        .lines()
        .filter_map(|l| re.captures(l).map(|c| c[1].to_string()))
        .collect()
}

/// Metric names a PromQL text mentions (claudekey's own and the apiserver's).
fn metrics_in(text: &str) -> BTreeSet<String> {
    let re = Regex::new(r"\b((?:claudekey|apiserver)_[a-z_]+)\b").expect("regex");
    re.captures_iter(text).map(|c| c[1].to_string()).collect()
}

/// The cheap part of a PromQL parse: brackets balance and nothing is left dangling.
fn assert_promql_shape(expr: &str, what: &str) {
    let mut stack = Vec::new();
    let mut in_str = false;
    for ch in expr.chars() {
        match (in_str, ch) {
            (_, '"') => in_str = !in_str,
            (true, _) => {}
            (false, '(' | '{' | '[') => stack.push(ch),
            (false, ')' | '}' | ']') => {
                let open = stack
                    .pop()
                    .unwrap_or_else(|| panic!("{what}: unbalanced '{ch}' in {expr}"));
                assert!(
                    matches!((open, ch), ('(', ')') | ('{', '}') | ('[', ']')),
                    "{what}: '{open}' closed by '{ch}'"
                );
            }
            _ => {}
        }
    }
    assert!(
        stack.is_empty() && !in_str,
        "{what}: unclosed {stack:?} in {expr}"
    );
    let t = expr.trim();
    for op in ["and", "or", "unless", ">", "<", "/", "*", "+"] {
        assert!(!t.ends_with(op), "{what}: dangling '{op}'");
    }
}

#[test]
fn prometheus_rule_has_the_alerts_and_known_metrics() {
    let docs = docs(&root().join("deploy/monitoring/prometheusrule.yaml"));
    assert_eq!(docs.len(), 1);
    let rule = &docs[0];
    assert_eq!(
        rule["apiVersion"].as_str(),
        Some("monitoring.coreos.com/v1")
    );
    assert_eq!(kind(rule), "PrometheusRule");
    let documented = documented_metrics();
    let mut alerts = BTreeSet::new();
    for group in rule["spec"]["groups"].as_sequence().expect("groups") {
        for r in group["rules"].as_sequence().expect("rules") {
            let name = r["alert"].as_str().expect("alert name").to_string();
            let expr = r["expr"].as_str().expect("expr");
            assert_promql_shape(expr, &name);
            for m in metrics_in(expr) {
                assert!(
                    documented.contains(&m),
                    "{name} uses {m}, not listed in deploy/monitoring/README.md"
                );
            }
            assert!(
                r["labels"]["severity"].as_str().is_some(),
                "{name}: severity"
            );
            assert!(
                r["annotations"]["summary"].as_str().is_some(),
                "{name}: summary"
            );
            alerts.insert(name);
        }
    }
    for want in [
        "ClaudeKeyRotationOverdue",
        "ClaudeKeyRequestRateAnomaly",
        "ClaudeKeyTokenRateAnomaly",
        "ClaudeKeyUsedOffHours",
        "ClaudeKeyServerErrors",
        "ClaudeKeyClientErrors",
        "ClaudeKeyBackendDegraded",
        "ClaudeKeyWebhookErrors",
    ] {
        assert!(alerts.contains(want), "missing alert {want}");
    }
    // hack/chart-test.sh cuts the rules file out after `spec:`; that only works while it is last.
    let text = read("deploy/monitoring/prometheusrule.yaml");
    let last_top = text
        .lines()
        .rfind(|l| l.chars().next().is_some_and(|c| c.is_ascii_alphabetic()));
    assert_eq!(last_top, Some("spec:"));
}

#[test]
fn dashboard_has_the_panels_and_known_metrics() {
    let dash: serde_json::Value =
        serde_json::from_str(&read("deploy/monitoring/grafana-dashboard.json"))
            .expect("dashboard JSON");
    let documented = documented_metrics();
    let mut used = BTreeSet::new();
    let mut titles = Vec::new();
    for p in dash["panels"].as_array().expect("panels") {
        titles.push(p["title"].as_str().expect("title").to_lowercase());
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().expect("expr");
            assert_promql_shape(expr, p["title"].as_str().unwrap_or_default());
            used.extend(metrics_in(expr));
        }
    }
    for m in &used {
        assert!(
            documented.contains(m),
            "dashboard uses {m}, not listed in deploy/monitoring/README.md"
        );
    }
    for want in [
        "claudekey_proxy_requests_total",
        "claudekey_proxy_tokens_total",
        "claudekey_proxy_rate_limited_total",
        "claudekey_workload_key_age_seconds",
    ] {
        assert!(used.contains(want), "dashboard does not show {want}");
    }
    for want in [
        "requests",
        "tokens",
        "cost",
        "errors",
        "rate-limited",
        "key age",
    ] {
        assert!(
            titles.iter().any(|t| t.contains(want)),
            "no panel about {want}: {titles:?}"
        );
    }
    let vars: Vec<_> = dash["templating"]["list"]
        .as_array()
        .expect("vars")
        .iter()
        .map(|v| v["name"].as_str().unwrap_or_default())
        .collect();
    for v in ["datasource", "claudekey", "input_price", "output_price"] {
        assert!(vars.contains(&v), "dashboard variable {v}");
    }
}

/// Every `&str` constant in a module named `reason`, `reasons`, `event`, `events` or `condition`
/// anywhere under src/, and every constant named `CONDITION_*` or `*REASON*`: the condition types,
/// condition reasons and Event reasons the binaries can produce. (value, where it is defined)
fn reasons_in_code() -> BTreeSet<(String, String)> {
    let module = Regex::new(r"^\s*(pub(\([a-z]+\))? )?mod (reasons?|events?|condition)\s*\{")
        .expect("regex");
    let constant =
        Regex::new(r#"^\s*(pub(\([a-z]+\))? )?const ([A-Z0-9_]+): &str = "([A-Za-z]+)";"#)
            .expect("regex");
    let mut found = BTreeSet::new();
    let mut stack = vec![root().join("src")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read src") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|x| x != "rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("read source");
            let rel = path
                .strip_prefix(root())
                .expect("under root")
                .display()
                .to_string();
            let mut depth_in_module: Option<i32> = None;
            for line in text.lines() {
                if depth_in_module.is_none() && module.is_match(line) {
                    depth_in_module = Some(0);
                }
                if let Some(c) = constant.captures(line) {
                    let name = &c[3];
                    if depth_in_module.is_some()
                        || name.starts_with("CONDITION_")
                        || name.contains("REASON")
                    {
                        found.insert((c[4].to_string(), format!("{rel} ({name})")));
                    }
                }
                if let Some(depth) = depth_in_module.as_mut() {
                    *depth += line.matches('{').count() as i32 - line.matches('}').count() as i32;
                    if *depth <= 0 {
                        depth_in_module = None;
                    }
                }
            }
        }
    }
    found
}

#[test]
fn troubleshooting_page_lists_every_reason_in_the_code() {
    let page = read("docs/troubleshooting.md");
    let reasons = reasons_in_code();
    // The page can only go stale if the scan still sees the code's reasons.
    for known in [
        "KeysIssued",
        "BackendError",
        "KeyRotated",
        "UpstreamKeyRetired",
        "Ready",
    ] {
        assert!(
            reasons.iter().any(|(v, _)| v == known),
            "the scan of src/ no longer finds {known}: {reasons:?}"
        );
    }
    let missing: Vec<String> = reasons
        .iter()
        .filter(|(value, _)| !page.contains(&format!("`{value}`")))
        .map(|(value, at)| format!("`{value}` from {at}"))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/troubleshooting.md does not explain:\n  {}",
        missing.join("\n  ")
    );
}
