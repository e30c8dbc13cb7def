//! `dlq-alerter replay`: lists the dead letters that match a filter and, with `--execute`,
//! re-publishes their original tasks to `topics.inference_tasks`.
//!
//! The dead-letter topic is read from the beginning of every partition up to the high
//! watermarks captured at start, by assignment: no consumer group, no commits, so listing is
//! free of side effects and never races the alerter's group. A re-published task carries the
//! original key, value and headers, plus `triage-replay-of: <dead letter id>`, and its
//! `replay_count` is incremented (re-encoded in its own content type) so that the worker gives
//! it a fresh retry budget. Only tasks can be replayed: a dead letter from another topic whose
//! payload is not an `InferenceTask` is listed and said to be skipped.

use std::{
    collections::HashMap,
    io::Write,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use chrono::{DateTime, FixedOffset, Utc};
use rdkafka::{
    Message as _, Offset, TopicPartitionList,
    consumer::{BaseConsumer, Consumer},
    error::KafkaError,
    message::{Header, OwnedHeaders},
};
use triage_proto::{
    ContentType,
    v1::{DeadLetter, ErrorClass},
};
use triage_runtime::{
    config::KafkaConfig,
    kafka::{headers, producer::ContractProducer},
    service,
};

use crate::{
    Config, SERVICE,
    alert::{AlertSettings, Original, format_time, original_header, to_datetime},
};

const METADATA_TIMEOUT: Duration = Duration::from_secs(15);
/// How long reading may go without a record before the topic is declared unreadable.
const READ_STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Which dead letters to list or replay. Filters combine with AND.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct ReplayArgs {
    /// Error class label, e.g. `invalid_output`, `retries_exhausted`.
    #[arg(long, value_parser = parse_class)]
    pub class: Option<String>,
    /// Tenant id.
    #[arg(long)]
    pub tenant: Option<String>,
    /// Ticket id.
    #[arg(long)]
    pub ticket: Option<String>,
    /// Dead-letter id (as shown in the alert).
    #[arg(long)]
    pub id: Option<String>,
    /// Only dead letters whose last failure is at or after this time (RFC 3339).
    #[arg(long, value_parser = parse_time)]
    pub since: Option<DateTime<FixedOffset>>,
    /// Only dead letters whose last failure is at or before this time (RFC 3339).
    #[arg(long, value_parser = parse_time)]
    pub until: Option<DateTime<FixedOffset>>,
    /// At most this many dead letters, oldest first within each partition.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Re-publish the matches. Without it, only lists them (dry run).
    #[arg(long)]
    pub execute: bool,
}

fn parse_class(label: &str) -> Result<String, String> {
    ErrorClass::from_label(label)
        .map(|class| class.label().to_owned())
        .ok_or_else(|| {
            "unknown error class; one of decode, invalid_request, content_filter, context_length, invalid_output, retries_exhausted, invalid_event".into()
        })
}

fn parse_time(text: &str) -> Result<DateTime<FixedOffset>, String> {
    DateTime::parse_from_rfc3339(text).map_err(|e| format!("not an RFC 3339 time: {e}"))
}

impl ReplayArgs {
    pub fn matches(&self, dead_letter: &DeadLetter) -> bool {
        let class = ErrorClass::try_from(dead_letter.error_class)
            .unwrap_or(ErrorClass::Unspecified)
            .label();
        let last_failure = dead_letter.last_failure_at.as_ref().and_then(to_datetime);
        let in_range = |bound: Option<DateTime<FixedOffset>>, after: bool| match bound {
            None => true,
            Some(bound) => last_failure.is_some_and(|at| {
                let bound = bound.with_timezone(&Utc);
                if after { at >= bound } else { at <= bound }
            }),
        };
        self.class.as_deref().is_none_or(|c| c == class)
            && self
                .tenant
                .as_deref()
                .is_none_or(|t| t == dead_letter.tenant_id)
            && self
                .ticket
                .as_deref()
                .is_none_or(|t| t == dead_letter.ticket_id)
            && self.id.as_deref().is_none_or(|id| id == dead_letter.id)
            && in_range(self.since, true)
            && in_range(self.until, false)
    }
}

/// A dead letter that matched, and where it is.
#[derive(Clone, Debug)]
pub struct Listed {
    pub partition: i32,
    pub offset: i64,
    pub dead_letter: DeadLetter,
}

/// What a replay run found and did.
#[derive(Clone, Debug, Default)]
pub struct ReplayReport {
    /// Records read from the dead-letter topic.
    pub scanned: usize,
    /// Records that are not `DeadLetter` envelopes (never replayable).
    pub undecodable: usize,
    /// Ids of the dead letters that matched the filter.
    pub matched: Vec<String>,
    /// Ids re-published (with `--execute`).
    pub replayed: Vec<String>,
    /// Ids not replayable, with the reason.
    pub skipped: Vec<(String, String)>,
}

/// What re-publishing a dead letter would send.
#[derive(Debug)]
pub struct Republish {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub headers: OwnedHeaders,
    /// The task's new `replay_count`, when the payload decoded as a task.
    pub replay_count: Option<u32>,
}

/// The record that replays `dead_letter`, or why there is none.
pub fn republish(dead_letter: &DeadLetter, settings: &AlertSettings) -> Result<Republish, String> {
    if dead_letter.original_value.is_empty() {
        return Err("the dead letter carries no original value".into());
    }
    let task = match Original::decode(dead_letter, settings) {
        Original::Task(task) => Some(task),
        _ => None,
    };
    if task.is_none() && dead_letter.source_topic != settings.inference_topic {
        return Err(format!(
            "not replayable: the source was {} and the payload is not an InferenceTask",
            if dead_letter.source_topic.is_empty() {
                "unknown"
            } else {
                &dead_letter.source_topic
            }
        ));
    }
    // The envelope's tenant is what `--tenant` filtered on; a task inside that names another
    // tenant is not replayed under the first one's filter.
    if let Some(task) = &task
        && !dead_letter.tenant_id.is_empty()
        && task.tenant_id != dead_letter.tenant_id
    {
        return Err(format!(
            "not replayable: the dead letter names tenant {:?} but its task names {:?}",
            dead_letter.tenant_id, task.tenant_id
        ));
    }
    // Tasks are keyed by ticket, so the replay lands in its ticket's partition whatever key the
    // original had (dead letters of older dispatchers were keyed by tenant).
    let key = match &task {
        Some(task) => task.ticket_id.clone().into_bytes(),
        None => dead_letter.original_key.clone(),
    };
    let (value, replay_count) = match task {
        Some(mut task) => {
            task.replay_count = task.replay_count.saturating_add(1);
            let content_type = match original_header(dead_letter, headers::CONTENT_TYPE) {
                Some(mime) => ContentType::from_mime(mime).unwrap_or(ContentType::Protobuf),
                // Same sniffing as `triage_proto::decode` did when it decoded the task.
                None if dead_letter.original_value.first() == Some(&b'{') => ContentType::Json,
                None => ContentType::Protobuf,
            };
            (
                triage_proto::encode(task.as_ref(), content_type),
                Some(task.replay_count),
            )
        }
        // From the task topic but undecodable: re-published as it was, so a fixed worker can
        // take it.
        None => (dead_letter.original_value.clone(), None),
    };
    let mut record_headers =
        OwnedHeaders::new_with_capacity(dead_letter.original_headers.len() + 1);
    for header in dead_letter
        .original_headers
        .iter()
        .filter(|h| !h.key.eq_ignore_ascii_case(headers::REPLAY_OF))
    {
        record_headers = record_headers.insert(Header {
            key: &header.key,
            value: Some(&header.value),
        });
    }
    record_headers = record_headers.insert(Header {
        key: headers::REPLAY_OF,
        value: Some(dead_letter.id.as_bytes()),
    });
    Ok(Republish {
        key,
        value,
        headers: record_headers,
        replay_count,
    })
}

/// Reads the dead-letter topic up to the high watermarks at start (the whole topic, or only the
/// last `tail` records of each partition) and returns the matches, plus the count of records
/// read and of records that are no dead letter. Blocking.
pub fn read_matches(
    kafka: &KafkaConfig,
    topic: &str,
    args: &ReplayArgs,
    tail: Option<i64>,
) -> anyhow::Result<(Vec<Listed>, usize, usize)> {
    let mut client_config = kafka.client_config("replay");
    client_config
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "true")
        // Dead letters written in an aborted transaction (the dispatch stage writes them
        // transactionally) never happened and must not be replayed.
        .set("isolation.level", "read_committed")
        // A group id is required by librdkafka for a consumer even when nothing is committed.
        .set("group.id", format!("{SERVICE}-replay-reader"));
    let consumer: BaseConsumer = client_config
        .create()
        .context("failed to create the replay reader")?;
    let metadata = consumer
        .fetch_metadata(Some(topic), METADATA_TIMEOUT)
        .context("failed to read the dead-letter topic's metadata")?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .map(|t| t.partitions().iter().map(|p| p.id()).collect())
        .unwrap_or_default();
    if partitions.is_empty() {
        anyhow::bail!("topic {topic} does not exist or has no partitions");
    }
    let mut ends: HashMap<i32, i64> = HashMap::new();
    let mut assignment = TopicPartitionList::new();
    for partition in partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, partition, METADATA_TIMEOUT)
            .with_context(|| format!("failed to read the watermarks of {topic}/{partition}"))?;
        let start = match tail {
            Some(tail) => low.max(high.saturating_sub(tail)),
            None => low,
        };
        if high > start {
            ends.insert(partition, high);
            assignment.add_partition_offset(topic, partition, Offset::Offset(start))?;
        }
    }
    let mut matches = Vec::new();
    let mut scanned = 0;
    let mut undecodable = 0;
    if ends.is_empty() {
        return Ok((matches, scanned, undecodable));
    }
    consumer.assign(&assignment)?;
    let limit = args.limit.unwrap_or(usize::MAX);
    let mut last_progress = Instant::now();
    while !ends.is_empty() && matches.len() < limit {
        match consumer.poll(Duration::from_millis(200)) {
            None => {
                if last_progress.elapsed() > READ_STALL_TIMEOUT {
                    anyhow::bail!(
                        "no record from {topic} for {READ_STALL_TIMEOUT:?}; partitions left: {:?}",
                        ends.keys()
                    );
                }
            }
            Some(Err(KafkaError::PartitionEOF(partition))) => {
                ends.remove(&partition);
            }
            Some(Err(error)) => {
                tracing::warn!(topic, error = %error, "error while reading the dead-letter topic");
            }
            Some(Ok(record)) => {
                last_progress = Instant::now();
                let partition = record.partition();
                let offset = record.offset();
                if ends.get(&partition).is_none_or(|end| offset >= *end) {
                    ends.remove(&partition);
                    continue;
                }
                if ends.get(&partition).is_some_and(|end| offset + 1 >= *end) {
                    ends.remove(&partition);
                }
                scanned += 1;
                let content_type = headers::get_str(record.headers(), headers::CONTENT_TYPE);
                match triage_proto::decode::<DeadLetter>(
                    record.payload().unwrap_or_default(),
                    content_type,
                ) {
                    Ok(dead_letter) if args.matches(&dead_letter) => matches.push(Listed {
                        partition,
                        offset,
                        dead_letter,
                    }),
                    Ok(_) => {}
                    Err(_) => undecodable += 1,
                }
            }
        }
    }
    Ok((matches, scanned, undecodable))
}

/// Lists the matches as a table on `out` and, with `--execute`, re-publishes them.
pub async fn replay(
    config: &Config,
    args: &ReplayArgs,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<ReplayReport> {
    let kafka = config.kafka.clone();
    let topic = config.topics.dead_letters.clone();
    let filter = args.clone();
    let (matches, scanned, undecodable) =
        tokio::task::spawn_blocking(move || read_matches(&kafka, &topic, &filter, None))
            .await
            .context("the replay reader panicked")??;
    let settings = AlertSettings::from_config(config);
    let mut report = ReplayReport {
        scanned,
        undecodable,
        ..Default::default()
    };
    writeln!(
        out,
        "{:<36}  {:<17}  {:<16}  {:<24}  {:<24}  {:<8}  REPLAY",
        "DEAD LETTER", "CLASS", "TENANT", "TICKET", "LAST FAILURE", "AT"
    )?;
    let mut planned = Vec::with_capacity(matches.len());
    for listed in &matches {
        let dead_letter = &listed.dead_letter;
        let plan = republish(dead_letter, &settings);
        let replay_column = match &plan {
            Ok(_) => format!("to {}", config.topics.inference_tasks),
            Err(reason) => reason.clone(),
        };
        writeln!(
            out,
            "{:<36}  {:<17}  {:<16}  {:<24}  {:<24}  {:<8}  {}",
            dead_letter.id,
            ErrorClass::try_from(dead_letter.error_class)
                .unwrap_or(ErrorClass::Unspecified)
                .label(),
            dead_letter.tenant_id,
            dead_letter.ticket_id,
            format_time(dead_letter.last_failure_at.as_ref().and_then(to_datetime)),
            format!("{}@{}", listed.partition, listed.offset),
            replay_column,
        )?;
        report.matched.push(dead_letter.id.clone());
        match plan {
            Ok(plan) => planned.push((dead_letter, plan)),
            Err(reason) => report.skipped.push((dead_letter.id.clone(), reason)),
        }
    }
    writeln!(
        out,
        "{} dead letters read, {} match, {} replayable, {} not replayable, {} records not dead letters",
        scanned,
        report.matched.len(),
        planned.len(),
        report.skipped.len(),
        undecodable
    )?;
    if !args.execute {
        writeln!(
            out,
            "dry run: nothing re-published; add --execute to replay"
        )?;
        return Ok(report);
    }
    let producer = ContractProducer::new(
        &config.kafka,
        SERVICE,
        ContentType::Protobuf,
        Duration::from_secs(30),
    )
    .context("failed to create the replay producer")?;
    for (dead_letter, plan) in planned {
        let delivered = producer
            .send_raw(
                &config.topics.inference_tasks,
                &plan.key,
                &plan.value,
                plan.headers,
            )
            .await
            .with_context(|| format!("failed to re-publish dead letter {}", dead_letter.id))?;
        tracing::info!(
            dead_letter_id = %dead_letter.id,
            ticket_id = %dead_letter.ticket_id,
            tenant_id = %dead_letter.tenant_id,
            topic = %config.topics.inference_tasks,
            partition = delivered.partition,
            offset = delivered.offset,
            replay_count = plan.replay_count,
            "dead letter replayed"
        );
        writeln!(
            out,
            "replayed {} to {} partition {} offset {}",
            dead_letter.id, config.topics.inference_tasks, delivered.partition, delivered.offset
        )?;
        report.replayed.push(dead_letter.id.clone());
    }
    producer.flush(Duration::from_secs(10));
    Ok(report)
}

/// The `replay` subcommand's whole `main`: configuration, telemetry, then [`replay`] to stdout.
pub fn main(args: ReplayArgs) -> ExitCode {
    let (config, _telemetry) = match service::bootstrap::<Config>(SERVICE) {
        Ok(started) => started,
        Err(exit_code) => return exit_code,
    };
    service::block_on(SERVICE, async move {
        let mut stdout = std::io::stdout();
        replay(&config, &args, &mut stdout).await.map(|_| ())
    })
}

#[cfg(test)]
mod tests {
    use rdkafka::message::Headers;
    use triage_proto::v1::{InferenceTask, RecordHeader};

    use super::*;

    fn settings() -> AlertSettings {
        AlertSettings {
            excerpt_chars: 200,
            replay_command: "dlq-alerter replay".into(),
            tickets_topic: "events.tickets.created".into(),
            inference_topic: "tasks.llm.inference".into(),
        }
    }

    #[test]
    fn a_task_is_re_encoded_in_its_content_type_with_one_more_replay() {
        let task = InferenceTask {
            ticket_id: "t-1".into(),
            replay_count: 2,
            ..Default::default()
        };
        for content_type in [ContentType::Json, ContentType::Protobuf] {
            let dead_letter = DeadLetter {
                id: "dl-1".into(),
                original_key: b"acme".to_vec(),
                original_value: triage_proto::encode(&task, content_type),
                original_headers: vec![
                    RecordHeader {
                        key: "content-type".into(),
                        value: content_type.as_mime().into(),
                    },
                    RecordHeader {
                        key: headers::REPLAY_OF.into(),
                        value: b"older".to_vec(),
                    },
                ],
                source_topic: "tasks.llm.inference".into(),
                ..Default::default()
            };
            let plan = republish(&dead_letter, &settings()).unwrap();
            let replayed: InferenceTask =
                triage_proto::decode(&plan.value, Some(content_type.as_mime())).unwrap();
            assert_eq!(replayed.replay_count, 3);
            assert_eq!(replayed.ticket_id, "t-1");
            assert_eq!(
                plan.key, b"t-1",
                "re-keyed by ticket, not by the old tenant key"
            );
            let replay_of: Vec<_> = plan
                .headers
                .iter()
                .filter(|h| h.key == headers::REPLAY_OF)
                .map(|h| h.value.unwrap().to_vec())
                .collect();
            assert_eq!(replay_of, vec![b"dl-1".to_vec()]);
        }
    }

    #[test]
    fn a_task_of_another_tenant_than_its_envelope_is_not_replayed() {
        let task = InferenceTask {
            ticket_id: "t-1".into(),
            tenant_id: "globex".into(),
            ..Default::default()
        };
        let dead_letter = DeadLetter {
            id: "dl-4".into(),
            tenant_id: "acme".into(),
            original_value: triage_proto::encode(&task, ContentType::Protobuf),
            source_topic: "tasks.llm.inference".into(),
            ..Default::default()
        };
        let reason = republish(&dead_letter, &settings()).unwrap_err();
        assert!(reason.contains("globex"), "{reason}");
    }

    #[test]
    fn a_ticket_event_is_not_replayed_to_the_task_topic() {
        let dead_letter = DeadLetter {
            id: "dl-2".into(),
            original_value: br#"{"ticketId":"t-2","subject":"x"}"#.to_vec(),
            original_headers: vec![RecordHeader {
                key: "ce_type".into(),
                value: b"ticketing.v1.TicketCreated".to_vec(),
            }],
            source_topic: "events.tickets.created".into(),
            ..Default::default()
        };
        let reason = republish(&dead_letter, &settings()).unwrap_err();
        assert!(reason.contains("events.tickets.created"), "{reason}");
    }

    #[test]
    fn filters_combine() {
        let dead_letter = DeadLetter {
            id: "dl-3".into(),
            error_class: ErrorClass::InvalidOutput as i32,
            tenant_id: "acme".into(),
            ticket_id: "t-3".into(),
            last_failure_at: Some(triage_proto::wkt::Timestamp {
                seconds: 1_700_000_000,
                nanos: 0,
            }),
            ..Default::default()
        };
        let args = |f: fn(&mut ReplayArgs)| {
            let mut args = ReplayArgs::default();
            f(&mut args);
            args.matches(&dead_letter)
        };
        assert!(args(|_| {}));
        assert!(args(|a| a.class = Some("invalid_output".into())));
        assert!(!args(|a| a.class = Some("decode".into())));
        assert!(!args(|a| a.tenant = Some("globex".into())));
        assert!(args(
            |a| a.since = Some(parse_time("2023-11-14T22:13:20Z").unwrap())
        ));
        assert!(!args(
            |a| a.since = Some(parse_time("2023-11-14T22:13:21Z").unwrap())
        ));
        assert!(args(
            |a| a.until = Some(parse_time("2023-11-14T23:13:20+01:00").unwrap())
        ));
        assert!(!args(
            |a| a.until = Some(parse_time("2023-11-14T22:13:19Z").unwrap())
        ));
        assert!(parse_class("nope").is_err());
    }
}
