//! The Dockerfile and what deploys it agree: every Deployment the chart renders (all value sets
//! under `helm/ticket-triage/ci/`) and every service of deploy/docker-compose.yml runs a binary
//! the image holds, as the user the image sets, on a read-only root with a writable mount where
//! the image works (`WORKDIR`), and listens only on ports the image exposes. `make image-test`
//! then runs the image under those conditions; this test keeps them from drifting apart.

use std::collections::BTreeSet;

use serde_json::Value;
use triage_deploy_tests::{
    Rendered, chart_dir, compose_file as compose, dockerfile::Dockerfile, render, value_sets,
};

fn render_ok(values_file: &str) -> Rendered {
    render(&[values_file], &[]).unwrap_or_else(|e| panic!("helm template {values_file}: {e}"))
}

/// What the Dockerfile's default target says about the running image.
struct Image {
    dockerfile: Dockerfile,
    /// The default target's name, which is the image's name (`ticket-triage`).
    target: String,
    uid: u64,
    gid: u64,
    workdir: String,
}

impl Image {
    fn of_repository() -> Image {
        let dockerfile = Dockerfile::of_repository();
        let target = dockerfile
            .default_target()
            .and_then(|stage| stage.name.clone())
            .expect("a named default target");
        let user = dockerfile
            .last(&target, "USER")
            .expect("the image sets a USER");
        let (uid, gid) = user.split_once(':').unwrap_or_else(|| {
            panic!("USER {user}: numeric uid:gid, so runAsNonRoot can check it")
        });
        let workdir = dockerfile.last(&target, "WORKDIR").expect("a WORKDIR");
        Image {
            uid: uid.parse().expect("numeric uid"),
            gid: gid.parse().expect("numeric gid"),
            workdir,
            target,
            dockerfile,
        }
    }
}

#[test]
fn every_deployment_runs_the_image_as_it_was_built() {
    let Image {
        dockerfile,
        target,
        uid,
        gid,
        workdir,
    } = Image::of_repository();
    let exposed: BTreeSet<u16> = dockerfile.exposed_ports(&target).into_iter().collect();
    let binaries = dockerfile.binaries();
    assert!(
        !binaries.is_empty(),
        "ARG BINARIES lists the image's binaries"
    );

    let mut listened: BTreeSet<u16> = BTreeSet::new();
    for values_file in value_sets() {
        let rendered = render_ok(&values_file);
        let deployments: Vec<&Value> = rendered.workloads().collect();
        assert!(
            !deployments.is_empty(),
            "{values_file}: no Deployments or StatefulSets"
        );
        for deployment in deployments {
            let name = deployment["metadata"]["name"].as_str().unwrap_or_default();
            let at = format!("{values_file}: {name}");
            let pod = &deployment["spec"]["template"]["spec"];
            let containers = pod["containers"].as_array().expect("containers");
            assert_eq!(containers.len(), 1, "{at}: one container per pod");
            let container = &containers[0];

            // The command is one of the image's binaries, and the image's target of that name
            // runs the same one.
            let command: Vec<String> = serde_json::from_value(container["command"].clone())
                .unwrap_or_else(|_| panic!("{at}: no command"));
            let binary = command
                .first()
                .and_then(|path| path.strip_prefix("/usr/local/bin/"))
                .unwrap_or_else(|| panic!("{at}: command {command:?} is not under /usr/local/bin"));
            assert!(
                binaries.iter().any(|b| b == binary),
                "{at}: {binary} is not among the Dockerfile's BINARIES {binaries:?}"
            );
            assert_eq!(
                dockerfile.entrypoint(binary),
                Some(command.clone()),
                "{at}: the Dockerfile's target {binary} has another ENTRYPOINT"
            );

            // The user the image was built for.
            let pod_security = &pod["securityContext"];
            let security = &container["securityContext"];
            assert_eq!(security["runAsUser"], uid, "{at}: runAsUser");
            assert_eq!(pod_security["runAsUser"], uid, "{at}: pod runAsUser");
            assert_eq!(pod_security["runAsGroup"], gid, "{at}: pod runAsGroup");
            assert_eq!(pod_security["fsGroup"], gid, "{at}: fsGroup");
            assert_eq!(security["runAsNonRoot"], true, "{at}");

            // A read-only root, and the image's working directory writable as an emptyDir.
            assert_eq!(security["readOnlyRootFilesystem"], true, "{at}");
            let mounts = container["volumeMounts"].as_array().expect("volumeMounts");
            let workdir_mount = mounts
                .iter()
                .find(|mount| mount["mountPath"] == workdir.as_str())
                .unwrap_or_else(|| {
                    panic!("{at}: nothing mounted at the image's WORKDIR {workdir}")
                });
            assert_ne!(
                workdir_mount["readOnly"], true,
                "{at}: {workdir} must be writable"
            );
            let volume = pod["volumes"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|volume| volume["name"] == workdir_mount["name"])
                .unwrap_or_else(|| panic!("{at}: no volume for {workdir}"));
            assert!(
                volume.get("emptyDir").is_some(),
                "{at}: {workdir} is an emptyDir"
            );

            // Only ports the image exposes.
            for port in container["ports"].as_array().into_iter().flatten() {
                let number = port["containerPort"].as_u64().expect("containerPort") as u16;
                assert!(
                    exposed.contains(&number),
                    "{at}: port {number} ({}) is not EXPOSEd by the Dockerfile {exposed:?}",
                    port["name"]
                );
                listened.insert(number);
            }
        }
    }

    // llm-sim is not in the chart; docker-compose.yml runs it, on the port the image exposes.
    let compose = compose();
    let llm_sim_port = compose["services"]["llm-sim"]["command"]
        .as_sequence()
        .and_then(|args| {
            let args: Vec<&str> = args.iter().filter_map(|a| a.as_str()).collect();
            let position = args.iter().position(|a| *a == "--listen")?;
            args.get(position + 1)?
                .rsplit(':')
                .next()?
                .parse::<u16>()
                .ok()
        })
        .expect("llm-sim's --listen in docker-compose.yml");
    listened.insert(llm_sim_port);
    assert_eq!(
        exposed, listened,
        "the Dockerfile EXPOSEs exactly the ports the chart's containers and llm-sim listen on"
    );
}

#[test]
fn compose_runs_the_image_as_it_was_built() {
    let Image {
        dockerfile,
        uid,
        gid,
        workdir,
        ..
    } = Image::of_repository();
    let compose = compose();
    let mut checked = 0;
    for (name, service) in compose["services"].as_mapping().unwrap() {
        let Some(entrypoint) = service["entrypoint"].as_sequence() else {
            continue;
        };
        let name = name.as_str().unwrap();
        let binary = entrypoint[0].as_str().unwrap();
        let binary = binary.strip_prefix("/usr/local/bin/").unwrap();
        assert!(dockerfile.binaries().iter().any(|b| b == binary), "{name}");
        let entrypoint: Vec<String> = entrypoint
            .iter()
            .filter_map(|part| part.as_str().map(str::to_owned))
            .collect();
        assert_eq!(
            dockerfile.entrypoint(binary),
            Some(entrypoint),
            "{name}: the Dockerfile's target {binary} has another ENTRYPOINT"
        );
        assert_eq!(
            service["user"].as_str(),
            Some(format!("{uid}:{gid}").as_str()),
            "{name}: compose's user is the image's"
        );
        assert_eq!(service["read_only"].as_bool(), Some(true), "{name}");
        let tmpfs: Vec<&str> = service["tmpfs"]
            .as_sequence()
            .into_iter()
            .flatten()
            .filter_map(|t| t.as_str())
            .collect();
        assert!(tmpfs.contains(&workdir.as_str()), "{name}: tmpfs {tmpfs:?}");
        checked += 1;
    }
    assert_eq!(checked, 6, "llm-sim and the five services run the image");
}

#[test]
fn the_image_is_built_for_kubernetes_and_named_as_the_chart_expects() {
    let Image {
        dockerfile,
        target,
        uid,
        gid,
        ..
    } = Image::of_repository();
    // Kubernetes ignores HEALTHCHECK; the chart's probes are the health checks.
    assert!(!dockerfile.has_instruction("HEALTHCHECK"));
    // A VOLUME would be writable under docker and podman but not under the chart.
    assert!(!dockerfile.has_instruction("VOLUME"));
    // The user exists in the image (tools that look names up, and the logs, see `triage`).
    let creates_user = dockerfile
        .effective_instructions(&target)
        .into_iter()
        .any(|i| {
            i.keyword == "RUN"
                && i.args
                    .contains(&format!("useradd --system --uid {uid} --gid {gid}"))
        });
    assert!(creates_user, "the runtime stage creates user {uid}:{gid}");
    // The binaries land where the chart's commands look for them.
    let copies_binaries = dockerfile
        .effective_instructions(&target)
        .into_iter()
        .any(|i| i.keyword == "COPY" && i.args.ends_with(" /usr/local/bin/"));
    assert!(
        copies_binaries,
        "the runtime stage copies the binaries to /usr/local/bin/"
    );
    // Both ways to supply them exist and the runtime stage takes whichever BINARIES_FROM names.
    for stage in ["builder", "prebuilt"] {
        assert!(dockerfile.stage(stage).is_some(), "no {stage} stage");
    }
    assert_eq!(dockerfile.global_args["BINARIES_FROM"], "builder");
    assert_eq!(
        dockerfile.stage("binaries").map(|s| s.from.as_str()),
        Some("builder")
    );
    for label in ["source", "revision", "version"] {
        let key = format!("org.opencontainers.image.{label}=");
        assert!(
            dockerfile
                .effective_instructions(&target)
                .into_iter()
                .any(|i| i.keyword == "LABEL" && i.args.contains(&key)),
            "the image has no {key} label"
        );
    }

    // The chart's default image is the one `make image` tags: the default target's name, at
    // the chart's appVersion, which is the workspace's version.
    let chart: serde_norway::Value =
        serde_norway::from_str(&std::fs::read_to_string(chart_dir().join("Chart.yaml")).unwrap())
            .unwrap();
    assert_eq!(
        chart["appVersion"].as_str(),
        Some(env!("CARGO_PKG_VERSION"))
    );
    let values: serde_norway::Value =
        serde_norway::from_str(&std::fs::read_to_string(chart_dir().join("values.yaml")).unwrap())
            .unwrap();
    let repository = values["image"]["repository"].as_str().unwrap();
    assert_eq!(repository.rsplit('/').next(), Some(target.as_str()));
}
