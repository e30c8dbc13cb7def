//! The structured answer we ask the model for, and the check that it really is one.

use serde::{Deserialize, Serialize};
use triage_proto::v1::{ChatMessage, Taxonomy};

/// A valid triage.
#[derive(Clone, Debug, PartialEq)]
pub struct Triage {
    pub category: String,
    pub priority: String,
    pub suggested_reply: String,
    pub confidence: f64,
}

/// Why an answer is not a valid triage; shown to the model in the repair request.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum InvalidOutput {
    #[error(
        "the answer is not a JSON object with category, priority, suggested_reply and confidence: {0}"
    )]
    NotJson(String),
    #[error("category {0:?} is not one of the allowed categories")]
    UnknownCategory(String),
    #[error("priority {0:?} is not one of the allowed priorities")]
    UnknownPriority(String),
    #[error("suggested_reply is empty")]
    EmptyReply,
    #[error("confidence {0} is not between 0 and 1")]
    ConfidenceOutOfRange(f64),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTriage {
    category: String,
    priority: String,
    suggested_reply: String,
    confidence: f64,
}

/// The `response_format` for the taxonomy: a strict JSON schema where the server supports it,
/// else plain JSON mode (the schema is then enforced by [`validate`] alone).
pub fn response_format(taxonomy: &Taxonomy, structured_output: bool) -> ResponseFormat<'_> {
    if !structured_output {
        return ResponseFormat::JsonObject;
    }
    ResponseFormat::JsonSchema {
        json_schema: NamedSchema {
            name: "ticket_triage",
            strict: true,
            schema: TriageSchema {
                kind: "object",
                additional_properties: false,
                required: ["category", "priority", "suggested_reply", "confidence"],
                properties: TriageProperties {
                    category: StringSchema {
                        kind: "string",
                        allowed: Some(&taxonomy.categories),
                    },
                    priority: StringSchema {
                        kind: "string",
                        allowed: Some(&taxonomy.priorities),
                    },
                    suggested_reply: StringSchema {
                        kind: "string",
                        allowed: None,
                    },
                    confidence: NumberSchema {
                        kind: "number",
                        minimum: 0,
                        maximum: 1,
                    },
                },
            },
        },
    }
}

/// OpenAI's `response_format`, borrowed from the task's taxonomy: it is serialized once per
/// request, so it is not built as a `serde_json::Value` first (that showed in the profile).
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[expect(
    clippy::large_enum_variant,
    reason = "lives on the stack for one request; boxing would add the allocation this avoids"
)]
pub enum ResponseFormat<'a> {
    JsonObject,
    JsonSchema { json_schema: NamedSchema<'a> },
}

#[derive(Debug, Serialize)]
pub struct NamedSchema<'a> {
    name: &'static str,
    strict: bool,
    schema: TriageSchema<'a>,
}

#[derive(Debug, Serialize)]
struct TriageSchema<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(rename = "additionalProperties")]
    additional_properties: bool,
    required: [&'static str; 4],
    properties: TriageProperties<'a>,
}

#[derive(Debug, Serialize)]
struct TriageProperties<'a> {
    category: StringSchema<'a>,
    priority: StringSchema<'a>,
    suggested_reply: StringSchema<'a>,
    confidence: NumberSchema,
}

#[derive(Debug, Serialize)]
struct StringSchema<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(rename = "enum", skip_serializing_if = "Option::is_none")]
    allowed: Option<&'a [String]>,
}

#[derive(Debug, Serialize)]
struct NumberSchema {
    #[serde(rename = "type")]
    kind: &'static str,
    minimum: u8,
    maximum: u8,
}

/// Checks the model's answer against the taxonomy.
pub fn validate(content: &str, taxonomy: &Taxonomy) -> Result<Triage, InvalidOutput> {
    let raw: RawTriage = serde_json::from_str(strip_code_fence(content))
        .map_err(|e| InvalidOutput::NotJson(e.to_string()))?;
    if !taxonomy.categories.is_empty() && !taxonomy.categories.contains(&raw.category) {
        return Err(InvalidOutput::UnknownCategory(raw.category));
    }
    if !taxonomy.priorities.is_empty() && !taxonomy.priorities.contains(&raw.priority) {
        return Err(InvalidOutput::UnknownPriority(raw.priority));
    }
    if raw.suggested_reply.trim().is_empty() {
        return Err(InvalidOutput::EmptyReply);
    }
    if !(0.0..=1.0).contains(&raw.confidence) {
        return Err(InvalidOutput::ConfidenceOutOfRange(raw.confidence));
    }
    Ok(Triage {
        category: raw.category,
        priority: raw.priority,
        suggested_reply: raw.suggested_reply,
        confidence: raw.confidence,
    })
}

/// Some models wrap JSON in a Markdown fence even in JSON mode.
fn strip_code_fence(content: &str) -> &str {
    let trimmed = content.trim();
    trimmed
        .strip_prefix("```json")
        .or_else(|| trimmed.strip_prefix("```"))
        .and_then(|rest| rest.strip_suffix("```"))
        .map(str::trim)
        .unwrap_or(trimmed)
}

/// The conversation for the one repair attempt: the original prompt, the invalid answer, and
/// what was wrong with it.
pub fn repair_messages(
    original: &[ChatMessage],
    invalid_answer: &str,
    problem: &InvalidOutput,
) -> Vec<ChatMessage> {
    let mut messages = original.to_vec();
    messages.push(ChatMessage {
        role: "assistant".into(),
        content: invalid_answer.to_owned(),
    });
    messages.push(ChatMessage {
        role: "user".into(),
        content: format!(
            "Your previous answer was not valid: {problem}. Answer again with only a JSON object \
             with the keys category, priority, suggested_reply and confidence, using only the \
             allowed values."
        ),
    });
    messages
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn taxonomy() -> Taxonomy {
        Taxonomy {
            categories: vec!["billing".into(), "other".into()],
            priorities: vec!["high".into(), "low".into()],
        }
    }

    #[test]
    fn valid_answers_pass_and_fences_are_tolerated() {
        let answer = r#"{"category":"billing","priority":"high","suggested_reply":"Sorry!","confidence":0.8}"#;
        assert_eq!(validate(answer, &taxonomy()).unwrap().category, "billing");
        assert!(validate(&format!("```json\n{answer}\n```"), &taxonomy()).is_ok());
    }

    #[test]
    fn invalid_answers_say_why() {
        let t = taxonomy();
        assert!(matches!(
            validate("not json", &t),
            Err(InvalidOutput::NotJson(_))
        ));
        assert_eq!(
            validate(
                r#"{"category":"x","priority":"high","suggested_reply":"a","confidence":0.5}"#,
                &t
            ),
            Err(InvalidOutput::UnknownCategory("x".into()))
        );
        assert_eq!(
            validate(
                r#"{"category":"other","priority":"p0","suggested_reply":"a","confidence":0.5}"#,
                &t
            ),
            Err(InvalidOutput::UnknownPriority("p0".into()))
        );
        assert_eq!(
            validate(
                r#"{"category":"other","priority":"low","suggested_reply":" ","confidence":0.5}"#,
                &t
            ),
            Err(InvalidOutput::EmptyReply)
        );
        assert_eq!(
            validate(
                r#"{"category":"other","priority":"low","suggested_reply":"a","confidence":7}"#,
                &t
            ),
            Err(InvalidOutput::ConfidenceOutOfRange(7.0))
        );
    }

    #[test]
    fn the_schema_lists_the_taxonomy() {
        let taxonomy = taxonomy();
        let format = serde_json::to_value(response_format(&taxonomy, true)).unwrap();
        assert_eq!(
            format,
            json!({
                "type": "json_schema",
                "json_schema": {
                    "name": "ticket_triage",
                    "strict": true,
                    "schema": {
                        "type": "object",
                        "additionalProperties": false,
                        "required": ["category", "priority", "suggested_reply", "confidence"],
                        "properties": {
                            "category": { "type": "string", "enum": taxonomy.categories },
                            "priority": { "type": "string", "enum": taxonomy.priorities },
                            "suggested_reply": { "type": "string" },
                            "confidence": { "type": "number", "minimum": 0, "maximum": 1 }
                        }
                    }
                }
            })
        );
        assert_eq!(
            serde_json::to_value(response_format(&taxonomy, false)).unwrap(),
            json!({ "type": "json_object" })
        );
    }
}
