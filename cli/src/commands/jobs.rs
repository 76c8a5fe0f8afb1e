//! Jobs: `run` (a run now, optionally waited for, or a one-off job file applied, run and
//! deleted), `runs` (a job's kept runs), `cancel`, and `logs NAME --run N`.

use std::io::Write;
use std::time::Duration;

use anyhow::{Context, bail};
use corral_proto::v1 as pb;
use corral_proto::v1::apply_request::Source;
use serde_json::json;

use super::Outcome;
use super::apply::read_spec;
use crate::args::{ConnectArgs, Format, LogTarget, LogsArgs, RunArgs};
use crate::client;
use crate::render;

/// How often a waited-for run is looked at.
const POLL: Duration = Duration::from_millis(100);

pub async fn run(
    conn: &ConnectArgs,
    format: Format,
    args: &RunArgs,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> anyhow::Result<Outcome> {
    let mut session = client::connect(conn).await?;
    let name = match (&args.name, &args.file) {
        (Some(name), _) => name.clone(),
        (None, Some(file)) => {
            let text = read_spec(file).with_context(|| format!("{}", file.display()))?;
            let applied = session
                .apply(pb::ApplyRequest {
                    source: Some(Source::SpecToml(text)),
                    dry_run: false,
                    force: false,
                    expected_revision: None,
                })
                .await
                .with_context(|| format!("{}", file.display()))?;
            applied.name
        }
        (None, None) => bail!("give a job's name or -f FILE"),
    };
    let started = session.run_job(&name, args.overrides()).await?;
    if !args.wait {
        match format {
            Format::Json => render::write_json(out, &run_json(&started))?,
            Format::Table => writeln!(out, "{}", started.id)?,
        }
        return Ok(Outcome::Success);
    }
    if format == Format::Table && args.file.is_none() {
        writeln!(err, "{} started", started.id)?;
    }
    // With -f the run's output is streamed while it runs: the logs of every instance of the
    // job, which is this run's alone.
    let mut logs = match &args.file {
        Some(_) => Some(
            client::connect(conn)
                .await?
                .logs(pb::LogsRequest {
                    service: name.clone(),
                    instance: String::new(),
                    follow: true,
                    tail: None,
                    since: None,
                })
                .await?,
        ),
        None => None,
    };
    // Lines printed per instance, so that the read after the end prints only the rest.
    let mut printed: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    let mut ticker = tokio::time::interval(POLL);
    let ended = loop {
        tokio::select! {
            line = async { match logs.as_mut() { Some(l) => l.next().await, None => std::future::pending().await } } => {
                match line {
                    Ok(Some(line)) => {
                        render::write_log_line(out, &line)?;
                        out.flush()?;
                        *printed.entry(line.instance.clone()).or_default() += 1;
                    }
                    // The stream ended or failed: the run is still waited for.
                    _ => logs = None,
                }
            }
            _ = ticker.tick() => {
                let r = session.get_run(&started.id).await?;
                if !r.outcome.is_empty() {
                    break r;
                }
            }
        }
    };
    // The rest of the run's output, from its instances' files: what was written just before
    // the end, and all of it for a run that ended before the follow found its instance (the
    // service-wide follow sees only instances that exist).
    if args.file.is_some() {
        drop(logs);
        for instance in &ended.instances {
            let mut replies = session
                .logs(pb::LogsRequest {
                    service: String::new(),
                    instance: instance.id.clone(),
                    follow: false,
                    tail: None,
                    since: None,
                })
                .await?;
            let mut skip = printed.get(&instance.id).copied().unwrap_or(0);
            while let Some(line) = replies.next().await? {
                if skip > 0 {
                    skip -= 1;
                    continue;
                }
                render::write_log_line(out, &line)?;
            }
        }
    }
    if args.rm {
        session
            .delete(&name, false, None)
            .await
            .with_context(|| format!("deleting job {name:?} after its run"))?;
    }
    match format {
        Format::Json => render::write_json(out, &run_json(&ended))?,
        Format::Table => writeln!(err, "{} {}", ended.id, ended.outcome)?,
    }
    Ok(Outcome::Exit(u8::try_from(ended.exit_code).unwrap_or(1)))
}

pub async fn runs(
    conn: &ConnectArgs,
    format: Format,
    name: &str,
    out: &mut dyn Write,
) -> anyhow::Result<Outcome> {
    let runs = client::connect(conn).await?.list_runs(name).await?.runs;
    match format {
        Format::Json => {
            render::write_json(out, &runs.iter().map(run_json).collect::<Vec<_>>())?;
        }
        Format::Table => {
            let time = |t: &Option<prost_types::Timestamp>| {
                t.as_ref()
                    .and_then(render::time_seconds)
                    .unwrap_or_else(|| "-".to_owned())
            };
            writeln!(
                out,
                "{:<24} {:<9} {:<20} {:<20} {:<18} ATTEMPTS",
                "RUN", "TRIGGER", "STARTED", "ENDED", "OUTCOME"
            )?;
            for r in &runs {
                let outcome = match (r.outcome.as_str(), r.stopping.as_str()) {
                    ("", "") => "running".to_owned(),
                    ("", stopping) => format!("stopping ({stopping})"),
                    (outcome, _) => outcome.to_owned(),
                };
                writeln!(
                    out,
                    "{:<24} {:<9} {:<20} {:<20} {:<18} {}",
                    r.id,
                    r.trigger,
                    time(&r.started_at),
                    time(&r.ended_at),
                    outcome,
                    r.attempts
                )?;
            }
        }
    }
    Ok(Outcome::Success)
}

pub async fn cancel(
    conn: &ConnectArgs,
    format: Format,
    id: &str,
    out: &mut dyn Write,
) -> anyhow::Result<Outcome> {
    let r = client::connect(conn).await?.cancel_run(id).await?;
    match format {
        Format::Json => render::write_json(out, &run_json(&r))?,
        Format::Table if r.outcome.is_empty() => writeln!(out, "{} stopping", r.id)?,
        Format::Table => writeln!(out, "{} {}", r.id, r.outcome)?,
    }
    Ok(Outcome::Success)
}

/// `logs NAME --run N`: the output of the run's instances, one after the other.
pub async fn run_logs(
    conn: &ConnectArgs,
    format: Format,
    args: &LogsArgs,
    out: &mut dyn Write,
) -> anyhow::Result<Outcome> {
    let LogTarget::Service(name) = &args.target else {
        bail!("--run takes a job's name, not an instance");
    };
    let number = args.run.unwrap_or_default();
    let mut session = client::connect(conn).await?;
    let r = session.get_run(&format!("{name}-r{number}")).await?;
    if args.follow && r.instances.len() > 1 {
        bail!(
            "-f follows one instance: run {} has {}; follow one with `corral logs {}`",
            r.id,
            r.instances.len(),
            r.instances.first().map_or("", |i| i.id.as_str())
        );
    }
    for instance in &r.instances {
        let mut replies = session
            .logs(pb::LogsRequest {
                service: String::new(),
                instance: instance.id.clone(),
                follow: args.follow,
                tail: args.tail,
                since: None,
            })
            .await?;
        while let Some(line) = replies.next().await? {
            match format {
                Format::Json => render::write_json_line(out, &log_json(&line))?,
                Format::Table => render::write_log_line(out, &line)?,
            }
        }
    }
    Ok(Outcome::Success)
}

fn log_json(l: &pb::LogLine) -> serde_json::Value {
    json!({
        "instance": l.instance,
        "stream": l.stream,
        "time": l.time.as_ref().and_then(render::time_millis),
        "text": l.text,
    })
}

fn run_json(r: &pb::JobRun) -> serde_json::Value {
    let time = |t: &Option<prost_types::Timestamp>| t.as_ref().and_then(render::time_millis);
    json!({
        "id": r.id,
        "job": r.job,
        "number": r.number,
        "trigger": r.trigger,
        "revision": r.revision,
        "due": time(&r.due),
        "started_at": time(&r.started_at),
        "ended_at": time(&r.ended_at),
        "outcome": (!r.outcome.is_empty()).then_some(&r.outcome),
        "exit_code": (!r.outcome.is_empty()).then_some(r.exit_code),
        "stopping": (!r.stopping.is_empty()).then_some(&r.stopping),
        "attempts": r.attempts,
        "overrides": r.overrides.as_ref().map(|o| json!({
            "command": (!o.command.is_empty()).then_some(&o.command),
            "args": (!o.args.is_empty()).then_some(&o.args),
            "env": (!o.env.is_empty()).then_some(&o.env),
            "timeout": (!o.timeout.is_empty()).then_some(&o.timeout),
            "parallelism": (o.parallelism > 0).then_some(o.parallelism),
        })),
        "instances": r.instances.iter().map(|i| json!({
            "id": i.id, "index": i.index, "attempts": i.attempts,
            "end": (!i.end.is_empty()).then_some(&i.end),
        })).collect::<Vec<_>>(),
    })
}
