//! The process-wide rustls crypto provider. The AWS SDK brings aws-lc-rs beside the ring that
//! kube, hyper-rustls and our servers use; with two present rustls refuses to choose, so we do.

/// Installs ring as the default provider; idempotent, safe to call from every entry point and test.
pub fn install_default_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
