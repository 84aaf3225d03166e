//! Unit tests of the scanner over in-memory inputs; the CLI contract is tested in tests/scan_cli.rs.

use super::*;

fn key() -> String {
    format!("sk-ant-api03-{}AA", "k".repeat(93))
}

fn scan_one(text: &str) -> Report {
    scan(&[("in.yaml".to_string(), text.to_string())])
}

#[test]
fn multi_document_yaml_with_list_and_claudekey() {
    let text = format!(
        r#"
apiVersion: claudekey.io/v1alpha1
kind: ClaudeKey
metadata: {{name: bot, namespace: team-a}}
---
# comment-only documents are fine
---
apiVersion: v1
kind: List
items:
  - apiVersion: apps/v1
    kind: Deployment
    metadata: {{name: web, namespace: team-a}}
    spec:
      selector: {{matchLabels: {{app: web}}}}
      template:
        metadata: {{labels: {{app: web}}}}
        spec:
          containers:
            - name: app
              image: app:1
              env: [{{name: ANTHROPIC_API_KEY, value: "{}"}}]
              envFrom: [{{secretRef: {{name: bot-proxy}}}}]
  - apiVersion: v1
    kind: ConfigMap
    metadata: {{name: c}}
"#,
        key()
    );
    let report = scan_one(&text);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let rules: Vec<_> = report.findings.iter().map(|f| f.finding.rule).collect();
    assert_eq!(
        rules,
        [rules::RuleId::KeyInEnv, rules::RuleId::ProxySecretReference]
    );
    assert_eq!(report.exit_code(), 1);
    assert!(
        report
            .findings
            .iter()
            .all(|f| !f.finding.message.contains(&key()))
    );
}

#[test]
fn claudekeys_of_other_namespaces_do_not_protect() {
    let text = r#"
{"apiVersion": "claudekey.io/v1alpha1", "kind": "ClaudeKey", "metadata": {"name": "bot", "namespace": "team-b"}}
---
{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "team-a"},
 "spec": {"containers": [{"name": "a", "image": "a", "envFrom": [{"secretRef": {"name": "bot-proxy"}}]}]}}
"#;
    assert_eq!(scan_one(text).exit_code(), 0);
}

#[test]
fn unparsable_input_is_exit_two_without_values() {
    let report = scan_one("a: [unclosed\n");
    assert_eq!(report.exit_code(), 2);
    assert!(
        report.errors[0].starts_with("in.yaml: document 1: failed to parse YAML"),
        "{:?}",
        report.errors
    );
    let bad_type = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: p}}\nspec: {{hostNetwork: \"{}\", containers: []}}\n",
        key()
    );
    let report = scan_one(&bad_type);
    assert_eq!(report.exit_code(), 2);
    assert!(report.errors[0].contains("Pod/p"), "{:?}", report.errors);
    assert!(!report.errors[0].contains("sk-ant"), "{:?}", report.errors);
    assert_eq!(scan_one("just a string\n").exit_code(), 2);
}

#[test]
fn empty_and_clean_inputs_are_exit_zero() {
    assert_eq!(scan_one("").exit_code(), 0);
    assert_eq!(scan_one("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: a, image: a}]}\n").exit_code(), 0);
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 200, ..Default::default() })]

    /// Whatever the input, scan answers with an exit code instead of panicking.
    #[test]
    fn arbitrary_text_never_panics(text in "(---\n|kind: (List|Pod|Deployment)\n|apiVersion: (v1|apps/v1)\n|items:\n|  - |spec: |containers: \\[\\]\n|[a-z{}:\\[\\], \"-]{0,12}\n){0,12}") {
        let code = scan_one(&text).exit_code();
        proptest::prop_assert!(code <= 2);
    }
}

#[test]
fn key_shaped_strings_anywhere_are_reported_once_with_a_path() {
    use base64::Engine as _;
    let encoded = base64::engine::general_purpose::STANDARD.encode(key());
    let text = format!(
        r#"
apiVersion: v1
kind: Secret
metadata: {{name: s}}
data: {{"api.key": "{encoded}", plain: "{}"}}
stringData: {{t: "Bearer {}"}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: d, annotations: {{note: "{}"}}}}
spec:
  selector: {{matchLabels: {{a: b}}}}
  template:
    metadata: {{labels: {{a: b}}}}
    spec:
      containers: [{{name: app, image: a, env: [{{name: K, value: "{}"}}]}}]
---
kind: Unknown
list: ["{}"]
"#,
        base64::engine::general_purpose::STANDARD.encode("not a key"),
        key(),
        key(),
        key(),
        key()
    );
    let report = scan_one(&text);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let found: Vec<(String, Option<String>)> = report
        .findings
        .iter()
        .map(|f| (f.finding.resource.clone(), f.finding.path.clone()))
        .collect();
    let want = [
        ("Secret/s", "data[\"api.key\"]"),
        ("Secret/s", "stringData.t"),
        // The env key once (the rule's finding), the annotation by the secret scanner.
        (
            "Deployment/d",
            "spec.template.spec.containers[0].env[0].value",
        ),
        ("Deployment/d", "metadata.annotations.note"),
        ("Unknown/<unnamed>", "list[0]"),
    ];
    let want: Vec<(String, Option<String>)> = want
        .iter()
        .map(|(r, p)| (r.to_string(), Some(p.to_string())))
        .collect();
    assert_eq!(found, want);
    assert!(
        report.findings[0]
            .finding
            .message
            .contains("(base64-decoded)")
    );
    for f in &report.findings {
        assert!(!f.finding.message.contains(&key()), "{}", f.finding.message);
        assert!(
            !f.finding.message.contains(&encoded),
            "{}",
            f.finding.message
        );
    }
    assert_eq!(report.exit_code(), 1);
}
