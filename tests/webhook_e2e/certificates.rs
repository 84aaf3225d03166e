//! The webhook's serving certificate: replaced files are served to new connections without a
//! restart, and the apiserver, given the new caBundle, reaches the same running server.

use std::sync::Arc;

use claudekey::webhook::Mode;
use kube::api::PostParams;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{Harness, WAIT, deployment, install_pki, new_pki, raw_key, support};

/// GET /healthz trusting only `ca_pem`: proves which certificate the server presents.
async fn healthz_with_ca(port: u16, ca_pem: &str) -> Result<String, String> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots
            .add(cert.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").map_err(|e| e.to_string())?;
    let mut tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut out = String::new();
    tls.read_to_string(&mut out)
        .await
        .map_err(|e| e.to_string())?;
    Ok(out)
}

#[tokio::test]
async fn replaced_certificate_files_are_served_without_restart() {
    let h = Harness::start(Mode::Enforce, "wh-rotate").await;
    let pki = new_pki("claudekey e2e CA 2");
    assert!(
        healthz_with_ca(h.port, &pki.ca_pem).await.is_err(),
        "the new CA cannot verify the old certificate"
    );

    install_pki(h.dir.path(), &pki);
    h.register(&pki.ca_pem).await;
    let port = h.port;
    let ca = pki.ca_pem.clone();
    let answer = support::eventually(WAIT, "the server to present the new certificate", || {
        let ca = ca.clone();
        async move { healthz_with_ca(port, &ca).await.ok() }
    })
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // And the apiserver, now trusting only the new CA, reaches the same running server.
    let api = h.deployments();
    let message = support::eventually(
        WAIT,
        "the apiserver to reach the webhook with the new CA",
        || {
            let api = api.clone();
            async move {
                match api
                    .create(
                        &PostParams::default(),
                        &deployment("after-rotation", &raw_key()),
                    )
                    .await
                {
                    Err(kube::Error::Api(e))
                        if e.message.contains("claudekey: Deployment/after-rotation") =>
                    {
                        Some(e.message)
                    }
                    _ => None,
                }
            }
        },
    )
    .await;
    assert!(!message.contains(&raw_key()));
    h.cleanup().await;
}
