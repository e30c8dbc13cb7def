//! A local stand-in for Slack's incoming webhook (and the generic JSON webhook): it answers
//! `ok` as Slack does and records every post, so the demo can show the alert and tests can
//! count alerts.

use std::sync::{Arc, Mutex};

use axum::{Json, Router, extract::State, routing::post};
use serde_json::Value;

#[derive(Clone)]
pub struct Sink {
    /// Base URL; dlq-alerter posts to `{url}/slack`.
    pub url: String,
    posts: Arc<Mutex<Vec<Value>>>,
}

impl Sink {
    pub async fn start() -> anyhow::Result<Sink> {
        let posts = Arc::new(Mutex::new(Vec::new()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let app = Router::new()
            .route("/slack", post(record))
            .route("/webhook", post(record))
            .with_state(Arc::clone(&posts));
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(Sink { url, posts })
    }

    /// Everything posted so far, oldest first.
    pub fn posts(&self) -> Vec<Value> {
        self.posts.lock().expect("sink lock").clone()
    }
}

async fn record(
    State(posts): State<Arc<Mutex<Vec<Value>>>>,
    Json(body): Json<Value>,
) -> &'static str {
    posts.lock().expect("sink lock").push(body);
    "ok"
}
