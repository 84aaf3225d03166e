//! The floor one extra hop pays on this machine, for `hack/bench.sh`: the round trip to a bare
//! TCP echo process (run it on the proxy's core) after the line was idle for `--idle-ms`.
//!
//! A paced stream leaves every core idle between deltas; on a VM whose idle vCPUs halt, waking
//! one can take milliseconds, and every hop of a request pays it. `probe` prints one JSON line
//! with the round-trip percentiles in µs, so the streaming row can be read against it.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Round trip to an echo process after an idle gap")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Echo one byte back for every byte received, on every connection.
    Serve {
        #[arg(long)]
        listen: String,
    },
    /// Measure round trips to `serve`, each after `idle_ms` of silence.
    Probe {
        #[arg(long)]
        addr: String,
        #[arg(long, default_value_t = 20)]
        idle_ms: u64,
        #[arg(long, default_value_t = 200)]
        samples: usize,
    },
}

fn serve(listen: &str) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).with_context(|| format!("bind {listen}"))?;
    for stream in listener.incoming() {
        let mut stream = stream?;
        stream.set_nodelay(true)?;
        thread::spawn(move || {
            let mut byte = [0u8; 1];
            while stream.read_exact(&mut byte).is_ok() {
                if stream.write_all(&byte).is_err() {
                    return;
                }
            }
        });
    }
    Ok(())
}

fn probe(addr: &str, idle: Duration, samples: usize) -> anyhow::Result<()> {
    if !addr.starts_with("127.") {
        bail!("probe runs only against loopback addresses, not {addr}");
    }
    let mut stream = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
    stream.set_nodelay(true)?;
    let mut byte = [0u8; 1];
    let mut round_trips = Vec::with_capacity(samples);
    // Ten untimed round trips first: the connection and both processes are warm.
    for i in 0..samples + 10 {
        thread::sleep(idle);
        let start = Instant::now();
        stream.write_all(&byte)?;
        stream.read_exact(&mut byte)?;
        if i >= 10 {
            round_trips.push(start.elapsed());
        }
    }
    round_trips.sort();
    let at = |q: f64| round_trips[((round_trips.len() - 1) as f64 * q) as usize].as_micros();
    println!(
        "{{\"idle_ms\":{},\"samples\":{},\"p50_us\":{},\"p99_us\":{},\"max_us\":{}}}",
        idle.as_millis(),
        round_trips.len(),
        at(0.5),
        at(0.99),
        at(1.0)
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    match Args::parse().command {
        Command::Serve { listen } => serve(&listen),
        Command::Probe {
            addr,
            idle_ms,
            samples,
        } => probe(&addr, Duration::from_millis(idle_ms), samples.max(1)),
    }
}
