//! `make demo` end to end, on its own topics: every sample ticket is triaged through the five
//! services as processes, the bad requests are refused, and the broken events become an alert.

use std::time::Duration;

use pipeline::{
    Llm,
    demo::{DemoOptions, run},
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_triages_every_sample_ticket_and_raises_an_alert() {
    let mut options = DemoOptions::from_env(true);
    options.pipeline.isolated = Some("demo".into());
    options.pipeline.llm = Llm::Simulator {
        rpm: 6_000,
        latency: "uniform:20-200".into(),
    };
    options.pipeline.alert_window = Duration::from_secs(2);
    options.timeout = Duration::from_secs(120);
    let summary = run(options).await.expect("the demo runs");
    assert_eq!(summary.accepted, 30);
    assert_eq!(summary.triaged, 30);
    assert_eq!(summary.rejected, 2);
    assert!(summary.alerts >= 1);
    // The keyword rules give the sample set several categories, not one.
    assert!(summary.categories.len() >= 4, "{:?}", summary.categories);
}
