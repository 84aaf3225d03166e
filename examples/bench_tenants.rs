//! Heap bytes per served ClaudeKey, for `hack/bench.sh` row 8 (issue 21: a gateway with 10,000
//! tenants in <= 100 MiB). Compiles `--count` configs the way the gateway does (`config::compile`,
//! one shared `Limiters`), with a counting allocator, and prints one JSON line: live bytes per
//! tenant in all (the tenants share one policy, as most of a gateway's do), and what compiling
//! each part costs once per distinct policy. Like instruction counts, the figure does not depend
//! on how busy the machine is.
//!
//! Two policies: `small` is what `bench_controller`'s ClaudeKeys get (a model glob, maxTokens);
//! `full` is the suite's full policy (hack/bench_tenant.sh: every detector, a custom pattern).

use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::{
        Arc,
        atomic::{AtomicIsize, Ordering},
    },
};

use clap::{Parser, ValueEnum};
use claudekey::{
    proxy::{
        caps::Caps, config::compile, limits::Limiters, prescreen::Prescreen, redact::Redactor,
        scope::Scope,
    },
    proxyconf::ProxyConfig,
};
use serde_json::json;

/// Counts live heap bytes; everything else is the system allocator's.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: the caller's contract is passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

#[derive(Clone, Copy, ValueEnum)]
enum Policy {
    Small,
    Full,
}

#[derive(Parser)]
#[command(about = "Live heap bytes per compiled gateway tenant")]
struct Args {
    #[arg(long, default_value_t = 2000)]
    count: usize,
    #[arg(long, value_enum, default_value = "small")]
    policy: Policy,
}

fn policy(kind: Policy) -> serde_json::Value {
    match kind {
        Policy::Small => json!({ "scope": { "models": ["claude-haiku-*"], "maxTokens": 1024 } }),
        Policy::Full => json!({
            "scope": { "models": ["claude-sonnet-4-*", "claude-haiku-4-*"],
                       "endpoints": ["messages", "countTokens", "models"],
                       "maxTokens": 4096, "maxInputChars": 200000 },
            "limits": { "requestsPerMinute": 1000, "tokensPerMinute": 1000000,
                        "perUserRequestsPerHour": 100 },
            "dataProtection": { "redact": ["email", "ssn", "phone", "creditCard"],
                                "customPatterns": [ { "name": "employee-id", "regex": "EMP-[0-9]{6}" } ],
                                "redactResponses": true, "promptInjection": "flag" },
        }),
    }
}

/// Tenant `i`'s `proxy.json`, as the controller writes it: its own keys and salt.
fn config(i: usize, policy: &serde_json::Value) -> Vec<u8> {
    let hex = |tag: u8| format!("{:02x}{:062x}", tag, i);
    serde_json::to_vec(&json!({
        "claudeKey": { "namespace": format!("bench-{}", i / 100), "name": format!("ck-{i:04}") },
        "upstream": [ { "key": format!("sk-ant-api03-bench-{i:08}-0123456789abcdefghijklmnop"),
                        "fingerprint": format!("up:{i:08x}"), "validUntil": null } ],
        "workloadKeys": [ { "sha256": hex(1), "fingerprint": format!("ck:{i:08x}"), "validUntil": null } ],
        "policy": policy,
        "auditSalt": hex(2),
    }))
    .expect("serializes")
}

/// Live bytes per item after building `count` of them with `build` (kept alive while counting).
fn per_item<T>(count: usize, mut build: impl FnMut(usize) -> T) -> f64 {
    let before = LIVE.load(Ordering::Relaxed);
    let kept: Vec<T> = (0..count).map(&mut build).collect();
    let after = LIVE.load(Ordering::Relaxed);
    drop(kept);
    (after - before) as f64 / count as f64
}

fn main() {
    let args = Args::parse();
    let policy_json = policy(args.policy);
    let configs: Vec<Vec<u8>> = (0..args.count).map(|i| config(i, &policy_json)).collect();
    let parsed: Vec<ProxyConfig> = configs
        .iter()
        .map(|c| serde_json::from_slice(c).expect("parses"))
        .collect();
    let limiters = Arc::new(Limiters::default());
    let tenant = per_item(args.count, |i| {
        Arc::new(compile(&configs[i], &limiters).expect("compiles"))
    });
    let fresh = Limiters::default();
    let limiter = per_item(args.count, |i| fresh.for_key(&parsed[i].claude_key));
    // Each with a list of its own, so none is shared.
    let scope = per_item(args.count, |i| {
        let mut spec = parsed[i].policy.scope.clone();
        for (n, model) in spec.models.iter_mut().enumerate() {
            *model = format!("{model}-{i}-{n}");
        }
        Scope::new(&spec)
    });
    let redactor = per_item(args.count, |i| {
        Redactor::new(&parsed[i].policy.data_protection).expect("redactor")
    });
    let prescreen = per_item(args.count, |i| {
        let redactor = Redactor::new(&parsed[i].policy.data_protection).expect("redactor");
        let injection = parsed[i].policy.data_protection.prompt_injection;
        Prescreen::wanted(&redactor, injection)
            .then(|| Prescreen::new(&redactor).expect("prescreen"))
    });
    let caps = per_item(args.count, |i| {
        Caps::new(&parsed[i].policy.scope, &parsed[i].policy.data_protection)
    });
    println!(
        "{}",
        json!({
            "count": args.count,
            "bytes_per_tenant": tenant.round(),
            "limiter": limiter.round(),
            "caps": caps.round(),
            "per_distinct_policy": {
                "scope": scope.round(),
                "redactor": redactor.round(),
                "prescreen": prescreen.round(),
            },
        })
    );
}
