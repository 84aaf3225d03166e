//! The watches of the controller and the tasks beside its reconcile loop: the kube-runtime
//! `Controller` over ClaudeKeys, the caches its reconciles read (`super::stores`), the sweeps
//! of key ages, retired keys and orphaned configs, and the namespaces' Redis users. All of it
//! runs on the leader only.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::runtime::{Controller, reflector::ObjectRef, watcher};
use kube::{Api, Client, ResourceExt};

use super::place_waits::PlaceWaits;
use super::{ControllerConfig, consumers, context, orphans, reconcile, retire, stores, usage};
use crate::crd::{ClaudeKey, ClaudeKeySource, ClusterClaudeKeySource, SourceKind, annotations};

/// The kube-runtime Controller over ClaudeKeys, owning their Secrets. Every watch that
/// triggers a reconcile also fills a cache the reconcile reads (`stores`): an object is in the
/// cache before the event it caused reaches the reconcile.
pub(super) async fn run(
    client: &Client,
    config: &ControllerConfig,
    ctx: Arc<context::Context>,
    writers: stores::Writers,
    stop: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let (claudekeys, secrets, sources): (Api<ClaudeKey>, Api<Secret>, Api<ClaudeKeySource>) =
        match &config.watch_namespace {
            Some(ns) => (
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
            ),
            None => (
                Api::all(client.clone()),
                Api::all(client.clone()),
                Api::all(client.clone()),
            ),
        };
    let owned = watcher::Config::default().labels(&format!(
        "{}={}",
        annotations::MANAGED_BY_LABEL,
        annotations::MANAGER
    ));
    let runtime_config = kube::runtime::controller::Config::default()
        .concurrency(config.max_concurrent_reconciles)
        .debounce(RECONCILE_DEBOUNCE);
    // The ClaudeKeys' own watch, without managedFields (nothing reads them; at 10,000 objects
    // they are most of the cache), as every cache below.
    let (store, writer) = (ctx.stores.claudekeys.clone(), writers.claudekeys);
    let claudekeys = {
        use kube::runtime::WatchStreamExt;
        watcher(claudekeys, watcher::Config::default())
            .default_backoff()
            .modify(without_managed_fields)
            .reflect(writer)
            .inspect(on_change(ctx.clone()))
            .applied_objects()
    };
    let controller = Controller::for_stream(claudekeys, store.clone())
        .reconcile_on(PlaceWaits::triggers(ctx.place_waits.clone()));
    let all = watcher::Config::default;
    let mut controller = controller
        .watches_stream(cached(secrets, owned, writers.secrets), owning_claudekey)
        .watches_stream(
            cached(
                Api::<ClusterClaudeKeySource>::all(client.clone()),
                all(),
                writers.cluster_sources,
            ),
            users_of(store.clone(), |ck, s: &ClusterClaudeKeySource| {
                refers_to(ck, SourceKind::ClusterClaudeKeySource, &s.name_any())
            }),
        )
        .watches_stream(
            cached(sources, all(), writers.sources),
            users_of(store.clone(), namespaced_user),
        );
    if let Some(namespaces) = writers.namespaces {
        controller = controller.watches_stream(
            cached(Api::<Namespace>::all(client.clone()), all(), namespaces),
            users_of(store.clone(), |ck, ns: &Namespace| {
                ck.namespace() == Some(ns.name_any())
            }),
        );
    }
    // The workload caches only feed consumer restarts: they trigger no reconcile.
    let stores::Workloads {
        deployments,
        statefulsets,
        daemonsets,
    } = writers.workloads;
    let controller = controller
        .watches_stream(workloads(client, config, deployments), no_reconcile)
        .watches_stream(workloads(client, config, statefulsets), no_reconcile)
        .watches_stream(workloads(client, config, daemonsets), no_reconcile)
        .with_config(runtime_config)
        .graceful_shutdown_on(stop);
    let metrics = ctx.metrics.clone();
    let usage = {
        let (store, ctx) = (store.clone(), ctx.clone());
        async move {
            match config.usage_interval {
                Some(interval) => usage::poll_forever(store, ctx, interval).await,
                None => futures::future::pending().await,
            }
        }
    };
    let retire = retire::retire_forever(store.clone(), ctx.clone(), config.watch_namespace.clone());
    let orphans = orphans::sweep_forever(ctx.clone(), store.clone());
    // The leader alone defines the namespaces' Redis users: it alone reconciles.
    let redis_users = {
        let (store, ctx) = (store.clone(), ctx.clone());
        async move {
            match &ctx.namespace_users {
                Some(users) => {
                    let password = |ns: &str| ctx.sealer.redis_password(ns);
                    let covers = |ns: &str| ctx.stores.covers(ns);
                    users.run(password, Some(store), covers).await
                }
                None => futures::future::pending().await,
            }
        }
    };
    let sweep_ctx = ctx.clone();
    let run = controller
        .run(reconcile::reconcile, reconcile::error_policy, ctx)
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!(%error, "reconcile loop");
            }
        });
    let sweep = async move {
        loop {
            tokio::time::sleep(KEY_AGE_SWEEP).await;
            metrics.retain_key_ages(|namespace, name| {
                store.get(&ObjectRef::new(name).within(namespace)).is_some()
            });
            let live: std::collections::HashSet<String> =
                store.state().iter().filter_map(|ck| ck.uid()).collect();
            sweep_ctx.written_status.retain(|uid| live.contains(uid));
        }
    };
    tokio::select! {
        () = run => {}
        () = sweep => {}
        () = usage => {}
        () = retire => {}
        () = orphans => {}
        () = redis_users => {}
    }
}

/// For the ClaudeKeys' watch: what a deleted ClaudeKey leaves goes at once rather than at the
/// next full pass: its config (`orphans`) and its claim on its namespace's Redis user. A
/// change of spec, or the deletion of a ClaudeKey with custom patterns, may free a place in
/// its namespace's pattern-list budget (`place_waits`); labels and status writes cannot.
fn on_change(
    ctx: Arc<context::Context>,
) -> impl Fn(&Result<watcher::Event<ClaudeKey>, watcher::Error>) + Send + 'static {
    move |event| match event {
        Ok(watcher::Event::Delete(ck)) => {
            let (namespace, name) = (ck.namespace().unwrap_or_default(), ck.name_any());
            ctx.orphans.push(&namespace, &name);
            if let Some(users) = &ctx.namespace_users {
                users.forget(&namespace, &name);
            }
            ctx.place_waits.forget(&namespace, &name);
            if !ck.spec.data_protection.custom_patterns.is_empty() {
                ctx.place_waits.changed(&namespace, &name);
            }
        }
        Ok(watcher::Event::Apply(ck)) if spec_not_yet_reconciled(ck) => {
            let namespace = ck.namespace().unwrap_or_default();
            ctx.place_waits.changed(&namespace, &ck.name_any());
        }
        _ => {}
    }
}

/// Whether `ck`'s spec changed since its status was last written (or it has none yet).
fn spec_not_yet_reconciled(ck: &ClaudeKey) -> bool {
    let observed = ck.status.as_ref().and_then(|s| s.observed_generation);
    ck.metadata.generation != observed
}

/// A watch that fills `writer` and yields every object it saw change (deletions included).
fn cached<K>(
    api: Api<K>,
    config: watcher::Config,
    writer: kube::runtime::reflector::store::Writer<K>,
) -> impl futures::Stream<Item = Result<K, watcher::Error>> + Send + 'static
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    use kube::runtime::WatchStreamExt;
    watcher(api, config)
        .default_backoff()
        .modify(without_managed_fields)
        .reflect(writer)
        .touched_objects()
}

/// Drops the field-manager bookkeeping of a cached object: no reconcile reads it.
fn without_managed_fields<K: kube::Resource>(object: &mut K) {
    object.meta_mut().managed_fields = None;
}

/// A watch of one workload kind in the controller's scope, stripped as it arrives to what a
/// consumer restart reads.
fn workloads<K: consumers::Workload>(
    client: &Client,
    config: &ControllerConfig,
    writer: kube::runtime::reflector::store::Writer<K>,
) -> impl futures::Stream<Item = Result<K, watcher::Error>> + Send + 'static {
    use kube::runtime::WatchStreamExt;
    let api: Api<K> = match &config.watch_namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    watcher(api, watcher::Config::default())
        .default_backoff()
        .modify(K::strip)
        .reflect(writer)
        .touched_objects()
}

fn no_reconcile<K>(_: K) -> Option<ObjectRef<ClaudeKey>> {
    None
}

/// A watch mapper: every ClaudeKey in the store for which `uses` holds.
fn users_of<K>(
    store: kube::runtime::reflector::Store<ClaudeKey>,
    uses: impl Fn(&ClaudeKey, &K) -> bool + Send + Sync + 'static,
) -> impl Fn(K) -> Vec<ObjectRef<ClaudeKey>> + Send + Sync + 'static {
    move |changed: K| {
        store
            .state()
            .iter()
            .filter(|ck| uses(ck, &changed))
            .map(|ck| ObjectRef::from_obj(ck.as_ref()))
            .collect()
    }
}

fn refers_to(ck: &ClaudeKey, kind: SourceKind, name: &str) -> bool {
    ck.spec.source_ref.kind == kind && ck.spec.source_ref.name == name
}

fn namespaced_user(ck: &ClaudeKey, source: &ClaudeKeySource) -> bool {
    ck.namespace() == source.namespace()
        && refers_to(ck, SourceKind::ClaudeKeySource, &source.name_any())
}

/// The ClaudeKey a managed Secret belongs to, by its `claudekey.io/name` label rather than its
/// owner reference, so a Secret whose owner reference was stripped by hand is still repaired.
/// A gateway config Secret names its ClaudeKey in an annotation.
fn owning_claudekey(secret: Secret) -> Option<ObjectRef<ClaudeKey>> {
    if let Some(id) = secret.annotations().get(annotations::CLAUDEKEY_ANNOTATION) {
        let (namespace, name) = id.split_once('/')?;
        return Some(ObjectRef::new(name).within(namespace));
    }
    let name = secret.labels().get(annotations::NAME_LABEL)?;
    Some(ObjectRef::new(name).within(&secret.namespace()?))
}

/// A reconcile writes two Secrets and the status, and each write comes back as a watch event
/// that asks for another reconcile; waiting this long after the last trigger folds those into one.
const RECONCILE_DEBOUNCE: Duration = Duration::from_millis(200);

/// How often key-age series of deleted ClaudeKeys are dropped.
const KEY_AGE_SWEEP: Duration = Duration::from_secs(60);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::ClaudeKeyStatus;

    /// Only a spec change (a new generation) can free a pattern-list place; a label or a status
    /// write leaves the generation as the status observed it.
    #[test]
    fn only_a_spec_not_yet_reconciled_counts_as_a_change() {
        let mut ck: ClaudeKey = serde_json::from_value(serde_json::json!({
            "apiVersion": "claudekey.io/v1alpha2",
            "kind": "ClaudeKey",
            "metadata": { "name": "a", "namespace": "team", "generation": 3 },
            "spec": { "sourceRef": { "kind": "ClusterClaudeKeySource", "name": "s" } },
        }))
        .unwrap();
        assert!(spec_not_yet_reconciled(&ck), "never reconciled");
        ck.status = Some(ClaudeKeyStatus {
            observed_generation: Some(3),
            ..Default::default()
        });
        assert!(!spec_not_yet_reconciled(&ck));
        ck.metadata.generation = Some(4);
        assert!(spec_not_yet_reconciled(&ck));
    }
}
