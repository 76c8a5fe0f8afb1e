//! Who is calling, and may they: every connection carries a [`Caller`] (from its client
//! certificate on TCP, from its peer credentials on the Unix socket), and the [`AuthLayer`]
//! in front of every service checks the caller's [`Role`] against the method, caps each
//! caller's concurrent streams, logs every call that changes something with who made it,
//! keeps count of a connection's open calls (for the idle timeout in [`super::conn`]), and
//! hands every call and its response to [`super::calls`] (ending streams when the agent
//! stops, reporting undecodable requests as such).
//!
//! Imports nothing from the crate outside `api`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::time::Instant;

use super::calls::{BodyPlan, Stopping};
use super::ratelog::LogBudget;
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::Bytes;

/// What a caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Nothing at all: a client certificate whose subject has no known OU.
    None,
    /// Get, List, Node, Logs, Watch, GetRollout, ListArtifacts, health and reflection.
    Read,
    /// Everything.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::None => "none",
            Role::Read => "read",
            Role::Admin => "admin",
        }
    }

    /// The role a certificate subject's OU values give: `admin` wins over `read`; anything
    /// else gives nothing.
    pub fn from_units<'a>(units: impl IntoIterator<Item = &'a str>) -> Role {
        units.into_iter().fold(Role::None, |role, ou| match ou {
            "admin" => Role::Admin,
            "read" => role.max(Role::Read),
            _ => role,
        })
    }
}

/// One connection's caller, as tonic's connect info: in every request's extensions.
#[derive(Debug, Clone)]
pub struct Caller {
    /// Who, for the logs: a certificate subject (`CN=sched,OU=admin`) or a local user
    /// (`uid 1000`).
    pub who: Arc<str>,
    /// Where from: `10.0.0.5:41234`, or `unix pid 4242`.
    pub peer: Arc<str>,
    pub role: Role,
    /// The connection's open calls.
    pub conn: Arc<ConnState>,
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.who, self.peer)
    }
}

/// A connection's open calls and when the last one ended.
#[derive(Debug)]
pub struct ConnState {
    active: AtomicUsize,
    idle_since: Mutex<Instant>,
}

impl Default for ConnState {
    fn default() -> Self {
        ConnState {
            active: AtomicUsize::new(0),
            idle_since: Mutex::new(Instant::now()),
        }
    }
}

impl ConnState {
    /// When the connection became idle; `None` while a call is open.
    pub fn idle_since(&self) -> Option<Instant> {
        if self.active.load(Ordering::Acquire) > 0 {
            return None;
        }
        Some(*self.idle_since.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub(crate) fn begin(self: &Arc<Self>) -> CallGuard {
        self.active.fetch_add(1, Ordering::AcqRel);
        CallGuard(self.clone())
    }
}

/// An open call; dropped when its response (stream) ends or is abandoned.
#[derive(Debug)]
pub(crate) struct CallGuard(Arc<ConnState>);

impl Drop for CallGuard {
    fn drop(&mut self) {
        *self.0.idle_since.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What an audited call acted on (a service or instance name), filled in by the service
/// handling it, so that the audit line can name it whatever the outcome.
#[derive(Debug, Clone, Default)]
pub struct AuditNote(Arc<Mutex<Option<String>>>);

impl AuditNote {
    /// Note the call's target in `req`'s audit note, when it has one.
    pub fn set<T>(req: &tonic::Request<T>, target: &str) {
        if let Some(note) = Self::of(req) {
            note.note(target);
        }
    }

    /// `req`'s audit note, when the call is audited.
    pub fn of<T>(req: &tonic::Request<T>) -> Option<AuditNote> {
        req.extensions().get::<AuditNote>().cloned()
    }

    /// Note the call's target.
    pub fn note(&self, target: &str) {
        let shown: String = target.chars().take(80).collect();
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(shown);
    }

    fn get(&self) -> String {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or_default()
    }
}

/// The audit line of a call. The caller (a certificate subject: the client's own text) and
/// the target (an import's path) are quoted and escaped, so no crafted value can end the
/// line or forge a field.
fn audit_line(caller: &Caller, method: &str, target: &str, code: &str) {
    tracing::info!(
        target: "corral_agent::audit",
        caller = ?&*caller.who,
        peer = %caller.peer,
        method,
        target = ?target,
        code,
        "API call"
    );
}

/// Counts per key with a cap, for "at most N per caller / per address".
#[derive(Debug)]
pub struct Counts<K: Eq + Hash> {
    max: usize,
    counts: Mutex<HashMap<K, usize>>,
}

/// One counted unit; gives its place back when dropped.
#[derive(Debug)]
pub struct CountGuard<K: Eq + Hash + Clone> {
    counts: Arc<Counts<K>>,
    key: K,
}

impl<K: Eq + Hash + Clone> Counts<K> {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Counts {
            max,
            counts: Mutex::new(HashMap::new()),
        })
    }

    /// Take a place for `key`, unless it already holds `max`.
    pub fn take(self: &Arc<Self>, key: K) -> Option<CountGuard<K>> {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let n = counts.entry(key.clone()).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(CountGuard {
            counts: self.clone(),
            key,
        })
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// How many places `key` holds.
    #[cfg(test)]
    fn held(&self, key: &K) -> usize {
        let counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        counts.get(key).copied().unwrap_or(0)
    }
}

impl<K: Eq + Hash + Clone> Drop for CountGuard<K> {
    fn drop(&mut self) {
        let mut counts = self.counts.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = counts.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

/// Methods a `read` caller may call: everything that changes nothing.
const READ_METHODS: &[&str] = &[
    "/corral.v1.Agent/Get",
    "/corral.v1.Agent/List",
    "/corral.v1.Agent/Node",
    "/corral.v1.Agent/Logs",
    "/corral.v1.Agent/Watch",
    "/corral.v1.Agent/GetRollout",
    "/corral.v1.Agent/GetRun",
    "/corral.v1.Agent/ListRuns",
    "/corral.v1.Agent/ListArtifacts",
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/grpc.health.v1.Health/List",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

/// Methods a `read` caller may call only to change nothing: `Apply` with `dry_run` (the
/// service refuses the rest; see [`may_change`]). They are audited like every write.
const DRY_RUN_METHODS: &[&str] = &["/corral.v1.Agent/Apply", "/corral.v1.Agent/ApplyBatch"];

/// Methods whose responses are streams that stay open: capped per caller.
const STREAM_METHODS: &[&str] = &[
    "/corral.v1.Agent/Logs",
    "/corral.v1.Agent/Watch",
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

/// The role `path` needs. Unknown methods need `admin`: whatever is added later is closed
/// until it is listed here.
pub fn required_role(path: &str) -> Role {
    if READ_METHODS.contains(&path) || DRY_RUN_METHODS.contains(&path) {
        Role::Read
    } else {
        Role::Admin
    }
}

/// Whether a call may change something (and is therefore logged with its caller).
pub fn changes_something(path: &str) -> bool {
    !READ_METHODS.contains(&path)
}

/// For a method a `read` caller may call as a dry run: refuse the call that would change
/// something unless the caller is `admin`. A call without a caller (in-process, no
/// authorization layer) may.
pub fn may_change<T>(req: &tonic::Request<T>, method: &str) -> Result<(), Status> {
    match req.extensions().get::<Caller>() {
        Some(c) if c.role < Role::Admin => Err(Status::permission_denied(format!(
            "permission denied: {method} needs role admin (role read may only ask for a dry run); {} has role {}",
            c.who,
            c.role.as_str()
        ))),
        _ => Ok(()),
    }
}

fn method_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// The check every call goes through, before any service sees it.
pub fn authorize(caller: Option<&Caller>, path: &str) -> Result<(), Status> {
    let Some(caller) = caller else {
        return Err(Status::permission_denied(
            "permission denied: the connection has no identity",
        ));
    };
    let need = required_role(path);
    if caller.role >= need {
        return Ok(());
    }
    let what = if caller.role == Role::None {
        "no role: its subject has neither OU=read nor OU=admin".to_string()
    } else {
        format!("role {}", caller.role.as_str())
    };
    Err(Status::permission_denied(format!(
        "permission denied: {} needs role {}; {} has {what}",
        method_name(path),
        need.as_str(),
        caller.who
    )))
}

/// Streams refused for the per-caller cap are logged at most 20 per 10 s.
static STREAMS_REFUSED: LogBudget = LogBudget::new(
    "API streams refused for too many open streams",
    20,
    std::time::Duration::from_secs(10),
);

/// Limits the layer enforces.
#[derive(Debug, Clone)]
pub struct AuthLayer {
    streams: Arc<Counts<Arc<str>>>,
    stopping: Stopping,
}

impl AuthLayer {
    /// At most `streams_per_caller` open streaming calls per caller identity, across all of
    /// its connections; open streams end once `stopping` fires.
    pub fn new(streams_per_caller: usize, stopping: Stopping) -> Self {
        AuthLayer {
            streams: Counts::new(streams_per_caller),
            stopping,
        }
    }
}

impl<S> tower_layer::Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Auth {
            inner,
            streams: self.streams.clone(),
            stopping: self.stopping.clone(),
        }
    }
}

/// The service [`AuthLayer`] puts in front.
#[derive(Debug, Clone)]
pub struct Auth<S> {
    inner: S,
    streams: Arc<Counts<Arc<str>>>,
    stopping: Stopping,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S, B> tower_service::Service<http::Request<B>> for Auth<S>
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

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let caller = req.extensions().get::<Caller>().cloned();
        let path = req.uri().path().to_string();
        if let Err(status) = authorize(caller.as_ref(), &path) {
            // Quoted and escaped (`?`): a certificate subject is the client's own text.
            tracing::warn!(
                caller = ?caller.as_ref().map_or_else(|| "unknown".to_string(), |c| c.to_string()),
                method = ?path,
                "API call refused: {}",
                status.message()
            );
            return Box::pin(std::future::ready(Ok(status.into_http())));
        }
        let Some(caller) = caller else {
            return Box::pin(std::future::ready(Ok(Status::internal(
                "no caller after authorization",
            )
            .into_http())));
        };
        let stream = if STREAM_METHODS.contains(&path.as_str()) {
            match self.streams.take(caller.who.clone()) {
                Some(g) => Some(g),
                None => {
                    if STREAMS_REFUSED.admit() {
                        tracing::warn!(caller = %caller, method = %path, "API stream refused: too many open streams");
                    }
                    return Box::pin(std::future::ready(Ok(Status::resource_exhausted(format!(
                        "too many open streams: {} already has {} (Watch, Logs, health Watch) open; close some first",
                        caller.who,
                        self.streams.max()
                    ))
                    .into_http())));
                }
            }
        } else {
            None
        };
        let call = caller.conn.begin();
        req.extensions_mut().insert(self.stopping.clone());
        let stopping = self.stopping.clone();
        let audit = changes_something(&path).then(|| {
            let note = AuditNote::default();
            req.extensions_mut().insert(note.clone());
            note
        });
        // The clone that was made ready goes into the future; a fresh clone stays.
        let fresh = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, fresh);
        Box::pin(async move {
            let mut resp = inner.call(req).await?;
            let plan = super::calls::response_plan(resp.headers_mut(), &path, &stopping);
            if let Some(note) = audit {
                let code = resp
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok())
                    .map_or("OK", |c| code_name(tonic::Code::from_i32(c)));
                audit_line(&caller, method_name(&path), &note.get(), code);
            }
            Ok(resp.map(|body| {
                Body::new(Guarded {
                    body,
                    plan,
                    _call: call,
                    _stream: stream,
                })
            }))
        })
    }
}

/// The name gRPC gives `code` (`NOT_FOUND`), as logs and metrics show it.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// A response body that holds the call's places until it ends, going through its plan.
struct Guarded {
    body: Body,
    plan: BodyPlan,
    _call: CallGuard,
    _stream: Option<CountGuard<Arc<str>>>,
}

impl http_body::Body for Guarded {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        let body = &mut this.body;
        this.plan.poll_frame(cx, |cx| Pin::new(body).poll_frame(cx))
    }

    fn is_end_stream(&self) -> bool {
        self.plan.ended() || self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A crafted certificate subject (quotes, commas, a newline with a forged line after it)
    /// and a crafted target stay inside their quoted, escaped fields of one audit line.
    #[test]
    fn the_audit_line_escapes_what_the_client_wrote() {
        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let out = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || out.clone())
            .finish();
        let caller = Caller {
            who: "CN=a\",b\nINFO corral_agent::audit: API call caller=root code=\"OK\",OU=admin"
                .into(),
            peer: "10.0.0.5:41234".into(),
            role: Role::Admin,
            conn: Arc::default(),
        };
        tracing::subscriber::with_default(subscriber, || {
            audit_line(&caller, "Apply", "/tmp/x\ny=\"z\"", "OK");
        });
        let text = String::from_utf8(buf.0.lock().expect("lock").clone()).expect("utf-8");
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(
            text.contains(
                r#"caller="CN=a\",b\nINFO corral_agent::audit: API call caller=root code=\"OK\",OU=admin""#
            ),
            "{text}"
        );
        assert!(text.contains(r#"target="/tmp/x\ny=\"z\"""#), "{text}");
    }

    fn caller(role: Role) -> Caller {
        Caller {
            who: "CN=t,OU=x".into(),
            peer: "127.0.0.1:1".into(),
            role,
            conn: Arc::default(),
        }
    }

    #[test]
    fn roles_from_units() {
        assert_eq!(Role::from_units(["admin"]), Role::Admin);
        assert_eq!(Role::from_units(["read"]), Role::Read);
        assert_eq!(Role::from_units(["read", "admin"]), Role::Admin);
        assert_eq!(Role::from_units(["admin", "read"]), Role::Admin);
        assert_eq!(Role::from_units(["ops", "read"]), Role::Read);
        assert_eq!(Role::from_units(["Admin", "ADMIN", " admin"]), Role::None);
        assert_eq!(Role::from_units(Vec::<&str>::new()), Role::None);
    }

    #[test]
    fn methods_need_the_right_role() {
        let table = [
            ("/corral.v1.Agent/Get", Role::Read),
            ("/corral.v1.Agent/List", Role::Read),
            ("/corral.v1.Agent/Node", Role::Read),
            ("/corral.v1.Agent/Logs", Role::Read),
            ("/corral.v1.Agent/Watch", Role::Read),
            ("/corral.v1.Agent/GetRollout", Role::Read),
            ("/corral.v1.Agent/GetRun", Role::Read),
            ("/corral.v1.Agent/ListRuns", Role::Read),
            ("/corral.v1.Agent/ListArtifacts", Role::Read),
            ("/corral.v1.Agent/RunJob", Role::Admin),
            ("/corral.v1.Agent/CancelRun", Role::Admin),
            ("/corral.v1.Agent/ImportArtifact", Role::Admin),
            ("/corral.v1.Agent/CollectArtifacts", Role::Admin),
            ("/grpc.health.v1.Health/Check", Role::Read),
            // Read may ask for a dry run; the service refuses the rest (may_change).
            ("/corral.v1.Agent/Apply", Role::Read),
            ("/corral.v1.Agent/Delete", Role::Admin),
            ("/corral.v1.Agent/Scale", Role::Admin),
            ("/corral.v1.Agent/Restart", Role::Admin),
            ("/corral.v1.Agent/Rollback", Role::Admin),
            ("/corral.v1.Agent/Signal", Role::Admin),
            ("/corral.v1.Agent/SomethingNew", Role::Admin),
            ("/corral.v1.Agent/Get/../Apply", Role::Admin),
            ("", Role::Admin),
        ];
        for (path, need) in table {
            assert_eq!(required_role(path), need, "{path}");
            for role in [Role::None, Role::Read, Role::Admin] {
                let r = authorize(Some(&caller(role)), path);
                assert_eq!(r.is_ok(), role >= need, "{path} as {role:?}");
                if let Err(s) = r {
                    assert_eq!(s.code(), tonic::Code::PermissionDenied);
                    assert!(s.message().contains(need.as_str()), "{}", s.message());
                }
            }
        }
        let e = authorize(None, "/corral.v1.Agent/Get").expect_err("no caller");
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        let e = authorize(Some(&caller(Role::Read)), "/corral.v1.Agent/Scale").expect_err("read");
        assert_eq!(
            e.message(),
            "permission denied: Scale needs role admin; CN=t,OU=x has role read"
        );
        // Apply is audited although read may call it.
        assert!(changes_something("/corral.v1.Agent/Apply"));
        assert!(!changes_something("/corral.v1.Agent/Get"));
        let mut req = tonic::Request::new(());
        req.extensions_mut().insert(caller(Role::Read));
        let e = may_change(&req, "Apply").expect_err("read");
        assert_eq!(
            e.message(),
            "permission denied: Apply needs role admin (role read may only ask for a dry run); CN=t,OU=x has role read"
        );
        req.extensions_mut().insert(caller(Role::Admin));
        assert!(may_change(&req, "Apply").is_ok());
        assert!(
            may_change(&tonic::Request::new(()), "Apply").is_ok(),
            "in-process"
        );
    }

    #[test]
    fn counts_cap_per_key_and_give_back() {
        let counts: Arc<Counts<&str>> = Counts::new(2);
        let a1 = counts.take("a").expect("1");
        let _a2 = counts.take("a").expect("2");
        assert!(counts.take("a").is_none(), "capped");
        let _b = counts.take("b").expect("another key");
        drop(a1);
        assert_eq!(counts.held(&"a"), 1);
        let _a3 = counts.take("a").expect("a place came back");
    }

    #[test]
    fn calls_keep_a_connection_busy() {
        let conn: Arc<ConnState> = Arc::default();
        assert!(conn.idle_since().is_some());
        let g1 = conn.begin();
        let g2 = conn.begin();
        assert!(conn.idle_since().is_none());
        drop(g1);
        assert!(conn.idle_since().is_none());
        let before = Instant::now();
        drop(g2);
        assert!(conn.idle_since().is_some_and(|t| t >= before));
    }
}
