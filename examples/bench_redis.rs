//! The floor the shared limits pay on this machine, for `hack/bench.sh` row 7: back-to-back
//! round trips to Redis over loopback (`PING`, and `EVALSHA` of the admission script with the
//! benchmark's limits) from a bare blocking client, run pinned to the proxy's core.
//!
//! The shared proxy's added latency is read against it: one admission is one such round trip,
//! so "at most one loopback round trip added" can be checked in the same run. Prints one JSON
//! line with the percentiles in µs.

use std::{
    io::{BufReader, Write},
    net::TcpStream,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::Parser;
use claudekey::shared_counters;

#[derive(Parser)]
#[command(about = "Round trips to Redis: PING and EVALSHA of the admission script")]
struct Args {
    /// Redis on loopback (host:port), the benchmark's own server.
    #[arg(long)]
    addr: String,
    #[arg(long, default_value_t = 2000)]
    samples: usize,
    /// Also time the same commands through the proxy's own client (`shared_counters::connect`
    /// on a single-threaded runtime, as a one-core proxy runs it): what the client adds.
    #[arg(long)]
    with_client: bool,
}

struct Client {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
    parser: redis::Parser,
}

impl Client {
    fn connect(addr: &str) -> anyhow::Result<Self> {
        let stream = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
        stream.set_nodelay(true)?;
        Ok(Self {
            reader: BufReader::new(stream.try_clone()?),
            stream,
            parser: redis::Parser::new(),
        })
    }

    /// One command, one reply: the time from the write to the parsed reply.
    fn round_trip(&mut self, packed: &[u8]) -> anyhow::Result<(Duration, redis::Value)> {
        let start = Instant::now();
        self.stream.write_all(packed)?;
        let value = self.parser.parse_value(&mut self.reader)?;
        Ok((start.elapsed(), value))
    }
}

fn percentiles(mut samples: Vec<Duration>) -> String {
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e6;
    format!(
        "{{\"p50\":{:.1},\"p99\":{:.1},\"max\":{:.1}}}",
        at(0.5),
        at(0.99),
        at(1.0)
    )
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !args.addr.starts_with("127.") {
        bail!(
            "the probe runs only against loopback addresses, not {}",
            args.addr
        );
    }
    let mut client = Client::connect(&args.addr)?;
    let load = redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg(shared_counters::admit_script())
        .get_packed_command();
    let (_, sha) = client.round_trip(&load)?;
    let redis::Value::BulkString(sha) = sha else {
        bail!("SCRIPT LOAD answered {sha:?}");
    };
    let (ping, admit) = (redis::cmd("PING"), admit_cmd(&sha));
    let (ping_packed, admit_packed) = (ping.get_packed_command(), admit.get_packed_command());
    let (mut pings, mut admits) = (Vec::new(), Vec::new());
    // Alternated, so both see the same moments of a noisy machine; the first 100 are warm-up.
    for i in 0..args.samples + 100 {
        let (p, _) = client.round_trip(&ping_packed)?;
        let (a, reply) = client.round_trip(&admit_packed)?;
        admitted(&reply)?;
        if i >= 100 {
            pings.push(p);
            admits.push(a);
        }
    }
    let mut line = format!(
        "{{\"ping\":{},\"evalsha\":{}",
        percentiles(pings),
        percentiles(admits)
    );
    if args.with_client {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (pings, admits) = runtime.block_on(async_raw(&args, &ping_packed, &admit_packed))?;
        line += &format!(
            ",\"async_ping\":{},\"async_evalsha\":{}",
            percentiles(pings),
            percentiles(admits)
        );
        let (pings, admits) = runtime.block_on(through_client(&args, &ping, &admit))?;
        line += &format!(
            ",\"client_ping\":{},\"client_evalsha\":{}",
            percentiles(pings),
            percentiles(admits)
        );
    }
    println!("{line}}}");
    Ok(())
}

/// The admission script with the benchmark's policy (hack/bench.sh): every limit set, none
/// reached, one end user, on keys of their own so the proxies' windows are untouched; one
/// request decided, no credit asked (the round trip an admission pays when it is not leased).
fn admit_cmd(sha: &[u8]) -> redis::Cmd {
    let prefix = shared_counters::key_prefix("bench", "redis-probe");
    let digest = "0123456789abcdef0123456789abcdef";
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(sha)
        .arg(5)
        .arg(format!("{prefix}:rate"))
        .arg(format!("{prefix}:spend"))
        .arg(format!("{prefix}:users"))
        .arg(format!("{prefix}:user:overflow"))
        .arg(format!("{prefix}:user:{digest}"))
        .arg(1_000_000_000u64)
        .arg(1_000_000_000_000u64)
        .arg(1)
        .arg(1_000_000_000u64)
        .arg(-1)
        .arg(-1)
        .arg(86_400)
        .arg(claudekey::proxy::limits::MAX_USERS)
        .arg(&[1, 0, 0, 0, 0, 0][..])
        .arg(digest)
        .arg(1);
    cmd
}

fn admitted(reply: &redis::Value) -> anyhow::Result<()> {
    match reply {
        redis::Value::Array(v) if v.first() == Some(&redis::Value::Int(0)) => Ok(()),
        _ => bail!("the admission script refused or failed: {reply:?}"),
    }
}

/// The same round trips on a current-thread runtime over a bare tokio socket: what waiting in
/// epoll instead of a blocking read adds.
async fn async_raw(
    args: &Args,
    ping: &[u8],
    admit: &[u8],
) -> anyhow::Result<(Vec<Duration>, Vec<Duration>)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(&args.addr).await?;
    stream.set_nodelay(true)?;
    let mut buf = vec![0u8; 4096];
    let (mut pings, mut admits) = (Vec::new(), Vec::new());
    for i in 0..args.samples + 100 {
        let mut times = [Duration::ZERO; 2];
        for (n, packed) in [ping, admit].into_iter().enumerate() {
            let start = Instant::now();
            stream.write_all(packed).await?;
            let mut len = 0;
            loop {
                len += stream.read(&mut buf[len..]).await?;
                if redis::parse_redis_value(&buf[..len]).is_ok() {
                    break;
                }
            }
            times[n] = start.elapsed();
        }
        if i >= 100 {
            pings.push(times[0]);
            admits.push(times[1]);
        }
    }
    Ok((pings, admits))
}

/// The same round trips through the proxy's client (`shared_counters::connect`).
async fn through_client(
    args: &Args,
    ping: &redis::Cmd,
    admit: &redis::Cmd,
) -> anyhow::Result<(Vec<Duration>, Vec<Duration>)> {
    let settings = shared_counters::RedisSettings {
        url: format!("redis://{}/0", args.addr).into(),
        username: None,
        password: None,
        timeout: Duration::from_millis(100),
    };
    let mut conn = shared_counters::connect(&settings)?;
    let (mut pings, mut admits) = (Vec::new(), Vec::new());
    for i in 0..args.samples + 100 {
        let start = Instant::now();
        let _: String = ping.query_async(&mut conn).await?;
        let p = start.elapsed();
        let start = Instant::now();
        let reply: redis::Value = admit.query_async(&mut conn).await?;
        let a = start.elapsed();
        admitted(&reply)?;
        if i >= 100 {
            pings.push(p);
            admits.push(a);
        }
    }
    Ok((pings, admits))
}
