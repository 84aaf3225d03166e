//! The floor of a forward in Rust, for `hack/bench.sh`'s streaming row: hyper's server and
//! client on tokio's single-threaded runtime, as the proxy runs them (HTTP/1 and HTTP/2 served,
//! HTTP/1 upstream with TCP_NODELAY, the request body read whole, the response streamed), and
//! nothing else: no authentication, no policy, no audit, no metrics. The client's `x-api-key`
//! is replaced by `--key`.
//!
//! Set beside nginx and the proxy it splits a stream's added time to first byte into what the
//! HTTP stack costs and what claudekey's own work on the request and the response costs
//! (docs/benchmarks-notes.md).
//! Runs only against loopback addresses.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use anyhow::Context as _;
use bytes::Bytes;
use clap::Parser;
use http::{HeaderValue, Request, Response};
use http_body_util::{BodyExt as _, Full, combinators::UnsyncBoxBody};
use hyper::{body::Incoming, client::conn::http1, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::net::{TcpListener, TcpStream};

#[derive(Parser)]
#[command(about = "A bare hyper forward: the HTTP stack's share of a proxy's added latency")]
struct Args {
    #[arg(long)]
    listen: SocketAddr,
    /// `host:port` of a plain-HTTP upstream on loopback.
    #[arg(long)]
    upstream: SocketAddr,
    /// Sent upstream as x-api-key.
    #[arg(long)]
    key: String,
}

type Body = UnsyncBoxBody<Bytes, hyper::Error>;

/// Idle upstream senders, newest last (the proxy's pool, without its expiry and resend).
type Idle = Arc<Mutex<Vec<http1::SendRequest<Body>>>>;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.listen.ip().is_loopback() && args.upstream.ip().is_loopback(),
        "loopback addresses only"
    );
    let mut key = HeaderValue::from_str(&args.key).context("--key must be a header value")?;
    key.set_sensitive(true);
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(serve(args.listen, args.upstream, key))
}

async fn serve(listen: SocketAddr, upstream: SocketAddr, key: HeaderValue) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    let idle = Idle::default();
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        let (idle, key) = (idle.clone(), key.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req| forward(req, upstream, key.clone(), idle.clone()));
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn forward(
    req: Request<Incoming>,
    upstream: SocketAddr,
    key: HeaderValue,
    idle: Idle,
) -> anyhow::Result<Response<Body>> {
    let (mut parts, body) = req.into_parts();
    let body = body.collect().await?.to_bytes();
    parts.headers.insert("x-api-key", key);
    let request = Request::from_parts(
        parts,
        Full::new(body).map_err(|n| match n {}).boxed_unsync(),
    );
    let newest = idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
    let mut sender = match newest {
        Some(sender) => sender,
        None => {
            let tcp = TcpStream::connect(upstream).await?;
            tcp.set_nodelay(true)?;
            let (sender, connection) = http1::handshake(TokioIo::new(tcp)).await?;
            tokio::spawn(connection);
            sender
        }
    };
    let response = sender.send_request(request).await?;
    // Back on the stack once this response's body has been read to its end.
    tokio::spawn(async move {
        if sender.ready().await.is_ok() {
            idle.lock().unwrap_or_else(|e| e.into_inner()).push(sender);
        }
    });
    Ok(response.map(|body| body.boxed_unsync()))
}
