//! Command-line flags: the start-up configuration.

use std::net::SocketAddr;

use clap::Parser;

use crate::{
    config::{LatencyConfig, RateLimitConfig, SimConfig, parse_latency},
    faults::{FaultSpec, parse_fault},
};

/// llm-sim: an OpenAI-compatible LLM simulator (not a model) with latency, rate limits and
/// fault injection. Everything set here can be changed at run time with `POST /_sim/config`.
#[derive(Debug, Parser)]
#[command(name = "llm-sim", version)]
pub struct Cli {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8089")]
    pub listen: SocketAddr,
    /// Model name listed by /v1/models (responses echo the request's model).
    #[arg(long, default_value = "llm-sim-1")]
    pub model: String,
    /// Requests per minute, per API key.
    #[arg(long, default_value_t = RateLimitConfig::default().rpm)]
    pub rpm: u64,
    /// Tokens per minute, per API key.
    #[arg(long, default_value_t = RateLimitConfig::default().tpm)]
    pub tpm: u64,
    /// Burst allowance in milliseconds: each bucket holds limit × burst-ms / 60000.
    #[arg(long, default_value_t = RateLimitConfig::default().burst_ms)]
    pub burst_ms: u64,
    /// Fixed latency in milliseconds (shorthand for --latency fixed:N).
    #[arg(long, conflicts_with = "latency")]
    pub latency_ms: Option<u64>,
    /// Latency: `fixed:MS`, `uniform:MIN-MAX` or `lognormal:p50=MS,p99=MS`.
    #[arg(long, value_parser = parse_latency)]
    pub latency: Option<LatencyConfig>,
    /// Context window in tokens; longer prompts get context_length_exceeded.
    #[arg(long, default_value_t = 128_000)]
    pub context_window: u64,
    /// A fault, repeatable: `KIND[:p=PROBABILITY][,duration_ms=MS]`, KIND one of status_500,
    /// status_502, status_503, hang, reset, malformed_json, content_filter, context_length.
    #[arg(long = "fault", value_parser = parse_fault)]
    pub faults: Vec<FaultSpec>,
    /// Log filter (RUST_LOG overrides it).
    #[arg(long, default_value = "info")]
    pub log_level: String,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    pub json_logs: bool,
}

impl Cli {
    pub fn config(&self) -> SimConfig {
        let latency = match (self.latency_ms, self.latency) {
            (Some(ms), _) => LatencyConfig::Fixed { ms },
            (None, Some(latency)) => latency,
            (None, None) => LatencyConfig::default(),
        };
        SimConfig {
            model: self.model.clone(),
            latency,
            rate_limits: RateLimitConfig {
                rpm: self.rpm,
                tpm: self.tpm,
                burst_ms: self.burst_ms,
            },
            context_window: self.context_window,
            faults: self.faults.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::faults::FaultKind;

    #[test]
    fn flags_build_the_config() {
        let cli = Cli::try_parse_from([
            "llm-sim",
            "--listen",
            "127.0.0.1:0",
            "--rpm",
            "600",
            "--latency",
            "uniform:10-20",
            "--fault",
            "status_503:p=0.1",
            "--fault",
            "hang",
        ])
        .unwrap();
        let config = cli.config();
        assert_eq!(config.rate_limits.rpm, 600);
        assert_eq!(
            config.latency,
            LatencyConfig::Uniform {
                min_ms: 10,
                max_ms: 20
            }
        );
        assert_eq!(config.faults.len(), 2);
        assert_eq!(config.faults[1].fault, FaultKind::Hang);
        assert!(config.validate().is_ok());
        assert!(
            Cli::try_parse_from(["llm-sim", "--latency-ms", "5", "--latency", "fixed:1"]).is_err()
        );
    }
}
