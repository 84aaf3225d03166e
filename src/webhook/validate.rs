//! AdmissionReview in, AdmissionReview out: the glue between the HTTP server and the pure rule
//! engine and mutator. Every answer carries the request's uid; nothing here panics on input.

use std::sync::Arc;

use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use kube::runtime::reflector::Store;

use super::mutate::{self, SidecarConfig};
use super::placement;
use super::rules::{self, Finding, Workload};
use crate::crd::ClaudeKey;

/// At most this many findings are spelled out in one denial; the rest are counted.
const MAX_LISTED: usize = 5;

/// Deny (`enforce`) or admit with warnings (`warn`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// Refuse objects that break a rule.
    #[default]
    Enforce,
    /// Admit them, returning the findings as admission warnings.
    Warn,
}

/// Which ClaudeKeys exist, per namespace: the reflector cache in production, a list in tests.
pub trait ClaudeKeyLookup: Send + Sync {
    /// Names of the ClaudeKeys in `namespace`.
    fn names_in(&self, namespace: &str) -> Vec<String>;
    /// Whether ClaudeKey `namespace/name` exists and where its upstream key lives.
    fn find(&self, namespace: &str, name: &str) -> placement::Found;
}

impl ClaudeKeyLookup for Store<ClaudeKey> {
    fn names_in(&self, namespace: &str) -> Vec<String> {
        self.state()
            .iter()
            .filter(|ck| ck.metadata.namespace.as_deref() == Some(namespace))
            .filter_map(|ck| ck.metadata.name.clone())
            .collect()
    }

    fn find(&self, namespace: &str, name: &str) -> placement::Found {
        let key = kube::runtime::reflector::ObjectRef::new(name).within(namespace);
        placement::Found::of(self.get(&key).as_deref())
    }
}

/// A fixed set of `(namespace, name)` pairs, for tests and benches.
impl ClaudeKeyLookup for Vec<(String, String)> {
    fn names_in(&self, namespace: &str) -> Vec<String> {
        self.iter()
            .filter(|(ns, _)| ns == namespace)
            .map(|(_, n)| n.clone())
            .collect()
    }

    /// Every listed ClaudeKey has placement `namespace` (today's sidecar).
    fn find(&self, namespace: &str, name: &str) -> placement::Found {
        if self.iter().any(|(ns, n)| ns == namespace && n == name) {
            placement::Found::Placed(placement::Placement::Namespace)
        } else {
            placement::Found::Missing
        }
    }
}

/// How a review ended; the `result` label of the webhook's metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Admitted unchanged.
    Allowed,
    /// Admitted with a patch.
    Patched,
    /// Admitted with warnings (warn mode).
    Warned,
    /// Refused.
    Denied,
    /// The request could not be read.
    Invalid,
}

impl Outcome {
    /// Bounded label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allowed => "allowed",
            Self::Patched => "patched",
            Self::Warned => "warned",
            Self::Denied => "denied",
            Self::Invalid => "invalid",
        }
    }
}

/// Everything a review needs: mode, sidecar shape and the ClaudeKey cache.
#[derive(Clone)]
pub struct Admission {
    /// Enforce or warn.
    pub mode: Mode,
    /// The sidecar the mutator injects.
    pub sidecar: SidecarConfig,
    /// Which ClaudeKeys exist.
    pub claudekeys: Arc<dyn ClaudeKeyLookup>,
}

type Review = AdmissionReview<DynamicObject>;

fn parse(body: &[u8]) -> Result<AdmissionRequest<DynamicObject>, String> {
    let review: Review = serde_json::from_slice(body).map_err(|e| {
        format!(
            "failed to parse AdmissionReview: {}",
            rules::scrub_parse_error(&e)
        )
    })?;
    review
        .try_into()
        .map_err(|_| "AdmissionReview has no request".to_string())
}

fn invalid(reason: String) -> (Review, Outcome) {
    (
        AdmissionResponse::invalid(reason).into_review(),
        Outcome::Invalid,
    )
}

/// The object of the request as a covered workload, or None (not covered, or no object).
fn workload(req: &AdmissionRequest<DynamicObject>) -> Result<Option<Workload>, String> {
    let Some(object) = &req.object else {
        return Ok(None);
    };
    let value = serde_json::to_value(object).map_err(|e| format!("failed to read object: {e}"))?;
    Workload::from_parts(&req.kind.group, &req.kind.kind, value).map_err(|e| {
        format!(
            "failed to parse {} {}: {}",
            req.kind.kind,
            req.name,
            rules::scrub_parse_error(&e)
        )
    })
}

/// One sentence for a denial: the first findings in full, the rest counted.
pub fn denial_message(findings: &[Finding]) -> String {
    let mut parts: Vec<String> = findings
        .iter()
        .take(MAX_LISTED)
        .map(|f| f.message.clone())
        .collect();
    if findings.len() > MAX_LISTED {
        parts.push(format!(
            "and {} more finding(s)",
            findings.len() - MAX_LISTED
        ));
    }
    format!("claudekey: {}", parts.join(" | "))
}

impl Admission {
    fn apply_findings(
        &self,
        response: AdmissionResponse,
        findings: &[Finding],
    ) -> (AdmissionResponse, Outcome) {
        match (findings.is_empty(), self.mode) {
            (true, _) => (response, Outcome::Allowed),
            (false, Mode::Enforce) => (response.deny(denial_message(findings)), Outcome::Denied),
            (false, Mode::Warn) => {
                let mut response = response;
                response.warnings =
                    Some(findings.iter().map(|f| format!("claudekey: {f}")).collect());
                (response, Outcome::Warned)
            }
        }
    }

    fn findings(&self, req: &AdmissionRequest<DynamicObject>, workload: &Workload) -> Vec<Finding> {
        let namespace = req.namespace.clone().unwrap_or_default();
        let claudekeys = self.claudekeys.names_in(&namespace);
        // Rebuilt per request (a few small allocations) so Admission stays plain data.
        let sidecar = mutate::sidecar_container(&self.sidecar);
        let ctx = rules::Context {
            claudekeys: &claudekeys,
            sidecar: Some(&sidecar),
        };
        rules::check(workload, &ctx)
    }

    /// `/validate`: rules (a)–(c) on Pods and pod templates.
    pub fn validate(&self, body: &[u8]) -> (Review, Outcome) {
        let req = match parse(body) {
            Ok(req) => req,
            Err(reason) => return invalid(reason),
        };
        let response = AdmissionResponse::from(&req);
        if !matches!(req.operation, Operation::Create | Operation::Update) {
            return (response.into_review(), Outcome::Allowed);
        }
        let workload = match workload(&req) {
            Ok(Some(w)) => w,
            Ok(None) => return (response.into_review(), Outcome::Allowed),
            Err(reason) => return (response.deny(reason).into_review(), Outcome::Denied),
        };
        let mut findings = self.findings(&req, &workload);
        if req.operation == Operation::Update
            && let Workload::Pod(pod) = &workload
        {
            findings = self.new_in_pod_update(&req, pod, findings);
        }
        let (response, outcome) = self.apply_findings(response, &findings);
        (response.into_review(), outcome)
    }

    /// A Pod's containers cannot change after creation (only images can), so a finding that the
    /// old Pod had too, in a container left exactly as it was, is not the update's doing.
    /// Refusing it would block label, owner-reference and finalizer updates of pods admitted
    /// earlier: those injected by an older webhook image, whose sidecar no longer matches the
    /// current one. New ephemeral containers, and changed images, are judged afresh.
    fn new_in_pod_update(
        &self,
        req: &AdmissionRequest<DynamicObject>,
        pod: &k8s_openapi::api::core::v1::Pod,
        findings: Vec<Finding>,
    ) -> Vec<Finding> {
        let Some(old) = req
            .old_object
            .as_ref()
            .and_then(|o| serde_json::to_value(o).ok())
            .and_then(|v| serde_json::from_value::<k8s_openapi::api::core::v1::Pod>(v).ok())
        else {
            return findings;
        };
        let old_findings = self.findings(req, &Workload::Pod(Box::new(old.clone())));
        findings
            .into_iter()
            .filter(|f| {
                let before = old_findings
                    .iter()
                    .any(|o| o.rule == f.rule && o.container == f.container && o.field == f.field);
                !(before && rules::same_container(&old, pod, &f.container))
            })
            .collect()
    }

    /// `/mutate`: inject the proxy sidecar into Pods that ask for it, on CREATE.
    pub fn mutate(&self, body: &[u8]) -> (Review, Outcome) {
        let req = match parse(body) {
            Ok(req) => req,
            Err(reason) => return invalid(reason),
        };
        let response = AdmissionResponse::from(&req);
        if req.operation != Operation::Create {
            return (response.into_review(), Outcome::Allowed);
        }
        let pod = match workload(&req) {
            Ok(Some(Workload::Pod(pod))) => pod,
            Ok(_) => return (response.into_review(), Outcome::Allowed),
            Err(reason) => return (response.deny(reason).into_review(), Outcome::Denied),
        };
        let namespace = req.namespace.clone().unwrap_or_default();
        let lookup = |name: &str| self.claudekeys.find(&namespace, name);
        let patch = match placement::inject(&pod, &namespace, lookup, &self.sidecar) {
            Ok(Some(patch)) => patch,
            Ok(None) => return (response.into_review(), Outcome::Allowed),
            Err(refusal) => {
                let message = format!("claudekey: {}: {refusal}", Workload::Pod(pod).resource());
                return match self.mode {
                    Mode::Enforce => (response.deny(message).into_review(), Outcome::Denied),
                    Mode::Warn => {
                        let mut response = response;
                        response.warnings = Some(vec![message]);
                        (response.into_review(), Outcome::Warned)
                    }
                };
            }
        };
        // Mutation replaces ANTHROPIC_API_KEY, so a raw literal must be refused here, before it
        // disappears from what the validating webhook sees.
        let findings = self.findings(&req, &Workload::Pod(pod));
        let (response, outcome) = self.apply_findings(response, &findings);
        if outcome == Outcome::Denied {
            return (response.into_review(), outcome);
        }
        match response.with_patch(patch) {
            Ok(r) => (
                r.into_review(),
                if outcome == Outcome::Warned {
                    outcome
                } else {
                    Outcome::Patched
                },
            ),
            Err(e) => invalid(format!("failed to serialize patch: {e}")),
        }
    }
}
