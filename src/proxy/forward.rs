//! The upstream side: one pool of HTTP/1 connections (rustls for https, plain http for tests
//! and local fakes, TCP_NODELAY), and the request rewrite that swaps the client's credential
//! for the upstream key.

use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt as _;
use http::{
    HeaderMap, HeaderName, HeaderValue, Method, Request, Response, Uri,
    header::{self, Entry},
};
use hyper_util::client::legacy::connect::HttpConnector;
use smallvec::SmallVec;

use super::{
    body::{ProxyBody, full},
    error::ApiError,
    upstream_pool::{Pool, UpstreamBody},
};

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("failed to parse upstream URL {url:?}: it must be http:// or https:// with a host")]
    Url { url: String },
    #[error("failed to set up TLS for the upstream: {source}")]
    Tls { source: rustls::Error },
}

/// Headers that belong to one hop (or to its `Host`), never forwarded by the proxy nor by the
/// gateway-placement forwarder.
pub const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "proxy-authenticate",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
];

/// The client's credentials: replaced by the upstream key (here) or the workload key (forwarder).
pub const CREDENTIALS: &[&str] = &["x-api-key", "authorization"];

/// What the proxy drops besides hop-by-hop headers and credentials.
const DROPPED: &[&str] = &[
    "content-length",
    // The proxy reads response bodies (usage, redaction), so they must come uncompressed.
    "accept-encoding",
    // Who the client is and what its browser holds are not the upstream's business: a pod's
    // addresses and a session cookie would leave the cluster with every request.
    "forwarded",
    "x-real-ip",
    "cookie",
];

/// What authenticates the proxy upstream (both values are sensitive headers).
#[derive(Clone, Debug)]
pub enum Credential {
    /// An upstream API key, sent as `x-api-key`.
    ApiKey(HeaderValue),
    /// `Bearer sk-ant-oat01-…`, a federation access token.
    Bearer(HeaderValue),
}

pub struct Upstream {
    pool: Pool,
    /// The base URL's path without a trailing slash: put before every request's path (usually
    /// empty).
    prefix: String,
    /// `host[:port]` of the base URL, the port only when it is not the scheme's default.
    host: HeaderValue,
    header_timeout: Duration,
}

impl Upstream {
    pub fn new(url: &str, header_timeout: Duration) -> Result<Self, ForwardError> {
        let parsed: Uri = url.parse().map_err(|_| ForwardError::Url {
            url: url.to_string(),
        })?;
        let bad_url = || ForwardError::Url {
            url: url.to_string(),
        };
        let (Some(scheme), Some(authority)) = (parsed.scheme(), parsed.authority()) else {
            return Err(bad_url());
        };
        if !matches!(scheme.as_str(), "http" | "https") {
            return Err(bad_url());
        }
        let host = host_header(scheme.as_str(), authority).ok_or_else(bad_url)?;
        let origin = Uri::builder()
            .scheme(scheme.clone())
            .authority(authority.clone())
            .path_and_query("/")
            .build()
            .map_err(|_| bad_url())?;
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.enforce_http(false);
        http.set_connect_timeout(Some(Duration::from_secs(10)));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
            .map_err(|source| ForwardError::Tls { source })?
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        Ok(Self {
            pool: Pool::new(https, origin),
            prefix: parsed.path().trim_end_matches('/').to_string(),
            host,
            header_timeout,
        })
    }

    /// The request to the upstream: same method, path, query and headers (anthropic-version and
    /// anthropic-beta included), minus hop-by-hop headers and the client's credential, plus the
    /// upstream key as `x-api-key` (or a federation access token as `Authorization: Bearer`,
    /// with the OAuth beta added to the client's).
    pub fn request(
        &self,
        method: &Method,
        path_and_query: &str,
        headers: &HeaderMap,
        credential: &Credential,
        body: ProxyBody,
    ) -> Result<Request<ProxyBody>, ApiError> {
        let mut request = self
            .to_upstream(method.clone(), path_and_query, body)
            .ok_or_else(|| ApiError::InvalidRequest("request path is not a valid URI".into()))?;
        let out = request.headers_mut();
        for (name, value) in headers {
            if !is_dropped(name) {
                out.append(name.clone(), value.clone());
            }
        }
        match credential {
            Credential::ApiKey(key) => {
                out.insert(HeaderName::from_static("x-api-key"), key.clone());
            }
            Credential::Bearer(bearer) => {
                out.insert(header::AUTHORIZATION, bearer.clone());
                with_oauth_beta(out);
            }
        }
        Ok(request)
    }

    /// `POST {base}{path}` for the token exchange: the answer's status and body (at most
    /// `limit` bytes). The error is a short reason, never a body.
    pub async fn post(
        &self,
        path: &str,
        mut headers: HeaderMap,
        body: Bytes,
        limit: usize,
    ) -> Result<(http::StatusCode, Bytes), String> {
        use http_body_util::{BodyExt, Limited};
        let mut request = self
            .to_upstream(Method::POST, path, full(body))
            .ok_or_else(|| "bad URL".to_string())?;
        // `Host` is the upstream's, whatever the caller passed (`extend` would replace it).
        headers.remove(header::HOST);
        request.headers_mut().extend(headers);
        let response = self
            .pool
            .send(request)
            .await
            .map_err(|e| format!("connection error: {e}"))?;
        let status = response.status();
        let body = Limited::new(response.into_body(), limit)
            .collect()
            .await
            .map_err(|_| "the answer broke off or was too large".to_string())?;
        Ok((status, body.to_bytes()))
    }

    /// Sends one request; connection failures are 502, no response headers in time 504.
    ///
    /// A combinator rather than an `async fn`: every request's future holds this one, and an
    /// `async fn` would add a layer that keeps its own copy of the request and is moved whole
    /// into its caller (docs/benchmarks-notes.md, "Futures moved whole").
    pub fn send(
        &self,
        request: Request<ProxyBody>,
    ) -> impl Future<Output = Result<Response<UpstreamBody>, ApiError>> + Send + '_ {
        tokio::time::timeout(self.header_timeout, self.pool.send(request)).map(|sent| match sent {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "upstream request failed");
                Err(ApiError::BadGateway(
                    "the upstream Anthropic API could not be reached".into(),
                ))
            }
            Err(_) => Err(ApiError::GatewayTimeout(
                "the upstream Anthropic API did not answer in time".into(),
            )),
        })
    }

    /// A request to the upstream with its `Host`, at the origin-form URI of a client's path.
    /// Only a path is accepted (not `*` nor an absolute URI), so a request can never name
    /// another host.
    fn to_upstream(
        &self,
        method: Method,
        path_and_query: &str,
        body: ProxyBody,
    ) -> Option<Request<ProxyBody>> {
        if !path_and_query.starts_with('/') {
            return None;
        }
        let uri: Uri = if self.prefix.is_empty() {
            path_and_query.parse().ok()?
        } else {
            format!("{}{}", self.prefix, path_and_query).parse().ok()?
        };
        let mut request = Request::new(body);
        *request.method_mut() = method;
        *request.uri_mut() = uri;
        request
            .headers_mut()
            .insert(header::HOST, self.host.clone());
        Some(request)
    }

    /// A buffered body that can be sent twice (for the 401 retry).
    pub fn body(bytes: &Bytes) -> ProxyBody {
        full(bytes.clone())
    }
}

/// The `Host` header of an upstream URL, as a browser sends it: no user information, and the
/// port only when it is not the scheme's default.
fn host_header(scheme: &str, authority: &http::uri::Authority) -> Option<HeaderValue> {
    let default_port = if scheme == "https" { 443 } else { 80 };
    let host = match authority.port_u16() {
        Some(port) if port != default_port => format!("{}:{port}", authority.host()),
        _ => authority.host().to_string(),
    };
    HeaderValue::from_str(&host).ok()
}

fn is_dropped(name: &HeaderName) -> bool {
    let name = name.as_str();
    HOP_BY_HOP.contains(&name)
        || CREDENTIALS.contains(&name)
        || DROPPED.contains(&name)
        || name.starts_with("x-forwarded-")
}

/// The upstream's response headers a client is given: what describes this answer (its type,
/// encoding, length, file name), its request id, and what an SDK's retry reads. Default-deny,
/// like the routes: everything else the upstream says is about the upstream key and the
/// organization behind it, not the workload. Its `anthropic-ratelimit-*` headers count what
/// every team sharing that key used (a side channel on their traffic, and not this ClaudeKey's
/// limits, which the proxy enforces and reports itself), `anthropic-organization-id` names the
/// organization, and a CDN's `set-cookie`, `server` or `cf-ray` are the upstream's own.
fn passed_to_client(name: &HeaderName, body_changed: bool) -> bool {
    if name == header::CONTENT_LENGTH {
        return !body_changed;
    }
    name == header::CONTENT_TYPE
        || name == header::CONTENT_ENCODING
        || name == header::CONTENT_DISPOSITION
        || name == header::RETRY_AFTER
        || matches!(
            name.as_str(),
            "request-id" | "retry-after-ms" | "x-should-retry"
        )
}

/// The upstream's response headers made the client's ([`passed_to_client`]), in place: moved,
/// not copied (a copy cost an allocation per header), and put back into the same map, whose
/// memory is kept (a new map cost two allocations a request). Hop-by-hop headers are never
/// passed, and `content-length` only when the proxy did not change the body.
pub fn client_response_headers(mut headers: HeaderMap, body_changed: bool) -> HeaderMap {
    // `None` as a name is another value of the name before.
    let mut passed: SmallVec<[(Option<HeaderName>, HeaderValue); 8]> = SmallVec::new();
    let mut passing = false;
    for (name, value) in headers.drain() {
        if let Some(name) = &name {
            passing = passed_to_client(name, body_changed);
        }
        if passing {
            passed.push((name, value));
        }
    }
    let mut current = None;
    for (name, value) in passed {
        match name {
            Some(name) => {
                current = Some(match headers.entry(name) {
                    Entry::Vacant(entry) => entry.insert_entry(value),
                    Entry::Occupied(mut entry) => {
                        entry.append(value);
                        entry
                    }
                })
            }
            None => {
                if let Some(entry) = current.as_mut() {
                    entry.append(value);
                }
            }
        }
    }
    headers
}

/// Unlocks `Authorization: Bearer` on API calls.
pub const OAUTH_BETA: &str = "oauth-2025-04-20";

/// Adds the OAuth beta to the client's `anthropic-beta` values (one header, comma-joined).
pub fn with_oauth_beta(headers: &mut HeaderMap) {
    let mut values: Vec<String> = headers
        .get_all("anthropic-beta")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect();
    if !values.iter().any(|v| v == OAUTH_BETA) {
        values.push(OAUTH_BETA.to_string());
    }
    if let Ok(value) = HeaderValue::from_str(&values.join(",")) {
        headers.insert("anthropic-beta", value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oauth_beta_joins_the_clients_betas_once() {
        let mut headers = HeaderMap::new();
        with_oauth_beta(&mut headers);
        assert_eq!(headers["anthropic-beta"], OAUTH_BETA);
        let mut headers = HeaderMap::new();
        headers.append("anthropic-beta", HeaderValue::from_static("a-1, b-2"));
        headers.append("anthropic-beta", HeaderValue::from_static(OAUTH_BETA));
        with_oauth_beta(&mut headers);
        assert_eq!(headers.get_all("anthropic-beta").iter().count(), 1);
        assert_eq!(headers["anthropic-beta"], "a-1,b-2,oauth-2025-04-20");
    }

    #[test]
    fn swaps_credentials_and_keeps_api_headers() {
        let upstream = Upstream::new("http://127.0.0.1:9/", Duration::from_secs(1)).unwrap();
        let mut headers = HeaderMap::new();
        for (k, v) in [
            ("x-api-key", "ck_live_workload"),
            ("authorization", "Bearer ck_live_workload"),
            ("anthropic-version", "2023-06-01"),
            ("anthropic-beta", "prompt-caching-2024-07-31"),
            ("accept-encoding", "gzip"),
            ("connection", "keep-alive"),
            ("content-type", "application/json"),
            ("host", "localhost"),
            ("forwarded", "for=10.0.0.7"),
            ("x-forwarded-for", "10.0.0.7"),
            ("x-forwarded-host", "internal.example"),
            ("x-real-ip", "10.0.0.7"),
            ("cookie", "session=s3cr3t"),
        ] {
            headers.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        let key = Credential::ApiKey(HeaderValue::from_static("sk-ant-api03-upstream"));
        let req = upstream
            .request(
                &Method::POST,
                "/v1/messages?beta=true",
                &headers,
                &key,
                full(Bytes::new()),
            )
            .unwrap();
        assert_eq!(req.uri(), "/v1/messages?beta=true");
        let h = req.headers();
        assert_eq!(h["host"], "127.0.0.1:9", "the upstream's, not the client's");
        assert_eq!(h.get_all("host").iter().count(), 1);
        assert_eq!(h["x-api-key"], "sk-ant-api03-upstream");
        assert!(h.get("authorization").is_none());
        assert_eq!(h["anthropic-version"], "2023-06-01");
        assert_eq!(h["anthropic-beta"], "prompt-caching-2024-07-31");
        assert!(h.get("accept-encoding").is_none() && h.get("connection").is_none());
        assert_eq!(h.get_all("x-api-key").iter().count(), 1);
        for dropped in [
            "forwarded",
            "x-forwarded-for",
            "x-forwarded-host",
            "x-real-ip",
            "cookie",
        ] {
            assert!(h.get(dropped).is_none(), "{dropped}");
        }
    }

    #[test]
    fn a_bearer_replaces_every_client_credential_and_adds_the_oauth_beta() {
        let upstream = Upstream::new("http://127.0.0.1:9/", Duration::from_secs(1)).unwrap();
        let mut headers = HeaderMap::new();
        headers.insert("x-api-key", HeaderValue::from_static("placeholder"));
        headers.insert("authorization", HeaderValue::from_static("Bearer client"));
        headers.insert(
            "anthropic-beta",
            HeaderValue::from_static("prompt-caching-2024-07-31"),
        );
        let bearer = Credential::Bearer(HeaderValue::from_static("Bearer sk-ant-oat01-x"));
        let req = upstream
            .request(
                &Method::POST,
                "/v1/messages",
                &headers,
                &bearer,
                full(Bytes::new()),
            )
            .unwrap();
        let h = req.headers();
        assert!(h.get("x-api-key").is_none());
        assert_eq!(h["authorization"], "Bearer sk-ant-oat01-x");
        assert_eq!(h.get_all("authorization").iter().count(), 1);
        assert_eq!(
            h["anthropic-beta"],
            "prompt-caching-2024-07-31,oauth-2025-04-20"
        );
    }

    #[test]
    fn the_upstream_path_is_the_base_path_and_the_clients_and_never_another_host() {
        let request = |base: &str, path: &str| {
            let upstream = Upstream::new(base, Duration::from_secs(1)).unwrap();
            let credential = Credential::ApiKey(HeaderValue::from_static("k"));
            upstream
                .request(
                    &Method::GET,
                    path,
                    &HeaderMap::new(),
                    &credential,
                    full(Bytes::new()),
                )
                .map(|r| (r.uri().to_string(), r.headers()["host"].clone()))
        };
        let (uri, host) = request("https://api.anthropic.com", "/v1/models").unwrap();
        assert_eq!(
            (uri.as_str(), host.to_str().unwrap()),
            ("/v1/models", "api.anthropic.com")
        );
        let (uri, host) =
            request("https://u:p@gw.example:443/anthropic/", "/v1/models?x=1").unwrap();
        assert_eq!(uri, "/anthropic/v1/models?x=1");
        assert_eq!(host, "gw.example", "no user information, no default port");
        let (_, host) = request("http://[::1]:8080", "/v1/models").unwrap();
        assert_eq!(host, "[::1]:8080");
        let (uri, host) = request("http://127.0.0.1:9", "//evil.example/v1/models").unwrap();
        assert_eq!(
            (uri.as_str(), host.to_str().unwrap()),
            ("//evil.example/v1/models", "127.0.0.1:9")
        );
        for path in ["*", "http://evil.example/v1/models", "evil.example", ""] {
            assert!(request("http://127.0.0.1:9", path).is_err(), "{path:?}");
        }
    }

    #[test]
    fn rejects_bad_upstream_urls() {
        for url in ["api.anthropic.com", "ftp://x", "http://"] {
            assert!(Upstream::new(url, Duration::from_secs(1)).is_err(), "{url}");
        }
        assert!(Upstream::new("https://api.anthropic.com", Duration::from_secs(1)).is_ok());
    }

    #[test]
    fn a_client_is_given_only_its_answers_own_headers() {
        let mut from = HeaderMap::new();
        for (name, value) in [
            ("content-type", "application/json"),
            ("content-length", "10"),
            ("request-id", "req_1"),
            ("retry-after", "3"),
            ("retry-after-ms", "2500"),
            ("x-should-retry", "true"),
            ("transfer-encoding", "chunked"),
            ("connection", "keep-alive"),
            ("anthropic-organization-id", "org-1"),
            ("anthropic-ratelimit-tokens-remaining", "399000"),
            ("anthropic-ratelimit-requests-reset", "2026-01-01T00:01:00Z"),
            ("set-cookie", "__cf_bm=1"),
            ("server", "cloudflare"),
            ("cf-ray", "1-LHR"),
        ] {
            from.append(name, HeaderValue::from_static(value));
        }
        // A passed name keeps all its values; a withheld one loses all of its.
        from.append("x-should-retry", HeaderValue::from_static("false"));
        from.append("set-cookie", HeaderValue::from_static("b=2"));
        let names = |map: &HeaderMap| map.keys().map(|k| k.to_string()).collect::<Vec<_>>();

        let kept = client_response_headers(from.clone(), false);
        assert_eq!(
            names(&kept),
            [
                "content-type",
                "content-length",
                "request-id",
                "retry-after",
                "retry-after-ms",
                "x-should-retry"
            ]
        );
        assert_eq!(kept["request-id"], "req_1");
        assert_eq!(kept.get_all("x-should-retry").iter().count(), 2);
        assert!(kept.get("set-cookie").is_none());
        assert_eq!(kept.len(), 7);

        let changed = client_response_headers(from, true);
        assert!(changed.get("content-length").is_none());
        assert_eq!(changed.len(), 6);

        let mut every = HeaderMap::new();
        for name in HOP_BY_HOP {
            every.append(*name, HeaderValue::from_static("x"));
        }
        assert!(client_response_headers(every, false).is_empty());
    }
}
