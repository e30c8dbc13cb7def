//! What every pipeline service shares, written once: configuration, Kafka clients and record
//! headers, telemetry, the admin server and shutdown.
//!
//! # Layout
//! - [`config`]: typed configuration (defaults, TOML file, `TRIAGE_*` environment) and the shared
//!   sections (`kafka`, `topics`, `telemetry`, `admin`).
//! - [`kafka`]: client settings, topic provisioning ([`kafka::admin`]), headers and trace
//!   context ([`kafka::headers`]), the contract producer ([`kafka::producer`]).
//! - [`telemetry`]: JSON logs, OpenTelemetry spans and OTLP export.
//! - [`metrics`]: the Prometheus registry.
//! - [`admin_http`]: `/healthz`, `/readyz`, `/metrics`.
//! - [`auth`]: API keys (SHA-256 digests, constant-time) mapped to tenants.
//! - [`service`]: the start-up and shutdown steps of every binary.
//! - [`shutdown`]: SIGTERM/SIGINT and the shutdown broadcast.
//! - [`tls`]: rustls for PostgreSQL and Redis, secrets read from files, and which errors are a
//!   refused certificate.

// Outside input (records, headers, provider answers, database rows, configuration) must never
// panic a service, so the ways to panic are denied in service code. The few that remain guard
// invariants of the service's own data (a constant pattern, a serialiser of our own types) and
// each says so where it is allowed.
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

pub mod admin_http;
pub mod auth;
pub mod config;
pub mod kafka;
pub mod metrics;
pub mod service;
pub mod shutdown;
pub mod telemetry;
pub mod tls;

/// Every service allocates per record (decoded messages, headers, HTTP bodies, spans), and
/// glibc's allocator was a fifth of the worker's CPU in its profile; mimalloc is cheaper for that
/// many small, short-lived allocations across threads. Declared here, once, so every binary
/// linking the runtime uses it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
