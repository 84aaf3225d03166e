//! `claudekey proxy --mode forward`: the thin sidecar of gateway placement (DESIGN.md §10). The
//! app talks to it on loopback with a placeholder key; it swaps in the workload key from the
//! mounted `<name>-client` Secret and streams the request, unbuffered both ways (SSE), to the
//! gateway over TLS that trusts only the Secret's `ca.crt`. It holds no upstream key and
//! enforces nothing (the gateway does), so the only thing it must get right is where the
//! request goes: always ANTHROPIC_BASE_URL's host, whatever the app sends.

use std::{
    convert::Infallible,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt as _, Full, combinators::UnsyncBoxBody};
use hyper::{body::Incoming, service::service_fn};
use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo},
    server::{conn::auto, graceful::GracefulShutdown},
};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;

use super::{
    config::{ConfigSet, Store},
    dir_watch::DirWatch,
};
use crate::tls::{TrustError, client_config_trusting};

/// Files of the mounted `<name>-client` Secret (CONTRACT.md).
pub const API_KEY_FILE: &str = "ANTHROPIC_API_KEY";
pub const BASE_URL_FILE: &str = "ANTHROPIC_BASE_URL";
pub const CA_FILE: &str = "ca.crt";
/// Re-read the directory this often even without a file event.
const POLL: Duration = Duration::from_secs(10);

type Body = UnsyncBoxBody<Bytes, hyper::Error>;

/// Hop-by-hop headers, and the credentials the app sent (replaced by the workload key).
fn is_dropped(name: &str) -> bool {
    super::forward::HOP_BY_HOP.contains(&name) || super::forward::CREDENTIALS.contains(&name)
}

/// Why the `<name>-client` directory cannot be used (the last good one keeps serving).
/// Never holds a file's content.
#[derive(Debug, thiserror::Error)]
pub enum ForwardConfigError {
    #[error("failed to read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("failed to use {API_KEY_FILE}: empty or not a valid header value")]
    Key,
    #[error("failed to use {BASE_URL_FILE}: it must be an https:// URL with a host")]
    BaseUrl,
    #[error("failed to use {CA_FILE}: {0}")]
    Trust(#[from] TrustError),
}

/// Where requests go and with which key; rebuilt only when a file changed.
struct Target {
    /// `https://authority[/prefix]`, without a trailing slash.
    base: String,
    authority: http::uri::Authority,
    key: HeaderValue,
    client: Client<HttpsConnector<HttpConnector>, Body>,
    digest: [u8; 32],
}

/// The forwarder: its directory, the target loaded from it, and a readiness flag in the
/// shape the admin listener reads (`Some` once a target is loaded).
pub struct Forwarder {
    dir: PathBuf,
    target: ArcSwapOption<Target>,
    pub ready: Arc<Store>,
}

fn read(dir: &Path, file: &str) -> Result<Vec<u8>, ForwardConfigError> {
    let path = dir.join(file);
    std::fs::read(&path).map_err(|source| ForwardConfigError::Read { path, source })
}

/// The base URL: https only, a host, no query; the path (if any) is a prefix.
fn parse_base(text: &str) -> Result<(String, http::uri::Authority), ForwardConfigError> {
    let base = text.trim().trim_end_matches('/');
    let uri: Uri = base.parse().map_err(|_| ForwardConfigError::BaseUrl)?;
    let authority = uri
        .authority()
        .filter(|a| !a.host().is_empty() && !a.as_str().contains('@'))
        .cloned()
        .ok_or(ForwardConfigError::BaseUrl)?;
    if uri.scheme_str() != Some("https") || uri.query().is_some() {
        return Err(ForwardConfigError::BaseUrl);
    }
    Ok((base.to_string(), authority))
}

fn build(
    key: &[u8],
    base: &[u8],
    ca: &[u8],
    digest: [u8; 32],
) -> Result<Target, ForwardConfigError> {
    let key = std::str::from_utf8(key)
        .ok()
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .and_then(|k| HeaderValue::from_str(k).ok())
        .ok_or(ForwardConfigError::Key)?;
    let mut key = key;
    key.set_sensitive(true);
    let base = std::str::from_utf8(base).map_err(|_| ForwardConfigError::BaseUrl)?;
    let (base, authority) = parse_base(base)?;
    let tls = client_config_trusting(ca)?;
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.enforce_http(false);
    http.set_connect_timeout(Some(Duration::from_secs(10)));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .wrap_connector(http);
    let client = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .build(https);
    Ok(Target {
        base,
        authority,
        key,
        client,
        digest,
    })
}

impl Forwarder {
    /// A forwarder for the mounted `<name>-client` directory; loads it once (a failure is
    /// logged and retried by the watcher: the pod may start before the controller filled it).
    pub fn new(dir: impl Into<PathBuf>) -> Arc<Self> {
        let forwarder = Arc::new(Self {
            dir: dir.into(),
            target: ArcSwapOption::empty(),
            ready: Arc::new(Store::empty()),
        });
        forwarder.reload_logged();
        forwarder
    }

    /// Re-reads the three files; rebuilds the target (client and TLS trust included) only when
    /// their content changed. Returns whether it did.
    pub fn reload(&self) -> Result<bool, ForwardConfigError> {
        let key = read(&self.dir, API_KEY_FILE)?;
        let base = read(&self.dir, BASE_URL_FILE)?;
        let ca = read(&self.dir, CA_FILE)?;
        let mut hasher = Sha256::new();
        for part in [&key, &base, &ca] {
            hasher.update((part.len() as u64).to_le_bytes());
            hasher.update(part);
        }
        let digest: [u8; 32] = hasher.finalize().into();
        if self
            .target
            .load()
            .as_ref()
            .is_some_and(|t| t.digest == digest)
        {
            return Ok(false);
        }
        let target = build(&key, &base, &ca, digest)?;
        tracing::info!(gateway = %target.base, "forwarding to the gateway");
        self.target.store(Some(Arc::new(target)));
        self.ready.store(Some(Arc::new(ConfigSet::default())));
        Ok(true)
    }

    fn reload_logged(&self) {
        if let Err(error) = self.reload() {
            tracing::warn!(%error, dir = %self.dir.display(), "keeping the last good client config");
        }
    }

    /// Watches the directory (the kubelet swaps its `..data` symlink) and reloads on any
    /// change, plus every 10 s in case an event was missed. Runs until the task is aborted.
    pub fn spawn_watcher(self: &Arc<Self>) -> notify::Result<tokio::task::JoinHandle<()>> {
        let mut watch = DirWatch::start(&self.dir, notify::RecursiveMode::NonRecursive)?;
        let this = self.clone();
        Ok(tokio::spawn(async move {
            let mut ticker = tokio::time::interval(POLL);
            ticker.tick().await;
            loop {
                tokio::select! {
                    _ = ticker.tick() => {}
                    Some(()) = watch.changed() => {}
                }
                this.reload_logged();
            }
        }))
    }

    /// Forwards one request; answers itself only when it cannot (503, 400, 405, 502).
    pub async fn handle(&self, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
        let Some(target) = self.target.load_full() else {
            return Ok(error(
                StatusCode::SERVICE_UNAVAILABLE,
                "api_error",
                "the claudekey forwarder has no client config loaded yet",
            ));
        };
        let (parts, body) = req.into_parts();
        let request = match outbound(&target, &parts.method, &parts.uri, &parts.headers) {
            Ok(builder) => builder,
            Err(response) => return Ok(*response),
        };
        let mut request = request;
        *request.body_mut() = body.boxed_unsync();
        match target.client.request(request).await {
            Ok(response) => {
                let (parts, body) = response.into_parts();
                let mut out = Response::new(body.boxed_unsync());
                *out.status_mut() = parts.status;
                *out.headers_mut() = super::forward::client_response_headers(parts.headers, false);
                Ok(out)
            }
            Err(e) => {
                tracing::warn!(error = %e, gateway = %target.base, "gateway request failed");
                Ok(error(
                    StatusCode::BAD_GATEWAY,
                    "api_error",
                    "the claudekey gateway could not be reached",
                ))
            }
        }
    }

    /// Serves the loopback listener until `shutdown` resolves, then lets open requests finish
    /// (streams included) for up to 30 s.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()> {
        let graceful = GracefulShutdown::new();
        let builder = auto::Builder::new(TokioExecutor::new());
        tokio::pin!(shutdown);
        loop {
            let stream = tokio::select! {
                () = &mut shutdown => break,
                accepted = super::server_limits::accept(&listener) => match accepted {
                    Some(stream) => stream,
                    None => continue,
                },
            };
            let this = self.clone();
            let service = service_fn(move |req| {
                let this = this.clone();
                async move { this.handle(req).await }
            });
            let connection = builder
                .serve_connection(TokioIo::new(stream), service)
                .into_owned();
            let connection = graceful.watch(connection);
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
            });
        }
        if tokio::time::timeout(Duration::from_secs(30), graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("connections still open after 30 s; closing them");
        }
        Ok(())
    }
}

/// The request to the gateway: the app's method, path and query on the gateway's base URL,
/// its headers minus hop-by-hop ones and its credential, plus the workload key. Refuses what
/// could point anywhere else (CONNECT, a URI that does not land on the gateway's authority).
fn outbound(
    target: &Target,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<Request<Body>, Box<Response<Body>>> {
    if method == Method::CONNECT {
        return Err(Box::new(error(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            "CONNECT is not forwarded",
        )));
    }
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let bad_path = || {
        Box::new(error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "request path is not a valid URI path",
        ))
    };
    if !path.starts_with('/') {
        return Err(bad_path());
    }
    let outbound: Uri = format!("{}{}", target.base, path)
        .parse()
        .map_err(|_| bad_path())?;
    if outbound.authority() != Some(&target.authority) || outbound.scheme_str() != Some("https") {
        return Err(bad_path());
    }
    let mut request = Request::new(
        Full::new(Bytes::new())
            .map_err(|n| match n {})
            .boxed_unsync(),
    );
    *request.method_mut() = method.clone();
    *request.uri_mut() = outbound;
    let out = request.headers_mut();
    for (name, value) in headers {
        if !is_dropped(name.as_str()) {
            out.append(name.clone(), value.clone());
        }
    }
    out.insert(HeaderName::from_static("x-api-key"), target.key.clone());
    Ok(request)
}

/// An error in the Anthropic API's shape, so SDKs raise their usual exception types.
fn error(status: StatusCode, kind: &str, message: &str) -> Response<Body> {
    let body = serde_json::json!({
        "type": "error",
        "error": { "type": kind, "message": message },
    });
    let mut response = Response::new(
        Full::new(Bytes::from(body.to_string()))
            .map_err(|n| match n {})
            .boxed_unsync(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// The forwarder listens on loopback only: it attaches a real key to anything that reaches it.
pub fn check_listen(listen: SocketAddr) -> anyhow::Result<()> {
    if !listen.ip().is_loopback() {
        anyhow::bail!(
            "forward mode attaches the workload key to every request it receives, so it listens only on a loopback address, not {listen}"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca() -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["gw.example".to_string()]).unwrap();
        params.self_signed(&key).unwrap().pem()
    }

    fn target(base: &str) -> Target {
        build(
            b"ck_live_workload\n",
            base.as_bytes(),
            ca().as_bytes(),
            [0; 32],
        )
        .unwrap()
    }

    #[test]
    fn base_url_must_be_https_with_a_host() {
        for bad in [
            "http://gw:8443",
            "gw:8443",
            "https://",
            "https://user:pw@gw:8443",
            "https://gw/?x=1",
            "",
        ] {
            assert!(parse_base(bad).is_err(), "{bad}");
        }
        let (base, authority) = parse_base("https://gw.example:8443/\n").unwrap();
        assert_eq!(base, "https://gw.example:8443");
        assert_eq!(authority, "gw.example:8443");
    }

    #[test]
    fn empty_key_or_ca_is_refused() {
        let ca = ca();
        assert!(matches!(
            build(b"  \n", b"https://gw", ca.as_bytes(), [0; 32]),
            Err(ForwardConfigError::Key)
        ));
        assert!(matches!(
            build(b"k", b"https://gw", b"", [0; 32]),
            Err(ForwardConfigError::Trust(_))
        ));
    }

    #[test]
    fn swaps_the_credential_and_keeps_api_headers() {
        let t = target("https://gw.example:8443");
        let mut headers = HeaderMap::new();
        for (k, v) in [
            ("x-api-key", "claudekey-sidecar"),
            ("authorization", "Bearer claudekey-sidecar"),
            ("anthropic-version", "2023-06-01"),
            ("content-type", "application/json"),
            ("content-length", "12"),
            ("host", "127.0.0.1:8484"),
            ("connection", "keep-alive"),
        ] {
            headers.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        let uri: Uri = "/v1/messages?beta=true".parse().unwrap();
        let req = outbound(&t, &Method::POST, &uri, &headers).unwrap();
        assert_eq!(req.uri(), "https://gw.example:8443/v1/messages?beta=true");
        let h = req.headers();
        assert_eq!(h["x-api-key"], "ck_live_workload");
        assert_eq!(h.get_all("x-api-key").iter().count(), 1);
        assert!(h["x-api-key"].is_sensitive());
        assert!(h.get("authorization").is_none() && h.get("host").is_none());
        assert!(h.get("connection").is_none());
        assert_eq!(h["anthropic-version"], "2023-06-01");
        assert_eq!(h["content-length"], "12");
    }

    #[test]
    fn never_goes_anywhere_but_the_gateway() {
        let t = target("https://gw.example:8443");
        let headers = HeaderMap::new();
        // Absolute-form targets: only the path is used, the host is always the gateway's.
        for uri in [
            "http://evil.example/v1/messages",
            "https://evil.example:443/v1/models?x=1",
            "//evil.example/v1",
        ] {
            let Ok(uri) = uri.parse::<Uri>() else {
                continue;
            };
            match outbound(&t, &Method::GET, &uri, &headers) {
                Ok(req) => assert_eq!(
                    req.uri().authority().unwrap().as_str(),
                    "gw.example:8443",
                    "{uri}"
                ),
                Err(response) => assert_eq!(response.status(), 400, "{uri}"),
            }
        }
        // A path that would re-parse as userinfo/authority is refused or stays on the gateway.
        let uri: Uri = "/@evil.example/v1".parse().unwrap();
        let req = outbound(&t, &Method::GET, &uri, &headers).unwrap();
        assert_eq!(req.uri().authority().unwrap().as_str(), "gw.example:8443");
        let uri: Uri = "evil.example:443".parse().unwrap();
        let refused = outbound(&t, &Method::CONNECT, &uri, &headers).unwrap_err();
        assert_eq!(refused.status(), 405);
    }

    #[test]
    fn loopback_only() {
        assert!(check_listen("0.0.0.0:8484".parse().unwrap()).is_err());
        assert!(check_listen("10.0.0.1:8484".parse().unwrap()).is_err());
        assert!(check_listen("127.0.0.1:8484".parse().unwrap()).is_ok());
        assert!(check_listen("[::1]:8484".parse().unwrap()).is_ok());
    }

    #[test]
    fn reload_rebuilds_only_on_change_and_keeps_the_last_good() {
        let dir = tempfile::tempdir().unwrap();
        let write = |k: &str, b: &str, c: &str| {
            std::fs::write(dir.path().join(API_KEY_FILE), k).unwrap();
            std::fs::write(dir.path().join(BASE_URL_FILE), b).unwrap();
            std::fs::write(dir.path().join(CA_FILE), c).unwrap();
        };
        let ca = ca();
        let f = Forwarder::new(dir.path());
        assert!(f.ready.load().is_none() && f.target.load().is_none());
        write("ck_live_one", "https://gw.example", &ca);
        assert!(f.reload().unwrap());
        assert!(f.ready.load().is_some());
        assert!(!f.reload().unwrap());
        write("ck_live_one", "http://elsewhere.example", &ca);
        let error = f.reload().unwrap_err().to_string();
        assert!(!error.contains("ck_live_one"), "{error}");
        assert_eq!(f.target.load().as_ref().unwrap().base, "https://gw.example");
        write("ck_live_two", "https://gw.example", &ca);
        assert!(f.reload().unwrap());
        assert_eq!(f.target.load().as_ref().unwrap().key, "ck_live_two");
    }
}
