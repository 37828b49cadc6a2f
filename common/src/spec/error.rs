//! [`SpecError`] and the translation of TOML, JSON and serde errors into it.

use serde::de::DeserializeOwned;
use serde_path_to_error::{Path, Segment};

/// Why a spec was rejected: the field (dotted path such as `resources.memory` or
/// `ports[1].port`, empty for a syntax error), the 1-based line when known, and what is wrong.
///
/// Displays as `replicas: expected a non-negative integer, found -1 (line 3)`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}{message}{}", field_prefix(field), line_suffix(*line))]
pub struct SpecError {
    /// Dotted path of the offending field; empty when the text could not be parsed at all.
    pub field: String,
    /// 1-based line in the spec text, when the spec came from text and the line is known.
    pub line: Option<usize>,
    /// What is wrong, lower-case, no trailing period.
    pub message: String,
}

fn field_prefix(field: &str) -> String {
    if field.is_empty() {
        String::new()
    } else {
        format!("{field}: ")
    }
}

fn line_suffix(line: Option<usize>) -> String {
    line.map(|l| format!(" (line {l})")).unwrap_or_default()
}

impl SpecError {
    /// An error about `field` with no line.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> SpecError {
        SpecError {
            field: field.into(),
            line: None,
            message: message.into(),
        }
    }

    /// The same error with `line` set, if it was not known yet.
    pub(crate) fn located(mut self, find: impl FnOnce(&str) -> Option<usize>) -> SpecError {
        if self.line.is_none() {
            self.line = find(&self.field);
        }
        self
    }
}

/// Deserializes TOML text, tracking the path of a failure.
pub(crate) fn from_toml<T: DeserializeOwned>(text: &str) -> Result<T, SpecError> {
    let line_of = |span: Option<std::ops::Range<usize>>| span.map(|s| line_at(text, s.start));
    let de = toml::Deserializer::parse(text).map_err(|e| SpecError {
        field: String::new(),
        line: line_of(e.span()),
        message: tidy_toml_message(e.message()),
    })?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let line =
            line_of(e.inner().span()).filter(|_| !missing_at_root(e.path(), e.inner().message()));
        let (field, message) = translate(e.path(), e.inner().message());
        SpecError {
            field,
            line,
            message,
        }
    })
}

/// Deserializes JSON text, tracking the path of a failure.
pub(crate) fn from_json<T: DeserializeOwned>(text: &str) -> Result<T, SpecError> {
    let mut de = serde_json::Deserializer::from_str(text);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().clone();
        json_error(Some(&path), e.into_inner())
    })?;
    de.end().map_err(|e| json_error(None, e))?;
    Ok(value)
}

fn json_error(path: Option<&Path>, err: serde_json::Error) -> SpecError {
    let mut line = (err.line() > 0).then_some(err.line());
    let mut message = err.to_string();
    // serde_json appends " at line L column C"; the line has its own field.
    if let Some(at) = message.rfind(" at line ") {
        message.truncate(at);
    }
    let (field, message) = match path {
        Some(path) if !err.is_syntax() && !err.is_eof() => {
            if missing_at_root(path, &message) {
                line = None;
            }
            translate(path, &message)
        }
        _ => (String::new(), message),
    };
    SpecError {
        field,
        line,
        message,
    }
}

/// A missing top-level field: the parser points at the whole document, which is no help.
fn missing_at_root(path: &Path, message: &str) -> bool {
    path.iter().next().is_none() && message.starts_with("missing field")
}

/// The 1-based line holding byte `offset` of `text`.
pub(crate) fn line_at(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

fn tidy_toml_message(message: &str) -> String {
    message.trim().trim_end_matches('.').to_owned()
}

/// Renders a serde_path_to_error path as `a.b[2].c`.
fn render_path(path: &Path) -> String {
    let mut out = String::new();
    for segment in path.iter() {
        match segment {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } | Segment::Enum { variant: key } => join_key(&mut out, key),
            Segment::Unknown => {}
        }
    }
    out
}

fn join_key(path: &mut String, key: &str) {
    if !path.is_empty() {
        path.push('.');
    }
    path.push_str(key);
}

/// Turns a serde message at `path` into the field it is about and a message in house style:
/// `unknown field `cpus`, expected one of `cpu`, `memory`` at `resources` becomes
/// `resources.cpus` + `unknown field (expected one of cpu, memory)`.
fn translate(path: &Path, message: &str) -> (String, String) {
    let mut field = render_path(path);
    let message = tidy_toml_message(message);
    for (prefix, text) in [
        ("unknown field `", "unknown field"),
        ("missing field `", "missing required field"),
        ("duplicate field `", "given twice"),
    ] {
        if let Some(rest) = message.strip_prefix(prefix)
            && let Some((name, tail)) = rest.split_once('`')
        {
            // The path ends at the field for an unknown or duplicate field (its key was read),
            // at the enclosing table for a missing one.
            let last = path.iter().next_back();
            if !matches!(last, Some(Segment::Map { key }) if key == name) {
                join_key(&mut field, name);
            }
            let message = match tail.strip_prefix(", expected ") {
                Some(expected) => format!("{text} (expected {})", expected.replace('`', "")),
                None if tail.contains("there are no fields") => {
                    format!("{text} (this table takes no fields)")
                }
                None => text.to_owned(),
            };
            return (field, message);
        }
    }
    if let Some(rest) = message.strip_prefix("unknown variant `")
        && let Some((name, tail)) = rest.split_once('`')
    {
        let expected = tail
            .strip_prefix(", expected ")
            .map(|e| format!(" (expected {})", e.replace('`', "")))
            .unwrap_or_default();
        return (field, format!("unknown value {name:?}{expected}"));
    }
    for prefix in ["invalid type: ", "invalid value: "] {
        if let Some(rest) = message.strip_prefix(prefix)
            && let Some((found, expected)) = rest.rsplit_once(", expected ")
        {
            return (
                field,
                format!("expected {expected}, found {}", found.replace('`', "")),
            );
        }
    }
    (field, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_with_and_without_field_and_line() {
        let e = SpecError {
            field: "replicas".into(),
            line: Some(3),
            message: "expected a non-negative integer".into(),
        };
        assert_eq!(
            e.to_string(),
            "replicas: expected a non-negative integer (line 3)"
        );
        assert_eq!(SpecError::new("", "bad").to_string(), "bad");
    }

    #[test]
    fn line_at_counts_newlines() {
        assert_eq!(line_at("a\nb\nc", 0), 1);
        assert_eq!(line_at("a\nb\nc", 2), 2);
        assert_eq!(line_at("a\nb\nc", 99), 3);
    }
}
