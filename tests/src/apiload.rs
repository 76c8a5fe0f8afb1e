//! A bounded load of mixed API calls from many clients: every call's outcome is checked
//! against what that call may answer (an `admin` client may be told a rollout is running, a
//! `read` client that it may not change anything), and anything else is reported.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tonic::Code;
use tonic::transport::Channel;

use crate::pb;
use crate::pb::agent_client::AgentClient;

/// One client of the load.
#[derive(Debug, Clone)]
pub struct Client {
    pub api: AgentClient<Channel>,
    /// Whether it may change things.
    pub admin: bool,
}

/// What the load saw.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Calls made, by method.
    pub calls: BTreeMap<&'static str, u64>,
    /// Expected refusals, by method and code.
    pub refusals: BTreeMap<String, u64>,
    /// Outcomes no call may have: the method, the code and the message.
    pub unexpected: Vec<String>,
    /// `Get` latencies.
    pub get_latency: Vec<Duration>,
    /// Time spent in calls, by method.
    pub time: BTreeMap<&'static str, Duration>,
}

impl Outcome {
    pub fn total(&self) -> u64 {
        self.calls.values().sum()
    }

    fn merge(&mut self, o: Outcome) {
        for (k, v) in o.calls {
            *self.calls.entry(k).or_default() += v;
        }
        for (k, v) in o.refusals {
            *self.refusals.entry(k).or_default() += v;
        }
        self.unexpected.extend(o.unexpected);
        self.get_latency.extend(o.get_latency);
        for (k, v) in o.time {
            *self.time.entry(k).or_default() += v;
        }
    }

    /// Mean time per call, by method.
    pub fn mean_times(&self) -> BTreeMap<&'static str, Duration> {
        self.time
            .iter()
            .map(|(k, t)| {
                (
                    *k,
                    *t / u32::try_from(self.calls.get(k).copied().unwrap_or(1).max(1))
                        .unwrap_or(u32::MAX),
                )
            })
            .collect()
    }
}

/// When a load ends.
#[derive(Debug, Clone, Copy)]
pub enum Until {
    /// After this long (each client stops after its call in flight).
    Elapsed(Duration),
    /// After this many calls in all.
    Calls(u64),
}

/// Run mixed calls against service `service` (which must exist) from every client, until
/// `until`, and with a hard limit of `limit` whatever happens.
pub async fn run(clients: Vec<Client>, service: &str, spec_toml: &str, until: Until) -> Outcome {
    let limit = Duration::from_secs(600);
    let started = Instant::now();
    let n = clients.len().max(1) as u64;
    let mut tasks = Vec::new();
    for (i, client) in clients.into_iter().enumerate() {
        let service = service.to_string();
        let spec = spec_toml.to_string();
        tasks.push(tokio::spawn(async move {
            let mut out = Outcome::default();
            let mut k = i as u64;
            let per_client = match until {
                Until::Calls(c) => c / n + u64::from((i as u64) < c % n),
                Until::Elapsed(_) => u64::MAX,
            };
            let mut made = 0;
            while made < per_client && started.elapsed() < limit {
                if let Until::Elapsed(d) = until
                    && started.elapsed() >= d
                {
                    break;
                }
                one_call(&client, &service, &spec, k, &mut out).await;
                made += 1;
                k += 1;
            }
            out
        }));
    }
    let mut all = Outcome::default();
    for t in tasks {
        match t.await {
            Ok(o) => all.merge(o),
            Err(e) => all.unexpected.push(format!("client task: {e}")),
        }
    }
    all
}

/// Read a streaming reply to its end.
async fn drain<T>(
    reply: Result<tonic::Response<tonic::Streaming<T>>, tonic::Status>,
) -> Result<(), tonic::Status> {
    let mut s = reply?.into_inner();
    while s.message().await?.is_some() {}
    Ok(())
}

async fn one_call(client: &Client, service: &str, spec: &str, k: u64, out: &mut Outcome) {
    let mut api = client.api.clone();
    let admin = client.admin;
    let denied = |c: Code| !admin && c == Code::PermissionDenied;
    let began = Instant::now();
    // (method, result code, message)
    let (method, result): (&'static str, Result<(), tonic::Status>) = match k % 10 {
        0 | 5 => {
            let t = Instant::now();
            let r = api
                .get(pb::GetRequest {
                    name: service.into(),
                })
                .await;
            out.get_latency.push(t.elapsed());
            ("Get", r.map(|_| ()))
        }
        1 => (
            "List",
            api.list(pb::ListRequest::default()).await.map(|_| ()),
        ),
        2 => ("Node", api.node(pb::NodeRequest {}).await.map(|_| ())),
        3 => {
            let r = api
                .watch(pb::WatchRequest {
                    last: 20,
                    ..Default::default()
                })
                .await;
            ("Watch", drain(r).await)
        }
        4 => {
            let r = api
                .logs(pb::LogsRequest {
                    service: service.into(),
                    tail: Some(5),
                    ..Default::default()
                })
                .await;
            ("Logs", drain(r).await)
        }
        6 => (
            "Apply",
            api.apply(pb::ApplyRequest {
                source: Some(pb::apply_request::Source::SpecToml(spec.into())),
                dry_run: true,
                force: false,
                ..Default::default()
            })
            .await
            .map(|_| ()),
        ),
        7 => (
            "Restart",
            api.restart(pb::RestartRequest {
                name: service.into(),
                force: false,
                ..Default::default()
            })
            .await
            .map(|_| ()),
        ),
        8 => {
            let r = api
                .get(pb::GetRequest {
                    name: service.into(),
                })
                .await;
            let r = match r {
                Ok(s) => match s.into_inner().rollout {
                    Some(ro) => api
                        .get_rollout(pb::GetRolloutRequest { id: ro.id })
                        .await
                        .map(|_| ()),
                    None => Ok(()),
                },
                Err(e) => Err(e),
            };
            ("GetRollout", r)
        }
        _ => (
            "Get unknown",
            api.get(pb::GetRequest {
                name: "no-such-service".into(),
            })
            .await
            .map(|_| ()),
        ),
    };
    *out.calls.entry(method).or_default() += 1;
    *out.time.entry(method).or_default() += began.elapsed();
    let Err(status) = result else {
        if method == "Get unknown" {
            out.unexpected
                .push("Get of an unknown service succeeded".to_string());
        }
        return;
    };
    let code = status.code();
    let expected = match method {
        "Apply" => denied(code),
        // One rollout at a time: a restart while one runs is refused.
        "Restart" => denied(code) || (admin && code == Code::FailedPrecondition),
        // The kept rollouts are bounded: an old id may be gone.
        "GetRollout" => code == Code::NotFound,
        "Get unknown" => code == Code::NotFound,
        _ => false,
    };
    if expected {
        *out.refusals
            .entry(format!("{method} {code:?}"))
            .or_default() += 1;
    } else {
        out.unexpected.push(format!(
            "{method} ({}): {code:?} {}",
            if admin { "admin" } else { "read" },
            status.message()
        ));
    }
}
