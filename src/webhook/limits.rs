//! What keeps the webhook alive under a flood (DESIGN.md §5): it fails closed, so its death
//! blocks pod creation cluster-wide. Bodies are read through one [`BodyBudget`] (refused by
//! their declared length before a byte is buffered, counted as they arrive), with a reserve
//! for small bodies so a burst of large AdmissionReviews cannot starve the real ones.

use std::time::Duration;

use crate::body_budget::{BodyBudget, BodyLimits};

/// Largest AdmissionReview read. The apiserver takes request bodies up to 3 MiB, and an
/// UPDATE review carries the object twice (object and oldObject).
pub const MAX_BODY: usize = 6 * 1024 * 1024;
/// Bytes of request bodies held at once, across all connections and streams.
pub const BODY_BUDGET: usize = 16 * 1024 * 1024;
/// Part of the budget only requests declaring at most [`SMALL`] bytes may use.
pub const RESERVE: usize = 4 * 1024 * 1024;
/// Real reviews are this small (a pod is a few KiB); the reserve serves them.
pub const SMALL: usize = 256 * 1024;
/// A body not complete by then is dropped.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A client that has not sent a whole request head by then is disconnected.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Open connections at most; more wait in the kernel's accept queue.
pub const MAX_CONNECTIONS: usize = 512;
/// Open connections from one client address at most; more are closed on accept
/// (`crate::per_client`). The webhook's port admits any source (the apiserver's address is not
/// known in advance), and HTTP/2 connections answer the webhook's pings by themselves: without
/// this, one pod could hold all [`MAX_CONNECTIONS`] and block pod creation cluster-wide. An
/// apiserver multiplexes its reviews, [`MAX_STREAMS`] to a connection, over a few.
pub const MAX_CONNECTIONS_PER_CLIENT: usize = 64;
/// Concurrent HTTP/2 streams per connection.
pub const MAX_STREAMS: u32 = 32;
/// Request headers of one HTTP/2 stream at most (hyper's default is 16 MiB; the apiserver
/// sends a few hundred bytes).
pub const MAX_HEADERS: u32 = 64 * 1024;

/// The webhook's body limits.
pub const BODY_LIMITS: BodyLimits = BodyLimits {
    max_body: MAX_BODY,
    total: BODY_BUDGET,
    reserve: RESERVE,
    small: SMALL,
    read_timeout: BODY_READ_TIMEOUT,
};

/// The webhook's budget (one per server).
pub fn body_budget() -> BodyBudget {
    BodyBudget::new(BODY_LIMITS)
}
