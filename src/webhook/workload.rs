//! The objects the rules read (DESIGN.md §5, §10): every kind that embeds a pod spec, and
//! ConfigMaps, parsed from k8s-openapi types, with the JSON path of the pod spec inside each.

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{
    ConfigMap, Pod, PodSpec, PodTemplate, PodTemplateSpec, ReplicationController,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// The kinds the rules look at.
#[derive(Clone, Debug)]
pub enum Workload {
    /// A Pod.
    Pod(Box<Pod>),
    /// A Deployment's pod template.
    Deployment(Box<Deployment>),
    /// A StatefulSet's pod template.
    StatefulSet(Box<StatefulSet>),
    /// A DaemonSet's pod template.
    DaemonSet(Box<DaemonSet>),
    /// A ReplicaSet's pod template.
    ReplicaSet(Box<ReplicaSet>),
    /// A Job's pod template.
    Job(Box<Job>),
    /// A CronJob's job template's pod template.
    CronJob(Box<CronJob>),
    /// A bare PodTemplate (what some operators and `kubectl` templates create pods from).
    PodTemplate(Box<PodTemplate>),
    /// A ReplicationController's pod template.
    ReplicationController(Box<ReplicationController>),
    /// A ConfigMap: no pod spec, but its `data` and `binaryData` must not hold keys.
    ConfigMap(Box<ConfigMap>),
}

impl Workload {
    /// Parses `value` as the kind `kind` of API `group` (`""` for core); `Ok(None)` for
    /// kinds the rules do not cover, an error when a covered kind does not parse.
    pub fn from_parts(
        group: &str,
        kind: &str,
        value: serde_json::Value,
    ) -> Result<Option<Self>, serde_json::Error> {
        fn boxed<T: serde::de::DeserializeOwned>(
            v: serde_json::Value,
        ) -> Result<Box<T>, serde_json::Error> {
            serde_json::from_value(v).map(Box::new)
        }
        Ok(Some(match (group, kind) {
            ("", "Pod") => Self::Pod(boxed(value)?),
            ("apps", "Deployment") => Self::Deployment(boxed(value)?),
            ("apps", "StatefulSet") => Self::StatefulSet(boxed(value)?),
            ("apps", "DaemonSet") => Self::DaemonSet(boxed(value)?),
            ("apps", "ReplicaSet") => Self::ReplicaSet(boxed(value)?),
            ("batch", "Job") => Self::Job(boxed(value)?),
            ("batch", "CronJob") => Self::CronJob(boxed(value)?),
            ("", "PodTemplate") => Self::PodTemplate(boxed(value)?),
            ("", "ReplicationController") => Self::ReplicationController(boxed(value)?),
            ("", "ConfigMap") => Self::ConfigMap(boxed(value)?),
            _ => return Ok(None),
        }))
    }

    /// Parses a manifest by its own `apiVersion` and `kind` (what `scan` reads).
    pub fn from_manifest(value: serde_json::Value) -> Result<Option<Self>, serde_json::Error> {
        let api_version = value
            .get("apiVersion")
            .and_then(|v| v.as_str())
            .unwrap_or_default();
        let kind = value
            .get("kind")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string();
        let group = api_version
            .rsplit_once('/')
            .map_or("", |(g, _)| g)
            .to_string();
        Self::from_parts(&group, &kind, value)
    }

    /// The kind, as users write it.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Pod(_) => "Pod",
            Self::Deployment(_) => "Deployment",
            Self::StatefulSet(_) => "StatefulSet",
            Self::DaemonSet(_) => "DaemonSet",
            Self::ReplicaSet(_) => "ReplicaSet",
            Self::Job(_) => "Job",
            Self::CronJob(_) => "CronJob",
            Self::PodTemplate(_) => "PodTemplate",
            Self::ReplicationController(_) => "ReplicationController",
            Self::ConfigMap(_) => "ConfigMap",
        }
    }

    /// The object's own metadata.
    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            Self::Pod(o) => &o.metadata,
            Self::Deployment(o) => &o.metadata,
            Self::StatefulSet(o) => &o.metadata,
            Self::DaemonSet(o) => &o.metadata,
            Self::ReplicaSet(o) => &o.metadata,
            Self::Job(o) => &o.metadata,
            Self::CronJob(o) => &o.metadata,
            Self::PodTemplate(o) => &o.metadata,
            Self::ReplicationController(o) => &o.metadata,
            Self::ConfigMap(o) => &o.metadata,
        }
    }

    /// `Kind/name` (or `Kind/<generateName>…` before the apiserver names it).
    pub fn resource(&self) -> String {
        let meta = self.metadata();
        let name = match (&meta.name, &meta.generate_name) {
            (Some(name), _) if !name.is_empty() => name.clone(),
            (_, Some(prefix)) => format!("{prefix}…"),
            _ => "<unnamed>".to_string(),
        };
        format!("{}/{name}", self.kind())
    }

    /// The pod metadata and spec the rules check: the Pod's own, or the template's.
    pub fn pod(&self) -> Option<(Option<&ObjectMeta>, &PodSpec)> {
        self.pod_at().map(|(meta, spec, _)| (meta, spec))
    }

    /// Like [`Self::pod`], plus the JSON path of the pod spec in the object
    /// (`spec.template.spec`), which findings extend to name the offending field.
    pub fn pod_at(&self) -> Option<(Option<&ObjectMeta>, &PodSpec, &'static str)> {
        let (template, path): (Option<&PodTemplateSpec>, &'static str) = match self {
            Self::Pod(o) => return o.spec.as_ref().map(|s| (Some(&o.metadata), s, "spec")),
            Self::ConfigMap(_) => return None,
            Self::Deployment(o) => (o.spec.as_ref().map(|s| &s.template), "spec.template.spec"),
            Self::StatefulSet(o) => (o.spec.as_ref().map(|s| &s.template), "spec.template.spec"),
            Self::DaemonSet(o) => (o.spec.as_ref().map(|s| &s.template), "spec.template.spec"),
            Self::ReplicaSet(o) => (
                o.spec.as_ref().and_then(|s| s.template.as_ref()),
                "spec.template.spec",
            ),
            Self::Job(o) => (o.spec.as_ref().map(|s| &s.template), "spec.template.spec"),
            Self::CronJob(o) => (
                o.spec
                    .as_ref()
                    .and_then(|s| s.job_template.spec.as_ref())
                    .map(|s| &s.template),
                "spec.jobTemplate.spec.template.spec",
            ),
            Self::PodTemplate(o) => (o.template.as_ref(), "template.spec"),
            Self::ReplicationController(o) => (
                o.spec.as_ref().and_then(|s| s.template.as_ref()),
                "spec.template.spec",
            ),
        };
        let template = template?;
        template
            .spec
            .as_ref()
            .map(|s| (template.metadata.as_ref(), s, path))
    }
}
