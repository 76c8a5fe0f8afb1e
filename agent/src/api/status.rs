//! The one mapping from domain errors to gRPC status codes.

use tonic::{Code, Status};

use crate::supervisor::SupervisorError;

pub fn to_status(e: SupervisorError) -> Status {
    let code = match &e {
        SupervisorError::InvalidSpec(_) | SupervisorError::InvalidArgument { .. } => {
            Code::InvalidArgument
        }
        SupervisorError::NotFound { .. }
        | SupervisorError::InstanceNotFound { .. }
        | SupervisorError::RolloutNotFound { .. } => Code::NotFound,
        SupervisorError::Unenforceable(_)
        | SupervisorError::Deleting { .. }
        | SupervisorError::NotRunning { .. }
        | SupervisorError::RolloutRunning { .. }
        | SupervisorError::Precondition(_) => Code::FailedPrecondition,
        SupervisorError::Storage(_) => Code::Internal,
        SupervisorError::Unavailable => Code::Unavailable,
    };
    Status::new(code, e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{FieldError, SpecError};

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
                SupervisorError::Unenforceable("memory".into()),
                Code::FailedPrecondition,
            ),
            (
                SupervisorError::Deleting { name: "x".into() },
                Code::FailedPrecondition,
            ),
            (SupervisorError::Storage("disk".into()), Code::Internal),
            (SupervisorError::Unavailable, Code::Unavailable),
        ];
        for (e, code) in cases {
            let msg = e.to_string();
            let s = to_status(e);
            assert_eq!(s.code(), code);
            assert_eq!(s.message(), msg, "the message is passed through as is");
        }
    }
}
