//! The webhook binary under a flood (issue 15, item 7): 50 concurrent 8 MiB AdmissionReviews
//! (declared and chunked), large valid reviews, clients that never finish their headers and
//! clients that trickle their bodies. It fails closed, so it must neither run out of memory
//! (peak RSS stays under the chart's 128Mi limit) nor stop answering real reviews.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;

use super::{install_pki, new_pki, raw_key, support};

const MIB: usize = 1024 * 1024;
/// The chart's memory limit of the webhook container (values.yaml webhook.resources).
const CHART_MEMORY_LIMIT: u64 = 128 * MIB as u64;

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

struct Server {
    child: Child,
    port: u16,
    ca_pem: String,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// `VmHWM` (peak resident set) of the webhook process, in bytes.
    fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("read /proc/<pid>/status");
        let line = status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .expect("VmHWM");
        let kib: u64 = line
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .expect("VmHWM value");
        kib * 1024
    }

    async fn connect(&self) -> std::io::Result<Tls> {
        use rustls_pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pki_types::CertificateDer::pem_slice_iter(self.ca_pem.as_bytes()) {
            roots.add(cert.expect("CA pem")).expect("CA");
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        // Each connection from the next of 250 loopback addresses, as a flood from many pods
        // would come: one address gets at most 64 connections (`MAX_CONNECTIONS_PER_CLIENT`),
        // which a flood from one address meets before anything measured here.
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let host = (NEXT.fetch_add(1, Ordering::Relaxed) % 250) as u8 + 1;
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(std::net::SocketAddr::from(([127, 0, 1, host], 0)))?;
        let tcp = socket
            .connect(std::net::SocketAddr::from(([127, 0, 0, 1], self.port)))
            .await?;
        let name = rustls_pki_types::ServerName::try_from("127.0.0.1").expect("name");
        connector.connect(name, tcp).await
    }
}

/// Starts `claudekey webhook` as its own process (so its memory is its own), against the test
/// control plane's kubeconfig.
async fn start() -> Server {
    let client = support::client().await;
    support::install_crd(&client).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = new_pki("claudekey flood CA");
    let (cert, key) = install_pki(dir.path(), &pki);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let kubeconfig = std::env::var(support::KUBECONFIG_ENV).expect("kubeconfig");
    let child = Command::new(env!("CARGO_BIN_EXE_claudekey"))
        .arg("webhook")
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .arg("--tls-cert-file")
        .arg(&cert)
        .arg("--tls-key-file")
        .arg(&key)
        .args(["--proxy-image", "registry.example/claudekey:flood"])
        .env("KUBECONFIG", kubeconfig)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start claudekey webhook");
    let server = Server {
        child,
        port,
        ca_pem: pki.ca_pem,
        _dir: dir,
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(status) = real_review(&server).await {
            assert_eq!(status, 200);
            return server;
        }
        assert!(Instant::now() < deadline, "the webhook did not come up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn review_body(object: serde_json::Value) -> Vec<u8> {
    json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
        "uid": "7f1c6c2e-2d0e-4f7e-9f5c-0a0b0c0d0e0f",
        "kind": {"group": "apps", "version": "v1", "kind": "Deployment"},
        "resource": {"group": "apps", "version": "v1", "resource": "deployments"},
        "name": "real", "namespace": "flood", "operation": "CREATE",
        "userInfo": {"username": "tester"}, "object": object}})
    .to_string()
    .into_bytes()
}

fn deployment(annotation: String) -> serde_json::Value {
    json!({"apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "real", "namespace": "flood", "annotations": {"note": annotation}},
        "spec": {"selector": {"matchLabels": {"a": "b"}}, "template": {"metadata": {"labels": {"a": "b"}},
            "spec": {"containers": [{"name": "app", "image": "a", "env": [{"name": "K", "value": raw_key()}]}]}}}})
}

/// Reads the status code of a response, or fails.
async fn status_of(tls: &mut Tls) -> std::io::Result<u16> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n") {
        if tls.read(&mut byte).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        head.push(byte[0]);
    }
    let line = String::from_utf8_lossy(&head);
    line.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::ErrorKind::InvalidData.into())
}

/// A real review: a Deployment with a raw key, which must be answered (and denied).
async fn real_review(server: &Server) -> std::io::Result<u16> {
    let body = review_body(deployment(String::new()));
    let mut tls = server.connect().await?;
    let head = format!(
        "POST /validate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    tls.write_all(head.as_bytes()).await?;
    tls.write_all(&body).await?;
    let status = status_of(&mut tls).await?;
    let mut rest = String::new();
    tls.read_to_string(&mut rest).await?;
    if status == 200 && !rest.contains("\"allowed\":false") {
        return Err(std::io::ErrorKind::InvalidData.into());
    }
    Ok(status)
}

/// Sends `total` bytes of body (declared, or chunked when `declared` is false) while reading
/// the answer; returns the status, or 0 when the server closed the connection instead.
async fn big_upload(server: &Server, total: usize, declared: bool) -> u16 {
    let Ok(tls) = server.connect().await else {
        return 0;
    };
    let (mut rd, mut wr) = tokio::io::split(tls);
    let writer = tokio::spawn(async move {
        let framing = if declared {
            format!("Content-Length: {total}\r\n")
        } else {
            "Transfer-Encoding: chunked\r\n".to_string()
        };
        let head = format!(
            "POST /validate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{framing}\r\n"
        );
        wr.write_all(head.as_bytes()).await?;
        let chunk = vec![b' '; 64 * 1024];
        for _ in 0..total / chunk.len() {
            if declared {
                wr.write_all(&chunk).await?;
            } else {
                wr.write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
                    .await?;
                wr.write_all(&chunk).await?;
                wr.write_all(b"\r\n").await?;
            }
        }
        if !declared {
            wr.write_all(b"0\r\n\r\n").await?;
        }
        Ok::<_, std::io::Error>(())
    });
    let mut head = [0u8; 12];
    let status = match tokio::time::timeout(Duration::from_secs(30), rd.read_exact(&mut head)).await
    {
        Ok(Ok(_)) => String::from_utf8_lossy(&head[9..12]).parse().unwrap_or(0),
        _ => 0,
    };
    writer.abort();
    status
}

/// A valid review just under the body limit (a 5 MiB annotation); the status, or 0 when the
/// connection failed before any answer.
async fn large_valid_review(server: &Server) -> u16 {
    let body = review_body(deployment("n".repeat(5 * MIB)));
    let Ok(tls) = server.connect().await else {
        return 0;
    };
    let (mut rd, mut wr) = tokio::io::split(tls);
    let writer = tokio::spawn(async move {
        let head = format!(
            "POST /validate HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        wr.write_all(head.as_bytes()).await?;
        wr.write_all(&body).await?;
        Ok::<_, std::io::Error>(wr)
    });
    let mut head = [0u8; 12];
    let status = match tokio::time::timeout(Duration::from_secs(30), rd.read_exact(&mut head)).await
    {
        Ok(Ok(_)) => String::from_utf8_lossy(&head[9..12]).parse().unwrap_or(0),
        _ => 0,
    };
    writer.abort();
    status
}

/// Sends `prefix` and then nothing; returns how long until the server hung up (or None).
async fn stall(server: &Server, prefix: &'static [u8]) -> Option<Duration> {
    let mut tls = server.connect().await.ok()?;
    let started = Instant::now();
    tls.write_all(prefix).await.ok()?;
    let mut sink = Vec::new();
    match tokio::time::timeout(Duration::from_secs(30), tls.read_to_end(&mut sink)).await {
        Ok(_) => Some(started.elapsed()),
        Err(_) => None,
    }
}

// Two runtime threads: on one, the test's own uploads (TLS of a debug build), prober and stalled
// connections starve each other on a loaded machine, and the prober's or a large review's
// deadline measures the client, not the webhook (one busy loop per core: 6 of 8 runs failed on
// one thread, 0 of 5 on two).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_leaves_memory_bounded_and_real_reviews_answered() {
    claudekey::crypto::install_default_provider();
    let server = Arc::new(start().await);
    let baseline = server.peak_rss();

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let answered = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let prober = {
        let (server, stop, answered, failed) = (
            server.clone(),
            stop.clone(),
            answered.clone(),
            failed.clone(),
        );
        tokio::spawn(async move {
            while !stop.load(Ordering::Acquire) {
                let started = Instant::now();
                match tokio::time::timeout(Duration::from_secs(5), real_review(&server)).await {
                    Ok(Ok(200)) => {
                        answered.fetch_add(1, Ordering::AcqRel);
                    }
                    other => failed
                        .lock()
                        .expect("lock")
                        .push(format!("{other:?} after {:?}", started.elapsed())),
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    let mut flood = JoinSet::new();
    for i in 0..50 {
        let s = server.clone();
        flood.spawn(async move { ("declared 8 MiB", big_upload(&s, 8 * MIB, true).await, i) });
        let s = server.clone();
        flood.spawn(async move { ("chunked 8 MiB", big_upload(&s, 8 * MIB, false).await, i) });
    }
    let mut stalls = JoinSet::new();
    for _ in 0..100 {
        let s = server.clone();
        stalls.spawn(async move {
            (
                "headers",
                stall(&s, b"POST /validate HTTP/1.1\r\nHost: x\r\n").await,
            )
        });
    }
    for _ in 0..20 {
        let s = server.clone();
        stalls.spawn(async move {
            (
                "body",
                stall(
                    &s,
                    b"POST /validate HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n{\"apiV",
                )
                .await,
            )
        });
    }

    let mut statuses = std::collections::BTreeMap::<(&str, u16), usize>::new();
    while let Some(done) = flood.join_next().await {
        let (what, status, _) = done.expect("flood task");
        *statuses.entry((what, status)).or_default() += 1;
    }
    // Then large valid reviews, all at once: those the budget holds are parsed and answered,
    // the rest refused at once; parsing them is what costs memory beyond the bodies.
    for i in 0..12 {
        let s = server.clone();
        flood.spawn(async move { ("valid 5 MiB", large_valid_review(&s).await, i) });
    }
    while let Some(done) = flood.join_next().await {
        let (what, status, _) = done.expect("flood task");
        *statuses.entry((what, status)).or_default() += 1;
    }
    while let Some(done) = stalls.join_next().await {
        let (what, closed) = done.expect("stall task");
        let closed =
            closed.unwrap_or_else(|| panic!("a stalled {what} connection was never closed"));
        let limit = if what == "headers" { 5 } else { 10 };
        assert!(
            closed <= Duration::from_secs(limit + 5),
            "stalled {what} closed after {closed:?}"
        );
    }
    stop.store(true, Ordering::Release);
    prober.await.expect("prober");

    let peak = server.peak_rss();
    eprintln!(
        "flood: statuses {statuses:?}; real reviews answered {}; peak RSS {} MiB (baseline {} MiB)",
        answered.load(Ordering::Acquire),
        peak / MIB as u64,
        baseline / MIB as u64
    );
    for ((what, status), n) in &statuses {
        let expected: &[u16] = match *what {
            "declared 8 MiB" => &[413],
            "chunked 8 MiB" => &[413, 503],
            // 408: a body that took longer than `BODY_READ_TIMEOUT` to arrive. Twelve 5 MiB
            // bodies encrypted at once by this (debug) test process, on the two cores the
            // server uses, once left one 10 s short (2026-12-03); the server's slow-body refusal
            // is then right, and the apiserver treats it as any failed call.
            _ => &[200, 503, 408],
        };
        assert!(expected.contains(status), "{n} × {what} got {status}");
    }
    assert!(
        statuses.contains_key(&("valid 5 MiB", 200)),
        "large valid reviews are served when there is room: {statuses:?}"
    );
    let failed = failed.lock().expect("lock").clone();
    assert!(
        failed.is_empty(),
        "real reviews failed during the flood: {failed:?}"
    );
    assert!(
        answered.load(Ordering::Acquire) >= 10,
        "the prober ran throughout"
    );
    assert!(
        peak < CHART_MEMORY_LIMIT,
        "peak RSS {} MiB reaches the chart's limit",
        peak / MIB as u64
    );
    // And it still answers afterwards.
    assert_eq!(
        real_review(&server)
            .await
            .expect("a review after the flood"),
        200
    );
}
