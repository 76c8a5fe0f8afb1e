//! Spec errors: every problem of a spec, each naming its field.

use std::fmt;

/// One problem with one field of a spec.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    /// Path of the field as written in a spec file: `resources.memory`,
    /// `sockets[1].listen`, `env.FOO`; `(toml)` for a syntax error.
    pub field: String,
    /// What is wrong, with the offending value quoted as given.
    pub message: String,
}

impl FieldError {
    /// An error about `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> FieldError {
        FieldError {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Why a spec was refused: every problem found, never only the first. Never empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecError {
    /// In the order found: reading problems first, then validation problems, each group in
    /// the order of the spec's fields.
    pub errors: Vec<FieldError>,
}

impl SpecError {
    /// Whether some error is about `field` exactly.
    pub fn has_field(&self, field: &str) -> bool {
        self.errors.iter().any(|e| e.field == field)
    }
}

impl fmt::Display for SpecError {
    /// One error per line, `field: message`, without a trailing newline.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.errors.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for SpecError {}

/// Longest text quoted whole in a message; longer values are cut.
const QUOTE_MAX_CHARS: usize = 80;

/// `s` as it appears in messages: in double quotes, control characters escaped, cut after
/// [`QUOTE_MAX_CHARS`] characters.
pub(super) fn quote(s: &str) -> String {
    match s.char_indices().nth(QUOTE_MAX_CHARS) {
        None => format!("{s:?}"),
        Some((cut, _)) => format!("{:?}... ({} bytes)", &s[..cut], s.len()),
    }
}

/// The path of `key` inside `parent`: `parent.key`, or `parent."odd key"` when the key is
/// not a bare TOML key.
pub(super) fn child(parent: &str, key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    let key = if bare { key.to_owned() } else { quote(key) };
    if parent.is_empty() {
        key
    } else {
        format!("{parent}.{key}")
    }
}
