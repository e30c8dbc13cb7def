//! The OpenAI wire format: the parts of a chat-completion request the simulator reads, token
//! estimates, and OpenAI's error bodies.

use serde::Deserialize;
use serde_json::{Value, json};

/// A chat-completion request; fields the simulator does not use are accepted and ignored, as
/// OpenAI's API accepts many more.
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub messages: Vec<Message>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub response_format: Option<ResponseFormat>,
    #[serde(default)]
    pub max_tokens: Option<u64>,
    #[serde(default)]
    pub max_completion_tokens: Option<u64>,
}

#[derive(Debug, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Debug, Deserialize)]
pub struct Message {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
}

/// A message's content: a string, or an array of parts of which the text parts count.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
pub struct ContentPart {
    #[serde(default)]
    pub text: Option<String>,
}

impl Content {
    pub fn text(&self) -> String {
        match self {
            Content::Text(text) => text.clone(),
            Content::Parts(parts) => parts
                .iter()
                .filter_map(|part| part.text.as_deref())
                .collect::<Vec<_>>()
                .join("\n"),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ResponseFormat {
    Text,
    JsonObject,
    JsonSchema { json_schema: JsonSchemaFormat },
}

#[derive(Debug, Deserialize)]
pub struct JsonSchemaFormat {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub schema: Option<Value>,
}

impl ChatRequest {
    /// The completion budget the caller set, if any.
    pub fn max_tokens(&self) -> Option<u64> {
        self.max_completion_tokens.or(self.max_tokens)
    }

    /// The text of the last `user` message.
    pub fn last_user_text(&self) -> String {
        self.messages
            .iter()
            .rev()
            .find(|message| message.role == "user")
            .and_then(|message| message.content.as_ref())
            .map(Content::text)
            .unwrap_or_default()
    }

    /// Whether any message asks for JSON (as a prompt written for JSON mode does).
    pub fn mentions_json(&self) -> bool {
        self.messages.iter().any(|message| {
            message
                .content
                .as_ref()
                .is_some_and(|content| content.text().to_lowercase().contains("json"))
        })
    }

    /// Prompt tokens, estimated as OpenAI's cookbook counts chat messages: 3 tokens of framing
    /// per message, 1 for the role, the content's tokens, and 3 to prime the reply.
    pub fn prompt_tokens(&self) -> u64 {
        let content_tokens: u64 = self
            .messages
            .iter()
            .map(|message| {
                4 + message
                    .content
                    .as_ref()
                    .map_or(0, |content| estimate_tokens(&content.text()))
            })
            .sum();
        content_tokens + 3
    }
}

/// An honest approximation of a BPE tokenizer: one token per four characters, rounded up
/// (OpenAI's rule of thumb for English text).
pub fn estimate_tokens(text: &str) -> u64 {
    (text.chars().count() as u64).div_ceil(4)
}

/// OpenAI's error body: `{"error": {"message", "type", "param", "code"}}`.
pub fn error_body(message: &str, kind: &str, param: Option<&str>, code: Option<&str>) -> Value {
    json!({
        "error": {
            "message": message,
            "type": kind,
            "param": param,
            "code": code,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_four_characters_each() {
        assert_eq!(estimate_tokens(""), 0);
        assert_eq!(estimate_tokens("abcd"), 1);
        assert_eq!(estimate_tokens("abcde"), 2);
        assert_eq!(estimate_tokens("äöüß"), 1);
    }

    #[test]
    fn request_parses_openai_shapes() {
        let request: ChatRequest = serde_json::from_value(json!({
            "model": "gpt-4o-mini",
            "messages": [
                {"role": "system", "content": "Answer in JSON."},
                {"role": "user", "content": [{"type": "text", "text": "<ticket>hi</ticket>"}]}
            ],
            "temperature": 0,
            "max_tokens": 300,
            "response_format": {"type": "json_schema", "json_schema": {"name": "triage", "schema": {}}},
            "stream": true,
            "stream_options": {"include_usage": true}
        }))
        .unwrap();
        assert_eq!(request.last_user_text(), "<ticket>hi</ticket>");
        assert!(request.mentions_json());
        assert_eq!(request.max_tokens(), Some(300));
        // (4 + 4) + (4 + 5) + 3
        assert_eq!(request.prompt_tokens(), 20);
        assert!(matches!(
            request.response_format,
            Some(ResponseFormat::JsonSchema { .. })
        ));
    }
}
