//! Prometheus' text exposition format, the parts Skiff writes by hand.

/// A label value escaped for the text format (backslash, double quote and newline).
pub fn label_value(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    #[test]
    fn label_values_are_escaped() {
        assert_eq!(super::label_value("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        assert_eq!(super::label_value("web-1"), "web-1");
    }
}
