//! `claudekey scan` as users and CI run it: the built binary on tests/fixtures, checking the
//! DESIGN.md §8 contract (exit 0 clean, 1 findings, 2 unreadable or unparsable; one line per
//! finding; --format json).

use std::io::Write;
use std::process::{Command, Output, Stdio};

const FAKE_KEY_PREFIX: &str = "sk-ant-api03-FAKE-EXAMPLE";

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn scan(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_claudekey"))
        .arg("scan")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run claudekey");
    let mut input = child.stdin.take().expect("stdin");
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).expect("write stdin");
    }
    drop(input);
    child.wait_with_output().expect("claudekey finishes")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn clean_inputs_exit_zero() {
    let out = scan(&[&fixture("clean.yaml"), &fixture("pod.json")], None);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {}\nstderr: {}",
        stdout(&out),
        stderr(&out)
    );
    assert_eq!(stdout(&out), "");
}

#[test]
fn findings_exit_one_with_one_line_each_and_no_key() {
    let out = scan(&[&fixture("findings.yaml")], None);
    assert_eq!(out.status.code(), Some(1), "stderr: {}", stderr(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    let file = fixture("findings.yaml");
    assert_eq!(lines.len(), 2, "{text}");
    assert!(lines[0].starts_with(&format!("{file}: Deployment/leaky: init container \"warmup\" args[1] holds an Anthropic key (sk-ant-api03-…AA)")), "{}", lines[0]);
    assert!(lines[1].starts_with(&format!("{file}: Deployment/leaky: container \"app\" env ANTHROPIC_API_KEY holds an Anthropic key (sk-ant-api03-…AA)")), "{}", lines[1]);
    assert!(lines.iter().all(|l| l.contains("claudekey.io/inject")));
    assert!(!text.contains(FAKE_KEY_PREFIX) && !stderr(&out).contains(FAKE_KEY_PREFIX));
}

#[test]
fn lists_from_stdin_use_their_claudekeys() {
    let text = std::fs::read_to_string(fixture("list.yaml")).expect("fixture");
    let out = scan(&["-"], Some(&text));
    assert_eq!(out.status.code(), Some(1), "stderr: {}", stderr(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(
        lines[0].starts_with(
            "-: Pod/snoop: container \"snoop\" envFrom loads Secret support-bot-proxy"
        ),
        "{}",
        lines[0]
    );
    assert!(lines[1].starts_with("-: Job/once: container \"once\" env CLAUDE_API_KEY is a key variable set to a literal value"), "{}", lines[1]);
    assert!(!text.contains("not-a-real-key-but-a-literal"));
}

#[test]
fn json_format_for_ci() {
    let out = scan(
        &[
            "--format",
            "json",
            &fixture("findings.yaml"),
            &fixture("clean.yaml"),
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stdout is JSON");
    let findings = report["findings"].as_array().expect("findings array");
    assert_eq!(findings.len(), 2);
    assert_eq!(findings[1]["rule"], "key-in-env");
    assert_eq!(findings[1]["resource"], "Deployment/leaky");
    assert_eq!(findings[1]["container"], "app");
    assert_eq!(findings[1]["field"], "env ANTHROPIC_API_KEY");
    assert_eq!(findings[1]["hint"], "sk-ant-api03-…AA");
    assert_eq!(findings[1]["file"], fixture("findings.yaml"));
    assert_eq!(report["errors"], serde_json::json!([]));
    assert!(!stdout(&out).contains(FAKE_KEY_PREFIX));
}

#[test]
fn unparsable_or_missing_input_exits_two_with_the_reason() {
    let out = scan(&[&fixture("broken.yaml")], None);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("broken.yaml: document 1: failed to parse YAML"),
        "{}",
        stderr(&out)
    );

    let out = scan(&[&fixture("does-not-exist.yaml")], None);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("does-not-exist.yaml: failed to read"),
        "{}",
        stderr(&out)
    );

    // Findings elsewhere do not hide an unreadable input: the scan cannot vouch for it.
    let out = scan(&[&fixture("findings.yaml"), &fixture("broken.yaml")], None);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(stdout(&out).lines().count(), 2);
}

#[test]
fn json_errors_are_reported_too() {
    let out = scan(
        &["--format", "json", "-"],
        Some("{\"kind\": \"Pod\", \"apiVersion\": \"v1\", \"spec\": 3}"),
    );
    assert_eq!(out.status.code(), Some(2));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stdout is JSON");
    assert_eq!(
        report["errors"].as_array().map(Vec::len),
        Some(1),
        "{report}"
    );
}

/// Every bypass of issue 15 (one document each in bypasses.yaml) is reported, with its kind
/// and name, and never the key; the good twins in bypasses-clean.yaml are clean.
#[test]
fn every_bypass_is_reported_and_its_twin_is_clean() {
    let out = scan(&["--format", "json", &fixture("bypasses.yaml")], None);
    assert_eq!(out.status.code(), Some(1), "stderr: {}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let found: Vec<(String, String, String)> = report["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .map(|f| {
            let s = |k: &str| f[k].as_str().unwrap_or_default().to_string();
            (s("resource"), s("rule"), s("path"))
        })
        .collect();
    let want = [
        ("Pod/shared-pids", "injection-precondition", ""),
        ("Deployment/host-pids", "injection-precondition", ""),
        (
            "Pod/hooks",
            "key-in-command",
            "spec.containers[0].lifecycle.postStart.exec.command[2]",
        ),
        (
            "Pod/hooks",
            "key-in-command",
            "spec.containers[0].livenessProbe.exec.command[2]",
        ),
        (
            "Job/split",
            "key-in-env",
            "spec.template.spec.containers[0].env[2].value",
        ),
        (
            "PodTemplate/tmpl",
            "key-in-env",
            "template.spec.containers[0].env[0].value",
        ),
        (
            "ReplicationController/rc",
            "key-in-env",
            "spec.template.spec.containers[0].env[0].value",
        ),
        (
            "ConfigMap/settings",
            "key-in-config-map",
            "data[\"app.yaml\"]",
        ),
        ("ConfigMap/settings", "key-in-config-map", "binaryData.blob"),
        ("Secret/committed", "key-shaped-string", "data.api-key"),
        ("Secret/committed", "key-shaped-string", "stringData.token"),
        ("Widget/w", "key-shaped-string", "metadata.annotations.note"),
        ("Widget/w", "key-shaped-string", "spec.nested[0].deep.value"),
        ("Pod/debugged", "targets-sidecar", ""),
        ("Pod/federated", "credential-beside-identity-token", ""),
    ];
    let want: Vec<(String, String, String)> = want
        .iter()
        .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
        .collect();
    assert_eq!(found, want);
    let all = format!("{}{}", stdout(&out), stderr(&out));
    assert!(
        !all.contains(FAKE_KEY_PREFIX) && !all.contains("FAKE-EXAMPLE"),
        "{all}"
    );

    let text = scan(&[&fixture("bypasses.yaml")], None);
    assert_eq!(text.status.code(), Some(1));
    assert_eq!(
        stdout(&text).lines().count(),
        want.len(),
        "one line per finding"
    );

    let clean = scan(&[&fixture("bypasses-clean.yaml")], None);
    assert_eq!(
        clean.status.code(),
        Some(0),
        "twins must be clean: {}",
        stdout(&clean)
    );
}
