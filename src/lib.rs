//! claudekey: a Kubernetes operator, admission webhook and proxy that keep Anthropic API keys
//! out of workloads. The modules mirror DESIGN.md: crd, controller, backend, webhook, proxy, scan.
#![forbid(unsafe_code)]

pub mod admin;
pub mod backend;
pub mod body_budget;
pub mod cli;
pub mod controller;
pub mod crd;
pub mod crypto;
pub mod events;
pub mod fake_upstream;
pub mod keys;
pub mod open_files;
pub mod per_client;
pub mod probe_port;
pub mod proxy;
pub mod proxyconf;
pub mod scan;
pub mod selfcheck;
pub mod shared_counters;
pub mod shutdown;
pub mod telemetry;
pub mod tls;
pub mod webhook;
