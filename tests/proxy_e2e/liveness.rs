//! Connection liveness: what keeps a connection open and what closes it. A request awaiting the
//! upstream is waited for without spinning; a client that takes none of its answers (an HTTP/1
//! socket that does not drain, an HTTP/2 stream given no window) is closed, one that reads
//! slowly is not; pings alone do not keep a connection; one client address cannot take every
//! connection.

use std::time::Duration;

use claudekey::fake_upstream::Reply as FakeReply;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::Instant,
};

use super::bounds::{harness, head, limits, read_until_closed};
use super::proxy_common::*;

/// CPU time this thread has used (user + system), from /proc/thread-self/stat: the test's
/// single-threaded runtime runs the in-process proxy's connections, while other tests of the
/// binary run on threads of their own.
fn thread_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
    // Fields after the command name (which may hold spaces) start after its closing paren.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

/// A request the upstream takes longer than the idle timeout to answer keeps its connection
/// (it is in flight), and waiting for it costs no CPU: the idle check must not wake in a loop
/// once its deadline has passed.
#[tokio::test]
async fn a_slow_answer_past_the_idle_timeout_is_waited_for_without_spinning() {
    let h = harness(limits(|l| l.idle_timeout = Duration::from_millis(200))).await;
    h.fake.set_response_delay(Duration::from_millis(1800));
    let cpu_before = thread_cpu();
    let started = Instant::now();
    let response = h.ask("hi").await;
    let wall = started.elapsed();
    let cpu = thread_cpu() - cpu_before;
    assert_eq!(response.status, 200, "in flight is not idle");
    assert!(
        cpu < wall / 4,
        "waiting {wall:?} for the upstream cost {cpu:?} of CPU"
    );
}

/// Asks, over a raw HTTP/1 connection, for an answer of ~22 MB: far larger than what the
/// kernel's buffers on both sides of a loopback connection take. Returns the connection and the
/// answer's text.
async fn ask_for_a_large_answer(h: &Harness) -> (TcpStream, String) {
    let text = "lighthouse ".repeat(2 * 1024 * 1024);
    h.fake.set_reply(FakeReply::Text(text.clone()));
    let mut stream = TcpStream::connect(h.addr).await.unwrap();
    let body = message("hi", false).to_string();
    stream.write_all(head(body.len()).as_bytes()).await.unwrap();
    stream.write_all(body.as_bytes()).await.unwrap();
    (stream, text)
}

/// A client that asks for an answer and never reads it: once nothing has moved for the idle
/// timeout, the connection is closed and the answer's memory freed, where before it was held for
/// as long as the client kept the connection.
#[tokio::test]
async fn a_client_that_stops_reading_its_answer_is_closed() {
    let h = harness(limits(|l| l.idle_timeout = Duration::from_millis(600))).await;
    let (mut stream, text) = ask_for_a_large_answer(&h).await;
    // Not reading: the proxy's writes block once the socket buffers are full.
    h.wait_audit(1).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Reading now gets what the kernel had taken, then the close. Had the connection been kept,
    // reading would let the whole answer through.
    let (reply, closed) = read_until_closed(&mut stream, Duration::from_secs(10)).await;
    assert!(
        reply.starts_with("HTTP/1.1 200"),
        "{}",
        &reply[..reply.len().min(64)]
    );
    assert!(closed, "the connection stayed open");
    assert!(
        reply.len() < text.len(),
        "the whole answer was written ({} bytes): the connection was kept",
        reply.len()
    );
}

/// An HTTP/2 connection that only pings, never asking anything, does not keep its slot: pings
/// move bytes, but idleness is timed from the last request (a credential-less client could
/// otherwise hold every one of the listener's connections).
#[tokio::test]
async fn pings_without_requests_do_not_keep_a_connection_open() {
    let h = harness(limits(|l| l.idle_timeout = Duration::from_millis(500))).await;
    let tcp = TcpStream::connect(h.addr).await.unwrap();
    let (_sender, connection) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .keep_alive_interval(Duration::from_millis(100))
            .keep_alive_while_idle(true)
            .handshake::<_, http_body_util::Empty<bytes::Bytes>>(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    let started = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(5), connection).await;
    assert!(ended.is_ok(), "a pinging connection was kept for 5 s");
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "closed before the idle timeout: {:?}",
        started.elapsed()
    );
}

/// Connections from one client address beyond its cap are closed at once, while another
/// address is served and a freed place is taken again.
#[tokio::test]
async fn one_client_address_cannot_take_every_connection() {
    let h = harness(limits(|l| l.max_connections_per_client = 2)).await;
    let connect_from = |ip: [u8; 4]| async move {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(std::net::SocketAddr::from((ip, 0))).unwrap();
        socket.connect(h.addr).await.unwrap()
    };
    let get = "GET /v1/models HTTP/1.1\r\nhost: proxy\r\nanthropic-version: 2023-06-01\r\n\r\n";
    let held = vec![
        connect_from([127, 0, 0, 1]).await,
        connect_from([127, 0, 0, 1]).await,
    ];
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut third = connect_from([127, 0, 0, 1]).await;
    let _ = third.write_all(get.as_bytes()).await;
    let (reply, closed) = read_until_closed(&mut third, Duration::from_secs(3)).await;
    assert!(
        closed && reply.is_empty(),
        "a third connection was served: {reply:?}"
    );
    let mut other = connect_from([127, 0, 0, 2]).await;
    other.write_all(get.as_bytes()).await.unwrap();
    let mut buf = [0u8; 12];
    other.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"HTTP/1.1 200", "another address is served");
    drop(held);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut again = connect_from([127, 0, 0, 1]).await;
    again.write_all(get.as_bytes()).await.unwrap();
    again.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"HTTP/1.1 200", "a freed place is taken again");
}

/// An HTTP/2 client that gives a stream no window and keeps pinging: the socket drains (pings
/// and pongs move), but the answer waits on hyper, not on the upstream, so the connection is
/// closed after the idle timeout and the request is audited as the client's doing.
#[tokio::test]
async fn an_http2_stream_given_no_window_is_closed() {
    let h = harness(limits(|l| l.idle_timeout = Duration::from_millis(600))).await;
    h.fake
        .set_reply(FakeReply::Text("lighthouse keeper ".repeat(4000)));
    h.fake.set_chunk_chars(16);
    let tcp = TcpStream::connect(h.addr).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .keep_alive_interval(Duration::from_millis(100))
            .keep_alive_while_idle(true)
            .adaptive_window(false)
            .initial_stream_window_size(16 * 1024)
            .handshake::<_, http_body_util::Full<bytes::Bytes>>(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    let connection = tokio::spawn(connection);
    let request = http::Request::post(format!("{}/v1/messages", h.url()))
        .header("anthropic-version", "2023-06-01")
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            message("hi", true).to_string(),
        )))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    // Never read: the stream's window stays spent.
    let _unread = response.into_body();
    let ended = tokio::time::timeout(Duration::from_secs(5), connection).await;
    assert!(ended.is_ok(), "a stream given no window was kept for 5 s");
    let audit = h.wait_audit(1).await;
    assert_eq!(audit[0]["outcome"], "client_closed", "{audit:?}");
}

/// A client that reads a large answer slowly but steadily, for longer than the idle timeout,
/// gets all of it: each of its reads lets writes through, and that is what counts.
#[tokio::test]
async fn a_slow_reader_of_a_large_answer_is_not_closed() {
    let h = harness(limits(|l| l.idle_timeout = Duration::from_millis(500))).await;
    let (mut stream, text) = ask_for_a_large_answer(&h).await;
    let started = Instant::now();
    let mut got = 0usize;
    let mut buf = vec![0u8; 1024 * 1024];
    // About 10 MB a second: past the timeout several times over.
    while got < text.len() {
        match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => got += n,
            Err(_) => panic!("the answer stopped after {got} bytes"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        got > text.len(),
        "closed after {got} bytes, {:?}",
        started.elapsed()
    );
    assert!(
        started.elapsed() > Duration::from_millis(1500),
        "not slow enough to test"
    );
}
