//! The HTTP ingress against the real broker and Redis: every status it answers, auth, rate
//! limits, idempotency keys, batches, and that every 202 has its record on the topic.

mod common;

use std::{collections::HashMap, time::Duration};

use axum::{body::Body, http::Request};
use common::*;
use rdkafka::Message;
use serde_json::{Value, json};
use triage_proto::v1::TicketCreated;
use triage_test_support::{TestContext, consumer, header, read_for, read_records};

fn problem_fields(answer: &Answer) -> Vec<String> {
    answer.body["errors"]
        .as_array()
        .map(|errors| {
            errors
                .iter()
                .map(|e| e["field"].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn assert_problem(answer: &Answer, status: u16) {
    assert_eq!(answer.status.as_u16(), status, "{}", answer.body);
    assert_eq!(
        answer.content_type.as_deref(),
        Some("application/problem+json")
    );
    assert_eq!(answer.body["status"], status);
    assert!(
        answer.body["type"]
            .as_str()
            .unwrap()
            .starts_with("urn:triage:problem:")
    );
    assert!(!answer.body["title"].as_str().unwrap().is_empty());
    assert!(!answer.body["detail"].as_str().unwrap().is_empty());
}

#[tokio::test]
async fn every_invalid_request_gets_its_status_names_its_field_and_writes_nothing() {
    let ctx = TestContext::new("tp_validation");
    let mut config = config(&ctx);
    config.ingress.max_body_bytes = 4096;
    config.ingress.max_description_bytes = 100;
    ctx.create_topics(3).await;
    let app = ticket_publisher::ingress::http::router(ingress(&config));

    // 415: not JSON.
    let request = Request::post("/v1/tickets")
        .header("authorization", format!("Bearer {ACME_KEY}"))
        .header("content-type", "text/plain")
        .body(Body::from("hello"))
        .unwrap();
    assert_problem(&send(&app, request).await, 415);
    // 400: not UTF-8, not JSON, too deep.
    let answer = send(
        &app,
        post(
            "/v1/tickets",
            Some(ACME_KEY),
            &b"{\"subject\":\"\xc3\x28\"}"[..],
        ),
    )
    .await;
    assert_problem(&answer, 400);
    assert!(answer.body["detail"].as_str().unwrap().contains("UTF-8"));
    assert_problem(
        &send(&app, post("/v1/tickets", Some(ACME_KEY), "{\"subject\":")).await,
        400,
    );
    let mut deep = json!("leaf");
    for _ in 0..20 {
        deep = json!([deep]);
    }
    let mut body = valid_ticket("deep");
    body["metadata"] = json!({ "x": deep });
    let answer = send(&app, post_json(Some(ACME_KEY), &body)).await;
    assert_problem(&answer, 400);
    assert!(problem_fields(&answer)[0].starts_with("metadata.x"));
    // 413: the body, and a field over its limit.
    let answer = send(&app, post("/v1/tickets", Some(ACME_KEY), vec![b' '; 5000])).await;
    assert_problem(&answer, 413);
    let mut body = valid_ticket("long");
    body["description"] = json!("x".repeat(101));
    let answer = send(&app, post_json(Some(ACME_KEY), &body)).await;
    assert_problem(&answer, 413);
    assert_eq!(problem_fields(&answer), ["description"]);
    // 422: missing, wrong and forbidden fields, all named at once.
    let answer = send(
        &app,
        post_json(
            Some(ACME_KEY),
            &json!({"description": 7, "customer": {"email": "x"}, "tenant_id": "evil"}),
        ),
    )
    .await;
    assert_problem(&answer, 422);
    let mut fields = problem_fields(&answer);
    fields.sort();
    assert_eq!(
        fields,
        [
            "customer.email",
            "customer.id",
            "description",
            "subject",
            "tenant_id"
        ]
    );

    // Nothing of the above reached Kafka: the only record is the one valid ticket sent last.
    let valid = send(&app, post_json(Some(ACME_KEY), &valid_ticket("ok"))).await;
    assert_eq!(valid.status, 202, "{}", valid.body);
    let topic = consumer(&ctx.topics.tickets_created);
    let records = read_records(&topic, 1, READ_TIMEOUT).await;
    assert_eq!(
        records[0].key(),
        Some(valid.body["ticket_id"].as_str().unwrap().as_bytes())
    );
    assert!(read_for(&topic, Duration::from_secs(1)).await.is_empty());
}

#[tokio::test]
async fn a_missing_or_wrong_key_is_401_and_the_tenant_comes_from_the_key() {
    let ctx = TestContext::new("tp_auth");
    let app = app(&ctx).await;
    for key in [None, Some("wrong"), Some("")] {
        let answer = send(&app, post_json(key, &valid_ticket("x"))).await;
        assert_problem(&answer, 401);
    }
    let basic = Request::post("/v1/tickets")
        .header("authorization", format!("Basic {ACME_KEY}"))
        .header("content-type", "application/json")
        .body(Body::from(valid_ticket("x").to_string()))
        .unwrap();
    assert_problem(&send(&app, basic).await, 401);

    let with_x_api_key = Request::post("/v1/tickets")
        .header("x-api-key", GLOBEX_KEY)
        .header("content-type", "application/json")
        .body(Body::from(valid_ticket("via x-api-key").to_string()))
        .unwrap();
    let answer = send(&app, with_x_api_key).await;
    assert_eq!(answer.status, 202, "{}", answer.body);
    let records = read_records(&consumer(&ctx.topics.tickets_created), 1, READ_TIMEOUT).await;
    let event: TicketCreated = triage_proto::decode(
        records[0].payload().unwrap(),
        header(&records[0], "content-type"),
    )
    .unwrap();
    assert_eq!(event.tenant_id, "globex");
}

#[tokio::test]
async fn a_tenant_over_its_rate_is_429_with_retry_after_and_others_are_not() {
    let ctx = TestContext::new("tp_rate");
    let mut config = config(&ctx);
    config.ingress.rate_limit_per_second = 1;
    config.ingress.rate_limit_burst = 2;
    ctx.create_topics(1).await;
    let app = ticket_publisher::ingress::http::router(ingress(&config));
    // The first produce to a new topic waits for its metadata; another tenant pays for it, so
    // that acme's burst is not stretched past the refill of a token (1 per second here).
    let warm_up = send(&app, post_json(Some(GLOBEX_KEY), &valid_ticket("x"))).await;
    assert_eq!(warm_up.status, 202);
    for _ in 0..2 {
        let answer = send(&app, post_json(Some(ACME_KEY), &valid_ticket("x"))).await;
        assert_eq!(answer.status, 202);
    }
    let limited = send(&app, post_json(Some(ACME_KEY), &valid_ticket("x"))).await;
    assert_problem(&limited, 429);
    let retry_after: u64 = limited.retry_after.unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry_after), "{retry_after}");
    let other_tenant = send(&app, post_json(Some(GLOBEX_KEY), &valid_ticket("x"))).await;
    assert_eq!(other_tenant.status, 202);
}

#[tokio::test]
async fn a_tenants_rate_is_shared_by_every_replica() {
    let ctx = TestContext::new("tp_rate_shared");
    let mut config = config(&ctx);
    config.ingress.rate_limit_per_second = 1;
    config.ingress.rate_limit_burst = 2;
    ctx.create_topics(1).await;
    // Two replicas behind one load balancer: each its own process state, one Redis.
    let first = ticket_publisher::ingress::http::router(ingress(&config));
    let second = ticket_publisher::ingress::http::router(ingress(&config));
    let warm_up = send(&first, post_json(Some(GLOBEX_KEY), &valid_ticket("x"))).await;
    assert_eq!(warm_up.status, 202);
    for app in [&first, &second] {
        let answer = send(app, post_json(Some(ACME_KEY), &valid_ticket("x"))).await;
        assert_eq!(answer.status, 202);
    }
    // The tenant's burst of 2 is spent across both replicas; each alone would still admit.
    for app in [&first, &second] {
        let limited = send(app, post_json(Some(ACME_KEY), &valid_ticket("x"))).await;
        assert_problem(&limited, 429);
    }
    let other_tenant = send(&second, post_json(Some(GLOBEX_KEY), &valid_ticket("x"))).await;
    assert_eq!(other_tenant.status, 202);
}

#[tokio::test]
async fn every_202_has_its_record_at_the_answered_partition_and_offset() {
    let ctx = TestContext::new("tp_accepted");
    let app = app(&ctx).await;
    let mut answers = HashMap::new();
    let requests = (0..30).map(|i| {
        let mut body = valid_ticket(&format!("ticket {i}"));
        if i % 2 == 0 {
            body["ticket_id"] = json!(format!("ext-{i}"));
        }
        send(&app, post_json(Some(ACME_KEY), &body))
    });
    for answer in futures::future::join_all(requests).await {
        assert_eq!(answer.status, 202, "{}", answer.body);
        let id = answer.body["ticket_id"].as_str().unwrap().to_owned();
        answers.insert(id, answer.body);
    }
    assert!(answers.contains_key("ext-4"));

    let records = read_records(&consumer(&ctx.topics.tickets_created), 30, READ_TIMEOUT).await;
    for record in &records {
        let event: TicketCreated =
            triage_proto::decode(record.payload().unwrap(), header(record, "content-type"))
                .unwrap();
        let answer = answers.get(&event.ticket_id).expect("record has an answer");
        assert_eq!(answer["partition"], record.partition());
        assert_eq!(answer["offset"], record.offset());
        assert_eq!(record.key(), Some(event.ticket_id.as_bytes()));
        assert_eq!(event.tenant_id, "acme");
        assert!(event.accepted_at.is_some() && event.created_at.is_some());
        assert_eq!(
            header(record, "content-type"),
            Some("application/x-protobuf")
        );
        assert_eq!(
            header(record, "ce_type"),
            Some("ticketing.v1.TicketCreated")
        );
        assert_eq!(
            header(record, "ce_source"),
            Some("/triage/ticket-publisher")
        );
        assert!(header(record, "ce_id").is_some() && header(record, "ce_time").is_some());
    }
}

#[tokio::test]
async fn an_incoming_traceparent_is_continued_on_the_record() {
    let ctx = TestContext::new("tp_trace");
    let app = app(&ctx).await;
    let mut request = post_json(Some(ACME_KEY), &valid_ticket("traced"));
    request.headers_mut().insert(
        "traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            .parse()
            .unwrap(),
    );
    // Tests have no global propagator unless one is installed; install the W3C one.
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    let answer = send(&app, request).await;
    assert_eq!(answer.status, 202);
    let records = read_records(&consumer(&ctx.topics.tickets_created), 1, READ_TIMEOUT).await;
    let traceparent = header(&records[0], "traceparent").unwrap_or_default();
    assert!(
        traceparent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "{traceparent}"
    );
}

#[tokio::test]
async fn an_idempotency_key_replays_the_first_answer_and_writes_once() {
    let ctx = TestContext::new("tp_idem");
    let app = app(&ctx).await;
    let with_key = |key: &str, body: &Value| {
        let mut request = post_json(Some(ACME_KEY), body);
        request
            .headers_mut()
            .insert("idempotency-key", key.parse().unwrap());
        request
    };
    let body = valid_ticket("once");
    let first = send(&app, with_key("k-1", &body)).await;
    assert_eq!(first.status, 202, "{}", first.body);
    let again = send(&app, with_key("k-1", &body)).await;
    assert_eq!(again.status, 202);
    assert_eq!(again.body, first.body);
    // The same key from another tenant is another key.
    let other_tenant = {
        let mut request = with_key("k-1", &body);
        request.headers_mut().insert(
            "authorization",
            format!("Bearer {GLOBEX_KEY}").parse().unwrap(),
        );
        send(&app, request).await
    };
    assert_eq!(other_tenant.status, 202);
    assert_ne!(other_tenant.body["ticket_id"], first.body["ticket_id"]);
    // Reusing a key for a different request is refused.
    let reused = send(&app, with_key("k-1", &valid_ticket("different"))).await;
    assert_problem(&reused, 422);
    // Concurrent duplicates: exactly one is written; the others get the answer or 409.
    let concurrent = futures::future::join_all(
        (0..8).map(|_| send(&app, with_key("k-2", &valid_ticket("burst")))),
    )
    .await;
    let ids: std::collections::HashSet<_> = concurrent
        .iter()
        .filter(|a| a.status == 202)
        .map(|a| a.body["ticket_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), 1, "one ticket for one key");
    for answer in &concurrent {
        assert!(
            answer.status == 202 || answer.status == 409,
            "{}",
            answer.status
        );
    }

    let topic = consumer(&ctx.topics.tickets_created);
    let records = read_records(&topic, 3, READ_TIMEOUT).await;
    assert!(
        read_for(&topic, Duration::from_secs(1)).await.is_empty(),
        "more than 3 records"
    );
    let keys: std::collections::HashSet<_> =
        records.iter().map(|r| r.key().unwrap().to_vec()).collect();
    assert!(keys.contains(first.body["ticket_id"].as_str().unwrap().as_bytes()));
}

#[tokio::test]
async fn with_redis_down_keyed_requests_get_503_and_others_are_accepted() {
    let ctx = TestContext::new("tp_redis_down");
    let mut config = config(&ctx);
    // Nothing listens on this port: Redis is "down" for this ingress only.
    config.redis.url = triage_runtime::config::Secret::new(format!(
        "redis://127.0.0.1:{}",
        triage_test_support::free_port()
    ));
    ctx.create_topics(1).await;
    let app = ticket_publisher::ingress::http::router(ingress(&config));
    let mut request = post_json(Some(ACME_KEY), &valid_ticket("keyed"));
    request
        .headers_mut()
        .insert("idempotency-key", "k".parse().unwrap());
    let started = std::time::Instant::now();
    let keyed = send(&app, request).await;
    assert_problem(&keyed, 503);
    assert!(keyed.retry_after.is_some());
    assert!(started.elapsed() < Duration::from_secs(3));
    let plain = send(&app, post_json(Some(ACME_KEY), &valid_ticket("plain"))).await;
    assert_eq!(plain.status, 202);
    let topic = consumer(&ctx.topics.tickets_created);
    let records = read_records(&topic, 1, READ_TIMEOUT).await;
    assert_eq!(
        records[0].key(),
        Some(plain.body["ticket_id"].as_str().unwrap().as_bytes())
    );
    assert!(read_for(&topic, Duration::from_secs(1)).await.is_empty());
}

#[tokio::test]
async fn a_batch_answers_each_ticket_on_its_own() {
    let ctx = TestContext::new("tp_batch");
    let app = app(&ctx).await;
    let body =
        json!({"tickets": [valid_ticket("a"), {"subject": "no description"}, valid_ticket("c")]});
    let answer = send(
        &app,
        post("/v1/tickets:batch", Some(ACME_KEY), body.to_string()),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let results = answer.body["results"].as_array().unwrap();
    assert_eq!(results.len(), 3);
    assert_eq!(results[0]["status"], 202);
    assert_eq!(results[1]["status"], 422);
    let fields: Vec<&str> = results[1]["problem"]["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, ["tickets[1].description", "tickets[1].customer"]);
    assert_eq!(results[2]["status"], 202);
    let records = read_records(&consumer(&ctx.topics.tickets_created), 2, READ_TIMEOUT).await;
    for (record, result) in records.iter().zip([&results[0], &results[2]]) {
        let _ = result;
        let matching = results
            .iter()
            .any(|r| r["partition"] == record.partition() && r["offset"] == record.offset());
        assert!(
            matching,
            "record {}:{} has no 202",
            record.partition(),
            record.offset()
        );
    }
    let too_many = json!({"tickets": vec![valid_ticket("x"); 501]});
    let answer = send(
        &app,
        post("/v1/tickets:batch", Some(ACME_KEY), too_many.to_string()),
    )
    .await;
    assert_problem(&answer, 413);
}

#[tokio::test]
async fn the_openapi_document_describes_the_api() {
    let ctx = TestContext::new("tp_openapi");
    let app = ticket_publisher::ingress::http::router(ingress(&config(&ctx)));
    let answer = send(
        &app,
        Request::get("/openapi.json").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(answer.status, 200);
    assert!(answer.body["paths"]["/v1/tickets"]["post"].is_object());
    assert!(answer.body["paths"]["/v1/tickets:batch"]["post"].is_object());
    assert!(answer.body["components"]["schemas"]["Problem"].is_object());
    assert!(answer.body["components"]["securitySchemes"]["api_key"].is_object());
}
