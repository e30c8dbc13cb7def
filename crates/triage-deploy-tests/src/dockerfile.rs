//! The repository's Dockerfile, read into its stages and instructions, so that tests can compare
//! it with the chart (ports, user, entrypoints) without a container engine.
//!
//! Only what this Dockerfile uses is understood: `#` comments, `\` continuations, `ARG` defaults
//! before the first `FROM` (global) and `FROM image AS name`. Instructions keep their arguments as
//! written; `${NAME}` is expanded only in `FROM` lines, as the builders do.

use std::collections::BTreeMap;

/// One instruction: its keyword in upper case and the rest of the line, continuations joined.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instruction {
    pub keyword: String,
    pub args: String,
}

/// One `FROM` and what follows it up to the next.
#[derive(Clone, Debug)]
pub struct Stage {
    /// The `AS` name, if any.
    pub name: Option<String>,
    /// The base after expanding global `ARG`s: an image, or an earlier stage's name.
    pub from: String,
    pub instructions: Vec<Instruction>,
}

#[derive(Clone, Debug)]
pub struct Dockerfile {
    /// Global `ARG`s (before the first `FROM`) and their defaults.
    pub global_args: BTreeMap<String, String>,
    pub stages: Vec<Stage>,
}

impl Dockerfile {
    pub fn parse(text: &str) -> Result<Dockerfile, String> {
        let mut global_args = BTreeMap::new();
        let mut stages: Vec<Stage> = Vec::new();
        for line in logical_lines(text) {
            let (keyword, args) = line
                .split_once(char::is_whitespace)
                .map(|(keyword, args)| (keyword.to_ascii_uppercase(), args.trim().to_owned()))
                .unwrap_or_else(|| (line.to_ascii_uppercase(), String::new()));
            if keyword == "FROM" {
                let words: Vec<&str> = args.split_whitespace().collect();
                let (from, name) = match words.as_slice() {
                    [from] => (*from, None),
                    [from, as_word, name] if as_word.eq_ignore_ascii_case("as") => {
                        (*from, Some((*name).to_owned()))
                    }
                    _ => return Err(format!("FROM {args}: not `FROM image [AS name]`")),
                };
                stages.push(Stage {
                    name,
                    from: expand(from, &global_args),
                    instructions: Vec::new(),
                });
                continue;
            }
            match stages.last_mut() {
                Some(stage) => stage.instructions.push(Instruction { keyword, args }),
                None if keyword == "ARG" => {
                    let (name, default) = args.split_once('=').unwrap_or((args.as_str(), ""));
                    global_args.insert(name.to_owned(), unquote(default).to_owned());
                }
                None => return Err(format!("{keyword} before the first FROM")),
            }
        }
        Ok(Dockerfile {
            global_args,
            stages,
        })
    }

    /// The repository's Dockerfile.
    pub fn of_repository() -> Dockerfile {
        let path = crate::repo_root().join("Dockerfile");
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        Dockerfile::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    pub fn stage(&self, name: &str) -> Option<&Stage> {
        self.stages
            .iter()
            .find(|stage| stage.name.as_deref() == Some(name))
    }

    /// The stage built when no `--target` is given.
    pub fn default_target(&self) -> Option<&Stage> {
        self.stages.last()
    }

    /// `name`'s instructions with those of the stages it is built `FROM`, base first: what a
    /// target inherits (USER, WORKDIR, EXPOSE, LABEL, ...).
    pub fn effective_instructions(&self, name: &str) -> Vec<&Instruction> {
        let mut chain = Vec::new();
        let mut current = self.stage(name);
        while let Some(stage) = current {
            chain.push(stage);
            current = self.stage(&stage.from);
        }
        chain
            .iter()
            .rev()
            .flat_map(|stage| stage.instructions.iter())
            .collect()
    }

    /// The last value `keyword` has in `name`'s effective instructions (USER, WORKDIR, ...).
    pub fn last(&self, name: &str, keyword: &str) -> Option<String> {
        self.effective_instructions(name)
            .into_iter()
            .rev()
            .find(|instruction| instruction.keyword == keyword)
            .map(|instruction| instruction.args.clone())
    }

    /// Every port `EXPOSE`d by `name` and its bases.
    pub fn exposed_ports(&self, name: &str) -> Vec<u16> {
        self.effective_instructions(name)
            .into_iter()
            .filter(|instruction| instruction.keyword == "EXPOSE")
            .flat_map(|instruction| instruction.args.split_whitespace())
            .filter_map(|port| port.split('/').next()?.parse().ok())
            .collect()
    }

    /// A stage's `ENTRYPOINT` in exec form, e.g. `["/usr/local/bin/llm-sim"]`.
    pub fn entrypoint(&self, name: &str) -> Option<Vec<String>> {
        serde_json::from_str(&self.last(name, "ENTRYPOINT")?).ok()
    }

    /// Whether any stage has the instruction (e.g. `HEALTHCHECK`).
    pub fn has_instruction(&self, keyword: &str) -> bool {
        self.stages
            .iter()
            .flat_map(|stage| &stage.instructions)
            .any(|instruction| instruction.keyword == keyword)
    }

    /// The binaries the image holds: the global `ARG BINARIES` list.
    pub fn binaries(&self) -> Vec<String> {
        self.global_args
            .get("BINARIES")
            .map(|list| list.split_whitespace().map(str::to_owned).collect())
            .unwrap_or_default()
    }
}

/// The file's instructions one per line: comments and blank lines dropped, continuations joined.
fn logical_lines(text: &str) -> Vec<String> {
    let mut lines = Vec::new();
    let mut current = String::new();
    for raw in text.lines() {
        let trimmed = raw.trim();
        // Docker drops comment and blank lines even inside a continued instruction.
        if trimmed.starts_with('#') || trimmed.is_empty() {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(head) => {
                current.push_str(head.trim_end());
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                lines.push(std::mem::take(&mut current).trim().to_owned());
            }
        }
    }
    if !current.trim().is_empty() {
        lines.push(current.trim().to_owned());
    }
    lines
}

fn unquote(value: &str) -> &str {
    value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(value)
}

/// `${NAME}` and `$NAME` replaced by the global ARG's default.
fn expand(word: &str, args: &BTreeMap<String, String>) -> String {
    let mut expanded = word.to_owned();
    for (name, value) in args {
        expanded = expanded
            .replace(&format!("${{{name}}}"), value)
            .replace(&format!("${name}"), value);
    }
    expanded
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"# syntax=docker/dockerfile:1
ARG BASE=debian:bookworm-slim
ARG FROM_STAGE=built
ARG LIST="a b"

FROM ${BASE} AS built
RUN echo one \
    # a comment inside a continued RUN is not part of it
    && echo two
FROM ${FROM_STAGE} AS picked
FROM ${BASE} AS runtime
COPY --from=picked /out/ /usr/local/bin/
USER 65532:65532
EXPOSE 9090 8080/tcp
FROM runtime AS app
ENTRYPOINT ["/usr/local/bin/app"]
"#;

    #[test]
    fn stages_args_and_inherited_instructions() {
        let dockerfile = Dockerfile::parse(SAMPLE).unwrap();
        assert_eq!(dockerfile.global_args["LIST"], "a b");
        assert_eq!(dockerfile.binaries(), Vec::<String>::new());
        assert_eq!(dockerfile.stages.len(), 4);
        assert_eq!(
            dockerfile.stage("built").unwrap().from,
            "debian:bookworm-slim"
        );
        assert_eq!(dockerfile.stage("picked").unwrap().from, "built");
        let run = &dockerfile.stage("built").unwrap().instructions[0];
        assert_eq!(run.args, "echo one && echo two");
        assert_eq!(
            dockerfile.default_target().unwrap().name.as_deref(),
            Some("app")
        );
        assert_eq!(
            dockerfile.last("app", "USER").as_deref(),
            Some("65532:65532")
        );
        assert_eq!(dockerfile.exposed_ports("app"), vec![9090, 8080]);
        assert_eq!(
            dockerfile.entrypoint("app"),
            Some(vec!["/usr/local/bin/app".to_owned()])
        );
        assert_eq!(dockerfile.entrypoint("runtime"), None);
        assert!(!dockerfile.has_instruction("HEALTHCHECK"));
    }

    #[test]
    fn instructions_before_from_other_than_arg_are_refused() {
        assert!(Dockerfile::parse("USER 1\nFROM x\n").is_err());
        assert!(Dockerfile::parse("FROM x AS\n").is_err());
    }
}
