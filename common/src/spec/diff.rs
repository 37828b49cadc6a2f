//! [`diff_specs`]: the leaf fields that differ between two versions of a spec.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::JobSpec;

/// One field that differs: its dotted path and its old and new values as JSON text (`None`
/// when the field is absent on that side).
///
/// Displays as `replicas: 3 -> 5` or `env.FOO: (none) -> "x"`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldChange {
    /// Dotted path such as `resources.memory`, `env.FOO` or `ports[0].port`.
    pub path: String,
    /// The old value as JSON, `None` if the field was absent.
    pub old: Option<String>,
    /// The new value as JSON, `None` if the field is absent now.
    pub new: Option<String>,
}

impl fmt::Display for FieldChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let side = |v: &Option<String>| v.clone().unwrap_or_else(|| "(none)".to_owned());
        write!(
            f,
            "{}: {} -> {}",
            self.path,
            side(&self.old),
            side(&self.new)
        )
    }
}

/// The leaf changes from `old` to `new`, compared on their canonical forms, ordered by path
/// (object keys sorted, array elements by index).
///
/// Objects are compared key by key (`env.FOO`, `resources.memory`); arrays of objects element by
/// element (`ports[0].port`); any other array is one value (`args`).
pub fn diff_specs(old: &JobSpec, new: &JobSpec) -> Vec<FieldChange> {
    let old = serde_json::to_value(old).unwrap_or(Value::Null);
    let new = serde_json::to_value(new).unwrap_or(Value::Null);
    let mut changes = Vec::new();
    walk(String::new(), Some(&old), Some(&new), &mut changes);
    changes
}

fn child(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

fn has_objects(v: Option<&Value>) -> bool {
    matches!(v, Some(Value::Array(items)) if items.iter().any(Value::is_object))
}

fn walk(path: String, old: Option<&Value>, new: Option<&Value>, out: &mut Vec<FieldChange>) {
    let old = old.filter(|v| !v.is_null());
    let new = new.filter(|v| !v.is_null());
    match (old, new) {
        (None, None) => {}
        (Some(Value::Object(_)) | None, Some(Value::Object(_)) | None) => {
            let empty = serde_json::Map::new();
            let a = old.and_then(Value::as_object).unwrap_or(&empty);
            let b = new.and_then(Value::as_object).unwrap_or(&empty);
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            for key in keys {
                walk(child(&path, key), a.get(key), b.get(key), out);
            }
        }
        (Some(Value::Array(_)) | None, Some(Value::Array(_)) | None)
            if has_objects(old) || has_objects(new) =>
        {
            let empty = Vec::new();
            let a = old.and_then(Value::as_array).unwrap_or(&empty);
            let b = new.and_then(Value::as_array).unwrap_or(&empty);
            for i in 0..a.len().max(b.len()) {
                walk(format!("{path}[{i}]"), a.get(i), b.get(i), out);
            }
        }
        _ if old == new => {}
        _ => out.push(FieldChange {
            path,
            old: old.map(Value::to_string),
            new: new.map(Value::to_string),
        }),
    }
}
