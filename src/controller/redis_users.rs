//! The Redis users of namespace-placement sidecars (DESIGN.md §12, `crate::shared_counters`):
//! the controller is the one client with Redis's admin password besides the gateway, so it
//! defines one user per namespace whose sidecars share counters, loads the two scripts those
//! users may only run by SHA, and deletes a namespace's user once no ClaudeKey there needs it
//! (deleted, or its source no longer grants namespace placement): access ends with the grant.
//!
//! Redis keeps users and scripts in memory only: a restarted Redis has neither. So the whole
//! set is applied again every [`RESYNC`] (and at once when a namespace is added or dropped);
//! meanwhile the sidecars of that namespace count their fallback share, as in any Redis outage.
//! Reconciles never wait for Redis: they only say which ClaudeKeys want a user.
//!
//! Users left by an earlier controller (a namespace emptied while none ran) are found with
//! `ACL USERS`, but only once every ClaudeKey in the cache has been decided by this one: before
//! that, "not wanted yet" is not "not wanted".

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    sync::Mutex,
    time::Duration,
};

use kube::runtime::reflector::{ObjectRef, Store};
use redis::aio::ConnectionManager;
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::crd::ClaudeKey;
use crate::shared_counters::{self, RedisSettings, SharedError};

/// How often every namespace user and both scripts are applied again.
pub const RESYNC: Duration = Duration::from_secs(30);
/// How often the cache is looked at while some ClaudeKey in it is not decided yet.
const UNDECIDED_POLL: Duration = Duration::from_secs(1);
/// Bound of one Redis call of the controller (not on any request's path).
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// Namespaces whose sidecars need a Redis user, and the task that keeps them defined.
pub struct NamespaceUsers {
    conn: ConnectionManager,
    claims: Mutex<Claims>,
    changed: Notify,
    resync: Duration,
}

/// Which ClaudeKeys want their namespace's user, by namespace, and which ClaudeKeys this
/// controller has decided since it started (wanting or not).
#[derive(Debug, Default)]
struct Claims {
    wanted: BTreeMap<String, BTreeSet<String>>,
    decided: HashSet<(String, String)>,
}

impl Claims {
    /// Records the decision on `namespace/name`; `true` if the set of wanted namespaces changed.
    fn decide(&mut self, namespace: &str, name: &str, wants: bool) -> bool {
        self.decided
            .insert((namespace.to_string(), name.to_string()));
        if wants {
            let names = self.wanted.entry(namespace.to_string()).or_default();
            names.insert(name.to_string()) && names.len() == 1
        } else {
            self.drop_claim(namespace, name)
        }
    }

    /// Forgets a deleted ClaudeKey; `true` if its namespace is no longer wanted.
    fn forget(&mut self, namespace: &str, name: &str) -> bool {
        self.decided
            .remove(&(namespace.to_string(), name.to_string()));
        self.drop_claim(namespace, name)
    }

    fn drop_claim(&mut self, namespace: &str, name: &str) -> bool {
        let Some(names) = self.wanted.get_mut(namespace) else {
            return false;
        };
        let emptied = names.remove(name) && names.is_empty();
        if names.is_empty() {
            self.wanted.remove(namespace);
        }
        emptied
    }

    /// Keeps only the ClaudeKeys `exists` still finds (a deletion the watch missed in a
    /// relist); whether every one it finds has been decided.
    fn settle(
        &mut self,
        mut exists: impl FnMut(&str, &str) -> bool,
        live: &[(String, String)],
    ) -> bool {
        self.decided.retain(|(ns, name)| exists(ns, name));
        self.wanted.retain(|ns, names| {
            names.retain(|name| exists(ns, name));
            !names.is_empty()
        });
        live.iter().all(|key| self.decided.contains(key))
    }

    /// [`Claims::settle`] against the controller's cache.
    fn settle_with(&mut self, store: &Store<ClaudeKey>) -> bool {
        // A ClaudeKey being deleted needs no decision, nor keeps its claim: one held in
        // Terminating by someone else's finalizer must not hold up every deletion.
        let staying = |ck: &ClaudeKey| ck.metadata.deletion_timestamp.is_none();
        let live: Vec<(String, String)> = store
            .state()
            .iter()
            .filter(|ck| staying(ck))
            .filter_map(|ck| Some((ck.metadata.namespace.clone()?, ck.metadata.name.clone()?)))
            .collect();
        let exists = |ns: &str, name: &str| {
            store
                .get(&ObjectRef::new(name).within(ns))
                .is_some_and(|ck| staying(&ck))
        };
        self.settle(exists, &live)
    }

    fn namespaces(&self) -> Vec<String> {
        self.wanted.keys().cloned().collect()
    }
}

/// The users of ours in `existing` (`ACL USERS`) for namespaces this controller `covers` and
/// that are not in `wanted`. A controller that watches one namespace judges only that one's
/// user: the others' may be another controller's, sharing this Redis.
pub fn stale_users(
    existing: &[String],
    wanted: &[String],
    covers: impl Fn(&str) -> bool,
) -> Vec<String> {
    let ours = shared_counters::namespace_user("");
    existing
        .iter()
        .filter(|user| {
            user.strip_prefix(&ours)
                .is_some_and(|ns| covers(ns) && !wanted.iter().any(|w| w == ns))
        })
        .cloned()
        .collect()
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
            claims: Mutex::default(),
            changed: Notify::new(),
            resync: RESYNC,
        })
    }

    /// Applies everything again this often instead of [`RESYNC`] (tests restart Redis).
    pub fn with_resync(mut self, resync: Duration) -> Self {
        self.resync = resync;
        self
    }

    fn claims(&self) -> std::sync::MutexGuard<'_, Claims> {
        self.claims.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A reconcile's decision: whether ClaudeKey `namespace/name` wants its namespace's user
    /// (its source grants namespace placement). Cheap when nothing changes.
    pub fn decide(&self, namespace: &str, name: &str, wants: bool) {
        if self.claims().decide(namespace, name, wants) {
            self.changed.notify_one();
        }
    }

    /// Wants the user of `namespace` for a ClaudeKey of that name (tests, without a cluster).
    pub fn want(&self, namespace: &str) {
        self.decide(namespace, "", true);
    }

    /// ClaudeKey `namespace/name` was deleted.
    pub fn forget(&self, namespace: &str, name: &str) {
        if self.claims().forget(namespace, name) {
            self.changed.notify_one();
        }
    }

    /// Applies the wanted users every resync period and whenever the wanted namespaces change;
    /// runs until dropped. `password` derives a namespace's password
    /// (`super::seal::Sealer::redis_password`); `claudekeys`, the controller's cache, tells
    /// which ClaudeKeys exist (without it, as in tests without a cluster, no user is deleted),
    /// and `covers` which namespaces' users are this controller's to delete.
    pub async fn run(
        &self,
        password: impl Fn(&str) -> String,
        claudekeys: Option<Store<ClaudeKey>>,
        covers: impl Fn(&str) -> bool,
    ) {
        if let Some(store) = &claudekeys {
            // Reconciles read the cache: nothing is decided before its first full list.
            let _ = store.wait_until_ready().await;
        }
        let mut applied_before = None;
        loop {
            let (namespaces, all_decided) = self.snapshot(claudekeys.as_ref());
            let pass = self
                .apply(&namespaces, all_decided.then_some(&covers), &password)
                .await;
            match report(&pass, applied_before) {
                Report::Quiet => {}
                Report::Applied { deleted } => info!(
                    namespaces = namespaces.len(),
                    deleted, "shared limits: Redis users of namespace sidecars applied"
                ),
                Report::StillDown(category) => {
                    tracing::debug!(error = %category, "shared limits: Redis still unreachable")
                }
                Report::ApplyFailed(category) => warn!(
                    error = %category,
                    "shared limits: failed to apply the Redis users of namespace sidecars; they count their fallback share until it succeeds"
                ),
                Report::PruneFailed(category) => warn!(
                    error = %category,
                    namespaces = namespaces.len(),
                    "shared limits: Redis users of namespace sidecars applied, but those no longer wanted could not be listed or deleted (ACL USERS, ACL DELUSER); they keep their access until a pass succeeds"
                ),
            }
            applied_before = Some(pass.applied.is_ok());
            // Until every ClaudeKey is decided, look again soon: the first pass after that is
            // the one that finds users left by an earlier controller.
            let next = match (&claudekeys, all_decided) {
                (Some(_), false) => UNDECIDED_POLL.min(self.resync),
                _ => self.resync,
            };
            tokio::select! {
                () = self.changed.notified() => {}
                () = tokio::time::sleep(next) => {}
            }
        }
    }

    /// The wanted namespaces, and whether every ClaudeKey in the cache has been decided
    /// (never without a cache).
    fn snapshot(&self, claudekeys: Option<&Store<ClaudeKey>>) -> (Vec<String>, bool) {
        let mut claims = self.claims();
        let Some(store) = claudekeys else {
            return (claims.namespaces(), false);
        };
        let all_decided = claims.settle_with(store);
        (claims.namespaces(), all_decided)
    }

    /// One pipeline: both scripts, then every user from scratch; then, given the namespaces
    /// it may judge (once every ClaudeKey is decided), the users of those no longer wanted are
    /// deleted. Errors are categories only (never a server message, which could quote an
    /// argument).
    async fn apply(
        &self,
        namespaces: &[String],
        judged: Option<&impl Fn(&str) -> bool>,
        password: &impl Fn(&str) -> String,
    ) -> Pass {
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
        let applied = bounded(pipe.query_async::<()>(&mut conn)).await;
        let pruned = match (&applied, judged) {
            (Ok(()), Some(covers)) => Some(prune(&mut conn, namespaces, covers).await),
            _ => None,
        };
        Pass { applied, pruned }
    }
}

/// Deletes our users of the namespaces `covers` that are not in `wanted`; how many.
async fn prune(
    conn: &mut ConnectionManager,
    wanted: &[String],
    covers: &impl Fn(&str) -> bool,
) -> Result<usize, String> {
    let existing: Vec<String> = bounded(redis::cmd("ACL").arg("USERS").query_async(conn)).await?;
    let stale = stale_users(&existing, wanted, covers);
    if !stale.is_empty() {
        let delete = redis::cmd("ACL").arg("DELUSER").arg(&stale).clone();
        bounded(delete.query_async::<()>(conn)).await?;
    }
    Ok(stale.len())
}

/// What one pass did.
#[derive(Debug)]
struct Pass {
    /// The scripts and every wanted user, or why not.
    applied: Result<(), String>,
    /// The users no longer wanted: how many were deleted, or why not; `None` when the pass did
    /// not judge them (not every ClaudeKey decided yet, or nothing applied).
    pruned: Option<Result<usize, String>>,
}

/// What a pass is worth saying.
#[derive(Debug, PartialEq, Eq)]
enum Report {
    Quiet,
    Applied {
        deleted: usize,
    },
    /// Unreachable again, as at the last pass.
    StillDown(String),
    ApplyFailed(String),
    /// The users were applied, but a namespace that lost its grant may keep its user: said at
    /// every pass while it lasts, since it is access that should have ended.
    PruneFailed(String),
}

/// The report of `pass`, given whether the last one applied (`None`: the first pass).
fn report(pass: &Pass, applied_before: Option<bool>) -> Report {
    match (&pass.applied, &pass.pruned, applied_before) {
        (Err(category), _, Some(false)) => Report::StillDown(category.clone()),
        (Err(category), _, _) => Report::ApplyFailed(category.clone()),
        (Ok(()), Some(Err(category)), _) => Report::PruneFailed(category.clone()),
        (Ok(()), Some(Ok(0)) | None, Some(true)) => Report::Quiet,
        (Ok(()), Some(Ok(deleted)), _) => Report::Applied { deleted: *deleted },
        (Ok(()), None, _) => Report::Applied { deleted: 0 },
    }
}

/// One Redis call bounded by [`TIMEOUT`]; an error by its category only.
async fn bounded<T>(
    call: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T, String> {
    match tokio::time::timeout(TIMEOUT, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(e.category().to_string()),
        Err(_) => Err("timeout".to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::{Claims, Pass, Report, report, stale_users};

    #[test]
    fn a_pass_says_what_it_did_and_what_it_could_not() {
        let pass = |applied: Result<(), &str>, pruned: Option<Result<usize, &str>>| Pass {
            applied: applied.map_err(str::to_string),
            pruned: pruned.map(|p| p.map_err(str::to_string)),
        };
        let down = pass(Err("io error"), None);
        assert_eq!(report(&down, None), Report::ApplyFailed("io error".into()));
        assert_eq!(
            report(&down, Some(true)),
            Report::ApplyFailed("io error".into())
        );
        assert_eq!(
            report(&down, Some(false)),
            Report::StillDown("io error".into())
        );
        // Applied: said on the first pass, on recovery and when users went; quiet otherwise.
        let applied = pass(Ok(()), None);
        assert_eq!(report(&applied, None), Report::Applied { deleted: 0 });
        assert_eq!(
            report(&applied, Some(false)),
            Report::Applied { deleted: 0 }
        );
        assert_eq!(report(&applied, Some(true)), Report::Quiet);
        assert_eq!(
            report(&pass(Ok(()), Some(Ok(0))), Some(true)),
            Report::Quiet
        );
        assert_eq!(
            report(&pass(Ok(()), Some(Ok(2))), Some(true)),
            Report::Applied { deleted: 2 }
        );
        // Users applied but the stale ones not deleted: never reported as a failure to apply,
        // and never quiet, at every pass.
        let unpruned = pass(Ok(()), Some(Err("NOPERM")));
        for before in [None, Some(true), Some(false)] {
            assert_eq!(
                report(&unpruned, before),
                Report::PruneFailed("NOPERM".into())
            );
        }
    }

    fn key(ns: &str, name: &str) -> (String, String) {
        (ns.to_string(), name.to_string())
    }

    #[test]
    fn a_namespace_is_wanted_while_one_of_its_claudekeys_wants_it() {
        let mut claims = Claims::default();
        assert!(claims.decide("team-a", "bot", true), "a new namespace");
        assert!(!claims.decide("team-a", "bot", true), "nothing changed");
        assert!(!claims.decide("team-a", "bot2", true), "already wanted");
        assert!(!claims.decide("team-b", "other", false), "never wanted");
        assert_eq!(claims.namespaces(), ["team-a"]);
        assert!(
            !claims.decide("team-a", "bot", false),
            "bot2 still wants it"
        );
        assert!(claims.forget("team-a", "bot2"), "the last claim went");
        assert!(claims.namespaces().is_empty());
        assert!(
            !claims.forget("team-a", "bot2"),
            "forgetting twice changes nothing"
        );
    }

    #[test]
    fn users_go_only_once_every_claudekey_in_the_cache_is_decided() {
        let mut claims = Claims::default();
        claims.decide("team-a", "bot", true);
        claims.decide("team-b", "gone", true);
        let live = [key("team-a", "bot"), key("team-c", "new")];
        let exists = |ns: &str, name: &str| live.contains(&key(ns, name));
        assert!(
            !claims.settle(exists, &live),
            "team-c/new was not decided since start"
        );
        assert_eq!(
            claims.namespaces(),
            ["team-a"],
            "a deletion the watch missed still drops its claim"
        );
        claims.decide("team-c", "new", false);
        assert!(claims.settle(exists, &live));
        assert!(
            Claims::default().settle(|_, _| false, &[]),
            "no ClaudeKey at all"
        );
    }

    #[test]
    fn a_claudekey_being_deleted_holds_up_nothing() {
        use kube::runtime::{reflector, watcher};

        use crate::crd::ClaudeKey;

        let claudekey = |name: &str, terminating: bool| {
            let mut ck: ClaudeKey = serde_json::from_value(serde_json::json!({
                "apiVersion": "claudekey.io/v1alpha2", "kind": "ClaudeKey",
                "metadata": { "name": name, "namespace": "team-a" },
                "spec": { "sourceRef": { "kind": "ClusterClaudeKeySource", "name": "s" } },
            }))
            .unwrap();
            if terminating {
                ck.metadata.deletion_timestamp =
                    Some(crate::controller::conditions::time(chrono::Utc::now()));
                ck.metadata.finalizers = Some(vec!["example.com/someone-elses".into()]);
            }
            ck
        };
        let (store, mut writer) = reflector::store::<ClaudeKey>();
        for ck in [claudekey("bot", false), claudekey("stuck", true)] {
            writer.apply_watcher_event(&watcher::Event::Apply(ck));
        }
        let mut claims = Claims::default();
        claims.decide("team-a", "stuck", true);
        assert!(!claims.settle_with(&store), "bot is not decided yet");
        assert!(claims.namespaces().is_empty(), "stuck's claim goes with it");
        claims.decide("team-a", "bot", false);
        assert!(
            claims.settle_with(&store),
            "only bot needed deciding: stuck is being deleted"
        );
    }

    #[test]
    fn stale_users_are_ours_and_unwanted_only() {
        let existing = [
            "default",
            "claudekey-ns-team-a",
            "claudekey-ns-team-ab",
            "claudekey-ns-gone",
            "platform-readonly",
        ]
        .map(String::from);
        let wanted = ["team-a".to_string()];
        let all = |_: &str| true;
        assert_eq!(
            stale_users(&existing, &wanted, all),
            ["claudekey-ns-team-ab", "claudekey-ns-gone"]
        );
        assert!(stale_users(&existing[..2], &wanted, all).is_empty());
        assert_eq!(
            stale_users(&existing, &wanted, |ns| ns == "gone"),
            ["claudekey-ns-gone"],
            "a namespaced controller judges its own namespace's user only"
        );
    }
}
