//! What the proxy holds in memory stays bounded under load: request bodies (and the JSON parsed
//! from them) in one body budget shared by every connection, and audit lines in a bounded
//! queue that holds requests back when the audit log stops taking them.

use std::time::Duration;

use claudekey::proxy::{AuditTarget, Mode};
use serde_json::json;
use tokio::{io::AsyncWriteExt, net::TcpStream};

use super::{
    bounds::{harness, head, limits, read_until_closed},
    proxy_common::*,
};

/// The bodies held at once are bounded across connections: a slow large body holds only what
/// it sent, another large one is refused with a retryable 503 while it does, a body of the
/// small reserve still passes, a body whose JSON tree could never fit is a 413 the client need
/// not retry, and closing the slow connection gives its bytes back.
#[tokio::test]
async fn request_bodies_share_one_budget_across_connections() {
    const MIB: usize = 1024 * 1024;
    // 8 MiB: 1 MiB kept for bodies declared at most 1 MiB, 7 MiB for one large body.
    let h = harness(limits(|l| l.body_budget = 8 * MIB)).await;
    assert_eq!(budget_metric(&h, "limit"), Some(8 * MIB));
    let (c, url) = (client(), h.url());
    // 1.25 MiB: a large body (more than 1 MiB declared).
    let large = message(&"word ".repeat(MIB / 4), false);

    // A client sends 6.5 MiB of a declared 6.9 MiB body, then stalls.
    let mut slow = TcpStream::connect(h.addr).await.unwrap();
    slow.write_all(head(6_900_000).as_bytes()).await.unwrap();
    let chunk = vec![b' '; 64 * 1024];
    for _ in 0..104 {
        slow.write_all(&chunk).await.unwrap();
    }
    eventually(|| body_budget_held(&h) == Some(104 * 64 * 1024)).await;

    let r = send(&c, &url, "POST", "/v1/messages", None, Some(large.clone())).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["error"]["type"], "api_error");
    assert!(r.text().contains("retry"));
    assert!(!r.headers.contains_key("x-should-retry"), "retryable");

    // 6.5 + 1.25 MiB is past the large share (7 MiB), not the whole budget: the 503 above
    // says the reserve is kept. 6.5 + 0.6 MiB is past it too: a declared small body uses
    // the reserve.
    let small = message(&"word ".repeat(MIB * 6 / 50), false);
    let r = send(&c, &url, "POST", "/v1/messages", None, Some(small)).await;
    assert_eq!(r.status, 200, "{}", r.text());

    // 200,000 values build a tree of ~9 MiB: more than one body may ever hold.
    let values = format!("[{}0]", "0,".repeat(200_000));
    let response = post_messages(&c, &url, values).await;
    assert_eq!(response.status(), 413);
    assert_eq!(response.headers()["x-should-retry"], "false");

    // The stalled client goes away: its bytes come back, and the large body passes.
    drop(slow);
    let mut passed = false;
    for _ in 0..50 {
        let r = send(&c, &url, "POST", "/v1/messages", None, Some(large.clone())).await;
        if r.status == 200 {
            passed = true;
            break;
        }
        assert_eq!(r.status, 503, "{}", r.text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(passed, "the closed connection's bytes were not given back");
    eventually(|| body_budget_held(&h) == Some(0)).await;
    let statuses: Vec<_> = h
        .audit_lines()
        .iter()
        .map(|l| l["status"].clone())
        .collect();
    assert!(
        statuses.contains(&json!(503)) && statuses.contains(&json!(413)),
        "{statuses:?}"
    );
    assert_eq!(
        h.fake.received().len(),
        2,
        "refused bodies never reach the upstream"
    );

    // Once the upstream has answered, the body is done with: a long answer holds nothing.
    h.fake.set_chunk_chars(5);
    h.fake.set_delta_delay(Duration::from_millis(100));
    let streamed = message(&"word ".repeat(MIB / 4), true).to_string();
    let response = post_messages(&c, &url, streamed).await;
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let _ = http_body_util::BodyExt::frame(&mut body).await;
    assert_eq!(
        body_budget_held(&h),
        Some(0),
        "held while the answer streams"
    );
    let rest = http_body_util::BodyExt::collect(body)
        .await
        .unwrap()
        .to_bytes();
    assert!(String::from_utf8_lossy(&rest).contains("message_stop"));
}

/// `POST /v1/messages` with `body` as it is (not necessarily a Messages request); the response
/// with its body unread.
async fn post_messages(
    client: &HttpClient,
    url: &str,
    body: String,
) -> http::Response<hyper::body::Incoming> {
    let request = http::Request::post(format!("{url}/v1/messages"))
        .header("anthropic-version", "2023-06-01")
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .unwrap();
    client.request(request).await.unwrap()
}

/// What the proxy's body budget holds, from its metrics.
fn body_budget_held(h: &Harness) -> Option<usize> {
    budget_metric(h, "used")
}

/// `claudekey_proxy_body_budget_{which}_bytes`.
fn budget_metric(h: &Harness, which: &str) -> Option<usize> {
    let scrape = h.proxy.metrics.encode();
    scraped(
        &scrape,
        &format!("claudekey_proxy_body_budget_{which}_bytes"),
    )
}

/// The value of the unlabelled series `name` in a scrape.
fn scraped<T: std::str::FromStr>(scrape: &str, name: &str) -> Option<T> {
    let prefix = format!("{name} ");
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.parse().ok())
}

/// A gateway reads a body only for a request whose workload key it knows: a client without
/// one is answered 401 from its headers and holds nothing of the body budget.
#[tokio::test]
async fn an_unauthenticated_client_holds_nothing_of_the_body_budget() {
    let h = Harness::start(Mode::Gateway, &[UPSTREAM_A], |dir| {
        let json = proxy_json(
            "bot",
            &[(UPSTREAM_A, None)],
            &[(WORKLOAD_A, None)],
            json!({}),
        );
        kubelet_write(&dir.join("bot"), &json);
    })
    .await;
    let mut stream = TcpStream::connect(h.addr).await.unwrap();
    let head = head(8 * 1024 * 1024).replace("\r\n\r\n", "\r\nx-api-key: ck_live_guess\r\n\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    let _ = stream.write_all(&vec![b' '; 4 * 1024 * 1024]).await;
    let (reply, _) = read_until_closed(&mut stream, Duration::from_secs(5)).await;
    assert!(
        reply.starts_with("HTTP/1.1 401"),
        "{}",
        &reply[..reply.len().min(200)]
    );
    assert_eq!(body_budget_held(&h), Some(0));
    assert_eq!(h.wait_audit(1).await[0]["status"], 401);
}

/// An audit log that stops taking lines (a log pipe nobody reads) holds new requests back once
/// the audit writer's queue is full, instead of the proxy queueing lines until it is killed;
/// meanwhile the proxy's runtime runs on (its probe and metrics answer, here on the one thread
/// a one-core sidecar has), and once the log takes lines again every request finishes, each audited once.
#[tokio::test]
async fn a_stalled_audit_log_holds_requests_back_and_loses_no_line() {
    use std::{
        os::unix::fs::OpenOptionsExt,
        sync::{
            Arc,
            atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst},
        },
    };
    // More than the pipe (64 KiB, ~100 lines), one batch in the writer's hands and its queue
    // (a queue's worth each) can take.
    const CLIENTS: usize = 8;
    let requests =
        (2 * claudekey::proxy::audit_sink::queue_size() + 1_000).next_multiple_of(CLIENTS);
    let logs = tempfile::tempdir().unwrap();
    let fifo = logs.path().join("audit.fifo");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status();
    assert!(made.unwrap().success(), "mkfifo failed");
    // The read end, open before the proxy opens the write end and not read until the stall
    // has been seen (or, should the runtime stop and never see it, for 10 s).
    let mut log = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(0o4000) // O_NONBLOCK: no writer yet
        .open(&fifo)
        .unwrap();
    let h = harness(|s| s.audit = AuditTarget::File(fifo.clone())).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = format!("http://{}", listener.local_addr().unwrap());
    let proxy = h.proxy.clone();
    tokio::spawn(async move { proxy.serve_admin(listener, std::future::pending()).await });
    let release = Arc::new(AtomicBool::new(false));
    let reader = std::thread::spawn({
        let release = release.clone();
        move || {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while !release.load(SeqCst) && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            String::from_utf8(read_lines(&mut log, requests, Duration::from_secs(120))).unwrap()
        }
    });
    let done = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (url, done) = (h.url(), done.clone());
            tokio::spawn(async move {
                let client = client();
                for _ in 0..requests / CLIENTS {
                    let r = post_messages(&client, &url, message("hi", false).to_string()).await;
                    assert_eq!(r.status(), 200);
                    done.fetch_add(1, SeqCst);
                }
            })
        })
        .collect();
    // Watched from this task, on the proxy's own thread: requests stop, the thread does not.
    let mut seen = (0, std::time::Instant::now());
    let stalled_at = loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = done.load(SeqCst);
        if now == requests {
            break None;
        }
        if now != seen.0 {
            seen = (now, std::time::Instant::now());
        } else if seen.1.elapsed() > Duration::from_secs(1) {
            break Some(now);
        }
    };
    // The kubelet's probe and Prometheus's scrape are answered meanwhile.
    let c = client();
    let healthz = send(&c, &admin, "GET", "/healthz", None, None).await;
    let scrape = send(&c, &admin, "GET", "/metrics", None, None).await.text();
    let (waited, waiting) = (
        audit_metric(&scrape, "queue_full_total"),
        audit_metric(&scrape, "waiting_requests"),
    );
    release.store(true, SeqCst);
    for c in clients {
        c.await.unwrap();
    }
    let text = reader.join().unwrap();
    let stalled_at = stalled_at.expect("requests were not held back while the runtime ran");
    assert!(stalled_at < requests);
    assert_eq!(healthz.status, 200);
    assert!(
        waited > 0,
        "no request counted as waiting while they were held back"
    );
    // Every client has one request at the door, or on its way to it.
    assert!((1..=CLIENTS as u64).contains(&waiting), "{waiting} waiting");
    let scrape = h.proxy.metrics.encode();
    assert_eq!(audit_metric(&scrape, "waiting_requests"), 0);
    let statuses: Vec<u64> = text
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["status"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(statuses, vec![200; requests], "every request audited once");
}

/// An audit log pipe that breaks (its reader gone: every write fails with EPIPE) loses no line:
/// requests go on while the queue has room, each failed try is counted, and once the pipe is
/// read again every line arrives, once.
#[tokio::test]
async fn a_broken_audit_pipe_loses_no_line_once_it_is_read_again() {
    use std::{io::Read, os::unix::fs::OpenOptionsExt};
    const REQUESTS: usize = 40;
    let logs = tempfile::tempdir().unwrap();
    let fifo = logs.path().join("audit.fifo");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status();
    assert!(made.unwrap().success(), "mkfifo failed");
    let open_reader = || {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(0o4000) // O_NONBLOCK: the writer may not be there yet
            .open(&fifo)
            .unwrap()
    };
    // The proxy opens the write end while a reader is there; then the reader goes.
    let first_reader = open_reader();
    let h = harness(|s| s.audit = AuditTarget::File(fifo.clone())).await;
    drop(first_reader);
    let client = client();
    for _ in 0..REQUESTS {
        let r = post_messages(&client, &h.url(), message("hi", false).to_string()).await;
        assert_eq!(r.status(), 200);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while audit_metric(&h.proxy.metrics.encode(), "write_failures_total") == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no failed write counted"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut log = open_reader();
    let text = tokio::task::spawn_blocking(move || {
        let mut text = read_lines(&mut log, REQUESTS, Duration::from_secs(10));
        // Nothing more comes (no line twice).
        std::thread::sleep(Duration::from_millis(200));
        let mut buf = [0u8; 65536];
        if let Ok(n) = log.read(&mut buf) {
            text.extend_from_slice(&buf[..n]);
        }
        String::from_utf8(text).unwrap()
    })
    .await
    .unwrap();
    let ids: std::collections::BTreeSet<String> = text
        .lines()
        .map(|l| {
            let line: serde_json::Value = serde_json::from_str(l).unwrap();
            assert_eq!(line["status"], 200);
            line["requestId"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(text.lines().count(), REQUESTS, "every request audited once");
    assert_eq!(ids.len(), REQUESTS);
}

/// Reads a non-blocking FIFO until `lines` lines have come; fails after `within`.
fn read_lines(log: &mut std::fs::File, lines: usize, within: Duration) -> Vec<u8> {
    use std::io::Read;
    let (mut text, mut buf) = (Vec::new(), [0u8; 65536]);
    let deadline = std::time::Instant::now() + within;
    while text.iter().filter(|b| **b == b'\n').count() < lines {
        assert!(std::time::Instant::now() < deadline, "audit lines missing");
        match log.read(&mut buf) {
            Ok(n) if n > 0 => text.extend_from_slice(&buf[..n]),
            _ => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    text
}

/// `claudekey_proxy_audit_{name}` in a scrape (0 when absent).
fn audit_metric(scrape: &str, name: &str) -> u64 {
    scraped(scrape, &format!("claudekey_proxy_audit_{name}")).unwrap_or(0)
}
