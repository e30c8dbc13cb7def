//! The chaos run at a size that fits CI (`make chaos` runs the full size). It kills and restarts
//! brokers, Redis and PostgreSQL, so it is a `cluster_` test: make test runs those alone, after
//! everything else, on the three-broker cluster (`make test-cluster`), where the broker faults
//! are kills of partition leaders and of the transaction coordinator, and a rolling restart.

use std::time::Duration;

use pipeline::chaos::{ChaosOptions, run};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_chaos_nothing_lost_nothing_paid_twice_beyond_the_kills() {
    let mut options = ChaosOptions::new(300, 15.0);
    options.worker_kills = 2;
    options.outage = Duration::from_secs(5);
    let report = run(options).await.expect("the chaos run completes");
    println!("{report:#?}");
    report.verify().expect("the guarantees hold");
}
