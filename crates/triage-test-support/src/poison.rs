//! Records a careless producer or a hostile application publishes onto a stage's input topic,
//! for the poison-record tests every consumer stage runs: each must become exactly one dead
//! letter while the records around it are processed and the commit point reaches the end.

use std::time::Duration;

use rdkafka::{
    message::{Header, OwnedHeaders},
    producer::{FutureProducer, FutureRecord},
};
use triage_proto::{ContentType, Contract, wkt::Timestamp};

use crate::client_config;

/// One poison record: what it is, its key, value and `content-type` header.
#[derive(Clone, Debug)]
pub struct Poison {
    pub name: String,
    pub key: String,
    pub value: Vec<u8>,
    pub content_type: &'static str,
}

/// How to make a valid message of a stage's input type poisonous in the two ways that depend on
/// the type: a timestamp at protobuf's extremes, and a field larger than the stage accepts.
pub struct PoisonShapes<M> {
    pub valid: M,
    pub set_timestamp: fn(&mut M, Timestamp),
    pub oversize: fn(&mut M),
}

/// The poison records for a stage whose input is `M`, keyed `key-<name>`.
pub fn poison_records<M: Contract + Clone>(shapes: &PoisonShapes<M>, key: &str) -> Vec<Poison> {
    let protobuf = ContentType::Protobuf.as_mime();
    let json = ContentType::Json.as_mime();
    let valid = triage_proto::encode(&shapes.valid, ContentType::Protobuf);
    let with = |change: &dyn Fn(&mut M)| {
        let mut message = shapes.valid.clone();
        change(&mut message);
        triage_proto::encode(&message, ContentType::Protobuf)
    };
    let cases: Vec<(&str, Vec<u8>, &'static str)> = vec![
        (
            "garbage",
            vec![0xde, 0xad, 0xbe, 0xef, 0xff, 0x00, 0x13, 0x37],
            protobuf,
        ),
        // One byte short: the last field's value (or length) is cut, never a clean boundary.
        (
            "truncated-protobuf",
            valid[..valid.len().saturating_sub(1)].to_vec(),
            protobuf,
        ),
        (
            "wrong-json-types",
            br#"{"ticketId": {"nested": true}, "tenantId": [1, 2]}"#.to_vec(),
            json,
        ),
        (
            "invalid-utf8-json",
            b"{\"ticketId\": \"\xff\xfe\"}".to_vec(),
            json,
        ),
        // Field 1 (a string in every contract) holding bytes that are not UTF-8.
        (
            "invalid-utf8-protobuf",
            vec![0x0a, 0x02, 0xff, 0xfe],
            protobuf,
        ),
        (
            "timestamp-minimum",
            with(&|message| {
                (shapes.set_timestamp)(
                    message,
                    Timestamp {
                        seconds: i64::MIN,
                        nanos: 0,
                    },
                )
            }),
            protobuf,
        ),
        (
            "timestamp-maximum",
            with(&|message| {
                (shapes.set_timestamp)(
                    message,
                    Timestamp {
                        seconds: i64::MAX,
                        nanos: i32::MAX,
                    },
                )
            }),
            protobuf,
        ),
        (
            "oversized-field",
            with(&|message| (shapes.oversize)(message)),
            protobuf,
        ),
    ];
    cases
        .into_iter()
        .map(|(name, value, content_type)| Poison {
            name: name.to_owned(),
            key: format!("{key}-{name}"),
            value,
            content_type,
        })
        .collect()
}

/// Produces `records` to one partition, in order, with their `content-type` headers.
pub async fn produce_poison(topic: &str, partition: i32, records: &[Poison]) {
    let producer: FutureProducer = client_config()
        .set("message.max.bytes", "1000000")
        .create()
        .expect("test producer");
    for poison in records {
        let headers = OwnedHeaders::new().insert(Header {
            key: "content-type",
            value: Some(poison.content_type),
        });
        let record = FutureRecord::to(topic)
            .key(&poison.key)
            .payload(&poison.value)
            .partition(partition)
            .headers(headers);
        producer
            .send(record, Duration::from_secs(10))
            .await
            .unwrap_or_else(|(error, _)| panic!("produce {} to {topic}: {error}", poison.name));
    }
}
