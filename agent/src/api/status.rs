//! The one mapping from domain errors to gRPC status codes.

use tonic::{Code, Status};

use crate::artifact::ArtifactError;
use crate::spec::SpecError;
use crate::supervisor::SupervisorError;

/// A store operation that failed: the caller's input (a file that cannot be read or is not
/// what it claims) or the store's own trouble.
pub fn artifact_status(e: ArtifactError) -> Status {
    let code = match &e {
        ArtifactError::Fetch { .. }
        | ArtifactError::DigestMismatch { .. }
        | ArtifactError::Unpack { .. }
        | ArtifactError::Image { .. } => Code::FailedPrecondition,
        ArtifactError::Locked { .. } => Code::Unavailable,
        ArtifactError::Io { .. } | ArtifactError::Client(_) => Code::Internal,
    };
    Status::new(code, cut(&e.to_string(), MAX_MESSAGE).to_string())
}

/// The longest status message sent. The message travels in an HTTP/2 header
/// (`grpc-message`, percent-encoded, so up to three times longer) and clients refuse header
/// blocks past a limit (16 KiB in hyper, so in tonic); a longer one would reach the client
/// as an HTTP/2 protocol error instead of the refusal.
pub const MAX_MESSAGE: usize = 4096;

/// A refused spec, one `field: message` per line, at most [`MAX_MESSAGE`] bytes: when every
/// error does not fit, the first ones and how many more there are.
pub fn spec_message(e: &SpecError) -> String {
    let total = e.errors.len();
    let mut out = String::new();
    for (i, error) in e.errors.iter().enumerate() {
        let line = error.to_string();
        // Room kept for the note about the errors left out.
        if out.len() + 1 + line.len() > MAX_MESSAGE - 80 {
            if out.is_empty() {
                out = cut(&line, MAX_MESSAGE - 80).to_string();
            }
            let left = total - i.max(1);
            if left > 0 {
                out.push_str(&format!(
                    "\n... and {left} more errors ({total} in all; fix these first)"
                ));
            }
            return out;
        }
        if i > 0 {
            out.push('\n');
        }
        out.push_str(&line);
    }
    out
}

/// A refused spec as a status.
pub fn invalid_spec(e: &SpecError) -> Status {
    Status::invalid_argument(spec_message(e))
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
fn cut(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

pub fn to_status(e: SupervisorError) -> Status {
    let code = match &e {
        SupervisorError::InvalidSpec(_)
        | SupervisorError::ReplicasOutOfRange { .. }
        | SupervisorError::CurrentRevision { .. }
        | SupervisorError::RevisionNotKept { .. } => Code::InvalidArgument,
        SupervisorError::NotFound { .. }
        | SupervisorError::InstanceNotFound { .. }
        | SupervisorError::RolloutNotFound { .. } => Code::NotFound,
        SupervisorError::Unenforceable { .. }
        | SupervisorError::Listen { .. }
        | SupervisorError::Signal { .. }
        | SupervisorError::Deleting { .. }
        | SupervisorError::NotRunning { .. }
        | SupervisorError::RolloutRunning { .. }
        | SupervisorError::OwnedByFleet { .. }
        | SupervisorError::OwnedLocally { .. }
        | SupervisorError::NothingToRollBackTo { .. } => Code::FailedPrecondition,
        SupervisorError::Storage { .. } | SupervisorError::Encoding { .. } => Code::Internal,
        SupervisorError::Unavailable => Code::Unavailable,
    };
    let message = match &e {
        SupervisorError::InvalidSpec(spec) => spec_message(spec),
        other => cut(&other.to_string(), MAX_MESSAGE).to_string(),
    };
    Status::new(code, message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{FieldError, SpecError};
    use crate::store::StoreError;

    #[test]
    fn codes() {
        let cases = [
            (
                SupervisorError::InvalidSpec(SpecError {
                    errors: vec![FieldError {
                        field: "name".into(),
                        message: "bad".into(),
                    }],
                }),
                Code::InvalidArgument,
            ),
            (
                SupervisorError::NotFound { name: "x".into() },
                Code::NotFound,
            ),
            (
                SupervisorError::CurrentRevision { revision: 2 },
                Code::InvalidArgument,
            ),
            (
                SupervisorError::Unenforceable {
                    reasons: vec!["resources.memory: no memory controller".into()],
                },
                Code::FailedPrecondition,
            ),
            (
                SupervisorError::Listen {
                    index: 0,
                    listen: crate::spec::ListenAddr::Tcp(([127, 0, 0, 1], 80).into()),
                    source: std::io::Error::from_raw_os_error(libc::EADDRINUSE),
                },
                Code::FailedPrecondition,
            ),
            (
                SupervisorError::Deleting { name: "x".into() },
                Code::FailedPrecondition,
            ),
            (
                SupervisorError::OwnedByFleet { name: "x".into() },
                Code::FailedPrecondition,
            ),
            (
                SupervisorError::OwnedLocally { name: "x".into() },
                Code::FailedPrecondition,
            ),
            (
                SupervisorError::NothingToRollBackTo {
                    name: "x".into(),
                    revision: 1,
                    kept: vec![1],
                },
                Code::FailedPrecondition,
            ),
            (
                SupervisorError::Storage {
                    source: StoreError::Io {
                        path: "/state/services/x".into(),
                        what: "writing",
                        source: std::io::Error::from_raw_os_error(libc::ENOSPC),
                    },
                },
                Code::Internal,
            ),
            (SupervisorError::Unavailable, Code::Unavailable),
        ];
        for (e, code) in cases {
            // The error underneath stays reachable as the cause.
            let caused = std::error::Error::source(&e).is_some();
            assert_eq!(
                caused,
                matches!(
                    e,
                    SupervisorError::InvalidSpec(_)
                        | SupervisorError::Listen { .. }
                        | SupervisorError::Storage { .. }
                ),
                "{e:?}"
            );
            let msg = e.to_string();
            let s = to_status(e);
            assert_eq!(s.code(), code);
            assert_eq!(s.message(), msg, "the message is passed through as is");
        }
    }

    fn errors(n: usize, field: impl Fn(usize) -> String) -> SpecError {
        SpecError {
            errors: (0..n)
                .map(|i| FieldError::new(field(i), "is not a valid variable name"))
                .collect(),
        }
    }

    /// Ten thousand errors would make a message far beyond what a client accepts in a
    /// header: the first ones are sent, and how many more there are.
    #[test]
    fn long_spec_errors_are_cut_to_fit_a_header() {
        let few = errors(3, |i| format!("env.V{i}"));
        assert_eq!(spec_message(&few), few.to_string(), "whole while it fits");

        let many = errors(10_000, |i| format!("env.\"{i}=x\""));
        let message = spec_message(&many);
        assert!(message.len() <= MAX_MESSAGE, "{} bytes", message.len());
        assert!(message.starts_with("env.\"0=x\": is not a valid variable name\n"));
        let shown = message.lines().count() - 1;
        assert!(shown > 10, "{message}");
        assert!(
            message.ends_with(&format!(
                "... and {} more errors (10000 in all; fix these first)",
                10_000 - shown
            )),
            "{message}"
        );
        let status = to_status(SupervisorError::InvalidSpec(many));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(status.message(), message);

        // One error longer than the limit on its own is cut too.
        let huge = errors(2, |_| "x".repeat(3 * MAX_MESSAGE));
        let message = spec_message(&huge);
        assert!(message.len() <= MAX_MESSAGE, "{} bytes", message.len());
        assert!(message.ends_with("... and 1 more errors (2 in all; fix these first)"));
    }
}
