//! Endpoint and model scope: default-deny routing of API paths (matched without their query
//! string) and the model glob allowlist, kept once per distinct list.

use std::{
    convert::Infallible,
    sync::{Arc, LazyLock},
};

use http::Method;
use wildmatch::WildMatch;

use super::{error::ApiError, interned::Interned};
use crate::crd::{Endpoint, ScopeSpec};

/// What a request path is, before the scope is asked whether it is allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Messages,
    CountTokens,
    Models,
    /// Creating a batch carries many requests; their models are checked too.
    BatchCreate,
    Batches,
    Files,
}

impl Route {
    pub fn endpoint(self) -> Endpoint {
        match self {
            Self::Messages => Endpoint::Messages,
            Self::CountTokens => Endpoint::CountTokens,
            Self::Models => Endpoint::Models,
            Self::BatchCreate | Self::Batches => Endpoint::Batches,
            Self::Files => Endpoint::Files,
        }
    }

    /// Bounded label for audit lines and metrics.
    pub fn label(self) -> &'static str {
        match self {
            Self::Messages => "messages",
            Self::CountTokens => "countTokens",
            Self::Models => "models",
            Self::BatchCreate | Self::Batches => "batches",
            Self::Files => "files",
        }
    }

    /// Whether the request body is a Messages-style JSON request the pipeline inspects.
    pub fn has_message_body(self) -> bool {
        matches!(self, Self::Messages | Self::CountTokens | Self::BatchCreate)
    }
}

/// Maps a method and path (query already ignored) to a route; everything unknown is refused.
pub fn classify(method: &Method, path_and_query: &str) -> Result<Route, ApiError> {
    let path = path_and_query.split('?').next().unwrap_or_default();
    let segments: Vec<&str> = path.strip_prefix('/').unwrap_or(path).split('/').collect();
    if !segments.iter().all(|s| valid_segment(s)) {
        return Err(not_found(path));
    }
    let is = |m: &Method| method == m;
    match segments.as_slice() {
        ["v1", "messages"] if is(&Method::POST) => Ok(Route::Messages),
        ["v1", "messages", "count_tokens"] if is(&Method::POST) => Ok(Route::CountTokens),
        ["v1", "models"] | ["v1", "models", _] if is(&Method::GET) => Ok(Route::Models),
        ["v1", "messages", "batches"] if is(&Method::POST) => Ok(Route::BatchCreate),
        ["v1", "messages", "batches", ..] => Ok(Route::Batches),
        ["v1", "files", ..] => Ok(Route::Files),
        ["v1", "complete"] => Err(ApiError::Permission(
            "/v1/complete is not available through claudekey: legacy completions report no token usage".into(),
        )),
        ["v1", "organizations", ..] => Err(ApiError::Permission(
            "the Admin API (/v1/organizations) is never available to workloads".into(),
        )),
        _ => Err(not_found(path)),
    }
}

/// Ids and names only: no empty, dot or percent-encoded segments that an upstream might
/// normalize into a different, unchecked path.
fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
        && s != "."
        && s != ".."
}

fn not_found(path: &str) -> ApiError {
    let shown: String = path.chars().take(100).collect();
    ApiError::NotFound(format!("{shown} is not an endpoint claudekey forwards"))
}

/// The compiled scope of one ClaudeKey.
#[derive(Debug)]
pub struct Scope {
    endpoints: Vec<Endpoint>,
    /// `None` allows every model.
    models: Option<Arc<Models>>,
    other: Arc<str>,
    any: Arc<str>,
    /// `None` passes every anthropic-beta value.
    betas: Option<Vec<String>>,
    mcp_servers: Vec<String>,
}

/// Metric label of a model the scope refuses, and of any model when there is no allowlist.
pub const OTHER_MODEL: &str = "other";
/// Metric label of an open scope's models: the implicit allowlist entry.
pub const ANY_MODEL: &str = "*";

/// A model allowlist, kept once per distinct list and shared by the tenants that have it.
///
/// Each entry is matched by `wildmatch` (`*` any run of characters, `?` one; nothing else is
/// special, as the CRD admits nothing else): its pattern's characters are all it keeps. A
/// compiled `globset` cost 17 KiB for a short list and 100 KiB for 16 entries of ~60
/// characters (`examples/bench_tenants`), in a gateway every namespace's distinct lists share,
/// and allocated its list of matches on every request.
#[derive(Debug)]
struct Models {
    globs: Vec<WildMatch>,
    /// The allowlist entries, by glob index: the model's metric label (shared with the label
    /// sets of every request, so a request copies a pointer).
    labels: Vec<Arc<str>>,
}

static MODELS: LazyLock<Interned<Models>> = LazyLock::new(Interned::default);

impl Models {
    fn shared(patterns: &[String]) -> Arc<Self> {
        let key = serde_json::to_string(patterns).expect("strings serialize");
        let Ok(models) = MODELS.get_or_compile(key, || Ok::<_, Infallible>(Self::new(patterns)));
        models
    }

    fn new(patterns: &[String]) -> Self {
        Self {
            globs: patterns.iter().map(|p| WildMatch::new(p)).collect(),
            labels: patterns.iter().map(|m| m.as_str().into()).collect(),
        }
    }

    /// The label of the first entry `model` matches.
    fn label(&self, model: &str) -> Option<&Arc<str>> {
        let index = self.globs.iter().position(|glob| glob.matches(model))?;
        self.labels.get(index)
    }
}

impl Scope {
    pub fn new(spec: &ScopeSpec) -> Self {
        let models = (!spec.models.is_empty()).then(|| Models::shared(&spec.models));
        Self {
            endpoints: spec.endpoints.clone(),
            models,
            other: OTHER_MODEL.into(),
            any: ANY_MODEL.into(),
            betas: spec.betas.clone(),
            mcp_servers: spec.mcp_servers.clone(),
        }
    }

    /// The model as a bounded metric label: the allowlist entry it matched (`*` with no
    /// allowlist), or `other`; never the name the client sent.
    pub fn model_label(&self, model: &str) -> &Arc<str> {
        match &self.models {
            None => &self.any,
            Some(models) => models.label(model).unwrap_or(&self.other),
        }
    }

    /// Every value of every `anthropic-beta` header (comma-separated) must be allowed.
    pub fn check_betas(&self, headers: &http::HeaderMap) -> Result<(), ApiError> {
        let Some(allowed) = &self.betas else {
            return Ok(());
        };
        for value in headers.get_all("anthropic-beta") {
            let value = value
                .to_str()
                .map_err(|_| ApiError::InvalidRequest("anthropic-beta: must be ASCII".into()))?;
            for beta in value.split(',').map(str::trim).filter(|b| !b.is_empty()) {
                if !allowed.iter().any(|a| a == beta) {
                    let shown: String = beta.chars().take(64).collect();
                    return Err(ApiError::Permission(format!(
                        "anthropic-beta {shown} is not allowed by this ClaudeKey's scope"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Every MCP server a request names must be on the allowlist. The message names the
    /// entry by position only: a URL may carry a token.
    pub fn check_mcp_servers(&self, urls: &[String]) -> Result<(), ApiError> {
        match urls
            .iter()
            .position(|url| !self.mcp_servers.iter().any(|a| a == url))
        {
            None => Ok(()),
            Some(i) => Err(ApiError::Permission(format!(
                "mcp_servers[{i}]: this MCP server is not allowed by this ClaudeKey's scope (scope.mcpServers)"
            ))),
        }
    }

    pub fn check_endpoint(&self, route: Route) -> Result<(), ApiError> {
        if self.endpoints.contains(&route.endpoint()) {
            Ok(())
        } else {
            Err(ApiError::Permission(format!(
                "this ClaudeKey's scope does not include the {} endpoint",
                route.label()
            )))
        }
    }

    /// Whether the allowlist names this model (an empty allowlist allows all).
    pub fn model_allowed(&self, model: &str) -> bool {
        self.models
            .as_ref()
            .is_none_or(|m| m.label(model).is_some())
    }

    /// Whether the allowlist is explicit, so allowed model names are a bounded set of labels.
    pub fn has_model_allowlist(&self) -> bool {
        self.models.is_some()
    }

    pub fn check_model(&self, model: &str) -> Result<(), ApiError> {
        if self.model_allowed(model) {
            Ok(())
        } else {
            let shown: String = model.chars().take(100).collect();
            Err(ApiError::Permission(format!(
                "model {shown} is not allowed by this ClaudeKey's scope"
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope(models: &[&str], endpoints: Vec<Endpoint>) -> Scope {
        Scope::new(&ScopeSpec {
            models: models.iter().map(|s| s.to_string()).collect(),
            endpoints,
            ..Default::default()
        })
    }

    #[test]
    fn scopes_with_the_same_models_share_one_compiled_allowlist() {
        let a = scope(&["claude-haiku-*", "claude-opus-4-1"], vec![]);
        let b = scope(
            &["claude-haiku-*", "claude-opus-4-1"],
            vec![Endpoint::Messages],
        );
        let other = scope(&["claude-haiku-*"], vec![]);
        let (Some(ma), Some(mb), Some(mo)) = (&a.models, &b.models, &other.models) else {
            panic!("allowlists compiled");
        };
        assert!(Arc::ptr_eq(ma, mb));
        assert!(!Arc::ptr_eq(ma, mo));
        assert_eq!(&**b.model_label("claude-opus-4-1"), "claude-opus-4-1");
        assert_eq!(&**other.model_label("claude-opus-4-1"), OTHER_MODEL);
    }

    #[test]
    fn routes_ignore_the_query_string() {
        assert_eq!(
            classify(&Method::POST, "/v1/messages?beta=true").unwrap(),
            Route::Messages
        );
        assert_eq!(
            classify(&Method::POST, "/v1/messages/count_tokens?beta=true").unwrap(),
            Route::CountTokens
        );
        assert_eq!(
            classify(&Method::GET, "/v1/models?limit=20").unwrap(),
            Route::Models
        );
        assert_eq!(
            classify(&Method::GET, "/v1/models/claude-sonnet-4-5").unwrap(),
            Route::Models
        );
        assert_eq!(
            classify(&Method::POST, "/v1/messages/batches").unwrap(),
            Route::BatchCreate
        );
        assert_eq!(
            classify(&Method::GET, "/v1/messages/batches/msgbatch_1/results").unwrap(),
            Route::Batches
        );
        assert_eq!(
            classify(&Method::DELETE, "/v1/files/file_1").unwrap(),
            Route::Files
        );
    }

    #[test]
    fn default_deny() {
        for (method, path, status) in [
            (Method::POST, "/v1/complete", 403),
            (Method::GET, "/v1/organizations/api_keys", 403),
            (Method::POST, "/v1/organizations/api_keys/k1", 403),
            (Method::POST, "/v1/other", 404),
            (Method::GET, "/v1/messages", 404),
            (Method::POST, "/v1/messages/../organizations/api_keys", 404),
            (Method::POST, "/v1//messages", 404),
            (Method::POST, "/v1/messages%2Fcount_tokens", 404),
            (Method::GET, "/", 404),
        ] {
            let err = classify(&method, path).unwrap_err();
            assert_eq!(err.status().as_u16(), status, "{method} {path}");
        }
    }

    #[test]
    fn endpoints_by_scope() {
        let s = scope(&[], vec![Endpoint::Messages]);
        assert!(s.check_endpoint(Route::Messages).is_ok());
        assert_eq!(
            s.check_endpoint(Route::CountTokens).unwrap_err().status(),
            403
        );
        assert_eq!(s.check_endpoint(Route::Files).unwrap_err().status(), 403);
        let s = scope(&[], vec![Endpoint::Batches]);
        assert!(s.check_endpoint(Route::BatchCreate).is_ok());
    }

    #[test]
    fn model_labels_are_allowlist_entries() {
        let s = scope(&["claude-sonnet-4-*", "claude-haiku-*"], vec![]);
        assert_eq!(&**s.model_label("claude-sonnet-4-5"), "claude-sonnet-4-*");
        assert_eq!(
            &**s.model_label("claude-sonnet-4-invented-7"),
            "claude-sonnet-4-*"
        );
        assert_eq!(&**s.model_label("claude-haiku-4-5"), "claude-haiku-*");
        assert_eq!(&**s.model_label("claude-opus-4-1"), OTHER_MODEL);
        assert_eq!(
            &**scope(&[], vec![]).model_label("anything at all"),
            ANY_MODEL
        );
    }

    #[test]
    fn betas_by_allowlist() {
        let mut headers = http::HeaderMap::new();
        headers.append("anthropic-beta", "a-1, b-2".parse().unwrap());
        assert!(scope(&[], vec![]).check_betas(&headers).is_ok());
        let only = |betas: &[&str]| {
            Scope::new(&ScopeSpec {
                betas: Some(betas.iter().map(|s| s.to_string()).collect()),
                ..Default::default()
            })
        };
        assert!(only(&["a-1", "b-2"]).check_betas(&headers).is_ok());
        let err = only(&["a-1"]).check_betas(&headers).unwrap_err();
        assert_eq!(err.status(), 403);
        assert!(err.to_string().contains("b-2"));
        headers.append("anthropic-beta", "c-3".parse().unwrap());
        assert!(only(&["a-1", "b-2"]).check_betas(&headers).is_err());
        assert!(only(&[]).check_betas(&http::HeaderMap::new()).is_ok());
    }

    #[test]
    fn mcp_servers_by_allowlist() {
        let s = Scope::new(&ScopeSpec {
            mcp_servers: vec!["https://mcp.example.com/sse".into()],
            ..Default::default()
        });
        assert!(s.check_mcp_servers(&[]).is_ok());
        assert!(
            s.check_mcp_servers(&["https://mcp.example.com/sse".into()])
                .is_ok()
        );
        let err = s
            .check_mcp_servers(&["https://mcp.example.com/sse?token=SECRET".into()])
            .unwrap_err();
        assert_eq!(err.status(), 403);
        assert!(!err.to_string().contains("SECRET"));
        assert!(
            scope(&[], vec![])
                .check_mcp_servers(&["https://x".into()])
                .is_err()
        );
    }

    #[test]
    fn model_globs() {
        let s = scope(&["claude-sonnet-4-*", "claude-haiku-*"], vec![]);
        assert!(s.check_model("claude-sonnet-4-5-20250929").is_ok());
        assert!(s.check_model("claude-haiku-4-5").is_ok());
        assert_eq!(s.check_model("claude-opus-4-1").unwrap_err().status(), 403);
        assert!(s.has_model_allowlist());
        let open = scope(&[], vec![]);
        assert!(open.check_model("anything").is_ok());
        assert!(!open.has_model_allowlist());
    }

    /// `*` is any run of characters (none included), `?` one character (not one byte); the
    /// whole name must match; anything else is literal, as the CRD admits nothing else.
    #[test]
    fn model_globs_match_whole_names_by_character() {
        let s = scope(&["claude-?-x", "*-haiku-*", "exact", "a**b"], vec![]);
        for (model, allowed) in [
            ("claude-1-x", true),
            ("claude-é-x", true),
            ("claude-12-x", false),
            ("claude--x", false),
            ("claude-haiku-4-5", true),
            ("-haiku-", true),
            ("claude-haiku", false),
            ("exact", true),
            ("exactly", false),
            ("an-exact", false),
            ("ab", true),
            ("a/../b", true),
            ("", false),
        ] {
            assert_eq!(s.model_allowed(model), allowed, "{model:?}");
        }
        let literal = scope(&["claude-[ab]", "claude-{a,b}"], vec![]);
        assert!(literal.model_allowed("claude-[ab]"));
        assert!(!literal.model_allowed("claude-a"), "brackets are literal");
        assert!(!literal.model_allowed("claude-b"), "braces are literal");
        // The metric label is the first entry that matched, never the client's name.
        assert_eq!(&**s.model_label("claude-haiku-4-5"), "*-haiku-*");
        assert_eq!(&**s.model_label("claude-12-x"), OTHER_MODEL);
    }
}
