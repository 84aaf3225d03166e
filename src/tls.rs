//! A serving certificate (the webhook's, the gateway proxy's), re-read from its files when they
//! change, so cert-manager (or a Secret update) rotates it without a restart. A half-written or
//! mismatched pair is ignored and the last good certificate keeps serving. Also the client side
//! of a private CA: a rustls client that trusts only a given PEM bundle.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

/// How often, at most, a handshake triggers a look at the files.
const CHECK_INTERVAL: Duration = Duration::from_millis(500);

/// Why a certificate could not be loaded. Never contains key material.
#[derive(thiserror::Error, Debug)]
pub enum TlsError {
    /// A file could not be read.
    #[error("failed to read {path}: {source}")]
    Read {
        /// Which file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The PEM did not hold what we need.
    #[error("failed to parse {path}: {reason}")]
    Parse {
        /// Which file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// rustls refused the pair (e.g. the key does not match the certificate).
    #[error("failed to use certificate {cert} with key {key}: {source}")]
    Rustls {
        /// Certificate file.
        cert: PathBuf,
        /// Key file.
        key: PathBuf,
        /// Why.
        source: rustls::Error,
    },
}

struct Loaded {
    key: Arc<CertifiedKey>,
    digest: [u8; 32],
}

/// A [`ResolvesServerCert`] that serves the pair currently on disk.
pub struct ReloadingResolver {
    cert_path: PathBuf,
    key_path: PathBuf,
    provider: Arc<CryptoProvider>,
    current: ArcSwap<Loaded>,
    last_check: Mutex<Instant>,
}

impl std::fmt::Debug for ReloadingResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadingResolver")
            .field("cert_path", &self.cert_path)
            .field("key_path", &self.key_path)
            .finish()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn digest(cert: &[u8], key: &[u8]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(cert);
    hasher.update([0]);
    hasher.update(key);
    hasher.finalize().into()
}

impl ReloadingResolver {
    /// Loads the pair once; the first load must succeed, later failures keep the old pair.
    pub fn new(
        cert_path: impl Into<PathBuf>,
        key_path: impl Into<PathBuf>,
    ) -> Result<Arc<Self>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cert_path = cert_path.into();
        let key_path = key_path.into();
        let (cert, key) = (read(&cert_path)?, read(&key_path)?);
        let loaded = load(&cert_path, &key_path, &cert, &key, &provider)?;
        Ok(Arc::new(Self {
            cert_path,
            key_path,
            provider,
            current: ArcSwap::from_pointee(loaded),
            last_check: Mutex::new(Instant::now()),
        }))
    }

    /// Re-reads the files if their content changed; returns whether a new pair is now served.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let (cert, key) = (read(&self.cert_path)?, read(&self.key_path)?);
        if digest(&cert, &key) == self.current.load().digest {
            return Ok(false);
        }
        let loaded = load(&self.cert_path, &self.key_path, &cert, &key, &self.provider)?;
        self.current.store(Arc::new(loaded));
        tracing::info!(cert = %self.cert_path.display(), "serving a new certificate");
        Ok(true)
    }

    fn maybe_reload(&self) {
        let Ok(mut last) = self.last_check.try_lock() else {
            return;
        };
        if last.elapsed() < CHECK_INTERVAL {
            return;
        }
        *last = Instant::now();
        if let Err(error) = self.reload_if_changed() {
            tracing::warn!(%error, "keeping the previous serving certificate");
        }
    }
}

fn load(
    cert_path: &Path,
    key_path: &Path,
    cert: &[u8],
    key: &[u8],
    provider: &CryptoProvider,
) -> Result<Loaded, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Parse {
            path: cert_path.to_path_buf(),
            reason: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::Parse {
            path: cert_path.to_path_buf(),
            reason: "no certificate in file".into(),
        });
    }
    // The error of a key parse never includes the key bytes, only what kind of problem it was.
    let private = PrivateKeyDer::from_pem_slice(key).map_err(|e| TlsError::Parse {
        path: key_path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let certified =
        CertifiedKey::from_der(chain, private, provider).map_err(|source| TlsError::Rustls {
            cert: cert_path.to_path_buf(),
            key: key_path.to_path_buf(),
            source,
        })?;
    Ok(Loaded {
        key: Arc::new(certified),
        digest: digest(cert, key),
    })
}

impl ResolvesServerCert for ReloadingResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.maybe_reload();
        Some(self.current.load().key.clone())
    }
}

/// A rustls server configuration (HTTP/2 and HTTP/1.1) over the reloading resolver.
pub fn server_config(resolver: Arc<ReloadingResolver>) -> Result<Arc<ServerConfig>, rustls::Error> {
    let provider = resolver.provider.clone();
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Why a CA bundle could not be used to verify a server.
#[derive(thiserror::Error, Debug)]
pub enum TrustError {
    /// The PEM could not be parsed.
    #[error("failed to parse the CA bundle: {0}")]
    Parse(String),
    /// The PEM held no certificate rustls accepts as a trust anchor.
    #[error("failed to find a usable CA certificate in the bundle")]
    Empty,
    /// rustls refused the configuration.
    #[error("failed to configure TLS: {0}")]
    Rustls(#[from] rustls::Error),
}

/// A rustls client configuration that trusts exactly the certificates in `ca_pem` (no system or
/// webpki roots): a private CA must not be widened to the public ones, nor the reverse.
pub fn client_config_trusting(ca_pem: &[u8]) -> Result<rustls::ClientConfig, TrustError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        let cert = cert.map_err(|e| TrustError::Parse(e.to_string()))?;
        roots
            .add(cert)
            .map_err(|e| TrustError::Parse(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(TrustError::Empty);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(cn: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params =
            rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        let cert = params.self_signed(&key).expect("cert");
        (cert.pem(), key.serialize_pem())
    }

    fn served_der(resolver: &ReloadingResolver) -> Vec<u8> {
        resolver.current.load().key.cert[0].to_vec()
    }

    #[test]
    fn reloads_changed_files_and_keeps_the_last_good_pair() {
        let dir = tempfile::tempdir().unwrap();
        let (cert_path, key_path) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        let (cert1, key1) = pair("one");
        std::fs::write(&cert_path, &cert1).unwrap();
        std::fs::write(&key_path, &key1).unwrap();
        let resolver = ReloadingResolver::new(&cert_path, &key_path).expect("first load");
        let first = served_der(&resolver);
        assert!(
            !resolver.reload_if_changed().unwrap(),
            "unchanged files are not reloaded"
        );

        // A half-finished update (new certificate, old key) is refused; the old pair stays.
        let (cert2, key2) = pair("two");
        std::fs::write(&cert_path, &cert2).unwrap();
        let error = resolver.reload_if_changed().unwrap_err();
        assert!(matches!(error, TlsError::Rustls { .. }), "{error}");
        assert_eq!(served_der(&resolver), first);

        std::fs::write(&key_path, &key2).unwrap();
        assert!(resolver.reload_if_changed().unwrap());
        assert_ne!(served_der(&resolver), first);
    }

    #[test]
    fn bad_files_fail_the_first_load_without_showing_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let (cert_path, key_path) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        let (cert, _) = pair("x");
        std::fs::write(&cert_path, &cert).unwrap();
        std::fs::write(
            &key_path,
            "-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let error = ReloadingResolver::new(&cert_path, &key_path)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("tls.key") || error.contains("tls.crt"),
            "{error}"
        );
        assert!(!error.contains("bm90IGEga2V5"), "{error}");
        let missing = ReloadingResolver::new(dir.path().join("nope.crt"), &key_path).unwrap_err();
        assert!(
            missing.to_string().starts_with("failed to read"),
            "{missing}"
        );
    }

    #[test]
    fn client_trusts_only_a_bundle_with_certificates() {
        let (cert, _) = pair("ca");
        assert!(client_config_trusting(cert.as_bytes()).is_ok());
        assert!(matches!(
            client_config_trusting(b"not pem at all"),
            Err(TrustError::Empty)
        ));
        assert!(client_config_trusting(b"").is_err());
    }
}
