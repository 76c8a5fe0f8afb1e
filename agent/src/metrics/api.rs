//! The API's own metrics, kept by a tower layer in front of every gRPC service: calls by
//! method and code, how long they took, and the streams open now.
//!
//! The `method` label takes only the methods the agent serves (read from the services'
//! descriptors: whatever the API adds is counted under its name, and a client calling made-up
//! paths is counted as `unknown`, so the label stays bounded). The code is the call's gRPC
//! status: from a trailers-only response's headers, else from the trailers at the end of its
//! body; a body dropped before its end (the client went away) counts as `CANCELLED`. A call
//! lasts until its response body ends, so a stream's duration is how long it was open.
//!
//! Imports from the crate: `api::auth` (the gRPC code names) only.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use http::HeaderMap;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use prost::Message;
use tonic::body::Body;
use tonic::codegen::Bytes;
use tonic::{Code, Status};

use crate::api::auth::code_name;

/// Call durations, in seconds: unary calls take well under a millisecond to seconds (a
/// `Delete` waits for its instances); streams stay open for hours.
const CALL_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 60.0, 3600.0,
];

/// The label of a path the agent does not serve.
const UNKNOWN: &str = "unknown";

type CallLabels = [(&'static str, String); 2];
type MethodLabels = [(&'static str, String); 1];

/// The API's instruments; cheap to clone.
#[derive(Debug, Clone)]
pub struct ApiMetrics {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Every method served, by path (`/corral.v1.Agent/Get`): its label and whether its
    /// response is a stream.
    methods: HashMap<String, (String, bool)>,
    calls: Family<CallLabels, Counter>,
    durations: Family<MethodLabels, Histogram>,
    open_streams: Gauge,
}

impl Default for ApiMetrics {
    fn default() -> Self {
        ApiMetrics::new()
    }
}

impl ApiMetrics {
    /// Instruments for the methods of `corral.v1`, `grpc.health.v1` and reflection.
    pub fn new() -> ApiMetrics {
        let sets: [&[u8]; 4] = [
            corral_proto::v1::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
        ];
        let mut methods = HashMap::new();
        for set in sets {
            // Built into the binary by the proto crates; one that does not decode leaves its
            // methods counted as `unknown`, never takes the agent down.
            let Ok(set) = prost_types::FileDescriptorSet::decode(set) else {
                tracing::warn!(
                    "a gRPC descriptor set does not decode: its methods are counted as unknown"
                );
                continue;
            };
            for file in &set.file {
                for service in &file.service {
                    for m in &service.method {
                        let label = format!("{}.{}/{}", file.package(), service.name(), m.name());
                        methods.insert(format!("/{label}"), (label, m.server_streaming()));
                    }
                }
            }
        }
        ApiMetrics {
            inner: Arc::new(Inner {
                methods,
                calls: Family::default(),
                durations: Family::new_with_constructor(|| Histogram::new(CALL_BUCKETS)),
                open_streams: Gauge::default(),
            }),
        }
    }

    /// The layer that keeps these; put it outermost, so that it sees calls refused by the
    /// others too.
    pub fn layer(&self) -> ApiMetricsLayer {
        ApiMetricsLayer(Some(self.clone()))
    }

    /// Add the instruments to a scrape's registry.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "corral_api_requests",
            "gRPC calls to the agent's API that ended, by method and status code",
            self.inner.calls.clone(),
        );
        registry.register_with_unit(
            "corral_api_request_duration",
            "How long gRPC calls took, from the request to the end of the response (for a stream: how long it was open)",
            Unit::Seconds,
            self.inner.durations.clone(),
        );
        registry.register(
            "corral_api_open_streams",
            "Streaming calls (Watch, Logs, health Watch, reflection) open now",
            self.inner.open_streams.clone(),
        );
    }

    fn begin(&self, path: &str) -> Call {
        let (method, stream) = self
            .inner
            .methods
            .get(path)
            .cloned()
            .unwrap_or_else(|| (UNKNOWN.to_string(), false));
        if stream {
            self.inner.open_streams.inc();
        }
        Call {
            metrics: self.clone(),
            method,
            stream,
            started: Instant::now(),
            code: None,
        }
    }

    #[cfg(test)]
    pub(crate) fn count(&self, method: &str, code: &str) -> u64 {
        self.inner
            .calls
            .get(&[("method", method.to_string()), ("code", code.to_string())])
            .map_or(0, |c| c.get())
    }

    #[cfg(test)]
    pub(crate) fn open_streams(&self) -> i64 {
        self.inner.open_streams.get()
    }
}

/// One call in progress: counted when it is dropped (with the response body, or with the
/// call's future when the client went away before the answer).
struct Call {
    metrics: ApiMetrics,
    method: String,
    stream: bool,
    started: Instant,
    /// The status code, once seen.
    code: Option<&'static str>,
}

impl Call {
    fn see(&mut self, headers: &HeaderMap) {
        if let Some(v) = headers.get(Status::GRPC_STATUS) {
            let code = std::str::from_utf8(v.as_bytes())
                .ok()
                .and_then(|v| v.parse::<i32>().ok())
                .map_or(Code::Unknown, Code::from_i32);
            self.code = Some(code_name(code));
        }
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        let m = &self.metrics.inner;
        let code = self.code.unwrap_or("CANCELLED");
        let method = std::mem::take(&mut self.method);
        m.calls
            .get_or_create(&[("method", method.clone()), ("code", code.to_string())])
            .inc();
        m.durations
            .get_or_create(&[("method", method)])
            .observe(self.started.elapsed().as_secs_f64());
        if self.stream {
            m.open_streams.dec();
        }
    }
}

/// The layer of [`ApiMetrics`]; does nothing when made without them (metrics off).
#[derive(Debug, Clone, Default)]
pub struct ApiMetricsLayer(Option<ApiMetrics>);

impl<S> tower_layer::Layer<S> for ApiMetricsLayer {
    type Service = Metered<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Metered {
            inner,
            metrics: self.0.clone(),
        }
    }
}

/// The service [`ApiMetricsLayer`] puts in front.
#[derive(Debug, Clone)]
pub struct Metered<S> {
    inner: S,
    metrics: Option<ApiMetrics>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S, B> tower_service::Service<http::Request<B>> for Metered<S>
where
    S: tower_service::Service<
            http::Request<B>,
            Response = http::Response<Body>,
            Error = Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        // The clone that was made ready goes into the future; a fresh clone stays.
        let fresh = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, fresh);
        let Some(metrics) = &self.metrics else {
            return Box::pin(inner.call(req));
        };
        let mut call = metrics.begin(req.uri().path());
        Box::pin(async move {
            let resp = inner.call(req).await?;
            call.see(resp.headers());
            Ok(resp.map(|body| Body::new(MeteredBody { body, call })))
        })
    }
}

/// A response body that counts its call when it ends or is dropped.
struct MeteredBody {
    body: Body,
    call: Call,
}

impl http_body::Body for MeteredBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(trailers) = frame.trailers_ref()
        {
            this.call.see(trailers);
        }
        if let Poll::Ready(Some(Err(status))) = &polled {
            this.call.code = Some(code_name(status.code()));
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tower_layer::Layer;
    use tower_service::Service;

    /// An inner service answering every call with `status` in trailers after one data
    /// frame, or (trailers-only) in its headers.
    #[derive(Clone)]
    struct Answer {
        status: Code,
        trailers_only: bool,
    }

    impl Service<http::Request<()>> for Answer {
        type Response = http::Response<Body>;
        type Error = Infallible;
        type Future = std::future::Ready<Result<Self::Response, Infallible>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: http::Request<()>) -> Self::Future {
            let status = Status::new(self.status, "x");
            if self.trailers_only {
                return std::future::ready(Ok(status.into_http()));
            }
            let mut trailers = HeaderMap::new();
            let _ = status.add_header(&mut trailers);
            let frames = vec![
                Ok::<_, Status>(http_body::Frame::data(Bytes::from_static(b"reply"))),
                Ok(http_body::Frame::trailers(trailers)),
            ];
            let body = http_body_util::StreamBody::new(tokio_stream::iter(frames));
            std::future::ready(Ok(http::Response::new(Body::new(body))))
        }
    }

    fn request(path: &str) -> http::Request<()> {
        http::Request::builder()
            .uri(path)
            .body(())
            .expect("request")
    }

    #[tokio::test]
    async fn calls_are_counted_by_method_and_code_and_streams_while_open() {
        let metrics = ApiMetrics::new();
        let layer = metrics.layer();
        let mut ok = layer.layer(Answer {
            status: Code::Ok,
            trailers_only: false,
        });
        let mut denied = layer.layer(Answer {
            status: Code::PermissionDenied,
            trailers_only: true,
        });
        // A unary call's status is in its trailers: counted once its body has been read.
        let resp = ok
            .call(request("/corral.v1.Agent/Get"))
            .await
            .expect("call");
        assert_eq!(metrics.count("corral.v1.Agent/Get", "OK"), 0);
        resp.into_body().collect().await.expect("body");
        assert_eq!(metrics.count("corral.v1.Agent/Get", "OK"), 1);
        // Trailers-only: the code is in the headers.
        let resp = denied
            .call(request("/corral.v1.Agent/Apply"))
            .await
            .expect("call");
        drop(resp);
        assert_eq!(
            metrics.count("corral.v1.Agent/Apply", "PERMISSION_DENIED"),
            1
        );
        // A stream is open until its body ends; dropped before its trailers: CANCELLED.
        let resp = ok
            .call(request("/corral.v1.Agent/Watch"))
            .await
            .expect("call");
        assert_eq!(metrics.open_streams(), 1);
        drop(resp);
        assert_eq!(metrics.open_streams(), 0);
        assert_eq!(metrics.count("corral.v1.Agent/Watch", "CANCELLED"), 1);
        // Paths nobody serves share one label, whatever a client makes up.
        for i in 0..50 {
            let path = format!("/made.up/Method{i}");
            let resp = denied.call(request(&path)).await.expect("call");
            drop(resp);
        }
        assert_eq!(metrics.count(UNKNOWN, "PERMISSION_DENIED"), 50);
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let text =
            crate::metrics::encode(&registry, crate::metrics::Format::Prometheus).expect("encodes");
        let series = text
            .lines()
            .filter(|l| l.starts_with("corral_api_requests_total{"))
            .count();
        assert_eq!(series, 4, "{text}");
        // Health and reflection are known methods too.
        let resp = ok
            .call(request("/grpc.health.v1.Health/Check"))
            .await
            .expect("call");
        resp.into_body().collect().await.expect("body");
        assert_eq!(metrics.count("grpc.health.v1.Health/Check", "OK"), 1);
    }

    #[tokio::test]
    async fn without_metrics_the_layer_passes_calls_through() {
        let mut svc = ApiMetricsLayer::default().layer(Answer {
            status: Code::NotFound,
            trailers_only: true,
        });
        let resp = svc
            .call(request("/corral.v1.Agent/Get"))
            .await
            .expect("call");
        assert_eq!(
            Status::from_header_map(resp.headers()).map(|s| s.code()),
            Some(Code::NotFound)
        );
    }
}
