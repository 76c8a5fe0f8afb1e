//! The commands run in-process against a small fake agent served over a real Unix socket: what
//! they send, what they print, and which exit code each result maps to.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use clap::Parser;
use corral_proto::v1::agent_server::{Agent, AgentServer};
use corral_proto::v1::apply_request::Source;
use corral_proto::v1::{
    ApplyRequest, ApplyResponse, DeleteRequest, DeleteResponse, GetRequest, InstanceState,
    InstanceStatus, ListRequest, ListResponse, NodeInfo, NodeRequest, ScaleRequest, ScaleResponse,
    ServiceSpec, ServiceStatus,
};
use serde_json::Value;
use tempfile::TempDir;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::Server;
use tonic::{Request, Response, Status};

use crate::args::Cli;
use crate::{commands, finish};

const BAD_MEMORY: &str = r#"resources.memory: "12XB" is not a size"#;

/// Services by name: revision, replicas and the spec text last applied.
type Services = BTreeMap<String, (u64, u32, String)>;

/// Just enough of an agent: takes the service's name from the spec text, refuses a spec whose
/// memory is "12XB" as the real agent would, and records every apply request.
#[derive(Debug, Default, Clone)]
struct FakeAgent {
    services: Arc<Mutex<Services>>,
    applied: Arc<Mutex<Vec<ApplyRequest>>>,
}

fn spec_name(text: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let value = line.trim().strip_prefix("name")?.trim().strip_prefix('=')?;
        Some(value.trim().trim_matches('"').to_owned())
    })
}

fn status_of(name: &str, revision: u64, replicas: u32) -> ServiceStatus {
    ServiceStatus {
        name: name.to_owned(),
        revision,
        health: "healthy".into(),
        spec: Some(ServiceSpec {
            name: name.to_owned(),
            command: vec!["/bin/sleep".into(), "infinity".into()],
            replicas: Some(replicas),
            ..Default::default()
        }),
        desired: replicas,
        running: replicas,
        healthy: replicas,
        instances: (0..replicas)
            .map(|index| InstanceStatus {
                id: format!("{name}-{index}"),
                index,
                revision,
                state: InstanceState::Running as i32,
                pid: 1000 + i32::try_from(index).unwrap(),
                ..Default::default()
            })
            .collect(),
        deleting: false,
    }
}

#[tonic::async_trait]
impl Agent for FakeAgent {
    type WatchStream =
        tokio_stream::wrappers::ReceiverStream<Result<corral_proto::v1::Event, Status>>;

    async fn watch(
        &self,
        _: Request<corral_proto::v1::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        Err(Status::unimplemented("not in this fake"))
    }

    type LogsStream =
        tokio_stream::wrappers::ReceiverStream<Result<corral_proto::v1::LogLine, Status>>;

    async fn logs(
        &self,
        _: Request<corral_proto::v1::LogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        Err(Status::unimplemented("not in this fake"))
    }

    async fn apply(
        &self,
        request: Request<ApplyRequest>,
    ) -> Result<Response<ApplyResponse>, Status> {
        let req = request.into_inner();
        self.applied.lock().unwrap().push(req.clone());
        let Some(Source::SpecToml(text)) = req.source else {
            return Err(Status::invalid_argument("expected spec_toml"));
        };
        if text.contains("12XB") {
            return Err(Status::invalid_argument(BAD_MEMORY));
        }
        let name = spec_name(&text).ok_or_else(|| Status::invalid_argument("name: missing"))?;
        let mut services = self.services.lock().unwrap();
        let (outcome, revision, changes) = match services.get(&name) {
            None => ("created", 1, vec![]),
            Some((rev, _, old)) if *old == text => ("unchanged", *rev, vec![]),
            Some((rev, _, _)) => ("updated", rev + 1, vec!["command: changed".to_owned()]),
        };
        if !req.dry_run {
            services.insert(name.clone(), (revision, 1, text));
        }
        Ok(Response::new(ApplyResponse {
            name,
            revision,
            outcome: outcome.to_owned(),
            replaces_instances: outcome == "updated",
            changes,
        }))
    }

    async fn delete(
        &self,
        request: Request<DeleteRequest>,
    ) -> Result<Response<DeleteResponse>, Status> {
        let name = request.into_inner().name;
        match self.services.lock().unwrap().remove(&name) {
            Some((_, replicas, _)) => Ok(Response::new(DeleteResponse {
                name,
                stopped_instances: replicas,
            })),
            None => Err(Status::not_found(format!("service \"{name}\" not found"))),
        }
    }

    async fn get(&self, request: Request<GetRequest>) -> Result<Response<ServiceStatus>, Status> {
        let name = request.into_inner().name;
        let services = self.services.lock().unwrap();
        let (revision, replicas, _) = services
            .get(&name)
            .ok_or_else(|| Status::not_found(format!("service \"{name}\" not found")))?;
        Ok(Response::new(status_of(&name, *revision, *replicas)))
    }

    async fn list(&self, _: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        let services = self.services.lock().unwrap();
        Ok(Response::new(ListResponse {
            // Newest first, so that the client's own ordering is what the test sees.
            services: services
                .iter()
                .rev()
                .map(|(name, (rev, replicas, _))| status_of(name, *rev, *replicas))
                .collect(),
        }))
    }

    async fn scale(
        &self,
        request: Request<ScaleRequest>,
    ) -> Result<Response<ScaleResponse>, Status> {
        let req = request.into_inner();
        let mut services = self.services.lock().unwrap();
        let entry = services
            .get_mut(&req.name)
            .ok_or_else(|| Status::not_found(format!("service \"{}\" not found", req.name)))?;
        let previous = std::mem::replace(&mut entry.1, req.replicas);
        Ok(Response::new(ScaleResponse {
            name: req.name,
            previous,
            replicas: req.replicas,
        }))
    }

    async fn node(&self, _: Request<NodeRequest>) -> Result<Response<NodeInfo>, Status> {
        Err(Status::internal("host snapshot failed"))
    }

    async fn signal(
        &self,
        req: Request<corral_proto::v1::SignalRequest>,
    ) -> Result<Response<corral_proto::v1::SignalResponse>, Status> {
        let r = req.into_inner();
        Ok(Response::new(corral_proto::v1::SignalResponse {
            instance: r.instance,
            signal: r.signal,
            pid: 4242,
        }))
    }
}

/// A fake agent listening on a socket in a fresh temp dir.
struct Served {
    dir: TempDir,
    socket: PathBuf,
    agent: FakeAgent,
}

impl Served {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("corral.sock");
        let incoming = UnixListenerStream::new(UnixListener::bind(&socket).unwrap());
        let agent = FakeAgent::default();
        let server = Server::builder()
            .add_service(AgentServer::new(agent.clone()))
            .serve_with_incoming(incoming);
        tokio::spawn(server);
        Served { dir, socket, agent }
    }

    fn addr(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    fn write_spec(&self, file: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(file);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).unwrap();
        }
        fs::write(&path, text).unwrap();
        path
    }

    async fn run(&self, args: &[&str]) -> Run {
        run_at(&self.addr(), args).await
    }
}

/// What a command line printed and the exit code it ended with.
#[derive(Debug)]
struct Run {
    code: u8,
    out: String,
    err: String,
}

async fn run_at(addr: &str, args: &[&str]) -> Run {
    let argv = ["corral", "--addr", addr]
        .into_iter()
        .chain(args.iter().copied());
    let cli = Cli::try_parse_from(argv).unwrap();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let result = commands::run(cli, &mut out, &mut err).await;
    let code = finish(result, &mut err);
    Run {
        code,
        out: String::from_utf8(out).unwrap(),
        err: String::from_utf8(err).unwrap(),
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

const WEB: &str = "name = \"web\"\ncommand = [\"/bin/sleep\", \"infinity\"]\n";

#[tokio::test]
async fn apply_sends_the_file_text_and_prints_the_outcome() {
    let agent = Served::start().await;
    let file = agent.write_spec("web.toml", WEB);

    let run = agent.run(&["apply", "-f", path_str(&file)]).await;
    assert_eq!(
        (run.code, run.out.as_str(), run.err.as_str()),
        (0, "web: created (revision 1)\n", "")
    );
    let sent = agent.agent.applied.lock().unwrap().clone();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].source, Some(Source::SpecToml(WEB.to_owned())));
    assert!(!sent[0].dry_run);

    let run = agent.run(&["apply", "-f", path_str(&file)]).await;
    assert_eq!(run.out, "web: unchanged (revision 1)\n");

    let file = agent.write_spec("web.toml", &format!("{WEB}# new\n"));
    let run = agent
        .run(&["apply", "-f", path_str(&file), "--dry-run"])
        .await;
    assert_eq!(
        run.out,
        "web: would be updated, instances would be replaced\n  command: changed\n"
    );
    assert!(agent.agent.applied.lock().unwrap()[2].dry_run);
    let run = agent.run(&["apply", "-f", path_str(&file)]).await;
    assert_eq!(
        run.out,
        "web: updated to revision 2, instances will be replaced\n  command: changed\n"
    );
}

#[tokio::test]
async fn a_refused_spec_shows_the_agents_message_verbatim_and_exits_1() {
    let agent = Served::start().await;
    let file = agent.write_spec(
        "web.toml",
        "name = \"web\"\n[resources]\nmemory = \"12XB\"\n",
    );
    let run = agent.run(&["apply", "-f", path_str(&file)]).await;
    assert_eq!(run.code, 1);
    assert_eq!(run.out, "");
    assert_eq!(
        run.err,
        format!("error: {}: {BAD_MEMORY}\n", file.display())
    );

    let run = agent.run(&["diff", "-f", path_str(&file)]).await;
    assert_eq!(run.code, 1);
    assert_eq!(
        run.err,
        format!("error: {}: {BAD_MEMORY}\n", file.display())
    );
}

#[tokio::test]
async fn apply_of_a_directory_reports_each_file_and_carries_on() {
    let agent = Served::start().await;
    agent.write_spec("specs/b-bad.toml", "name = \"b\"\nmemory = \"12XB\"\n");
    agent.write_spec("specs/c.toml", "name = \"c\"\n");
    agent.write_spec("specs/a.toml", "name = \"a\"\n");
    agent.write_spec("specs/notes.txt", "name = \"ignored\"\n");
    let dir = agent.dir.path().join("specs");

    let run = agent.run(&["apply", "-f", path_str(&dir)]).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert_eq!(
        run.out,
        "a: created (revision 1)\nc: created (revision 1)\n"
    );
    assert_eq!(
        run.err,
        format!(
            "error: {}: {BAD_MEMORY}\n",
            dir.join("b-bad.toml").display()
        )
    );

    let run = agent
        .run(&["apply", "-f", path_str(&dir), "-o", "json"])
        .await;
    assert_eq!(run.code, 1);
    let doc: Value = serde_json::from_str(&run.out).unwrap();
    let files: Vec<&str> = doc
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["file"].as_str().unwrap())
        .collect();
    assert_eq!(files.len(), 3);
    assert!(
        files[0].ends_with("a.toml") && files[2].ends_with("c.toml"),
        "{files:?}"
    );
    assert_eq!(doc[0]["outcome"], "unchanged");
    assert_eq!(doc[1]["error"], BAD_MEMORY);
    assert_eq!(doc[1]["name"], Value::Null);
    assert_eq!(doc[2]["name"], "c");
}

#[tokio::test]
async fn diff_applies_nothing() {
    let agent = Served::start().await;
    let file = agent.write_spec("web.toml", WEB);
    let run = agent.run(&["diff", "-f", path_str(&file)]).await;
    assert_eq!((run.code, run.out.as_str()), (0, "web: would be created\n"));
    assert!(agent.agent.applied.lock().unwrap()[0].dry_run);
    assert!(agent.agent.services.lock().unwrap().is_empty());

    let run = agent
        .run(&["diff", "-f", path_str(&file), "-o", "json"])
        .await;
    let doc: Value = serde_json::from_str(&run.out).unwrap();
    assert_eq!(doc["outcome"], "created");
    assert_eq!(doc["dry_run"], true);
}

#[tokio::test]
async fn ls_status_scale_delete_round_trip() {
    let agent = Served::start().await;
    for name in ["api", "web"] {
        let file = agent.write_spec(&format!("{name}.toml"), &format!("name = \"{name}\"\n"));
        assert_eq!(agent.run(&["apply", "-f", path_str(&file)]).await.code, 0);
    }

    let run = agent.run(&["scale", "web", "3"]).await;
    assert_eq!(
        (run.code, run.out.as_str()),
        (0, "web: scaled from 1 to 3 replicas\n")
    );

    let run = agent.run(&["ls"]).await;
    assert_eq!(
        run.out,
        "NAME  REVISION  DESIRED  RUNNING  HEALTHY\n\
         api   1         1        1        1\n\
         web   1         3        3        3\n"
    );
    let run = agent.run(&["ls", "-o", "json"]).await;
    let doc: Value = serde_json::from_str(&run.out).unwrap();
    assert_eq!(doc[0]["name"], "api");
    assert_eq!(doc[1]["instances"][2]["state"], "running");
    assert_eq!(doc[1]["instances"][2]["pid"], 1002);

    let run = agent.run(&["status", "web"]).await;
    assert_eq!(run.code, 0);
    assert!(run.out.starts_with("service:    web\n"), "{}", run.out);
    assert!(
        run.out.contains("\nweb-2     running  1002  0"),
        "{}",
        run.out
    );

    let run = agent.run(&["delete", "web", "-o", "json"]).await;
    let doc: Value = serde_json::from_str(&run.out).unwrap();
    assert_eq!(
        doc,
        serde_json::json!({"name": "web", "stopped_instances": 3})
    );

    let run = agent.run(&["status", "web"]).await;
    assert_eq!((run.code, run.out.as_str()), (1, ""));
    assert_eq!(run.err, "error: service \"web\" not found\n");
}

#[tokio::test]
async fn an_empty_agent_lists_nothing() {
    let agent = Served::start().await;
    let run = agent.run(&["ls"]).await;
    assert_eq!(
        (run.code, run.out.as_str(), run.err.as_str()),
        (0, "", "no services\n")
    );
    let run = agent.run(&["ls", "-o", "json"]).await;
    assert_eq!((run.code, run.out.as_str()), (0, "[]\n"));
}

#[tokio::test]
async fn other_server_errors_name_their_code() {
    let agent = Served::start().await;
    let run = agent.run(&["node"]).await;
    assert_eq!(run.code, 1);
    assert_eq!(run.err, "error: internal error: host snapshot failed\n");
}

#[tokio::test]
async fn a_missing_socket_is_a_connection_error() {
    let dir = tempfile::tempdir().unwrap();
    let addr = format!("unix://{}", dir.path().join("corral.sock").display());
    let run = run_at(&addr, &["ls"]).await;
    assert_eq!(run.code, 1);
    assert_eq!(run.out, "");
    assert_eq!(
        run.err,
        format!(
            "error: cannot connect to {addr}: no such socket — is corrald running? \
             (--addr or CORRAL_ADDR picks another socket)\n"
        )
    );
}

#[tokio::test]
async fn a_socket_nobody_listens_on_is_a_connection_error() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("corral.sock");
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    let addr = format!("unix://{}", socket.display());
    let run = run_at(&addr, &["status", "web"]).await;
    assert_eq!(run.code, 1);
    assert!(
        run.err.starts_with(&format!(
            "error: cannot connect to {addr}: connection refused"
        )),
        "{}",
        run.err
    );
}

#[tokio::test]
async fn a_missing_spec_file_is_reported_before_connecting() {
    let run = run_at(
        "unix:///nonexistent/corral.sock",
        &["apply", "-f", "/nonexistent/web.toml"],
    )
    .await;
    assert_eq!(run.code, 1);
    assert!(
        run.err
            .starts_with("error: cannot read /nonexistent/web.toml: "),
        "{}",
        run.err
    );
}

#[tokio::test]
async fn plaintext_tcp_is_refused() {
    let run = run_at("http://127.0.0.1:7443", &["ls"]).await;
    assert_eq!(run.code, 1);
    assert!(
        run.err.contains("plaintext TCP is not offered"),
        "{}",
        run.err
    );
}
