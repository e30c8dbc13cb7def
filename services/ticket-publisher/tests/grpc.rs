//! The gRPC `TicketIngest` service on a real socket: the same rules and answers as HTTP, with
//! errors as status codes carrying the problem details.

mod common;

use common::*;
use rdkafka::Message;
use tokio::{net::TcpListener, task::JoinSet};
use tonic::{Code, Request, metadata::MetadataValue};
use triage_proto::v1::{CreateTicketRequest, Customer, ticket_ingest_client::TicketIngestClient};
use triage_runtime::shutdown;
use triage_test_support::{TestContext, consumer, read_records};

fn request(key: Option<&str>, message: CreateTicketRequest) -> Request<CreateTicketRequest> {
    let mut request = Request::new(message);
    if let Some(key) = key {
        let value: MetadataValue<_> = format!("Bearer {key}").parse().unwrap();
        request.metadata_mut().insert("authorization", value);
    }
    request
}

fn ticket(subject: &str) -> CreateTicketRequest {
    CreateTicketRequest {
        subject: subject.into(),
        description: "The app crashes on login".into(),
        customer: Some(Customer {
            id: "c-7".into(),
            email: None,
            tier: Some("free".into()),
        }),
        channel: "chat".into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn grpc_accepts_refuses_and_replays_like_http() {
    let ctx = TestContext::new("tp_grpc");
    ctx.create_topics(3).await;
    let config = config(&ctx);
    let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = grpc.local_addr().unwrap();
    let (trigger, stop) = shutdown::channel();
    let mut tasks = JoinSet::new();
    ticket_publisher::spawn_ingress(&mut tasks, ingress(&config), http, grpc, stop);
    let mut client = TicketIngestClient::connect(format!("http://{address}"))
        .await
        .unwrap();

    let accepted = client
        .create_ticket(request(Some(ACME_KEY), ticket("crash")))
        .await
        .unwrap()
        .into_inner();

    let status = client
        .create_ticket(request(None, ticket("no key")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);

    let mut invalid = ticket("");
    invalid.customer = None;
    let status = client
        .create_ticket(request(Some(ACME_KEY), invalid))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("subject"), "{}", status.message());
    let problem: serde_json::Value = serde_json::from_slice(status.details()).unwrap();
    assert_eq!(problem["status"], 422);
    assert_eq!(problem["errors"][1]["field"], "customer");

    let mut keyed = ticket("keyed");
    keyed.idempotency_key = Some("grpc-key-1".into());
    let first = client
        .create_ticket(request(Some(ACME_KEY), keyed.clone()))
        .await
        .unwrap()
        .into_inner();
    let replay = client
        .create_ticket(request(Some(ACME_KEY), keyed))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first, replay);

    let records = read_records(&consumer(&ctx.topics.tickets_created), 2, READ_TIMEOUT).await;
    for answer in [&accepted, &first] {
        let record = records
            .iter()
            .find(|r| r.key() == Some(answer.ticket_id.as_bytes()))
            .expect("accepted ticket is on the topic");
        assert_eq!(record.partition(), answer.partition);
        assert_eq!(record.offset(), answer.offset);
    }
    trigger.fire();
    while let Some(joined) = tasks.join_next().await {
        joined.unwrap().unwrap();
    }
}
