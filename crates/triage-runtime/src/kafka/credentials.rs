//! The check every service makes of its Kafka security settings before it starts a stage.
//!
//! librdkafka treats a refused certificate or a wrong SASL password like any other connection
//! failure: it reports the error to the client's context and reconnects with backoff, forever. A
//! service started with a CA that did not sign the brokers' certificates would therefore run,
//! log the same error every few seconds and never do any work, while a restart could never help.
//! Other dependencies (PostgreSQL, Redis) stop with exit code 78 in that case
//! ([`crate::tls::is_certificate_rejection`]); this makes Kafka do the same.
//!
//! Only a refusal stops the service. Brokers that are merely unreachable (not started yet, a
//! network partition) are the ordinary case the stages retry through, so the check gives up
//! quietly after [`CHECK_WINDOW`] and the service starts as it always did.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use rdkafka::{
    ClientContext,
    config::RDKafkaLogLevel,
    consumer::{BaseConsumer, ConsumerContext},
    error::KafkaError as RdKafkaError,
    types::RDKafkaErrorCode,
};

use super::KafkaError;
use crate::config::KafkaConfig;

/// How long the check waits for the brokers to answer or refuse before it lets the service start
/// anyway. A TLS handshake or a SASL exchange with a reachable broker takes milliseconds; a
/// refused one is reported by librdkafka within its first connection attempt.
pub const CHECK_WINDOW: Duration = Duration::from_secs(10);

/// One metadata request's timeout within the window; librdkafka keeps reconnecting meanwhile.
const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(500);

/// Connects to the brokers with `config`'s security settings and fails if they refuse them: a
/// certificate that does not verify (either side) or failed SASL authentication. Blocking for up
/// to [`CHECK_WINDOW`]; returns at the first answer.
pub async fn check_credentials(config: &KafkaConfig, service: &str) -> Result<(), KafkaError> {
    let refusals = Refusals::default();
    let client: BaseConsumer<Refusals> = config
        .client_config(&format!("{service}-credentials"))
        .create_with_context(refusals.clone())
        .map_err(|source| KafkaError::Client {
            role: "credentials check",
            source,
        })?;
    tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + CHECK_WINDOW;
        while Instant::now() < deadline {
            let answered = super::probe_brokers(&client, ATTEMPT_TIMEOUT).is_ok();
            // Errors reach the context from poll, after the request has failed.
            let _ = client.poll(Duration::ZERO);
            if let Some(reason) = refusals.first() {
                return Err(KafkaError::Refused { reason });
            }
            if answered {
                return Ok(());
            }
        }
        tracing::warn!(
            window = ?CHECK_WINDOW,
            "the Kafka brokers did not answer the credentials check; starting anyway, the stages retry"
        );
        Ok(())
    })
    .await
    .unwrap_or_else(|error| {
        // Only a panic inside librdkafka's call could get here: no verdict on the credentials,
        // so the service starts as it would have without the check.
        tracing::warn!(error = %error, "the Kafka credentials check did not finish; starting anyway");
        Ok(())
    })
}

/// Keeps the first error librdkafka reports that only an operator can fix.
#[derive(Clone, Default)]
struct Refusals(Arc<Mutex<Option<String>>>);

impl Refusals {
    fn first(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl ClientContext for Refusals {
    /// librdkafka logs every failed connection at error level; the check reports the one that
    /// matters itself, so the rest stays out of the service's log unless debugging.
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        tracing::debug!(target: "librdkafka", ?level, facility, message);
    }

    fn error(&self, error: RdKafkaError, reason: &str) {
        if is_refusal(&error, reason) {
            let mut first = self.0.lock().unwrap_or_else(|e| e.into_inner());
            first.get_or_insert_with(|| reason.to_owned());
        }
    }
}

impl ConsumerContext for Refusals {}

/// A refusal, as opposed to a connection that failed on its way: failed SASL authentication, or
/// a TLS error about a certificate. librdkafka reports every TLS failure as `_SSL`, including a
/// connection reset mid-handshake by a restarting broker, so a TLS error counts only when its
/// reason names a certificate ("certificate verify failed", "alert bad certificate", "alert
/// unknown ca", "certificate required").
fn is_refusal(error: &RdKafkaError, reason: &str) -> bool {
    match error.rdkafka_error_code() {
        Some(RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SaslAuthenticationFailed) => true,
        Some(RDKafkaErrorCode::SSL) => {
            let reason = reason.to_ascii_lowercase();
            reason.contains("certificate") || reason.contains("unknown ca")
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_certificate_and_authentication_failures_are_refusals() {
        let ssl = RdKafkaError::Global(RDKafkaErrorCode::SSL);
        assert!(is_refusal(
            &ssl,
            "ssl://127.0.0.1:29093/bootstrap: SSL handshake failed: error:0A000086:SSL routines::certificate verify failed: broker certificate could not be verified"
        ));
        assert!(is_refusal(
            &ssl,
            "SSL handshake failed: ssl/record/rec_layer_s3.c:1605: error:0A000418:SSL routines::tlsv1 alert unknown ca"
        ));
        assert!(!is_refusal(
            &ssl,
            "SSL handshake failed: Disconnected: connection reset by peer"
        ));
        let authentication = RdKafkaError::Global(RDKafkaErrorCode::Authentication);
        assert!(is_refusal(
            &authentication,
            "SASL authentication error: Authentication failed during authentication due to invalid credentials with SASL mechanism SCRAM-SHA-512"
        ));
        let transport = RdKafkaError::Global(RDKafkaErrorCode::BrokerTransportFailure);
        assert!(!is_refusal(
            &transport,
            "Connect to ipv4#127.0.0.1:19094 failed: Connection refused"
        ));
        assert!(!is_refusal(
            &RdKafkaError::Global(RDKafkaErrorCode::AllBrokersDown),
            "certificate"
        ));
    }
}
