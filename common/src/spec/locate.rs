//! Finds the line of a field, given its dotted path, in the text a spec was parsed from; used
//! to give validation errors a line. When the field itself is not in the text (a default), the
//! line of the nearest enclosing field that is.

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::SpecFormat;
use super::error::line_at;

/// One step of a field path: `ports[1].port` is `Key("ports"), Index(1), Key("port")`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Seg<'a> {
    Key(&'a str),
    Index(usize),
}

fn segments(path: &str) -> Vec<Seg<'_>> {
    let mut out = Vec::new();
    for part in path.split('.') {
        let (key, mut rest) = part.split_at(part.find('[').unwrap_or(part.len()));
        if !key.is_empty() {
            out.push(Seg::Key(key));
        }
        while let Some(inner) = rest.strip_prefix('[') {
            let Some((index, after)) = inner.split_once(']') else {
                break;
            };
            match index.parse() {
                Ok(i) => out.push(Seg::Index(i)),
                Err(_) => break,
            }
            rest = after;
        }
    }
    out
}

/// The 1-based line of the field at `path` in `text`, or of its nearest enclosing field.
pub(crate) fn line_of(text: &str, format: SpecFormat, path: &str) -> Option<usize> {
    let segs = segments(path);
    if segs.is_empty() {
        return None;
    }
    let offset = match format.detect(text) {
        SpecFormat::Json => json_offset(text, &segs),
        _ => toml_offset(text, &segs),
    };
    offset.map(|o| line_at(text, o))
}

fn toml_offset(text: &str, segs: &[Seg<'_>]) -> Option<usize> {
    let root = DeTable::parse(text).ok()?;
    let mut table: Option<&DeTable<'_>> = Some(root.get_ref());
    let mut value: Option<&Spanned<DeValue<'_>>> = None;
    let mut best = None;
    for seg in segs {
        let next = match *seg {
            Seg::Key(k) => table
                .and_then(|t| t.iter().find(|(key, _)| key.get_ref().as_ref() == k))
                .map(|(key, v)| (key.span().start, v)),
            Seg::Index(i) => value
                .and_then(|v| v.get_ref().as_array())
                .and_then(|a| a.get(i))
                .map(|v| (v.span().start, v)),
        };
        let Some((start, v)) = next else { break };
        best = Some(start);
        value = Some(v);
        table = v.get_ref().as_table();
    }
    best
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while b.get(i).is_some_and(u8::is_ascii_whitespace) {
        i += 1;
    }
    i
}

/// `b[i]` is `"`; the index after the closing quote.
fn skip_string(b: &[u8], i: usize) -> Option<usize> {
    let mut j = i + 1;
    loop {
        match b.get(j)? {
            b'\\' => j += 2,
            b'"' => return Some(j + 1),
            _ => j += 1,
        }
    }
}

/// The index after the JSON value starting at `b[i]`.
fn skip_value(b: &[u8], i: usize) -> Option<usize> {
    match b.get(i)? {
        b'"' => skip_string(b, i),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = i;
            loop {
                match b.get(j)? {
                    b'"' => {
                        j = skip_string(b, j)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
        }
        _ => {
            let mut j = i;
            while b
                .get(j)
                .is_some_and(|c| !matches!(c, b',' | b'}' | b']') && !c.is_ascii_whitespace())
            {
                j += 1;
            }
            Some(j)
        }
    }
}

/// Within valid JSON `text`, the offset of the member key or array element at `segs`, or of the
/// deepest one found.
fn json_offset(text: &str, segs: &[Seg<'_>]) -> Option<usize> {
    let b = text.as_bytes();
    let mut best = None;
    let mut i = skip_ws(b, 0);
    for seg in segs {
        match json_step(text, i, *seg) {
            Some((at, value_start)) => {
                best = Some(at);
                i = value_start;
            }
            None => break,
        }
    }
    best
}

/// From the value at `i`, one step along `seg`: where the member or element is written, and
/// where its value starts.
fn json_step(text: &str, mut i: usize, seg: Seg<'_>) -> Option<(usize, usize)> {
    let b = text.as_bytes();
    match seg {
        Seg::Key(want) => {
            if b.get(i) != Some(&b'{') {
                return None;
            }
            i += 1;
            loop {
                i = skip_ws(b, i);
                if b.get(i) != Some(&b'"') {
                    return None;
                }
                let key_start = i;
                let key_end = skip_string(b, i)?;
                let key: String = serde_json::from_str(text.get(key_start..key_end)?).ok()?;
                i = skip_ws(b, key_end);
                if b.get(i) != Some(&b':') {
                    return None;
                }
                i = skip_ws(b, i + 1);
                if key == want {
                    return Some((key_start, i));
                }
                i = skip_ws(b, skip_value(b, i)?);
                if b.get(i) == Some(&b',') {
                    i += 1;
                }
            }
        }
        Seg::Index(n) => {
            if b.get(i) != Some(&b'[') {
                return None;
            }
            i += 1;
            for _ in 0..n {
                i = skip_ws(b, i);
                if b.get(i) == Some(&b']') {
                    return None;
                }
                i = skip_ws(b, skip_value(b, i)?);
                if b.get(i) == Some(&b',') {
                    i += 1;
                }
            }
            i = skip_ws(b, i);
            if matches!(b.get(i), None | Some(b']')) {
                return None;
            }
            Some((i, i))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_paths() {
        assert_eq!(
            segments("ports[1].port"),
            vec![Seg::Key("ports"), Seg::Index(1), Seg::Key("port")]
        );
        assert_eq!(
            segments("a[0][2]"),
            vec![Seg::Key("a"), Seg::Index(0), Seg::Index(2)]
        );
        assert!(segments("").is_empty());
    }

    const TOML: &str = r#"name = "web"
image = "x"

[[ports]]
name = "http"
port = 80

[[ports]]
name = "dns"
port = 53

[service]
port = "http"
check = { http = "/", timeout = "1s" }
"#;

    #[test]
    fn finds_toml_lines() {
        let line = |p| line_of(TOML, SpecFormat::Toml, p);
        assert_eq!(line("image"), Some(2));
        assert_eq!(line("ports[1].port"), Some(10));
        assert_eq!(line("ports[0]"), Some(4));
        assert_eq!(line("service.port"), Some(13));
        assert_eq!(line("service.check.timeout"), Some(14));
        // Not written: the nearest enclosing field.
        assert_eq!(line("service.check.interval"), Some(14));
        assert_eq!(line("update.max_surge"), None);
        assert_eq!(line(""), None);
    }

    const JSON: &str = r#"{
  "name": "web",
  "args": ["a", "b\"]", {"x": [1, 2]}],
  "ports": [
    {"name": "http", "port": 80},
    {
      "name": "dns",
      "port": 53
    }
  ],
  "env": {"A.B": "1", "C": "2"}
}"#;

    #[test]
    fn finds_json_lines() {
        let line = |p| line_of(JSON, SpecFormat::Json, p);
        assert_eq!(line("name"), Some(2));
        assert_eq!(line("ports[1].port"), Some(8));
        assert_eq!(line("ports[0].port"), Some(5));
        assert_eq!(line("ports[2].port"), Some(4));
        assert_eq!(line("env.C"), Some(11));
        assert_eq!(line("missing"), None);
    }
}
