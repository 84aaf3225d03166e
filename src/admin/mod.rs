//! Anthropic's Admin API: retire replaced upstream keys after grace, usage per key, and the
//! breach playbook (`claudekey revoke`, `claudekey drill`). DESIGN.md §1, §3 step 6.

pub mod cli;
pub mod client;
pub mod hint;
pub mod metrics;
pub mod retire;
pub mod usage;

pub use client::{AdminClient, AdminError, ApiKey, KeyStatus};
pub use hint::{Match, find_by_hint, partial_key_hint};
pub use metrics::AdminMetrics;
pub use retire::{
    AdminKeyError, CONDITION_RETIRED_KEY_LIVE, DrillResult, RetireOutcome, RetiredKeyStatus,
    admin_client_for, probe_key, reason, retire, retire_after_grace, retire_hint,
};
pub use usage::{KeyUsage, Unmatched, UsageMetrics, report_window, resolve_hints};
