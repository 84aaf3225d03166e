//! The upstream's HTTP/1 connections: one origin, so the pool is a stack of idle senders.
//!
//! Why not hyper_util's legacy client, which the proxy used before: it is built for any
//! number of origins. Per request it hashed its (scheme, authority) key byte by byte with
//! SipHash on checkout and again on return, formatted the `Host` header, rewrote the URI to
//! origin form, and spawned a task to wait for the connection to become idle again: about 9k
//! instructions, 6% of the proxy's whole request (`hack/hotpath.sh`). With one origin and
//! HTTP/1 only, none of that is needed: a connection goes back on the stack when its
//! response body has ended ([`UpstreamBody`]), and the next request takes the newest one that
//! is ready.
//!
//! What it keeps from the legacy client: a request that a pooled connection could not even
//! start (the upstream had closed it while it sat idle) is sent again on a new connection,
//! once; idle connections expire after [`IDLE_TIMEOUT`], and at most [`MAX_IDLE`] are kept.
//! A request that was written is never sent twice: the upstream may have acted on it.

use std::{
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::{
    body::Incoming,
    client::conn::{
        TrySendError,
        http1::{self, SendRequest},
    },
};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use tower::ServiceExt;

use super::body::{BoxError, ProxyBody};

/// How long an idle connection may be taken again (the legacy client's default).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Idle upstream connections kept: above a gateway's steady concurrency, or the pool drops
/// connections it needs again a moment later. At 32 (the legacy client's setting here), a
/// gateway at c=64 opened a new upstream connection for about one request in ten: a TLS
/// handshake each against the real API, and enough TIME_WAIT sockets on loopback to run out
/// of ephemeral ports in a benchmark. Busy connections are never capped; the cap and
/// [`IDLE_TIMEOUT`] decide how much of a burst's pool (each connection holds its TLS state and
/// buffers) outlives the burst.
pub const MAX_IDLE: usize = 256;

pub type Connector = HttpsConnector<HttpConnector>;

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("failed to connect to the upstream: {0}")]
    Connect(BoxError),
    #[error("the upstream's HTTP/1 handshake failed: {0}")]
    Handshake(hyper::Error),
    #[error("the upstream request failed: {0}")]
    Request(hyper::Error),
}

/// Connections to one origin. Cheap to share: the state is behind one `Arc`.
pub struct Pool {
    shared: Arc<Shared>,
}

struct Shared {
    connector: Connector,
    /// `scheme://authority`: what the connector dials.
    origin: Uri,
    /// Newest last.
    idle: Mutex<Vec<Idle>>,
}

struct Idle {
    sender: SendRequest<ProxyBody>,
    since: Instant,
}

impl Pool {
    pub fn new(connector: Connector, origin: Uri) -> Self {
        Self {
            shared: Arc::new(Shared {
                connector,
                origin,
                idle: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Sends `request` (origin-form URI, `Host` set) on an idle connection or a new one. The
    /// response's body hands the connection back when it ends.
    ///
    /// Every request's future holds this one, and futures are moved whole, so the rare paths
    /// are boxed: a connect (the TCP connect and hyper's handshake, about 2.4 KB) and a resend
    /// (the failed request, its error and the second send: with them inline this future was
    /// 1.3 KB, without them 0.8 KB), and it is an `async` block, which keeps the request once
    /// (an `async fn` keeps its arguments twice).
    #[expect(
        clippy::manual_async_fn,
        reason = "an async fn keeps its arguments twice"
    )]
    pub fn send(
        &self,
        request: Request<ProxyBody>,
    ) -> impl Future<Output = Result<Response<UpstreamBody>, SendError>> + Send + '_ {
        async move {
            let (mut sender, reused) = match self.shared.checkout(Instant::now()) {
                Some(sender) => (sender, true),
                None => (Box::pin(self.connect()).await?, false),
            };
            let response = match sender.try_send_request(request).await {
                Ok(response) => response,
                Err(failed) => {
                    let (resent_on, response) = Box::pin(self.resend(failed, reused)).await?;
                    sender = resent_on;
                    response
                }
            };
            let home = Some((sender, self.shared.clone()));
            Ok(response.map(|inner| UpstreamBody { inner, home }))
        }
    }

    /// A request hyper handed back unwritten on a pooled connection (the upstream had closed
    /// it while it sat idle) goes again on a new connection, once. Any other failure, and any
    /// request that was written, is the caller's error: the upstream may have acted on it.
    async fn resend(
        &self,
        mut failed: TrySendError<Request<ProxyBody>>,
        reused: bool,
    ) -> Result<(SendRequest<ProxyBody>, Response<Incoming>), SendError> {
        let Some(request) = failed.take_message().filter(|_| reused) else {
            return Err(SendError::Request(failed.into_error()));
        };
        let mut sender = self.connect().await?;
        let response = sender
            .send_request(request)
            .await
            .map_err(SendError::Request)?;
        Ok((sender, response))
    }

    async fn connect(&self) -> Result<SendRequest<ProxyBody>, SendError> {
        let io = self
            .shared
            .connector
            .clone()
            .oneshot(self.shared.origin.clone())
            .await
            .map_err(SendError::Connect)?;
        let (sender, connection) = http1::handshake(io).await.map_err(SendError::Handshake)?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }

    #[cfg(test)]
    fn idle(&self) -> usize {
        self.shared.lock().len()
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Idle>> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The newest idle connection that is ready; closed and expired ones are dropped on the
    /// way. One that is not ready yet (its connection task has not seen the end of the last
    /// response) stays for the next request.
    fn checkout(&self, now: Instant) -> Option<SendRequest<ProxyBody>> {
        let mut idle = self.lock();
        let mut i = idle.len();
        while i > 0 {
            i -= 1;
            let entry = &idle[i];
            if entry.sender.is_closed() || now.duration_since(entry.since) >= IDLE_TIMEOUT {
                idle.remove(i);
            } else if entry.sender.is_ready() {
                return Some(idle.remove(i).sender);
            }
        }
        None
    }

    /// Back on the stack after its response ended. The oldest goes when the stack is full, and
    /// expired ones at the bottom go now: requests take from the top, so no checkout reaches
    /// them while the top ones serve.
    fn put(&self, sender: SendRequest<ProxyBody>, now: Instant) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.lock();
        let expired = idle
            .iter()
            .take_while(|e| now.duration_since(e.since) >= IDLE_TIMEOUT)
            .count();
        idle.drain(..expired);
        if idle.len() >= MAX_IDLE {
            idle.remove(0);
        }
        idle.push(Idle { sender, since: now });
    }
}

/// The upstream's response body. Once it has ended its connection goes back to the pool; a
/// body dropped before its end takes its connection with it (hyper closes it: the rest of the
/// response is still on the wire).
pub struct UpstreamBody {
    inner: Incoming,
    home: Option<(SendRequest<ProxyBody>, Arc<Shared>)>,
}

impl UpstreamBody {
    /// hyper drops a body of known length after its last byte without polling it to its end,
    /// so the end is also read from `is_end_stream`.
    fn release_if_ended(&mut self, ended: bool) {
        if (ended || self.inner.is_end_stream())
            && let Some((sender, pool)) = self.home.take()
        {
            pool.put(sender, Instant::now());
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.release_if_ended(true),
            Poll::Ready(Some(Ok(_))) => self.release_if_ended(false),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        self.release_if_ended(false);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::{BodyExt, Full};
    use hyper::{server::conn::http1 as server, service::service_fn};
    use hyper_util::rt::TokioIo;
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    use super::*;
    use crate::proxy::body::full;

    /// An HTTP/1 upstream answering `ok` to everything; counts the connections it accepted.
    async fn upstream() -> (Pool, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let ok = service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from("ok"))))
                });
                tokio::spawn(server::Builder::new().serve_connection(TokioIo::new(tcp), ok));
            }
        });
        (pool_to(&format!("http://{addr}/")), accepted)
    }

    fn pool_to(origin: &str) -> Pool {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
            .unwrap()
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        Pool::new(https, origin.parse().unwrap())
    }

    fn get() -> Request<ProxyBody> {
        Request::builder()
            .uri("/v1/models")
            .header("host", "upstream")
            .body(full(Bytes::new()))
            .unwrap()
    }

    async fn read(response: Response<UpstreamBody>) -> Bytes {
        response.into_body().collect().await.unwrap().to_bytes()
    }

    /// What a blocking test server does with one request: reads its head, answers `ok`.
    fn answer_one(tcp: &mut std::net::TcpStream) {
        use std::io::{Read, Write};
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && tcp.read(&mut byte).unwrap_or(0) == 1 {
            head.push(byte[0]);
        }
        tcp.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            .unwrap();
    }

    #[tokio::test]
    async fn a_connection_is_taken_again_once_its_body_has_ended() {
        let (pool, accepted) = upstream().await;
        for _ in 0..5 {
            let response = pool.send(get()).await.unwrap();
            assert_eq!(read(response).await, "ok");
            assert_eq!(pool.idle(), 1);
            // The connection task sees the end of the response on its next turn.
            tokio::task::yield_now().await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_body_dropped_before_its_end_takes_its_connection_with_it() {
        let (pool, accepted) = upstream().await;
        drop(pool.send(get()).await.unwrap());
        assert_eq!(
            pool.idle(),
            0,
            "the rest of that answer is still on the wire"
        );
        assert_eq!(read(pool.send(get()).await.unwrap()).await, "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_burst_keeps_at_most_the_idle_cap() {
        let (pool, accepted) = upstream().await;
        let burst = MAX_IDLE + 3;
        let mut open = Vec::new();
        for _ in 0..burst {
            open.push(pool.send(get()).await.unwrap());
        }
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            burst,
            "busy connections are never shared"
        );
        for response in open {
            read(response).await;
        }
        assert_eq!(pool.idle(), MAX_IDLE);
    }

    /// An upstream that closes each connection after its first answer, as one whose idle
    /// timeout is shorter than ours does: no request may fail for it.
    #[tokio::test]
    async fn an_upstream_closing_idle_connections_fails_no_request() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n")
                        && tcp.read(&mut byte).await.unwrap_or(0) == 1
                    {
                        head.push(byte[0]);
                    }
                    let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                    let _ = tcp.write_all(answer).await;
                });
            }
        });
        let pool = pool_to(&format!("http://{addr}"));
        for _ in 0..20 {
            let response = pool
                .send(get())
                .await
                .expect("a closed idle connection is not used");
            assert_eq!(read(response).await, "ok");
        }
    }

    #[tokio::test]
    async fn connections_idle_too_long_are_dropped_from_the_bottom_on_return() {
        let (pool, _) = upstream().await;
        let (first, second) = (
            pool.send(get()).await.unwrap(),
            pool.send(get()).await.unwrap(),
        );
        read(first).await;
        read(second).await;
        tokio::task::yield_now().await;
        assert_eq!(pool.idle(), 2);
        let now = Instant::now();
        let newest = pool.shared.checkout(now).expect("a ready connection");
        pool.shared.put(newest, now + IDLE_TIMEOUT);
        assert_eq!(
            pool.idle(),
            1,
            "the older one had been idle for the whole timeout"
        );
        assert!(pool.shared.checkout(now + IDLE_TIMEOUT).is_some());
    }

    /// An upstream on a plain thread the test can block on: it answers one request on its
    /// first connection, then, when the test calls [`ClosingUpstream::close`], ends that
    /// connection (its sending side: the client reads the end) and hands the listener and the
    /// connection to `after`, whose result `server` returns.
    struct ClosingUpstream<T> {
        pool: Pool,
        close: std::sync::mpsc::Sender<()>,
        closed: std::sync::mpsc::Receiver<()>,
        server: std::thread::JoinHandle<T>,
    }

    impl<T: Send + 'static> ClosingUpstream<T> {
        /// Returns once the pool holds the first connection, idle.
        async fn start(
            after: impl FnOnce(std::net::TcpListener, std::net::TcpStream) -> T + Send + 'static,
        ) -> Self {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            let (close, close_rx) = std::sync::mpsc::channel::<()>();
            let (closed_tx, closed) = std::sync::mpsc::channel::<()>();
            let server = std::thread::spawn(move || {
                let (mut first, _) = listener.accept().unwrap();
                answer_one(&mut first);
                close_rx.recv().unwrap();
                first.shutdown(std::net::Shutdown::Write).unwrap();
                closed_tx.send(()).unwrap();
                after(listener, first)
            });
            let pool = pool_to(&format!("http://{addr}"));
            assert_eq!(read(pool.send(get()).await.unwrap()).await, "ok");
            tokio::task::yield_now().await;
            assert_eq!(pool.idle(), 1);
            Self {
                pool,
                close,
                closed,
                server,
            }
        }

        /// Ends the idle connection; blocks (the whole runtime) until the upstream has.
        fn close(&self) {
            self.close.send(()).unwrap();
            self.closed.recv().unwrap();
        }
    }

    /// The upstream closes an idle connection just as a request takes it, before the
    /// connection's task has seen the close: the request is written, its answer never comes,
    /// and it fails. It is not sent again: the upstream may have acted on it (a second
    /// message would be billed twice). The close blocks the runtime's one thread, so the
    /// runtime cannot run the connection's task in between.
    #[tokio::test]
    async fn a_request_written_on_a_connection_closed_under_it_is_never_sent_twice() {
        let upstream = ClosingUpstream::start(|listener, first| {
            drop(first);
            listener.set_nonblocking(true).unwrap();
            std::thread::sleep(Duration::from_millis(200));
            listener.accept().is_ok()
        })
        .await;
        upstream.close();
        let error = upstream.pool.send(get()).await.err();
        let error = error.expect("its answer never came");
        assert!(matches!(error, SendError::Request(_)), "{error}");
        let reconnected = upstream.server.join().unwrap();
        assert!(!reconnected, "the request was sent again");
    }

    /// The upstream closes an idle connection, and the runtime has read the close but the
    /// connection's task has not run yet: the connection still looks ready, a request takes
    /// it, and hyper hands the request back unwritten when the task sees the close. That
    /// request goes again on a new connection, once; the client never sees the close.
    ///
    /// How the test gets between the two: on the test's single-threaded runtime, `yield_now`
    /// in the test's own future lets the driver poll the socket (which queues the connection's
    /// task) and then polls the test's future again before any queued task.
    #[tokio::test]
    async fn a_request_never_written_goes_again_on_a_new_connection() {
        let upstream = ClosingUpstream::start(|listener, mut first| {
            use std::io::Read;
            let (mut second, _) = listener.accept().unwrap();
            answer_one(&mut second);
            // Anything the first connection received after its answer.
            let mut late = Vec::new();
            first
                .set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            let _ = first.read_to_end(&mut late);
            late
        })
        .await;
        upstream.close();
        std::thread::sleep(Duration::from_millis(20));
        tokio::task::yield_now().await;
        let pool = &upstream.pool;
        let idle = pool.shared.checkout(Instant::now());
        let idle = idle.expect("the closed connection still looks ready: its task has not run");
        pool.shared.put(idle, Instant::now());
        let response = pool
            .send(get())
            .await
            .expect("sent again on a new connection");
        assert_eq!(read(response).await, "ok");
        assert_eq!(
            upstream.server.join().unwrap(),
            b"",
            "nothing was written on the closed connection"
        );
    }

    #[tokio::test]
    async fn an_unreachable_upstream_is_a_connect_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let pool = pool_to(&format!("http://{addr}"));
        let error = pool.send(get()).await.err().unwrap();
        assert!(matches!(error, SendError::Connect(_)), "{error}");
    }
}
