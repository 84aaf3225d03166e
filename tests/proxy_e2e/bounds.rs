//! Bounded by design (issue 16): every request leaves exactly one audit line however it ends
//! (answered, abandoned, timed out, cut at shutdown), slow clients are cut off, connections are
//! capped, and an oversized body is refused before it is buffered.

use std::time::Duration;

use claudekey::{
    fake_upstream::Reply as FakeReply,
    proxy::{Mode, ProxySettings, ServerLimits},
};
use serde_json::json;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::Instant,
};

use super::proxy_common::*;

pub(super) async fn harness(tweak: impl FnOnce(&mut ProxySettings)) -> Harness {
    Harness::start_with(
        Mode::Sidecar,
        &[UPSTREAM_A],
        |dir| {
            kubelet_write(
                dir,
                &proxy_json("bot", &[(UPSTREAM_A, None)], &[], json!({})),
            )
        },
        tweak,
    )
    .await
}

pub(super) fn limits(f: impl FnOnce(&mut ServerLimits)) -> impl FnOnce(&mut ProxySettings) {
    move |s| f(&mut s.server_limits)
}

/// Reads until the peer closes (or `within` passes); returns what was read and whether it closed.
pub(super) async fn read_until_closed(stream: &mut TcpStream, within: Duration) -> (String, bool) {
    let mut out = Vec::new();
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&out).into(), true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => return (String::from_utf8_lossy(&out).into(), false),
        }
    }
}

pub(super) fn head(body_len: usize) -> String {
    format!(
        "POST /v1/messages HTTP/1.1\r\nhost: proxy\r\nanthropic-version: 2023-06-01\r\ncontent-type: application/json\r\ncontent-length: {body_len}\r\n\r\n"
    )
}

#[tokio::test]
async fn a_request_abandoned_before_the_answer_is_audited_once() {
    let h = harness(|_| {}).await;
    h.fake.set_response_delay(Duration::from_secs(3));
    let abandoned = tokio::time::timeout(
        Duration::from_millis(300),
        send(
            &client(),
            &h.url(),
            "POST",
            "/v1/messages",
            None,
            Some(message("hi", false)),
        ),
    )
    .await;
    assert!(abandoned.is_err(), "the fake answered too early");
    let audit = h.wait_audit(1).await;
    assert_eq!(audit[0]["outcome"], "client_closed");
    assert_eq!(audit[0]["status"], 499);
    assert_eq!(audit[0]["claudeKey"], "team-a/bot");
    assert_eq!(h.fake.received().len(), 1, "it had reached the upstream");
    // The upstream finishing later adds nothing.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(h.audit_lines().len(), 1);
}

/// A relayed answer of known length (count_tokens, models, an upstream error) ends when its
/// last byte is handed over: hyper drops such a body without asking it for its end. It is
/// audited as completed, and an upstream error gives the reservation back (the upstream spent
/// nothing); with the tokens limit below, a wrongly kept reservation would refuse the last
/// request.
#[tokio::test]
async fn an_answer_of_known_length_is_completed_and_an_upstream_error_charges_nothing() {
    let policy = json!({
        "scope": { "endpoints": ["messages", "countTokens", "models"] },
        "limits": { "tokensPerMinute": 1500 }
    });
    let h = Harness::start(Mode::Sidecar, &[UPSTREAM_A], |dir| {
        kubelet_write(dir, &proxy_json("bot", &[(UPSTREAM_A, None)], &[], policy))
    })
    .await;
    let (c, url) = (client(), h.url());
    let call = |method, path, body| send(&c, &url, method, path, None, body);
    let mut asks_900 = message("hi", false);
    asks_900["max_tokens"] = json!(900);

    h.fake.fail_next(
        1,
        http::StatusCode::from_u16(529).unwrap(),
        "overloaded_error",
    );
    let r = call("POST", "/v1/messages", Some(asks_900.clone())).await;
    assert_eq!(r.status, 529);
    assert!(r.headers.contains_key("content-length"));
    assert_eq!(call("GET", "/v1/models", None).await.status, 200);
    let count = json!({ "model": "claude-sonnet-4-5-20250929", "messages": [{ "role": "user", "content": "hi" }] });
    let r = call("POST", "/v1/messages/count_tokens", Some(count)).await;
    assert_eq!(r.status, 200);
    let r = call("POST", "/v1/messages", Some(asks_900)).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body()));

    let audit = h.wait_audit(4).await;
    let ends: Vec<_> = audit
        .iter()
        .map(|l| json!([l["endpoint"], l["status"], l["outcome"]]))
        .collect();
    assert_eq!(
        ends,
        [
            json!(["messages", 529, "completed"]),
            json!(["models", 200, "completed"]),
            json!(["countTokens", 200, "completed"]),
            json!(["messages", 200, "completed"]),
        ]
    );
}

#[tokio::test]
async fn a_body_that_never_arrives_times_out_with_one_audit_line() {
    let h = harness(limits(|l| l.body_timeout = Duration::from_millis(400))).await;
    let mut stream = TcpStream::connect(h.addr).await.unwrap();
    stream.write_all(head(100).as_bytes()).await.unwrap();
    stream.write_all(b"{\"model\":").await.unwrap();
    let (reply, _) = read_until_closed(&mut stream, Duration::from_secs(5)).await;
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(reply.contains("timeout_error"));
    let audit = h.wait_audit(1).await;
    assert_eq!(audit[0]["outcome"], "timeout");
    assert_eq!(audit[0]["status"], 408);
    assert!(h.fake.received().is_empty());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(h.audit_lines().len(), 1);
}

#[tokio::test]
async fn shutdown_cuts_open_streams_and_audits_each_once() {
    shutdown_cuts_an_open_stream(false).await;
}

#[tokio::test]
async fn shutdown_cuts_open_http2_streams_and_audits_each_once() {
    shutdown_cuts_an_open_stream(true).await;
}

async fn shutdown_cuts_an_open_stream(http2: bool) {
    let mut h = harness(|s| s.shutdown_grace = Duration::from_millis(300)).await;
    h.fake.set_reply(FakeReply::Text("word ".repeat(400)));
    h.fake.set_chunk_chars(5);
    h.fake.set_delta_delay(Duration::from_millis(50));
    let request = http::Request::post(format!("{}/v1/messages", h.url()))
        .header("anthropic-version", "2023-06-01")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            message("hi", true).to_string(),
        )))
        .unwrap();
    let client: HttpClient =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(http2)
            .build_http();
    let response = client.request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.version() == http::Version::HTTP_2, http2);
    let mut body = response.into_body();
    let _ = http_body_util::BodyExt::frame(&mut body).await;
    let started = Instant::now();
    h.shutdown().await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "shutdown waited for the stream"
    );
    let audit = h.audit_lines();
    assert_eq!(audit.len(), 1, "{audit:?}");
    assert_eq!(audit[0]["outcome"], "shutdown");
    assert!(
        audit[0]["inputTokens"].as_u64().unwrap() > 0,
        "usage so far is kept"
    );
    drop(body);
}

#[tokio::test]
async fn slow_headers_are_cut_off_at_the_timeout() {
    let h = harness(limits(|l| {
        l.header_read_timeout = Duration::from_millis(500)
    }))
    .await;
    let mut stream = TcpStream::connect(h.addr).await.unwrap();
    let started = Instant::now();
    stream
        .write_all(b"POST /v1/messages HTTP/1.1\r\nhost: proxy\r\n")
        .await
        .unwrap();
    // One more header byte now and then does not keep the connection open.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let _ = stream.write_all(b"x").await;
    }
    let (_, closed) = read_until_closed(&mut stream, Duration::from_secs(5)).await;
    assert!(closed, "slow-headers client still connected");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert!(h.fake.received().is_empty());
}

#[tokio::test]
async fn idle_connections_are_closed() {
    let h = harness(limits(|l| {
        l.idle_timeout = Duration::from_millis(400);
        l.header_read_timeout = Duration::from_secs(30);
    }))
    .await;
    let mut stream = TcpStream::connect(h.addr).await.unwrap();
    let body = message("hi", false).to_string();
    stream.write_all(head(body.len()).as_bytes()).await.unwrap();
    stream.write_all(body.as_bytes()).await.unwrap();
    let started = Instant::now();
    let (reply, closed) = read_until_closed(&mut stream, Duration::from_secs(5)).await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(closed, "idle keep-alive connection still open");
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn connections_beyond_the_cap_wait() {
    let h = harness(limits(|l| l.max_connections = 2)).await;
    let mut idle = vec![
        TcpStream::connect(h.addr).await.unwrap(),
        TcpStream::connect(h.addr).await.unwrap(),
    ];
    tokio::time::sleep(Duration::from_millis(100)).await;
    let third = tokio::spawn({
        let url = h.url();
        async move {
            send(&client(), &url, "GET", "/v1/models", None, None)
                .await
                .status
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !third.is_finished(),
        "a third connection was served past the cap of 2"
    );
    idle.pop();
    let status = tokio::time::timeout(Duration::from_secs(5), third)
        .await
        .expect("served once a slot freed")
        .unwrap();
    assert_eq!(status, 200);
    drop(idle);
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test]
async fn a_40_mib_body_is_refused_before_it_is_buffered() {
    const LEN: usize = 40 * 1024 * 1024;
    let h = harness(|_| {}).await;
    let before = rss_kib();
    // Freed buffers go back to the OS at once (large allocations are mmapped), so sample the
    // peak while the body streams in, not the level afterwards.
    let sampling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = std::thread::spawn({
        let sampling = sampling.clone();
        move || {
            let mut peak = 0;
            while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(rss_kib());
                std::thread::sleep(Duration::from_millis(1));
            }
            peak
        }
    });
    // Declared length: refused at once, before a byte of the body is read.
    let mut stream = TcpStream::connect(h.addr).await.unwrap();
    stream.write_all(head(LEN).as_bytes()).await.unwrap();
    let chunk = vec![b' '; 1024 * 1024];
    let writer = async {
        for _ in 0..40 {
            if stream.write_all(&chunk).await.is_err() {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
    let (reply, _) = read_until_closed(&mut stream, Duration::from_secs(5)).await;
    assert!(
        reply.starts_with("HTTP/1.1 413"),
        "{}",
        &reply[..reply.len().min(200)]
    );
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    let grew_mib = sampler.join().unwrap().saturating_sub(before) / 1024;
    assert!(grew_mib < 16, "RSS grew by {grew_mib} MiB");

    // Chunked, no declared length: refused as soon as it passes the limit while streaming.
    let mut stream = TcpStream::connect(h.addr).await.unwrap();
    stream
        .write_all(b"POST /v1/messages HTTP/1.1\r\nhost: proxy\r\nanthropic-version: 2023-06-01\r\ntransfer-encoding: chunked\r\n\r\n")
        .await
        .unwrap();
    let mut sent = 0;
    while sent < LEN {
        let frame = format!("{:x}\r\n", chunk.len());
        if stream.write_all(frame.as_bytes()).await.is_err()
            || stream.write_all(&chunk).await.is_err()
            || stream.write_all(b"\r\n").await.is_err()
        {
            break;
        }
        sent += chunk.len();
    }
    let (reply, _) = read_until_closed(&mut stream, Duration::from_secs(5)).await;
    assert!(
        reply.starts_with("HTTP/1.1 413"),
        "{}",
        &reply[..reply.len().min(200)]
    );
    assert!(h.fake.received().is_empty());
    let audit = h.wait_audit(2).await;
    assert!(audit.iter().all(|l| l["status"] == 413));
}

#[tokio::test]
async fn shutdown_cuts_requests_waiting_for_the_upstream() {
    for http2 in [false, true] {
        let mut h = harness(|s| s.shutdown_grace = Duration::from_millis(300)).await;
        h.fake.set_response_delay(Duration::from_secs(5));
        let client: HttpClient =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .http2_only(http2)
                .build_http();
        let url = h.url();
        let pending = tokio::spawn(async move {
            let request = http::Request::post(format!("{url}/v1/messages"))
                .header("anthropic-version", "2023-06-01")
                .body(http_body_util::Full::new(bytes::Bytes::from(
                    message("hi", false).to_string(),
                )))
                .unwrap();
            let _ = client.request(request).await;
        });
        eventually(|| !h.fake.received().is_empty()).await;
        h.shutdown().await;
        // Written before the proxy returned, not when the upstream answers seconds later.
        let audit = h.audit_lines();
        assert_eq!(audit.len(), 1, "http2={http2}: {audit:?}");
        assert_eq!(audit[0]["outcome"], "shutdown", "http2={http2}");
        pending.abort();
    }
}

/// A kept-alive HTTP/1 connection of its own (no pool in between, so the test sees exactly
/// which connection each request used); its task ends when the server closes it.
async fn h1_connection(
    addr: std::net::SocketAddr,
) -> (
    hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>,
    tokio::task::JoinHandle<()>,
) {
    let io = hyper_util::rt::TokioIo::new(TcpStream::connect(addr).await.unwrap());
    let (sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
    (
        sender,
        tokio::spawn(async move { conn.await.expect("closed cleanly") }),
    )
}

/// Status and whether the answer said `Connection: close`.
async fn post_message(
    sender: &mut hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>,
) -> (u16, bool) {
    let request = http::Request::post("/v1/messages")
        .header("host", "proxy")
        .header("anthropic-version", "2023-06-01")
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            message("hi", false).to_string(),
        )))
        .unwrap();
    let response = sender
        .send_request(request)
        .await
        .expect("answered, not cut");
    let close = response
        .headers()
        .get(http::header::CONNECTION)
        .is_some_and(|v| v == "close");
    let status = response.status().as_u16();
    let _ = http_body_util::BodyExt::collect(response.into_body()).await;
    (status, close)
}

#[tokio::test]
async fn a_shutdown_delay_drains_connections_cleanly_and_requests_in_flight_finish() {
    let delay = Duration::from_millis(800);
    let mut h = harness(|s| s.shutdown_delay = delay).await;
    let addr = h.addr;
    let (mut pooled, pooled_closed) = h1_connection(addr).await;
    assert_eq!(post_message(&mut pooled).await, (200, false));
    h.fake.set_response_delay(Duration::from_millis(1200));
    let (mut busy, busy_closed) = h1_connection(addr).await;
    let in_flight = tokio::spawn(async move { post_message(&mut busy).await });
    tokio::time::sleep(Duration::from_millis(200)).await;

    let started = Instant::now();
    let clients = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        // The pooled connection's next answer closes it; a new connection is still served.
        let (fresh_sender, fresh_closed) = h1_connection(addr).await;
        let mut fresh_sender = fresh_sender;
        let (pooled_answer, fresh_answer) =
            tokio::join!(post_message(&mut pooled), post_message(&mut fresh_sender));
        (pooled_answer, fresh_answer, fresh_closed)
    };
    let ((), (pooled_answer, fresh_answer, fresh_closed)) = tokio::join!(h.shutdown(), clients);
    assert!(started.elapsed() >= delay, "stopped before the delay");
    assert_eq!(pooled_answer, (200, true));
    assert_eq!(fresh_answer, (200, true));
    assert_eq!(
        in_flight.await.unwrap(),
        (200, true),
        "the request in flight"
    );
    for closed in [pooled_closed, busy_closed, fresh_closed] {
        tokio::time::timeout(Duration::from_secs(2), closed)
            .await
            .expect("closed after its last answer")
            .unwrap();
    }
    assert!(TcpStream::connect(addr).await.is_err(), "listener closed");
    assert_eq!(
        h.audit_lines().len(),
        4,
        "every request answered and audited"
    );
}
