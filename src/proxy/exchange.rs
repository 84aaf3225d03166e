//! One request's bookkeeping from the first byte to the last: what the steps learned, and the
//! audit line and metrics written when the exchange is dropped — so a request is audited exactly
//! once however it ends (answered, refused, abandoned by its client, timed out, cut at shutdown).

use std::{
    borrow::Cow,
    sync::{
        Arc, LazyLock, OnceLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Instant,
};

use bytes::Bytes;
use chrono::Utc;
use http::{HeaderMap, Method};

use crate::body_budget::Held;

use super::{
    audit::{self, AuditRecord},
    audit_sink::AuditSink,
    error::ApiError,
    limits::Reservation,
    metrics::{Finished, Metrics},
    redact::Counts,
    request::Facts,
    scope::Route,
    tenant::Tenant,
    usage::Usage,
};

/// Metric label for requests refused before they were tied to a ClaudeKey.
static UNAUTHENTICATED: LazyLock<Arc<str>> = LazyLock::new(|| "unauthenticated".into());
/// Model label of a request that names no model (or was refused before its body was read).
static NO_MODEL: LazyLock<Arc<str>> = LazyLock::new(|| "none".into());

/// How a request ended, as the audit line's `outcome`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The response was delivered whole (whatever its status).
    Completed,
    /// The proxy answered itself: a refusal or its own error.
    Refused,
    /// The upstream failed: unreachable, no answer in time, a broken stream or an `error` event.
    UpstreamError,
    /// The client went away before the response ended.
    ClientClosed,
    /// The client did not send its body in time.
    Timeout,
    /// The proxy stopped before the response ended.
    Shutdown,
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Self::Completed => "completed",
            Self::Refused => "refused",
            Self::UpstreamError => "upstream_error",
            Self::ClientClosed => "client_closed",
            Self::Timeout => "timeout",
            Self::Shutdown => "shutdown",
        }
    }
}

/// Where finished exchanges go; shared by every request.
pub struct Recorder {
    pub metrics: Arc<Metrics>,
    pub audit: AuditSink,
    /// Set when the proxy stops waiting for open requests: exchanges dropped after that were cut
    /// by the shutdown, not by their clients.
    pub shutting_down: AtomicBool,
    pub pod: Option<Arc<str>>,
}

/// One request through the proxy. Every step reads and writes it; nothing else carries
/// per-request state.
pub struct Exchange {
    recorder: Arc<Recorder>,
    start: Instant,
    pub method: Method,
    /// Path and query as the client sent them.
    pub path: String,
    pub route: Option<Route>,
    pub headers: HeaderMap,
    pub tenant: Option<Arc<Tenant>>,
    /// The request body to forward: the client's bytes, or the redacted re-encoding.
    pub body: Bytes,
    /// The body's bytes (and its tree's while it lives) in the process's body budget, given
    /// back once the upstream has answered: the body is kept until then (a retry resends it).
    pub body_held: Option<Held>,
    /// Facts of the request (of each request, for a batch).
    pub facts: Vec<Facts>,
    /// The prescreen found nothing in any text: the injection screen and the redactor have
    /// nothing to do.
    pub texts_clear: bool,
    /// The model as a bounded metric label (an allowlist entry, `*`, `other` or `none`).
    pub model_label: Arc<str>,
    pub reservation: Option<Reservation>,
    /// Redactions in the request and in the response.
    pub counts: Counts,
    pub response_counts: Counts,
    pub usage: Usage,
    /// Whether the request left for the upstream (an abandoned request may then have used tokens).
    pub sent: bool,
    /// Left as `ClientClosed` until a step or the response says otherwise.
    pub outcome: Outcome,
    pub audit: AuditRecord,
}

impl Exchange {
    pub fn new(recorder: Arc<Recorder>, method: Method, path: String, headers: HeaderMap) -> Self {
        let audit = AuditRecord {
            time: Utc::now(),
            request_id: request_id(),
            pod: recorder.pod.clone(),
            method: method_name(&method),
            endpoint: "unknown",
            status: 499,
            ..Default::default()
        };
        Self {
            recorder,
            start: Instant::now(),
            method,
            path,
            route: None,
            headers,
            tenant: None,
            body: Bytes::new(),
            body_held: None,
            facts: Vec::new(),
            texts_clear: false,
            model_label: NO_MODEL.clone(),
            reservation: None,
            counts: Counts::default(),
            response_counts: Counts::default(),
            usage: Usage::default(),
            sent: false,
            outcome: Outcome::ClientClosed,
            audit,
        }
    }

    pub fn metrics(&self) -> &Metrics {
        &self.recorder.metrics
    }

    pub fn request_id(&self) -> &str {
        &self.audit.request_id
    }

    /// The tenant; steps after authentication may rely on it.
    pub fn tenant(&self) -> Result<Arc<Tenant>, ApiError> {
        self.tenant
            .clone()
            .ok_or_else(|| ApiError::Unavailable("request has no ClaudeKey".into()))
    }

    /// The proxy answers with `error` itself.
    pub fn refuse(&mut self, error: &ApiError) {
        self.audit.status = error.status().as_u16();
        self.audit.error = Some(error.kind().into());
        self.outcome = match error {
            ApiError::BadGateway(_) | ApiError::GatewayTimeout(_) => Outcome::UpstreamError,
            ApiError::Timeout(_) => Outcome::Timeout,
            _ => Outcome::Refused,
        };
    }

    fn finish(&mut self) {
        if self.outcome == Outcome::ClientClosed
            && self.recorder.shutting_down.load(Ordering::Relaxed)
        {
            self.outcome = Outcome::Shutdown;
        }
        if let Some(reservation) = self.reservation.take() {
            // Abandoned after it was sent and before any usage came back: the upstream may
            // still spend the reservation, so keep it charged.
            // A batch reports no usage here at all: its estimate is what it costs.
            let unknown = self.sent
                && self.usage.total() == 0
                && (self.outcome != Outcome::Completed || self.route == Some(Route::BatchCreate));
            let used = if unknown {
                reservation.tokens()
            } else {
                self.usage.charged()
            };
            // A batch's usage never comes back here: its spend is its estimate (every request's
            // input and max_tokens, at list price), so batches cannot slip past a budget.
            let batch_sent = self.route == Some(Route::BatchCreate)
                && self.sent
                && (200..300).contains(&self.audit.status);
            let priced = if batch_sent && self.usage.total() == 0 {
                Usage {
                    input: self.facts.iter().map(|f| f.text_chars.div_ceil(4)).sum(),
                    output: self.facts.iter().filter_map(|f| f.max_tokens).sum(),
                    ..Usage::default()
                }
            } else {
                self.usage
            };
            reservation.settle(used, &priced);
        }
        let elapsed = self.start.elapsed();
        let audit = &mut self.audit;
        audit.outcome = self.outcome.label();
        audit.set_usage(&self.usage);
        audit.latency_ms = elapsed.as_secs_f64() * 1000.0;
        let metrics = &self.recorder.metrics;
        let label = self.tenant.as_ref().map_or(&*UNAUTHENTICATED, |t| &t.label);
        metrics.finished(
            self.tenant.as_ref().map(|t| &t.series),
            &Finished {
                claudekey: label,
                model: &self.model_label,
                endpoint: audit.endpoint,
                status: audit.status,
                outcome: audit.outcome,
                elapsed,
                usage: &self.usage,
            },
        );
        if let Some(tenant) = &self.tenant {
            for (name, n) in self
                .counts
                .named(&tenant.redactor)
                .chain(self.response_counts.named(&tenant.redactor))
            {
                *audit.redactions.entry(name.to_string()).or_default() += n;
                metrics.redactions(label, name, n);
            }
        }
        self.recorder.audit.write(std::mem::take(audit));
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        self.finish();
    }
}

/// The method as the audit line names it: a static string for every standard method.
fn method_name(method: &Method) -> Cow<'static, str> {
    const STANDARD: [&str; 9] = [
        "GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "CONNECT", "TRACE",
    ];
    let name = method.as_str();
    match STANDARD.iter().find(|s| **s == name) {
        Some(s) => Cow::Borrowed(s),
        None => Cow::Owned(name.to_owned()),
    }
}

/// `req_ck_` and 32 hex digits, unique per request: a random per-process half and a counter, so
/// no request pays for a call to the kernel's random source.
pub(super) fn request_id() -> String {
    static PROCESS: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let process = *PROCESS.get_or_init(|| uuid::Uuid::new_v4().as_u64_pair().0);
    request_id_of(process, COUNTER.fetch_add(1, Ordering::Relaxed))
}

fn request_id_of(process: u64, n: u64) -> String {
    let mut halves = [0u8; 16];
    halves[..8].copy_from_slice(&process.to_be_bytes());
    halves[8..].copy_from_slice(&n.to_be_bytes());
    let mut id = String::with_capacity(REQUEST_ID_LEN);
    id.push_str("req_ck_");
    audit::push_hex_128(&mut id, &halves);
    id
}

const REQUEST_ID_LEN: usize = "req_ck_".len() + 32;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_the_prefix_and_32_hex_digits_and_never_repeat() {
        let (a, b) = (request_id(), request_id());
        for id in [&a, &b] {
            assert_eq!(id.len(), REQUEST_ID_LEN, "{id}");
            let digits = id.strip_prefix("req_ck_").expect("prefix");
            assert!(digits.bytes().all(|c| c.is_ascii_hexdigit()), "{id}");
        }
        assert_ne!(a, b);
        assert_eq!(a[..23], b[..23], "one process half");
    }

    #[test]
    fn request_ids_spell_both_halves_as_zero_padded_lowercase_hex() {
        for (process, n) in [
            (0, 0),
            (1, 255),
            (0xdead_beef_0123_4567, u64::MAX),
            (u64::MAX, 10),
        ] {
            assert_eq!(
                request_id_of(process, n),
                format!("req_ck_{process:016x}{n:016x}")
            );
        }
    }
}
