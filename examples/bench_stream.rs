//! Streaming benchmark client for `hack/bench.sh`: opens `--streams` SSE Messages requests
//! (`--concurrency` at a time) against `--url` and prints one JSON line with time-to-first-byte
//! and the gaps between consecutive `content_block_delta` events, as percentiles in µs.
//!
//! Against a paced upstream (e.g. 64 deltas 20 ms apart) the gaps should sit at the pace; a
//! ~40 ms tail is the signature of Nagle's algorithm meeting delayed ACKs (TCP_NODELAY missing on
//! one side). Runs only against loopback addresses.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};

#[derive(Parser)]
#[command(about = "Time-to-first-byte and per-delta gaps of SSE Messages streams")]
struct Args {
    /// Base URL (without /v1), e.g. http://127.0.0.1:9999.
    #[arg(long)]
    url: String,
    /// Sent as x-api-key.
    #[arg(long)]
    key: String,
    /// Streams in total.
    #[arg(long, default_value_t = 32)]
    streams: usize,
    /// Streams open at once.
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Streams run first and not counted, so every measured stream reuses a warm connection
    /// (a TCP handshake through the proxy to the upstream is not time-to-first-byte).
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// The request's max_tokens. A small one against an upstream that stops there
    /// (`fake_upstream --stop-at-max-tokens`) makes each stream a few events long, so a run can
    /// afford the hundreds of streams a TTFB p99 needs.
    #[arg(long, default_value_t = 1024)]
    max_tokens: u32,
    /// Milliseconds of quiet before each measured stream (batch): the proxy's core sits idle and
    /// its caches go cold, as they do before a user's next request after a stream ends.
    #[arg(long, default_value_t = 0)]
    pause_ms: u64,
    /// An extra request header, `NAME: VALUE` (repeatable): a peer gateway that takes its
    /// routing config per request (Portkey's `x-portkey-config`).
    #[arg(long = "header")]
    headers: Vec<String>,
}

fn request_body(max_tokens: u32) -> Bytes {
    Bytes::from(format!(
        r#"{{"model":"claude-sonnet-4-5","max_tokens":{max_tokens},"stream":true,"messages":[{{"role":"user","content":"Write a short story about a lighthouse keeper."}}]}}"#
    ))
}

/// What one stream measured.
struct Sample {
    ttfb: Duration,
    gaps: Vec<Duration>,
    deltas: usize,
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

async fn one(
    client: &HttpClient,
    url: &str,
    key: &str,
    headers: &[(String, String)],
    body: Bytes,
) -> anyhow::Result<Sample> {
    let mut request = http::Request::post(format!("{url}/v1/messages"))
        .header("x-api-key", key)
        .header("anthropic-version", "2023-06-01")
        .header("content-type", "application/json");
    for (name, value) in headers {
        request = request.header(name, value);
    }
    let request = request.body(Full::new(body))?;
    let start = Instant::now();
    let response = client.request(request).await.context("request failed")?;
    if !response.status().is_success() {
        bail!("status {}", response.status());
    }
    let mut body = response.into_body();
    let mut ttfb = None;
    let mut last_delta: Option<Instant> = None;
    let mut gaps = Vec::with_capacity(64);
    let mut deltas = 0;
    while let Some(frame) = body.frame().await {
        let frame = frame.context("stream broke off")?;
        let Some(data) = frame.data_ref() else {
            continue;
        };
        let now = Instant::now();
        ttfb.get_or_insert(now - start);
        // Both the fake upstream and the proxy write whole events, so an event line is never
        // split across frames.
        let n = count(data, b"event: content_block_delta\n");
        for _ in 0..n {
            if let Some(previous) = last_delta {
                gaps.push(now - previous);
            }
            last_delta = Some(now);
            deltas += 1;
        }
    }
    Ok(Sample {
        ttfb: ttfb.unwrap_or_default(),
        gaps,
        deltas,
    })
}

fn count(haystack: &[u8], needle: &[u8]) -> usize {
    haystack
        .windows(needle.len())
        .filter(|w| *w == needle)
        .count()
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)].as_secs_f64() * 1e6
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let host = args
        .url
        .strip_prefix("http://")
        .context("--url must be http://")?;
    if !(host.starts_with("127.") || host.starts_with("localhost") || host.starts_with("[::1]")) {
        bail!("the benchmark client only talks to loopback addresses");
    }
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: HttpClient = Client::builder(TokioExecutor::new()).build(connector);
    let headers = args
        .headers
        .iter()
        .map(|h| {
            let (name, value) = h.split_once(':').context("--header must be NAME: VALUE")?;
            Ok((name.trim().to_owned(), value.trim().to_owned()))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let body = request_body(args.max_tokens);
    let mut ttfbs = Vec::new();
    let mut gaps = Vec::new();
    let mut deltas = Vec::new();
    for _ in 0..args.warmup {
        one(&client, &args.url, &args.key, &headers, body.clone()).await?;
    }
    let mut remaining = args.streams;
    while remaining > 0 {
        let batch = remaining.min(args.concurrency.max(1));
        remaining -= batch;
        if args.pause_ms > 0 {
            tokio::time::sleep(Duration::from_millis(args.pause_ms)).await;
        }
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..batch {
            let (client, url, key) = (client.clone(), args.url.clone(), args.key.clone());
            let (headers, body) = (headers.clone(), body.clone());
            set.spawn(async move { one(&client, &url, &key, &headers, body).await });
        }
        while let Some(done) = set.join_next().await {
            let sample = done??;
            ttfbs.push(sample.ttfb);
            gaps.extend(sample.gaps);
            deltas.push(sample.deltas);
        }
    }
    ttfbs.sort();
    gaps.sort();
    let min_deltas = deltas.iter().min().copied().unwrap_or(0);
    let over_30ms = gaps
        .iter()
        .filter(|g| **g > Duration::from_millis(30))
        .count();
    println!(
        "{{\"streams\":{},\"min_deltas\":{},\"ttfb_p50_us\":{:.1},\"ttfb_p99_us\":{:.1},\"gap_p50_us\":{:.1},\"gap_p99_us\":{:.1},\"gap_max_us\":{:.1},\"gaps_over_30ms\":{}}}",
        ttfbs.len(),
        min_deltas,
        percentile(&ttfbs, 50.0),
        percentile(&ttfbs, 99.0),
        percentile(&gaps, 50.0),
        percentile(&gaps, 99.0),
        percentile(&gaps, 100.0),
        over_30ms,
    );
    Ok(())
}
