//! The outputs an alert is posted to (a Slack incoming webhook, a generic JSON webhook), what
//! each one is sent, and delivery that never gives up.
//!
//! # Delivery
//! Each output posts its messages one at a time, in order ([`run_output`]). A 2xx is delivery.
//! A 429 waits for its `Retry-After`; a 5xx, a timeout or a refused connection is retried with
//! exponential backoff and jitter (`delivery.min_backoff` doubling up to `max_backoff`). When
//! Slack answers 400 (it refuses the blocks), the message is retried as its plain-text fallback.
//! Any other 4xx (a revoked webhook) is retried like a 5xx and logged as an error, because an
//! operator must act and dropping the alert would lose the dead letter.
//! While any output fails, the consumer's [`FetchGate`] is closed, so a webhook that stays down
//! stops consumption rather than piling up work.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use backon::{ExponentialBuilder, Retryable};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use triage_runtime::{config::Secret, kafka::consumer::FetchGate};

use crate::{
    alert::{DeadLetterAlert, Message, Summary, format_time},
    config::DeliveryConfig,
    metrics::AlerterMetrics,
};

/// The longest `Retry-After` honoured as given; a larger value is capped to it.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(15 * 60);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputKind {
    Slack,
    Webhook,
}

impl OutputKind {
    pub fn label(self) -> &'static str {
        match self {
            OutputKind::Slack => "slack",
            OutputKind::Webhook => "webhook",
        }
    }

    /// The body this output is sent for `message`.
    pub fn render(self, message: &Message) -> Value {
        match (self, message) {
            (OutputKind::Slack, Message::Alert(alert)) => slack_alert(alert),
            (OutputKind::Slack, Message::Summary(summary)) => slack_summary(summary),
            (OutputKind::Webhook, Message::Alert(alert)) => {
                json!({ "type": "dead_letter", "dead_letter": alert })
            }
            (OutputKind::Webhook, Message::Summary(summary)) => {
                json!({ "type": "summary", "summary": summary })
            }
        }
    }
}

/// Why one post was not accepted. Neither variant carries the URL: it is a credential.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("the {output} webhook answered {status}")]
    Status {
        output: &'static str,
        status: u16,
        retry_after: Option<Duration>,
    },
    #[error("could not post to the {output} webhook: {source}")]
    Transport {
        output: &'static str,
        #[source]
        source: reqwest::Error,
    },
}

impl DeliveryError {
    /// The `status` label of the delivery-failures metric.
    pub fn status_label(&self) -> String {
        match self {
            DeliveryError::Status { status, .. } => status.to_string(),
            DeliveryError::Transport { source, .. } if source.is_timeout() => "timeout".into(),
            DeliveryError::Transport { source, .. } if source.is_connect() => "connect".into(),
            DeliveryError::Transport { .. } => "transport".into(),
        }
    }

    /// A 4xx other than 429: retrying alone will not fix it.
    fn needs_operator(&self) -> bool {
        matches!(self, DeliveryError::Status { status, .. } if (400..500).contains(status) && *status != 429)
    }
}

/// Tracks which outputs are failing and keeps the fetch gate closed while any is.
#[derive(Clone, Default)]
pub struct OutputHealth {
    failing: Arc<AtomicUsize>,
    gate: FetchGate,
}

impl OutputHealth {
    pub fn new(gate: FetchGate) -> Self {
        OutputHealth {
            failing: Arc::default(),
            gate,
        }
    }
}

/// One configured output.
pub struct Output {
    kind: OutputKind,
    url: Secret,
    bearer_token: Option<Secret>,
    client: reqwest::Client,
    backoff: ExponentialBuilder,
    metrics: AlerterMetrics,
    health: OutputHealth,
    failing: AtomicBool,
}

impl Output {
    pub fn new(
        kind: OutputKind,
        url: Secret,
        bearer_token: Option<Secret>,
        delivery: &DeliveryConfig,
        metrics: AlerterMetrics,
        health: OutputHealth,
    ) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .timeout(delivery.request_timeout)
            // Webhooks do not redirect; following one could send the alert somewhere else.
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let backoff = ExponentialBuilder::default()
            .with_min_delay(delivery.min_backoff)
            .with_max_delay(delivery.max_backoff)
            .with_jitter()
            .without_max_times();
        Ok(Output {
            kind,
            url,
            bearer_token,
            client,
            backoff,
            metrics,
            health,
            failing: AtomicBool::new(false),
        })
    }

    pub fn kind(&self) -> OutputKind {
        self.kind
    }

    async fn post_once(&self, body: &Value) -> Result<(), DeliveryError> {
        let output = self.kind.label();
        let mut request = self.client.post(self.url.expose()).json(body);
        if let Some(token) = &self.bearer_token {
            request = request.bearer_auth(token.expose());
        }
        let response = request
            .send()
            .await
            .map_err(|source| DeliveryError::Transport {
                output,
                source: source.without_url(),
            })?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|value| value.to_str().ok())
            .and_then(parse_retry_after);
        Err(DeliveryError::Status {
            output,
            status: status.as_u16(),
            retry_after,
        })
    }

    /// Posts `body` until the webhook accepts it.
    pub async fn deliver(&self, body: &Value) {
        // Slack answers 400 when it refuses the blocks (e.g. `invalid_blocks`); the plain-text
        // fallback still tells people, so it replaces them rather than retrying in vain.
        let current = Mutex::new(body.clone());
        let attempt = || async {
            let body = current
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone();
            self.post_once(&body).await
        };
        let delivered = attempt
            .retry(self.backoff)
            .adjust(|error: &DeliveryError, backoff| match error {
                DeliveryError::Status {
                    retry_after: Some(wait),
                    ..
                } => Some(*wait),
                _ => backoff,
            })
            .notify(|error: &DeliveryError, wait| {
                self.on_failure(error, wait);
                if self.kind == OutputKind::Slack
                    && matches!(error, DeliveryError::Status { status: 400, .. })
                {
                    let mut body = current
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    if body.get("blocks").is_some() {
                        tracing::warn!(
                            output = "slack",
                            "slack refused the blocks; sending the plain-text fallback"
                        );
                        *body = json!({ "text": body.get("text").cloned().unwrap_or_default() });
                    }
                }
            })
            .await;
        // Retries never end (`without_max_times`), so the only way out is success.
        if delivered.is_ok() {
            self.on_success();
        }
    }

    fn on_failure(&self, error: &DeliveryError, wait: Duration) {
        let output = self.kind.label();
        self.metrics.delivery_failure(output, &error.status_label());
        if !self.failing.swap(true, Ordering::Relaxed) {
            self.health.failing.fetch_add(1, Ordering::Relaxed);
            self.health.gate.close();
            tracing::warn!(
                output,
                "webhook failing; consumption paused until it accepts again"
            );
        }
        if error.needs_operator() {
            tracing::error!(output, error = %error, retry_in = ?wait, "webhook refuses the alert; check the webhook configuration");
        } else {
            tracing::warn!(output, error = %error, retry_in = ?wait, "alert not delivered; retrying");
        }
    }

    fn on_success(&self) {
        if self.failing.swap(false, Ordering::Relaxed) {
            tracing::info!(output = self.kind.label(), "webhook accepts alerts again");
            if self.health.failing.fetch_sub(1, Ordering::Relaxed) == 1 {
                self.health.gate.open();
            }
        }
    }
}

/// A `Retry-After` value: delay-seconds (what Slack sends) or an HTTP-date, capped at
/// [`MAX_RETRY_AFTER`]. A date in the past means "now".
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    let wait = match value.parse::<u64>() {
        Ok(seconds) => Duration::from_secs(seconds),
        Err(_) => {
            let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
            (at.with_timezone(&chrono::Utc) - chrono::Utc::now())
                .to_std()
                .unwrap_or(Duration::ZERO)
        }
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

/// Completes the dead letters a message covers once every output has delivered it.
pub struct Completion {
    remaining_outputs: AtomicUsize,
    waiters: Mutex<Vec<oneshot::Sender<()>>>,
    metrics: AlerterMetrics,
}

impl Completion {
    pub fn new(outputs: usize, waiters: Vec<oneshot::Sender<()>>, metrics: AlerterMetrics) -> Self {
        Completion {
            remaining_outputs: AtomicUsize::new(outputs),
            waiters: Mutex::new(waiters),
            metrics,
        }
    }

    pub(crate) fn output_delivered(&self) {
        if self.remaining_outputs.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        let waiters = std::mem::take(
            &mut *self
                .waiters
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        self.metrics.pending.dec_by(waiters.len() as i64);
        for waiter in waiters {
            // A handler that is gone was abandoned at shutdown; its record is consumed again.
            let _ = waiter.send(());
        }
    }
}

/// A message on its way to one output.
pub struct Delivery {
    pub message: Arc<Message>,
    pub completion: Arc<Completion>,
}

/// Posts every delivery of `deliveries_rx` to `output`, one after the other, until the channel
/// closes.
pub async fn run_output(output: Arc<Output>, mut deliveries_rx: mpsc::UnboundedReceiver<Delivery>) {
    let label = output.kind().label();
    while let Some(delivery) = deliveries_rx.recv().await {
        let body = output.kind().render(&delivery.message);
        output.deliver(&body).await;
        match delivery.message.as_ref() {
            Message::Alert(alert) => {
                output.metrics.alert_sent(label);
                tracing::debug!(output = label, class = %alert.error_class, dead_letter_id = %alert.dead_letter_id, "alert delivered");
            }
            Message::Summary(summary) => {
                output.metrics.summary_sent(label);
                tracing::debug!(output = label, class = %summary.error_class, count = summary.count, "summary delivered");
            }
        }
        delivery.completion.output_delivered();
    }
}

/// Escapes the three characters Slack's mrkdwn treats as control characters.
fn mrkdwn(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn or_unknown(text: &str) -> &str {
    if text.is_empty() { "unknown" } else { text }
}

fn field(label: &str, value: &str) -> Value {
    json!({ "type": "mrkdwn", "text": format!("*{label}*\n{}", mrkdwn(value)) })
}

fn section(text: String) -> Value {
    json!({ "type": "section", "text": { "type": "mrkdwn", "text": text } })
}

fn header(text: &str) -> Value {
    // Slack caps header text at 150 characters.
    json!({ "type": "header", "text": { "type": "plain_text", "text": crate::redact::truncate(text, 150) } })
}

/// Block Kit for one dead letter, with a plain-text fallback for notifications.
pub fn slack_alert(alert: &DeadLetterAlert) -> Value {
    let source = format!(
        "{} partition {} offset {}",
        or_unknown(&alert.source.topic),
        alert.source.partition,
        alert.source.offset
    );
    let fields = vec![
        field("Error class", &alert.error_class),
        field("Ticket", or_unknown(&alert.ticket_id)),
        field("Tenant", or_unknown(&alert.tenant_id)),
        field("Source", &source),
        field("Attempts", &alert.attempts.to_string()),
        field("Failed service", or_unknown(&alert.failed_service)),
        field("First failure", &format_time(alert.first_failure_at)),
        field("Last failure", &format_time(alert.last_failure_at)),
        field("Trace id", or_unknown(&alert.trace_id)),
        field("Dead letter", or_unknown(&alert.dead_letter_id)),
    ];
    let replay = match &alert.replay_command {
        Some(command) => format!("*Replay*\n```{}```", mrkdwn(command)),
        None => "*Replay*\nnot replayable: the record on the dead-letter topic is not a DeadLetter envelope".into(),
    };
    let position = &alert.dead_letter_record;
    let text = format!(
        "Dead letter: {} for ticket {} (tenant {}): {}. Replay: {}",
        alert.error_class,
        or_unknown(&alert.ticket_id),
        or_unknown(&alert.tenant_id),
        alert.error_message,
        alert.replay_command.as_deref().unwrap_or("not replayable"),
    );
    json!({
        "text": text,
        "blocks": [
            header(&format!("Dead letter: {}", alert.error_class)),
            section(format!("*Error* `{}`\n{}", mrkdwn(&alert.error_class), mrkdwn(&alert.error_message))),
            { "type": "section", "fields": fields },
            section(format!("*Ticket excerpt (redacted)*\n>{}", mrkdwn(or_unknown(&alert.excerpt)))),
            section(replay),
            { "type": "context", "elements": [ { "type": "mrkdwn", "text": format!(
                "dead-letter record {} partition {} offset {}", mrkdwn(&position.topic), position.partition, position.offset) } ] },
        ],
    })
}

/// Block Kit for the failures folded into one window.
pub fn slack_summary(summary: &Summary) -> Value {
    let tickets = if summary.ticket_ids.is_empty() {
        "unknown".to_owned()
    } else if summary.ticket_ids.len() < summary.count {
        format!("{}, …", summary.ticket_ids.join(", "))
    } else {
        summary.ticket_ids.join(", ")
    };
    let tenants = if summary.tenants.len() < summary.num_tenants {
        format!(
            "{}, … ({} in all)",
            summary.tenants.join(", "),
            summary.num_tenants
        )
    } else if summary.tenants.is_empty() {
        "unknown".to_owned()
    } else {
        summary.tenants.join(", ")
    };
    let mut blocks = vec![header(&summary.headline), {
        let fields = vec![
            field("Error class", &summary.error_class),
            field("Failures", &summary.count.to_string()),
            field(
                &format!("Tickets (first {})", summary.ticket_ids.len()),
                &tickets,
            ),
            field(
                &format!("Tenants affected ({})", summary.num_tenants),
                &tenants,
            ),
            field("First failure", &format_time(summary.first_failure_at)),
            field("Last failure", &format_time(summary.last_failure_at)),
        ];
        json!({ "type": "section", "fields": fields })
    }];
    if let Some(command) = &summary.replay_command {
        blocks.push(section(format!(
            "*Replay all of them*\n```{}```",
            mrkdwn(command)
        )));
    }
    json!({
        "text": format!("{} (tickets: {tickets}; tenants: {tenants})", summary.headline),
        "blocks": blocks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alert::Position;

    fn alert() -> DeadLetterAlert {
        DeadLetterAlert {
            dead_letter_id: "dl-1".into(),
            error_class: "invalid_output".into(),
            error_message: "model said <nope> & more".into(),
            ticket_id: "t-1".into(),
            tenant_id: "acme".into(),
            source: Position {
                topic: "tasks.llm.inference".into(),
                partition: 3,
                offset: 42,
            },
            attempts: 2,
            first_failure_at: chrono::DateTime::from_timestamp(1_700_000_000, 0),
            last_failure_at: chrono::DateTime::from_timestamp(1_700_000_060, 0),
            failed_service: "inference-worker".into(),
            trace_id: "0af7651916cd43dd8448eb211c80319c".into(),
            excerpt: "Refund [email]".into(),
            replay_command: Some("dlq-alerter replay --id dl-1 --execute".into()),
            dead_letter_record: Position {
                topic: "dlq.llm.failed".into(),
                partition: 1,
                offset: 9,
            },
            undecodable_size_bytes: None,
        }
    }

    #[test]
    fn slack_alert_has_every_field_escaped_and_a_fallback() {
        let payload = slack_alert(&alert());
        let text = payload.to_string();
        for expected in [
            "Dead letter: invalid_output",
            "model said &lt;nope&gt; &amp; more",
            "*Ticket*\\nt-1",
            "*Tenant*\\nacme",
            "tasks.llm.inference partition 3 offset 42",
            "*Attempts*\\n2",
            "*Failed service*\\ninference-worker",
            "2023-11-14T22:13:20.000Z",
            "2023-11-14T22:14:20.000Z",
            "0af7651916cd43dd8448eb211c80319c",
            "Refund [email]",
            "```dlq-alerter replay --id dl-1 --execute```",
        ] {
            assert!(text.contains(expected), "{expected} missing in {text}");
        }
        assert_eq!(payload["blocks"][0]["type"], "header");
        assert_eq!(payload["blocks"][2]["fields"].as_array().unwrap().len(), 10);
        assert!(payload["text"].as_str().unwrap().contains("t-1"));
    }

    #[test]
    fn slack_summary_says_how_many_which_tickets_and_tenants() {
        let summary = Summary {
            error_class: "invalid_output".into(),
            count: 37,
            window_seconds: 300.0,
            headline: Summary::headline(37, "invalid_output", Duration::from_secs(300)),
            ticket_ids: vec!["t-2".into(), "t-3".into()],
            tenants: vec!["acme".into()],
            num_tenants: 1,
            first_failure_at: None,
            last_failure_at: None,
            replay_command: Some("dlq-alerter replay --class invalid_output --execute".into()),
        };
        let text = slack_summary(&summary).to_string();
        assert!(
            text.contains("37 more invalid_output failures in the last 5 minutes"),
            "{text}"
        );
        assert!(text.contains("t-2, t-3, …"), "{text}");
        assert!(text.contains("Tenants affected (1)"), "{text}");
    }

    #[test]
    fn retry_after_is_seconds_or_an_http_date() {
        assert_eq!(parse_retry_after(" 30 "), Some(Duration::from_secs(30)));
        assert_eq!(parse_retry_after("86400"), Some(MAX_RETRY_AFTER));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        let in_a_minute = (chrono::Utc::now() + chrono::Duration::seconds(60)).to_rfc2822();
        let wait = parse_retry_after(&in_a_minute).unwrap();
        assert!(
            wait > Duration::from_secs(55) && wait <= Duration::from_secs(60),
            "{wait:?}"
        );
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn errors_never_name_the_url() {
        let error = DeliveryError::Status {
            output: "slack",
            status: 500,
            retry_after: None,
        };
        assert_eq!(error.to_string(), "the slack webhook answered 500");
        assert_eq!(error.status_label(), "500");
    }
}
