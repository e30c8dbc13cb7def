//! Outbound webhooks: each committed triage of a tenant with a webhook is POSTed to it as JSON,
//! signed with HMAC-SHA256, and retried with backoff, off the database path.
//!
//! # Signature
//! `X-Triage-Timestamp: <unix seconds>` and
//! `X-Triage-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`. The timestamp is
//! inside the signed content so that a receiver can refuse old replays.
//!
//! # Never blocking the writer
//! The writer offers deliveries with `try_send` to a bounded queue; when it is full the delivery
//! is dropped and counted. Delivery is best effort: a triage committed just before a crash may
//! not be delivered, and a retried one may arrive twice (`X-Triage-Delivery` tells them apart).

use std::{collections::HashMap, sync::Arc};

use backon::{BackoffBuilder, ExponentialBuilder};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::{
    sync::{Semaphore, mpsc},
    task::JoinHandle,
};
use triage_runtime::{config::Secret, shutdown::Shutdown};

use crate::{
    config::WebhooksConfig,
    metrics::{OutcomeLabels, WriterMetrics},
    triage::Triage,
};

pub const SIGNATURE_HEADER: &str = "x-triage-signature";
pub const TIMESTAMP_HEADER: &str = "x-triage-timestamp";
pub const DELIVERY_HEADER: &str = "x-triage-delivery";

/// `sha256=<hex>` of HMAC-SHA256 over `"<timestamp>.<body>"`.
pub fn sign(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    // HMAC takes a key of any length.
    #[allow(clippy::expect_used)]
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// True when `signature` is [`sign`]`(secret, timestamp, body)`; compared in constant time.
pub fn verify(secret: &[u8], timestamp: i64, body: &[u8], signature: &str) -> bool {
    let Some(digest) = signature
        .strip_prefix("sha256=")
        .and_then(|hex_digest| hex::decode(hex_digest).ok())
    else {
        return false;
    };
    // HMAC takes a key of any length.
    #[allow(clippy::expect_used)]
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.verify_slice(&digest).is_ok()
}

struct Endpoint {
    url: Secret,
    secret: Secret,
}

struct Delivery {
    endpoint: Arc<Endpoint>,
    triage: Arc<Triage>,
}

/// The writer's side: offers committed triages for delivery.
#[derive(Clone)]
pub struct Webhooks {
    endpoints: Arc<HashMap<String, Arc<Endpoint>>>,
    queue_tx: Option<mpsc::Sender<Delivery>>,
    metrics: WriterMetrics,
}

impl Webhooks {
    /// Starts the delivery task; with no endpoint configured there is none and offers are free.
    // A client with only a timeout set always builds.
    #[allow(clippy::expect_used)]
    pub fn start(
        config: &WebhooksConfig,
        metrics: WriterMetrics,
        shutdown: Shutdown,
    ) -> (Self, Option<JoinHandle<()>>) {
        let endpoints: HashMap<String, Arc<Endpoint>> = config
            .endpoints
            .iter()
            .map(|endpoint| {
                (
                    endpoint.tenant.clone(),
                    Arc::new(Endpoint {
                        url: endpoint.url.clone(),
                        secret: endpoint.secret.clone(),
                    }),
                )
            })
            .collect();
        if endpoints.is_empty() {
            let webhooks = Webhooks {
                endpoints: Arc::new(endpoints),
                queue_tx: None,
                metrics,
            };
            return (webhooks, None);
        }
        let (queue_tx, queue_rx) = mpsc::channel(config.queue_capacity);
        let deliverer = Deliverer {
            client: reqwest::Client::builder()
                .timeout(config.timeout)
                .build()
                .expect("a client with only a timeout set builds"),
            concurrency: Arc::new(Semaphore::new(config.concurrency)),
            backoff: ExponentialBuilder::default()
                .with_min_delay(config.retry_min_delay)
                .with_max_delay(config.retry_max_delay)
                .with_max_times(config.max_attempts.saturating_sub(1))
                .with_jitter(),
            metrics: metrics.clone(),
        };
        let task = tokio::spawn(deliverer.run(queue_rx, shutdown));
        let webhooks = Webhooks {
            endpoints: Arc::new(endpoints),
            queue_tx: Some(queue_tx),
            metrics,
        };
        (webhooks, Some(task))
    }

    /// Queues `triage` for its tenant's webhook, if it has one; never waits.
    pub fn offer(&self, triage: &Arc<Triage>) {
        let (Some(queue_tx), Some(endpoint)) =
            (&self.queue_tx, self.endpoints.get(&triage.tenant_id))
        else {
            return;
        };
        let delivery = Delivery {
            endpoint: Arc::clone(endpoint),
            triage: Arc::clone(triage),
        };
        if queue_tx.try_send(delivery).is_err() {
            self.metrics.webhook_dropped.inc();
            tracing::debug!(tenant = %triage.tenant_id, ticket_id = %triage.ticket_id, "webhook queue full; delivery dropped");
        }
    }
}

struct Deliverer {
    client: reqwest::Client,
    concurrency: Arc<Semaphore>,
    backoff: ExponentialBuilder,
    metrics: WriterMetrics,
}

enum Attempt {
    Delivered,
    /// Worth retrying: no answer, 408, 429 or 5xx.
    Retry(String),
    /// The receiver refused it for good (another 4xx).
    Rejected(u16),
}

impl Deliverer {
    // The semaphore is never closed.
    #[allow(clippy::expect_used)]
    async fn run(self, mut queue_rx: mpsc::Receiver<Delivery>, mut shutdown: Shutdown) {
        let this = Arc::new(self);
        let mut running = tokio::task::JoinSet::new();
        loop {
            let delivery = tokio::select! {
                delivery = queue_rx.recv() => match delivery {
                    Some(delivery) => delivery,
                    None => break,
                },
                () = shutdown.wait() => break,
            };
            let permit = tokio::select! {
                permit = Arc::clone(&this.concurrency).acquire_owned() => permit.expect("never closed"),
                () = shutdown.wait() => break,
            };
            let deliverer = Arc::clone(&this);
            running.spawn(async move {
                deliverer.deliver(delivery).await;
                drop(permit);
            });
            while running.try_join_next().is_some() {}
        }
        // Deliveries still retrying are given up; the triage itself is safe in the table.
        running.abort_all();
    }

    // Serialising a triage (strings, numbers, timestamps) cannot fail.
    #[allow(clippy::expect_used)]
    async fn deliver(&self, delivery: Delivery) {
        let body = serde_json::to_vec(&*delivery.triage).expect("a triage serialises");
        let delivery_id = uuid::Uuid::now_v7().to_string();
        let mut delays = self.backoff.build();
        loop {
            let outcome = self.attempt(&delivery, &delivery_id, &body).await;
            let (label, retry) = match &outcome {
                Attempt::Delivered => ("delivered", false),
                Attempt::Rejected(_) => ("rejected", false),
                Attempt::Retry(_) => ("failed", true),
            };
            if !retry {
                self.metrics
                    .webhook_deliveries
                    .get_or_create(&OutcomeLabels { outcome: label })
                    .inc();
                if let Attempt::Rejected(status) = outcome {
                    tracing::debug!(tenant = %delivery.triage.tenant_id, status, "webhook receiver rejected a delivery");
                }
                return;
            }
            let Some(delay) = delays.next() else {
                self.metrics
                    .webhook_deliveries
                    .get_or_create(&OutcomeLabels { outcome: label })
                    .inc();
                if let Attempt::Retry(reason) = outcome {
                    tracing::debug!(tenant = %delivery.triage.tenant_id, reason, "webhook delivery given up after its last attempt");
                }
                return;
            };
            tokio::time::sleep(delay).await;
        }
    }

    async fn attempt(&self, delivery: &Delivery, delivery_id: &str, body: &[u8]) -> Attempt {
        let timestamp = chrono::Utc::now().timestamp();
        let signature = sign(
            delivery.endpoint.secret.expose().as_bytes(),
            timestamp,
            body,
        );
        let sent = self
            .client
            .post(delivery.endpoint.url.expose())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(TIMESTAMP_HEADER, timestamp.to_string())
            .header(SIGNATURE_HEADER, signature)
            .header(DELIVERY_HEADER, delivery_id)
            .body(body.to_vec())
            .send()
            .await;
        match sent {
            Ok(response) if response.status().is_success() => Attempt::Delivered,
            Ok(response) => {
                let status = response.status();
                if status.is_server_error()
                    || status == reqwest::StatusCode::TOO_MANY_REQUESTS
                    || status == reqwest::StatusCode::REQUEST_TIMEOUT
                {
                    Attempt::Retry(format!("status {status}"))
                } else {
                    Attempt::Rejected(status.as_u16())
                }
            }
            // reqwest's error names the URL, which may hold a token: keep only its kind.
            Err(error) => Attempt::Retry(
                if error.is_timeout() {
                    "timed out"
                } else if error.is_connect() {
                    "cannot connect"
                } else {
                    "request failed"
                }
                .to_owned(),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_verifies_only_with_its_secret_timestamp_and_body() {
        let signature = sign(b"s3cret", 1_700_000_000, b"{\"a\":1}");
        assert!(signature.starts_with("sha256=") && signature.len() == 7 + 64);
        assert!(verify(b"s3cret", 1_700_000_000, b"{\"a\":1}", &signature));
        assert!(!verify(b"other", 1_700_000_000, b"{\"a\":1}", &signature));
        assert!(!verify(b"s3cret", 1_700_000_001, b"{\"a\":1}", &signature));
        assert!(!verify(b"s3cret", 1_700_000_000, b"{\"a\":2}", &signature));
        assert!(!verify(b"s3cret", 1_700_000_000, b"{\"a\":1}", "sha256=zz"));
    }
}
