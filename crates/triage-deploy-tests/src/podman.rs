//! A rendered Deployment's container run with podman under the conditions its pod spec sets, the
//! part of a kubelet that matters for an image: the command and args, the security context
//! (user, group, read-only root, capabilities, privilege escalation), the memory limit, the
//! environment with Secret references resolved, and each volume mount as files (ConfigMap and
//! Secret data, projected Secrets) or a tmpfs (emptyDir), with the modes and group ownership
//! (`fsGroup`) a kubelet gives them.
//!
//! Networking is the one difference: containers use the host's network (`--network=host`) to
//! reach the local stack on 127.0.0.1, so their listen addresses come from the environment the
//! caller adds to the chart (`extraEnv`); the chart's own ports are compared with the image's by
//! a test of their own.

use std::{
    collections::BTreeMap,
    io::Write as _,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::Path,
    process::{Command, Output},
    time::Duration,
};

use serde_json::Value;

use crate::{Rendered, repo_root};

/// `podman` with the project's settings for these machines (deploy/image/containers.conf).
pub fn podman() -> Command {
    let mut command = Command::new("podman");
    command.env(
        "CONTAINERS_CONF",
        repo_root().join("deploy/image/containers.conf"),
    );
    command
}

/// Runs `podman args...` and returns its stdout, or an error with its stderr.
pub fn podman_output(args: &[&str]) -> Result<String, String> {
    let output: Output = podman()
        .args(args)
        .output()
        .map_err(|e| format!("cannot run podman: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "podman {}: {}",
            args.first().copied().unwrap_or_default(),
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// One file a volume puts into the container, relative to the mount path.
#[derive(Clone, Debug)]
struct VolumeFile {
    path: String,
    contents: String,
}

/// A volume mount as podman takes it.
#[derive(Clone, Debug)]
enum Mount {
    /// Files written under the run directory and bind-mounted.
    Files {
        volume: String,
        target: String,
        read_only: bool,
        mode: u32,
        files: Vec<VolumeFile>,
    },
    /// An emptyDir: a tmpfs of its size limit.
    Tmpfs { target: String, size: String },
}

/// A Deployment's first container, ready to run with podman.
#[derive(Clone, Debug)]
pub struct PodContainer {
    /// The component, e.g. `inference-worker` (the container's name in the pod).
    pub component: String,
    pub image: String,
    pub command: Vec<String>,
    pub args: Vec<String>,
    pub uid: u64,
    pub gid: u64,
    pub fs_group: Option<u64>,
    pub read_only_root: bool,
    pub cap_drop: Vec<String>,
    pub no_new_privileges: bool,
    pub memory_limit: Option<String>,
    /// The environment, Secret references resolved: it holds secrets, so it goes to podman in a
    /// file readable by root only and is never printed.
    env: Vec<(String, String)>,
    /// Variables the downward API sets to the pod's name; the container's name stands in.
    pod_name_env: Vec<String>,
    mounts: Vec<Mount>,
    pub termination_grace: Duration,
}

impl PodContainer {
    /// Reads `deployment` (an object of `rendered`) the way a kubelet would.
    pub fn from_deployment(
        rendered: &Rendered,
        deployment: &Value,
        existing_secrets: &BTreeMap<&str, &str>,
    ) -> Result<PodContainer, String> {
        let pod = &deployment["spec"]["template"]["spec"];
        let container = &pod["containers"][0];
        let component = text(&container["name"])?;
        let pod_security = &pod["securityContext"];
        let security = &container["securityContext"];
        // A container's setting wins over the pod's, as in Kubernetes.
        let either = |key: &str| {
            if security[key].is_null() {
                pod_security[key].clone()
            } else {
                security[key].clone()
            }
        };
        let uid = either("runAsUser")
            .as_u64()
            .ok_or_else(|| format!("{component}: no runAsUser"))?;
        let gid = either("runAsGroup").as_u64().unwrap_or(uid);
        let strings = |value: &Value| -> Vec<String> {
            value
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|item| item.as_str().map(str::to_owned))
                .collect()
        };
        let env = rendered.container_env(deployment, existing_secrets)?;
        let pod_name_env = container["env"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|variable| variable["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name")
            .map(|variable| text(&variable["name"]))
            .collect::<Result<_, _>>()?;
        let mut mounts = Vec::new();
        for mount in container["volumeMounts"].as_array().into_iter().flatten() {
            let name = text(&mount["name"])?;
            let target = text(&mount["mountPath"])?;
            let volume = pod["volumes"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|volume| volume["name"] == name.as_str())
                .ok_or_else(|| format!("{component}: no volume {name}"))?;
            let read_only = mount["readOnly"].as_bool().unwrap_or(false);
            mounts.push(volume_mount(
                rendered,
                volume,
                target,
                read_only,
                existing_secrets,
            )?);
        }
        Ok(PodContainer {
            image: text(&container["image"])?,
            command: strings(&container["command"]),
            args: strings(&container["args"]),
            uid,
            gid,
            fs_group: pod_security["fsGroup"].as_u64(),
            read_only_root: security["readOnlyRootFilesystem"].as_bool() == Some(true),
            cap_drop: strings(&security["capabilities"]["drop"]),
            no_new_privileges: security["allowPrivilegeEscalation"].as_bool() == Some(false),
            memory_limit: container["resources"]["limits"]["memory"]
                .as_str()
                .map(podman_memory),
            env,
            pod_name_env,
            mounts,
            termination_grace: Duration::from_secs(
                pod["terminationGracePeriodSeconds"].as_u64().unwrap_or(30),
            ),
            component,
        })
    }

    /// Another program of the same image under the same conditions (user, read-only root,
    /// capabilities, memory limit, emptyDirs) without the pod's environment and files: llm-sim,
    /// which the chart does not deploy, runs like this.
    pub fn sibling(&self, component: &str, command: Vec<String>, args: Vec<String>) -> Self {
        PodContainer {
            component: component.to_owned(),
            command,
            args,
            env: Vec::new(),
            pod_name_env: Vec::new(),
            mounts: self
                .mounts
                .iter()
                .filter(|mount| matches!(mount, Mount::Tmpfs { .. }))
                .cloned()
                .collect(),
            ..self.clone()
        }
    }

    /// The value of one of its environment variables.
    pub fn env(&self, name: &str) -> Option<&str> {
        self.env
            .iter()
            .rev()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    /// Mount paths, for telling a container's own writes from its volumes'.
    pub fn mount_targets(&self) -> Vec<&str> {
        self.mounts
            .iter()
            .map(|mount| match mount {
                Mount::Files { target, .. } | Mount::Tmpfs { target, .. } => target.as_str(),
            })
            .collect()
    }

    /// Writes the volumes' files and the environment under `run_dir` and starts the container
    /// detached as `name`; `image` replaces the rendered image name when given.
    pub fn start(&self, name: &str, run_dir: &Path, image: Option<&str>) -> Result<(), String> {
        let dir = run_dir.join(name);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mut args: Vec<String> = vec![
            "run".into(),
            "--detach".into(),
            "--name".into(),
            name.into(),
            "--network=host".into(),
            "--pull=never".into(),
            format!("--user={}:{}", self.uid, self.gid),
            format!("--stop-timeout={}", self.termination_grace.as_secs()),
        ];
        if let Some(group) = self.fs_group {
            args.push(format!("--group-add={group}"));
        }
        if self.read_only_root {
            // Only what the pod mounts is writable: podman's extra tmpfs on /run, /var/tmp and
            // /tmp would hide writes a read-only root refuses in Kubernetes.
            args.extend(["--read-only".into(), "--read-only-tmpfs=false".into()]);
        }
        for capability in &self.cap_drop {
            args.push(format!("--cap-drop={capability}"));
        }
        if self.no_new_privileges {
            args.push("--security-opt=no-new-privileges".into());
        }
        if let Some(limit) = &self.memory_limit {
            args.push(format!("--memory={limit}"));
        }
        let env_file = dir.join("env");
        let pod_names = self.pod_name_env.iter().map(|key| (key.as_str(), name));
        let variables = self
            .env
            .iter()
            .map(|(key, value)| (key.as_str(), value.as_str()));
        let env_lines: String = pod_names
            .chain(variables)
            .map(|(key, value)| format!("{key}={value}\n"))
            .collect();
        write_private(&env_file, &env_lines)?;
        args.push(format!("--env-file={}", env_file.display()));
        for mount in &self.mounts {
            match mount {
                Mount::Tmpfs { target, size } => {
                    args.push(format!("--tmpfs={target}:rw,size={size},mode=1777"))
                }
                Mount::Files {
                    volume,
                    target,
                    read_only,
                    mode,
                    files,
                } => {
                    let source = dir.join(volume);
                    self.write_volume(&source, *mode, files)?;
                    let mut option =
                        format!("--mount=type=bind,src={},dst={target}", source.display());
                    if *read_only {
                        option.push_str(",ro");
                    }
                    args.push(option);
                }
            }
        }
        if let Some(entrypoint) = self.command.first() {
            args.push(format!("--entrypoint={entrypoint}"));
        }
        args.push(image.unwrap_or(&self.image).to_owned());
        args.extend(self.command.iter().skip(1).cloned());
        args.extend(self.args.iter().cloned());
        let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
        podman_output(&arg_refs).map(|_| ())
    }

    /// A volume's files owned by root and the pod's fsGroup, with the volume's mode, as a kubelet
    /// leaves them: readable by the container's user only through that group.
    fn write_volume(&self, source: &Path, mode: u32, files: &[VolumeFile]) -> Result<(), String> {
        std::fs::create_dir_all(source).map_err(|e| format!("{}: {e}", source.display()))?;
        for file in files {
            let path = source.join(&file.path);
            std::fs::write(&path, &file.contents)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
                .map_err(|e| format!("{}: {e}", path.display()))?;
            std::os::unix::fs::chown(&path, Some(0), self.fs_group.map(|g| g as u32))
                .map_err(|e| format!("chown {}: {e}", path.display()))?;
        }
        std::os::unix::fs::chown(source, Some(0), self.fs_group.map(|g| g as u32))
            .map_err(|e| format!("chown {}: {e}", source.display()))?;
        std::fs::set_permissions(source, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| format!("{}: {e}", source.display()))
    }
}

/// A file only its owner (root, the test) can read: it holds secrets.
fn write_private(path: &Path, contents: &str) -> Result<(), String> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    file.write_all(contents.as_bytes())
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn text(value: &Value) -> Result<String, String> {
    value
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("expected a string, found {value}"))
}

/// Kubernetes quantities (`512Mi`, `1Gi`) in podman's units, which are binary already.
fn podman_memory(quantity: &str) -> String {
    for (suffix, unit) in [("Ki", "k"), ("Mi", "m"), ("Gi", "g")] {
        if let Some(number) = quantity.strip_suffix(suffix) {
            return format!("{number}{unit}");
        }
    }
    quantity.to_owned()
}

/// The files of a `secret`'s `items` (or every key when there are none).
fn secret_files(
    rendered: &Rendered,
    secret: &Value,
    name_key: &str,
    existing_secrets: &BTreeMap<&str, &str>,
) -> Result<Vec<VolumeFile>, String> {
    let name = text(&secret[name_key])?;
    let data: BTreeMap<String, String> = match rendered.secret_data(&name) {
        Some(data) => data,
        None => existing_secrets
            .iter()
            .filter_map(|(reference, value)| {
                let (secret_name, key) = reference.split_once('/')?;
                (secret_name == name).then(|| (key.to_owned(), value.to_string()))
            })
            .collect(),
    };
    match secret["items"].as_array() {
        Some(items) => items
            .iter()
            .map(|item| {
                let key = text(&item["key"])?;
                let contents = data
                    .get(&key)
                    .cloned()
                    .ok_or_else(|| format!("Secret {name} has no key {key}"))?;
                Ok(VolumeFile {
                    path: text(&item["path"])?,
                    contents,
                })
            })
            .collect(),
        None => Ok(data
            .into_iter()
            .map(|(path, contents)| VolumeFile { path, contents })
            .collect()),
    }
}

fn volume_mount(
    rendered: &Rendered,
    volume: &Value,
    target: String,
    read_only: bool,
    existing_secrets: &BTreeMap<&str, &str>,
) -> Result<Mount, String> {
    let name = text(&volume["name"])?;
    let mode_of = |source: &Value, default: u32| {
        source["defaultMode"]
            .as_u64()
            .map(|mode| mode as u32)
            .unwrap_or(default)
    };
    if let Some(empty_dir) = volume.get("emptyDir") {
        let size = empty_dir["sizeLimit"]
            .as_str()
            .map(podman_memory)
            .unwrap_or_else(|| "64m".to_owned());
        return Ok(Mount::Tmpfs { target, size });
    }
    if let Some(config_map) = volume.get("configMap") {
        let map_name = text(&config_map["name"])?;
        let data = rendered
            .get("ConfigMap", &map_name)
            .and_then(|map| map["data"].as_object())
            .ok_or_else(|| format!("volume {name}: no ConfigMap {map_name}"))?;
        let files = data
            .iter()
            .map(|(path, contents)| VolumeFile {
                path: path.clone(),
                contents: contents.as_str().unwrap_or_default().to_owned(),
            })
            .collect();
        return Ok(Mount::Files {
            volume: name,
            target,
            read_only,
            mode: mode_of(config_map, 0o644),
            files,
        });
    }
    if let Some(secret) = volume.get("secret") {
        return Ok(Mount::Files {
            files: secret_files(rendered, secret, "secretName", existing_secrets)?,
            volume: name,
            target,
            read_only,
            mode: mode_of(secret, 0o644),
        });
    }
    if let Some(projected) = volume.get("projected") {
        let mut files = Vec::new();
        for source in projected["sources"].as_array().into_iter().flatten() {
            match source.get("secret") {
                Some(secret) => {
                    files.extend(secret_files(rendered, secret, "name", existing_secrets)?)
                }
                None => return Err(format!("volume {name}: only Secret projections are run")),
            }
        }
        return Ok(Mount::Files {
            volume: name,
            target,
            read_only,
            mode: mode_of(projected, 0o644),
            files,
        });
    }
    Err(format!(
        "volume {name}: a kind of volume this runner does not know"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubernetes_memory_quantities_become_podman_sizes() {
        assert_eq!(podman_memory("512Mi"), "512m");
        assert_eq!(podman_memory("1Gi"), "1g");
        assert_eq!(podman_memory("64Ki"), "64k");
        assert_eq!(podman_memory("1000000"), "1000000");
    }
}
