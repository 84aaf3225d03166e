//! `ClaudeKey.spec`: what a platform team writes (DESIGN.md §2). Every doc comment here becomes
//! `kubectl explain` text, so it is written for the user of the cluster, not for us.

use chrono::{DateTime, Utc};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{ClaudeKeyStatus, GoDuration};

/// A workload's Anthropic API access: where its upstream key lives, what a scoped workload key may
/// do, how keys rotate and what the proxy protects.
// clippy reads the repeated `type_` of each printcolumn as a duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "claudekey.io",
    version = "v1alpha2",
    kind = "ClaudeKey",
    namespaced,
    shortname = "ck",
    category = "claudekey",
    status = "ClaudeKeyStatus",
    doc = "ClaudeKey keeps one workload's Anthropic API key safe: it uses an upstream key from a source the platform granted to its namespace, issues a scoped, rotating workload key, and configures the claudekey proxy that enforces scope, limits and data protection.",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason"
    ),
    printcolumn(name = "Source", type_ = "string", json_path = ".status.source"),
    printcolumn(
        name = "Placement",
        type_ = "string",
        json_path = ".status.placement",
        priority = 1
    ),
    printcolumn(
        name = "Key",
        type_ = "string",
        json_path = ".status.workloadKey.fingerprint"
    ),
    printcolumn(
        name = "Upstream",
        type_ = "string",
        json_path = ".status.upstream.fingerprint"
    ),
    printcolumn(
        name = "Next Rotation",
        // A future time: kubectl renders "date" columns as an age, and a future age as <invalid>.
        type_ = "string",
        json_path = ".status.nextRotationTime"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ClaudeKeySpec {
    /// The source of the upstream Anthropic key: a ClusterClaudeKeySource that grants this
    /// namespace, or a ClaudeKeySource in this namespace.
    pub source_ref: SourceRef,
    /// What the workload key may call: models, endpoints and request size caps.
    #[serde(default)]
    pub scope: ScopeSpec,
    /// Rate, token and per-user limits and spend budgets of this ClaudeKey: across all its pods
    /// and gateway replicas when the proxies share counters through Redis, per proxy otherwise.
    #[serde(default)]
    pub limits: LimitsSpec,
    /// How often the workload key is re-issued and how long the previous key stays valid.
    #[serde(default)]
    pub rotation: RotationSpec,
    /// PII redaction and prompt-injection screening applied by the proxy.
    #[serde(default)]
    pub data_protection: DataProtectionSpec,
    /// Optional end of life: after this time the workload key is no longer accepted
    /// (contractor and temporary keys end by themselves). RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
}

/// A reference to the source of a ClaudeKey's upstream key.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
pub struct SourceRef {
    /// ClusterClaudeKeySource (granted by the platform team through allowedNamespaces) or
    /// ClaudeKeySource (in this ClaudeKey's namespace).
    pub kind: SourceKind,
    /// Name of the source.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// The kinds a sourceRef can name.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SourceKind {
    ClusterClaudeKeySource,
    ClaudeKeySource,
}

/// A source's backend as the backends read it: exactly one of kubernetesSecret,
/// awsSecretsManager, vault. Not itself part of any CRD: each source kind carries these fields.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SourceSpec {
    /// A Kubernetes Secret in the claudekey operator's namespace (the embedded default backend).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes_secret: Option<KubernetesSecretSource>,
    /// A secret in AWS Secrets Manager, read with the controller's AWS credentials (IRSA / Pod Identity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws_secrets_manager: Option<AwsSecretsManagerSource>,
    /// A HashiCorp Vault (or OpenBao) KV version 2 secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vault: Option<VaultSource>,
    /// How often the backend is polled for a new version of the upstream key, e.g. 5m.
    #[serde(default = "default_refresh_interval")]
    pub refresh_interval: GoDuration,
    /// Where a kubernetesSecret lives: `None` is the operator namespace, where only Secrets
    /// labelled `claudekey.io/upstream-key: "true"` may be read; a namespaced ClaudeKeySource
    /// sets its own namespace. Set by the controller from the source's kind, never by a user.
    #[serde(skip)]
    pub secret_namespace: Option<String>,
}

/// A key in a Secret: in the operator's namespace for a ClusterClaudeKeySource (labelled
/// claudekey.io/upstream-key: "true"), in its own namespace for a ClaudeKeySource.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
pub struct KubernetesSecretSource {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key inside the Secret's data that holds the Anthropic API key.
    #[serde(default = "default_secret_key")]
    #[schemars(length(min = 1))]
    pub key: String,
}

/// A secret in AWS Secrets Manager.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
pub struct AwsSecretsManagerSource {
    /// Name or ARN of the secret, e.g. prod/claude/support-bot.
    #[schemars(length(min = 1, max = 2048))]
    pub secret_id: String,
    /// AWS region of the secret; defaults to the controller's configured region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Version stage to read; defaults to AWSCURRENT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version_stage: Option<String>,
    /// When the secret value is a JSON object, the field that holds the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub json_field: Option<String>,
}

/// A HashiCorp Vault KV version 2 secret.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
pub struct VaultSource {
    /// Mount path of the KV v2 engine.
    #[serde(default = "default_vault_mount")]
    pub mount: String,
    /// Path of the secret inside the mount, e.g. claude/support-bot.
    #[schemars(length(min = 1))]
    pub path: String,
    /// Field of the secret that holds the key.
    #[serde(default = "default_vault_field")]
    pub field: String,
    /// Vault Kubernetes-auth role to log in with; defaults to the controller's configured role.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
}

/// What a workload may call through the proxy. Anything not listed is refused.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ScopeSpec {
    /// Allowed model names as globs (`*` and `?`), e.g. claude-sonnet-4-*. Empty allows every model.
    /// At most 16, each at most 64 characters: a shared gateway keeps every distinct list.
    #[serde(default)]
    #[schemars(
        length(max = 16),
        inner(regex(pattern = r"^[A-Za-z0-9._:@*?-]+$"), length(min = 1, max = 64))
    )]
    pub models: Vec<String>,
    /// Allowed API endpoints. Batches and files are off unless listed; legacy completions never.
    #[serde(default = "default_endpoints")]
    #[schemars(length(max = 8))]
    pub endpoints: Vec<Endpoint>,
    /// Requests whose max_tokens exceeds this are refused. Unset means no cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_tokens: Option<u32>,
    /// Requests whose text (system, messages, documents, tool inputs and results, in every
    /// request of a batch) together exceeds this many characters are refused (413). Content the
    /// proxy cannot read (base64 images and PDFs) counts by its encoded size in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_input_chars: Option<u64>,
    /// Allowed values of the anthropic-beta request header, e.g. prompt-caching-2024-07-31.
    /// Unset passes every beta; set, a request naming any other beta is refused (403), and an
    /// empty list allows none. Betas change what a request may do (new tools, connectors), so a
    /// team that pins its scope pins them too. At most 64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 64),
        inner(regex(pattern = r"^[A-Za-z0-9._-]+$"), length(min = 1, max = 128))
    )]
    pub betas: Option<Vec<String>>,
    /// URLs of remote MCP servers a request may name in mcp_servers (the MCP connector), compared
    /// exactly, e.g. https://mcp.example.com/sse. Empty (the default) refuses every request that
    /// uses the connector: the model would send conversation data to a server the proxy cannot
    /// see, past redaction. At most 32.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 2048)))]
    pub mcp_servers: Vec<String>,
}

/// An Anthropic API endpoint family the proxy can forward.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
pub enum Endpoint {
    /// POST /v1/messages
    Messages,
    /// POST /v1/messages/count_tokens
    CountTokens,
    /// GET /v1/models and /v1/models/{id}
    Models,
    /// /v1/messages/batches (Message Batches API)
    Batches,
    /// /v1/files (Files API)
    Files,
}

/// Limits of this ClaudeKey. With the proxies' shared counters (Redis) they hold across every
/// pod and gateway replica serving it; without, each proxy process counts alone. While Redis is
/// unreachable each proxy enforces its fallback share (--redis-fallback-share: default 0.5, the
/// chart's gateway 1/replicas) of every limit and budget by itself (docs/limits.md).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LimitsSpec {
    /// Requests per minute. Unset means unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub requests_per_minute: Option<u32>,
    /// Input plus output tokens per minute, reserved before forwarding and settled from real usage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub tokens_per_minute: Option<u64>,
    /// Requests per hour per end user, keyed by the request's metadata.user_id (sliding window
    /// of one-minute buckets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub per_user_requests_per_hour: Option<u32>,
    /// Spend budgets in US dollars, settled from real usage (input, output, cache write and
    /// cache read tokens) at list prices. Once spent, requests are refused with 429
    /// rate_limit_error and x-should-retry: false until the period resets (UTC day, UTC month).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<BudgetSpec>,
}

/// Spend budgets of a ClaudeKey. A request is admitted while the period's spend is below the
/// budget, so the requests in flight when it is reached may overshoot it by their own cost.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BudgetSpec {
    /// US dollars per UTC day (resets at 00:00 UTC). 0 refuses every request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub usd_per_day: Option<f64>,
    /// US dollars per UTC calendar month (resets on the 1st at 00:00 UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub usd_per_month: Option<f64>,
}

/// Rotation schedule of the workload key.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("duration(self.gracePeriod) < duration(self.interval)").message("gracePeriod must be shorter than interval"))]
#[serde(rename_all = "camelCase")]
pub struct RotationSpec {
    /// The workload key is re-issued this often (at least 10m), e.g. 2160h (90 days). Rotate
    /// sooner on demand with the claudekey.io/rotate annotation.
    #[serde(default = "default_rotation_interval")]
    #[x_kube(validation = Rule::new("duration(self) >= duration('10m')").message("rotation.interval must be at least 10m"))]
    pub interval: GoDuration,
    /// How long the previous key stays valid after a rotation, so no request fails mid-rotation.
    #[serde(default = "default_grace_period")]
    pub grace_period: GoDuration,
}

/// Data protection applied by the proxy to prompts and, optionally, completions.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DataProtectionSpec {
    /// Built-in detectors whose matches are replaced by a placeholder before the request leaves the pod.
    #[serde(default)]
    #[schemars(length(max = 8))]
    pub redact: Vec<Detector>,
    /// Additional named regular expressions (Rust regex syntax) to redact: at most 32, all of
    /// them together compiling to at most 1 MiB (a counted repetition of a Unicode class such as
    /// \w{10} is large; (?-u:\w) is small). A namespace may use a limited number of distinct
    /// lists (the controller's --max-pattern-lists-per-namespace, 4 by default).
    #[serde(default)]
    #[schemars(length(max = 32))]
    pub custom_patterns: Vec<CustomPattern>,
    /// Also redact model output, including text deltas inside streamed (SSE) responses.
    #[serde(default)]
    pub redact_responses: bool,
    /// Prompt-injection screening: off, flag (mark in audit and metrics) or block (refuse the request).
    #[serde(default)]
    pub prompt_injection: PromptInjectionMode,
    /// Refuse (400) requests carrying content the proxy cannot read, and so cannot redact or
    /// screen: images, PDFs and other documents sent as base64, URL or file references. Default
    /// false forwards such content unread (its size still counts toward scope.maxInputChars).
    /// Set it when redaction must cover everything that leaves the pod.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub refuse_unreadable_content: bool,
}

/// A built-in PII detector.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
pub enum Detector {
    /// E-mail addresses.
    Email,
    /// US social security numbers.
    Ssn,
    /// Phone numbers.
    Phone,
    /// Payment card numbers (Luhn-checked).
    CreditCard,
}

/// A named regular expression to redact.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CustomPattern {
    /// Name shown in placeholders, audit counts and metrics, e.g. employee-id.
    #[schemars(regex(pattern = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"))]
    pub name: String,
    /// The regular expression, e.g. EMP-[0-9]{6}.
    #[schemars(length(min = 1, max = 1024))]
    pub regex: String,
}

/// What the proxy does with a request that looks like a prompt-injection attempt.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum PromptInjectionMode {
    /// No screening.
    Off,
    /// Forward, but mark the request in the audit log and metrics.
    #[default]
    Flag,
    /// Refuse the request.
    Block,
}

/// Admin API access used to deactivate replaced upstream keys at Anthropic.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct AnthropicAdminSpec {
    /// Secret in the operator's namespace holding an Anthropic admin key (sk-ant-admin01-…).
    pub admin_key_secret_ref: SecretKeyRef,
}

/// A key in a Secret in the operator's namespace.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key inside the Secret's data.
    #[schemars(length(min = 1))]
    pub key: String,
}

impl Default for ScopeSpec {
    fn default() -> Self {
        Self {
            models: Vec::new(),
            endpoints: default_endpoints(),
            max_tokens: None,
            max_input_chars: None,
            betas: None,
            mcp_servers: Vec::new(),
        }
    }
}

impl Default for RotationSpec {
    fn default() -> Self {
        Self {
            interval: default_rotation_interval(),
            grace_period: default_grace_period(),
        }
    }
}

impl SourceSpec {
    /// A short, non-secret description of the source for status and messages.
    pub fn describe(&self) -> String {
        if let Some(s) = &self.kubernetes_secret {
            format!("kubernetes:{}", s.name)
        } else if let Some(s) = &self.aws_secrets_manager {
            format!("aws:{}", s.secret_id)
        } else if let Some(s) = &self.vault {
            format!("vault:{}/{}", s.mount, s.path)
        } else {
            "none".to_string()
        }
    }
}

fn default_refresh_interval() -> GoDuration {
    "5m".parse().expect("valid literal")
}
fn default_rotation_interval() -> GoDuration {
    "2160h".parse().expect("valid literal")
}
fn default_grace_period() -> GoDuration {
    "15m".parse().expect("valid literal")
}
fn default_secret_key() -> String {
    "api-key".to_string()
}
fn default_vault_mount() -> String {
    "secret".to_string()
}
fn default_vault_field() -> String {
    "api_key".to_string()
}
fn default_endpoints() -> Vec<Endpoint> {
    vec![Endpoint::Messages, Endpoint::CountTokens, Endpoint::Models]
}
