//! The triage console in headless Chromium (Debian's `chromium` and `chromium-driver`), driven
//! through WebDriver, against the real stack and the five services as processes, with three
//! keys: tenant `demo` (admin), tenant `demo` (member) and tenant `globex`.
//!
//! One test, one browser, in order: a wrong key is refused; a ticket submitted through the HTTP
//! API appears in the feed without a reload within 2 s of its commit; filters; a correction
//! reaches the read API and the accuracy table; a dead letter is replayed by the admin and
//! refused to the member; tenant `globex` never sees `demo`'s tickets. Any SEVERE entry in the
//! browser's log (a JavaScript error, a failed request the page did not expect) fails the test.
//! Screenshots are taken on the way, into `target/console-screenshots/`; with
//! `CONSOLE_SCREENSHOTS=docs` they replace the ones of `docs/console/` instead.

use std::{
    net::TcpStream,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use fantoccini::{Client, ClientBuilder, Locator, elements::Element};
use pipeline::{Options, Pipeline, TenantKey};
use serde_json::{Value, json};
use triage_test_support::{free_port, target_dir, workspace_root};

const MEMBER_KEY: &str = "tk_demo_member_console_test";
const GLOBEX_KEY: &str = "tk_globex_console_test";
const TRACE_URL: &str = "https://tempo.example/trace/{trace_id}";

/// chromedriver on a free port, killed on drop.
struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_chromedriver() -> Driver {
    let port = free_port();
    let child = Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver runs (Debian package chromium-driver; make test installs it)");
    let driver = Driver {
        child,
        url: format!("http://127.0.0.1:{port}"),
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "chromedriver did not listen within 20 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    driver
}

async fn browser(driver: &Driver) -> Client {
    let mut capabilities = serde_json::Map::new();
    capabilities.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": "/usr/bin/chromium",
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1366,900", "--lang=en-GB"],
        }),
    );
    capabilities.insert("goog:loggingPrefs".into(), json!({"browser": "ALL"}));
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match ClientBuilder::new(connector.clone())
            .capabilities(capabilities.clone())
            .connect(&driver.url)
            .await
        {
            Ok(client) => return client,
            Err(error) if Instant::now() < deadline => {
                eprintln!("waiting for a browser session: {error}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(error) => panic!("no browser session: {error}"),
        }
    }
}

/// The browser's log since the last call; panics on any SEVERE entry.
async fn assert_no_console_errors(client: &Client, driver: &Driver, step: &str) {
    let session = client.session_id().await.unwrap().expect("a session");
    let log: Value = reqwest::Client::new()
        .post(format!("{}/session/{session}/se/log", driver.url))
        .json(&json!({"type": "browser"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let severe: Vec<&Value> = log["value"]
        .as_array()
        .map(|entries| entries.iter().filter(|e| e["level"] == "SEVERE").collect())
        .unwrap_or_default();
    assert!(
        severe.is_empty(),
        "console errors after {step}: {severe:#?}"
    );
}

/// Waits for `condition` (a JavaScript expression) to be true in the page.
async fn wait_js(client: &Client, condition: &str, timeout: Duration, what: &str) {
    let deadline = Instant::now() + timeout;
    loop {
        let value = client
            .execute(&format!("return !!({condition});"), vec![])
            .await
            .unwrap();
        if value == Value::Bool(true) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what} ({condition})"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn text(client: &Client, id: &str) -> String {
    client
        .find(Locator::Id(id))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

async fn by_id(client: &Client, id: &str) -> Element {
    client.find(Locator::Id(id)).await.unwrap()
}

async fn sign_in(client: &Client, key: &str) {
    let input = by_id(client, "api-key").await;
    input.clear().await.unwrap();
    input.send_keys(key).await.unwrap();
    by_id(client, "login-form")
        .await
        .find(Locator::Css("button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_js(
        client,
        "!document.getElementById('nav').hidden",
        Duration::from_secs(10),
        "signed in",
    )
    .await;
}

async fn sign_out(client: &Client) {
    by_id(client, "logout").await.click().await.unwrap();
    wait_js(
        client,
        "!document.getElementById('login').hidden",
        Duration::from_secs(5),
        "signed out",
    )
    .await;
}

async fn screenshot(client: &Client, name: &str) {
    let png = client.screenshot().await.unwrap();
    // `make test` runs on clean clones: the documented screenshots change only when asked.
    let dir: PathBuf = if std::env::var("CONSOLE_SCREENSHOTS").as_deref() == Ok("docs") {
        workspace_root().join("docs/console")
    } else {
        target_dir().join("console-screenshots")
    };
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
}

/// Clicks a dead letter's button once the list has loaded; the page may still redraw the list
/// (a second load after the sign-in), so a stale element is looked up again until a deadline.
async fn click_when_settled(client: &Client, css: &str) {
    wait_js(
        client,
        "document.getElementById('dl-status').textContent.endsWith('newest first.')",
        Duration::from_secs(20),
        "the dead-letter list loaded",
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let clicked = match client.find(Locator::Css(css)).await {
            Ok(element) => element.click().await,
            Err(error) => Err(error),
        };
        match clicked {
            Ok(()) => return,
            Err(error) if Instant::now() < deadline => {
                eprintln!("clicking {css} again: {error}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(error) => panic!("cannot click {css}: {error}"),
        }
    }
}

fn row_present(ticket: &str) -> String {
    format!("document.querySelector('#feed-body tr[data-ticket=\"{ticket}\"]')")
}

async fn submit(pipeline: &Pipeline, key: &str, ticket_id: &str, subject: &str, description: &str) {
    let response = reqwest::Client::new()
        .post(format!("{}/v1/tickets", pipeline.http_url))
        .bearer_auth(key)
        .json(
            &json!({"ticket_id": ticket_id, "subject": subject, "description": description,
                      "customer": {"id": "c-console"}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status().as_u16(),
        202,
        "{}",
        response.text().await.unwrap()
    );
}

async fn read_api(pipeline: &Pipeline, key: &str, path: &str) -> (u16, Value) {
    let response = reqwest::Client::new()
        .get(format!("{}{path}", pipeline.results_url))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_shows_corrects_replays_and_isolates_tenants() {
    let driver = start_chromedriver();
    let mut options = Options::new(Some("console"));
    options.llm = pipeline::Llm::Simulator {
        rpm: 6_000,
        latency: "uniform:20-120".into(),
    };
    options.partitions = 2;
    options.alert_window = Duration::from_secs(1);
    options.trace_url = Some(TRACE_URL.into());
    options.extra_keys = vec![
        TenantKey {
            tenant: "demo".into(),
            key: MEMBER_KEY.into(),
            admin: false,
        },
        TenantKey {
            tenant: "globex".into(),
            key: GLOBEX_KEY.into(),
            admin: false,
        },
    ];
    let pipeline = Pipeline::start(options).await.expect("the pipeline starts");
    let admin_key = pipeline.api_key.clone();
    let run = uuid::Uuid::new_v4().simple().to_string()[..6].to_owned();
    let client = browser(&driver).await;

    // A wrong key gets a clear message, not a blank page.
    client.goto(&pipeline.console_url).await.unwrap();
    let input = by_id(&client, "api-key").await;
    input.send_keys("not-a-key").await.unwrap();
    by_id(&client, "login-form")
        .await
        .find(Locator::Css("button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_js(
        &client,
        "document.getElementById('login-error').textContent.includes('not valid')",
        Duration::from_secs(5),
        "the wrong-key message",
    )
    .await;
    // The 401 of the wrong key is the one failed request the page expects: clear the log.
    let _ = assert_no_console_errors_allowing_401(&client, &driver).await;

    sign_in(&client, &admin_key).await;
    assert_eq!(text(&client, "tenant-name").await, "demo (admin)");
    wait_js(
        &client,
        "document.getElementById('stream-status').textContent.startsWith('Live')",
        Duration::from_secs(10),
        "the live stream",
    )
    .await;
    client
        .execute("window.__notReloaded = true; return true;", vec![])
        .await
        .unwrap();

    // Live feed: each ticket appears without a reload, within 2 s of its commit.
    let billing = format!("billing-{run}");
    let login = format!("login-{run}");
    for (ticket, subject, description) in [
        (
            &billing,
            "Charged twice",
            "I was charged twice this month, please refund the invoice",
        ),
        (
            &login,
            "Cannot log in",
            "I cannot log in, the password reset link does not work",
        ),
    ] {
        let submitted = Instant::now();
        submit(&pipeline, &admin_key, ticket, subject, description).await;
        let deadline = submitted + Duration::from_secs(60);
        let mut committed = None;
        loop {
            let shown = client
                .execute(&format!("return !!{};", row_present(ticket)), vec![])
                .await
                .unwrap()
                == Value::Bool(true);
            if committed.is_none()
                && read_api(
                    &pipeline,
                    &admin_key,
                    &format!("/v1/tickets/{ticket}/triage"),
                )
                .await
                .0 == 200
            {
                committed = Some(Instant::now());
            }
            if shown {
                let shown_at = Instant::now();
                let since_commit =
                    shown_at.saturating_duration_since(committed.unwrap_or(shown_at));
                eprintln!(
                    "{ticket}: in the feed {:?} after submission, {since_commit:?} after the read API had it",
                    shown_at - submitted
                );
                assert!(
                    since_commit <= Duration::from_secs(2),
                    "{ticket} took {since_commit:?} after its commit"
                );
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{ticket} never appeared in the feed"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // A few more, so that the feed (and its screenshot) shows several categories.
    let more: Vec<String> = ["outage", "bug", "feature"]
        .iter()
        .map(|kind| format!("{kind}-{run}"))
        .collect();
    for (ticket, subject, description) in [
        (
            &more[0],
            "Site down",
            "The whole service is down, nothing loads for any of our users",
        ),
        (
            &more[1],
            "Export crashes",
            "There is a bug: the CSV export crashes with an error every time",
        ),
        (
            &more[2],
            "Dark mode",
            "Feature request: please add a dark mode to the dashboard",
        ),
    ] {
        submit(&pipeline, &admin_key, ticket, subject, description).await;
    }
    for ticket in &more {
        wait_js(
            &client,
            &row_present(ticket),
            Duration::from_secs(60),
            "the extra tickets",
        )
        .await;
    }
    wait_js(
        &client,
        "window.__notReloaded === true",
        Duration::from_secs(1),
        "no reload",
    )
    .await;
    let (_, login_triage) = read_api(
        &pipeline,
        &admin_key,
        &format!("/v1/tickets/{login}/triage"),
    )
    .await;
    let (_, billing_triage) = read_api(
        &pipeline,
        &admin_key,
        &format!("/v1/tickets/{billing}/triage"),
    )
    .await;
    let login_category = login_triage["category"].as_str().unwrap().to_owned();
    assert_ne!(
        login_category,
        billing_triage["category"].as_str().unwrap(),
        "the two tickets need two categories"
    );
    screenshot(&client, "feed").await;
    assert_no_console_errors(&client, &driver, "the live feed").await;

    // Filter by category: only the login ticket stays.
    by_id(&client, "f-category")
        .await
        .find(Locator::Css(&format!("option[value=\"{login_category}\"]")))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    by_id(&client, "filters")
        .await
        .find(Locator::Css("button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_js(
        &client,
        &format!("{} && !{}", row_present(&login), row_present(&billing)),
        Duration::from_secs(10),
        "the filtered feed",
    )
    .await;
    let categories = client
        .execute("return [...document.querySelectorAll('#feed-body tr td:nth-child(3)')].map(td => td.textContent);", vec![])
        .await
        .unwrap();
    assert!(
        categories
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c == &json!(login_category)),
        "{categories}"
    );

    // Open the ticket and correct it: category to billing, priority high, reply edited.
    client
        .find(Locator::Css(&format!(
            "#feed-body tr[data-ticket=\"{login}\"]"
        )))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_js(
        &client,
        &format!("document.getElementById('ticket-title').textContent === 'Ticket {login}'"),
        Duration::from_secs(5),
        "the ticket view",
    )
    .await;
    assert!(
        text(&client, "t-reply").await.len() > 10,
        "a suggested reply is shown"
    );
    assert!(text(&client, "t-model").await.contains("gpt-4o-mini"));
    // What the ticket says, and its trace in the trace UI.
    assert_eq!(text(&client, "t-subject").await, "Cannot log in");
    assert_eq!(
        text(&client, "t-excerpt").await,
        "I cannot log in, the password reset link does not work"
    );
    // Beside the latency, how long the task waited for rate limits, as the read API says.
    let waited_ms = login_triage["rate_limit_wait_ms"]
        .as_u64()
        .expect("the read API has the triage's rate-limit wait");
    let wait_text = text(&client, "t-wait").await;
    if waited_ms == 0 {
        assert_eq!(wait_text, "none");
    } else {
        assert!(wait_text.contains("waiting for rate limits"), "{wait_text}");
    }
    let trace_id = login_triage["trace_id"]
        .as_str()
        .expect("the read API has the result's trace id")
        .to_owned();
    assert!(
        trace_id.len() == 32 && trace_id.chars().all(|c| c.is_ascii_hexdigit()),
        "{trace_id}"
    );
    assert_eq!(login_triage["subject"], "Cannot log in");
    let href = by_id(&client, "t-trace-link")
        .await
        .attr("href")
        .await
        .unwrap();
    assert_eq!(
        href.as_deref(),
        Some(TRACE_URL.replace("{trace_id}", &trace_id).as_str())
    );
    by_id(&client, "c-category")
        .await
        .find(Locator::Css("option[value=billing]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    by_id(&client, "c-priority")
        .await
        .find(Locator::Css("option[value=high]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    client
        .find(Locator::Css("input[name=reply][value=edited]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    by_id(&client, "save-correction")
        .await
        .click()
        .await
        .unwrap();
    wait_js(
        &client,
        "document.getElementById('correct-status').textContent.startsWith('Saved')",
        Duration::from_secs(5),
        "the saved correction",
    )
    .await;
    // From the top: the feed, and the ticket's subject, excerpt and trace link.
    client
        .execute("window.scrollTo(0, 0); return true;", vec![])
        .await
        .unwrap();
    screenshot(&client, "ticket").await;
    let (status, feedback) = read_api(
        &pipeline,
        &admin_key,
        &format!("/v1/tickets/{login}/feedback"),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(feedback[0]["category"], "billing", "{feedback}");
    assert_eq!(feedback[0]["predicted_category"], json!(login_category));
    assert_eq!(feedback[0]["reply"], "edited");
    // And the billing ticket accepted as it was, through the Accept button.
    by_id(&client, "f-clear").await.click().await.unwrap();
    wait_js(
        &client,
        &row_present(&billing),
        Duration::from_secs(10),
        "the unfiltered feed",
    )
    .await;
    client
        .find(Locator::Css(&format!(
            "#feed-body tr[data-ticket=\"{billing}\"]"
        )))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_js(
        &client,
        &format!("document.getElementById('ticket-title').textContent === 'Ticket {billing}'"),
        Duration::from_secs(5),
        "the second ticket",
    )
    .await;
    by_id(&client, "accept").await.click().await.unwrap();
    wait_js(
        &client,
        "document.getElementById('correct-status').textContent.includes('accepted')",
        Duration::from_secs(5),
        "the accepted triage",
    )
    .await;

    // The accuracy table: 1 of 2 agreed, and the confusion cell predicted login → billing.
    client
        .goto(&format!("{}#accuracy", pipeline.console_url))
        .await
        .unwrap();
    wait_js(
        &client,
        "document.querySelectorAll('#by-version tbody tr').length > 0",
        Duration::from_secs(10),
        "the accuracy table",
    )
    .await;
    let version_row = client
        .execute(
            "return document.querySelector('#by-version tbody tr').textContent;",
            vec![],
        )
        .await
        .unwrap();
    assert!(
        version_row.as_str().unwrap().contains("50.0 %"),
        "{version_row}"
    );
    let miss = client
        .execute(&format!("return [...document.querySelectorAll('#confusion tbody tr')].find(r => r.cells[0].textContent === '{login_category}').querySelector('td.miss').textContent;"), vec![])
        .await
        .unwrap();
    assert_eq!(miss, json!("1"));
    let (_, agreement) = read_api(&pipeline, &admin_key, "/v1/feedback/agreement").await;
    assert_eq!(agreement["corrections"], 2, "{agreement}");
    screenshot(&client, "accuracy").await;
    assert_no_console_errors(&client, &driver, "the accuracy page").await;

    // A dead letter: the provider refuses one ticket (content filter), then recovers.
    pipeline
        .sim_config(&json!({"faults": [{"fault": "content_filter", "probability": 1.0}]}))
        .await
        .unwrap();
    let refused = format!("refused-{run}");
    submit(
        &pipeline,
        &admin_key,
        &refused,
        "Angry",
        "Call me at +44 20 7946 0958 or mail jane.doe@example.com about my order",
    )
    .await;
    client
        .goto(&format!("{}#dead-letters", pipeline.console_url))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        by_id(&client, "dl-refresh").await.click().await.unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        let found = client.execute(&format!("return !!document.querySelector('#dl-table tbody tr td:nth-child(3)') && [...document.querySelectorAll('#dl-table tbody td:nth-child(3)')].some(td => td.textContent === '{refused}');"), vec![]).await.unwrap();
        if found == Value::Bool(true) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the dead letter of {refused} never appeared: {}",
            text(&client, "dl-status").await
        );
    }
    pipeline.sim_config(&json!({"faults": []})).await.unwrap();
    let excerpt = client
        .execute(
            "return document.querySelector('#dl-table tbody tr td:nth-child(5)').textContent;",
            vec![],
        )
        .await
        .unwrap();
    let excerpt = excerpt.as_str().unwrap();
    assert!(
        !excerpt.contains("jane.doe@example.com") && !excerpt.contains("7946"),
        "redacted as in Slack: {excerpt}"
    );
    screenshot(&client, "dead-letters").await;

    // The member key of the same tenant sees the dead letter but may not replay it.
    sign_out(&client).await;
    sign_in(&client, MEMBER_KEY).await;
    client
        .goto(&format!("{}#dead-letters", pipeline.console_url))
        .await
        .unwrap();
    wait_js(
        &client,
        "document.querySelector('#dl-table tbody tr button')",
        Duration::from_secs(20),
        "the dead-letter list",
    )
    .await;
    click_when_settled(&client, "#dl-table tbody tr button").await;
    wait_js(
        &client,
        "document.getElementById('dl-status').textContent.startsWith('Refused')",
        Duration::from_secs(20),
        "the refusal",
    )
    .await;
    let _ = assert_no_console_errors_allowing_status(&client, &driver, 403).await;
    assert_eq!(
        read_api(
            &pipeline,
            &admin_key,
            &format!("/v1/tickets/{refused}/triage")
        )
        .await
        .0,
        404,
        "not replayed"
    );

    // The admin replays it, and the ticket is triaged.
    sign_out(&client).await;
    sign_in(&client, &admin_key).await;
    client
        .goto(&format!("{}#dead-letters", pipeline.console_url))
        .await
        .unwrap();
    wait_js(
        &client,
        "document.querySelector('#dl-table tbody tr button')",
        Duration::from_secs(20),
        "the dead-letter list",
    )
    .await;
    click_when_settled(&client, "#dl-table tbody tr button").await;
    wait_js(
        &client,
        "document.getElementById('dl-status').textContent.startsWith('Replayed')",
        Duration::from_secs(30),
        "the replay",
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while read_api(
        &pipeline,
        &admin_key,
        &format!("/v1/tickets/{refused}/triage"),
    )
    .await
    .0 != 200
    {
        assert!(
            Instant::now() < deadline,
            "the replayed ticket was never triaged"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_no_console_errors(&client, &driver, "the replay").await;

    // Pipeline health: the lag report of every group.
    client
        .goto(&format!("{}#health", pipeline.console_url))
        .await
        .unwrap();
    wait_js(
        &client,
        "document.querySelectorAll('#health-table tbody tr').length >= 4",
        Duration::from_secs(20),
        "the lag table",
    )
    .await;
    // Throughput and rate-limit waits of the last 15 minutes: demo's triages so far, counted by
    // the result store, and none of them for globex (which has none yet).
    wait_js(
        &client,
        "document.querySelectorAll('#throughput-table tbody tr').length >= 1 \
         && /^[0-9]+ triages in the last 15 minutes/.test(\
              document.getElementById('throughput-summary').textContent)",
        Duration::from_secs(20),
        "the throughput and rate-limit waits",
    )
    .await;
    let (status, throughput) = read_api(&pipeline, &admin_key, "/console/api/throughput").await;
    assert_eq!(status, 200, "{throughput}");
    let triaged = throughput["triaged"].as_i64().unwrap();
    assert!(triaged >= 4, "demo's triages of this run: {throughput}");
    let summary = text(&client, "throughput-summary").await;
    let shown: i64 = summary
        .split(' ')
        .next()
        .and_then(|count| count.parse().ok())
        .unwrap_or_else(|| panic!("the summary starts with the count: {summary}"));
    assert!(
        (4..=triaged).contains(&shown),
        "{summary} against {throughput}"
    );
    assert!(
        summary.contains("waited for rate limits"),
        "the summary says how many waited: {summary}"
    );
    let bars = client
        .execute(
            "return document.querySelectorAll('#throughput-chart rect').length;",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(
        bars,
        json!(30),
        "a triage bar and a waited bar for each of 15 minutes"
    );
    let (status, globex) = read_api(&pipeline, GLOBEX_KEY, "/console/api/throughput").await;
    assert_eq!((status, &globex["triaged"]), (200, &json!(0)), "{globex}");
    screenshot(&client, "health").await;
    client
        .execute(
            "document.getElementById('throughput').scrollIntoView(); return true;",
            vec![],
        )
        .await
        .unwrap();
    screenshot(&client, "health-throughput").await;
    assert_no_console_errors(&client, &driver, "the health page").await;

    // Tenant isolation: globex sees its own ticket and never demo's.
    sign_out(&client).await;
    sign_in(&client, GLOBEX_KEY).await;
    client
        .goto(&format!("{}#feed", pipeline.console_url))
        .await
        .unwrap();
    wait_js(
        &client,
        "document.getElementById('stream-status').textContent.startsWith('Live')",
        Duration::from_secs(10),
        "globex's stream",
    )
    .await;
    assert_eq!(text(&client, "tenant-name").await, "globex");
    let globex_ticket = format!("globex-{run}");
    submit(
        &pipeline,
        GLOBEX_KEY,
        &globex_ticket,
        "Outage",
        "The service is down for everyone, nothing loads",
    )
    .await;
    // demo's ticket ids, submitted now, must never show in globex's feed either.
    let late_demo = format!("late-demo-{run}");
    submit(
        &pipeline,
        &admin_key,
        &late_demo,
        "Refund",
        "Please refund my last invoice",
    )
    .await;
    wait_js(
        &client,
        &row_present(&globex_ticket),
        Duration::from_secs(30),
        "globex's ticket",
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while read_api(
        &pipeline,
        &admin_key,
        &format!("/v1/tickets/{late_demo}/triage"),
    )
    .await
    .0 != 200
    {
        assert!(
            Instant::now() < deadline,
            "demo's late ticket was never triaged"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for ticket in [&billing, &login, &refused, &late_demo] {
        let shown = client
            .execute(&format!("return !!{};", row_present(ticket)), vec![])
            .await
            .unwrap();
        assert_eq!(
            shown,
            Value::Bool(false),
            "globex's console shows demo's ticket {ticket}"
        );
    }
    client
        .goto(&format!("{}#accuracy", pipeline.console_url))
        .await
        .unwrap();
    wait_js(
        &client,
        "document.getElementById('accuracy-status').textContent.startsWith('No corrections')",
        Duration::from_secs(10),
        "globex's empty accuracy",
    )
    .await;
    assert_no_console_errors(&client, &driver, "tenant isolation").await;

    client.close().await.unwrap();
    pipeline.stop().await.expect("the pipeline stops cleanly");
}

/// Like [`assert_no_console_errors`], but a failed request with `status` (which the step
/// provoked on purpose) is allowed.
async fn assert_no_console_errors_allowing_status(client: &Client, driver: &Driver, status: u16) {
    let session = client.session_id().await.unwrap().expect("a session");
    let log: Value = reqwest::Client::new()
        .post(format!("{}/session/{session}/se/log", driver.url))
        .json(&json!({"type": "browser"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let marker = format!("status of {status}");
    let severe: Vec<&Value> = log["value"]
        .as_array()
        .map(|entries| {
            entries
                .iter()
                .filter(|e| e["level"] == "SEVERE")
                .filter(|e| !e["message"].as_str().unwrap_or_default().contains(&marker))
                .collect()
        })
        .unwrap_or_default();
    assert!(severe.is_empty(), "console errors: {severe:#?}");
}

async fn assert_no_console_errors_allowing_401(client: &Client, driver: &Driver) {
    assert_no_console_errors_allowing_status(client, driver, 401).await;
}
