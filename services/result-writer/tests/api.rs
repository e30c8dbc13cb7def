//! The read API over a real PostgreSQL schema, through the router without a socket: every
//! endpoint shows a tenant its own triages only, and nothing without a valid key.

mod common;

use std::{sync::Arc, time::Duration};

use axum::{
    Router,
    body::Body,
    http::{Request, StatusCode},
};
use chrono::{DateTime, Utc};
use common::{ACME_KEY, Db, GLOBEX_KEY};
use http_body_util::BodyExt;
use result_writer::{
    api::{self, ApiState, Problem, TriagePage},
    auth::ApiKeys,
    db::{self, Store},
    metrics::WriterMetrics,
    triage::{NewTriage, Triage},
};
use tokio::sync::broadcast;
use tower::ServiceExt;
use triage_runtime::{config::Secret, shutdown::Shutdown};
use triage_test_support::{Stack, TestContext};

fn row(tenant: &str, ticket: &str, second: i64, category: &str) -> NewTriage {
    NewTriage {
        ticket_id: ticket.into(),
        tenant_id: tenant.into(),
        prompt_version: "triage-v1".into(),
        category: category.into(),
        priority: if category == "outage" { "p1" } else { "p3" }.into(),
        suggested_reply: "Thanks".into(),
        confidence: 0.9,
        model: "llm-sim-1".into(),
        prompt_tokens: 100,
        completion_tokens: 20,
        cost_usd: 0.0001,
        ticket_created_at: None,
        accepted_at: None,
        triaged_at: DateTime::from_timestamp(second, 0).unwrap(),
        source_partition: 0,
        source_offset: second,
        provider_note: String::new(),
        subject: None,
        excerpt: None,
        trace_id: None,
        rate_limit_wait_ms: 0,
    }
}

struct Fixture {
    app: Router,
    published_tx: broadcast::Sender<Arc<Triage>>,
    db: Db,
}

async fn fixture(ctx: &TestContext) -> Fixture {
    let mut config = result_writer::config::DatabaseConfig {
        url: Secret::new(Stack::get().database_url.clone()),
        schema: ctx.db_schema.clone(),
        ..Default::default()
    };
    config.pool_size = 3;
    let pool = db::connect(&config).unwrap();
    db::migrate(&pool, &ctx.db_schema).await.unwrap();
    let store = Store::new(pool);
    let mut rows: Vec<NewTriage> = (0..5)
        .map(|i| {
            row(
                "acme",
                &format!("a-{i}"),
                1_000 + i,
                if i % 2 == 0 { "billing" } else { "outage" },
            )
        })
        .collect();
    rows.push(row("globex", "g-1", 1_002, "billing"));
    assert_eq!(store.upsert(&rows).await.unwrap().len(), 6);
    let (published_tx, _) = broadcast::channel(16);
    let app = api::router(ApiState {
        store,
        keys: ApiKeys::from_plain(&[("acme", ACME_KEY), ("globex", GLOBEX_KEY)]),
        published_tx: published_tx.clone(),
        max_page_size: 2,
        metrics: WriterMetrics::register(&mut prometheus_client::registry::Registry::default()),
        shutdown: Shutdown::never(),
    });
    Fixture {
        app,
        published_tx,
        db: Db::connect(&ctx.db_schema).await,
    }
}

async fn get(app: &Router, path: &str, key: Option<&str>) -> (StatusCode, String, String) {
    let mut request = Request::get(path);
    if let Some(key) = key {
        request = request.header("authorization", format!("Bearer {key}"));
    }
    let response = app
        .clone()
        .oneshot(request.body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        content_type,
        String::from_utf8(body.to_vec()).unwrap(),
    )
}

#[tokio::test]
async fn a_ticket_is_visible_to_its_tenant_only() {
    let ctx = TestContext::new("rw-api-ticket");
    let fixture = fixture(&ctx).await;
    let app = &fixture.app;

    let (status, _, body) = get(app, "/v1/tickets/a-1/triage", Some(ACME_KEY)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let triage: Triage = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (triage.ticket_id.as_str(), triage.category.as_str()),
        ("a-1", "outage")
    );

    // Another tenant's ticket looks exactly like one that does not exist.
    let (status, content_type, foreign) =
        get(app, "/v1/tickets/a-1/triage", Some(GLOBEX_KEY)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(content_type, "application/problem+json");
    let (_, _, missing) = get(app, "/v1/tickets/nope/triage", Some(GLOBEX_KEY)).await;
    assert_eq!(foreign, missing);

    let (status, _, _) = get(
        app,
        "/v1/tickets/a-1/triage?prompt_version=other",
        Some(ACME_KEY),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    fixture.db.drop_schema().await;
}

#[tokio::test]
async fn two_tenants_sharing_a_ticket_id_each_read_their_own_row() {
    let ctx = TestContext::new("rw-api-shared-id");
    let fixture = fixture(&ctx).await;
    let store = Store::new(
        db::connect(&result_writer::config::DatabaseConfig {
            url: Secret::new(Stack::get().database_url.clone()),
            schema: ctx.db_schema.clone(),
            ..Default::default()
        })
        .unwrap(),
    );
    // The same ticket id and prompt version from two helpdesks: two rows, neither replaces the
    // other whatever their order.
    let changed = store
        .upsert(&[
            row("acme", "shared-42", 2_000, "billing"),
            row("globex", "shared-42", 2_001, "outage"),
        ])
        .await
        .unwrap();
    assert_eq!(changed.len(), 2);
    assert_eq!(
        fixture
            .db
            .query("WHERE ticket_id = 'shared-42'")
            .await
            .len(),
        2
    );

    for (key, tenant, category) in [
        (ACME_KEY, "acme", "billing"),
        (GLOBEX_KEY, "globex", "outage"),
    ] {
        let (status, _, body) = get(&fixture.app, "/v1/tickets/shared-42/triage", Some(key)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let triage: Triage = serde_json::from_str(&body).unwrap();
        assert_eq!(
            (triage.tenant_id.as_str(), triage.category.as_str()),
            (tenant, category)
        );
    }
    fixture.db.drop_schema().await;
}

#[tokio::test]
async fn the_tenant_key_migration_keeps_existing_rows() {
    let ctx = TestContext::new("rw-api-migrate");
    let database = Db::connect(&ctx.db_schema).await;
    // The schema as the first release left it, with one row.
    database
        .execute(&format!(
            "CREATE SCHEMA {schema}; SET search_path TO {schema};
             CREATE TABLE result_writer_migrations (
                 version integer PRIMARY KEY, name text NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now());
             {first}
             INSERT INTO result_writer_migrations (version, name) VALUES (1, 'triage_results');
             INSERT INTO triage_results (ticket_id, tenant_id, prompt_version, category, priority,
                 suggested_reply, confidence, model, prompt_tokens, completion_tokens, cost_usd,
                 triaged_at, source_partition, source_offset)
             VALUES ('old-1', 'acme', 'triage-v1', 'billing', 'p3', 'Thanks', 0.9, 'm', 1, 1,
                 0.0, now(), 0, 0);",
            schema = ctx.db_schema,
            first = include_str!("../migrations/0001_triage_results.sql"),
        ))
        .await;
    let config = result_writer::config::DatabaseConfig {
        url: Secret::new(Stack::get().database_url.clone()),
        schema: ctx.db_schema.clone(),
        ..Default::default()
    };
    let pool = db::connect(&config).unwrap();
    // The four later migrations: the tenant in the key, feedback, ticket text and trace, and
    // the rate-limit wait.
    assert_eq!(db::migrate(&pool, &ctx.db_schema).await.unwrap(), 4);
    let rows = database.query("WHERE ticket_id = 'old-1'").await;
    assert_eq!(rows.len(), 1, "the existing row survives the migration");
    assert_eq!(rows[0].get::<_, String>("category"), "billing");
    let store = Store::new(pool);
    let old = store.ticket("acme", "old-1", None).await.unwrap().unwrap();
    assert_eq!(old.rate_limit_wait_ms, 0, "an existing row waited 0");
    // The new conflict target: another tenant's ticket of the same id is a second row.
    let changed = store
        .upsert(&[row("globex", "old-1", 3_000, "outage")])
        .await
        .unwrap();
    assert_eq!(changed.len(), 1);
    assert_eq!(database.query("WHERE ticket_id = 'old-1'").await.len(), 2);
    database.drop_schema().await;
}

#[tokio::test]
async fn every_endpoint_wants_a_valid_key() {
    let ctx = TestContext::new("rw-api-auth");
    let fixture = fixture(&ctx).await;
    let app = &fixture.app;
    for path in ["/v1/tickets/a-1/triage", "/v1/triage", "/v1/triage/stream"] {
        for key in [None, Some("wrong-key"), Some("")] {
            let (status, content_type, body) = get(app, path, key).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{path} {key:?}");
            assert_eq!(content_type, "application/problem+json");
            let problem: Problem = serde_json::from_str(&body).unwrap();
            assert_eq!(problem.status, 401);
        }
    }
    let response = app
        .clone()
        .oneshot(
            Request::get("/v1/tickets/g-1/triage")
                .header("x-api-key", GLOBEX_KEY)
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let (status, _, openapi) = get(app, "/openapi.json", None).await;
    assert_eq!(status, StatusCode::OK);
    for path in ["/v1/tickets/{id}/triage", "/v1/triage", "/v1/triage/stream"] {
        assert!(openapi.contains(path), "{path} missing from {openapi}");
    }
    fixture.db.drop_schema().await;
}

#[tokio::test]
async fn the_list_pages_through_the_tenants_rows_only_with_filters() {
    let ctx = TestContext::new("rw-api-list");
    let fixture = fixture(&ctx).await;
    let app = &fixture.app;

    let mut seen = Vec::new();
    let mut path = "/v1/triage?limit=2".to_owned();
    let mut pages = 0;
    loop {
        let (status, _, body) = get(app, &path, Some(ACME_KEY)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let page: TriagePage = serde_json::from_str(&body).unwrap();
        pages += 1;
        assert!(page.items.len() <= 2);
        seen.extend(
            page.items
                .iter()
                .map(|t| (t.tenant_id.clone(), t.ticket_id.clone())),
        );
        match page.next_cursor {
            Some(cursor) => path = format!("/v1/triage?limit=2&cursor={cursor}"),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    let expected: Vec<(String, String)> = (0..5)
        .rev()
        .map(|i| ("acme".to_owned(), format!("a-{i}")))
        .collect();
    assert_eq!(seen, expected, "newest first, acme only, each once");

    let (_, _, body) = get(app, "/v1/triage?category=billing&limit=10", Some(ACME_KEY)).await;
    let page: TriagePage = serde_json::from_str(&body).unwrap();
    let tickets: Vec<_> = page.items.iter().map(|t| t.ticket_id.as_str()).collect();
    assert_eq!(tickets, ["a-4", "a-2"]);

    let since = DateTime::<Utc>::from_timestamp(1_001, 0)
        .unwrap()
        .to_rfc3339();
    let until = DateTime::<Utc>::from_timestamp(1_003, 0)
        .unwrap()
        .to_rfc3339();
    let (_, _, body) = get(
        app,
        &format!(
            "/v1/triage?priority=p1&since={}&until={}",
            urlencode(&since),
            urlencode(&until)
        ),
        Some(ACME_KEY),
    )
    .await;
    let page: TriagePage = serde_json::from_str(&body).unwrap();
    let tickets: Vec<_> = page.items.iter().map(|t| t.ticket_id.as_str()).collect();
    assert_eq!(tickets, ["a-1"]);

    let (_, _, body) = get(app, "/v1/triage", Some(GLOBEX_KEY)).await;
    let page: TriagePage = serde_json::from_str(&body).unwrap();
    assert_eq!(page.items.len(), 1);
    assert_eq!(page.items[0].ticket_id, "g-1");

    let (status, content_type, _) = get(app, "/v1/triage?since=yesterday", Some(ACME_KEY)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(content_type, "application/problem+json");
    fixture.db.drop_schema().await;
}

fn urlencode(text: &str) -> String {
    text.replace('+', "%2B").replace(':', "%3A")
}

#[tokio::test]
async fn the_stream_shows_a_tenant_its_own_new_triages_only() {
    let ctx = TestContext::new("rw-api-stream");
    let fixture = fixture(&ctx).await;
    let response = fixture
        .app
        .clone()
        .oneshot(
            Request::get("/v1/triage/stream")
                .header("authorization", format!("Bearer {GLOBEX_KEY}"))
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let written = |tenant: &str, ticket: &str| {
        Arc::new(Triage::written(
            row(tenant, ticket, 5_000, "billing"),
            Utc::now(),
        ))
    };
    fixture.published_tx.send(written("acme", "a-new")).unwrap();
    fixture
        .published_tx
        .send(written("globex", "g-new"))
        .unwrap();
    let mut body = response.into_body();
    let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
        .await
        .expect("an event")
        .unwrap()
        .unwrap();
    let text = String::from_utf8(frame.into_data().unwrap().to_vec()).unwrap();
    assert!(text.contains("event: triage"), "{text}");
    assert!(text.contains("\"ticket_id\":\"g-new\""), "{text}");
    assert!(!text.contains("a-new"), "{text}");
    fixture.db.drop_schema().await;
}

/// The console's health page: each tenant's triages per minute, and how many waited for rate
/// limits and how long, counted from its own rows only.
#[tokio::test]
async fn the_throughput_counts_a_tenants_own_triages_and_waits_per_minute() {
    use chrono::{DurationRound, TimeDelta};
    use result_writer::{
        config::ConsoleConfig,
        console::{self, ConsoleState},
        throughput::Throughput,
    };

    let ctx = TestContext::new("rw-api-throughput");
    let config = result_writer::config::DatabaseConfig {
        url: Secret::new(Stack::get().database_url.clone()),
        schema: ctx.db_schema.clone(),
        ..Default::default()
    };
    let pool = db::connect(&config).unwrap();
    db::migrate(&pool, &ctx.db_schema).await.unwrap();
    let store = Store::new(pool);
    let now = Utc::now();
    let at = |tenant: &str, ticket: &str, ago: TimeDelta, wait_ms: i32| NewTriage {
        triaged_at: now - ago,
        rate_limit_wait_ms: wait_ms,
        ..row(tenant, ticket, 0, "billing")
    };
    let rows = [
        // acme: three a few seconds ago (two of which waited), two about three minutes ago.
        at("acme", "a-now-0", TimeDelta::seconds(5), 0),
        at("acme", "a-now-1", TimeDelta::seconds(5), 400),
        at("acme", "a-now-2", TimeDelta::seconds(5), 1_200),
        at("acme", "a-old-0", TimeDelta::seconds(185), 0),
        at("acme", "a-old-1", TimeDelta::seconds(185), 0),
        // Outside the default 15 minutes.
        at("acme", "a-hour", TimeDelta::minutes(40), 5_000),
        // globex: one, which waited long; acme must never count it.
        at("globex", "g-now", TimeDelta::seconds(5), 9_000),
    ];
    assert_eq!(store.upsert(&rows).await.unwrap().len(), rows.len());
    let app = console::router(ConsoleState {
        store,
        keys: ApiKeys::from_plain(&[("acme", ACME_KEY), ("globex", GLOBEX_KEY)]),
        config: ConsoleConfig::default(),
        http: reqwest::Client::new(),
    });
    let throughput = |key: &'static str, query: &'static str| {
        let app = app.clone();
        async move {
            let (status, _, body) =
                get(&app, &format!("/console/api/throughput{query}"), Some(key)).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            serde_json::from_str::<Throughput>(&body).unwrap()
        }
    };

    let acme = throughput(ACME_KEY, "").await;
    assert_eq!(acme.minutes, 15);
    assert_eq!(acme.buckets.len(), 15);
    assert_eq!(
        (
            acme.triaged,
            acme.waited,
            acme.wait_ms_total,
            acme.wait_ms_p95
        ),
        (5, 2, 1_600, 1_200),
        "acme's window: five triages, two waited 1.6 s between them"
    );
    let minute_of = |ago: TimeDelta| (now - ago).duration_trunc(TimeDelta::minutes(1)).unwrap();
    let recent = acme
        .buckets
        .iter()
        .find(|b| b.minute == minute_of(TimeDelta::seconds(5)))
        .unwrap();
    assert_eq!(
        (
            recent.triaged,
            recent.waited,
            recent.wait_ms_total,
            recent.wait_ms_p95
        ),
        (3, 2, 1_600, 1_200)
    );
    let older = acme
        .buckets
        .iter()
        .find(|b| b.minute == minute_of(TimeDelta::seconds(185)))
        .unwrap();
    assert_eq!(
        (older.triaged, older.waited, older.wait_ms_total),
        (2, 0, 0)
    );
    assert_eq!(
        acme.buckets.iter().map(|b| b.triaged).sum::<i64>(),
        5,
        "the other minutes are zero"
    );

    let day = throughput(ACME_KEY, "?minutes=1440").await;
    assert_eq!((day.buckets.len(), day.triaged), (1440, 6));
    assert_eq!(day.wait_ms_total, 6_600);

    let globex = throughput(GLOBEX_KEY, "?minutes=5").await;
    assert_eq!(
        (
            globex.triaged,
            globex.waited,
            globex.wait_ms_total,
            globex.wait_ms_p95
        ),
        (1, 1, 9_000, 9_000),
        "globex sees its own triage and none of acme's"
    );

    let (status, content_type, body) =
        get(&app, "/console/api/throughput?minutes=0", Some(ACME_KEY)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(content_type, "application/problem+json");
    let (status, _, _) = get(&app, "/console/api/throughput", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // The read API returns each triage's wait.
    let api_app = api::router(ApiState {
        store: Store::new(db::connect(&config).unwrap()),
        keys: ApiKeys::from_plain(&[("acme", ACME_KEY), ("globex", GLOBEX_KEY)]),
        published_tx: broadcast::channel(1).0,
        max_page_size: 10,
        metrics: WriterMetrics::register(&mut prometheus_client::registry::Registry::default()),
        shutdown: Shutdown::never(),
    });
    let (status, _, body) = get(&api_app, "/v1/tickets/a-now-2/triage", Some(ACME_KEY)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let triage: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(triage["rate_limit_wait_ms"], 1_200);
    Db::connect(&ctx.db_schema).await.drop_schema().await;
}
