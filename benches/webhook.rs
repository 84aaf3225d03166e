//! Handler time per AdmissionReview for a 10-container pod: validation of a clean pod, of one
//! with a raw key in every container, and injection of the sidecar. Numbers are recorded later.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use serde_json::{Value, json};

use claudekey::webhook::{Admission, Mode, SidecarConfig};

fn pod(env_value: &str, inject: bool) -> Value {
    let containers: Vec<Value> = (0..10)
        .map(|i| {
            json!({
                "name": format!("c{i}"),
                "image": "example/app:1",
                "args": ["--model", "claude-sonnet-4-5", "--verbose"],
                "env": [
                    {"name": "ANTHROPIC_API_KEY", "value": env_value},
                    {"name": "LOG_LEVEL", "value": "debug"},
                    {"name": "DB_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "db", "key": "password"}}},
                    {"name": "CONFIG", "value": "eyJmZWF0dXJlcyI6WyJhIiwiYiIsImMiXSwibG9uZyI6InZhbHVlIHRoYXQgaXMgcXVpdGUgbG9uZyJ9"}
                ],
                "volumeMounts": [{"name": "data", "mountPath": "/data"}]
            })
        })
        .collect();
    let annotations = if inject {
        json!({"claudekey.io/inject": "bot"})
    } else {
        json!({})
    };
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "bench", "namespace": "team-a", "annotations": annotations},
        "spec": {"containers": containers, "volumes": [{"name": "data", "emptyDir": {}}]}
    })
}

fn review(object: Value) -> Vec<u8> {
    json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "bench", "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "name": "bench", "namespace": "team-a", "operation": "CREATE",
            "userInfo": {"username": "bench"}, "object": object, "oldObject": null
        }
    })
    .to_string()
    .into_bytes()
}

fn bench(c: &mut Criterion) {
    let claudekeys: Vec<(String, String)> = vec![("team-a".into(), "bot".into())];
    let admission = Admission {
        mode: Mode::Enforce,
        sidecar: SidecarConfig::default(),
        claudekeys: Arc::new(claudekeys),
    };
    let key = format!("sk-ant-api03-{}AA", "b".repeat(93));
    let clean = review(pod("claudekey-sidecar", false));
    let leaky = review(pod(&key, false));
    let inject = review(pod("claudekey-sidecar", true));
    let mut group = c.benchmark_group("admission_review_10_containers");
    group.bench_function("validate_clean", |b| {
        b.iter(|| admission.validate(black_box(&clean)))
    });
    group.bench_function("validate_raw_keys", |b| {
        b.iter(|| admission.validate(black_box(&leaky)))
    });
    group.bench_function("mutate_inject", |b| {
        b.iter(|| admission.mutate(black_box(&inject)))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
