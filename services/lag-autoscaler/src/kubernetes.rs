//! The Deployments' `scale` subresource (`autoscaling/v1` Scale) through the Kubernetes API.

use std::path::Path;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use serde_json::json;

use crate::config::{DirectConfig, WorkloadKind};

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("cannot load the Kubernetes client configuration: {0}")]
    Config(String),
    #[error("cannot build the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
    #[error("cannot read the scale of {kind} {deployment}: {source}")]
    Read {
        kind: &'static str,
        deployment: String,
        #[source]
        source: kube::Error,
    },
    #[error("cannot patch the scale of {kind} {deployment}: {source}")]
    Patch {
        kind: &'static str,
        deployment: String,
        #[source]
        source: kube::Error,
    },
}

/// The Deployments and StatefulSets of one namespace.
#[derive(Clone)]
pub struct Deployments {
    api: Api<Deployment>,
    stateful_sets: Api<StatefulSet>,
    namespace: String,
}

/// A client from `kubeconfig`, or in-cluster configuration, then the default kubeconfig, with
/// the default namespace of that configuration. No request is made yet.
pub async fn client(kubeconfig: Option<&Path>) -> Result<(Client, String), KubeError> {
    let kube_config = match kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path)
                .map_err(|e| KubeError::Config(format!("{}: {e}", path.display())))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .map_err(|e| KubeError::Config(format!("{}: {e}", path.display())))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| KubeError::Config(e.to_string()))?,
    };
    let namespace = kube_config.default_namespace.clone();
    let client = Client::try_from(kube_config).map_err(KubeError::Client)?;
    Ok((client, namespace))
}

impl Deployments {
    /// Connects with `config.kubeconfig`, or in-cluster configuration, then the default
    /// kubeconfig. No request is made yet.
    pub async fn connect(config: &DirectConfig) -> Result<Self, KubeError> {
        let (client, default_namespace) = client(config.kubeconfig.as_deref()).await?;
        let namespace = config.namespace.clone().unwrap_or(default_namespace);
        Ok(Deployments {
            api: Api::namespaced(client.clone(), &namespace),
            stateful_sets: Api::namespaced(client, &namespace),
            namespace,
        })
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The workload's desired replica count (`spec.replicas` of its Scale).
    pub async fn replicas(&self, kind: WorkloadKind, deployment: &str) -> Result<u32, KubeError> {
        let scale = match kind {
            WorkloadKind::Deployment => self.api.get_scale(deployment).await,
            WorkloadKind::StatefulSet => self.stateful_sets.get_scale(deployment).await,
        }
        .map_err(|source| KubeError::Read {
            kind: kind.as_str(),
            deployment: deployment.to_owned(),
            source,
        })?;
        let replicas = scale.spec.and_then(|spec| spec.replicas).unwrap_or(0);
        Ok(u32::try_from(replicas).unwrap_or(0))
    }

    /// Sets `spec.replicas` with a JSON merge patch of the `scale` subresource, which touches
    /// nothing else of the Deployment (and works whoever owns its other fields).
    pub async fn scale(
        &self,
        kind: WorkloadKind,
        deployment: &str,
        replicas: u32,
    ) -> Result<(), KubeError> {
        let patch = json!({ "spec": { "replicas": replicas } });
        let params = PatchParams::default();
        match kind {
            WorkloadKind::Deployment => self
                .api
                .patch_scale(deployment, &params, &Patch::Merge(&patch))
                .await
                .map(drop),
            WorkloadKind::StatefulSet => self
                .stateful_sets
                .patch_scale(deployment, &params, &Patch::Merge(&patch))
                .await
                .map(drop),
        }
        .map_err(|source| KubeError::Patch {
            kind: kind.as_str(),
            deployment: deployment.to_owned(),
            source,
        })?;
        Ok(())
    }
}
