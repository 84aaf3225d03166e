//! The open-files limit of a server process.
//!
//! Nodes on containerd 2 start containers with systemd's default soft `RLIMIT_NOFILE` of 1,024
//! (the hard limit is 524,288). A gateway holds a descriptor for each client connection (up to
//! 4,096) and one for each upstream connection, so at that soft limit it would fail to accept
//! and to connect at about 500 requests in flight, for every tenant at once. Go programs raise
//! the soft limit to the hard one as they start; claudekey's server roles do the same.

/// Raises the soft limit to the hard one and returns the soft limit now in force.
pub fn raise() -> std::io::Result<u64> {
    rlimit::increase_nofile_limit(u64::MAX)
}

/// The soft limit in force.
pub fn soft() -> std::io::Result<u64> {
    rlimit::Resource::NOFILE.get().map(|(soft, _hard)| soft)
}

/// Descriptors a proxy listener may need: one per client connection and one per upstream
/// connection behind it, and some for the process itself (config files, the audit log, idle
/// upstream connections, Redis, the apiserver).
pub fn needed_by_proxy(max_connections: usize) -> u64 {
    2 * max_connections as u64 + 512
}
