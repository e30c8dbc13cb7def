//! Request decoding and validation: the one place that decides whether a ticket may enter the
//! pipeline. HTTP JSON bodies and gRPC messages are both turned into [`TicketFields`] and checked
//! by the same [`validate`], so the two front doors accept exactly the same tickets.
//!
//! Outcomes: wrong content type → 415; not UTF-8, not JSON or nested too deep → 400; a text or
//! the metadata over its size limit → 413; anything else wrong with a field → 422. Every
//! problem found is reported at once, each naming its field.

use std::time::SystemTime;

use serde_json::Value;
use triage_proto::{
    v1::{CreateTicketRequest, Customer, TicketCreated},
    wkt,
};
use utoipa::ToSchema;

use crate::{
    config::IngressConfig,
    error::{ApiError, FieldError},
};

const MAX_TICKET_ID_CHARS: usize = 128;
const MAX_CUSTOMER_ID_CHARS: usize = 256;
const MAX_EMAIL_CHARS: usize = 320;
const MAX_SHORT_TEXT_CHARS: usize = 64;

/// The size limits a request is checked against.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_description_bytes: usize,
    pub max_subject_bytes: usize,
    pub max_metadata_bytes: usize,
    pub max_json_depth: usize,
}

impl From<&IngressConfig> for Limits {
    fn from(config: &IngressConfig) -> Self {
        Limits {
            max_description_bytes: config.max_description_bytes,
            max_subject_bytes: config.max_subject_bytes,
            max_metadata_bytes: config.max_metadata_bytes,
            max_json_depth: config.max_json_depth,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits::from(&IngressConfig::default())
    }
}

/// `POST /v1/tickets` body. The tenant is not part of it: it comes from the API key.
#[derive(Debug, serde::Deserialize, serde::Serialize, ToSchema)]
#[allow(dead_code)] // documents the accepted JSON; decoding is done field by field below
pub struct CreateTicketBody {
    /// Your id for the ticket; a UUIDv7 is generated when absent. Letters, digits, `.`, `_`,
    /// `:` and `-`, at most 128.
    pub ticket_id: Option<String>,
    pub subject: String,
    pub description: String,
    pub customer: CustomerBody,
    /// Where the ticket came from: `email`, `web`, `chat`, `phone`, ...
    pub channel: Option<String>,
    /// BCP 47 language tag, e.g. `en` or `pt-BR`.
    pub language: Option<String>,
    /// Free-form JSON object, kept with the ticket.
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Value>,
    /// RFC 3339 time the helpdesk created the ticket; now when absent.
    pub created_at: Option<String>,
}

#[derive(Debug, serde::Deserialize, serde::Serialize, ToSchema)]
#[allow(dead_code)]
pub struct CustomerBody {
    pub id: String,
    pub email: Option<String>,
    /// Support tier, e.g. `free`, `pro`, `enterprise`.
    pub tier: Option<String>,
}

/// `POST /v1/tickets:batch` body.
#[derive(Debug, serde::Deserialize, serde::Serialize, ToSchema)]
#[allow(dead_code)]
pub struct BatchBody {
    pub tickets: Vec<CreateTicketBody>,
}

/// A ticket as the caller sent it, before validation; `None` means absent.
#[derive(Clone, Debug, Default)]
pub struct TicketFields {
    pub ticket_id: Option<String>,
    pub subject: Option<String>,
    pub description: Option<String>,
    pub customer: Option<Customer>,
    pub channel: Option<String>,
    pub language: Option<String>,
    pub metadata: Option<wkt::Struct>,
    pub created_at: Option<wkt::Timestamp>,
}

/// A ticket that passed validation; only the tenant and acceptance time are still missing.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidTicket {
    event: TicketCreated,
}

impl ValidTicket {
    pub fn ticket_id(&self) -> &str {
        &self.event.ticket_id
    }

    /// The event to publish for `tenant`, accepted now.
    pub fn into_event(self, tenant: &str) -> TicketCreated {
        let mut event = self.event;
        event.tenant_id = tenant.to_owned();
        event.accepted_at = Some(triage_proto::timestamp(SystemTime::now()));
        event
    }
}

/// Checks the `Content-Type` of a JSON request (415 unless `application/json` or `+json`).
pub fn check_json_content_type(content_type: Option<&str>) -> Result<(), ApiError> {
    let unsupported = || ApiError::UnsupportedMediaType {
        content_type: content_type.unwrap_or("").to_owned(),
    };
    let mime = content_type.ok_or_else(unsupported)?;
    let essence = mime
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
    {
        Ok(())
    } else {
        Err(unsupported())
    }
}

/// Parses a JSON request body: UTF-8, JSON syntax and nesting depth (400 on each).
pub fn parse_json(body: &[u8], limits: &Limits) -> Result<Value, ApiError> {
    let text = std::str::from_utf8(body).map_err(|error| ApiError::Malformed {
        detail: format!("the body is not valid UTF-8 (byte {})", error.valid_up_to()),
        errors: Vec::new(),
    })?;
    let value: Value = serde_json::from_str(text).map_err(|error| ApiError::Malformed {
        detail: format!("the body is not valid JSON: {error}"),
        errors: Vec::new(),
    })?;
    if let Some(path) = too_deep(&value, limits.max_json_depth, "$") {
        return Err(ApiError::Malformed {
            detail: format!("JSON nested deeper than {} levels", limits.max_json_depth),
            errors: vec![FieldError::new(
                path,
                format!("nested deeper than {} levels", limits.max_json_depth),
            )],
        });
    }
    Ok(value)
}

/// The path of the first value nested deeper than `max_depth`, if any.
fn too_deep(value: &Value, max_depth: usize, path: &str) -> Option<String> {
    let children: Box<dyn Iterator<Item = (String, &Value)>> = match value {
        Value::Object(map) => Box::new(map.iter().map(|(k, v)| (format!("{path}.{k}"), v))),
        Value::Array(items) => Box::new(
            items
                .iter()
                .enumerate()
                .map(|(i, v)| (format!("{path}[{i}]"), v)),
        ),
        _ => return None,
    };
    if max_depth == 0 {
        return Some(path.trim_start_matches("$.").to_owned());
    }
    for (child_path, child) in children {
        if let Some(found) = too_deep(child, max_depth - 1, &child_path) {
            return Some(found);
        }
    }
    None
}

/// Decodes and validates one `POST /v1/tickets` body.
pub fn decode_http(
    content_type: Option<&str>,
    body: &[u8],
    limits: &Limits,
) -> Result<ValidTicket, ApiError> {
    check_json_content_type(content_type)?;
    let value = parse_json(body, limits)?;
    from_json(&value, "", limits)
}

/// Validates one ticket given as a JSON value; `prefix` names it inside a batch (`tickets[3].`).
pub fn from_json(value: &Value, prefix: &str, limits: &Limits) -> Result<ValidTicket, ApiError> {
    let mut errors = Vec::new();
    let fields = fields_from_json(value, prefix, limits, &mut errors);
    validate(fields, prefix, limits, errors)
}

fn fields_from_json(
    value: &Value,
    prefix: &str,
    limits: &Limits,
    errors: &mut Vec<FieldError>,
) -> TicketFields {
    let mut fields = TicketFields::default();
    let Value::Object(map) = value else {
        errors.push(FieldError::new(
            if prefix.is_empty() {
                "$"
            } else {
                prefix.trim_end_matches('.')
            },
            "must be a JSON object",
        ));
        return fields;
    };
    for (key, field_value) in map {
        let name = format!("{prefix}{key}");
        if field_value.is_null() {
            continue;
        }
        match key.as_str() {
            "ticket_id" => fields.ticket_id = string_field(field_value, &name, errors),
            "subject" => fields.subject = string_field(field_value, &name, errors),
            "description" => fields.description = string_field(field_value, &name, errors),
            "channel" => fields.channel = string_field(field_value, &name, errors),
            "language" => fields.language = string_field(field_value, &name, errors),
            "created_at" => {
                fields.created_at = string_field(field_value, &name, errors).and_then(|text| {
                    match chrono::DateTime::parse_from_rfc3339(&text) {
                        Ok(time) => Some(wkt::Timestamp {
                            seconds: time.timestamp(),
                            nanos: time.timestamp_subsec_nanos() as i32,
                        }),
                        Err(_) => {
                            errors.push(FieldError::new(
                                &name,
                                "must be an RFC 3339 date-time, e.g. 2026-01-31T12:00:00Z",
                            ));
                            None
                        }
                    }
                });
            }
            "customer" => fields.customer = customer_from_json(field_value, &name, errors),
            "metadata" => fields.metadata = metadata_from_json(field_value, &name, limits, errors),
            "tenant_id" | "tenant" => errors.push(FieldError::new(
                &name,
                "is set from the API key and must not be sent",
            )),
            _ => errors.push(FieldError::new(&name, "unknown field")),
        }
    }
    fields
}

fn string_field(value: &Value, name: &str, errors: &mut Vec<FieldError>) -> Option<String> {
    match value {
        Value::String(text) => Some(text.clone()),
        _ => {
            errors.push(FieldError::new(name, "must be a string"));
            None
        }
    }
}

fn customer_from_json(value: &Value, name: &str, errors: &mut Vec<FieldError>) -> Option<Customer> {
    let Value::Object(map) = value else {
        errors.push(FieldError::new(name, "must be an object"));
        return None;
    };
    let mut customer = Customer::default();
    for (key, field_value) in map {
        let field_name = format!("{name}.{key}");
        if field_value.is_null() {
            continue;
        }
        match key.as_str() {
            "id" => {
                customer.id = string_field(field_value, &field_name, errors).unwrap_or_default()
            }
            "email" => customer.email = string_field(field_value, &field_name, errors),
            "tier" => customer.tier = string_field(field_value, &field_name, errors),
            _ => errors.push(FieldError::new(&field_name, "unknown field")),
        }
    }
    Some(customer)
}

fn metadata_from_json(
    value: &Value,
    name: &str,
    limits: &Limits,
    errors: &mut Vec<FieldError>,
) -> Option<wkt::Struct> {
    if !value.is_object() {
        errors.push(FieldError::new(name, "must be a JSON object"));
        return None;
    }
    let size = serde_json::to_vec(value)
        .map(|v| v.len())
        .unwrap_or(usize::MAX);
    if size > limits.max_metadata_bytes {
        errors.push(too_large(name, size, limits.max_metadata_bytes));
        return None;
    }
    match serde_json::from_value::<wkt::Struct>(value.clone()) {
        Ok(metadata) => Some(metadata),
        Err(error) => {
            errors.push(FieldError::new(name, format!("cannot be stored: {error}")));
            None
        }
    }
}

fn too_large(name: &str, size: usize, limit: usize) -> FieldError {
    FieldError::new(name, format!("is {size} bytes; the limit is {limit}"))
}

/// Validates a gRPC `CreateTicketRequest` (protobuf strings are UTF-8 already).
pub fn from_grpc(request: CreateTicketRequest, limits: &Limits) -> Result<ValidTicket, ApiError> {
    let mut errors = Vec::new();
    let metadata = request.metadata.and_then(|metadata| {
        let json = serde_json::to_value(&metadata).unwrap_or(Value::Null);
        if let Some(path) = too_deep(&json, limits.max_json_depth.saturating_sub(1), "metadata") {
            errors.push(FieldError::new(
                path,
                format!("nested deeper than {} levels", limits.max_json_depth),
            ));
            return None;
        }
        let size = serde_json::to_vec(&json)
            .map(|v| v.len())
            .unwrap_or(usize::MAX);
        if size > limits.max_metadata_bytes {
            errors.push(too_large("metadata", size, limits.max_metadata_bytes));
            return None;
        }
        Some(metadata)
    });
    let fields = TicketFields {
        ticket_id: request.ticket_id,
        subject: Some(request.subject),
        description: Some(request.description),
        customer: request.customer,
        channel: Some(request.channel),
        language: Some(request.language),
        metadata,
        created_at: request.created_at,
    };
    validate(fields, "", limits, errors)
}

/// The rules every ticket must meet, whichever transport brought it.
pub fn validate(
    fields: TicketFields,
    prefix: &str,
    limits: &Limits,
    mut errors: Vec<FieldError>,
) -> Result<ValidTicket, ApiError> {
    let name = |field: &str| format!("{prefix}{field}");
    let ticket_id = match fields.ticket_id.filter(|id| !id.is_empty()) {
        Some(id) => {
            let valid_chars = id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-'));
            if id.chars().count() > MAX_TICKET_ID_CHARS || !valid_chars {
                add(
                    &mut errors,
                    FieldError::new(
                        name("ticket_id"),
                        "must be at most 128 letters, digits, '.', '_', ':' or '-'",
                    ),
                );
            }
            id
        }
        None => uuid::Uuid::now_v7().to_string(),
    };
    let subject = fields.subject.unwrap_or_default();
    if subject.trim().is_empty() {
        add(&mut errors, FieldError::new(name("subject"), "is required"));
    } else if subject.len() > limits.max_subject_bytes {
        add(
            &mut errors,
            too_large(&name("subject"), subject.len(), limits.max_subject_bytes),
        );
    }
    let description = fields.description.unwrap_or_default();
    if description.trim().is_empty() {
        add(
            &mut errors,
            FieldError::new(name("description"), "is required"),
        );
    } else if description.len() > limits.max_description_bytes {
        add(
            &mut errors,
            too_large(
                &name("description"),
                description.len(),
                limits.max_description_bytes,
            ),
        );
    }
    match &fields.customer {
        None => add(
            &mut errors,
            FieldError::new(name("customer"), "is required"),
        ),
        Some(customer) => {
            if customer.id.trim().is_empty() {
                add(
                    &mut errors,
                    FieldError::new(name("customer.id"), "is required"),
                );
            } else if customer.id.chars().count() > MAX_CUSTOMER_ID_CHARS {
                add(
                    &mut errors,
                    FieldError::new(name("customer.id"), "must be at most 256 characters"),
                );
            }
            if let Some(email) = &customer.email
                && (email.chars().count() > MAX_EMAIL_CHARS
                    || !email.contains('@')
                    || email.chars().any(char::is_whitespace))
            {
                add(
                    &mut errors,
                    FieldError::new(name("customer.email"), "is not an e-mail address"),
                );
            }
            if let Some(tier) = &customer.tier
                && tier.chars().count() > MAX_SHORT_TEXT_CHARS
            {
                add(
                    &mut errors,
                    FieldError::new(name("customer.tier"), "must be at most 64 characters"),
                );
            }
        }
    }
    let channel = fields
        .channel
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| "api".into());
    if channel.chars().count() > MAX_SHORT_TEXT_CHARS {
        add(
            &mut errors,
            FieldError::new(name("channel"), "must be at most 64 characters"),
        );
    }
    let language = fields.language.unwrap_or_default();
    if language.len() > 35
        || !language
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-')
    {
        add(
            &mut errors,
            FieldError::new(
                name("language"),
                "must be a BCP 47 language tag such as en or pt-BR",
            ),
        );
    }
    if let Some(created_at) = &fields.created_at
        && (created_at.seconds < 0
            || triage_proto::check_timestamp("created_at", created_at).is_err())
    {
        add(
            &mut errors,
            FieldError::new(name("created_at"), "is not a valid time"),
        );
    }
    if !errors.is_empty() {
        return Err(classify(errors));
    }
    Ok(ValidTicket {
        event: TicketCreated {
            ticket_id,
            tenant_id: String::new(),
            subject,
            description,
            customer: fields.customer,
            channel,
            language,
            metadata: fields.metadata,
            created_at: Some(
                fields
                    .created_at
                    .unwrap_or_else(|| triage_proto::timestamp(SystemTime::now())),
            ),
            accepted_at: None,
        },
    })
}

/// Adds a problem unless the field already has one (a wrong type is not also "required").
fn add(errors: &mut Vec<FieldError>, error: FieldError) {
    if !errors.iter().any(|e| e.field == error.field) {
        errors.push(error);
    }
}

/// 413 when any field is over its size limit (the caller must shorten it; nothing else will
/// help), 400 when the JSON is too deep, 422 otherwise. All problems are listed either way.
fn classify(errors: Vec<FieldError>) -> ApiError {
    if errors.iter().any(|e| e.message.contains("; the limit is ")) {
        ApiError::TooLarge { errors }
    } else if errors
        .iter()
        .any(|e| e.message.starts_with("nested deeper"))
    {
        ApiError::Malformed {
            detail: "JSON nested too deep".into(),
            errors,
        }
    } else {
        ApiError::Invalid { errors }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn valid() -> Value {
        json!({
            "subject": "Refund",
            "description": "I was charged twice",
            "customer": {"id": "c-1", "email": "a@example.com", "tier": "pro"},
            "channel": "email",
            "language": "en",
            "metadata": {"order": 42, "tags": ["vip"]},
            "created_at": "2026-01-31T12:00:00Z"
        })
    }

    fn decode(value: &Value) -> Result<ValidTicket, ApiError> {
        decode_http(
            Some("application/json"),
            value.to_string().as_bytes(),
            &Limits::default(),
        )
    }

    fn fields_of(error: &ApiError) -> Vec<&str> {
        error
            .field_errors()
            .iter()
            .map(|e| e.field.as_str())
            .collect()
    }

    #[test]
    fn a_valid_ticket_becomes_an_event_with_a_generated_id() {
        let ticket = decode(&valid()).unwrap();
        let event = ticket.into_event("acme");
        assert_eq!(event.tenant_id, "acme");
        assert_eq!(
            uuid::Uuid::parse_str(&event.ticket_id)
                .unwrap()
                .get_version_num(),
            7
        );
        assert_eq!(event.created_at.unwrap().seconds, 1_769_860_800);
        assert!(event.accepted_at.is_some());
        assert_eq!(event.customer.unwrap().tier.as_deref(), Some("pro"));
    }

    #[test]
    fn every_missing_required_field_is_named() {
        let error = decode(&json!({})).unwrap_err();
        assert_eq!(error.http_status(), 422);
        assert_eq!(fields_of(&error), ["subject", "description", "customer"]);
        let error =
            decode(&json!({"subject": "s", "description": "d", "customer": {}})).unwrap_err();
        assert_eq!(fields_of(&error), ["customer.id"]);
    }

    #[test]
    fn wrong_types_unknown_fields_and_the_tenant_are_refused() {
        let mut body = valid();
        body["subject"] = json!(5);
        body["tenant_id"] = json!("other");
        body["colour"] = json!("red");
        body["created_at"] = json!("yesterday");
        let error = decode(&body).unwrap_err();
        assert_eq!(error.http_status(), 422);
        let mut fields = fields_of(&error);
        fields.sort();
        assert_eq!(fields, ["colour", "created_at", "subject", "tenant_id"]);
    }

    #[test]
    fn oversize_text_and_metadata_are_413() {
        let limits = Limits {
            max_description_bytes: 10,
            max_metadata_bytes: 8,
            ..Limits::default()
        };
        let error = decode_http(
            Some("application/json"),
            valid().to_string().as_bytes(),
            &limits,
        )
        .unwrap_err();
        assert_eq!(error.http_status(), 413);
        let mut fields = fields_of(&error);
        fields.sort();
        assert_eq!(fields, ["description", "metadata"]);
    }

    #[test]
    fn content_type_utf8_syntax_and_depth() {
        let body = valid().to_string();
        let limits = Limits::default();
        for content_type in [None, Some("text/plain"), Some("application/x-protobuf")] {
            let error = decode_http(content_type, body.as_bytes(), &limits).unwrap_err();
            assert_eq!(error.http_status(), 415, "{content_type:?}");
        }
        assert!(
            decode_http(
                Some("application/json; charset=utf-8"),
                body.as_bytes(),
                &limits
            )
            .is_ok()
        );
        let error = decode_http(
            Some("application/json"),
            b"{\"subject\": \"\xff\"}",
            &limits,
        )
        .unwrap_err();
        assert_eq!(error.http_status(), 400);
        let error = decode_http(Some("application/json"), b"{\"subject\": ", &limits).unwrap_err();
        assert_eq!(error.http_status(), 400);
        let mut deep = json!(1);
        for _ in 0..20 {
            deep = json!({ "a": deep });
        }
        let mut body = valid();
        body["metadata"] = deep;
        let error = decode(&body).unwrap_err();
        assert_eq!(error.http_status(), 400);
        assert!(fields_of(&error)[0].starts_with("metadata.a"), "{error:?}");
    }

    #[test]
    fn grpc_requests_follow_the_same_rules() {
        let request = CreateTicketRequest {
            subject: "s".into(),
            description: " ".into(),
            customer: Some(Customer {
                id: "c".into(),
                email: Some("no-at-sign".into()),
                tier: None,
            }),
            ..Default::default()
        };
        let error = from_grpc(request, &Limits::default()).unwrap_err();
        assert_eq!(error.grpc_code(), tonic::Code::InvalidArgument);
        assert_eq!(fields_of(&error), ["description", "customer.email"]);
    }
}
