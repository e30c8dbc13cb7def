//! Latency sampling: fixed, uniform, or log-normal from a median and a 99th percentile.

use rand::Rng;
use tokio::time::Duration;

use crate::config::LatencyConfig;

/// z such that P(Z < z) = 0.99 for a standard normal Z.
const Z_99: f64 = 2.326_347_874_040_841;

/// Log-normal samples are capped at this multiple of p99, so one unlucky draw cannot stall a
/// test for minutes.
const LOGNORMAL_CAP_OVER_P99: f64 = 10.0;

/// One latency draw for `config`.
pub fn sample(config: &LatencyConfig, rng: &mut impl Rng) -> Duration {
    match *config {
        LatencyConfig::Fixed { ms } => Duration::from_millis(ms),
        LatencyConfig::Uniform { min_ms, max_ms } => {
            Duration::from_millis(rng.random_range(min_ms..=max_ms.max(min_ms)))
        }
        LatencyConfig::LogNormal { p50_ms, p99_ms } => {
            // ln(X) ~ N(mu, sigma): the median is e^mu and p99 is e^(mu + z99·sigma).
            let mu = (p50_ms.max(1) as f64).ln();
            let sigma = ((p99_ms.max(p50_ms).max(1) as f64).ln() - mu) / Z_99;
            let millis = (mu + sigma * standard_normal(rng)).exp();
            let capped = millis.min(p99_ms as f64 * LOGNORMAL_CAP_OVER_P99);
            Duration::from_micros((capped * 1000.0) as u64)
        }
    }
}

/// A standard normal draw (Box–Muller).
fn standard_normal(rng: &mut impl Rng) -> f64 {
    // 1 - u keeps the logarithm's argument in (0, 1].
    let u1: f64 = 1.0 - rng.random::<f64>();
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{SeedableRng, rngs::StdRng};

    fn percentile(sorted: &[Duration], p: f64) -> f64 {
        let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
        sorted[index].as_secs_f64() * 1000.0
    }

    fn draws(config: LatencyConfig, count: usize) -> Vec<Duration> {
        let mut rng = StdRng::seed_from_u64(42);
        let mut samples: Vec<Duration> = (0..count).map(|_| sample(&config, &mut rng)).collect();
        samples.sort();
        samples
    }

    #[test]
    fn lognormal_matches_its_p50_and_p99() {
        let samples = draws(
            LatencyConfig::LogNormal {
                p50_ms: 500,
                p99_ms: 2000,
            },
            100_000,
        );
        let p50 = percentile(&samples, 0.50);
        let p99 = percentile(&samples, 0.99);
        assert!((480.0..520.0).contains(&p50), "p50 {p50}");
        assert!((1900.0..2100.0).contains(&p99), "p99 {p99}");
    }

    #[test]
    fn uniform_stays_in_range_and_is_flat() {
        let samples = draws(
            LatencyConfig::Uniform {
                min_ms: 100,
                max_ms: 300,
            },
            20_000,
        );
        assert!(samples[0] >= Duration::from_millis(100));
        assert!(samples[samples.len() - 1] <= Duration::from_millis(300));
        let p50 = percentile(&samples, 0.5);
        assert!((190.0..210.0).contains(&p50), "p50 {p50}");
    }

    #[test]
    fn fixed_is_fixed() {
        let samples = draws(LatencyConfig::Fixed { ms: 250 }, 10);
        assert!(samples.iter().all(|d| *d == Duration::from_millis(250)));
    }
}
