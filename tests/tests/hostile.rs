//! Hostile API input against a real agent: a table of requests (huge strings, NUL bytes,
//! negative and overflowing numbers, unknown values, path tricks, absurd counts and
//! durations, malformed wire data), each of which must be answered with a clear status and a
//! message that names the field or the reason, and none of which may apply anything. After
//! the table the agent still answers, lists no service and has recorded no event.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use corral_e2e::{Agent, pb, skip_unless_root};
use pb::agent_client::AgentClient;
use tonic::Code;
use tonic::codegen::{Service, http};
use tonic::transport::Channel;

const MIB: usize = 1 << 20;

/// One hostile request.
#[derive(Debug)]
enum Call {
    /// Apply with the text of a spec file.
    Toml(String),
    /// Apply with a typed spec.
    Spec(Box<pb::ServiceSpec>),
    /// Apply without a spec.
    NoSource,
    Get(String),
    Delete(String),
    Scale(String, u32),
    Restart(String),
    Rollback(String, Option<u64>),
    GetRollout(String),
    /// Signal(instance, signal).
    Signal(String, String),
    Logs(pb::LogsRequest),
    Watch(pb::WatchRequest),
    /// A `Logs` request whose protobuf payload is these bytes, as sent on the wire.
    RawLogs(Vec<u8>),
    /// An `Apply` request whose protobuf payload is these bytes.
    RawApply(Vec<u8>),
}

/// A request, the codes it may be answered with, and what the message must contain.
#[derive(Debug)]
struct Case {
    what: &'static str,
    call: Call,
    codes: &'static [Code],
    says: &'static [&'static str],
}

const INVALID: &[Code] = &[Code::InvalidArgument];
const NOT_FOUND: &[Code] = &[Code::NotFound];
/// A message over the server's size limit: which code depends on where it is stopped.
const TOO_LARGE: &[Code] = &[
    Code::ResourceExhausted,
    Code::OutOfRange,
    Code::InvalidArgument,
];

/// A valid spec named `hostile`, changed by `edit`.
fn spec(edit: impl FnOnce(&mut pb::ServiceSpec)) -> Call {
    let mut s = pb::ServiceSpec {
        name: "hostile".into(),
        command: vec!["/bin/true".into()],
        ..Default::default()
    };
    edit(&mut s);
    Call::Spec(Box::new(s))
}

/// A valid spec file named `hostile` with `extra` added (top-level lines first, tables last).
fn toml(extra: &str) -> Call {
    let (top, tables) = match extra.find('[') {
        Some(0) => ("", extra),
        _ => (extra, ""),
    };
    Call::Toml(format!(
        "{top}\nname = \"hostile\"\ncommand = [\"/bin/true\"]\n{tables}\n"
    ))
}

/// A spec file with `key = value` where `name` would go.
fn toml_named(name: &str) -> Call {
    Call::Toml(format!("name = {name}\ncommand = [\"/bin/true\"]\n"))
}

fn logs(service: &str, instance: &str, tail: Option<u32>) -> Call {
    Call::Logs(pb::LogsRequest {
        service: service.into(),
        instance: instance.into(),
        follow: true,
        tail,
        since: None,
    })
}

/// A protobuf length-delimited field.
fn bytes_field(number: u8, value: &[u8]) -> Vec<u8> {
    let mut out = vec![number << 3 | 2];
    let mut len = value.len();
    loop {
        let b = (len & 0x7f).to_le_bytes()[0];
        len >>= 7;
        if len == 0 {
            out.push(b);
            break;
        }
        out.push(b | 0x80);
    }
    out.extend_from_slice(value);
    out
}

fn case(
    what: &'static str,
    call: Call,
    codes: &'static [Code],
    says: &'static [&'static str],
) -> Case {
    Case {
        what,
        call,
        codes,
        says,
    }
}

fn cases() -> Vec<Case> {
    let long = |n: usize| "a".repeat(n);
    vec![
        // --- sizes
        case(
            "a 1 MiB name in a typed spec",
            spec(|s| s.name = long(MIB)),
            INVALID,
            &["name:", "not a valid name", "bytes)"],
        ),
        case(
            "a spec file over the 1 MiB spec_toml limit (a 1 MiB name)",
            Call::Toml(format!(
                "name = \"{}\"\ncommand = [\"/bin/true\"]\n",
                long(MIB)
            )),
            INVALID,
            &["spec_toml:", "limit"],
        ),
        case(
            "a 1 MiB command argument",
            spec(|s| s.command.push(long(MIB))),
            INVALID,
            &["command:", "bytes long"],
        ),
        case(
            "an 8 MiB name in a typed spec",
            spec(|s| s.name = long(8 * MIB)),
            TOO_LARGE,
            &[],
        ),
        case(
            "an 8 MiB command in a typed spec",
            spec(|s| s.command = vec!["/bin/echo".into(), long(8 * MIB)]),
            TOO_LARGE,
            &[],
        ),
        case(
            "an 8 MiB spec file",
            Call::Toml(format!("# {}\n", long(8 * MIB))),
            TOO_LARGE,
            &[],
        ),
        case(
            "an 8 MiB name to Get",
            Call::Get(long(8 * MIB)),
            TOO_LARGE,
            &[],
        ),
        case(
            "a 1 MiB name to Get",
            Call::Get(long(MIB)),
            INVALID,
            &["name:", "not a valid service name"],
        ),
        // --- NUL bytes
        case(
            "NUL in the name",
            spec(|s| s.name = "host\0ile".into()),
            INVALID,
            &["name:", "\\0"],
        ),
        case(
            "NUL in an env value",
            spec(|s| {
                s.env.insert("GREETING".into(), "hi\0there".into());
            }),
            INVALID,
            &["env.GREETING:", "NUL byte"],
        ),
        case(
            "NUL in an env key",
            spec(|s| {
                s.env.insert("A\0B".into(), "x".into());
            }),
            INVALID,
            &["env.", "not a valid variable name"],
        ),
        case(
            "NUL in a command argument",
            spec(|s| s.command.push("a\0b".into())),
            INVALID,
            &["command[1]:", "NUL byte"],
        ),
        case(
            "NUL in the user",
            spec(|s| s.user = Some("nobody\0root".into())),
            INVALID,
            &["user:", "not a user name"],
        ),
        case(
            "NUL in the workdir",
            spec(|s| s.workdir = Some("/srv\0/x".into())),
            INVALID,
            &["workdir:", "NUL byte"],
        ),
        case(
            "NUL in a spec file's name (\\u0000)",
            toml_named("\"host\\u0000ile\""),
            INVALID,
            &["name:", "not a valid name"],
        ),
        case(
            "NUL in an instance id to Signal",
            Call::Signal("hostile\0-0".into(), "SIGHUP".into()),
            NOT_FOUND,
            &["instance", "not found"],
        ),
        // --- names: paths, unicode, control characters
        case(
            "../ in the name",
            toml_named("\"../../etc\""),
            INVALID,
            &["name:", "not a valid name"],
        ),
        case(
            "an absolute path as the name",
            spec(|s| s.name = "/etc/passwd".into()),
            INVALID,
            &["name:", "not a valid name"],
        ),
        case(
            "/ in the name",
            spec(|s| s.name = "a/b".into()),
            INVALID,
            &["name:"],
        ),
        case(
            "unicode in the name",
            spec(|s| s.name = "h\u{f4}stile".into()),
            INVALID,
            &["name:", "not a valid name"],
        ),
        case(
            "control characters in the name",
            spec(|s| s.name = "web\n\u{1b}[31m".into()),
            INVALID,
            &["name:", "\\n"],
        ),
        case(
            "../ to Delete",
            Call::Delete("../../var/lib".into()),
            INVALID,
            &["name:", "not a valid service name"],
        ),
        case(
            "an empty name to Restart",
            Call::Restart(String::new()),
            INVALID,
            &["name:"],
        ),
        case(
            "a path as a Logs instance",
            logs("", "../../etc/passwd-0", None),
            INVALID,
            &["instance:", "not an instance id"],
        ),
        case(
            "a path as a Watch service",
            Call::Watch(pb::WatchRequest {
                service: "../x".into(),
                ..Default::default()
            }),
            INVALID,
            &["service:", "not a valid service name"],
        ),
        case(
            "a path as a Signal instance",
            Call::Signal("../hostile-0".into(), "SIGTERM".into()),
            INVALID,
            &["instance:", "not an instance id"],
        ),
        case(
            "a rollout id with a path and an index beyond u64",
            Call::GetRollout("../x-r18446744073709551616".into()),
            INVALID,
            &["id:", "not a rollout id"],
        ),
        // --- counts
        case(
            "replicas = 10000 in a spec file",
            toml("replicas = 10000"),
            INVALID,
            &["replicas:", "10000 is out of range"],
        ),
        case(
            "replicas u32::MAX in a typed spec",
            spec(|s| s.replicas = Some(u32::MAX)),
            INVALID,
            &["replicas:", "4294967295 is out of range"],
        ),
        case(
            "Scale to 10000 of a service that does not exist",
            Call::Scale("hostile".into(), 10_000),
            INVALID,
            &["replicas:", "out of range"],
        ),
        case(
            "Scale to u32::MAX",
            Call::Scale("hostile".into(), u32::MAX),
            INVALID,
            &["replicas:", "out of range"],
        ),
        case(
            "10 000 env entries",
            spec(|s| {
                s.env = (0..10_000).map(|i| (format!("V{i}"), "x".into())).collect();
            }),
            INVALID,
            &["env:", "10000 entries"],
        ),
        case(
            "10 000 env entries, every key invalid",
            spec(|s| {
                s.env = (0..10_000)
                    .map(|i| (format!("{i}=x"), "x".into()))
                    .collect();
            }),
            INVALID,
            &[
                "env:",
                "10000 entries",
                "not a valid variable name",
                "(10001 in all",
            ],
        ),
        // --- negative and overflowing numbers
        case(
            "replicas = -1",
            toml("replicas = -1"),
            INVALID,
            &["replicas:", "-1 is out of range"],
        ),
        case(
            "cpu = -0.5",
            toml("[resources]\ncpu = -0.5"),
            INVALID,
            &["resources.cpu:", "out of range"],
        ),
        case(
            "cpu NaN in a typed spec",
            spec(|s| {
                s.resources = Some(pb::Resources {
                    cpu: Some(f64::NAN),
                    ..Default::default()
                });
            }),
            INVALID,
            &["resources.cpu:", "not a finite number"],
        ),
        case(
            "memory = \"-1MiB\"",
            toml("[resources]\nmemory = \"-1MiB\""),
            INVALID,
            &["resources.memory:", "not a size"],
        ),
        case(
            "memory = 16EiB written in bytes, beyond u64",
            toml("[resources]\nmemory = \"18446744073709551616\""),
            INVALID,
            &["resources.memory:", "too large"],
        ),
        case(
            "pids = 18446744073709551616 (beyond any TOML integer)",
            toml("[resources]\npids = 18446744073709551616"),
            INVALID,
            &["(toml):", "resources.pids", "out of range"],
        ),
        case(
            "pids u64::MAX in a typed spec",
            spec(|s| {
                s.resources = Some(pb::Resources {
                    pids: Some(u64::MAX),
                    ..Default::default()
                });
            }),
            INVALID,
            &["resources.pids:", "out of range"],
        ),
        // --- durations
        case(
            "backoff = \"99999999999999999999s\"",
            toml("[restart]\nbackoff = \"99999999999999999999s\""),
            INVALID,
            &["restart.backoff:", "not a duration", "too large"],
        ),
        case(
            "grace = \"1e308s\"",
            toml("[stop]\ngrace = \"1e308s\""),
            INVALID,
            &["stop.grace:", "not a duration"],
        ),
        case(
            "a health interval of 0s",
            toml("[health]\nnotify = true\ninterval = \"0s\""),
            INVALID,
            &["health.interval:", "shorter than"],
        ),
        case(
            "a healthy_deadline of 0s",
            spec(|s| {
                s.rollout = Some(pb::RolloutPolicy {
                    healthy_deadline_ms: Some(0),
                    ..Default::default()
                });
            }),
            INVALID,
            &["rollout.healthy_deadline:", "shorter than"],
        ),
        case(
            "a start period of 100 years",
            toml("[health]\nnotify = true\nstart_period = \"100y\""),
            INVALID,
            &["health.start_period:", "longer than"],
        ),
        // --- unknown values
        case(
            "restart.policy = \"sometimes\"",
            toml("[restart]\npolicy = \"sometimes\""),
            INVALID,
            &["restart.policy:", "not a policy"],
        ),
        case(
            "a real-time stop signal",
            spec(|s| {
                s.stop = Some(pb::Stop {
                    signal: Some("SIGRTMIN+3".into()),
                    grace_ms: None,
                });
            }),
            INVALID,
            &["stop.signal:", "not a signal name"],
        ),
        case(
            "an unknown namespace",
            toml("[isolation]\nnamespaces = [\"pid\", \"mount\", \"time\"]"),
            INVALID,
            &["isolation.namespaces[2]:", "not a namespace"],
        ),
        case(
            "an unknown field",
            toml("replica = 3"),
            INVALID,
            &["replica:", "unknown field"],
        ),
        case(
            "Signal with an unknown signal name",
            Call::Signal("hostile-0".into(), "SIGFOO".into()),
            INVALID,
            &["signal:", "not a signal"],
        ),
        case(
            "Signal 65",
            Call::Signal("hostile-0".into(), "65".into()),
            INVALID,
            &["signal:", "1 to 64"],
        ),
        case(
            "Signal -9",
            Call::Signal("hostile-0".into(), "-9".into()),
            INVALID,
            &["signal:"],
        ),
        case(
            "Signal 0",
            Call::Signal("hostile-0".into(), "0".into()),
            INVALID,
            &["signal:"],
        ),
        // --- sockets and ports
        case(
            "a socket at unix:../../etc/x",
            toml("[[sockets]]\nname = \"http\"\nlisten = \"unix:../../etc/x\""),
            INVALID,
            &["sockets[0].listen:", "absolute path"],
        ),
        case(
            "a socket at a relative unix path",
            spec(|s| {
                s.sockets = vec![pb::Socket {
                    name: "http".into(),
                    listen: "unix:run/x.sock".into(),
                }];
            }),
            INVALID,
            &["sockets[0].listen:", "absolute path"],
        ),
        case(
            "a socket on port 0",
            toml("[[sockets]]\nname = \"http\"\nlisten = \"127.0.0.1:0\""),
            INVALID,
            &["sockets[0].listen:", "port 0"],
        ),
        case(
            "port 0",
            toml("[ports]\nadmin = 0"),
            INVALID,
            &["ports.admin:", "not a port"],
        ),
        case(
            "port 65536",
            toml("[ports]\nadmin = 65536"),
            INVALID,
            &["ports.admin:", "65536 is not a port"],
        ),
        case(
            "port 70000 in a typed spec",
            spec(|s| {
                s.ports.insert("admin".into(), 70_000);
            }),
            INVALID,
            &["ports.admin:", "70000 is not a port"],
        ),
        case(
            "two sockets with one name and one address",
            spec(|s| {
                let socket = pb::Socket {
                    name: "http".into(),
                    listen: "127.0.0.1:18080".into(),
                };
                s.sockets = vec![socket.clone(), socket];
            }),
            INVALID,
            &["sockets[1].name:", "sockets[1].listen:"],
        ),
        case(
            "a duplicate port name in a spec file",
            toml("[ports]\nadmin = \"auto\"\nadmin = \"auto\""),
            INVALID,
            &["(toml):", "duplicate key"],
        ),
        case(
            "an env key with =",
            toml("env = { \"A=B\" = \"x\" }"),
            INVALID,
            &["env.\"A=B\":", "not a valid variable name"],
        ),
        // --- structure
        case(
            "a huge spec file of nested tables",
            Call::Toml(format!(
                "name = \"hostile\"\ncommand = [\"/bin/true\"]\n[{}]\n",
                vec!["t"; 100_000].join(".")
            )),
            INVALID,
            &["(toml):", "recursion"],
        ),
        case(
            "deeply nested arrays",
            Call::Toml(format!(
                "name = \"hostile\"\ncommand = [\"/bin/true\"]\nx = {}{}\n",
                "[".repeat(200_000),
                "]".repeat(200_000)
            )),
            INVALID,
            &["(toml):", "recursion"],
        ),
        case(
            "50 000 unknown tables",
            Call::Toml((0..50_000).map(|i| format!("[t{i}]\n")).collect::<String>() + "[name]\n"),
            INVALID,
            // Far too many errors for one status: the first ones, and how many there are.
            &["t0: unknown field", "more errors (50002 in all"],
        ),
        case("Apply without a spec", Call::NoSource, INVALID, &["spec:"]),
        // --- streams and indexes
        case(
            "Watch from index u64::MAX",
            Call::Watch(pb::WatchRequest {
                from_index: u64::MAX,
                follow: true,
                ..Default::default()
            }),
            &[Code::OutOfRange],
            &["18446744073709551615", "does not exist yet"],
        ),
        case(
            "Logs of a service that does not exist, tail u32::MAX",
            logs("hostile", "", Some(u32::MAX)),
            NOT_FOUND,
            &["\"hostile\" not found"],
        ),
        case(
            "Logs with neither service nor instance",
            logs("", "", Some(0)),
            INVALID,
            &["service or instance:"],
        ),
        case(
            "Logs since the far future, of an instance of another service",
            Call::Logs(pb::LogsRequest {
                service: "hostile".into(),
                instance: "other-1".into(),
                follow: false,
                tail: None,
                since: Some(prost_types::Timestamp {
                    seconds: i64::MAX,
                    nanos: i32::MAX,
                }),
            }),
            INVALID,
            &["instance:", "not an instance of service"],
        ),
        case(
            "Logs since a time before any clock",
            Call::Logs(pb::LogsRequest {
                service: "hostile".into(),
                since: Some(prost_types::Timestamp {
                    seconds: i64::MIN,
                    nanos: -1,
                }),
                ..Default::default()
            }),
            INVALID,
            &["since:", "out of range"],
        ),
        case(
            "Rollback to revision u64::MAX of a service that does not exist",
            Call::Rollback("hostile".into(), Some(u64::MAX)),
            NOT_FOUND,
            &["\"hostile\" not found"],
        ),
        // --- malformed wire data
        case(
            "Logs with a tail sent as a negative 64-bit varint",
            // service = "nope"; tail (field 4) = a 10-byte varint with bit 63 set, which is
            // how a negative int64 is encoded (bytes chosen to be valid UTF-8).
            Call::RawLogs(
                [
                    bytes_field(1, b"nope"),
                    vec![4 << 3],
                    "\u{20ac}\u{1f600}\u{80}\u{1}".as_bytes().to_vec(),
                ]
                .concat(),
            ),
            NOT_FOUND,
            &["\"nope\" not found"],
        ),
        case(
            "Apply with an unknown field number and no spec",
            // Field 15 (a varint) and field 14 (bytes) are not in ApplyRequest.
            Call::RawApply([vec![15 << 3, 0x2a], bytes_field(14, b"abc")].concat()),
            INVALID,
            &["spec:", "required"],
        ),
        case(
            "Apply whose spec field claims more bytes than the message has",
            Call::RawApply(vec![2 << 3 | 2, 0x7f, b'x']),
            // Unparseable request messages are INTERNAL in gRPC's status code table.
            &[Code::Internal, Code::InvalidArgument],
            &["decode"],
        ),
    ]
}

/// A unary answer, shown.
fn done<T: std::fmt::Debug>(
    r: Result<tonic::Response<T>, tonic::Status>,
) -> Result<String, tonic::Status> {
    r.map(|r| format!("{:?}", r.into_inner()))
}

/// Runs `call`: the status it was refused with, or what it was answered with.
async fn run(socket: &std::path::Path, call: Call) -> Result<String, tonic::Status> {
    let mut c = corral_e2e::connect(socket).await.expect("connect");
    let apply = |source| pb::ApplyRequest {
        source,
        dry_run: false,
        force: false,
        ..Default::default()
    };
    use pb::apply_request::Source;
    match call {
        Call::Toml(t) => done(c.apply(apply(Some(Source::SpecToml(t)))).await),
        Call::Spec(s) => done(c.apply(apply(Some(Source::Spec(*s)))).await),
        Call::NoSource => done(c.apply(apply(None)).await),
        Call::Get(name) => done(c.get(pb::GetRequest { name }).await),
        Call::Delete(name) => done(
            c.delete(pb::DeleteRequest {
                name,
                ..Default::default()
            })
            .await,
        ),
        Call::Scale(name, replicas) => done(
            c.scale(pb::ScaleRequest {
                name,
                replicas,
                ..Default::default()
            })
            .await,
        ),
        Call::Restart(name) => done(
            c.restart(pb::RestartRequest {
                name,
                force: true,
                ..Default::default()
            })
            .await,
        ),
        Call::Rollback(name, revision) => done(
            c.rollback(pb::RollbackRequest {
                name,
                revision,
                force: true,
                ..Default::default()
            })
            .await,
        ),
        Call::GetRollout(id) => done(c.get_rollout(pb::GetRolloutRequest { id }).await),
        Call::Signal(instance, signal) => {
            done(c.signal(pb::SignalRequest { instance, signal }).await)
        }
        Call::Logs(req) => first_of(c.logs(req).await).await,
        Call::Watch(req) => first_of(c.watch(req).await).await,
        Call::RawLogs(payload) => {
            let mut raw = raw_client(socket, payload).await;
            first_of(raw.logs(pb::LogsRequest::default()).await).await
        }
        Call::RawApply(payload) => {
            let mut raw = raw_client(socket, payload).await;
            done(raw.apply(apply(None)).await)
        }
    }
}

/// A stream's answer: its first item (an error is the refusal), or that it ended empty.
async fn first_of<T: std::fmt::Debug>(
    r: Result<tonic::Response<tonic::Streaming<T>>, tonic::Status>,
) -> Result<String, tonic::Status> {
    let mut stream = r?.into_inner();
    match stream.message().await? {
        Some(item) => Ok(format!("a stream sending {item:?}")),
        None => Ok("an empty stream".into()),
    }
}

/// A client whose next request carries `payload` on the wire, whatever message it was
/// called with.
async fn raw_client(socket: &std::path::Path, payload: Vec<u8>) -> AgentClient<RawBody> {
    let channel = tonic::transport::Endpoint::from_shared(format!("unix://{}", socket.display()))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    AgentClient::new(RawBody {
        inner: channel,
        payload: Arc::new(payload),
    })
}

/// A transport that replaces each request's body with one gRPC message of raw bytes.
#[derive(Debug, Clone)]
struct RawBody {
    inner: Channel,
    payload: Arc<Vec<u8>>,
}

type HttpRequest = http::Request<tonic::body::Body>;

impl Service<HttpRequest> for RawBody {
    type Response = <Channel as Service<HttpRequest>>::Response;
    type Error = <Channel as Service<HttpRequest>>::Error;
    type Future = <Channel as Service<HttpRequest>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Service::<HttpRequest>::poll_ready(&mut self.inner, cx)
    }

    fn call(&mut self, req: HttpRequest) -> Self::Future {
        // A gRPC message: uncompressed, a 4-byte big-endian length, the bytes. The body type
        // at hand takes text, so the payload must be valid UTF-8 (the cases are chosen so).
        let len = u32::try_from(self.payload.len()).expect("a small payload");
        let mut frame = vec![0u8];
        frame.extend_from_slice(&len.to_be_bytes());
        frame.extend_from_slice(&self.payload);
        let text = String::from_utf8(frame).expect("a payload that is valid UTF-8");
        let (parts, _) = req.into_parts();
        self.inner.call(http::Request::from_parts(
            parts,
            tonic::body::Body::new(text),
        ))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_are_refused_clearly_and_apply_nothing() {
    if skip_unless_root("hostile_requests_are_refused_clearly_and_apply_nothing") {
        return;
    }
    let cases = cases();
    assert!(cases.len() >= 30, "{} cases", cases.len());
    let agent = Agent::start().await;
    let mut failures = Vec::new();
    for Case {
        what,
        call,
        codes,
        says,
    } in cases
    {
        // A hang is a failure too; nothing here needs more than a few seconds.
        let answer = tokio::time::timeout(Duration::from_secs(60), run(&agent.socket, call))
            .await
            .unwrap_or_else(|_| panic!("{what}: no answer within 60 s"));
        let status = match answer {
            Ok(answer) => {
                failures.push(format!("{what}: accepted, answered with {answer:.200}"));
                continue;
            }
            Err(status) => status,
        };
        let message = status.message();
        let shown: String = message.chars().take(300).collect();
        if !codes.contains(&status.code()) {
            failures.push(format!(
                "{what}: {:?} (expected {codes:?}): {shown}",
                status.code()
            ));
        } else if message.trim().is_empty() {
            failures.push(format!("{what}: {:?} with an empty message", status.code()));
        } else if let Some(missing) = says.iter().find(|s| !message.contains(*s)) {
            failures.push(format!("{what}: the message lacks {missing:?}: {shown}"));
        }
        // The agent answers after every case.
        let list = agent.client().await.list(pb::ListRequest::default()).await;
        assert!(
            list.is_ok(),
            "{what}: the agent stopped answering: {list:?}"
        );
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // Nothing was applied, nothing happened.
    let mut c = agent.client().await;
    let list = c
        .list(pb::ListRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert!(list.services.is_empty(), "applied: {:?}", list.services);
    let node = c.node(pb::NodeRequest {}).await.expect("node").into_inner();
    assert_eq!((node.services, node.instances), (0, 0));
    let mut events = c
        .watch(pb::WatchRequest {
            from_index: 0,
            follow: false,
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner();
    let first = events.message().await.expect("events");
    assert!(first.is_none(), "an event was recorded: {first:?}");
    assert!(
        !agent.state_dir.join("logs").join("hostile-0").exists(),
        "an instance of the hostile service was started"
    );
}

/// Scale is held to the rules of Apply for the new count: a fixed port cannot be shared by
/// several instances on the host's network, so scaling such a service past one instance is
/// refused and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_cannot_make_a_spec_invalid() {
    if skip_unless_root("scale_cannot_make_a_spec_invalid") {
        return;
    }
    let agent = Agent::start().await;
    agent
        .apply(
            "name = \"fixed\"\ncommand = [\"/bin/true\"]\nreplicas = 0\n[ports]\nadmin = 18081\n",
        )
        .await
        .expect("a fixed port is valid with at most one instance");
    let mut c = agent.client().await;
    let e = c
        .scale(pb::ScaleRequest {
            name: "fixed".into(),
            replicas: 3,
            ..Default::default()
        })
        .await
        .expect_err("three instances on one fixed port");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains("ports.admin:") && e.message().contains("collide"),
        "{}",
        e.message()
    );
    let s = agent.get("fixed").await.expect("get");
    assert_eq!((s.desired, s.revision), (0, 1), "nothing changed");
    assert_eq!(s.spec.and_then(|s| s.replicas), Some(0));
    agent.delete("fixed").await.expect("delete");
}
