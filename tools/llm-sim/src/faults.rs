//! Fault injection: what can go wrong with a provider, by probability and/or in a timed window.

use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::time::{Duration, Instant};

/// One way a real provider misbehaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FaultKind {
    /// HTTP 500 with OpenAI's `server_error` body.
    #[serde(rename = "status_500")]
    Status500,
    /// HTTP 502 with the body OpenAI's edge sends (`cf_bad_gateway`).
    #[serde(rename = "status_502")]
    Status502,
    /// HTTP 503, the provider is overloaded or down.
    #[serde(rename = "status_503")]
    Status503,
    /// The request is read and never answered (until the client gives up or the simulator
    /// stops).
    #[serde(rename = "hang")]
    Hang,
    /// The connection is closed with a TCP reset and no response.
    #[serde(rename = "reset")]
    Reset,
    /// HTTP 200 whose message content is cut-off, invalid JSON.
    #[serde(rename = "malformed_json")]
    MalformedJson,
    /// HTTP 400 `content_filter`: the prompt tripped the provider's content policy.
    #[serde(rename = "content_filter")]
    ContentFilter,
    /// HTTP 400 `context_length_exceeded`, whatever the prompt's length.
    #[serde(rename = "context_length")]
    ContextLength,
}

impl FaultKind {
    pub const ALL: [FaultKind; 8] = [
        FaultKind::Status500,
        FaultKind::Status502,
        FaultKind::Status503,
        FaultKind::Hang,
        FaultKind::Reset,
        FaultKind::MalformedJson,
        FaultKind::ContentFilter,
        FaultKind::ContextLength,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FaultKind::Status500 => "status_500",
            FaultKind::Status502 => "status_502",
            FaultKind::Status503 => "status_503",
            FaultKind::Hang => "hang",
            FaultKind::Reset => "reset",
            FaultKind::MalformedJson => "malformed_json",
            FaultKind::ContentFilter => "content_filter",
            FaultKind::ContextLength => "context_length",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// A configured fault: `{"fault": "status_503", "probability": 0.2, "duration_ms": 60000}`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultSpec {
    pub fault: FaultKind,
    /// Chance (0 to 1) that a request inside the window gets this fault; 1 when absent.
    #[serde(default = "always")]
    pub probability: f64,
    /// Window length from the moment the fault is configured; absent means until removed.
    /// `GET /_sim/config` shows the time left, so posting it back keeps the same window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
}

fn always() -> f64 {
    1.0
}

/// The faults in force, each with the instant its window closes.
#[derive(Clone, Debug, Default)]
pub struct ActiveFaults {
    faults: Vec<(FaultSpec, Option<Instant>)>,
}

impl ActiveFaults {
    /// Opens every window in `specs` at `now`.
    pub fn open(specs: &[FaultSpec], now: Instant) -> Self {
        let faults = specs
            .iter()
            .map(|spec| {
                let closes_at = spec.duration_ms.map(|ms| now + Duration::from_millis(ms));
                (*spec, closes_at)
            })
            .collect();
        ActiveFaults { faults }
    }

    pub fn is_empty(&self) -> bool {
        self.faults.is_empty()
    }

    /// The first fault whose window is open at `now` and whose dice roll hits.
    pub fn pick(&self, now: Instant, rng: &mut impl Rng) -> Option<FaultKind> {
        self.faults.iter().find_map(|(spec, closes_at)| {
            let open = closes_at.is_none_or(|closes_at| now < closes_at);
            let hit = spec.probability >= 1.0 || rng.random::<f64>() < spec.probability;
            (open && hit).then_some(spec.fault)
        })
    }

    /// The faults still open at `now`, with the time left in `duration_ms`.
    pub fn remaining(&self, now: Instant) -> Vec<FaultSpec> {
        self.faults
            .iter()
            .filter_map(|(spec, closes_at)| match closes_at {
                None => Some(*spec),
                Some(closes_at) if now < *closes_at => Some(FaultSpec {
                    duration_ms: Some(closes_at.duration_since(now).as_millis() as u64),
                    ..*spec
                }),
                Some(_) => None,
            })
            .collect()
    }
}

/// Parses `--fault KIND[:p=P][,duration_ms=MS]`, e.g. `status_503:p=0.05` or
/// `hang:duration_ms=30000`.
pub fn parse_fault(spec: &str) -> Result<FaultSpec, String> {
    let (kind, options) = spec.split_once(':').unwrap_or((spec, ""));
    let fault = FaultKind::ALL
        .into_iter()
        .find(|candidate| candidate.as_str() == kind.trim())
        .ok_or_else(|| {
            let known: Vec<&str> = FaultKind::ALL.iter().map(|kind| kind.as_str()).collect();
            format!("unknown fault {kind:?}; known: {}", known.join(", "))
        })?;
    let mut parsed = FaultSpec {
        fault,
        probability: 1.0,
        duration_ms: None,
    };
    for option in options
        .split(',')
        .filter(|option| !option.trim().is_empty())
    {
        match option.trim().split_once('=') {
            Some(("p" | "probability", value)) => {
                parsed.probability = value
                    .parse()
                    .map_err(|_| format!("fault probability {value:?} is not a number"))?;
            }
            Some(("duration_ms", value)) => {
                parsed.duration_ms = Some(
                    value
                        .parse()
                        .map_err(|_| format!("fault duration_ms {value:?} is not a number"))?,
                );
            }
            _ => {
                return Err(format!(
                    "fault option {option:?} is neither p=PROBABILITY nor duration_ms=MS"
                ));
            }
        }
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{SeedableRng, rngs::StdRng};

    fn spec(fault: FaultKind, probability: f64, duration_ms: Option<u64>) -> FaultSpec {
        FaultSpec {
            fault,
            probability,
            duration_ms,
        }
    }

    #[test]
    fn window_closes_after_its_duration() {
        let start = Instant::now();
        let active = ActiveFaults::open(&[spec(FaultKind::Status503, 1.0, Some(1000))], start);
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(
            active.pick(start + Duration::from_millis(999), &mut rng),
            Some(FaultKind::Status503)
        );
        assert_eq!(
            active.pick(start + Duration::from_millis(1000), &mut rng),
            None
        );
        assert_eq!(
            active.remaining(start + Duration::from_millis(400))[0].duration_ms,
            Some(600)
        );
        assert!(active.remaining(start + Duration::from_secs(2)).is_empty());
    }

    #[test]
    fn probability_is_honoured_and_first_hit_wins() {
        let now = Instant::now();
        let active = ActiveFaults::open(
            &[
                spec(FaultKind::Status500, 0.25, None),
                spec(FaultKind::Hang, 1.0, None),
            ],
            now,
        );
        let mut rng = StdRng::seed_from_u64(7);
        let draws = 20_000;
        let hits = (0..draws)
            .filter(|_| active.pick(now, &mut rng) == Some(FaultKind::Status500))
            .count();
        let share = hits as f64 / draws as f64;
        assert!((0.23..0.27).contains(&share), "share {share}");
    }

    #[test]
    fn cli_form_parses() {
        assert_eq!(
            parse_fault("status_503:p=0.05,duration_ms=60000"),
            Ok(spec(FaultKind::Status503, 0.05, Some(60000)))
        );
        assert_eq!(parse_fault("reset"), Ok(spec(FaultKind::Reset, 1.0, None)));
        assert!(parse_fault("status_504").is_err());
        assert!(parse_fault("hang:forever").is_err());
    }
}
