//! Key scanner throughput (MB/s on one core) on prompt-sized text: `find_key` (plain and base64
//! credential shapes) and `find_key_assignments` (shell assignments), the two string tests behind
//! the webhook's and `claudekey scan`'s rules, on clean text and on text with a key at its end.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};

use claudekey::webhook::keyshape::{find_key, find_key_assignments};

#[path = "support/prompt_text.rs"]
mod prompt_text;

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("scan");
    for size in [4 * 1024, 64 * 1024] {
        let clean = prompt_text::prompt(size);
        let leaky = format!("{clean} sk-ant-api03-{}AA", "b".repeat(93));
        group.throughput(Throughput::Bytes(clean.len() as u64));
        group.bench_function(format!("find_key_clean_{}k", size / 1024), |b| {
            b.iter(|| find_key(black_box(&clean)))
        });
        group.throughput(Throughput::Bytes(leaky.len() as u64));
        group.bench_function(format!("find_key_key_at_end_{}k", size / 1024), |b| {
            b.iter(|| find_key(black_box(&leaky)))
        });
        group.throughput(Throughput::Bytes(clean.len() as u64));
        group.bench_function(format!("find_key_assignments_{}k", size / 1024), |b| {
            b.iter(|| find_key_assignments(black_box(&clean)))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
