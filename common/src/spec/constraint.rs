//! Placement [`Constraint`]s on node labels: `zone = a`, `zone != b`, `disk in (ssd, nvme)`,
//! `zone not in (a, b)`.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// One rule on a node's labels, written as a string such as `"zone != b"` and serialized back
/// in that form (one space around the operator, `, ` between listed values).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Constraint {
    /// The label key, `[A-Za-z0-9._/-]+`.
    pub key: String,
    /// How the label's value is compared.
    pub op: ConstraintOp,
    /// One value for `=` and `!=`, one or more for `in` and `not in`.
    pub values: Vec<String>,
}

/// The comparison of a [`Constraint`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConstraintOp {
    /// `key = value`: the label is present and equal.
    Eq,
    /// `key != value`: the label is absent or different.
    NotEq,
    /// `key in (a, b)`: the label is present and one of the values.
    In,
    /// `key not in (a, b)`: the label is absent or none of the values.
    NotIn,
}

impl ConstraintOp {
    /// The operator as written in a spec.
    pub fn as_str(self) -> &'static str {
        match self {
            ConstraintOp::Eq => "=",
            ConstraintOp::NotEq => "!=",
            ConstraintOp::In => "in",
            ConstraintOp::NotIn => "not in",
        }
    }

    fn takes_list(self) -> bool {
        matches!(self, ConstraintOp::In | ConstraintOp::NotIn)
    }
}

impl fmt::Display for ConstraintOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Constraint {
    /// Whether a node with these labels satisfies the constraint. A missing label fails `=` and
    /// `in`, and passes `!=` and `not in`.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let value = labels.get(&self.key);
        let listed = value.is_some_and(|v| self.values.iter().any(|want| want == v));
        match self.op {
            ConstraintOp::Eq | ConstraintOp::In => listed,
            ConstraintOp::NotEq | ConstraintOp::NotIn => !listed,
        }
    }

    /// Checks the parts of a constraint built in code; what [`FromStr`] guarantees.
    pub(crate) fn check(&self) -> Result<(), String> {
        if !is_label_token(&self.key) {
            return Err(format!(
                "{:?} is not a valid label key (use letters, digits and . _ / -)",
                self.key
            ));
        }
        match (self.op.takes_list(), self.values.len()) {
            (_, 0) => return Err(format!("{} needs a value", self.op)),
            (false, n) if n > 1 => {
                return Err(format!(
                    "{} takes one value, not {n} (use in (...) for several)",
                    self.op
                ));
            }
            _ => {}
        }
        if let Some(bad) = self.values.iter().find(|v| !is_label_token(v)) {
            return Err(format!(
                "{bad:?} is not a valid label value (use letters, digits and . _ / -)"
            ));
        }
        Ok(())
    }
}

fn is_label_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '/' | '-')
}

fn is_label_token(s: &str) -> bool {
    !s.is_empty() && s.chars().all(is_label_char)
}

/// `rest` starts with the word `word`, followed by the end, whitespace or `(`.
fn strip_word<'a>(rest: &'a str, word: &str) -> Option<&'a str> {
    let after = rest.strip_prefix(word)?;
    match after.chars().next() {
        None => Some(after),
        Some(c) if c.is_whitespace() || c == '(' => Some(after),
        Some(_) => None,
    }
}

impl fmt::Display for Constraint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.op.takes_list() {
            write!(f, "{} {} ({})", self.key, self.op, self.values.join(", "))
        } else {
            write!(f, "{} {} {}", self.key, self.op, self.values.join(", "))
        }
    }
}

/// Why a string is not a [`Constraint`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{text:?} is not a valid constraint: {reason}")]
pub struct ConstraintError {
    /// The string as written.
    pub text: String,
    /// What is wrong with it.
    pub reason: String,
}

impl FromStr for Constraint {
    type Err = ConstraintError;

    fn from_str(s: &str) -> Result<Constraint, ConstraintError> {
        let fail = |reason: String| ConstraintError {
            text: s.to_owned(),
            reason,
        };
        let t = s.trim();
        let key_end = t.find(|c: char| !is_label_char(c)).unwrap_or(t.len());
        let (key, rest) = t.split_at(key_end);
        if key.is_empty() {
            return Err(fail(
                "expected a label key (letters, digits and . _ / -) at the start".to_owned(),
            ));
        }
        let rest = rest.trim_start();
        let (op, operand) = if let Some(r) = rest.strip_prefix("!=") {
            (ConstraintOp::NotEq, r)
        } else if rest.starts_with("==") {
            return Err(fail("use = to compare, not ==".to_owned()));
        } else if let Some(r) = rest.strip_prefix('=') {
            (ConstraintOp::Eq, r)
        } else if let Some(r) = strip_word(rest, "in") {
            (ConstraintOp::In, r)
        } else if let Some(r) = strip_word(rest, "not") {
            match strip_word(r.trim_start(), "in") {
                Some(r) => (ConstraintOp::NotIn, r),
                None => return Err(fail("expected \"in\" after \"not\"".to_owned())),
            }
        } else if rest.is_empty() {
            return Err(fail(format!(
                "expected an operator (=, !=, in, not in) after {key:?}"
            )));
        } else {
            return Err(fail(format!(
                "expected an operator (=, !=, in, not in) after {key:?}, found {rest:?}"
            )));
        };
        let operand = operand.trim();
        let values: Vec<String> = if op.takes_list() {
            let inner = operand
                .strip_prefix('(')
                .and_then(|o| o.strip_suffix(')'))
                .ok_or_else(|| {
                    fail(format!(
                        "expected a list in parentheses after {op}, such as (a, b)"
                    ))
                })?;
            if inner.trim().is_empty() {
                return Err(fail(format!("the list after {op} is empty")));
            }
            inner.split(',').map(|v| v.trim().to_owned()).collect()
        } else {
            if operand.is_empty() {
                return Err(fail(format!("expected a value after {op}")));
            }
            vec![operand.to_owned()]
        };
        if values.iter().any(String::is_empty) {
            return Err(fail(format!("empty value in the list after {op}")));
        }
        let constraint = Constraint {
            key: key.to_owned(),
            op,
            values,
        };
        constraint.check().map_err(fail)?;
        Ok(constraint)
    }
}

impl Serialize for Constraint {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Constraint {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Constraint, D::Error> {
        d.deserialize_str(ConstraintVisitor)
    }
}

struct ConstraintVisitor;

impl Visitor<'_> for ConstraintVisitor {
    type Value = Constraint;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a constraint such as \"zone != b\" or \"disk in (ssd, nvme)\"")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Constraint, E> {
        v.parse().map_err(E::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> Constraint {
        s.parse().unwrap()
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn parses_every_operator_and_prints_it_back() {
        for (text, canonical, op, values) in [
            ("zone = a", "zone = a", ConstraintOp::Eq, vec!["a"]),
            ("zone!=b", "zone != b", ConstraintOp::NotEq, vec!["b"]),
            (
                " disk in (ssd,nvme) ",
                "disk in (ssd, nvme)",
                ConstraintOp::In,
                vec!["ssd", "nvme"],
            ),
            (
                "zone not  in(a, b)",
                "zone not in (a, b)",
                ConstraintOp::NotIn,
                vec!["a", "b"],
            ),
            (
                "topology.kubernetes.io/zone = eu-1a",
                "topology.kubernetes.io/zone = eu-1a",
                ConstraintOp::Eq,
                vec!["eu-1a"],
            ),
        ] {
            let parsed = c(text);
            assert_eq!(parsed.op, op, "{text}");
            assert_eq!(parsed.values, values, "{text}");
            assert_eq!(parsed.to_string(), canonical);
            assert_eq!(c(canonical), parsed);
        }
        assert_eq!(c("in in (a)").key, "in");
    }

    #[test]
    fn rejects_malformed_constraints_saying_why() {
        for (text, reason) in [
            ("", "expected a label key"),
            ("= a", "expected a label key"),
            (
                "zone",
                "expected an operator (=, !=, in, not in) after \"zone\"",
            ),
            (
                "zone ~ a",
                "expected an operator (=, !=, in, not in) after \"zone\", found \"~ a\"",
            ),
            ("zone == a", "use = to compare, not =="),
            ("zone =", "expected a value after ="),
            ("zone = a b", "\"a b\" is not a valid label value"),
            ("zone in a, b", "expected a list in parentheses after in"),
            ("zone in ()", "the list after in is empty"),
            ("zone in (a,,b)", "empty value in the list after in"),
            ("zone not (a)", "expected \"in\" after \"not\""),
            ("zone inside (a)", "expected an operator"),
        ] {
            let err = text.parse::<Constraint>().unwrap_err();
            assert!(err.reason.starts_with(reason), "{text}: {}", err.reason);
        }
    }

    #[test]
    fn missing_labels_fail_positive_and_pass_negative_ops() {
        let node = labels(&[("zone", "a"), ("disk", "ssd")]);
        let bare = labels(&[]);
        for (text, on_node, on_bare) in [
            ("zone = a", true, false),
            ("zone = b", false, false),
            ("zone != b", true, true),
            ("zone != a", false, true),
            ("disk in (ssd, nvme)", true, false),
            ("disk in (hdd)", false, false),
            ("zone not in (a, b)", false, true),
            ("zone not in (c)", true, true),
        ] {
            assert_eq!(c(text).matches(&node), on_node, "{text} on node");
            assert_eq!(c(text).matches(&bare), on_bare, "{text} on bare");
        }
    }

    #[test]
    fn check_catches_constraints_built_in_code() {
        let mut bad = c("zone = a");
        bad.values.push("b".into());
        assert!(bad.check().unwrap_err().contains("takes one value"));
        bad.values.clear();
        assert!(bad.check().unwrap_err().contains("needs a value"));
        let mut key = c("zone in (a)");
        key.key = "zo ne".into();
        assert!(key.check().unwrap_err().contains("not a valid label key"));
    }
}
