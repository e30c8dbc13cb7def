//! The start-up and shutdown steps every service binary shares, so that each `main.rs` is a
//! checklist: load config, start telemetry, run the service until a signal, map to an exit code.

use std::{future::Future, net::SocketAddr, process::ExitCode};

use serde::{Serialize, de::DeserializeOwned};
use tokio::{net::TcpListener, task::JoinHandle};

use crate::{
    admin_http::{self, AdminState, Dependencies, DependencyCheck, KafkaHealth, Readiness},
    config::{self, AdminConfig, KafkaConfig, TelemetryConfig, Validate},
    kafka,
    metrics::MetricsRegistry,
    shutdown::Shutdown,
    telemetry::{self, TelemetryGuard},
    tls,
};

/// Exit code for a configuration the service cannot start with (as sysexits' EX_CONFIG).
pub const EXIT_CONFIG: u8 = 78;

/// A service configuration: the shared sections every service has.
pub trait ServiceConfig: Default + Serialize + DeserializeOwned + Validate {
    fn telemetry(&self) -> &TelemetryConfig;
    fn kafka(&self) -> &KafkaConfig;
}

/// Loads the configuration and starts telemetry. On a bad configuration, prints one line to
/// stderr (telemetry is not up yet, and the line must reach a person reading `kubectl logs`).
pub fn bootstrap<C: ServiceConfig>(service: &'static str) -> Result<(C, TelemetryGuard), ExitCode> {
    let config: C = match config::load(std::env::args().skip(1)) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("{service}: {error}");
            return Err(ExitCode::from(EXIT_CONFIG));
        }
    };
    match telemetry::init(service, config.telemetry()) {
        Ok(guard) => Ok((config, guard)),
        Err(error) => {
            eprintln!("{service}: cannot start telemetry: {error}");
            Err(ExitCode::from(EXIT_CONFIG))
        }
    }
}

/// The whole of a service's `main`: configuration and telemetry, the check that the Kafka brokers
/// accept the configured credentials (a refusal exits 78 at once instead of being retried
/// forever), then `run` until SIGTERM or SIGINT, mapped to an exit code.
pub fn main<C, F, Fut>(service: &'static str, run: F) -> ExitCode
where
    C: ServiceConfig,
    F: FnOnce(C, Shutdown) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let (config, _telemetry) = match bootstrap::<C>(service) {
        Ok(started) => started,
        Err(exit_code) => return exit_code,
    };
    block_on(service, async move {
        kafka::credentials::check_credentials(config.kafka(), service).await?;
        run(
            config,
            crate::shutdown::from_future(crate::shutdown::signal()),
        )
        .await
    })
}

/// Runs the service's future on a multi-threaded runtime and maps its outcome to an exit code.
pub fn block_on<F>(service: &'static str, run: F) -> ExitCode
where
    F: Future<Output = anyhow::Result<()>>,
{
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("{service}: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run) {
        Ok(()) => {
            tracing::info!(service, "stopped");
            ExitCode::SUCCESS
        }
        Err(error) if is_configuration_failure(&error) => {
            // As for a bad configuration file: one plain line, and an exit code that tells the
            // orchestrator a restart will not help.
            eprintln!("{service}: {}", configuration_failure_line(&error));
            ExitCode::from(EXIT_CONFIG)
        }
        Err(error) => {
            tracing::error!(service, error = format!("{error:#}"), "stopped on error");
            ExitCode::FAILURE
        }
    }
}

/// A failure only an operator can fix: a configuration that cannot be used, a TLS certificate
/// refused (a wrong CA, a host name the certificate does not name), or Kafka credentials the
/// brokers refused.
pub fn is_configuration_failure(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause.is::<config::ConfigError>()
            || cause.is::<tls::TlsError>()
            || matches!(
                cause.downcast_ref::<kafka::KafkaError>(),
                Some(kafka::KafkaError::Refused { .. })
            )
            || tls::is_certificate_rejection(cause)
    })
}

/// What went wrong in one line: the outermost context and the root cause. The whole chain
/// repeats itself (several layers quote their cause), and the root cause is what names the
/// refused certificate or the bad value.
fn configuration_failure_line(error: &anyhow::Error) -> String {
    let outer = error.to_string();
    let root = error.root_cause().to_string();
    if outer.contains(&root) {
        outer
    } else {
        format!("{outer}: {root}")
    }
}

/// A running admin server.
pub struct AdminServer {
    pub local_addr: SocketAddr,
    pub task: JoinHandle<std::io::Result<()>>,
    /// Mark it ready once the service can serve; `/readyz` is 503 until then.
    pub readiness: Readiness,
}

/// The admin routes (`/healthz`, `/readyz`, `/metrics`) with Kafka plus `extra_checks` as the
/// dependencies reported on `/healthz?verbose` and `triage_dependency_up`, and the task that
/// refreshes those gauges until `shutdown` fires. Freezes `registry`. `/readyz` answers 200 once
/// the returned [`Readiness`] is marked ready.
pub fn admin_router(
    service: &'static str,
    kafka_config: &KafkaConfig,
    mut registry: MetricsRegistry,
    extra_checks: Vec<Box<dyn DependencyCheck>>,
    shutdown: Shutdown,
) -> Result<(axum::Router, Readiness), kafka::KafkaError> {
    let probe = kafka::probe_client(kafka_config, service)?;
    let mut checks: Vec<Box<dyn DependencyCheck>> = vec![Box::new(KafkaHealth::new(probe))];
    checks.extend(extra_checks);
    let dependencies = Dependencies::register(registry.registry_mut(), checks);
    tokio::spawn(
        dependencies
            .clone()
            .watch(admin_http::CHECK_INTERVAL, shutdown.clone()),
    );
    let readiness = Readiness::default();
    let router = admin_http::router(AdminState {
        service,
        metrics: registry.freeze(),
        dependencies,
        readiness: readiness.clone(),
        shutdown,
    });
    Ok((router, readiness))
}

/// Binds `admin.listen` and serves [`admin_router`] until `shutdown` fires.
pub async fn start_admin(
    service: &'static str,
    admin: &AdminConfig,
    kafka_config: &KafkaConfig,
    registry: MetricsRegistry,
    extra_checks: Vec<Box<dyn DependencyCheck>>,
    shutdown: Shutdown,
) -> anyhow::Result<AdminServer> {
    use anyhow::Context as _;
    let (router, readiness) = admin_router(
        service,
        kafka_config,
        registry,
        extra_checks,
        shutdown.clone(),
    )?;
    let listener = TcpListener::bind(admin.listen)
        .await
        .with_context(|| format!("failed to bind the admin server to {}", admin.listen))?;
    let local_addr = listener.local_addr()?;
    tracing::info!(address = %local_addr, "admin server listening");
    let task = tokio::spawn(admin_http::serve(listener, router, shutdown));
    Ok(AdminServer {
        local_addr,
        task,
        readiness,
    })
}
