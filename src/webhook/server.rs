//! HTTPS front of the webhook: axum routes over tokio-rustls, and its Prometheus metrics
//! (reviews by operation and result, handler time by operation; labels are bounded enums).

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use super::limits;
use super::validate::{Admission, Outcome};
use crate::body_budget::BodyBudget;
use crate::per_client::PerClient;
use crate::shutdown::drain::Drain;

/// A client that has not finished its handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Reviews still open this long after the listener closed are cut (the apiserver gives up on
/// a review after the webhook's timeoutSeconds, at most 30 s, 10 s in the chart).
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReviewLabels {
    operation: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabel {
    operation: &'static str,
}

/// The webhook's metrics, prefixed `claudekey_webhook_`.
pub struct Metrics {
    registry: Mutex<Registry>,
    reviews: Family<ReviewLabels, Counter>,
    duration: Family<OperationLabel, Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("claudekey_webhook");
        let reviews = Family::<ReviewLabels, Counter>::default();
        let duration = Family::<OperationLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0001, 2.0, 14))
        });
        registry.register(
            "admission_reviews",
            "AdmissionReviews answered, by operation and result",
            reviews.clone(),
        );
        registry.register(
            "admission_duration_seconds",
            "Time to answer one AdmissionReview",
            duration.clone(),
        );
        Self {
            registry: Mutex::new(registry),
            reviews,
            duration,
        }
    }
}

impl Metrics {
    fn record(&self, operation: &'static str, outcome: Outcome, elapsed: Duration) {
        self.reviews
            .get_or_create(&ReviewLabels {
                operation,
                result: outcome.as_str(),
            })
            .inc();
        self.duration
            .get_or_create(&OperationLabel { operation })
            .observe(elapsed.as_secs_f64());
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let registry = self
            .registry
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if prometheus_client::encoding::text::encode(&mut out, &registry).is_err() {
            out.clear();
        }
        out
    }
}

#[derive(Clone)]
struct AppState {
    admission: Arc<Admission>,
    metrics: Arc<Metrics>,
    budget: BodyBudget,
}

/// The routes: `/validate`, `/mutate`, `/healthz`, `/readyz`, `/metrics`. Readiness is asked
/// over HTTPS: a pod that answers there has its certificate loaded and can take reviews.
pub fn router(admission: Arc<Admission>, metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/validate", post(validate))
        .route("/mutate", post(mutate))
        .route("/healthz", get(ok))
        .route("/readyz", get(ok))
        .route("/metrics", get(metrics_handler))
        .with_state(AppState {
            admission,
            metrics,
            budget: limits::body_budget(),
        })
}

/// Liveness and readiness: answering at all is the signal.
async fn ok() -> &'static str {
    "ok"
}

/// The plain-HTTP admin port: `/metrics`, and `/healthz` for a liveness probe that does not
/// depend on the certificate.
pub fn metrics_router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                async move { metrics_response(&metrics) }
            }),
        )
        .route("/healthz", get(ok))
}

fn metrics_response(metrics: &Metrics) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        metrics.encode(),
    )
        .into_response()
}

async fn metrics_handler(State(state): State<AppState>) -> Response {
    metrics_response(&state.metrics)
}

fn respond(state: &AppState, operation: &'static str, body: &[u8]) -> Response {
    let started = Instant::now();
    let (review, outcome) = match operation {
        "mutate" => state.admission.mutate(body),
        _ => state.admission.validate(body),
    };
    state.metrics.record(operation, outcome, started.elapsed());
    match serde_json::to_vec(&review) {
        Ok(json) => ([(header::CONTENT_TYPE, "application/json")], json).into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// Reads the body within the limits, then answers; its bytes stay counted until the answer is
/// built.
async fn review(state: AppState, operation: &'static str, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    match state.budget.read(&parts.headers, body).await {
        Ok((bytes, _held)) => respond(&state, operation, &bytes),
        Err(error) => {
            state
                .metrics
                .record(operation, Outcome::Invalid, Duration::ZERO);
            (error.status(), error.to_string()).into_response()
        }
    }
}

async fn validate(State(state): State<AppState>, request: Request<Body>) -> Response {
    review(state, "validate", request).await
}

async fn mutate(State(state): State<AppState>, request: Request<Body>) -> Response {
    review(state, "mutate", request).await
}

/// Serves `router` over TLS on `listener` until `shutdown` resolves, then drains for `delay`
/// (`crate::shutdown::drain`: still accepting, every connection closed cleanly after its next
/// request) and stops, waiting at most [`DRAIN_TIMEOUT`] for reviews in flight. Connections are
/// handled on their own tasks; a failed handshake only ends that connection. At most
/// [`limits::MAX_CONNECTIONS`] are open at once, at most
/// [`limits::MAX_CONNECTIONS_PER_CLIENT`] from one address, and a request head must arrive
/// within [`limits::HEADER_READ_TIMEOUT`], so idle or slow clients cannot exhaust the server.
pub async fn serve_tls(
    router: Router,
    tls: Arc<ServerConfig>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
    delay: Duration,
) {
    let acceptor = TlsAcceptor::from(tls);
    let connections = Arc::new(tokio::sync::Semaphore::new(limits::MAX_CONNECTIONS));
    let per_client = PerClient::new(limits::MAX_CONNECTIONS_PER_CLIENT);
    let drain = Drain::new();
    let stop = drain.after(shutdown, delay);
    let mut stop = std::pin::pin!(stop);
    let mut open = JoinSet::new();
    loop {
        while open.try_join_next().is_some() {}
        let permit = tokio::select! {
            () = &mut stop => break,
            permit = connections.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            () = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    tracing::warn!(%error, "failed to accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Some(client_slot) = per_client.admit(peer.ip()) else {
            tracing::debug!(%peer, "closed a connection over the per-client cap");
            continue;
        };
        let acceptor = acceptor.clone();
        let connection = drain.connection();
        let service = connection.service(TowerToHyperService::new(router.clone()));
        open.spawn(async move {
            let _permit = (permit, client_slot);
            let stream =
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(error)) => return tracing::debug!(%peer, %error, "TLS handshake failed"),
                    Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
                };
            let builder = connection_builder();
            let served = connection
                .serve(
                    builder
                        .serve_connection(TokioIo::new(stream), service)
                        .into_owned(),
                )
                .await;
            if let Err(error) = served {
                tracing::debug!(%peer, %error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    let finished = async { while open.join_next().await.is_some() {} };
    if tokio::time::timeout(DRAIN_TIMEOUT, finished).await.is_err() {
        tracing::warn!(timeout = ?DRAIN_TIMEOUT, "reviews still open at shutdown; cutting them");
    }
}

/// HTTP/1 and HTTP/2 with the webhook's limits.
fn connection_builder() -> hyper_util::server::conn::auto::Builder<TokioExecutor> {
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits::HEADER_READ_TIMEOUT);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits::MAX_STREAMS)
        .max_header_list_size(limits::MAX_HEADERS)
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(10));
    builder
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::webhook::mutate::SidecarConfig;
    use crate::webhook::validate::Mode;
    use axum::body::Body;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    fn app() -> (Router, Arc<Metrics>) {
        let admission = Admission {
            mode: Mode::Enforce,
            sidecar: SidecarConfig::default(),
            claudekeys: Arc::new(Vec::<(String, String)>::new()),
        };
        let metrics = Arc::new(Metrics::default());
        (router(Arc::new(admission), metrics.clone()), metrics)
    }

    async fn call(
        router: &Router,
        method: &str,
        path: &str,
        body: Vec<u8>,
    ) -> (StatusCode, String) {
        let request = axum::http::Request::builder()
            .method(method)
            .uri(path)
            .body(Body::from(body))
            .unwrap();
        let response = router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&bytes).into_owned())
    }

    #[tokio::test]
    async fn routes_answer_and_metrics_count_by_operation_and_result() {
        let (router, _) = app();
        assert_eq!(
            call(&router, "GET", "/healthz", vec![]).await,
            (StatusCode::OK, "ok".to_string())
        );
        let (status, body) = call(&router, "POST", "/validate", b"garbage".to_vec()).await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains("\"allowed\":false"), "{body}");
        let (_, body) = call(&router, "POST", "/mutate", b"{}".to_vec()).await;
        assert!(body.contains("AdmissionReview"), "{body}");
        let (status, metrics) = call(&router, "GET", "/metrics", vec![]).await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            metrics.contains("claudekey_webhook_admission_reviews_total{operation=\"validate\",result=\"invalid\"} 1"),
            "{metrics}"
        );
        assert!(
            metrics.contains("operation=\"mutate\",result=\"invalid\"} 1"),
            "{metrics}"
        );
        assert!(metrics.contains(
            "claudekey_webhook_admission_duration_seconds_count{operation=\"validate\"} 1"
        ));
    }

    /// An HTTP/2 connection over TLS (ALPN h2, as the apiserver's Go client negotiates it).
    async fn h2_over_tls(
        addr: std::net::SocketAddr,
        ca_pem: &str,
    ) -> (
        hyper::client::conn::http2::SendRequest<Body>,
        tokio::task::JoinHandle<()>,
    ) {
        let mut config = crate::tls::client_config_trusting(ca_pem.as_bytes()).unwrap();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let tls = connector.connect(name, tcp).await.unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .unwrap();
        let closed = tokio::spawn(async move { conn.await.expect("closed cleanly") });
        (sender, closed)
    }

    async fn healthz(sender: &mut hyper::client::conn::http2::SendRequest<Body>) -> StatusCode {
        let request = axum::http::Request::get("https://127.0.0.1/healthz")
            .body(Body::empty())
            .unwrap();
        sender
            .send_request(request)
            .await
            .expect("answered")
            .status()
    }

    /// The webhook's TLS server on a loopback port with a fresh self-signed certificate: its
    /// address, the certificate (PEM, to trust), the SIGTERM stand-in and the server's task.
    async fn tls_server(
        delay: Duration,
    ) -> (
        std::net::SocketAddr,
        String,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let (cert_path, key_path) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        let tls = crate::tls::server_config(
            crate::tls::ReloadingResolver::new(&cert_path, &key_path).unwrap(),
        )
        .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (sigterm, signalled) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_tls(
            app().0,
            tls,
            listener,
            async {
                let _ = signalled.await;
            },
            delay,
        ));
        (addr, cert.pem(), sigterm, server)
    }

    #[tokio::test]
    async fn at_sigterm_pooled_connections_get_goaway_and_new_ones_are_served_until_the_delay_ends()
    {
        let delay = Duration::from_millis(1500);
        let (addr, ca, sigterm, server) = tls_server(delay).await;
        let (mut pooled, pooled_closed) = h2_over_tls(addr, &ca).await;
        assert_eq!(healthz(&mut pooled).await, StatusCode::OK);
        let signalled_at = Instant::now();
        sigterm.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(1), pooled_closed)
            .await
            .expect("GOAWAY closes the pooled connection at once")
            .unwrap();
        // During the delay a client that still picks this pod gets answers.
        let (mut fresh, _) = h2_over_tls(addr, &ca).await;
        assert_eq!(healthz(&mut fresh).await, StatusCode::OK);
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("stopped after the delay")
            .unwrap();
        assert!(signalled_at.elapsed() >= delay, "stopped before the delay");
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    }

    /// One address holding its share of connections (here without even a TLS handshake) gets
    /// no more; the apiserver, from another address, is still served.
    #[tokio::test]
    async fn one_address_cannot_hold_every_connection() {
        let (addr, ca, _sigterm, _server) = tls_server(Duration::ZERO).await;
        let from = |ip: [u8; 4]| async move {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind(std::net::SocketAddr::from((ip, 0))).unwrap();
            socket.connect(addr).await.unwrap()
        };
        let mut held = Vec::new();
        for _ in 0..limits::MAX_CONNECTIONS_PER_CLIENT {
            held.push(from([127, 0, 0, 2]).await);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let over = from([127, 0, 0, 2]).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut buf = [0u8; 1];
        let read = over.try_read(&mut buf);
        let closed = match &read {
            Ok(n) => *n == 0,
            Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
        };
        assert!(closed, "a connection over the cap was kept: {read:?}");
        let waiting = held
            .iter()
            .filter(|c| matches!(c.try_read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock))
            .count();
        assert_eq!(
            waiting,
            limits::MAX_CONNECTIONS_PER_CLIENT,
            "those within the cap wait for their handshake"
        );
        let (mut apiserver, _) = h2_over_tls(addr, &ca).await;
        assert_eq!(healthz(&mut apiserver).await, StatusCode::OK);
    }
}
