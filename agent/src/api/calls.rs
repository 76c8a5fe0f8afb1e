//! What every call's response goes through besides authorization (see `auth`): open streams
//! end with `UNAVAILABLE` when the agent stops, so that it never waits for a client to hang
//! up, and a request that cannot be decoded is reported as the client's error
//! (`INVALID_ARGUMENT`) rather than the agent's (`INTERNAL`).
//!
//! Streams the API implements itself (`Watch`, `Logs`) end on [`Stopping`] with the index to
//! resume from; streams of the library services (health `Watch`, reflection) are ended here,
//! at the body.
//!
//! Imports nothing from the crate outside `api`.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::HeaderMap;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::{Code, Status};

/// The agent is stopping: given to every call (in its request's extensions) so that a
/// stream can end itself with where to resume.
#[derive(Debug, Clone, Default)]
pub struct Stopping(CancellationToken);

impl Stopping {
    pub fn new(token: CancellationToken) -> Self {
        Stopping(token)
    }

    /// The call's; one that never fires when the call came another way (tests).
    pub fn of<T>(req: &tonic::Request<T>) -> Stopping {
        req.extensions()
            .get::<Stopping>()
            .cloned()
            .unwrap_or_default()
    }

    /// Wait until the agent stops.
    pub async fn wait(&self) {
        self.0.cancelled().await;
    }

    fn owned(&self) -> WaitForCancellationFutureOwned {
        self.0.clone().cancelled_owned()
    }
}

pub use super::status::shutting_down;

/// Streaming methods of the library services, ended here when the agent stops.
const ENDED_HERE: &[&str] = &[
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

/// What prost says of a message it cannot decode (tonic passes it on as INTERNAL).
const DECODE_ERROR: &str = "failed to decode Protobuf message";

/// If `headers` (a trailers-only response's, or a stream's trailers) carry tonic's INTERNAL
/// for a request that could not be decoded, make it INVALID_ARGUMENT, naming the method.
pub fn undecodable_is_invalid(headers: &mut HeaderMap, path: &str) {
    if headers.get(Status::GRPC_STATUS).map(|v| v.as_bytes()) != Some(b"13")
        || headers.contains_key(Status::GRPC_STATUS_DETAILS)
    {
        return;
    }
    let Some(status) = Status::from_header_map(headers) else {
        return;
    };
    if status.code() != Code::Internal || !status.message().starts_with(DECODE_ERROR) {
        return;
    }
    let method = path.rsplit('/').next().unwrap_or(path);
    let status = super::status::invalid_field(
        "request",
        format!(
            "not a valid {method} request message ({})",
            status.message()
        ),
    );
    headers.remove(Status::GRPC_MESSAGE);
    headers.remove("grpc-status-details-bin");
    // Only fails for a message that cannot be a header value, which percent-encoding rules out.
    let _ = status.add_header(headers);
}

/// Response-side handling for the call to `path`: its trailers-only status fixed up now,
/// and what its body needs.
pub fn response_plan(headers: &mut HeaderMap, path: &str, stopping: &Stopping) -> BodyPlan {
    undecodable_is_invalid(headers, path);
    BodyPlan {
        path: path.to_string(),
        stop: ENDED_HERE
            .contains(&path)
            .then(|| Box::pin(stopping.owned())),
        ended: false,
    }
}

/// The per-body part of [`response_plan`]: ends the stream when the agent stops (for the
/// methods in [`ENDED_HERE`]) and fixes up its trailers.
#[derive(Debug)]
pub struct BodyPlan {
    path: String,
    stop: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
    ended: bool,
}

impl BodyPlan {
    /// Poll the inner body `poll` through the plan.
    pub fn poll_frame<B, E>(
        &mut self,
        cx: &mut Context<'_>,
        poll: impl FnOnce(&mut Context<'_>) -> Poll<Option<Result<http_body::Frame<B>, E>>>,
    ) -> Poll<Option<Result<http_body::Frame<B>, E>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        if let Some(stop) = self.stop.as_mut()
            && stop.as_mut().poll(cx).is_ready()
        {
            self.ended = true;
            let mut trailers = HeaderMap::new();
            let _ = shutting_down(None).add_header(&mut trailers);
            return Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers))));
        }
        match poll(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let frame = match frame.into_trailers() {
                    Ok(mut trailers) => {
                        undecodable_is_invalid(&mut trailers, &self.path);
                        http_body::Frame::trailers(trailers)
                    }
                    Err(frame) => frame,
                };
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                self.ended = true;
                Poll::Ready(None)
            }
            other => other,
        }
    }

    pub fn ended(&self) -> bool {
        self.ended
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers_of(status: Status) -> HeaderMap {
        let mut h = HeaderMap::new();
        status.add_header(&mut h).expect("header");
        h
    }

    #[test]
    fn only_decode_errors_become_invalid_argument() {
        let decode = Status::internal(
            "failed to decode Protobuf message: GetRequest.name: invalid string value: data is not UTF-8 encoded",
        );
        let mut h = headers_of(decode);
        undecodable_is_invalid(&mut h, "/corral.v1.Agent/Get");
        let s = Status::from_header_map(&h).expect("status");
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(
            s.message(),
            "request: not a valid Get request message (failed to decode Protobuf message: \
             GetRequest.name: invalid string value: data is not UTF-8 encoded)"
        );
        for other in [
            Status::internal("the desired state could not be saved: disk full"),
            Status::not_found("service \"x\" not found"),
            Status::invalid_argument("failed to decode Protobuf message"),
        ] {
            let before = headers_of(other.clone());
            let mut h = before.clone();
            undecodable_is_invalid(&mut h, "/corral.v1.Agent/Get");
            assert_eq!(h, before, "{other:?} left alone");
        }
    }

    #[test]
    fn a_stream_ended_here_gets_unavailable_trailers_when_the_agent_stops() {
        type Polled = Poll<Option<Result<http_body::Frame<tonic::codegen::Bytes>, Status>>>;
        let token = CancellationToken::new();
        let stopping = Stopping::new(token.clone());
        let mut h = HeaderMap::new();
        let mut plan = response_plan(&mut h, "/grpc.health.v1.Health/Watch", &stopping);
        let mut plain = response_plan(&mut h, "/corral.v1.Agent/Watch", &stopping);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        // A body that never ends by itself.
        let mut poll =
            |plan: &mut BodyPlan| -> Polled { plan.poll_frame(&mut cx, |_| Poll::Pending) };
        assert!(poll(&mut plan).is_pending());
        token.cancel();
        assert!(poll(&mut plain).is_pending(), "Watch ends itself");
        match poll(&mut plan) {
            Poll::Ready(Some(Ok(frame))) => {
                let t = frame.into_trailers().expect("trailers");
                let s = Status::from_header_map(&t).expect("status");
                assert_eq!(s.code(), Code::Unavailable);
                assert!(s.message().starts_with("agent shutting down"));
            }
            other => panic!("not trailers: ready {}", other.is_ready()),
        }
        assert!(matches!(poll(&mut plan), Poll::Ready(None)));
        assert!(plan.ended());
    }
}
