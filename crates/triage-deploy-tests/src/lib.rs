//! Test support for the deployment artefacts: renders the Helm chart with the real `helm`
//! binary, loads each rendered `config.toml` the way the services do, reads the Dockerfile, and
//! runs the chart's containers with podman.
//!
//! # Layout
//! - [`render`]: `helm template` of `helm/ticket-triage` into parsed manifests ([`Rendered`]).
//! - [`Rendered`]: look-ups by kind and name, a pod's environment with Secret references resolved.
//! - [`load_config`]: a config file plus environment through `triage_runtime::config::load`.
//! - [`compose_file`]: deploy/docker-compose.yml with its merge keys applied.
//! - [`dockerfile`]: the Dockerfile's stages, ports, user and entrypoints.
//! - [`podman`]: a rendered Deployment's container run by podman as a kubelet would run it.
//!
//! `helm` is the one deploy/helm-check.sh installs into `.local/bin`; without it the tests fail
//! and say how to get it, rather than skip.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
};

use serde::Deserialize;
use serde_json::Value;
use triage_runtime::config::{ConfigError, Validate};

pub mod dockerfile;
pub mod podman;

/// The Kubernetes version the chart is rendered for (the one deploy/helm-check.sh validates).
pub const KUBE_VERSION: &str = "1.33.0";

/// Every value set under `helm/ticket-triage/ci/` (the ones deploy/helm-check.sh lints and
/// templates), read from the folder so that a new one is tested without being registered.
pub fn value_sets() -> Vec<String> {
    let mut sets: Vec<String> = std::fs::read_dir(chart_dir().join("ci"))
        .expect("helm/ticket-triage/ci")
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter(|name| name.ends_with("-values.yaml"))
        .collect();
    sets.sort();
    assert!(
        !sets.is_empty(),
        "no value sets under helm/ticket-triage/ci"
    );
    sets
}

/// The workspace root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("the crate lives two levels below the workspace root")
        .to_path_buf()
}

/// The chart's directory.
pub fn chart_dir() -> PathBuf {
    repo_root().join("helm/ticket-triage")
}

/// The project-local helm binary; panics with the way to install it when it is missing.
pub fn helm_binary() -> PathBuf {
    let helm = repo_root().join(".local/bin/helm");
    assert!(
        helm.exists(),
        "{} is missing: run deploy/helm-check.sh (make test does) to install helm",
        helm.display()
    );
    helm
}

/// Every manifest `helm template` rendered, in order.
#[derive(Debug)]
pub struct Rendered {
    pub manifests: Vec<Value>,
    /// The release namespace the chart was rendered for.
    pub namespace: String,
}

/// The values files under `helm/ticket-triage/ci/` a test renders with, e.g. `["direct-values.yaml"]`,
/// plus `--set` pairs. The release is called `triage` in namespace `triage`.
pub fn render(values_files: &[&str], set: &[&str]) -> Result<Rendered, String> {
    let paths: Vec<PathBuf> = values_files
        .iter()
        .map(|file| chart_dir().join("ci").join(file))
        .collect();
    render_paths(&paths, set)
}

/// [`render`] with values files anywhere (a test's own, written at run time).
pub fn render_paths(values_files: &[PathBuf], set: &[&str]) -> Result<Rendered, String> {
    let namespace = "triage";
    let mut command = Command::new(helm_binary());
    command
        .arg("template")
        .arg("triage")
        .arg(chart_dir())
        .args(["--namespace", namespace])
        .args(["--kube-version", KUBE_VERSION]);
    for file in values_files {
        command.arg("--values").arg(file);
    }
    for pair in set {
        command.args(["--set", pair]);
    }
    let output = command
        .output()
        .map_err(|e| format!("failed to run helm: {e}"))?;
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).into_owned());
    }
    let text = String::from_utf8(output.stdout).map_err(|e| e.to_string())?;
    Ok(Rendered {
        manifests: parse_manifests(&text)?,
        namespace: namespace.to_owned(),
    })
}

/// The objects of a multi-document YAML stream (`helm template`, `helm get manifest`).
pub fn parse_manifests(text: &str) -> Result<Vec<Value>, String> {
    let mut manifests = Vec::new();
    for document in serde_norway::Deserializer::from_str(text) {
        let value = Value::deserialize(document).map_err(|e| format!("rendered YAML: {e}"))?;
        if !value.is_null() {
            manifests.push(value);
        }
    }
    Ok(manifests)
}

impl Rendered {
    pub fn of_kind(&self, kind: &str) -> impl Iterator<Item = &Value> {
        let kind = kind.to_owned();
        self.manifests
            .iter()
            .filter(move |m| m["kind"] == kind.as_str())
    }

    /// Every object that runs pods: Deployments and StatefulSets (the dispatcher is one, for its
    /// stable transactional id).
    pub fn workloads(&self) -> impl Iterator<Item = &Value> {
        self.manifests
            .iter()
            .filter(|m| m["kind"] == "Deployment" || m["kind"] == "StatefulSet")
    }

    pub fn get(&self, kind: &str, name: &str) -> Option<&Value> {
        self.of_kind(kind).find(|m| m["metadata"]["name"] == name)
    }

    /// Names of the objects of one kind.
    pub fn names(&self, kind: &str) -> Vec<String> {
        self.of_kind(kind)
            .filter_map(|m| m["metadata"]["name"].as_str().map(str::to_owned))
            .collect()
    }

    /// The decoded `data` of a rendered Secret.
    pub fn secret_data(&self, name: &str) -> Option<BTreeMap<String, String>> {
        let secret = self.get("Secret", name)?;
        let data = secret["data"].as_object()?;
        Some(
            data.iter()
                .map(|(key, value)| {
                    let decoded = base64_decode(value.as_str().unwrap_or_default());
                    (key.clone(), decoded)
                })
                .collect(),
        )
    }

    /// A Deployment's first container's environment: plain values as they are, Secret references
    /// resolved against the rendered Secrets or, for Secrets the chart does not render (an
    /// `existingSecret`), against `existing` (`"secret/key"` → value). Field references are skipped.
    pub fn container_env(
        &self,
        deployment: &Value,
        existing: &BTreeMap<&str, &str>,
    ) -> Result<Vec<(String, String)>, String> {
        let container = &deployment["spec"]["template"]["spec"]["containers"][0];
        let mut env = Vec::new();
        for variable in container["env"].as_array().into_iter().flatten() {
            let name = variable["name"].as_str().unwrap_or_default().to_owned();
            if let Some(value) = variable["value"].as_str() {
                env.push((name, value.to_owned()));
                continue;
            }
            let reference = &variable["valueFrom"]["secretKeyRef"];
            if reference.is_null() {
                continue;
            }
            let secret = reference["name"].as_str().unwrap_or_default();
            let key = reference["key"].as_str().unwrap_or_default();
            let value = self
                .secret_data(secret)
                .and_then(|data| data.get(key).cloned())
                .or_else(|| {
                    existing
                        .get(format!("{secret}/{key}").as_str())
                        .map(|v| v.to_string())
                })
                .ok_or_else(|| format!("{name} refers to {secret}/{key}, which does not exist"))?;
            env.push((name, value));
        }
        Ok(env)
    }
}

fn base64_decode(text: &str) -> String {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .unwrap_or_default();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// deploy/docker-compose.yml with its YAML merge keys (`<<: *image`) applied, in each service
/// and in each service's environment.
pub fn compose_file() -> serde_norway::Value {
    let path = repo_root().join("deploy/docker-compose.yml");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let mut document: serde_norway::Value =
        serde_norway::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    document.apply_merge().expect("merge keys");
    if let Some(services) = document["services"].as_mapping_mut() {
        for service in services.values_mut() {
            service.apply_merge().expect("merge keys");
            if let Some(environment) = service.get_mut("environment") {
                environment.apply_merge().expect("merge keys");
            }
        }
    }
    document
}

/// Loads a service's configuration exactly as the binary does (`--config FILE` and the given
/// `TRIAGE_*` environment) inside a `figment::Jail`, so the environment of other tests is not
/// touched. Validation problems about files that exist only in the pod (mounted Secrets under
/// `/etc/triage/`) are dropped; every other problem, and every unknown key, is an error.
// figment::Jail fixes the closure's error type to its own large `figment::Error`.
#[allow(clippy::result_large_err)]
pub fn load_config<C>(config_toml: &str, env: &[(String, String)]) -> Result<C, String>
where
    C: Default + serde::Serialize + serde::de::DeserializeOwned + Validate,
{
    let mut outcome = Err("the jail did not run".to_owned());
    figment::Jail::expect_with(|jail| {
        jail.create_file("config.toml", config_toml)?;
        for (name, value) in env {
            jail.set_env(name, value);
        }
        let args = vec![
            "svc".to_owned(),
            "--config".to_owned(),
            "config.toml".to_owned(),
        ];
        outcome = match triage_runtime::config::load::<C>(args) {
            Ok(config) => Ok(config),
            Err(ConfigError::Invalid(problems)) => {
                let remaining: Vec<_> = problems
                    .into_iter()
                    .filter(|p| !p.contains("/etc/triage/"))
                    .collect();
                if remaining.is_empty() {
                    // Only pod-only files were missing: the rest is valid, so deserialise without
                    // validation to hand the config back.
                    use figment::providers::{Format, Serialized, Toml};
                    figment::Figment::from(Serialized::defaults(C::default()))
                        .merge(Toml::string(config_toml))
                        .extract::<C>()
                        .map_err(|e| e.to_string())
                } else {
                    Err(remaining.join("; "))
                }
            }
            Err(error) => Err(error.to_string()),
        };
        Ok(())
    });
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;
    use triage_runtime::config::{AdminConfig, KafkaConfig};

    #[derive(Debug, Default, serde::Deserialize, serde::Serialize)]
    #[serde(deny_unknown_fields, default)]
    struct Sample {
        kafka: KafkaConfig,
        admin: AdminConfig,
    }

    impl Validate for Sample {
        fn validate(&self, problems: &mut Vec<String>) {
            self.kafka.validate(problems);
            self.admin.validate(problems);
        }
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors_and_the_environment_counts() {
        let error =
            load_config::<Sample>("[kafka]\nbootstrap_server = \"x:9092\"\n", &[]).unwrap_err();
        assert!(error.contains("bootstrap_server"), "{error}");
        let error = load_config::<Sample>("[admin]\ndrain_timeout = \"0s\"\n", &[]).unwrap_err();
        assert!(error.contains("admin.drain_timeout"), "{error}");
        let env = [("TRIAGE_KAFKA__SASL_PASSWORD".to_owned(), "pw".to_owned())];
        let toml = "[kafka]\nsecurity_protocol = \"sasl_ssl\"\nsasl_username = \"u\"\n";
        assert!(
            load_config::<Sample>(toml, &[]).is_err(),
            "a missing password is a problem"
        );
        let config = load_config::<Sample>(toml, &env).unwrap();
        assert_eq!(config.kafka.sasl_password.unwrap().expose(), "pw");
    }

    #[test]
    fn only_problems_with_pod_files_are_forgiven() {
        #[derive(Debug, Default, serde::Deserialize, serde::Serialize)]
        #[serde(default)]
        struct WithFile {
            path: String,
        }
        impl Validate for WithFile {
            fn validate(&self, problems: &mut Vec<String>) {
                if !self.path.is_empty() && !Path::new(&self.path).exists() {
                    problems.push(format!("path: cannot read {}", self.path));
                }
            }
        }
        let config: WithFile = load_config("path = \"/etc/triage/secrets/x\"\n", &[]).unwrap();
        assert_eq!(config.path, "/etc/triage/secrets/x");
        assert!(load_config::<WithFile>("path = \"/nonexistent/x\"\n", &[]).is_err());
    }
}
