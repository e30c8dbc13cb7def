//! llm-sim: an OpenAI-compatible LLM simulator for tests, benchmarks and the offline demo. It is
//! not a model: answers come from keyword rules and say so.
//!
//! # Layout
//! - [`server`]: routes (`/v1/chat/completions`, `/v1/models`, `/_sim/*`), the completion
//!   handler, and the accept loop ([`serve`]) that can also reset a connection on purpose.
//! - [`triage`]: the deterministic keyword rules behind every answer.
//! - [`ratelimit`]: per-key request and token buckets, and OpenAI's duration format.
//! - [`faults`]: injected failures, by probability and in timed windows.
//! - [`latency`]: fixed, uniform and log-normal latency.
//! - [`openai`]: the request shape, token estimates and error bodies.
//! - [`stats`]: counters behind `GET /_sim/stats`.
//! - [`config`], [`cli`]: the configuration, from flags and from `POST /_sim/config`.

pub mod cli;
pub mod config;
pub mod faults;
pub mod latency;
pub mod openai;
pub mod ratelimit;
pub mod server;
pub mod stats;
pub mod triage;

pub use config::SimConfig;
pub use server::{SIMULATOR_VERSION, ServeError, SimState, router, serve, serve_state};
