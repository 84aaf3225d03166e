//! `claudekey scan FILE…|-` (DESIGN.md §5, §8): the webhook's rules, offline, over YAML or JSON
//! manifests. Exit 0 clean, 1 on findings, 2 when an input cannot be read or parsed.

use std::collections::BTreeSet;
use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use serde::Serialize;
use serde_json::Value;

use crate::webhook::rules::{self, Context, Finding, Workload};

/// Flags of `claudekey scan`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Files to scan, or - for standard input (e.g. `helm template … | claudekey scan -`).
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// text: one line per finding; json: one JSON object for CI tools.
    #[arg(long, value_enum, default_value_t)]
    pub format: Format,
}

/// Output format.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Format {
    /// `<file>: <message>` lines.
    #[default]
    Text,
    /// `{"findings": […], "errors": […]}`.
    Json,
}

/// A finding and the input it came from.
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct FileFinding {
    /// The file name, or `-` for standard input.
    pub file: String,
    /// The finding, exactly as the webhook reports it.
    #[serde(flatten)]
    pub finding: Finding,
}

/// Everything a scan found: findings, and inputs that could not be read or parsed.
#[derive(Serialize, Debug, Default)]
pub struct Report {
    /// Rule findings.
    pub findings: Vec<FileFinding>,
    /// One sentence per unreadable or unparsable input (never containing values).
    pub errors: Vec<String>,
}

impl Report {
    /// 0 clean, 1 findings, 2 errors (DESIGN.md §8).
    pub fn exit_code(&self) -> u8 {
        if !self.errors.is_empty() {
            2
        } else if !self.findings.is_empty() {
            1
        } else {
            0
        }
    }
}

/// One parsed manifest and where it was.
struct Object {
    file: String,
    document: usize,
    value: Value,
}

/// Scans named texts (file name, content); reading them is the caller's business.
pub fn scan(inputs: &[(String, String)]) -> Report {
    let mut report = Report::default();
    let mut objects = Vec::new();
    for (file, text) in inputs {
        match parse_documents(file, text) {
            Ok(found) => objects.extend(found),
            Err(error) => report.errors.push(error),
        }
    }
    let claudekeys: Vec<(Option<String>, String)> = objects
        .iter()
        .filter_map(|o| claudekey_of(&o.value))
        .collect();
    for object in objects {
        let rule_findings = check_rules(&object, &claudekeys, &mut report);
        let known: BTreeSet<String> = rule_findings
            .iter()
            .filter_map(|f| f.path.clone())
            .collect();
        let anywhere = anywhere::find(&object.value, &known);
        for finding in rule_findings.into_iter().chain(anywhere) {
            report.findings.push(FileFinding {
                file: object.file.clone(),
                finding,
            });
        }
    }
    report
}

/// The webhook's rules on one object (when it is a kind they cover).
fn check_rules(
    object: &Object,
    claudekeys: &[(Option<String>, String)],
    report: &mut Report,
) -> Vec<Finding> {
    {
        let workload = match Workload::from_manifest(object.value.clone()) {
            Ok(Some(w)) => w,
            Ok(None) => return Vec::new(),
            Err(e) => {
                let kind = object
                    .value
                    .get("kind")
                    .and_then(Value::as_str)
                    .unwrap_or("?");
                let name = object
                    .value
                    .pointer("/metadata/name")
                    .and_then(Value::as_str)
                    .unwrap_or("?");
                report.errors.push(format!(
                    "{}: document {} ({kind}/{name}): failed to parse: {}",
                    object.file,
                    object.document,
                    rules::scrub_parse_error(&e)
                ));
                return Vec::new();
            }
        };
        let namespace = workload.metadata().namespace.clone();
        // Without a namespace on either side (e.g. `helm template` output) a ClaudeKey counts.
        let names: Vec<String> = claudekeys
            .iter()
            .filter(|(ns, _)| ns.is_none() || namespace.is_none() || *ns == namespace)
            .map(|(_, name)| name.clone())
            .collect();
        let ctx = Context {
            claudekeys: &names,
            sidecar: None,
        };
        rules::check(&workload, &ctx)
    }
}

fn claudekey_of(value: &Value) -> Option<(Option<String>, String)> {
    let api_version = value.get("apiVersion")?.as_str()?;
    if value.get("kind")?.as_str()? != "ClaudeKey" || !api_version.starts_with("claudekey.io/") {
        return None;
    }
    let name = value.pointer("/metadata/name")?.as_str()?.to_string();
    let namespace = value
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .map(str::to_string);
    Some((namespace, name))
}

/// Splits a multi-document YAML (or JSON) text into objects, flattening `kind: *List`.
fn parse_documents(file: &str, text: &str) -> Result<Vec<Object>, String> {
    let mut objects = Vec::new();
    for (i, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let number = i + 1;
        let yaml =
            <serde_yaml::Value as serde::Deserialize>::deserialize(document).map_err(|e| {
                format!(
                    "{file}: document {number}: failed to parse YAML: {}",
                    rules::scrub_quoted(&e.to_string())
                )
            })?;
        let value = serde_json::to_value(&yaml).map_err(|e| {
            format!(
                "{file}: document {number}: failed to convert to JSON: {}",
                rules::scrub_parse_error(&e)
            )
        })?;
        flatten(file, number, value, &mut objects)?;
    }
    Ok(objects)
}

fn flatten(file: &str, document: usize, value: Value, out: &mut Vec<Object>) -> Result<(), String> {
    match value {
        Value::Null => Ok(()),
        Value::Object(ref map) => {
            let is_list = map
                .get("kind")
                .and_then(Value::as_str)
                .is_some_and(|k| k.ends_with("List"));
            match (is_list, map.get("items")) {
                (true, Some(Value::Array(items))) => {
                    for item in items.clone() {
                        flatten(file, document, item, out)?;
                    }
                    Ok(())
                }
                (true, Some(Value::Null) | None) => Ok(()),
                (true, Some(_)) => Err(format!(
                    "{file}: document {document}: items of a List must be an array"
                )),
                (false, _) => {
                    out.push(Object {
                        file: file.to_string(),
                        document,
                        value,
                    });
                    Ok(())
                }
            }
        }
        _ => Err(format!(
            "{file}: document {document}: not a Kubernetes object (expected a mapping)"
        )),
    }
}

fn read_input(path: &std::path::Path) -> Result<(String, String), String> {
    let name = path.display().to_string();
    let mut text = String::new();
    let result = if name == "-" {
        std::io::stdin().read_to_string(&mut text).map(|_| ())
    } else {
        std::fs::read_to_string(path).map(|t| text = t)
    };
    result
        .map(|()| (name.clone(), text))
        .map_err(|e| format!("{name}: failed to read: {e}"))
}

/// Runs `claudekey scan`; the exit code is the contract.
pub fn run(args: Args) -> ExitCode {
    let mut inputs = Vec::new();
    let mut read_errors = Vec::new();
    for path in &args.files {
        match read_input(path) {
            Ok(input) => inputs.push(input),
            Err(error) => read_errors.push(error),
        }
    }
    let mut report = scan(&inputs);
    read_errors.append(&mut report.errors);
    report.errors = read_errors;
    match args.format {
        Format::Text => {
            for f in &report.findings {
                println!("{}: {}", f.file, f.finding.message);
            }
        }
        Format::Json => match serde_json::to_string_pretty(&report) {
            Ok(json) => println!("{json}"),
            Err(e) => report.errors.push(format!("failed to write JSON: {e}")),
        },
    }
    for error in &report.errors {
        eprintln!("claudekey scan: {error}");
    }
    if report.errors.is_empty() && report.findings.is_empty() && args.format == Format::Text {
        eprintln!("claudekey scan: no findings");
    }
    ExitCode::from(report.exit_code())
}

mod anywhere;

#[cfg(test)]
mod tests;
