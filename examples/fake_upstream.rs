//! Runs claudekey's fake Anthropic API on a fixed address, for the demo and the benchmarks:
//! `cargo run --example fake_upstream -- --listen 127.0.0.1:9999 --key sk-ant-api03-demo`.

use std::{net::SocketAddr, time::Duration};

use clap::Parser;
use claudekey::fake_upstream::{FakeUpstream, Reply};

#[derive(Parser)]
#[command(about = "A fake Anthropic API (Messages, SSE, count_tokens, models, Admin API keys)")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9999")]
    listen: SocketAddr,
    /// An API key the fake accepts (repeatable).
    #[arg(long = "key")]
    keys: Vec<String>,
    /// An admin key for /v1/organizations/api_keys (repeatable).
    #[arg(long = "admin-key")]
    admin_keys: Vec<String>,
    /// Fixed reply text.
    #[arg(long, conflicts_with = "echo")]
    reply: Option<String>,
    /// Reply with the last user message instead.
    #[arg(long)]
    echo: bool,
    /// Milliseconds between SSE text deltas.
    #[arg(long, default_value_t = 0)]
    delta_delay_ms: u64,
    /// Characters per SSE text delta.
    #[arg(long, default_value_t = 8)]
    chunk_chars: usize,
    /// End replies longer than the request's max_tokens there (stop_reason max_tokens), as the
    /// API does: one paced upstream then serves the benchmarks' long and short streams.
    #[arg(long)]
    stop_at_max_tokens: bool,
    /// Keep received requests in memory (off by default so long runs stay small).
    #[arg(long)]
    record: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let keys: Vec<&str> = args.keys.iter().map(String::as_str).collect();
    let fake = FakeUpstream::serve(listener, &keys)?;
    for admin in &args.admin_keys {
        fake.add_admin_key(admin);
    }
    if args.echo {
        fake.set_reply(Reply::Echo);
    } else if let Some(text) = args.reply {
        fake.set_reply(Reply::Text(text));
    }
    fake.set_delta_delay(Duration::from_millis(args.delta_delay_ms));
    fake.set_chunk_chars(args.chunk_chars);
    fake.set_stop_at_max_tokens(args.stop_at_max_tokens);
    fake.set_recording(args.record);
    eprintln!("fake Anthropic API listening on {}", fake.url());
    tokio::signal::ctrl_c().await?;
    Ok(())
}
