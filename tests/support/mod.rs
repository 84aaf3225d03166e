//! Shared helpers for tests that talk to the real control plane started by `hack/test.sh`
//! (etcd + kube-apiserver + kube-controller-manager). They fail loudly when it is missing.
#![allow(dead_code)]

use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{
    Api, Client, Config, ResourceExt,
    api::{ObjectMeta, Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::wait::{await_condition, conditions},
};

/// Environment variable naming the kubeconfig of the test control plane.
pub const KUBECONFIG_ENV: &str = "CLAUDEKEY_TEST_KUBECONFIG";

/// A client for the test control plane. Panics (fails the test) when there is none:
/// cluster tests must never pass by skipping.
pub async fn client() -> Client {
    claudekey::crypto::install_default_provider();
    let path = std::env::var(KUBECONFIG_ENV).unwrap_or_else(|_| {
        panic!("{KUBECONFIG_ENV} is not set: run cluster tests through hack/test.sh, which starts the control plane")
    });
    let kubeconfig = Kubeconfig::read_from(&path)
        .unwrap_or_else(|e| panic!("cannot read kubeconfig {path}: {e}"));
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap_or_else(|e| panic!("bad kubeconfig {path}: {e}"));
    let client = Client::try_from(config).expect("client from kubeconfig");
    client
        .apiserver_version()
        .await
        .unwrap_or_else(|e| panic!("the test control plane at {path} does not answer: {e}"));
    client
}

/// Installs (server-side apply) every generated CRD and waits until each is established.
pub async fn install_crd(client: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in claudekey::crd::crds() {
        let name = crd.name_any();
        crds.patch(
            &name,
            &PatchParams::apply("claudekey-tests").force(),
            &Patch::Apply(&crd),
        )
        .await
        .expect("apply CRD");
        tokio::time::timeout(
            Duration::from_secs(30),
            await_condition(crds.clone(), &name, conditions::is_crd_established()),
        )
        .await
        .expect("CRD established in time")
        .expect("watch CRD");
    }
}

/// A fresh namespace with a unique name, so tests never see each other's objects.
pub async fn namespace(client: &Client, prefix: &str) -> String {
    let name = format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .expect("create test namespace");
    name
}

/// Polls `check` until it returns Some or `timeout` passes; for conditions no watch expresses.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
