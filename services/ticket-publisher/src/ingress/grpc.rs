//! The gRPC `TicketIngest` service: the same semantics as `POST /v1/tickets`, errors as
//! `tonic::Status` with the problem details in the status details.

use prost::Message;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use triage_proto::v1::{
    CreateTicketRequest, CreateTicketResponse,
    ticket_ingest_server::{TicketIngest, TicketIngestServer},
};

use super::{Accepted, Ingress};
use crate::{
    auth,
    error::ApiError,
    idempotency::{StoredAnswer, fingerprint},
    ticket,
};

const TRANSPORT: &str = "grpc";

#[derive(Clone)]
pub struct GrpcIngress {
    ingress: Ingress,
}

/// The tonic service on `ingress`, accepting requests up to `ingress.max_body_bytes`.
pub fn service(ingress: Ingress) -> TicketIngestServer<GrpcIngress> {
    let max_bytes = ingress.max_body_bytes();
    TicketIngestServer::new(GrpcIngress { ingress }).max_decoding_message_size(max_bytes)
}

#[tonic::async_trait]
impl TicketIngest for GrpcIngress {
    async fn create_ticket(
        &self,
        request: tonic::Request<CreateTicketRequest>,
    ) -> Result<tonic::Response<CreateTicketResponse>, tonic::Status> {
        let span =
            tracing::info_span!("ingress", otel.name = "CreateTicket", transport = TRANSPORT);
        let parent = opentelemetry::global::get_text_map_propagator(|propagator| {
            propagator.extract(&MetadataExtractor(request.metadata()))
        });
        let _ = span.set_parent(parent.clone());
        let trace = super::record_trace(&span, parent);
        let ingress = &self.ingress;
        let outcome = async {
            let api_key = request
                .metadata()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(auth::bearer_token)
                .map(str::to_owned);
            let tenant = ingress.authenticate(api_key.as_deref())?;
            ingress.admit(&tenant, 1).await?;
            let mut message = request.into_inner();
            let key = message.idempotency_key.take();
            let request_fingerprint = fingerprint(&[b"single-grpc", &message.encode_to_vec()]);
            let valid = ticket::from_grpc(message, ingress.limits())?;
            ingress
                .idempotent(&tenant, key.as_deref(), &request_fingerprint, || async {
                    let accepted = ingress.publish(&tenant, valid, &trace).await?;
                    Ok((202, serde_json::to_value(accepted).unwrap_or_default()))
                })
                .await
        }
        .instrument(span)
        .await;
        match outcome.and_then(accepted_from) {
            Ok(accepted) => {
                ingress.metrics().record(TRANSPORT, "accepted");
                Ok(tonic::Response::new(CreateTicketResponse {
                    ticket_id: accepted.ticket_id,
                    partition: accepted.partition,
                    offset: accepted.offset,
                }))
            }
            Err(error) => {
                ingress.metrics().record(TRANSPORT, error.slug());
                Err(error.into_status())
            }
        }
    }
}

fn accepted_from(answer: StoredAnswer) -> Result<Accepted, ApiError> {
    serde_json::from_value(answer.body).map_err(|_| ApiError::Internal)
}

struct MetadataExtractor<'a>(&'a tonic::metadata::MetadataMap);

impl opentelemetry::propagation::Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|key| match key {
                tonic::metadata::KeyRef::Ascii(key) => Some(key.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}
