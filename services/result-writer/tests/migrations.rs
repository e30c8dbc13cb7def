//! The embedded migrations against the real PostgreSQL: replicas that start together migrate a
//! schema exactly once, and a restart finds nothing to do.

mod common;

use common::Db;
use result_writer::{config::DatabaseConfig, db};
use triage_runtime::config::Secret;
use triage_test_support::{Stack, TestContext};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_starting_at_once_migrate_the_schema_exactly_once() {
    let ctx = TestContext::new("rw-migrate");
    let config = DatabaseConfig {
        url: Secret::new(Stack::get().database_url.clone()),
        schema: ctx.db_schema.clone(),
        pool_size: 2,
        ..Default::default()
    };
    let replicas: Vec<_> = (0..3)
        .map(|_| {
            let pool = db::connect(&config).unwrap();
            let schema = ctx.db_schema.clone();
            tokio::spawn(async move { db::migrate(&pool, &schema).await })
        })
        .collect();
    let mut applied = Vec::new();
    for replica in replicas {
        applied.push(
            replica
                .await
                .unwrap()
                .expect("every replica's migration succeeds"),
        );
    }
    applied.sort();
    assert_eq!(
        applied,
        [0, 0, 5],
        "one replica applied all five migrations (the table, the tenant in its key, feedback, \
         ticket text and trace, rate-limit wait), the others waited"
    );

    let pool = db::connect(&config).unwrap();
    assert_eq!(db::migrate(&pool, &ctx.db_schema).await.unwrap(), 0);
    let db = Db::connect(&ctx.db_schema).await;
    assert_eq!(db.count().await, Some(0));
    db.drop_schema().await;
}
