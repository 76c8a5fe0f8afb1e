//! A gRPC service made at its first call. Reflection decodes the whole API's descriptors into
//! memory when it is made, once for each protocol version: an agent nobody asks for them
//! (most agents: reflection is for `grpcurl` and code generators) keeps neither the decoded
//! copies nor the time spent on them at start.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use tonic::body::Body;
use tonic::server::NamedService;
use tower_service::Service;

/// The service `build` makes, made at the first call and shared by every clone from then on.
/// A `build` that fails (`None`, having said why) leaves the service answering `UNIMPLEMENTED`.
pub(super) struct Lazy<S> {
    made: Arc<OnceLock<Option<S>>>,
    build: fn() -> Option<S>,
}

impl<S> Lazy<S> {
    pub(super) fn new(build: fn() -> Option<S>) -> Lazy<S> {
        Lazy {
            made: Arc::new(OnceLock::new()),
            build,
        }
    }
}

impl<S> Clone for Lazy<S> {
    fn clone(&self) -> Self {
        Lazy {
            made: self.made.clone(),
            build: self.build,
        }
    }
}

impl<S> std::fmt::Debug for Lazy<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lazy")
            .field("made", &self.made.get().is_some())
            .finish()
    }
}

impl<S: NamedService> NamedService for Lazy<S> {
    const NAME: &'static str = S::NAME;
}

type Answer = Pin<Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send>>;

impl<S, B> Service<http::Request<B>> for Lazy<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Answer;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Answer {
        match self.made.get_or_init(self.build).clone() {
            // tonic's generated servers are always ready (their `poll_ready` returns `Ready`),
            // so they are called without polling it.
            Some(mut service) => Box::pin(service.call(request)),
            None => Box::pin(std::future::ready(Ok(tonic::Status::unimplemented(
                "this agent cannot serve gRPC reflection (see its log)",
            )
            .into_http()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    static BUILT: AtomicUsize = AtomicUsize::new(0);

    #[derive(Clone)]
    struct Echo;

    impl NamedService for Echo {
        const NAME: &'static str = "test.Echo";
    }

    impl Service<http::Request<Body>> for Echo {
        type Response = http::Response<Body>;
        type Error = Infallible;
        type Future = std::future::Ready<Result<http::Response<Body>, Infallible>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: http::Request<Body>) -> Self::Future {
            std::future::ready(Ok(http::Response::new(Body::empty())))
        }
    }

    fn status(response: &http::Response<Body>) -> Option<&str> {
        response
            .headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
    }

    #[tokio::test]
    async fn made_once_at_the_first_call_and_unimplemented_when_it_cannot_be() {
        let lazy = Lazy::new(|| {
            BUILT.fetch_add(1, Ordering::SeqCst);
            Some(Echo)
        });
        assert_eq!(<Lazy<Echo> as NamedService>::NAME, "test.Echo");
        assert_eq!(BUILT.load(Ordering::SeqCst), 0, "not made before a call");
        for mut l in [lazy.clone(), lazy.clone(), lazy] {
            let r = l
                .call(http::Request::new(Body::empty()))
                .await
                .expect("answer");
            assert_eq!(status(&r), None, "the service's own answer");
        }
        assert_eq!(BUILT.load(Ordering::SeqCst), 1, "made once for all clones");

        let mut broken: Lazy<Echo> = Lazy::new(|| None);
        let r = broken
            .call(http::Request::new(Body::empty()))
            .await
            .expect("answer");
        assert_eq!(status(&r), Some("12"), "UNIMPLEMENTED");
    }
}
