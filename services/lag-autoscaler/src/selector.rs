//! Kubernetes label selectors in their string form (`group=inference-worker,topic in (a,b)`),
//! as the HPA passes them to the External Metrics API in `labelSelector`.

use std::collections::{BTreeSet, HashMap};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid label selector {selector:?}: {reason}")]
pub struct SelectorError {
    selector: String,
    reason: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, BTreeSet<String>),
    NotIn(String, BTreeSet<String>),
    Exists(String),
    DoesNotExist(String),
}

/// A parsed selector; the empty selector matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selector(Vec<Requirement>);

impl Selector {
    pub fn parse(selector: &str) -> Result<Self, SelectorError> {
        let fail = |reason: &str| SelectorError {
            selector: selector.to_owned(),
            reason: reason.to_owned(),
        };
        let mut requirements = Vec::new();
        for clause in split_clauses(selector) {
            let clause = clause.trim();
            if clause.is_empty() {
                continue;
            }
            let requirement = if let Some((key, values)) = split_set(clause, " notin ") {
                Requirement::NotIn(key, values.ok_or_else(|| fail("bad value list"))?)
            } else if let Some((key, values)) = split_set(clause, " in ") {
                Requirement::In(key, values.ok_or_else(|| fail("bad value list"))?)
            } else if let Some((key, value)) = clause.split_once("!=") {
                Requirement::NotEquals(key.trim().to_owned(), value.trim().to_owned())
            } else if let Some((key, value)) = clause.split_once("==") {
                Requirement::Equals(key.trim().to_owned(), value.trim().to_owned())
            } else if let Some((key, value)) = clause.split_once('=') {
                Requirement::Equals(key.trim().to_owned(), value.trim().to_owned())
            } else if let Some(key) = clause.strip_prefix('!') {
                Requirement::DoesNotExist(key.trim().to_owned())
            } else {
                Requirement::Exists(clause.to_owned())
            };
            let key = match &requirement {
                Requirement::Equals(key, _)
                | Requirement::NotEquals(key, _)
                | Requirement::In(key, _)
                | Requirement::NotIn(key, _)
                | Requirement::Exists(key)
                | Requirement::DoesNotExist(key) => key,
            };
            if key.is_empty() || key.contains(char::is_whitespace) {
                return Err(fail(&format!("bad key in {clause:?}")));
            }
            requirements.push(requirement);
        }
        Ok(Selector(requirements))
    }

    pub fn matches(&self, labels: &HashMap<String, String>) -> bool {
        self.0.iter().all(|requirement| match requirement {
            Requirement::Equals(key, value) => labels.get(key) == Some(value),
            Requirement::NotEquals(key, value) => labels.get(key) != Some(value),
            Requirement::In(key, values) => labels.get(key).is_some_and(|v| values.contains(v)),
            Requirement::NotIn(key, values) => labels.get(key).is_none_or(|v| !values.contains(v)),
            Requirement::Exists(key) => labels.contains_key(key),
            Requirement::DoesNotExist(key) => !labels.contains_key(key),
        })
    }
}

/// Splits on the commas outside parentheses.
fn split_clauses(selector: &str) -> Vec<&str> {
    let mut clauses = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (index, character) in selector.char_indices() {
        match character {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                clauses.push(&selector[start..index]);
                start = index + 1;
            }
            _ => {}
        }
    }
    clauses.push(&selector[start..]);
    clauses
}

/// `key in (a, b)`: the key and, if well formed, the values.
fn split_set(clause: &str, operator: &str) -> Option<(String, Option<BTreeSet<String>>)> {
    let (key, rest) = clause.split_once(operator)?;
    let values = rest
        .trim()
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .map(|inner| {
            inner
                .split(',')
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
                .collect()
        });
    Some((key.trim().to_owned(), values))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(group: &str) -> HashMap<String, String> {
        HashMap::from([
            ("group".to_owned(), group.to_owned()),
            ("topic".to_owned(), "tasks".to_owned()),
        ])
    }

    fn matches(selector: &str, group: &str) -> bool {
        Selector::parse(selector).unwrap().matches(&labels(group))
    }

    #[test]
    fn equality_based_requirements() {
        assert!(matches("group=inference-worker", "inference-worker"));
        assert!(matches("group==inference-worker", "inference-worker"));
        assert!(!matches("group=inference-worker", "result-writer"));
        assert!(matches("group!=inference-worker", "result-writer"));
        assert!(matches("group=result-writer,topic=tasks", "result-writer"));
        assert!(!matches("group=result-writer,topic=other", "result-writer"));
    }

    #[test]
    fn set_based_requirements() {
        assert!(matches("group in (a, result-writer)", "result-writer"));
        assert!(!matches("group notin (a,result-writer)", "result-writer"));
        assert!(matches("group, !deployment", "x"));
        assert!(!matches("deployment", "x"));
        assert!(matches("group in (a,b),topic=tasks", "b"));
    }

    #[test]
    fn the_empty_selector_matches_everything() {
        assert!(matches("", "anything"));
    }

    #[test]
    fn malformed_selectors_are_refused() {
        assert!(Selector::parse("group in a,b").is_err());
        assert!(Selector::parse("=x").is_err());
    }
}
