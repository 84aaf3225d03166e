//! A small client for Anthropic's Admin API (`/v1/organizations/…`): list, get and update API
//! keys, read the usage report. Same hyper + rustls stack as the proxy's upstream (one HTTP
//! stack in the binary, no reqwest); the admin key never appears in errors or `Debug`.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// The API version header every request carries.
pub const ANTHROPIC_VERSION: &str = "2023-06-01";
/// Page size for key listing (the API's maximum is 1000; 100 keeps responses small).
const PAGE_LIMIT: usize = 100;
/// Upper bound on pages followed, so a misbehaving server cannot loop us forever.
const MAX_PAGES: usize = 1000;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("failed to parse Anthropic URL {url:?}: it must be http:// or https:// with a host")]
    Url { url: String },
    #[error("failed to set up TLS for the Anthropic API: {source}")]
    Tls { source: rustls::Error },
    #[error("failed to authenticate to the Admin API: the admin key was rejected (401)")]
    Unauthorized,
    #[error("failed to {what}: the admin key lacks permission (403)")]
    Forbidden { what: String },
    #[error("failed to {what}: not found (404)")]
    NotFound { what: String },
    #[error("failed to {what}: HTTP {status}: {message}")]
    Status {
        what: String,
        status: u16,
        message: String,
    },
    #[error("failed to {what}: {source}")]
    Transport {
        what: String,
        source: hyper_util::client::legacy::Error,
    },
    #[error("failed to {what}: no answer within {timeout:?}")]
    Timeout { what: String, timeout: Duration },
    #[error("failed to {what}: unexpected response body: {source}")]
    Decode {
        what: String,
        source: serde_json::Error,
    },
    #[error("failed to {what}: reading the body: {source}")]
    Body { what: String, source: hyper::Error },
    #[error("failed to list API keys: more than {MAX_PAGES} pages")]
    TooManyPages,
}

/// Status of an API key at Anthropic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyStatus {
    Active,
    Inactive,
    Archived,
    /// A status this client does not know yet; never acted on.
    #[serde(other)]
    Unknown,
}

/// One API key as the Admin API describes it (no secret: only the partial hint).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct ApiKey {
    pub id: String,
    #[serde(default)]
    pub name: String,
    pub status: KeyStatus,
    #[serde(default)]
    pub partial_key_hint: Option<String>,
    #[serde(default)]
    pub workspace_id: Option<String>,
}

#[derive(Deserialize)]
struct KeyPage {
    data: Vec<ApiKey>,
    #[serde(default)]
    has_more: bool,
    #[serde(default)]
    last_id: Option<String>,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    #[serde(default)]
    message: String,
}

/// An Admin API client for one admin key. `Debug` shows the base URL only.
pub struct AdminClient {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    base: String,
    admin_key: SecretString,
    timeout: Duration,
}

impl std::fmt::Debug for AdminClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminClient")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl AdminClient {
    /// `base_url` is e.g. `https://api.anthropic.com` (or the fake upstream's URL in tests).
    pub fn new(base_url: &str, admin_key: SecretString) -> Result<Self, AdminError> {
        let client = http_client(base_url)?;
        Ok(Self {
            client,
            base: base_url.trim_end_matches('/').to_string(),
            admin_key,
            timeout: Duration::from_secs(30),
        })
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// Every API key of the organization, following `after_id` pages until `has_more` is false.
    pub async fn list_keys(&self) -> Result<Vec<ApiKey>, AdminError> {
        let mut keys = Vec::new();
        let mut after: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let mut path = format!("/v1/organizations/api_keys?limit={PAGE_LIMIT}");
            if let Some(after) = &after {
                path.push_str(&format!("&after_id={}", urlencode(after)));
            }
            let page: KeyPage = self.call(Method::GET, &path, None, "list API keys").await?;
            let last = page
                .last_id
                .or_else(|| page.data.last().map(|k| k.id.clone()));
            keys.extend(page.data);
            match (page.has_more, last) {
                (true, Some(last)) => after = Some(last),
                _ => return Ok(keys),
            }
        }
        Err(AdminError::TooManyPages)
    }

    pub async fn get_key(&self, id: &str) -> Result<ApiKey, AdminError> {
        let path = format!("/v1/organizations/api_keys/{}", urlencode(id));
        self.call(Method::GET, &path, None, &format!("get API key {id}"))
            .await
    }

    pub async fn set_status(&self, id: &str, status: KeyStatus) -> Result<ApiKey, AdminError> {
        let path = format!("/v1/organizations/api_keys/{}", urlencode(id));
        let body = serde_json::json!({ "status": status }).to_string();
        self.call(
            Method::POST,
            &path,
            Some(body.into()),
            &format!("update API key {id}"),
        )
        .await
    }

    /// One JSON call with the admin key; maps 401/403/404 to typed errors.
    pub(crate) async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<Bytes>,
        what: &str,
    ) -> Result<T, AdminError> {
        let (status, bytes) = self
            .send(method, path_and_query, body, Some(&self.admin_key), what)
            .await?;
        match status {
            s if s.is_success() => {
                serde_json::from_slice(&bytes).map_err(|source| AdminError::Decode {
                    what: what.to_string(),
                    source,
                })
            }
            StatusCode::UNAUTHORIZED => Err(AdminError::Unauthorized),
            StatusCode::FORBIDDEN => Err(AdminError::Forbidden {
                what: what.to_string(),
            }),
            StatusCode::NOT_FOUND => Err(AdminError::NotFound {
                what: what.to_string(),
            }),
            s => Err(AdminError::Status {
                what: what.to_string(),
                status: s.as_u16(),
                message: error_message(&bytes),
            }),
        }
    }

    /// Sends a request with `key` as `x-api-key`; returns status and body.
    pub(crate) async fn send(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<Bytes>,
        key: Option<&SecretString>,
        what: &str,
    ) -> Result<(StatusCode, Bytes), AdminError> {
        let uri: Uri = format!("{}{}", self.base, path_and_query)
            .parse()
            .map_err(|_| AdminError::Url {
                url: self.base.clone(),
            })?;
        let mut builder = Request::builder()
            .method(method)
            .uri(uri)
            .header("anthropic-version", ANTHROPIC_VERSION)
            .header("content-type", "application/json");
        if let Some(key) = key {
            builder = builder.header("x-api-key", key.expose_secret());
        }
        let request = builder
            .body(Full::new(body.unwrap_or_default()))
            .map_err(|_| AdminError::Url {
                url: self.base.clone(),
            })?;
        let response = tokio::time::timeout(self.timeout, self.client.request(request))
            .await
            .map_err(|_| AdminError::Timeout {
                what: what.to_string(),
                timeout: self.timeout,
            })?
            .map_err(|source| AdminError::Transport {
                what: what.to_string(),
                source,
            })?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|source| AdminError::Body {
                what: what.to_string(),
                source,
            })?
            .to_bytes();
        Ok((status, bytes))
    }
}

fn http_client(
    url: &str,
) -> Result<Client<HttpsConnector<HttpConnector>, Full<Bytes>>, AdminError> {
    let parsed: Uri = url.parse().map_err(|_| AdminError::Url {
        url: url.to_string(),
    })?;
    if !matches!(parsed.scheme_str(), Some("http" | "https")) || parsed.authority().is_none() {
        return Err(AdminError::Url {
            url: url.to_string(),
        });
    }
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(Duration::from_secs(10)));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
        .map_err(|source| AdminError::Tls { source })?
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new()).build(https))
}

/// The API's error message, cut short; the API never echoes keys in its messages.
fn error_message(bytes: &[u8]) -> String {
    serde_json::from_slice::<ErrorBody>(bytes)
        .map(|b| b.error.message)
        .unwrap_or_default()
        .chars()
        .take(200)
        .collect()
}

/// Percent-encodes a query or path value (ids are `[A-Za-z0-9_]`, but never trust that).
pub(crate) fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_admin_key() {
        let c = AdminClient::new(
            "http://127.0.0.1:9",
            SecretString::from("sk-ant-admin01-secretvalue"),
        )
        .unwrap();
        assert!(!format!("{c:?}").contains("secretvalue"));
    }

    #[test]
    fn rejects_bad_urls_and_unknown_status_is_tolerated() {
        assert!(matches!(
            AdminClient::new("ftp://x", SecretString::from("k")),
            Err(AdminError::Url { .. })
        ));
        let k: ApiKey =
            serde_json::from_str(r#"{"id":"a","status":"expired","partial_key_hint":null}"#)
                .unwrap();
        assert_eq!(k.status, KeyStatus::Unknown);
        assert_eq!(urlencode("a b/c"), "a%20b%2Fc");
    }
}
