//! `make image-test`: the image deploy/image.sh built, run by podman as the Helm chart deploys it,
//! against the local stack.
//!
//! The chart is rendered for this test (its topics, groups, Redis prefix and schema, the stack's
//! addresses, llm-sim, a local Slack sink) and each Deployment's container runs from that
//! rendering: its command, security context, environment with Secrets resolved, ConfigMap and
//! Secret files, and emptyDir (see `triage_deploy_tests::podman`). Then:
//! - the image: size and layers printed; no compiler, no package lists or caches, no HEALTHCHECK,
//!   the OCI labels;
//! - every container reports ready;
//! - a ticket goes in over HTTP and its row comes out of result-writer's read API;
//! - garbage bytes on the events topic become a Slack alert at the sink;
//! - SIGTERM makes every container exit 0 within its termination grace period;
//! - no container wrote anywhere but its mounts (`podman diff`).
//!
//! Ignored by `cargo test`: it needs podman and the image, which `make image-test` provides and
//! names in `TRIAGE_IMAGE`.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use triage_deploy_tests::{
    dockerfile::Dockerfile,
    podman::{PodContainer, podman_output},
    render_paths,
};
use triage_test_support::{Stack, TestContext, free_port, produce, wait_until, workspace_root};

/// How long a debug build on a busy 2-core machine may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// From the ticket's 202 to its row (llm-sim answers in 50 ms; the rest is Kafka and start-up).
const TRIAGE_TIMEOUT: Duration = Duration::from_secs(120);
const ALERT_TIMEOUT: Duration = Duration::from_secs(60);

/// The containers this test started and the folder of their files (which hold secrets): both
/// removed when the test ends, however it ends.
struct Run {
    dir: PathBuf,
    containers: Vec<String>,
}

impl Run {
    /// The last lines a container logged, for a failure message.
    fn logs(name: &str) -> String {
        podman_output(&["logs", "--tail", "40", name]).unwrap_or_else(|e| e)
    }

    fn start(&mut self, container: &PodContainer, name: &str) {
        self.containers.push(name.to_owned());
        if let Err(error) = container.start(name, &self.dir, None) {
            panic!("{name} did not start: {error}");
        }
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        // A failed assertion says what went wrong; the services' own words say why.
        if std::thread::panicking() {
            for name in &self.containers {
                eprintln!("--- {name} (last lines)\n{}", Run::logs(name));
            }
        }
        for name in &self.containers {
            let _ = podman_output(&["rm", "--force", "--time", "0", name]);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `(status, exit code)` of a container, e.g. `("running", 0)`.
fn state(name: &str) -> (String, i64) {
    let text = podman_output(&[
        "inspect",
        "--format",
        "{{.State.Status}} {{.State.ExitCode}}",
        name,
    ])
    .unwrap_or_else(|e| panic!("{e}"));
    let (status, code) = text.trim().split_once(' ').unwrap_or((text.trim(), "-1"));
    (status.to_owned(), code.parse().unwrap_or(-1))
}

/// Waits for `/readyz` on `admin_url`; a container that exits first fails the test at once
/// (its log is printed as the test ends).
async fn wait_ready(name: &str, admin_url: &str) {
    let client = reqwest::Client::new();
    let url = format!("{admin_url}/readyz");
    wait_until(&format!("{name} ready"), READY_TIMEOUT, || {
        let (status, code) = state(name);
        assert_eq!(
            status, "running",
            "{name} ended (exit code {code}) before it was ready"
        );
        let request = client.get(&url).timeout(Duration::from_secs(3));
        async move {
            let response = request.send().await.ok()?;
            response.status().is_success().then_some(())
        }
    })
    .await;
}

/// What podman says the running container got, not what the test asked for: a read-only root,
/// the non-root user, no capabilities at all, no privilege escalation.
fn assert_runs_locked_down(name: &str) {
    let inspect: Value = serde_json::from_str(&podman_output(&["inspect", name]).unwrap()).unwrap();
    let container = &inspect[0];
    assert_eq!(container["HostConfig"]["ReadonlyRootfs"], true, "{name}");
    assert_eq!(container["Config"]["User"], "65532:65532", "{name}");
    let effective = container["EffectiveCaps"].as_array().map(Vec::len);
    assert!(
        matches!(effective, None | Some(0)),
        "{name} has capabilities {}",
        container["EffectiveCaps"]
    );
    let security = container["HostConfig"]["SecurityOpt"].to_string();
    assert!(security.contains("no-new-privileges"), "{name}: {security}");
}

/// The image's size and layers printed; no build tools or package caches; labels; no
/// HEALTHCHECK; exactly the Dockerfile's binaries, owned by root.
fn check_image(image: &str, dockerfile: &Dockerfile) {
    let inspect: Value =
        serde_json::from_str(&podman_output(&["image", "inspect", image]).unwrap()).unwrap();
    let inspect = &inspect[0];
    let size = inspect["Size"].as_u64().unwrap_or_default();
    let layers = inspect["RootFS"]["Layers"]
        .as_array()
        .map(Vec::len)
        .unwrap_or_default();
    println!("image {image}: {} MB, {layers} layers", size / 1_000_000);
    let config = &inspect["Config"];
    assert!(
        config["Healthcheck"].is_null() && inspect["HealthCheck"].is_null(),
        "the image has a HEALTHCHECK; the chart's probes are the health checks"
    );
    let labels = &config["Labels"];
    let head = git_head();
    let revision = labels["org.opencontainers.image.revision"]
        .as_str()
        .unwrap_or_default();
    assert!(
        revision.starts_with(&head),
        "revision label {revision:?}, HEAD {head}"
    );
    assert_eq!(
        labels["org.opencontainers.image.version"],
        env!("CARGO_PKG_VERSION")
    );
    let source = labels["org.opencontainers.image.source"]
        .as_str()
        .unwrap_or_default();
    assert!(
        source.starts_with("https://") || source.contains('@'),
        "source label {source:?}"
    );
    println!(
        "labels: source {source}, revision {revision}, version {}",
        env!("CARGO_PKG_VERSION")
    );

    let root = PathBuf::from(
        podman_output(&["image", "mount", image])
            .unwrap_or_else(|e| panic!("{e}"))
            .trim(),
    );
    let problems = image_content_problems(&root, &dockerfile.binaries());
    let _ = podman_output(&["image", "unmount", image]);
    assert!(problems.is_empty(), "the image's content: {problems:#?}");
    println!("image content: no compiler, no package lists or caches, only the binaries");
}

fn image_content_problems(root: &Path, binaries: &[String]) -> Vec<String> {
    let mut problems = Vec::new();
    // Build tools (perl stays: Debian's base system needs perl-base, as debian:bookworm-slim has).
    for tool in [
        "usr/bin/cc",
        "usr/bin/gcc",
        "usr/bin/c++",
        "usr/bin/g++",
        "usr/bin/clang",
        "usr/bin/rustc",
        "usr/bin/cargo",
        "usr/local/cargo",
        "usr/bin/make",
        "usr/bin/ld",
    ] {
        if root.join(tool).exists() {
            problems.push(format!("/{tool} is in the image"));
        }
    }
    // apt's own lock files and empty `partial/` folders are what a cleaned image keeps.
    let left_in = |dir: &str| -> Vec<String> {
        walk(&root.join(dir))
            .into_iter()
            .filter(|path| path.is_file())
            .filter(|path| path.file_name().is_some_and(|name| name != "lock"))
            .map(|path| path.display().to_string())
            .collect()
    };
    for dir in ["var/lib/apt/lists", "var/cache/apt"] {
        let files = left_in(dir);
        if !files.is_empty() {
            problems.push(format!(
                "/{dir} holds {} files: {:?}",
                files.len(),
                &files[..files.len().min(5)]
            ));
        }
    }
    let mut installed: Vec<String> = std::fs::read_dir(root.join("usr/local/bin"))
        .map(|entries| {
            entries
                .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    installed.sort();
    let mut wanted = binaries.to_vec();
    wanted.sort();
    if installed != wanted {
        problems.push(format!(
            "/usr/local/bin holds {installed:?}, the Dockerfile lists {wanted:?}"
        ));
    }
    problems
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            paths.extend(walk(&path));
        }
        paths.push(path);
    }
    paths
}

fn git_head() -> String {
    let output = std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(workspace_root())
        .output()
        .expect("git");
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// `extraEnv` entries that move a container's listeners to ports of its own: every container
/// shares the host's network here, where a pod has its own.
fn listen_env(pairs: &[(&str, u16)]) -> Value {
    Value::Array(
        pairs
            .iter()
            .map(|(name, port)| json!({"name": name, "value": format!("127.0.0.1:{port}")}))
            .collect(),
    )
}

/// What `podman diff` reports that the container itself wrote: nothing may be listed but the
/// mount points (and the folders above them) podman creates for the pod's volumes and its own
/// /etc/hosts, /etc/hostname, /etc/resolv.conf and /run/.containerenv.
fn own_writes(diff: &str, mounts: &[&str]) -> Vec<String> {
    const PODMAN_FILES: [&str; 4] = [
        "/etc/hosts",
        "/etc/hostname",
        "/etc/resolv.conf",
        "/run/.containerenv",
    ];
    diff.lines()
        .filter_map(|line| line.split_once(' ').map(|(_, path)| path.trim()))
        .filter(|path| {
            let is_mount_or_above = mounts.iter().chain(PODMAN_FILES.iter()).any(|mount| {
                *mount == *path || mount.starts_with(&format!("{}/", path.trim_end_matches('/')))
            });
            !is_mount_or_above
        })
        .map(str::to_owned)
        .collect()
}

#[test]
fn podman_diff_allows_mount_points_only() {
    let diff = "C /etc\nA /etc/triage\nA /etc/triage/config\nC /run\nA /run/.containerenv\nA /var/log/x\nC /tmp\n";
    assert_eq!(
        own_writes(diff, &["/etc/triage/config", "/tmp"]),
        vec!["/var/log/x".to_owned()]
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs podman and the image: run `make image-test`"]
async fn the_image_runs_the_pipeline_as_the_chart_deploys_it() {
    let image = std::env::var("TRIAGE_IMAGE")
        .expect("TRIAGE_IMAGE names the image to test; `make image-test` builds and sets it");
    let dockerfile = Dockerfile::of_repository();
    check_image(&image, &dockerfile);

    let stack = Stack::get();
    let context = TestContext::new("image");
    context.create_topics(3).await;
    let sink = pipeline::sink::Sink::start().await.expect("slack sink");
    let mut run = Run {
        dir: workspace_root().join(".local/image-test").join(&context.id),
        containers: Vec::new(),
    };
    std::fs::create_dir_all(&run.dir).unwrap();

    let api_key = format!("tk_image_{}", context.id);
    let (sim, http, grpc, api, metrics) = (
        free_port(),
        free_port(),
        free_port(),
        free_port(),
        free_port(),
    );
    let admin: BTreeMap<&str, u16> = [
        "ticket-publisher",
        "ticket-dispatcher",
        "inference-worker",
        "result-writer",
        "dlq-alerter",
        "lag-autoscaler",
    ]
    .into_iter()
    .map(|component| (component, free_port()))
    .collect();
    let admin_env = "TRIAGE_ADMIN__LISTEN";
    let (repository, tag) = image
        .rsplit_once(':')
        .filter(|(_, tag)| !tag.contains('/'))
        .expect("TRIAGE_IMAGE is repository:tag");
    let mut autoscaler_env = listen_env(&[
        (admin_env, admin["lag-autoscaler"]),
        ("TRIAGE_EXTERNAL_METRICS__LISTEN", metrics),
    ]);
    // No API server here to delegate the aggregator's authentication to; make k8s-test covers
    // that against a real one.
    autoscaler_env
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "TRIAGE_EXTERNAL_METRICS__AUTHENTICATION__MODE", "value": "none"}));
    let values = json!({
        "image": {"repository": repository, "tag": tag, "pullPolicy": "Never"},
        "kafka": {"bootstrapServers": stack.kafka_bootstrap, "clientId": format!("image-{}", context.id)},
        "topics": {
            "ticketsCreated": context.topics.tickets_created,
            "inferenceTasks": context.topics.inference_tasks,
            "results": context.topics.results,
            "deadLetters": context.topics.dead_letters,
            "partitions": 3,
            "replicationFactor": 1,
            "minInsyncReplicas": 1,
        },
        "redis": {"url": stack.redis_url},
        "auth": {"keys": [{"tenant": "demo", "keySha256": hex::encode(Sha256::digest(&api_key))}]},
        "ticketPublisher": {
            "redisKeyPrefix": format!("{}ingress:", context.redis_prefix),
            "extraEnv": listen_env(&[
                (admin_env, admin["ticket-publisher"]),
                ("TRIAGE_INGRESS__HTTP_LISTEN", http),
                ("TRIAGE_INGRESS__GRPC_LISTEN", grpc),
            ]),
        },
        "ticketDispatcher": {
            "groupId": context.group("ticket-dispatcher"),
            "transactionalId": format!("dispatch-{}", context.id),
            "extraEnv": listen_env(&[(admin_env, admin["ticket-dispatcher"])]),
        },
        "inferenceWorker": {
            "groupId": context.group("inference-worker"),
            "llm": {"baseUrl": format!("http://127.0.0.1:{sim}/v1"), "apiKey": "sk-llm-sim"},
            "cacheKeyPrefix": context.redis_prefix,
            "extraEnv": listen_env(&[(admin_env, admin["inference-worker"])]),
        },
        "resultWriter": {
            "groupId": context.group("result-writer"),
            "database": {"url": stack.database_url, "schema": context.db_schema},
            "extraEnv": listen_env(&[(admin_env, admin["result-writer"]), ("TRIAGE_API__LISTEN", api)]),
        },
        "dlqAlerter": {
            "groupId": context.group("dlq-alerter"),
            "slack": {"webhookUrl": format!("{}/slack", sink.url)},
            "aggregationWindow": "2s",
            "extraEnv": listen_env(&[(admin_env, admin["dlq-alerter"])]),
        },
        "lagAutoscaler": {"extraEnv": autoscaler_env},
    });
    // JSON is YAML: helm reads it as a values file.
    let values_file = run.dir.join("values.json");
    std::fs::write(&values_file, serde_json::to_string_pretty(&values).unwrap()).unwrap();
    let rendered = render_paths(&[values_file], &[]).unwrap_or_else(|e| panic!("helm: {e}"));
    let pods: Vec<PodContainer> = rendered
        .workloads()
        .map(|deployment| {
            PodContainer::from_deployment(&rendered, deployment, &BTreeMap::new())
                .unwrap_or_else(|e| panic!("{e}"))
        })
        .collect();
    assert_eq!(pods.len(), admin.len(), "one container per workload");
    let name_of = |component: &str| format!("tt-{}-{component}", context.id);

    // llm-sim first: the worker calls it. The chart does not deploy it; it runs under the same
    // conditions as the publisher.
    let publisher = pods
        .iter()
        .find(|pod| pod.component == "ticket-publisher")
        .expect("ticket-publisher's Deployment");
    let llm_sim = publisher.sibling(
        "llm-sim",
        vec!["/usr/local/bin/llm-sim".into()],
        [
            "--listen",
            &format!("127.0.0.1:{sim}"),
            "--rpm",
            "600",
            "--latency-ms",
            "50",
        ]
        .map(str::to_owned)
        .to_vec(),
    );
    run.start(&llm_sim, &name_of("llm-sim"));
    let sim_url = format!("http://127.0.0.1:{sim}");
    wait_until("llm-sim answering /v1/models", READY_TIMEOUT, || async {
        let response = reqwest::get(format!("{sim_url}/v1/models")).await.ok()?;
        response.status().is_success().then_some(())
    })
    .await;
    println!("ready: llm-sim (a simulator, not a model) on {sim_url}");

    let started = Instant::now();
    for pod in &pods {
        assert!(
            pod.read_only_root && pod.cap_drop == ["ALL"] && pod.uid == 65532,
            "{pod:?}"
        );
        run.start(pod, &name_of(&pod.component));
    }
    for pod in &pods {
        let name = name_of(&pod.component);
        let admin_url = format!("http://{}", pod.env(admin_env).expect("admin listen"));
        wait_ready(&name, &admin_url).await;
        assert_runs_locked_down(&name);
        println!(
            "ready: {} ({}, read-only root, user {}:{}, no capabilities; {:.1} s after the first start)",
            pod.component,
            pod.command.join(" "),
            pod.uid,
            pod.gid,
            started.elapsed().as_secs_f64()
        );
    }

    // The root really is read-only to the service's user, and /tmp writable.
    let publisher_name = name_of("ticket-publisher");
    let probe = podman_output(&[
        "exec",
        &publisher_name,
        "/bin/sh",
        "-c",
        "touch /tmp/probe && rm /tmp/probe && echo tmp-writable; touch /usr/local/bin/probe 2>&1 || true",
    ])
    .unwrap();
    assert!(
        probe.contains("tmp-writable") && probe.contains("Read-only file system"),
        "{probe}"
    );
    println!("{publisher_name}: /tmp writable, / read-only");

    // A ticket, HTTP in, row out.
    let client = reqwest::Client::new();
    let response = client
        .post(format!("http://127.0.0.1:{http}/v1/tickets"))
        .bearer_auth(&api_key)
        .json(&json!({
            "subject": "Charged twice for one order",
            "description": "My card shows two charges for order 1182.",
            "customer": {"id": "c-image-1"},
        }))
        .send()
        .await
        .expect("POST /v1/tickets");
    assert_eq!(
        response.status().as_u16(),
        202,
        "{:?}",
        response.text().await
    );
    let accepted: Value = response.json().await.unwrap();
    let ticket_id = accepted["ticket_id"]
        .as_str()
        .expect("ticket_id")
        .to_owned();
    println!(
        "ticket {ticket_id} accepted (partition {}, offset {})",
        accepted["partition"], accepted["offset"]
    );
    let triage_url = format!("http://127.0.0.1:{api}/v1/tickets/{ticket_id}/triage");
    let row: Value = wait_until(
        "the ticket's row in result-writer's API",
        TRIAGE_TIMEOUT,
        || {
            let request = client.get(&triage_url).bearer_auth(&api_key);
            async move {
                let response = request.send().await.ok()?;
                if !response.status().is_success() {
                    return None;
                }
                response.json().await.ok()
            }
        },
    )
    .await;
    assert_eq!(row["ticket_id"], ticket_id.as_str());
    assert_eq!(row["tenant_id"], "demo");
    println!(
        "row: tenant {} ticket {} prompt {} → {} / {} (from {}/{}; {})",
        row["tenant_id"],
        row["ticket_id"],
        row["prompt_version"],
        row["category"],
        row["priority"],
        row["source_partition"],
        row["source_offset"],
        row["provider_note"]
    );

    // A broken event, a Slack alert.
    produce(
        &context.topics.tickets_created,
        None,
        &[(
            "image-test-garbage".to_owned(),
            vec![0xff, 0x00, 0x13, 0x37, b'{'],
        )],
    )
    .await;
    let alert = wait_until(
        "a Slack alert of the broken event",
        ALERT_TIMEOUT,
        || async {
            sink.posts()
                .into_iter()
                .find(|post| post.to_string().contains("decode"))
        },
    )
    .await;
    println!(
        "alert at the Slack sink: {}",
        alert["text"]
            .as_str()
            .unwrap_or("(no text)")
            .lines()
            .next()
            .unwrap_or_default()
    );

    // SIGTERM: each container exits 0 within its grace period, as in a rolling update.
    for pod in &pods {
        podman_output(&["kill", "--signal", "TERM", &name_of(&pod.component)]).unwrap();
    }
    let stopping = Instant::now();
    for pod in &pods {
        let name = name_of(&pod.component);
        let (status, code) = wait_until(
            &format!("{name} to exit after SIGTERM"),
            pod.termination_grace,
            || async {
                let (status, code) = state(&name);
                (status != "running" && status != "stopping").then_some((status, code))
            },
        )
        .await;
        assert_eq!(
            code,
            0,
            "{name} ended {status} with {code}:\n{}",
            Run::logs(&name)
        );
        println!(
            "exit: {} 0 after SIGTERM within {:.1} s (grace {} s)",
            pod.component,
            stopping.elapsed().as_secs_f64(),
            pod.termination_grace.as_secs()
        );
    }
    let sim_name = name_of("llm-sim");
    podman_output(&["kill", "--signal", "TERM", &sim_name]).unwrap();
    let (_, code) = wait_until("llm-sim to exit", Duration::from_secs(10), || async {
        let (status, code) = state(&sim_name);
        (status == "exited").then_some((status, code))
    })
    .await;
    assert_eq!(code, 0, "llm-sim:\n{}", Run::logs(&sim_name));

    // Nothing written outside the mounts.
    for pod in pods.iter().chain([&llm_sim]) {
        let name = name_of(&pod.component);
        let diff = podman_output(&["diff", &name]).unwrap();
        let writes = own_writes(&diff, &pod.mount_targets());
        assert!(writes.is_empty(), "{name} wrote outside /tmp: {writes:?}");
    }
    println!("podman diff: no container wrote outside its mounts");
    triage_test_support::delete_topics(&context.topics.all()).await;
}
