//! The Redis users of namespace-placement sidecars (DESIGN.md §12, `crate::shared_counters`):
//! the controller is the one client with Redis's admin password besides the gateway, so it
//! defines one user per namespace whose sidecars share counters, and loads the two scripts
//! those users may only run by SHA.
//!
//! Redis keeps users and scripts in memory only: a restarted Redis has neither. So the whole
//! set is applied again every [`RESYNC`] (and at once when a namespace is added); meanwhile
//! the sidecars of that namespace count their fallback share, as in any Redis outage.
//! Reconciles never wait for Redis: they only say which namespaces are wanted.

use std::{collections::BTreeSet, sync::Mutex, time::Duration};

use redis::aio::ConnectionManager;
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::shared_counters::{self, RedisSettings, SharedError};

/// How often every namespace user and both scripts are applied again.
pub const RESYNC: Duration = Duration::from_secs(30);
/// Bound of one Redis call of the controller (not on any request's path).
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// Namespaces whose sidecars need a Redis user, and the task that keeps them defined.
pub struct NamespaceUsers {
    conn: ConnectionManager,
    wanted: Mutex<BTreeSet<String>>,
    added: Notify,
    resync: Duration,
}

impl std::fmt::Debug for NamespaceUsers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NamespaceUsers").finish_non_exhaustive()
    }
}

impl NamespaceUsers {
    pub fn new(settings: &RedisSettings) -> Result<Self, SharedError> {
        Ok(Self {
            conn: shared_counters::connect(settings)?,
            wanted: Mutex::new(BTreeSet::new()),
            added: Notify::new(),
            resync: RESYNC,
        })
    }

    /// Applies everything again this often instead of [`RESYNC`] (tests restart Redis).
    pub fn with_resync(mut self, resync: Duration) -> Self {
        self.resync = resync;
        self
    }

    /// Asks for the user of `namespace`; cheap when it is already wanted.
    pub fn want(&self, namespace: &str) {
        let mut wanted = self.wanted.lock().unwrap_or_else(|p| p.into_inner());
        if !wanted.contains(namespace) {
            wanted.insert(namespace.to_string());
            self.added.notify_one();
        }
    }

    /// Applies the wanted users every resync period and whenever one is added; runs until
    /// dropped.
    /// `password` derives a namespace's password (`super::seal::Sealer::redis_password`).
    pub async fn run(&self, password: impl Fn(&str) -> String) {
        let mut healthy = None;
        loop {
            let namespaces: Vec<String> = {
                let wanted = self.wanted.lock().unwrap_or_else(|p| p.into_inner());
                wanted.iter().cloned().collect()
            };
            let outcome = self.apply(&namespaces, &password).await;
            match (&outcome, healthy) {
                (Ok(()), Some(true)) => {}
                (Ok(()), _) => info!(
                    namespaces = namespaces.len(),
                    "shared limits: Redis users of namespace sidecars applied"
                ),
                (Err(category), Some(false)) => {
                    tracing::debug!(error = %category, "shared limits: Redis still unreachable")
                }
                (Err(category), _) => warn!(
                    error = %category,
                    "shared limits: failed to apply the Redis users of namespace sidecars; they count their fallback share until it succeeds"
                ),
            }
            healthy = Some(outcome.is_ok());
            tokio::select! {
                () = self.added.notified() => {}
                () = tokio::time::sleep(self.resync) => {}
            }
        }
    }

    /// One pipeline: both scripts, then every user from scratch. Fails with the error's
    /// category only (never a server message, which could quote an argument).
    async fn apply(
        &self,
        namespaces: &[String],
        password: &impl Fn(&str) -> String,
    ) -> Result<(), String> {
        let mut pipe = redis::pipe();
        for script in [
            shared_counters::admit_script(),
            shared_counters::settle_script(),
        ] {
            pipe.cmd("SCRIPT").arg("LOAD").arg(script).ignore();
        }
        for namespace in namespaces {
            let rules = shared_counters::namespace_acl(namespace, &password(namespace));
            pipe.cmd("ACL").arg("SETUSER").arg(rules).ignore();
        }
        let mut conn = self.conn.clone();
        match tokio::time::timeout(TIMEOUT, pipe.query_async::<()>(&mut conn)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.category().to_string()),
            Err(_) => Err("timeout".to_string()),
        }
    }
}
