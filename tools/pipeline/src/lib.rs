//! The whole pipeline on the local stack, as real processes: llm-sim (or a configured LLM), the
//! five services, and a local webhook sink standing in for Slack. Used by `make demo`, the
//! end-to-end tests (one trace per ticket, the demo itself) and `make chaos`.
//!
//! # Layout
//! - [`Pipeline`]: start everything, submit tickets, read triages back, kill and restart
//!   workers, stop everything.
//! - [`sink`]: the Slack/webhook stand-in that records what dlq-alerter posts.
//! - [`demo`]: what `make demo` shows.
//! - [`chaos`]: the chaos run of `make chaos`.
//! - [`bench`]: the pipeline benchmark of `make bench`.

#![forbid(unsafe_code)]

pub mod bench;
pub mod chaos;
pub mod demo;
pub mod sink;

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, bail};
use serde_json::Value;
use sha2::{Digest, Sha256};
use triage_test_support::{
    ServiceProcess, Stack, TestContext, free_port, target_dir, workspace_binary, workspace_root,
};

/// Which LLM the worker calls.
#[derive(Clone, Debug)]
pub enum Llm {
    /// llm-sim started by the launcher: requests per minute and its latency spec
    /// (`fixed:MS`, `uniform:MIN-MAX`, `lognormal:p50=MS,p99=MS`).
    Simulator { rpm: u64, latency: String },
    /// Any OpenAI-compatible endpoint.
    External {
        base_url: String,
        api_key: String,
        model: String,
        rpm: u64,
    },
}

/// How to start the pipeline.
#[derive(Clone, Debug)]
pub struct Options {
    /// Own topics, groups, Redis prefix and database schema (tests), or the pipeline's default
    /// names (the demo).
    pub isolated: Option<String>,
    pub llm: Llm,
    pub workers: usize,
    /// ticket-publisher's dispatch lanes (`dispatch.lanes`).
    pub dispatch_lanes: usize,
    pub partitions: i32,
    /// OTLP/HTTP traces endpoint for every service.
    pub otlp_endpoint: Option<String>,
    /// The console's trace link template (`console.trace_url`), `{trace_id}` replaced.
    pub trace_url: Option<String>,
    /// Window in which dlq-alerter folds failures of one class into a summary.
    pub alert_window: Duration,
    /// Tenants besides `demo` and their API keys (tests of isolation and roles).
    pub extra_keys: Vec<TenantKey>,
}

/// One API key of a tenant, in clear (the key file gets its digest).
#[derive(Clone, Debug)]
pub struct TenantKey {
    pub tenant: String,
    pub key: String,
    /// The `admin` role: may replay the tenant's dead letters from the console.
    pub admin: bool,
}

impl Options {
    pub fn new(isolated: Option<&str>) -> Self {
        Options {
            isolated: isolated.map(str::to_owned),
            llm: Llm::Simulator {
                rpm: 600,
                latency: "lognormal:p50=300,p99=1200".into(),
            },
            workers: 1,
            dispatch_lanes: 2,
            partitions: 6,
            otlp_endpoint: None,
            trace_url: None,
            alert_window: Duration::from_secs(10),
            extra_keys: Vec::new(),
        }
    }
}

/// The names one pipeline uses.
#[derive(Clone, Debug)]
pub struct Names {
    pub tickets_created: String,
    pub inference_tasks: String,
    pub results: String,
    pub dead_letters: String,
    pub group_prefix: String,
    pub redis_prefix: String,
    pub db_schema: String,
}

impl Names {
    fn for_options(options: &Options) -> (Names, Option<TestContext>) {
        match &options.isolated {
            Some(name) => {
                let context = TestContext::new(name);
                let names = Names {
                    tickets_created: context.topics.tickets_created.clone(),
                    inference_tasks: context.topics.inference_tasks.clone(),
                    results: context.topics.results.clone(),
                    dead_letters: context.topics.dead_letters.clone(),
                    group_prefix: format!("{}-", context.id),
                    redis_prefix: context.redis_prefix.clone(),
                    db_schema: context.db_schema.clone(),
                };
                (names, Some(context))
            }
            None => (
                Names {
                    tickets_created: "events.tickets.created".into(),
                    inference_tasks: "tasks.llm.inference".into(),
                    results: "tasks.llm.results".into(),
                    dead_letters: "dlq.llm.failed".into(),
                    group_prefix: String::new(),
                    redis_prefix: "triage:".into(),
                    db_schema: "public".into(),
                },
                None,
            ),
        }
    }

    pub fn group(&self, service_group: &str) -> String {
        format!("{}{service_group}", self.group_prefix)
    }
}

/// A running pipeline. Dropping it kills every process it started.
pub struct Pipeline {
    pub names: Names,
    pub tenant: String,
    pub api_key: String,
    pub http_url: String,
    pub grpc_url: String,
    pub results_url: String,
    /// The triage console (result-writer's `/console/`).
    pub console_url: String,
    pub sim_url: Option<String>,
    /// The dispatch stage's `transactional_id` (each lane's id starts with it).
    pub transactional_id: String,
    pub sink: sink::Sink,
    run_dir: PathBuf,
    options: Options,
    sim: Option<ServiceProcess>,
    publisher: ServiceProcess,
    workers: Vec<ServiceProcess>,
    writer: ServiceProcess,
    alerter: ServiceProcess,
    autoscaler: ServiceProcess,
    http: reqwest::Client,
}

const SERVICES: [&str; 5] = [
    "ticket-publisher",
    "inference-worker",
    "result-writer",
    "dlq-alerter",
    "lag-autoscaler",
];

impl Pipeline {
    pub async fn start(options: Options) -> anyhow::Result<Pipeline> {
        // Built (or found fresh) for this executable's profile before anything starts.
        for binary in SERVICES.iter().chain(["llm-sim"].iter()) {
            let path = workspace_binary(binary);
            if !path.exists() {
                bail!("{} is missing after building the workspace", path.display());
            }
        }
        let stack = Stack::get();
        let (names, context) = Names::for_options(&options);
        match &context {
            Some(context) => context.create_topics(options.partitions).await,
            None => {
                let topics = [
                    names.tickets_created.as_str(),
                    names.inference_tasks.as_str(),
                    names.results.as_str(),
                    names.dead_letters.as_str(),
                ];
                triage_test_support::create_topics(&topics, options.partitions).await;
            }
        }
        let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
        let run_dir = workspace_root().join(".local/pipeline").join(&run_id);
        std::fs::create_dir_all(&run_dir)?;

        let tenant = "demo".to_owned();
        let api_key = format!("tk_demo_{}", uuid::Uuid::new_v4().simple());
        let keys_file = run_dir.join("api-keys");
        // The demo key is an admin: a newcomer may replay the demo's dead letters in the console.
        let mut keys_text = format!("{tenant}:{}:admin\n", hex::encode(Sha256::digest(&api_key)));
        for extra in &options.extra_keys {
            let _ = writeln!(
                keys_text,
                "{}:{}{}",
                extra.tenant,
                hex::encode(Sha256::digest(&extra.key)),
                if extra.admin { ":admin" } else { "" }
            );
        }
        std::fs::write(&keys_file, keys_text)?;

        let sink = sink::Sink::start().await?;
        let (sim, sim_url, base_url, llm_key, model, rpm) = match &options.llm {
            Llm::Simulator { rpm, latency } => {
                let port = free_port();
                let args = [
                    "--listen".to_owned(),
                    format!("127.0.0.1:{port}"),
                    "--rpm".to_owned(),
                    rpm.to_string(),
                    "--burst-ms".to_owned(),
                    "1000".to_owned(),
                    "--latency".to_owned(),
                    latency.clone(),
                ];
                let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
                let sim = ServiceProcess::spawn(&workspace_binary("llm-sim"), &arg_refs, &[]);
                let url = format!("http://127.0.0.1:{port}");
                wait_http(&format!("{url}/v1/models")).await?;
                (
                    Some(sim),
                    Some(url.clone()),
                    format!("{url}/v1"),
                    "sk-sim".to_owned(),
                    "gpt-4o-mini".to_owned(),
                    *rpm,
                )
            }
            Llm::External {
                base_url,
                api_key,
                model,
                rpm,
            } => (
                None,
                None,
                base_url.clone(),
                api_key.clone(),
                model.clone(),
                *rpm,
            ),
        };

        let partitions = options.partitions;
        // The production defaults (3 copies, 2 in sync) lowered to what the stack has.
        let replication = format!(
            "replication_factor = {}\nmin_insync_replicas = {}",
            stack.replication_factor,
            stack.replication_factor.min(2)
        );
        let http_port = free_port();
        let grpc_port = free_port();
        let results_port = free_port();
        let dead_letters_port = free_port();
        let common = |telemetry: &mut String| {
            let _ = writeln!(
                telemetry,
                "[kafka]\nbootstrap_servers = {:?}\nclient_id = \"triage-{run_id}\"",
                stack.kafka_bootstrap
            );
            let _ = writeln!(
                telemetry,
                "[topics]\ntickets_created = {:?}\ninference_tasks = {:?}\nresults = {:?}\ndead_letters = {:?}",
                names.tickets_created, names.inference_tasks, names.results, names.dead_letters
            );
            let _ = writeln!(
                telemetry,
                "[telemetry]\nlog_format = \"json\"\nlog_level = \"info\""
            );
            if let Some(endpoint) = &options.otlp_endpoint {
                let _ = writeln!(telemetry, "otlp_endpoint = {endpoint:?}");
            }
        };

        let mut publisher_toml = String::new();
        common(&mut publisher_toml);
        let _ = writeln!(
            publisher_toml,
            "[ingress]\nhttp_listen = \"127.0.0.1:{http_port}\"\ngrpc_listen = \"127.0.0.1:{grpc_port}\"\n\
             [auth]\nkeys_file = {:?}\n[redis]\nurl = {:?}\nkey_prefix = \"{}ingress:\"\n\
             [topic_provisioning]\npartitions = {partitions}\n{replication}\n\
             [dispatch]\ngroup_id = {:?}\ntransactional_id = \"dispatch-{run_id}\"\nlanes = {}\n[dispatch.prompt]\nmodel = {model:?}",
            keys_file.display().to_string(),
            stack.redis_url,
            names.redis_prefix,
            names.group("ticket-dispatcher"),
            options.dispatch_lanes,
        );
        let mut worker_toml = String::new();
        common(&mut worker_toml);
        let _ = writeln!(
            worker_toml,
            "[consumer]\ngroup_id = {:?}\n[llm]\nbase_url = {base_url:?}\napi_key = {llm_key:?}\n\
             [rate_limit]\nrequests_per_minute = {rpm}\ntokens_per_minute = 0\n\
             [cache]\nredis_url = {:?}\nkey_prefix = {:?}\nlease_ttl = \"5s\"\n\
             [retry]\nmax_backoff = \"2s\"\n[circuit]\nopen_for = \"1s\"",
            names.group("inference-worker"),
            stack.redis_url,
            names.redis_prefix,
        );
        let mut writer_toml = String::new();
        common(&mut writer_toml);
        let _ = writeln!(
            writer_toml,
            "[consumer]\ngroup_id = {:?}\n[database]\nurl = {:?}\nschema = {:?}\n[api]\nlisten = \"127.0.0.1:{results_port}\"\n[auth]\nkeys_file = {:?}",
            names.group("result-writer"),
            stack.database_url,
            names.db_schema,
            keys_file.display().to_string(),
        );
        let mut alerter_toml = String::new();
        common(&mut alerter_toml);
        let _ = writeln!(
            alerter_toml,
            "[consumer]\ngroup_id = {:?}\n[slack]\nwebhook_url = \"{}/slack\"\n[aggregation]\nwindow = \"{}ms\"\n[topic_provisioning]\npartitions = {partitions}\n{replication}\n\
             [api]\nlisten = \"127.0.0.1:{dead_letters_port}\"\n[auth]\nkeys_file = {:?}",
            names.group("dlq-alerter"),
            sink.url,
            options.alert_window.as_millis(),
            keys_file.display().to_string(),
        );
        let mut autoscaler_toml = String::new();
        common(&mut autoscaler_toml);
        let _ = writeln!(
            autoscaler_toml,
            // No Kubernetes API locally: the External Metrics API answers without the
            // aggregator's client certificate.
            "[lag]\ninterval = \"2s\"\n[external_metrics]\nlisten = \"127.0.0.1:{}\"\n[external_metrics.authentication]\nmode = \"none\"",
            free_port()
        );
        for (group, topic, deployment) in [
            (
                "ticket-dispatcher",
                &names.tickets_created,
                "ticket-publisher",
            ),
            (
                "inference-worker",
                &names.inference_tasks,
                "inference-worker",
            ),
            ("result-writer", &names.results, "result-writer"),
            ("dlq-alerter", &names.dead_letters, "dlq-alerter"),
        ] {
            let _ = writeln!(
                autoscaler_toml,
                "[[lag.groups]]\ngroup = {:?}\ntopic = {topic:?}\ndeployment = {deployment:?}",
                names.group(group)
            );
        }

        let configs = [
            ("ticket-publisher", publisher_toml),
            ("inference-worker", worker_toml),
            ("dlq-alerter", alerter_toml),
            ("lag-autoscaler", autoscaler_toml),
        ];
        for (service, toml) in &configs {
            std::fs::write(run_dir.join(format!("{service}.toml")), toml)?;
        }
        let spawn = |service: &str| spawn_service(&run_dir, service);
        // The console shows lag-autoscaler's report, whose admin port is known once it runs.
        let autoscaler = spawn("lag-autoscaler");
        let _ = writeln!(
            writer_toml,
            "[console]\ndead_letters_url = \"http://127.0.0.1:{dead_letters_port}\"\nlag_url = {:?}",
            autoscaler.admin_url("/api/v1/lag")
        );
        if let Some(template) = &options.trace_url {
            let _ = writeln!(writer_toml, "trace_url = {template:?}");
        }
        std::fs::write(run_dir.join("result-writer.toml"), &writer_toml)?;
        let publisher = spawn("ticket-publisher");
        let writer = spawn("result-writer");
        let alerter = spawn("dlq-alerter");
        let workers: Vec<ServiceProcess> = (0..options.workers)
            .map(|_| spawn("inference-worker"))
            .collect();
        let pipeline = Pipeline {
            names,
            tenant,
            api_key,
            http_url: format!("http://127.0.0.1:{http_port}"),
            grpc_url: format!("http://127.0.0.1:{grpc_port}"),
            results_url: format!("http://127.0.0.1:{results_port}"),
            console_url: format!("http://127.0.0.1:{results_port}/console/"),
            sim_url,
            transactional_id: format!("dispatch-{run_id}"),
            sink,
            run_dir,
            options,
            sim,
            publisher,
            workers,
            writer,
            alerter,
            autoscaler,
            http: reqwest::Client::new(),
        };
        for service in pipeline.services() {
            service.wait_ready(Duration::from_secs(60)).await;
        }
        Ok(pipeline)
    }

    /// Waits until the dispatch, worker and result-writer groups have every member and no
    /// rebalance pending, so a measurement does not start with a join.
    pub async fn wait_for_settled_groups(&self, timeout: Duration) {
        for (group, members) in [
            ("ticket-dispatcher", self.options.dispatch_lanes),
            ("inference-worker", self.workers.len()),
            ("result-writer", 1),
        ] {
            triage_test_support::wait_for_settled_group(&self.names.group(group), members, timeout)
                .await;
        }
    }

    /// The five services' processes, every worker included (llm-sim is not one of them).
    fn services(&self) -> impl Iterator<Item = &ServiceProcess> {
        [
            &self.publisher,
            &self.writer,
            &self.alerter,
            &self.autoscaler,
        ]
        .into_iter()
        .chain(&self.workers)
    }

    /// An error naming the first service (or llm-sim) that is no longer running, with its log:
    /// a loop waiting for tickets to be triaged calls it so that a crash ends the run at once
    /// instead of at the loop's deadline.
    pub fn ensure_running(&self) -> anyhow::Result<()> {
        for service in self.services().chain(&self.sim) {
            service.ensure_running().map_err(anyhow::Error::msg)?;
        }
        Ok(())
    }

    /// `POST /v1/tickets`; the status and the JSON answer (202 body or problem details).
    pub async fn submit(
        &self,
        ticket: &Value,
        idempotency_key: Option<&str>,
    ) -> anyhow::Result<(u16, Value)> {
        let mut request = self
            .http
            .post(format!("{}/v1/tickets", self.http_url))
            .bearer_auth(&self.api_key)
            .timeout(Duration::from_secs(30))
            .json(ticket);
        if let Some(key) = idempotency_key {
            request = request.header("Idempotency-Key", key);
        }
        let response = request.send().await?;
        let status = response.status().as_u16();
        let body = response.json().await.unwrap_or(Value::Null);
        Ok((status, body))
    }

    /// The triage of `ticket_id` from result-writer's API, once it exists.
    pub async fn triage(&self, ticket_id: &str) -> anyhow::Result<Option<Value>> {
        let response = self
            .http
            .get(format!(
                "{}/v1/tickets/{ticket_id}/triage",
                self.results_url
            ))
            .bearer_auth(&self.api_key)
            .timeout(Duration::from_secs(10))
            .send()
            .await?;
        match response.status().as_u16() {
            200 => Ok(Some(response.json().await?)),
            404 => Ok(None),
            status => bail!("result-writer answered {status} for ticket {ticket_id}"),
        }
    }

    /// lag-autoscaler's view of every group (`/api/v1/lag`).
    pub async fn lag(&self) -> anyhow::Result<Value> {
        Ok(self
            .http
            .get(self.autoscaler.admin_url("/api/v1/lag"))
            .timeout(Duration::from_secs(5))
            .send()
            .await?
            .json()
            .await?)
    }

    /// llm-sim's stats, when the simulator runs.
    pub async fn sim_stats(&self) -> anyhow::Result<Value> {
        let url = self
            .sim_url
            .as_ref()
            .context("no simulator in this pipeline")?;
        Ok(self
            .http
            .get(format!("{url}/_sim/stats"))
            .send()
            .await?
            .json()
            .await?)
    }

    /// Changes llm-sim's configuration at run time (`POST /_sim/config`).
    pub async fn sim_config(&self, patch: &Value) -> anyhow::Result<()> {
        let url = self
            .sim_url
            .as_ref()
            .context("no simulator in this pipeline")?;
        let response = self
            .http
            .post(format!("{url}/_sim/config"))
            .json(patch)
            .send()
            .await?;
        anyhow::ensure!(
            response.status().is_success(),
            "llm-sim refused the configuration"
        );
        Ok(())
    }

    pub fn worker_count(&self) -> usize {
        self.workers.len()
    }

    /// `kill -9` of worker `index`; returns once it is gone.
    pub async fn kill_worker(&mut self, index: usize) {
        let worker = &mut self.workers[index];
        worker.signal("KILL");
        worker.wait_exit(Duration::from_secs(10)).await;
    }

    /// Starts worker `index` again (after a kill) and waits until it is ready.
    pub async fn restart_worker(&mut self, index: usize) {
        let worker = spawn_service(&self.run_dir, "inference-worker");
        worker.wait_ready(Duration::from_secs(60)).await;
        self.workers[index] = worker;
    }

    /// Where the services' logs are.
    pub fn log_hint(&self) -> String {
        target_dir().join("test-logs").display().to_string()
    }

    /// Each service's name and admin base URL, workers once each.
    pub fn admin_urls(&self) -> Vec<(&str, String)> {
        self.services()
            .map(|service| (service.name(), service.admin_url("")))
            .collect()
    }

    /// SIGTERM to every service, then waits for each to exit (flushing spans and offsets).
    pub async fn stop(self) -> anyhow::Result<()> {
        for process in self.services() {
            process.signal("TERM");
        }
        for process in self.services() {
            let status = process.wait_exit(Duration::from_secs(40)).await;
            if !status.success() {
                bail!("{}", process.exit_report(status));
            }
        }
        if let Some(sim) = &self.sim {
            sim.signal("TERM");
            sim.wait_exit(Duration::from_secs(10)).await;
        }
        // An isolated run's topics are its own; the demo's default topics stay.
        if self.options.isolated.is_some() {
            let names = &self.names;
            triage_test_support::delete_topics(&[
                &names.tickets_created,
                &names.inference_tasks,
                &names.results,
                &names.dead_letters,
            ])
            .await;
        }
        Ok(())
    }

    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }
}

/// `pipeline topics grow`: adds partitions to `topic` on an operator's explicit word.
pub async fn grow_topic(
    bootstrap_servers: Option<String>,
    topic: &str,
    partitions: i32,
) -> anyhow::Result<()> {
    let kafka = triage_runtime::config::KafkaConfig {
        bootstrap_servers: bootstrap_servers
            .unwrap_or_else(|| Stack::get().kafka_bootstrap.clone()),
        ..Default::default()
    };
    eprintln!(
        "pipeline: warning: growing {topic} to {partitions} partitions: keys map to other partitions from now on; per-ticket order holds only for records written after this"
    );
    let from = triage_runtime::kafka::admin::grow_partitions(&kafka, topic, partitions).await?;
    println!("grew {topic} from {from} to {partitions} partitions");
    Ok(())
}

fn spawn_service(run_dir: &Path, service: &str) -> ServiceProcess {
    let config = run_dir.join(format!("{service}.toml"));
    let config = config.display().to_string();
    ServiceProcess::spawn(&workspace_binary(service), &["--config", &config], &[])
}

async fn wait_http(url: &str) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    for _ in 0..200 {
        if client
            .get(url)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("{url} did not answer")
}
