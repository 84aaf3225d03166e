//! Limits every traffic listener applies, plain or TLS, sidecar or gateway: a header-read
//! timeout (slow-headers clients are cut off), an idle timeout (a connection without a request
//! for that long is closed, pings or not; one waiting for the upstream's answer is kept; a
//! client that stopped reading its answer is closed too, so what it does not read is not held
//! for ever), and caps on open connections, in all and (on a gateway) per client address.
//! Request bodies are bounded where they are read (`pipeline::read_body`), with their own
//! timeout.

use std::{
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::{body::Incoming, service::Service};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
};

use super::{
    after_answer::AnswersFirst,
    body::{BoxError, ProxyBody},
    request::MAX_BODY_BYTES,
};
use crate::body_budget::{BodyBudget, BodyLimits};
use crate::per_client::PerClient;

/// The next connection, with Nagle off (every response is written whole). A failed accept
/// (out of file descriptors, say) pauses briefly rather than spin, then says so with `None`:
/// the caller loops.
pub async fn accept(listener: &TcpListener) -> Option<TcpStream> {
    match listener.accept().await {
        Ok((stream, _)) => {
            let _ = stream.set_nodelay(true);
            Some(stream)
        }
        Err(e) => {
            tracing::warn!(error = %e, "failed to accept a connection");
            tokio::time::sleep(ACCEPT_PAUSE).await;
            None
        }
    }
}

/// How long a failed accept pauses the listener.
const ACCEPT_PAUSE: Duration = Duration::from_millis(50);
use crate::shutdown::drain::ConnectionDrain;

/// The limits of one listener.
#[derive(Clone, Debug)]
pub struct ServerLimits {
    /// A client must send a request's headers within this (also the wait for the next request
    /// on a kept-alive HTTP/1 connection).
    pub header_read_timeout: Duration,
    /// A connection with no request for this long is closed (bytes alone, such as HTTP/2
    /// pings, do not keep it); so is one whose client has taken none of its answers for this
    /// long (noticed within twice this): an HTTP/1 write waiting on its window, every HTTP/2
    /// answer waiting for window. A request whose client reads is waited for however long the
    /// upstream takes: a long generation is not idle.
    pub idle_timeout: Duration,
    /// Open connections at most; more wait until one closes.
    pub max_connections: usize,
    /// Open connections from one client address at most; more are closed at once
    /// (`crate::per_client`). A gateway's is a quarter of `max_connections`: one pod cannot take
    /// every slot, and the Anthropic SDKs' own pool (1,000 connections at most) still fits.
    pub max_connections_per_client: usize,
    /// A client must send a request body within this.
    pub body_timeout: Duration,
    /// Bytes of request bodies (and the trees parsed from them) held at once, across all
    /// connections: past it, requests are refused with a retryable 503 rather than the process
    /// running out of memory. An eighth is kept for bodies of at most [`SMALL_BODY`], so a
    /// burst of large bodies (one tenant's, say) cannot starve ordinary requests.
    pub body_budget: usize,
}

/// What counts as a small request body: one of the budget's reserve.
pub const SMALL_BODY: usize = 1024 * 1024;

/// The default body budget, MiB. A Messages batch of 100,000 requests (the API's largest, a
/// body near the 32 MiB limit with a tree of up to 96 MiB) fits beside the reserve; the chart's
/// gateway (256 MiB limit, ~60 MiB of its own at 10,000 ClaudeKeys) holds it.
pub const DEFAULT_BODY_BUDGET_MIB: u32 = 160;

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(20),
            idle_timeout: Duration::from_secs(120),
            max_connections: 4096,
            max_connections_per_client: 4096,
            body_timeout: Duration::from_secs(60),
            body_budget: (DEFAULT_BODY_BUDGET_MIB as usize) << 20,
        }
    }
}

impl ServerLimits {
    /// The HTTP/1 and HTTP/2 connection builder of one connection, with the timers the limits
    /// need.
    fn builder(&self) -> auto::Builder<TokioExecutor> {
        // HTTP/2 streams run as tasks of their own; hyper ends each (dropping its exchange, which
        // audits it) when its connection goes away.
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.header_read_timeout);
        builder.http2().timer(TokioTimer::new());
        builder
    }

    /// The body budget of the process's traffic listeners.
    pub fn body_budget(&self) -> BodyBudget {
        BodyBudget::new(BodyLimits {
            max_body: MAX_BODY_BYTES,
            total: self.body_budget,
            reserve: self.body_budget / 8,
            small: SMALL_BODY,
            read_timeout: self.body_timeout,
        })
    }

    /// One permit per open connection.
    pub fn slots(&self) -> Arc<Semaphore> {
        Arc::new(Semaphore::new(self.max_connections.max(1)))
    }

    /// The count of open connections per client address.
    pub fn per_client(&self) -> PerClient {
        PerClient::new(self.max_connections_per_client)
    }

    /// A gateway's limits: what a sidecar has, with a cap per client address (a sidecar's one
    /// client is its pod's application).
    pub fn gateway() -> Self {
        let limits = Self::default();
        Self {
            max_connections_per_client: limits.max_connections / 4,
            ..limits
        }
    }
}

/// What one connection is doing: when a request last began or ended and how many are open, and
/// whether the client takes its answers: when a write last went through and whether the last
/// one waits on the client's window, and how many answers have handed hyper a frame that it has
/// not come back after.
struct Activity {
    epoch: Instant,
    /// Bytes alone do not keep a connection without requests: HTTP/2 pings would hold one (and
    /// its slot of `max_connections`) for ever, without a credential.
    last_request_ms: AtomicU64,
    in_flight: AtomicUsize,
    /// Only writes count as the client taking its answer: one that sends pings (or anything)
    /// while it reads nothing is not reading.
    last_write_ms: AtomicU64,
    /// A write (or flush) returned `Pending` and none has gone through since: an HTTP/1 (or
    /// TLS) client is not taking what it was sent.
    write_blocked: AtomicBool,
    /// Answers whose last frame hyper took and that it has not asked for the next since: on
    /// HTTP/2 the sign of a stream the client gives no window (the socket itself drains). Not
    /// on HTTP/1, where hyper writes a taken frame before it asks again, however slowly a
    /// client that reads takes it: there `write_blocked` says it.
    handed: AtomicUsize,
    http2: AtomicBool,
    last_handed_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            epoch: Instant::now(),
            last_request_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            last_write_ms: AtomicU64::new(0),
            write_blocked: AtomicBool::new(false),
            handed: AtomicUsize::new(0),
            last_handed_ms: AtomicU64::new(0),
            http2: AtomicBool::new(false),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn since(&self, ms: &AtomicU64) -> Duration {
        Duration::from_millis(self.now_ms().saturating_sub(ms.load(Ordering::Relaxed)))
    }

    /// Notes what a write did: bytes out, or a wait on the client.
    fn wrote(&self, result: &Poll<io::Result<usize>>) {
        match result {
            Poll::Pending => self.write_blocked.store(true, Ordering::Relaxed),
            Poll::Ready(Ok(n)) if *n > 0 => {
                self.write_blocked.store(false, Ordering::Relaxed);
                self.last_write_ms.store(self.now_ms(), Ordering::Relaxed);
            }
            Poll::Ready(_) => {}
        }
    }

    fn seen(&self) -> Seen {
        // In flight first: once it reads none, the last request's end is seen too (below).
        let in_flight = self.in_flight.load(Ordering::Acquire);
        Seen {
            since_request: self.since(&self.last_request_ms),
            in_flight: in_flight > 0,
            since_write: self.since(&self.last_write_ms),
            write_blocked: self.write_blocked.load(Ordering::Relaxed),
            all_handed: self.http2.load(Ordering::Relaxed)
                && in_flight > 0
                && self.handed.load(Ordering::Relaxed) >= in_flight,
            since_handed: self.since(&self.last_handed_ms),
        }
    }
}

/// What the idle check sees of a connection.
#[derive(Clone, Copy, Debug)]
struct Seen {
    /// Since a request last began or ended.
    since_request: Duration,
    /// A request's answer is not finished.
    in_flight: bool,
    /// Since a write last went through.
    since_write: Duration,
    /// The last write waits on the client's window.
    write_blocked: bool,
    /// HTTP/2: every answer in flight has handed hyper a frame it has not come back after.
    all_handed: bool,
    /// Since an answer last handed hyper a frame.
    since_handed: Duration,
}

/// The idle check's decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Check {
    /// Look again after this long (never zero: a past deadline must not wake the check in a
    /// loop while a slow answer is awaited).
    Again(Duration),
    /// No request for the whole timeout: close.
    Idle,
    /// Answers the client has not taken for the whole timeout: close.
    NotReading,
}

/// Whether a connection is closed now, and if not when to look again. Without a request it is
/// timed from the last one (bytes do not count); when the client takes no answer (a write
/// waits on its window, or every answer waits for hyper to come back), from the last progress;
/// otherwise it is not timed here: the proxy is the one waiting (on the upstream).
fn check(seen: Seen, idle_timeout: Duration) -> Check {
    let idle_timeout = idle_timeout.max(Duration::from_millis(1));
    let (elapsed, close) = if !seen.in_flight {
        (seen.since_request, Check::Idle)
    } else if seen.write_blocked {
        (seen.since_write, Check::NotReading)
    } else if seen.all_handed {
        (seen.since_handed, Check::NotReading)
    } else {
        return Check::Again(idle_timeout);
    };
    if elapsed >= idle_timeout {
        close
    } else {
        Check::Again(idle_timeout - elapsed)
    }
}

/// Counts a request as open until its response body is dropped.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn new(activity: &Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::Relaxed);
        activity
            .last_request_ms
            .store(activity.now_ms(), Ordering::Relaxed);
        Self(activity.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        // The end first: the idle check must not see no request in flight and the start of a
        // long one as the last (it would close the connection under the answer's last bytes).
        self.0
            .last_request_ms
            .store(self.0.now_ms(), Ordering::Release);
        self.0.in_flight.fetch_sub(1, Ordering::Release);
    }
}

/// An answer's body as the connection sees it: it holds the request's [`InFlight`] for as long
/// as it lives (a long stream is not idle), and tells the connection when hyper took a frame
/// and has not come back for the next.
struct Watched {
    inner: ProxyBody,
    in_flight: InFlight,
    handed: bool,
}

impl Watched {
    fn set_handed(&mut self, handed: bool) {
        let activity = &self.in_flight.0;
        match (self.handed, handed) {
            (false, true) => {
                activity
                    .last_handed_ms
                    .store(activity.now_ms(), Ordering::Relaxed);
                activity.handed.fetch_add(1, Ordering::Relaxed);
            }
            (true, false) => {
                activity.handed.fetch_sub(1, Ordering::Relaxed);
            }
            _ => {}
        }
        self.handed = handed;
    }
}

impl Body for Watched {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.set_handed(false);
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(Some(Ok(_)))) {
            self.set_handed(true);
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

impl Drop for Watched {
    fn drop(&mut self) {
        self.set_handed(false);
    }
}

/// Serves one accepted connection (a TCP stream, or a TLS stream over one) with `service`
/// until it ends, goes idle past the limit, or the server's drain closes it (cleanly: GOAWAY or
/// `Connection: close`). `_slot` is held for the connection's life.
pub async fn serve_connection<IO, S>(
    limits: &ServerLimits,
    drain: ConnectionDrain,
    io: IO,
    service: S,
    _slot: OwnedSemaphorePermit,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Service<Request<Incoming>, Response = Response<ProxyBody>, Error = std::convert::Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Tracked {
        inner: io,
        activity: activity.clone(),
    });
    let counting = activity.clone();
    let service = hyper::service::service_fn(move |req| {
        let in_flight = InFlight::new(&counting);
        if req.version() == http::Version::HTTP_2 {
            counting.http2.store(true, Ordering::Relaxed);
        }
        let call = service.call(req);
        async move {
            let response = call.await?;
            Ok::<_, std::convert::Infallible>(response.map(|inner| {
                Watched {
                    inner,
                    in_flight,
                    handed: false,
                }
                .boxed_unsync()
            }))
        }
    });
    let builder = limits.builder();
    let service = drain.service(service);
    let connection = drain.serve(builder.serve_connection(io, service).into_owned());
    tokio::pin!(connection);
    let mut next_check = limits.idle_timeout;
    loop {
        tokio::select! {
            result = AnswersFirst(connection.as_mut()) => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                break;
            }
            () = tokio::time::sleep(next_check) => match check(activity.seen(), limits.idle_timeout) {
                Check::Again(after) => next_check = after,
                Check::Idle => {
                    tracing::debug!("closing an idle connection");
                    break;
                }
                Check::NotReading => {
                    tracing::debug!("closing a connection whose client stopped reading its answer");
                    break;
                }
            },
        }
    }
}

/// An IO stream that notes whether its writes go through.
struct Tracked<T> {
    inner: T,
    activity: Arc<Activity>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tracked<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.activity.wrote(&result);
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.activity.wrote(&result);
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = Pin::new(&mut self.inner).poll_flush(cx);
        // A flush moves no new bytes of its own (the writes that filled it were counted): it
        // only says whether the client has taken them.
        match result {
            Poll::Pending => self.activity.write_blocked.store(true, Ordering::Relaxed),
            Poll::Ready(Ok(())) => self.activity.write_blocked.store(false, Ordering::Relaxed),
            Poll::Ready(Err(_)) => {}
        }
        result
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(120);

    /// A connection with a request in flight whose client takes its answer: nothing timed.
    fn reading(since_request: u64) -> Seen {
        Seen {
            since_request: Duration::from_secs(since_request),
            in_flight: true,
            since_write: Duration::from_secs(since_request),
            write_blocked: false,
            all_handed: false,
            since_handed: Duration::from_secs(since_request),
        }
    }

    #[test]
    fn a_connection_without_requests_is_closed_at_the_timeout_whatever_bytes_move() {
        let idle = |secs| Seen {
            in_flight: false,
            // Writes going on (HTTP/2 pongs) do not count.
            since_write: Duration::ZERO,
            ..reading(secs)
        };
        assert_eq!(check(idle(119), T), Check::Again(Duration::from_secs(1)));
        assert_eq!(check(idle(120), T), Check::Idle);
    }

    #[test]
    fn a_request_awaiting_the_upstream_is_never_timed_and_never_spins() {
        for quiet in [0, 60, 120, 600, 3600] {
            let Check::Again(after) = check(reading(quiet), T) else {
                panic!("closed a connection awaiting the upstream after {quiet} s");
            };
            assert!(
                after >= Duration::from_secs(1),
                "{quiet} s: looks again in {after:?}"
            );
        }
    }

    #[test]
    fn a_client_whose_writes_wait_is_closed_at_the_timeout_from_the_last_write() {
        let blocked = |secs| Seen {
            write_blocked: true,
            since_write: Duration::from_secs(secs),
            ..reading(500)
        };
        assert_eq!(check(blocked(30), T), Check::Again(Duration::from_secs(90)));
        assert_eq!(check(blocked(120), T), Check::NotReading);
    }

    #[test]
    fn answers_hyper_never_comes_back_for_are_closed_at_the_timeout() {
        let handed = |secs, all| Seen {
            all_handed: all,
            since_handed: Duration::from_secs(secs),
            // An HTTP/2 client answering pings: writes go through.
            since_write: Duration::ZERO,
            ..reading(500)
        };
        assert_eq!(
            check(handed(30, true), T),
            Check::Again(Duration::from_secs(90))
        );
        assert_eq!(check(handed(120, true), T), Check::NotReading);
        // One answer still awaits the upstream: the connection is kept for it.
        assert_eq!(check(handed(500, false), T), Check::Again(T));
    }

    #[test]
    fn only_a_gateway_caps_connections_per_client_address() {
        let sidecar = ServerLimits::default();
        assert_eq!(sidecar.max_connections_per_client, sidecar.max_connections);
        let gateway = ServerLimits::gateway();
        assert_eq!(gateway.max_connections_per_client, 1024);
        assert!(
            gateway.max_connections_per_client >= 1000,
            "below the Anthropic SDKs' own pool maximum"
        );
    }

    #[test]
    fn a_zero_timeout_still_looks_again_later_rather_than_at_once() {
        assert_eq!(
            check(reading(0), Duration::ZERO),
            Check::Again(Duration::from_millis(1))
        );
    }
}
