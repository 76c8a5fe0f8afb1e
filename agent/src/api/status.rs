//! The one mapping from domain errors to gRPC status codes, and the standard
//! `google.rpc` details each carries in `grpc-status-details-bin`: `BadRequest` (one
//! `FieldViolation` per field) with INVALID_ARGUMENT, `PreconditionFailure` with
//! FAILED_PRECONDITION, `ErrorInfo` (a [`Reason`]) with every other refusal, and
//! `ResourceInfo` naming the service, instance or rollout concerned.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::artifact::ArtifactError;
use crate::events::EventError;
use crate::spec::{FieldError, SpecError};
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

/// `ErrorInfo.domain` of every error the agent sends.
pub const DOMAIN: &str = "corral.dev";

/// `ErrorInfo.reason`: a stable, documented list (the README's API section) a client may
/// branch on; the text of a status message is for people and may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// INVALID_ARGUMENT: a request or spec field is wrong (see the BadRequest details).
    InvalidField,
    /// NOT_FOUND.
    ServiceNotFound,
    InstanceNotFound,
    RolloutNotFound,
    RunNotFound,
    /// ABORTED: `expected_revision` is not the service's generation (metadata
    /// `current_generation`, absent when the service does not exist, and
    /// `expected_generation`).
    GenerationMismatch,
    /// FAILED_PRECONDITION: the host cannot enforce or run the spec (PreconditionFailure,
    /// type `HOST`, one violation per field).
    HostCannotRun,
    /// RESOURCE_EXHAUSTED: the change would commit more CPU or memory than the node allows
    /// (PreconditionFailure type `CAPACITY` per resource; metadata `<cpu|memory>_requested`,
    /// `_committed`, `_allocatable`, `_overcommit`, `_limit`).
    CapacityExceeded,
    /// FAILED_PRECONDITION: a `[[sockets]]` address cannot be bound.
    ListenFailed,
    /// FAILED_PRECONDITION: another rollout of the service runs (metadata `rollout_id`).
    RolloutRunning,
    /// FAILED_PRECONDITION: no kept revision below the current one.
    NothingToRollBackTo,
    /// FAILED_PRECONDITION: the service is being deleted.
    ServiceDeleting,
    /// FAILED_PRECONDITION: the fleet (etcd) owns the service; this node's API changes it
    /// only with `force`.
    OwnedByFleet,
    /// FAILED_PRECONDITION: the service was applied through this node's API; the fleet does
    /// not take it over.
    OwnedLocally,
    /// FAILED_PRECONDITION: a job operation (RunJob, ListRuns) on a service.
    NotAJob,
    /// FAILED_PRECONDITION: a service operation (Scale, Restart, Rollback) on a job.
    IsAJob,
    /// FAILED_PRECONDITION: the instance is not running.
    InstanceNotRunning,
    /// FAILED_PRECONDITION: the kernel refused the signal.
    SignalFailed,
    /// INTERNAL: the desired state could not be saved; nothing was applied.
    StateNotSaved,
    /// UNAVAILABLE: the agent is stopping (metadata `resume_index` on a Watch).
    AgentShuttingDown,
    /// OUT_OF_RANGE on Watch: `from_index` is older than the oldest event kept (metadata
    /// `oldest_index`, `resume_index`).
    EventsCompacted,
    /// OUT_OF_RANGE on Watch: `from_index` is past the next event (metadata `next_index`).
    IndexPastEnd,
    /// RESOURCE_EXHAUSTED on Watch: the watcher fell too far behind (metadata
    /// `resume_index`).
    WatcherLagged,
    /// INTERNAL: the event log could not be read.
    EventLogUnreadable,
}

impl Reason {
    pub const ALL: [Reason; 24] = [
        Reason::CapacityExceeded,
        Reason::InvalidField,
        Reason::ServiceNotFound,
        Reason::InstanceNotFound,
        Reason::RolloutNotFound,
        Reason::RunNotFound,
        Reason::NotAJob,
        Reason::IsAJob,
        Reason::GenerationMismatch,
        Reason::HostCannotRun,
        Reason::ListenFailed,
        Reason::RolloutRunning,
        Reason::NothingToRollBackTo,
        Reason::ServiceDeleting,
        Reason::OwnedByFleet,
        Reason::OwnedLocally,
        Reason::InstanceNotRunning,
        Reason::SignalFailed,
        Reason::StateNotSaved,
        Reason::AgentShuttingDown,
        Reason::EventsCompacted,
        Reason::IndexPastEnd,
        Reason::WatcherLagged,
        Reason::EventLogUnreadable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::InvalidField => "INVALID_FIELD",
            Reason::ServiceNotFound => "SERVICE_NOT_FOUND",
            Reason::InstanceNotFound => "INSTANCE_NOT_FOUND",
            Reason::RolloutNotFound => "ROLLOUT_NOT_FOUND",
            Reason::RunNotFound => "RUN_NOT_FOUND",
            Reason::NotAJob => "NOT_A_JOB",
            Reason::IsAJob => "IS_A_JOB",
            Reason::GenerationMismatch => "GENERATION_MISMATCH",
            Reason::HostCannotRun => "HOST_CANNOT_RUN",
            Reason::ListenFailed => "LISTEN_FAILED",
            Reason::CapacityExceeded => "CAPACITY_EXCEEDED",
            Reason::RolloutRunning => "ROLLOUT_RUNNING",
            Reason::NothingToRollBackTo => "NOTHING_TO_ROLL_BACK_TO",
            Reason::ServiceDeleting => "SERVICE_DELETING",
            Reason::OwnedByFleet => "OWNED_BY_FLEET",
            Reason::OwnedLocally => "OWNED_LOCALLY",
            Reason::InstanceNotRunning => "INSTANCE_NOT_RUNNING",
            Reason::SignalFailed => "SIGNAL_FAILED",
            Reason::StateNotSaved => "STATE_NOT_SAVED",
            Reason::AgentShuttingDown => "AGENT_SHUTTING_DOWN",
            Reason::EventsCompacted => "EVENTS_COMPACTED",
            Reason::IndexPastEnd => "INDEX_PAST_END",
            Reason::WatcherLagged => "WATCHER_LAGGED",
            Reason::EventLogUnreadable => "EVENT_LOG_UNREADABLE",
        }
    }
}

/// `ResourceInfo.resource_type` values.
pub const SERVICE: &str = "corral.v1.Service";
pub const INSTANCE: &str = "corral.v1.Instance";
pub const ROLLOUT: &str = "corral.v1.Rollout";
pub const RUN: &str = "corral.v1.JobRun";

/// The details of one error, built up.
#[derive(Debug, Default)]
struct Details(ErrorDetails);

impl Details {
    fn info(mut self, reason: Reason, metadata: &[(&str, String)]) -> Details {
        let metadata: HashMap<String, String> = metadata
            .iter()
            .map(|(k, v)| ((*k).to_string(), v.clone()))
            .collect();
        self.0.set_error_info(reason.as_str(), DOMAIN, metadata);
        self
    }

    fn resource(mut self, kind: &str, name: &str) -> Details {
        self.0.set_resource_info(kind, name, "", "");
        self
    }

    fn precondition(mut self, kind: &str, subject: &str, description: &str) -> Details {
        self.0
            .add_precondition_failure_violation(kind, subject, description);
        self
    }

    fn status(self, code: Code, message: impl Into<String>) -> Status {
        Status::with_error_details(code, message, self.0)
    }
}

/// The most bytes of field violations sent in one BadRequest: the details travel in an
/// HTTP/2 header (base64, a third larger) that repeats the message (the `google.rpc.Status`
/// holds it too; see [`MAX_MESSAGE`]), and the whole header block must stay under what
/// clients accept (16 KiB in hyper).
pub const MAX_VIOLATIONS_BYTES: usize = 3072;
/// Protobuf framing of one violation (tags and lengths), counted against the budget.
const VIOLATION_OVERHEAD: usize = 8;

/// INVALID_ARGUMENT with one `FieldViolation` per field error (as many as fit in
/// [`MAX_VIOLATIONS_BYTES`]; ErrorInfo metadata `violations` says how many there are in all).
pub fn bad_request(errors: &[FieldError], message: impl Into<String>) -> Status {
    let mut d = Details::default();
    let mut size = 0;
    for e in errors {
        let field = cut(&e.field, 512);
        let description = cut(&e.message, 1024);
        size += field.len() + description.len() + VIOLATION_OVERHEAD;
        if size > MAX_VIOLATIONS_BYTES {
            break;
        }
        d.0.add_bad_request_violation(field, description);
    }
    d.info(
        Reason::InvalidField,
        &[("violations", errors.len().to_string())],
    )
    .status(Code::InvalidArgument, message)
}

/// INVALID_ARGUMENT about one request field: `"{field}: {message}"`, with its violation.
pub fn invalid_field(field: &str, message: impl Into<String>) -> Status {
    let e = FieldError::new(field, message);
    bad_request(std::slice::from_ref(&e), cut(&e.to_string(), MAX_MESSAGE))
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
    bad_request(&e.errors, spec_message(e))
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
    let message = match &e {
        SupervisorError::InvalidSpec(spec) => spec_message(spec),
        other => cut(&other.to_string(), MAX_MESSAGE).to_string(),
    };
    let d = Details::default();
    match &e {
        SupervisorError::InvalidSpec(spec) => bad_request(&spec.errors, message),
        SupervisorError::ReplicasOutOfRange { .. } => {
            invalid_field("replicas", field_part(&message))
        }
        SupervisorError::CurrentRevision { .. } | SupervisorError::RevisionNotKept { .. } => {
            invalid_field("revision", field_part(&message))
        }
        SupervisorError::NotFound { name } => d
            .info(Reason::ServiceNotFound, &[])
            .resource(SERVICE, name)
            .status(Code::NotFound, message),
        SupervisorError::InstanceNotFound { instance } => d
            .info(Reason::InstanceNotFound, &[])
            .resource(INSTANCE, instance)
            .status(Code::NotFound, message),
        SupervisorError::RolloutNotFound { id } => d
            .info(Reason::RolloutNotFound, &[])
            .resource(ROLLOUT, id)
            .status(Code::NotFound, message),
        SupervisorError::GenerationMismatch {
            name,
            expected,
            current,
        } => {
            let mut meta = vec![("expected_generation", expected.to_string())];
            if let Some(c) = current {
                meta.push(("current_generation", c.to_string()));
            }
            d.info(Reason::GenerationMismatch, &meta)
                .resource(SERVICE, name)
                .status(Code::Aborted, message)
        }
        SupervisorError::Unenforceable { reasons } => {
            let mut d = d.info(Reason::HostCannotRun, &[]);
            for r in reasons {
                d = d.precondition("HOST", &r.field, cut(&r.message, 1024));
            }
            d.status(Code::FailedPrecondition, message)
        }
        SupervisorError::CapacityExceeded { exceeded } => {
            let mut meta = Vec::new();
            for e in exceeded {
                let r = e.field.trim_start_matches("resources.");
                meta.push((format!("{r}_requested"), e.requested.to_string()));
                meta.push((format!("{r}_committed"), e.committed.to_string()));
                meta.push((format!("{r}_allocatable"), e.allocatable.to_string()));
                meta.push((format!("{r}_overcommit"), e.ratio.to_string()));
                meta.push((format!("{r}_limit"), e.limit.to_string()));
            }
            let meta: Vec<(&str, String)> =
                meta.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
            let mut d = d.info(Reason::CapacityExceeded, &meta);
            let message_lines: Vec<&str> = message.split("; ").collect();
            for (e, line) in exceeded.iter().zip(message_lines) {
                let why = line.split_once(": ").map_or(line, |(_, w)| w);
                d = d.precondition("CAPACITY", e.field, why);
            }
            d.status(Code::ResourceExhausted, message)
        }
        SupervisorError::Listen { index, source, .. } => d
            .info(Reason::ListenFailed, &[])
            .precondition(
                "HOST",
                &format!("sockets[{index}].listen"),
                &source.to_string(),
            )
            .status(Code::FailedPrecondition, message),
        SupervisorError::Signal { instance, .. } => d
            .info(Reason::SignalFailed, &[])
            .resource(INSTANCE, instance)
            .status(Code::FailedPrecondition, message),
        SupervisorError::Deleting { name } => d
            .info(Reason::ServiceDeleting, &[])
            .resource(SERVICE, name)
            .precondition("STATE", name, "the service is being deleted")
            .status(Code::FailedPrecondition, message),
        SupervisorError::RunNotFound { id } => d
            .info(Reason::RunNotFound, &[])
            .resource(RUN, id)
            .status(Code::NotFound, message),
        SupervisorError::NotAJob { name } => d
            .info(Reason::NotAJob, &[])
            .resource(SERVICE, name)
            .precondition("KIND", name, "a service, not a job")
            .status(Code::FailedPrecondition, message),
        SupervisorError::IsAJob { name } => d
            .info(Reason::IsAJob, &[])
            .resource(SERVICE, name)
            .precondition(
                "KIND",
                name,
                "a job: its instances start with its runs; scale, restart and rollback are for services",
            )
            .status(Code::FailedPrecondition, message),
        SupervisorError::OwnedByFleet { name } => d
            .info(Reason::OwnedByFleet, &[])
            .resource(SERVICE, name)
            .precondition(
                "OWNER",
                name,
                "owned by the fleet (etcd): change it there (corral fleet apply/delete), or force \
                 the change here (--force); it lasts until etcd next changes the service",
            )
            .status(Code::FailedPrecondition, message),
        SupervisorError::OwnedLocally { name } => d
            .info(Reason::OwnedLocally, &[])
            .resource(SERVICE, name)
            .precondition(
                "OWNER",
                name,
                "applied through this node's API: the fleet does not take it over",
            )
            .status(Code::FailedPrecondition, message),
        SupervisorError::NotRunning { instance, state } => d
            .info(
                Reason::InstanceNotRunning,
                &[("state", (*state).to_string())],
            )
            .resource(INSTANCE, instance)
            .precondition("STATE", instance, &format!("the instance is {state}"))
            .status(Code::FailedPrecondition, message),
        SupervisorError::RolloutRunning { name, id, progress } => d
            .info(Reason::RolloutRunning, &[("rollout_id", id.clone())])
            .resource(SERVICE, name)
            .precondition(
                "ROLLOUT",
                id,
                &format!("rollout {id} is running ({progress}); wait for it or pass force"),
            )
            .status(Code::FailedPrecondition, message),
        SupervisorError::NothingToRollBackTo { name, .. } => d
            .info(Reason::NothingToRollBackTo, &[])
            .resource(SERVICE, name)
            .precondition("REVISION", name, "no kept revision below the current one")
            .status(Code::FailedPrecondition, message),
        SupervisorError::Storage { .. } | SupervisorError::Encoding { .. } => d
            .info(Reason::StateNotSaved, &[])
            .status(Code::Internal, message),
        SupervisorError::Unavailable => d
            .info(Reason::AgentShuttingDown, &[])
            .status(Code::Unavailable, message),
    }
}

/// What follows `field: ` in a message that starts with its field.
fn field_part(message: &str) -> &str {
    message.split_once(": ").map_or(message, |(_, rest)| rest)
}

/// A Watch that cannot go on, with where to resume.
pub fn watch_status(e: &EventError) -> Status {
    let d = Details::default();
    let message = e.to_string();
    match e {
        EventError::Trimmed { oldest, .. } => d
            .info(
                Reason::EventsCompacted,
                &[
                    ("oldest_index", oldest.to_string()),
                    ("resume_index", oldest.to_string()),
                ],
            )
            .status(Code::OutOfRange, message),
        EventError::InvalidIndex { next, .. } => d
            .info(Reason::IndexPastEnd, &[("next_index", next.to_string())])
            .status(Code::OutOfRange, message),
        EventError::Lagged { resume_from } => d
            .info(
                Reason::WatcherLagged,
                &[("resume_index", resume_from.to_string())],
            )
            .status(Code::ResourceExhausted, message),
        EventError::Io { .. } => d
            .info(Reason::EventLogUnreadable, &[])
            .status(Code::Internal, message),
    }
}

/// The status a stream ends with when the agent stops; `resume_at`: the `Watch` index to
/// call again with (also in ErrorInfo metadata `resume_index`).
pub fn shutting_down(resume_at: Option<u64>) -> Status {
    let d = Details::default();
    match resume_at {
        Some(index) => d
            .info(
                Reason::AgentShuttingDown,
                &[("resume_index", index.to_string())],
            )
            .status(
                Code::Unavailable,
                format!("agent shutting down; resume at index {index}"),
            ),
        None => d.info(Reason::AgentShuttingDown, &[]).status(
            Code::Unavailable,
            "agent shutting down; call again once it is back",
        ),
    }
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
                    reasons: vec![FieldError::new("resources.memory", "no memory controller")],
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

    /// Each refusal carries the standard details a client branches on: field violations for a
    /// bad spec, host violations for one the host cannot run, the reason and the numbers for
    /// a generation mismatch; decoded here as a client decodes `grpc-status-details-bin`.
    #[test]
    fn details_travel_with_each_refusal() {
        let spec = to_status(SupervisorError::InvalidSpec(SpecError {
            errors: vec![
                FieldError::new("resources.memory", "\"12XB\" is not a size"),
                FieldError::new("command", "required"),
            ],
        }));
        let d = spec.get_error_details();
        let fields: Vec<(String, String)> = d
            .bad_request()
            .expect("BadRequest")
            .field_violations
            .iter()
            .map(|v| (v.field.clone(), v.description.clone()))
            .collect();
        assert_eq!(
            fields,
            [
                ("resources.memory".into(), "\"12XB\" is not a size".into()),
                ("command".into(), "required".into())
            ]
        );
        assert_eq!(
            d.error_info().map(|i| i.reason.as_str()),
            Some("INVALID_FIELD")
        );

        let host = to_status(SupervisorError::Unenforceable {
            reasons: vec![
                FieldError::new("command[0]", "\"nope\" is not found in the service's PATH"),
                FieldError::new("ports.http", "port 80 is already in use"),
            ],
        });
        assert_eq!(host.code(), Code::FailedPrecondition);
        let pf = host
            .get_details_precondition_failure()
            .expect("PreconditionFailure");
        let subjects: Vec<&str> = pf.violations.iter().map(|v| v.subject.as_str()).collect();
        assert_eq!(subjects, ["command[0]", "ports.http"]);
        assert!(pf.violations.iter().all(|v| v.r#type == "HOST"));

        let aborted = to_status(SupervisorError::GenerationMismatch {
            name: "web".into(),
            expected: 3,
            current: Some(5),
        });
        assert_eq!(aborted.code(), Code::Aborted);
        let info = aborted.get_details_error_info().expect("ErrorInfo");
        assert_eq!(info.reason, "GENERATION_MISMATCH");
        assert_eq!(info.domain, DOMAIN);
        assert_eq!(
            info.metadata.get("current_generation").map(String::as_str),
            Some("5")
        );
        assert_eq!(
            info.metadata.get("expected_generation").map(String::as_str),
            Some("3")
        );
        let gone = to_status(SupervisorError::GenerationMismatch {
            name: "web".into(),
            expected: 3,
            current: None,
        });
        let info = gone.get_details_error_info().expect("ErrorInfo");
        assert!(!info.metadata.contains_key("current_generation"));

        // Watch: past the end and compacted are told apart by reason, each with its index.
        let past = watch_status(&EventError::InvalidIndex {
            requested: 90,
            next: 42,
        });
        let info = past.get_details_error_info().expect("ErrorInfo");
        assert_eq!(
            (past.code(), info.reason.as_str()),
            (Code::OutOfRange, "INDEX_PAST_END")
        );
        assert_eq!(
            info.metadata.get("next_index").map(String::as_str),
            Some("42")
        );
        let old = watch_status(&EventError::Trimmed {
            requested: 1,
            oldest: 500,
        });
        let info = old.get_details_error_info().expect("ErrorInfo");
        assert_eq!(
            (old.code(), info.reason.as_str()),
            (Code::OutOfRange, "EVENTS_COMPACTED")
        );
        assert_eq!(
            info.metadata.get("resume_index").map(String::as_str),
            Some("500")
        );
        let lag = watch_status(&EventError::Lagged { resume_from: 77 });
        let info = lag.get_details_error_info().expect("ErrorInfo");
        assert_eq!(
            (lag.code(), info.reason.as_str()),
            (Code::ResourceExhausted, "WATCHER_LAGGED")
        );
        assert_eq!(
            info.metadata.get("resume_index").map(String::as_str),
            Some("77")
        );
    }

    /// Ten thousand violations do not all travel (the details share the header limit): as
    /// many as fit, and how many there were.
    #[test]
    fn many_violations_are_cut_to_fit() {
        let many = errors(10_000, |i| format!("env.V{i}"));
        let status = invalid_spec(&many);
        let details = status.details().len();
        assert!(
            details < MAX_MESSAGE + MAX_VIOLATIONS_BYTES + 512,
            "{details} bytes"
        );
        let d = status.get_error_details();
        let sent = d.bad_request().map_or(0, |b| b.field_violations.len());
        assert!(sent > 50 && sent < 10_000, "{sent}");
        let info = d.error_info().expect("ErrorInfo");
        assert_eq!(
            info.metadata.get("violations").map(String::as_str),
            Some("10000")
        );
    }

    /// The reasons are a stable, distinct, UPPER_SNAKE list.
    #[test]
    fn reasons_are_upper_snake_and_distinct() {
        let names: std::collections::BTreeSet<&str> =
            Reason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(names.len(), Reason::ALL.len());
        for n in names {
            assert!(
                n.bytes().all(|b| b.is_ascii_uppercase() || b == b'_'),
                "{n}"
            );
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
