//! The drain as clients see it: pooled HTTP/1 and HTTP/2 connections across the phases, a
//! request in flight across the drain and the stop, new connections during the delay.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::*;

const SOON: Duration = Duration::from_secs(5);

struct Server {
    addr: std::net::SocketAddr,
    drain: Arc<Drain>,
    /// Releases one request to `/slow`.
    gate: Arc<Notify>,
    /// `/slow` requests that have arrived.
    arrived: Arc<Notify>,
    accept_loop: JoinHandle<()>,
}

/// An accept loop as the webhook's and the gateway's: every connection through the drain,
/// the listener closed at [`Phase::Stopping`].
async fn server() -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let drain = Arc::new(Drain::new());
    let (gate, arrived) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let accept_loop = tokio::spawn({
        let (drain, gate, arrived) = (drain.clone(), gate.clone(), arrived.clone());
        async move {
            loop {
                let (stream, _) = tokio::select! {
                    () = drain.stopped() => break,
                    accepted = listener.accept() => accepted.unwrap(),
                };
                let connection = drain.connection();
                let (gate, arrived) = (gate.clone(), arrived.clone());
                let service = connection.service(hyper::service::service_fn(
                    move |request: Request<hyper::body::Incoming>| {
                        let (gate, arrived) = (gate.clone(), arrived.clone());
                        async move {
                            if request.uri().path() == "/slow" {
                                arrived.notify_one();
                                gate.notified().await;
                            }
                            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("ok"))))
                        }
                    },
                ));
                tokio::spawn(async move {
                    let builder = auto::Builder::new(TokioExecutor::new());
                    let conn = builder
                        .serve_connection(TokioIo::new(stream), service)
                        .into_owned();
                    let _ = connection.serve(conn).await;
                });
            }
        }
    });
    Server {
        addr,
        drain,
        gate,
        arrived,
        accept_loop,
    }
}

type Body = Full<Bytes>;

struct H1 {
    sender: http1::SendRequest<Body>,
    closed: JoinHandle<()>,
}

struct H2 {
    sender: http2::SendRequest<Body>,
    closed: JoinHandle<()>,
}

async fn h1(addr: std::net::SocketAddr) -> H1 {
    let io = TokioIo::new(TcpStream::connect(addr).await.unwrap());
    let (sender, conn) = http1::handshake(io).await.unwrap();
    let closed = tokio::spawn(async move {
        conn.await.expect("the connection ends cleanly");
    });
    H1 { sender, closed }
}

async fn h2(addr: std::net::SocketAddr) -> H2 {
    let io = TokioIo::new(TcpStream::connect(addr).await.unwrap());
    let (sender, conn) = http2::handshake(TokioExecutor::new(), io).await.unwrap();
    let closed = tokio::spawn(async move {
        conn.await.expect("the connection ends cleanly");
    });
    H2 { sender, closed }
}

fn get(path: &str) -> Request<Body> {
    Request::get(path).body(Full::default()).unwrap()
}

/// Status, whether the response said `Connection: close`, and the body.
async fn answer(
    response: Result<Response<hyper::body::Incoming>, hyper::Error>,
) -> (u16, bool, String) {
    let response = response.expect("answered, not cut");
    let close = response
        .headers()
        .get(header::CONNECTION)
        .is_some_and(|v| v == "close");
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, close, String::from_utf8_lossy(&body).into_owned())
}

async fn closes(closed: JoinHandle<()>, what: &str) {
    tokio::time::timeout(SOON, closed)
        .await
        .unwrap_or_else(|_| panic!("{what}: still open"))
        .unwrap_or_else(|e| panic!("{what}: {e}"));
}

#[tokio::test]
async fn http1_pooled_connections_close_after_their_next_response_and_new_ones_are_served() {
    let s = server().await;
    let mut pooled = h1(s.addr).await;
    let mut idle = h1(s.addr).await;
    for c in [&mut pooled, &mut idle] {
        let (status, close, body) = answer(c.sender.send_request(get("/")).await).await;
        assert_eq!((status, close, body.as_str()), (200, false, "ok"));
    }

    s.drain.start();
    let (status, close, _) = answer(pooled.sender.send_request(get("/")).await).await;
    assert_eq!((status, close), (200, true), "the next response closes it");
    closes(
        pooled.closed,
        "the pooled connection after Connection: close",
    )
    .await;

    // During the delay a new connection is served (one request, then closed).
    let mut fresh = h1(s.addr).await;
    let (status, close, _) = answer(fresh.sender.send_request(get("/")).await).await;
    assert_eq!((status, close), (200, true));
    closes(fresh.closed, "a connection opened while draining").await;

    // A connection kept idle through the delay is closed when the listener stops.
    assert!(
        !idle.closed.is_finished(),
        "idle connections stay open while draining"
    );
    s.drain.stop();
    closes(idle.closed, "the idle connection at stop").await;
    closes(s.accept_loop, "the accept loop").await;
    assert!(TcpStream::connect(s.addr).await.is_err(), "listener closed");
}

#[tokio::test]
async fn http1_request_in_flight_across_drain_and_stop_is_answered() {
    let s = server().await;
    let mut c = h1(s.addr).await;
    let pending = c.sender.send_request(get("/slow"));
    let pending = tokio::spawn(pending);
    s.arrived.notified().await;
    s.drain.start();
    s.drain.stop();
    closes(s.accept_loop, "the accept loop").await;
    s.gate.notify_one();
    let (status, close, body) = answer(pending.await.unwrap()).await;
    assert_eq!((status, close, body.as_str()), (200, true, "ok"));
    closes(c.closed, "the connection after its last response").await;
}

#[tokio::test]
async fn http2_connections_get_goaway_and_streams_in_flight_finish() {
    let s = server().await;
    let mut busy = h2(s.addr).await;
    let mut idle = h2(s.addr).await;
    for c in [&mut busy, &mut idle] {
        let (status, _, _) = answer(c.sender.send_request(get("/")).await).await;
        assert_eq!(status, 200);
    }
    let pending = tokio::spawn(busy.sender.send_request(get("/slow")));
    s.arrived.notified().await;

    s.drain.start();
    // The idle connection is told GOAWAY at once and closes; the client opens a new one.
    closes(idle.closed, "the idle HTTP/2 connection after GOAWAY").await;
    assert!(idle.sender.is_closed());
    let mut fresh = h2(s.addr).await;
    let (status, _, body) = answer(fresh.sender.send_request(get("/")).await).await;
    assert_eq!(
        (status, body.as_str()),
        (200, "ok"),
        "a new connection is served"
    );
    closes(
        fresh.closed,
        "a connection opened while draining, after its request",
    )
    .await;

    // The stream in flight finishes, after the listener has stopped.
    s.drain.stop();
    closes(s.accept_loop, "the accept loop").await;
    assert!(!busy.closed.is_finished(), "cut under a stream in flight");
    s.gate.notify_one();
    let (status, _, body) = answer(pending.await.unwrap()).await;
    assert_eq!((status, body.as_str()), (200, "ok"));
    closes(busy.closed, "the busy connection after its stream").await;
}

#[tokio::test]
async fn a_connection_opened_while_draining_is_not_closed_before_its_first_request() {
    let s = server().await;
    s.drain.start();
    let mut c1 = h1(s.addr).await;
    let mut c2 = h2(s.addr).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!c1.closed.is_finished() && !c2.closed.is_finished());
    let (status, close, _) = answer(c1.sender.send_request(get("/")).await).await;
    assert_eq!((status, close), (200, true));
    let (status, _, _) = answer(c2.sender.send_request(get("/")).await).await;
    assert_eq!(status, 200);
    closes(c1.closed, "HTTP/1").await;
    closes(c2.closed, "HTTP/2").await;
}

#[tokio::test]
async fn phases_only_move_forward() {
    let drain = Drain::new();
    assert_eq!(drain.phase(), Phase::Serving);
    drain.stop();
    drain.start();
    assert_eq!(drain.phase(), Phase::Stopping);
    drain.stopped().await;
    let drain = Drain::new();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let after = drain.after(
        async {
            let _ = rx.await;
        },
        Duration::from_millis(50),
    );
    tokio::pin!(after);
    assert!(
        tokio::time::timeout(Duration::from_millis(50), after.as_mut())
            .await
            .is_err()
    );
    assert_eq!(drain.phase(), Phase::Serving);
    tx.send(()).unwrap();
    after.await;
    assert_eq!(drain.phase(), Phase::Stopping);
}
