//! Property tests of the record decoders every stage runs on what any application may publish:
//! arbitrary bytes, under any content type, never panic, and whatever decodes can be checked
//! against the timestamp rule without panicking either.

use proptest::prelude::*;
use triage_proto::{
    ContentType, Contract, Timestamps, check_timestamps, decode, encode,
    v1::{DeadLetter, InferenceResult, InferenceTask, TicketCreated},
};

fn content_type() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        Just(None),
        Just(Some(ContentType::Protobuf.as_mime().to_owned())),
        Just(Some(ContentType::Json.as_mime().to_owned())),
        Just(Some("application/json; charset=utf-8".to_owned())),
        "\\PC{0,30}".prop_map(Some),
    ]
}

/// Bytes near a real record: a valid encoding cut short, with a byte flipped, or extended.
fn near_valid(valid: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    let len = valid.len();
    (
        0..=len,
        any::<usize>(),
        any::<u8>(),
        prop::collection::vec(any::<u8>(), 0..16),
    )
        .prop_map(move |(cut, flip_at, flip, tail)| {
            let mut bytes = valid.clone();
            if let Some(byte) = bytes.get_mut(flip_at % len.max(1)) {
                *byte ^= flip;
            }
            bytes.truncate(cut);
            bytes.extend(tail);
            bytes
        })
}

fn decodes_without_panic<M: Contract + Timestamps>(bytes: &[u8], content_type: Option<&str>) {
    if let Ok(message) = decode::<M>(bytes, content_type) {
        let _ = check_timestamps(&message);
    }
}

fn every_contract(bytes: &[u8], content_type: Option<&str>) {
    decodes_without_panic::<TicketCreated>(bytes, content_type);
    decodes_without_panic::<InferenceTask>(bytes, content_type);
    decodes_without_panic::<InferenceResult>(bytes, content_type);
    decodes_without_panic::<DeadLetter>(bytes, content_type);
}

fn sample_task() -> InferenceTask {
    InferenceTask {
        ticket_id: "t-1".into(),
        tenant_id: "acme".into(),
        ..Default::default()
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|cases| cases.parse().ok()).unwrap_or(512),
        ..ProptestConfig::default()
    })]

    #[test]
    fn arbitrary_bytes_never_panic_a_decoder(
        bytes in prop::collection::vec(any::<u8>(), 0..512),
        content_type in content_type(),
    ) {
        every_contract(&bytes, content_type.as_deref());
    }

    #[test]
    fn damaged_protobuf_and_json_never_panic_a_decoder(
        protobuf in near_valid(encode(&sample_task(), ContentType::Protobuf)),
        json in near_valid(encode(&sample_task(), ContentType::Json)),
    ) {
        every_contract(&protobuf, Some(ContentType::Protobuf.as_mime()));
        every_contract(&json, Some(ContentType::Json.as_mime()));
    }

    #[test]
    fn any_json_text_never_panics_a_decoder(text in "\\PC{0,200}") {
        every_contract(text.as_bytes(), Some(ContentType::Json.as_mime()));
    }
}
