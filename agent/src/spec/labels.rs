//! Labels and annotations of a service, checked by Kubernetes' rules, and label selectors.
//!
//! A key is `[prefix/]name`: `name` 1 to 63 characters of `[A-Za-z0-9._-]`, beginning and
//! ending with an alphanumeric; `prefix` a DNS subdomain (lower case, dot-separated labels of
//! `[a-z0-9-]`, each beginning and ending with an alphanumeric, 253 characters at most). A
//! label value is empty or 1 to 63 characters like a name; an annotation value is any text, all
//! of a service's annotations together at most [`MAX_ANNOTATIONS_BYTES`].
//!
//! A selector is requirements separated by commas, all of which must hold:
//!
//! | requirement | holds when |
//! | --- | --- |
//! | `key=value`, `key==value` | the label is there with that value |
//! | `key!=value` | the label is absent or has another value |
//! | `key in (a,b)` | the label is there with one of the values |
//! | `key notin (a,b)` | the label is absent or has none of the values |
//! | `key` | the label is there |
//! | `!key` | the label is absent |
//!
//! Spaces around keys, operators and values are ignored; the empty selector selects
//! everything.

use std::collections::BTreeMap;

use super::error::{FieldError, child, quote};

/// The most bytes of keys and values of one service's annotations together.
pub const MAX_ANNOTATIONS_BYTES: usize = 256 * 1024;
/// The most labels one service may have.
pub const MAX_LABELS: usize = 64;
/// The longest selector text accepted.
pub const MAX_SELECTOR: usize = 4096;

/// `[A-Za-z0-9._-]{1,63}`, beginning and ending with an alphanumeric.
fn valid_name(s: &str) -> bool {
    let b = s.as_bytes();
    (1..=63).contains(&b.len())
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
}

/// A DNS subdomain: at most 253 characters, dot-separated labels of `[a-z0-9-]` each
/// beginning and ending with an alphanumeric.
fn valid_prefix(s: &str) -> bool {
    (1..=253).contains(&s.len())
        && s.split('.').all(|label| {
            let b = label.as_bytes();
            !b.is_empty()
                && b.len() <= 63
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
                && b.iter()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        })
}

/// Why `key` is not a valid label or annotation key, if it is not.
pub fn key_error(key: &str) -> Option<String> {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix
        && !valid_prefix(p)
    {
        return Some(format!(
            "{}: the prefix {} is not a DNS subdomain (lower case letters, digits, '-' and '.', at most 253)",
            quote(key),
            quote(p)
        ));
    }
    if !valid_name(name) {
        return Some(format!(
            "{} is not a valid key ([prefix/]name: a name of 1 to 63 of A-Z, a-z, 0-9, '-', '_' and '.', beginning and ending with a letter or digit)",
            quote(key)
        ));
    }
    None
}

/// Why `value` is not a valid label value, if it is not.
pub fn value_error(value: &str) -> Option<String> {
    (!value.is_empty() && !valid_name(value)).then(|| {
        format!(
            "{} is not a valid label value (empty, or 1 to 63 of A-Z, a-z, 0-9, '-', '_' and '.', beginning and ending with a letter or digit)",
            quote(value)
        )
    })
}

/// Every problem with a spec's `labels`.
pub fn check_labels(labels: &BTreeMap<String, String>) -> Vec<FieldError> {
    let mut errors = Vec::new();
    if labels.len() > MAX_LABELS {
        errors.push(FieldError::new(
            "labels",
            format!("has {} entries (at most {MAX_LABELS})", labels.len()),
        ));
    }
    for (key, value) in labels {
        let field = child("labels", key);
        if let Some(why) = key_error(key) {
            errors.push(FieldError::new(&field, why));
        } else if let Some(why) = value_error(value) {
            errors.push(FieldError::new(&field, why));
        }
    }
    errors
}

/// Every problem with a spec's `annotations`.
pub fn check_annotations(annotations: &BTreeMap<String, String>) -> Vec<FieldError> {
    let mut errors: Vec<FieldError> = annotations
        .keys()
        .filter_map(|key| Some(FieldError::new(child("annotations", key), key_error(key)?)))
        .collect();
    let size: usize = annotations.iter().map(|(k, v)| k.len() + v.len()).sum();
    if size > MAX_ANNOTATIONS_BYTES {
        errors.push(FieldError::new(
            "annotations",
            format!("hold {size} bytes (at most {MAX_ANNOTATIONS_BYTES} together)"),
        ));
    }
    errors
}

/// One requirement of a selector.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    Absent(String),
}

/// A parsed label selector; see the module documentation for the grammar.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector(Vec<Requirement>);

impl Selector {
    /// Whether `labels` satisfy every requirement.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|r| match r {
            Requirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::Absent(k) => !labels.contains_key(k),
        })
    }

    /// The selector that selects everything.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Parses `text`; the error says which requirement is wrong and why.
    pub fn parse(text: &str) -> Result<Selector, String> {
        if text.len() > MAX_SELECTOR {
            return Err(format!(
                "is {} bytes long (at most {MAX_SELECTOR})",
                text.len()
            ));
        }
        let mut out = Vec::new();
        for part in split_top(text)? {
            let part = part.trim();
            if part.is_empty() {
                if text.trim().is_empty() {
                    continue;
                }
                return Err(format!("{}: an empty requirement", quote(text)));
            }
            out.push(requirement(part)?);
        }
        Ok(Selector(out))
    }
}

/// `text` split at the commas outside parentheses.
fn split_top(text: &str) -> Result<Vec<&str>, String> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, c) in text.char_indices() {
        match c {
            '(' if depth == 0 => depth = 1,
            '(' => return Err(format!("{}: nested parentheses", quote(text))),
            ')' if depth == 1 => depth = 0,
            ')' => return Err(format!("{}: ')' without '('", quote(text))),
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err(format!("{}: '(' is not closed", quote(text)));
    }
    parts.push(&text[start..]);
    Ok(parts)
}

fn key(k: &str, part: &str) -> Result<String, String> {
    let k = k.trim();
    match key_error(k) {
        None => Ok(k.to_string()),
        Some(why) => Err(format!("{}: {why}", quote(part))),
    }
}

fn value(v: &str, part: &str) -> Result<String, String> {
    let v = v.trim();
    match value_error(v) {
        None => Ok(v.to_string()),
        Some(why) => Err(format!("{}: {why}", quote(part))),
    }
}

/// One requirement: `k=v`, `k==v`, `k!=v`, `k in (..)`, `k notin (..)`, `k`, `!k`.
fn requirement(part: &str) -> Result<Requirement, String> {
    if let Some((k, v)) = part.split_once("!=") {
        return Ok(Requirement::NotIn(key(k, part)?, vec![value(v, part)?]));
    }
    if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
        return Ok(Requirement::In(key(k, part)?, vec![value(v, part)?]));
    }
    if let Some(open) = part.find('(') {
        let head = part[..open].trim();
        let Some(body) = part[open + 1..].trim_end().strip_suffix(')') else {
            return Err(format!("{}: text after ')'", quote(part)));
        };
        let values = body
            .split(',')
            .map(|v| value(v, part))
            .collect::<Result<Vec<_>, _>>()?;
        let (k, op) = head.rsplit_once(char::is_whitespace).ok_or_else(|| {
            format!(
                "{}: expected \"key in (...)\" or \"key notin (...)\"",
                quote(part)
            )
        })?;
        return match op {
            "in" => Ok(Requirement::In(key(k, part)?, values)),
            "notin" => Ok(Requirement::NotIn(key(k, part)?, values)),
            _ => Err(format!(
                "{}: {} is not an operator (use =, ==, !=, in or notin)",
                quote(part),
                quote(op)
            )),
        };
    }
    if let Some(k) = part.strip_prefix('!') {
        return Ok(Requirement::Absent(key(k, part)?));
    }
    if part.trim().contains(char::is_whitespace) {
        return Err(format!(
            "{}: expected key=value, key!=value, key in (a,b), key notin (a,b), key or !key",
            quote(part)
        ));
    }
    Ok(Requirement::Exists(key(part, part)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn selectors_select() {
        let web = labels(&[("app", "web"), ("tier", "front"), ("env", "prod")]);
        let db = labels(&[("app", "db"), ("tier", "db")]);
        let cases: &[(&str, bool, bool)] = &[
            ("", true, true),
            ("app=web", true, false),
            ("app==web", true, false),
            ("app = web , tier != db", true, false),
            ("tier!=db", true, false),
            ("env in (prod, staging)", true, false),
            ("env notin (prod)", false, true),
            ("env", true, false),
            ("!env", false, true),
            ("app in (web,db),!missing", true, true),
            ("example.com/team=x", false, false),
        ];
        for (text, w, d) in cases {
            let s = Selector::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!((s.matches(&web), s.matches(&db)), (*w, *d), "{text}");
        }
    }

    #[test]
    fn bad_selectors_say_which_part() {
        let cases = [
            ("app=", ""),
            (
                "app=we b",
                "\"app=we b\": \"we b\" is not a valid label value",
            ),
            ("env in (a,b", "'(' is not closed"),
            ("env in a,b)", "')' without '('"),
            ("env within (a)", "\"within\" is not an operator"),
            ("app=web,,tier=x", "an empty requirement"),
            ("-app=x", "\"-app=x\": \"-app\" is not a valid key"),
            (
                "Example.com/app=x",
                "the prefix \"Example.com\" is not a DNS subdomain",
            ),
            ("app web", "expected key=value"),
        ];
        for (text, want) in cases {
            match Selector::parse(text) {
                // "app=" is a valid requirement: the empty value.
                Ok(_) if want.is_empty() => {}
                Ok(s) => panic!("{text}: accepted as {s:?}"),
                Err(e) => assert!(e.contains(want), "{text}: {e}"),
            }
        }
    }

    #[test]
    fn keys_and_values_follow_kubernetes_rules() {
        let ok = labels(&[
            ("app", "web"),
            ("example.com/team", "a.b_c-d"),
            ("x", ""),
            (&"k".repeat(63), &"v".repeat(63)),
        ]);
        assert_eq!(check_labels(&ok), []);
        let bad = labels(&[
            ("-x", "v"),
            ("a/b/c", "v"),
            (&"k".repeat(64), "v"),
            ("ok", "-v"),
            ("ok2", &"v".repeat(64)),
        ]);
        let fields: Vec<String> = check_labels(&bad).into_iter().map(|e| e.field).collect();
        assert_eq!(fields.len(), 5, "{fields:?}");
        let big = labels(&[("a", &"x".repeat(MAX_ANNOTATIONS_BYTES))]);
        assert_eq!(check_annotations(&big)[0].field, "annotations");
        let free_text = labels(&[("note", "any text at all, even / = ( )")]);
        assert_eq!(check_annotations(&free_text), []);
    }
}
