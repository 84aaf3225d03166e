//! Redaction pass throughput (MB/s on one core) on prompt-sized text: the whole-text pass the
//! proxy runs on every request, and the streaming pass it runs on SSE text deltas.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};

use claudekey::crd::{CustomPattern, DataProtectionSpec, Detector};
use claudekey::proxy::redact::{Counts, Redactor, StreamRedactor};

#[path = "support/prompt_text.rs"]
mod prompt_text;

fn spec() -> DataProtectionSpec {
    DataProtectionSpec {
        redact: vec![
            Detector::Email,
            Detector::Ssn,
            Detector::Phone,
            Detector::CreditCard,
        ],
        custom_patterns: vec![CustomPattern {
            name: "employee-id".into(),
            regex: "EMP-[0-9]{6}".into(),
        }],
        redact_responses: true,
        ..Default::default()
    }
}

fn bench(c: &mut Criterion) {
    let redactor = Redactor::new(&spec()).expect("bench patterns compile");
    let mut group = c.benchmark_group("redact");
    for size in [4 * 1024, 64 * 1024] {
        let text = prompt_text::prompt(size);
        group.throughput(Throughput::Bytes(text.len() as u64));
        group.bench_function(format!("whole_{}k", size / 1024), |b| {
            b.iter(|| {
                let mut counts = Counts::default();
                redactor.redact(black_box(&text), &mut counts)
            })
        });
    }
    // SSE text deltas of 8 characters (the fake upstream's default chunking).
    let text = prompt_text::prompt(4 * 1024);
    let pieces: Vec<&str> = text
        .as_bytes()
        .chunks(8)
        .map(|c| std::str::from_utf8(c).expect("ASCII prompt"))
        .collect();
    group.throughput(Throughput::Bytes(text.len() as u64));
    group.bench_function("stream_4k_in_8_byte_deltas", |b| {
        b.iter(|| {
            let mut counts = Counts::default();
            let mut stream = StreamRedactor::default();
            let mut out = 0;
            for piece in &pieces {
                out += stream.push(&redactor, black_box(piece), &mut counts).len();
            }
            out + stream.finish(&redactor, &mut counts).len()
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
