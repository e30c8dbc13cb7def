//! Direct mode, the "consumer supervisor": after every poll, each watched Deployment gets a
//! [`Scaler`] decision, which is logged, counted and (unless dry-run) applied to its `scale`.

use std::{collections::HashMap, time::Instant};

use crate::{
    config::{Config, DirectConfig, GroupTarget, WorkloadKind},
    kubernetes::{Deployments, KubeError},
    metrics::Metrics,
    scaler::{Direction, Observation, ScalePolicy, Scaler},
    snapshot::LagSnapshot,
};

/// Where current replica counts come from.
enum Replicas {
    Api(Box<Deployments>),
    /// Dry run with no Kubernetes API in reach: the counts direct mode would have set.
    Simulated(HashMap<String, u32>),
}

struct Watched {
    group: String,
    deployment: String,
    kind: WorkloadKind,
    scaler: Scaler,
}

pub struct DirectMode {
    replicas: Replicas,
    watched: Vec<Watched>,
    dry_run: bool,
    metrics: Metrics,
}

impl DirectMode {
    /// Connects to the Kubernetes API. A dry run without one simulates replica counts, starting
    /// at each minimum.
    pub async fn start(config: &Config, metrics: Metrics) -> Result<Self, KubeError> {
        let direct = &config.direct;
        let watched: Vec<Watched> = config
            .targets()
            .into_iter()
            .filter_map(|target| {
                let deployment = target.deployment.clone()?;
                Some(Watched {
                    group: target.group.clone(),
                    deployment,
                    kind: target.kind,
                    scaler: Scaler::new(policy(direct, &target)),
                })
            })
            .collect();
        let replicas = match Deployments::connect(direct).await {
            Ok(deployments) => {
                tracing::info!(
                    namespace = deployments.namespace(),
                    deployments = watched.len(),
                    dry_run = direct.dry_run,
                    "direct mode scales deployments"
                );
                Replicas::Api(Box::new(deployments))
            }
            Err(error) if direct.dry_run => {
                tracing::warn!(error = %error, "no kubernetes api; the dry run simulates replica counts");
                Replicas::Simulated(
                    watched
                        .iter()
                        .map(|w| (w.deployment.clone(), w.scaler.policy().min_replicas))
                        .collect(),
                )
            }
            Err(error) => return Err(error),
        };
        Ok(DirectMode {
            replicas,
            watched,
            dry_run: direct.dry_run,
            metrics,
        })
    }

    /// Decides (and applies) for every Deployment from one poll's snapshot.
    pub async fn tick(&mut self, snapshot: &LagSnapshot, now: Instant) {
        for watched in &mut self.watched {
            let Some(group) = snapshot.group(&watched.group) else {
                continue;
            };
            if !group.topic_exists || group.partitions == 0 || group.error.is_some() {
                tracing::debug!(
                    deployment = %watched.deployment,
                    group = %watched.group,
                    "no fresh lag for the group; no scaling decision"
                );
                continue;
            }
            let current = match &self.replicas {
                Replicas::Api(deployments) => match deployments
                    .replicas(watched.kind, &watched.deployment)
                    .await
                {
                    Ok(current) => current,
                    Err(error) => {
                        tracing::warn!(deployment = %watched.deployment, error = %error, "cannot read the replica count");
                        continue;
                    }
                },
                Replicas::Simulated(counts) => {
                    counts.get(&watched.deployment).copied().unwrap_or(0)
                }
            };
            let observation = Observation {
                now,
                lag: group.lag,
                partitions: u32::try_from(group.partitions).unwrap_or(u32::MAX),
                current_replicas: current,
            };
            let Some(decision) = watched.scaler.evaluate(observation) else {
                self.metrics.desired_replicas(&watched.deployment, current);
                continue;
            };
            tracing::info!(
                deployment = %watched.deployment,
                group = %watched.group,
                direction = decision.direction.as_str(),
                current = decision.current,
                desired = decision.desired,
                recommended = decision.recommended,
                lag = decision.lag,
                reason = decision.reason.as_str(),
                dry_run = self.dry_run,
                "scaling decision"
            );
            self.metrics
                .decision(&watched.deployment, decision.direction.as_str());
            self.metrics
                .desired_replicas(&watched.deployment, decision.desired);
            if decision.direction == Direction::Hold {
                continue;
            }
            match &mut self.replicas {
                Replicas::Simulated(counts) => {
                    counts.insert(watched.deployment.clone(), decision.desired);
                }
                Replicas::Api(_) if self.dry_run => {}
                Replicas::Api(deployments) => {
                    // A failed patch still starts the cooldown: retrying at every poll would
                    // hammer an API server that is already refusing.
                    if let Err(error) = deployments
                        .scale(watched.kind, &watched.deployment, decision.desired)
                        .await
                    {
                        tracing::warn!(deployment = %watched.deployment, error = %error, "cannot scale the deployment");
                    }
                }
            }
        }
    }
}

fn policy(direct: &DirectConfig, target: &GroupTarget) -> ScalePolicy {
    ScalePolicy {
        target_lag_per_replica: target
            .target_lag_per_replica
            .unwrap_or(direct.target_lag_per_replica)
            .max(1),
        min_replicas: target.min_replicas.unwrap_or(direct.min_replicas),
        max_replicas: target.max_replicas.unwrap_or(direct.max_replicas),
        scale_up_stabilization: direct.scale_up_stabilization,
        scale_down_stabilization: direct.scale_down_stabilization,
        cooldown: direct.cooldown,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use prometheus_client::{encoding::text::encode, registry::Registry};

    use super::*;
    use crate::{snapshot::GroupLag, status::GroupStatus};

    fn snapshot(lag: i64) -> LagSnapshot {
        let target = GroupTarget::new("g", "t", Some("worker"));
        LagSnapshot {
            taken_at_ms: 1,
            offsets_read_at: None,
            groups: vec![GroupLag {
                lag,
                topic_exists: true,
                partitions: 12,
                error: None,
                status: GroupStatus::Ok,
                ..GroupLag::pending(&target)
            }],
        }
    }

    #[tokio::test]
    async fn a_dry_run_without_a_kubernetes_api_simulates_the_replica_counts() {
        let mut config = Config::default();
        config.lag.groups = Some(vec![GroupTarget::new("g", "t", Some("worker"))]);
        config.direct.enabled = true;
        config.direct.dry_run = true;
        config.direct.kubeconfig = Some("/nonexistent/kubeconfig".into());
        config.direct.target_lag_per_replica = 100;
        config.direct.scale_up_stabilization = Duration::ZERO;
        config.direct.scale_down_stabilization = Duration::ZERO;
        config.direct.cooldown = Duration::ZERO;
        let mut registry = Registry::default();
        let metrics = Metrics::register(&mut registry);
        let mut direct = DirectMode::start(&config, metrics).await.unwrap();

        let now = Instant::now();
        direct.tick(&snapshot(450), now).await;
        // The simulated count moved to 5, so the same lag is now steady.
        direct
            .tick(&snapshot(450), now + Duration::from_secs(1))
            .await;
        direct
            .tick(&snapshot(0), now + Duration::from_secs(2))
            .await;

        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        for expected in [
            "autoscaler_decisions_total{deployment=\"worker\",direction=\"up\"} 1",
            "autoscaler_decisions_total{deployment=\"worker\",direction=\"down\"} 1",
            "autoscaler_desired_replicas{deployment=\"worker\"} 1",
        ] {
            assert!(text.contains(expected), "{expected} in {text}");
        }
    }

    #[tokio::test]
    async fn without_dry_run_an_unreachable_configuration_is_an_error() {
        let mut config = Config::default();
        config.direct.enabled = true;
        config.direct.kubeconfig = Some("/nonexistent/kubeconfig".into());
        let mut registry = Registry::default();
        let metrics = Metrics::register(&mut registry);
        let error = DirectMode::start(&config, metrics).await.err().unwrap();
        assert!(
            error.to_string().contains("/nonexistent/kubeconfig"),
            "{error}"
        );
    }
}
