//! The simulator's configuration: the same JSON shape is set by command-line flags at start,
//! returned by `GET /_sim/config` and changed, section by section, by `POST /_sim/config`.

use serde::{Deserialize, Serialize};

use crate::faults::FaultSpec;

/// Everything that shapes the simulator's answers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimConfig {
    /// The model listed by `GET /v1/models`. Responses echo the request's `model` (or this one
    /// when the request names none), so a worker configured for any model name works unchanged.
    #[serde(default = "default_model")]
    pub model: String,
    /// Time before the first byte of an answer.
    #[serde(default)]
    pub latency: LatencyConfig,
    /// Per-API-key requests and tokens per minute.
    #[serde(default)]
    pub rate_limits: RateLimitConfig,
    /// Prompts longer than this many (estimated) tokens are refused with
    /// `context_length_exceeded`, as a real model's context window would refuse them.
    #[serde(default = "default_context_window")]
    pub context_window: u64,
    /// Active faults, tried in order for every chat completion; the first that fires applies.
    #[serde(default)]
    pub faults: Vec<FaultSpec>,
}

fn default_model() -> String {
    "llm-sim-1".to_owned()
}

fn default_context_window() -> u64 {
    128_000
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            model: default_model(),
            latency: LatencyConfig::default(),
            rate_limits: RateLimitConfig::default(),
            context_window: default_context_window(),
            faults: Vec::new(),
        }
    }
}

/// A change to the running configuration (`POST /_sim/config`): each section present replaces
/// the current one, absent sections stay. `faults` replaces the whole list, so `[]` closes every
/// fault window.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigPatch {
    pub model: Option<String>,
    pub latency: Option<LatencyConfig>,
    pub rate_limits: Option<RateLimitConfig>,
    pub context_window: Option<u64>,
    pub faults: Option<Vec<FaultSpec>>,
}

/// How long the simulator "thinks" before answering.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum LatencyConfig {
    /// Always `ms`.
    Fixed { ms: u64 },
    /// Uniformly between `min_ms` and `max_ms`.
    Uniform { min_ms: u64, max_ms: u64 },
    /// Log-normal with the given median and 99th percentile (capped at ten times `p99_ms`).
    #[serde(rename = "lognormal")]
    LogNormal { p50_ms: u64, p99_ms: u64 },
}

impl Default for LatencyConfig {
    fn default() -> Self {
        LatencyConfig::Fixed { ms: 0 }
    }
}

/// Rate limits per API key, enforced as two token buckets (requests and tokens) that refill
/// continuously at `limit / 60 s`, as OpenAI's limits do.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Requests per minute.
    #[serde(default = "default_rpm")]
    pub rpm: u64,
    /// Tokens per minute (prompt tokens plus `max_tokens`, or the answer's tokens when the
    /// request sets no `max_tokens`).
    #[serde(default = "default_tpm")]
    pub tpm: u64,
    /// How much of a minute's limit may be spent at once: each bucket holds
    /// `limit × burst_ms / 60 000`. 60 000 (the default) lets a full minute's limit go in a burst,
    /// as OpenAI does; a short burst makes the steady rate measurable in a few seconds.
    #[serde(default = "default_burst_ms")]
    pub burst_ms: u64,
}

fn default_rpm() -> u64 {
    30_000
}

fn default_tpm() -> u64 {
    150_000_000
}

fn default_burst_ms() -> u64 {
    60_000
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        RateLimitConfig {
            rpm: default_rpm(),
            tpm: default_tpm(),
            burst_ms: default_burst_ms(),
        }
    }
}

/// A configuration the simulator cannot run with; lists every problem at once.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("invalid llm-sim configuration: {}", .problems.join("; "))]
pub struct ConfigError {
    pub problems: Vec<String>,
}

impl SimConfig {
    /// Checks every section and reports all problems together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        if self.model.trim().is_empty() {
            problems.push("model must not be empty".to_owned());
        }
        match self.latency {
            LatencyConfig::Fixed { .. } => {}
            LatencyConfig::Uniform { min_ms, max_ms } => {
                if min_ms > max_ms {
                    problems.push(format!(
                        "latency.min_ms ({min_ms}) must not exceed latency.max_ms ({max_ms})"
                    ));
                }
            }
            LatencyConfig::LogNormal { p50_ms, p99_ms } => {
                if p50_ms == 0 || p99_ms < p50_ms {
                    problems.push(format!(
                        "latency needs 0 < p50_ms <= p99_ms, not p50_ms={p50_ms} p99_ms={p99_ms}"
                    ));
                }
            }
        }
        if self.rate_limits.rpm == 0 {
            problems.push("rate_limits.rpm must be at least 1".to_owned());
        }
        if self.rate_limits.tpm == 0 {
            problems.push("rate_limits.tpm must be at least 1".to_owned());
        }
        if !(1..=60_000).contains(&self.rate_limits.burst_ms) {
            problems.push(format!(
                "rate_limits.burst_ms must be between 1 and 60000, not {}",
                self.rate_limits.burst_ms
            ));
        }
        if self.context_window == 0 {
            problems.push("context_window must be at least 1".to_owned());
        }
        for (index, fault) in self.faults.iter().enumerate() {
            if !(0.0..=1.0).contains(&fault.probability) {
                problems.push(format!(
                    "faults[{index}].probability must be between 0 and 1, not {}",
                    fault.probability
                ));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError { problems })
        }
    }

    /// The configuration after `patch`; the caller validates it before using it.
    pub fn patched(&self, patch: ConfigPatch) -> SimConfig {
        SimConfig {
            model: patch.model.unwrap_or_else(|| self.model.clone()),
            latency: patch.latency.unwrap_or(self.latency),
            rate_limits: patch.rate_limits.unwrap_or(self.rate_limits),
            context_window: patch.context_window.unwrap_or(self.context_window),
            faults: patch.faults.unwrap_or_else(|| self.faults.clone()),
        }
    }
}

/// Parses the `--latency` forms: `250` or `fixed:250`, `uniform:100-300`,
/// `lognormal:p50=500,p99=2000`.
pub fn parse_latency(spec: &str) -> Result<LatencyConfig, String> {
    let spec = spec.trim();
    let number = |text: &str| -> Result<u64, String> {
        text.trim()
            .trim_end_matches("ms")
            .parse::<u64>()
            .map_err(|_| format!("{text:?} is not a whole number of milliseconds"))
    };
    let (kind, rest) = spec.split_once(':').unwrap_or(("fixed", spec));
    match kind {
        "fixed" => Ok(LatencyConfig::Fixed { ms: number(rest)? }),
        "uniform" => {
            let (min, max) = rest
                .split_once('-')
                .ok_or_else(|| format!("uniform latency needs MIN-MAX, not {rest:?}"))?;
            Ok(LatencyConfig::Uniform {
                min_ms: number(min)?,
                max_ms: number(max)?,
            })
        }
        "lognormal" => {
            let mut p50_opt = None;
            let mut p99_opt = None;
            for part in rest.split(',') {
                match part.split_once('=') {
                    Some(("p50", value)) => p50_opt = Some(number(value)?),
                    Some(("p99", value)) => p99_opt = Some(number(value)?),
                    _ => {
                        return Err(format!(
                            "lognormal latency takes p50=MS,p99=MS, not {part:?}"
                        ));
                    }
                }
            }
            match (p50_opt, p99_opt) {
                (Some(p50_ms), Some(p99_ms)) => Ok(LatencyConfig::LogNormal { p50_ms, p99_ms }),
                _ => Err("lognormal latency needs both p50=MS and p99=MS".to_owned()),
            }
        }
        other => Err(format!(
            "unknown latency kind {other:?} (fixed:MS, uniform:MIN-MAX, lognormal:p50=MS,p99=MS)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_forms_parse() {
        assert_eq!(parse_latency("250"), Ok(LatencyConfig::Fixed { ms: 250 }));
        assert_eq!(parse_latency("fixed:0"), Ok(LatencyConfig::Fixed { ms: 0 }));
        assert_eq!(
            parse_latency("uniform:100-300"),
            Ok(LatencyConfig::Uniform {
                min_ms: 100,
                max_ms: 300
            })
        );
        assert_eq!(
            parse_latency("lognormal:p50=500,p99=2000"),
            Ok(LatencyConfig::LogNormal {
                p50_ms: 500,
                p99_ms: 2000
            })
        );
        assert!(parse_latency("lognormal:p50=500").is_err());
        assert!(parse_latency("gaussian:1").is_err());
    }

    #[test]
    fn validate_reports_every_problem() {
        let config = SimConfig {
            latency: LatencyConfig::Uniform {
                min_ms: 5,
                max_ms: 1,
            },
            rate_limits: RateLimitConfig {
                rpm: 0,
                tpm: 0,
                burst_ms: 0,
            },
            ..SimConfig::default()
        };
        let problems = config.validate().unwrap_err().problems;
        assert_eq!(problems.len(), 4, "{problems:?}");
    }

    #[test]
    fn config_json_round_trips() {
        let json = serde_json::json!({
            "model": "gpt-4o-mini",
            "latency": {"kind": "lognormal", "p50_ms": 500, "p99_ms": 2000},
            "rate_limits": {"rpm": 600, "tpm": 100000, "burst_ms": 1000},
            "context_window": 8000,
            "faults": [{"fault": "status_503", "probability": 0.5, "duration_ms": 60000}]
        });
        let config: SimConfig = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(serde_json::to_value(&config).unwrap(), json);
    }
}
