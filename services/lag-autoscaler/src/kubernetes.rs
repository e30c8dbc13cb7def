//! The Deployments' `scale` subresource (`autoscaling/v1` Scale) through the Kubernetes API.

use k8s_openapi::api::apps::v1::Deployment;
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use serde_json::json;

use crate::config::DirectConfig;

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("cannot load the Kubernetes client configuration: {0}")]
    Config(String),
    #[error("cannot build the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
    #[error("cannot read the scale of deployment {deployment}: {source}")]
    Read {
        deployment: String,
        #[source]
        source: kube::Error,
    },
    #[error("cannot patch the scale of deployment {deployment}: {source}")]
    Patch {
        deployment: String,
        #[source]
        source: kube::Error,
    },
}

/// The Deployments of one namespace.
#[derive(Clone)]
pub struct Deployments {
    api: Api<Deployment>,
    namespace: String,
}

impl Deployments {
    /// Connects with `config.kubeconfig`, or in-cluster configuration, then the default
    /// kubeconfig. No request is made yet.
    pub async fn connect(config: &DirectConfig) -> Result<Self, KubeError> {
        let kube_config = match &config.kubeconfig {
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
        let namespace = config
            .namespace
            .clone()
            .unwrap_or_else(|| kube_config.default_namespace.clone());
        let client = Client::try_from(kube_config).map_err(KubeError::Client)?;
        Ok(Deployments {
            api: Api::namespaced(client, &namespace),
            namespace,
        })
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The Deployment's desired replica count (`spec.replicas` of its Scale).
    pub async fn replicas(&self, deployment: &str) -> Result<u32, KubeError> {
        let scale = self
            .api
            .get_scale(deployment)
            .await
            .map_err(|source| KubeError::Read {
                deployment: deployment.to_owned(),
                source,
            })?;
        let replicas = scale.spec.and_then(|spec| spec.replicas).unwrap_or(0);
        Ok(u32::try_from(replicas).unwrap_or(0))
    }

    /// Sets `spec.replicas` with a JSON merge patch of the `scale` subresource, which touches
    /// nothing else of the Deployment (and works whoever owns its other fields).
    pub async fn scale(&self, deployment: &str, replicas: u32) -> Result<(), KubeError> {
        let patch = json!({ "spec": { "replicas": replicas } });
        self.api
            .patch_scale(deployment, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|source| KubeError::Patch {
                deployment: deployment.to_owned(),
                source,
            })?;
        Ok(())
    }
}
