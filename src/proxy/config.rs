//! Loads `proxy.json` from the mounted `<name>-proxy` directory (or, in gateway mode, from each
//! sub-directory of it), watches the directory (the kubelet swaps its `..data` symlink, so the
//! file itself is never modified in place) and swaps the compiled set atomically. A file that
//! cannot be read or compiled keeps its last good version, so a bad write never drops service.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use arc_swap::ArcSwapOption;
use sha2::{Digest, Sha256};

use super::{
    Mode,
    dir_watch::DirWatch,
    limits::Limiters,
    metrics::Metrics,
    tenant::{Tenant, TenantError},
};
use crate::proxyconf::{FILE_NAME, ProxyConfig};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("failed to read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// serde's message with quoted values removed, since a value could be a key.
    #[error("failed to parse {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("failed to compile {path}: {source}")]
    Compile { path: PathBuf, source: TenantError },
    #[error("failed to find {FILE_NAME} in {path}")]
    Missing { path: PathBuf },
    #[error("failed to watch {path}: {source}")]
    Watch {
        path: PathBuf,
        source: notify::Error,
    },
}

/// The ClaudeKeys being served at one moment, with their workload-key hashes indexed: a gateway
/// serving thousands of ClaudeKeys authenticates a request with one lookup, not a scan.
#[derive(Default)]
pub struct ConfigSet {
    pub tenants: Vec<Arc<Tenant>>,
    /// SHA-256 of an accepted workload key -> index into `tenants`, and the key's `validUntil`.
    pub by_key: HashMap<[u8; 32], (usize, Option<chrono::DateTime<chrono::Utc>>)>,
}

impl ConfigSet {
    /// The set of `tenants`, indexed. A hash two tenants share (never, for random keys) names
    /// the first.
    pub fn new(tenants: Vec<Arc<Tenant>>) -> Self {
        let mut by_key = HashMap::new();
        for (i, tenant) in tenants.iter().enumerate() {
            for key in &tenant.workload_keys {
                by_key.entry(key.sha256).or_insert((i, key.valid_until));
            }
        }
        Self { tenants, by_key }
    }
}

/// The current set; `None` until a config was loaded once (`/readyz` says so).
pub type Store = ArcSwapOption<ConfigSet>;

/// Reads and compiles config files, remembering the last good version of each.
pub struct Loader {
    dir: PathBuf,
    mode: Mode,
    limiters: Arc<Limiters>,
    known: HashMap<PathBuf, ([u8; 32], Arc<Tenant>)>,
    /// The digest of each file's content that was refused: the same bytes are not compiled
    /// (nor their error logged and counted) again at every poll, only once they change. A
    /// file's verdict depends on its bytes alone.
    refused: HashMap<PathBuf, [u8; 32]>,
}

/// What one reload did.
#[derive(Default)]
pub struct Outcome {
    pub changed: bool,
    /// Why files were refused this time; a file refused before and unchanged since is not
    /// here again.
    pub errors: Vec<ConfigError>,
}

impl Outcome {
    /// Whether anything was loaded or refused: what the reloads metric counts.
    fn attempted(&self) -> bool {
        self.changed || !self.errors.is_empty()
    }
}

impl Loader {
    pub fn new(dir: PathBuf, mode: Mode, limiters: Arc<Limiters>) -> Self {
        Self {
            dir,
            mode,
            limiters,
            known: HashMap::new(),
            refused: HashMap::new(),
        }
    }

    /// The config files: `DIR/proxy.json`, or in gateway mode `DIR/*/proxy.json` when the
    /// directory holds one mounted Secret per ClaudeKey. `..data` and other hidden entries are
    /// the kubelet's own and skipped.
    fn discover(&self) -> Result<Vec<PathBuf>, ConfigError> {
        let direct = self.dir.join(FILE_NAME);
        if direct.exists() || self.mode == Mode::Sidecar {
            return Ok(vec![direct]);
        }
        let entries = std::fs::read_dir(&self.dir).map_err(|source| ConfigError::Read {
            path: self.dir.clone(),
            source,
        })?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .map(|e| e.path().join(FILE_NAME))
            .filter(|p| p.exists())
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(ConfigError::Missing {
                path: self.dir.clone(),
            });
        }
        Ok(files)
    }

    /// Re-reads every file; returns the new set when anything changed.
    pub fn reload(&mut self) -> (Option<ConfigSet>, Outcome) {
        let mut outcome = Outcome::default();
        let files = match self.discover() {
            Ok(files) => files,
            Err(e) => {
                outcome.errors.push(e);
                return (None, outcome);
            }
        };
        let mut known = HashMap::new();
        let mut refused = HashMap::new();
        for path in files {
            match std::fs::read(&path) {
                Ok(bytes) => {
                    let digest: [u8; 32] = Sha256::digest(&bytes).into();
                    let previous = self.known.get(&path);
                    if let Some(unchanged) = previous.filter(|(old, _)| *old == digest) {
                        known.insert(path, unchanged.clone());
                        continue;
                    }
                    let refused_before = self.refused.get(&path) == Some(&digest);
                    let compiled = if refused_before {
                        None
                    } else {
                        match self.compile(&path, &bytes) {
                            Ok(tenant) => Some(tenant),
                            Err(e) => {
                                outcome.errors.push(e);
                                None
                            }
                        }
                    };
                    match compiled {
                        Some(tenant) => {
                            outcome.changed = true;
                            known.insert(path, (digest, Arc::new(tenant)));
                        }
                        None => {
                            if let Some(prev) = previous {
                                known.insert(path.clone(), prev.clone());
                            }
                            refused.insert(path, digest);
                        }
                    }
                }
                Err(source) => {
                    if let Some(prev) = self.known.get(&path) {
                        known.insert(path.clone(), prev.clone());
                    }
                    outcome.errors.push(ConfigError::Read { path, source });
                }
            }
        }
        outcome.changed |=
            known.len() != self.known.len() || known.keys().any(|k| !self.known.contains_key(k));
        self.known = known;
        self.refused = refused;
        if !outcome.changed {
            return (None, outcome);
        }
        let mut tenants: Vec<_> = self
            .known
            .iter()
            .map(|(p, (_, t))| (p.clone(), t.clone()))
            .collect();
        tenants.sort_by(|a, b| a.0.cmp(&b.0));
        (
            Some(ConfigSet::new(
                tenants.into_iter().map(|(_, t)| t).collect(),
            )),
            outcome,
        )
    }

    fn compile(&self, path: &Path, bytes: &[u8]) -> Result<Tenant, ConfigError> {
        compile(bytes, &self.limiters).map_err(|e| match e {
            CompileError::Parse(message) => ConfigError::Parse {
                path: path.to_path_buf(),
                message,
            },
            CompileError::Compile(source) => ConfigError::Compile {
                path: path.to_path_buf(),
                source,
            },
        })
    }
}

/// Why the bytes of one `proxy.json` were refused, whatever they were read from (a file here,
/// a Secret in `kube_source`). Never holds a value from the file.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    /// serde's message with quoted values removed.
    #[error("failed to parse {FILE_NAME}: {0}")]
    Parse(String),
    #[error("failed to compile {FILE_NAME}: {0}")]
    Compile(TenantError),
}

/// Parses and compiles one `proxy.json`: the one path from bytes to a served ClaudeKey.
pub fn compile(bytes: &[u8], limiters: &Limiters) -> Result<Tenant, CompileError> {
    let config: ProxyConfig =
        serde_json::from_slice(bytes).map_err(|e| CompileError::Parse(scrub(&e.to_string())))?;
    Tenant::compile(&config, limiters).map_err(CompileError::Compile)
}

/// Removes every double-quoted part of a serde message: an "invalid type: string \"…\"" error
/// would otherwise quote whatever value was in the file, keys included.
fn scrub(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut quoted = false;
    for c in message.chars() {
        if c == '"' {
            if !quoted {
                out.push_str("\"…\"");
            }
            quoted = !quoted;
        } else if !quoted {
            out.push(c);
        }
    }
    out
}

/// Loads once, stores the result, and logs why when something was refused.
pub fn reload_into(loader: &mut Loader, store: &Store, metrics: &Metrics) {
    let (set, outcome) = loader.reload();
    for e in &outcome.errors {
        tracing::warn!(error = %e, "keeping the last good proxy config");
    }
    if let Some(set) = set {
        let names: Vec<&str> = set.tenants.iter().map(|t| &*t.label).collect();
        tracing::info!(claudekeys = ?names, "proxy config loaded");
        store.store(Some(Arc::new(set)));
    }
    if outcome.attempted() {
        metrics.config_reload(outcome.errors.is_empty());
    }
}

/// Watches the directory (recursively, for gateway sub-directories) and reloads on any change,
/// plus every `poll` in case an event was missed. Runs until `shutdown` resolves.
pub fn spawn_watcher(
    mut loader: Loader,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    poll: Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<tokio::task::JoinHandle<()>, ConfigError> {
    let mut watch =
        DirWatch::start(&loader.dir, notify::RecursiveMode::Recursive).map_err(|source| {
            ConfigError::Watch {
                path: loader.dir.clone(),
                source,
            }
        })?;
    Ok(tokio::spawn(async move {
        let mut ticker = tokio::time::interval(poll);
        ticker.tick().await;
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => return,
                _ = ticker.tick() => {}
                Some(()) = watch.changed() => {}
            }
            reload_into(&mut loader, &store, &metrics);
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::sha256_hex;

    pub(crate) fn config_json(name: &str, upstream: &str, workload: &str) -> String {
        serde_json::json!({
            "claudeKey": { "namespace": "team-a", "name": name },
            "upstream": [{ "key": upstream, "fingerprint": "up:1", "validUntil": null }],
            "workloadKeys": [{ "sha256": sha256_hex(workload), "fingerprint": "ck:1", "validUntil": null }],
            "policy": {}
        })
        .to_string()
    }

    fn loader(dir: &Path, mode: Mode) -> Loader {
        Loader::new(dir.to_path_buf(), mode, Arc::default())
    }

    #[test]
    fn loads_a_direct_file_and_skips_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(FILE_NAME),
            config_json("a", "sk-ant-api03-x", "ck_live_a"),
        )
        .unwrap();
        let mut l = loader(dir.path(), Mode::Sidecar);
        let (set, outcome) = l.reload();
        assert!(outcome.errors.is_empty());
        assert_eq!(&*set.unwrap().tenants[0].label, "team-a/a");
        let (set, outcome) = l.reload();
        assert!(set.is_none() && !outcome.changed);
    }

    #[test]
    fn gateway_loads_one_claudekey_per_subdirectory() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["a", "b"] {
            std::fs::create_dir(dir.path().join(name)).unwrap();
            std::fs::write(
                dir.path().join(name).join(FILE_NAME),
                config_json(name, "sk-ant-api03-x", name),
            )
            .unwrap();
        }
        std::fs::create_dir(dir.path().join("..data")).unwrap();
        let (set, _) = loader(dir.path(), Mode::Gateway).reload();
        let labels: Vec<_> = set
            .unwrap()
            .tenants
            .iter()
            .map(|t| t.label.to_string())
            .collect();
        assert_eq!(labels, ["team-a/a", "team-a/b"]);
    }

    #[test]
    fn bad_file_keeps_last_good_and_never_prints_values() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(FILE_NAME);
        std::fs::write(&file, config_json("a", "sk-ant-api03-good", "k")).unwrap();
        let mut l = loader(dir.path(), Mode::Sidecar);
        assert!(l.reload().0.is_some());
        std::fs::write(
            &file,
            r#"{"claudeKey": {"namespace": "sk-ant-api03-leak", "name": 5}}"#,
        )
        .unwrap();
        let (set, outcome) = l.reload();
        assert!(set.is_none());
        let message = outcome.errors[0].to_string();
        assert!(message.starts_with("failed to parse"), "{message}");
        assert!(!message.contains("sk-ant-api03-leak"), "{message}");
        assert_eq!(l.known.len(), 1);
    }

    /// An unchanged bad file is refused once, not compiled and logged again at every poll; a
    /// change to it is read again, bad or good.
    #[test]
    fn a_refused_file_is_compiled_again_only_once_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(FILE_NAME);
        let good = config_json("a", "sk-ant-api03-x", "k");
        let bad = good.replace(&sha256_hex("k"), "zz");
        std::fs::write(&file, &bad).unwrap();
        let mut l = loader(dir.path(), Mode::Sidecar);
        let (set, outcome) = l.reload();
        assert!(set.is_none() && outcome.attempted());
        assert_eq!(outcome.errors.len(), 1);
        for _ in 0..3 {
            let (set, outcome) = l.reload();
            assert!(
                set.is_none() && !outcome.attempted(),
                "{:?}",
                outcome.errors
            );
        }
        std::fs::write(&file, bad.replace("\"zz\"", "\"zy\"")).unwrap();
        assert_eq!(
            l.reload().1.errors.len(),
            1,
            "a changed bad file is reported again"
        );
        assert!(!l.reload().1.attempted());
        std::fs::write(&file, &good).unwrap();
        let (set, outcome) = l.reload();
        assert!(set.is_some() && outcome.errors.is_empty());
        // The bad content again, after a good one: refused and reported again, the good one kept.
        std::fs::write(&file, &bad).unwrap();
        let (set, outcome) = l.reload();
        assert!(set.is_none() && outcome.errors.len() == 1);
        assert_eq!(l.known.len(), 1);
    }

    #[test]
    fn bad_hash_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let bad = config_json("a", "sk-ant-api03-x", "k").replace(&sha256_hex("k"), "zz");
        std::fs::write(dir.path().join(FILE_NAME), bad).unwrap();
        let (set, outcome) = loader(dir.path(), Mode::Sidecar).reload();
        assert!(set.is_none());
        assert!(
            outcome.errors[0]
                .to_string()
                .contains("workload key hash ck:1")
        );
    }

    #[test]
    fn scrub_removes_quoted_values() {
        assert_eq!(
            scrub(r#"invalid type: string "sk-ant-x", expected u32 at line 1"#),
            r#"invalid type: string "…", expected u32 at line 1"#
        );
    }
}
