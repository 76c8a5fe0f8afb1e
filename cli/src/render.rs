//! What `-o table` prints: aligned tables and `key: value` blocks for people, and the human
//! forms of sizes (`12.3MiB`), durations (`3m12s`) and CPU time.
//!
//! Rendering is pure apart from writing to the `out` it is given; the current time is passed in
//! so that uptimes and "next start in" are testable. JSON output lives in `views`.

use std::io::{self, Write};
use std::path::Path;
use std::time::{Duration, SystemTime};

use corral_proto::v1 as pb;
use serde::Serialize;

use crate::views::{
    TopRowView, apply_outcome_name, event_type_name, health_name, owner_name, rfc3339,
    rollout_kind_name, rollout_state_name, service_health_name, state_name,
};

/// Writes `value` as one pretty-printed JSON document followed by a newline.
pub fn write_json<T: Serialize>(out: &mut dyn Write, value: &T) -> io::Result<()> {
    serde_json::to_writer_pretty(&mut *out, value)?;
    writeln!(out)
}

/// Writes `value` as one compact JSON document on one line (JSON Lines).
pub fn write_json_line<T: Serialize>(out: &mut dyn Write, value: &T) -> io::Result<()> {
    serde_json::to_writer(&mut *out, value)?;
    writeln!(out)
}

/// A timestamp in UTC to the millisecond, always 24 characters: `2026-11-22T23:45:01.123Z`;
/// `None` outside the years 1–9999.
pub fn time_millis(ts: &prost_types::Timestamp) -> Option<String> {
    let ts = ts.normalized();
    let whole = rfc3339(&prost_types::Timestamp {
        seconds: ts.seconds,
        nanos: 0,
    })?;
    let base = whole.strip_suffix('Z').unwrap_or(&whole);
    Some(format!("{base}.{:03}Z", ts.nanos / 1_000_000))
}

/// A timestamp in UTC to the second: `2026-11-22T23:45:01Z`.
pub fn time_seconds(ts: &prost_types::Timestamp) -> Option<String> {
    rfc3339(&prost_types::Timestamp {
        seconds: ts.normalized().seconds,
        nanos: 0,
    })
}

/// What the HEALTH columns show: the agent's word, or `-` for a service without a health
/// check (where "healthy" only repeats that the instance runs) and when the agent gave none.
fn health_cell(checked: bool, health: &str) -> String {
    if checked && !health.is_empty() {
        health.to_owned()
    } else {
        "-".to_owned()
    }
}

/// Whether a service has a health check; when its spec is missing from the reply, it is taken
/// to have one, so that the agent's word is shown.
pub fn health_checked(s: &pb::ServiceStatus) -> bool {
    s.spec.as_ref().is_none_or(|spec| spec.health.is_some())
}

/// A size in bytes with a binary unit and one decimal: `512B`, `12.3MiB`, `256MiB`.
/// Milliseconds from the wire as the spec writes durations: `100ms`, `2s`, `1m 30s`.
pub fn human_ms(ms: u64) -> String {
    humantime::format_duration(Duration::from_millis(ms)).to_string()
}

pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes}B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    // Step up while one decimal would round to 1024 or more ("1024.0KiB" reads as "1.0MiB").
    while value >= 1023.95 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    let text = format!("{value:.1}");
    let text = text.strip_suffix(".0").unwrap_or(&text);
    format!("{text}{}", UNITS[unit])
}

/// A duration, short and coarse as a table wants it: `350ms`, `1.2s`, `3m12s`, `5h3m`, `2d4h`.
pub fn human_duration(d: Duration) -> String {
    let secs = d.as_secs();
    if d < Duration::from_secs(1) {
        return format!("{}ms", d.as_millis());
    }
    if secs < 60 {
        let tenths = (d.as_millis() / 100).min(599);
        return format!("{}.{}s", tenths / 10, tenths % 10);
    }
    let (days, hours, mins) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60);
    if secs < 3600 {
        format!("{mins}m{}s", secs % 60)
    } else if secs < 86_400 {
        format!("{hours}h{mins}m")
    } else {
        format!("{days}d{hours}h")
    }
}

/// Total CPU time in seconds with two decimals: `12.34s`.
pub fn cpu_seconds(ns: u64) -> String {
    format!("{:.2}s", ns as f64 / 1e9)
}

/// Columns separated by two spaces, each as wide as its widest cell; the last is not padded.
#[derive(Debug)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: Vec<&'static str>) -> Self {
        Table::with_header(header.into_iter().map(str::to_owned).collect())
    }

    /// A table whose columns are known only at run time.
    pub fn with_header(header: Vec<String>) -> Self {
        Table {
            header,
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows
            .push(cells.into_iter().map(|c| one_line(&c)).collect());
    }

    pub fn write(&self, out: &mut dyn Write) -> io::Result<()> {
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate() {
                match widths.get_mut(i) {
                    Some(w) => *w = (*w).max(cell.chars().count()),
                    None => widths.push(cell.chars().count()),
                }
            }
        }
        for row in std::iter::once(&self.header).chain(&self.rows) {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                if i + 1 == row.len() {
                    line.push_str(cell);
                } else {
                    let pad = widths[i].saturating_sub(cell.chars().count());
                    line.push_str(cell);
                    line.extend(std::iter::repeat_n(' ', pad + 2));
                }
            }
            writeln!(out, "{}", line.trim_end())?;
        }
        Ok(())
    }
}

/// A cell on one line: control characters (a newline in an error message) become spaces.
pub fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// `key: value` lines with the values aligned; a multi-line value is indented to match.
fn write_fields(out: &mut dyn Write, fields: &[(&str, String)]) -> io::Result<()> {
    let width = fields.iter().map(|(k, _)| k.len() + 1).max().unwrap_or(0) + 2;
    for (key, value) in fields {
        let mut lines = value.lines();
        let first = lines.next().unwrap_or_default();
        writeln!(out, "{:<width$}{first}", format!("{key}:"))?;
        for line in lines {
            writeln!(out, "{:width$}{line}", "")?;
        }
    }
    Ok(())
}

/// `ls`: one line per service.
pub fn write_services(out: &mut dyn Write, services: &[pb::ServiceStatus]) -> io::Result<()> {
    let mut table = Table::new(vec![
        "NAME", "REVISION", "DESIRED", "RUNNING", "HEALTHY", "HEALTH", "SOURCE",
    ]);
    for s in services {
        let name = if s.deleting {
            format!("{} (deleting)", s.name)
        } else {
            s.name.clone()
        };
        table.row(vec![
            name,
            s.revision.to_string(),
            s.desired.to_string(),
            s.running.to_string(),
            s.healthy.to_string(),
            health_cell(true, service_health_name(s.health)),
            health_cell(true, owner_name(s.owner)),
        ]);
    }
    table.write(out)
}

/// `status NAME`: the service's header, then one line per instance and its last error if any.
pub fn write_status(out: &mut dyn Write, s: &pb::ServiceStatus, now: SystemTime) -> io::Result<()> {
    let spec = s.spec.clone().unwrap_or_default();
    let mut fields = vec![
        ("service", s.name.clone()),
        ("revision", s.revision.to_string()),
        (
            "instances",
            format!(
                "{} desired, {} running, {} healthy",
                s.desired, s.running, s.healthy
            ),
        ),
    ];
    let health = service_health_name(s.health);
    if !health.is_empty() {
        fields.push(("health", health.to_owned()));
    }
    let mut states = Vec::new();
    if s.deleting {
        states.push("deleting".to_owned());
    }
    if s.paused {
        states.push(format!("paused ({PAUSED_HINT})"));
    }
    if !states.is_empty() {
        fields.push(("state", states.join("\n")));
    }
    if let Some(rollout) = &s.rollout {
        fields.push(("rollout", rollout_summary(rollout)));
    }
    if spec.job.is_some() {
        let schedule = spec.schedule.as_ref().and_then(|x| x.cron.clone());
        fields.push((
            "job",
            match schedule {
                Some(cron) => format!("on schedule {cron:?} (and corral run {})", s.name),
                None => format!("runs when triggered (corral run {})", s.name),
            },
        ));
    }
    if let Some(next) = s.next_run_at.as_ref().and_then(time_seconds) {
        let local = if s.next_run_local.is_empty() {
            String::new()
        } else {
            format!(" ({})", s.next_run_local)
        };
        fields.push(("next run", format!("{next}{local}")));
    }
    if let Some(a) = &s.autoscale {
        fields.push((
            "autoscale",
            format!(
                "recommends {}: {}\n{} connections ({} queued), cpu {:.2} cores",
                a.recommended,
                autoscale_reason(a),
                a.connections,
                a.queued,
                a.cpu
            ),
        ));
    }
    if let Some(package) = &s.package {
        fields.push(("package", package_line(package, true)));
    }
    if !s.revisions.is_empty() {
        let revisions: Vec<String> = s.revisions.iter().map(u64::to_string).collect();
        fields.push(("revisions", revisions.join(", ")));
    }
    fields.push(("command", command_line(&spec.command)));
    fields.push((
        "user",
        spec.user
            .clone()
            .unwrap_or_else(|| "(the agent's user)".to_owned()),
    ));
    if let Some(workdir) = &spec.workdir {
        fields.push(("workdir", workdir.clone()));
    }
    fields.push(("limits", limits(spec.resources.as_ref())));
    if let Some(cgroup) = service_cgroup(s) {
        fields.push(("cgroup", cgroup));
    }
    write_fields(out, &fields)?;

    if s.instances.is_empty() {
        writeln!(out, "\nno instances")?;
        return Ok(());
    }
    writeln!(out)?;
    let checked = health_checked(s);
    let mut table = Table::new(vec![
        "INSTANCE",
        "STATE",
        "HEALTH",
        "PID",
        "RESTARTS",
        "LAST EXIT",
        "CPU",
        "MEMORY",
        "UPTIME/NEXT START",
        "RUN",
    ]);
    for i in &s.instances {
        table.row(vec![
            i.id.clone(),
            state_name(i.state).to_owned(),
            health_cell(checked, health_name(i.health)),
            if i.pid > 0 {
                i.pid.to_string()
            } else {
                "-".to_owned()
            },
            i.restarts.to_string(),
            i.last_exit
                .as_ref()
                .filter(|e| !e.text.is_empty())
                .map_or_else(|| "-".to_owned(), |e| e.text.clone()),
            i.usage
                .as_ref()
                .map_or_else(|| "-".to_owned(), |u| cpu_seconds(u.cpu_usage_ns)),
            i.usage
                .as_ref()
                .map_or_else(|| "-".to_owned(), |u| human_bytes(u.memory_bytes)),
            uptime_or_next_start(i, now),
            run_id(i.incarnation).unwrap_or_else(|| "-".to_owned()),
        ]);
    }
    table.write(out)?;

    // Why an instance failed to start, or what is known about how it last ended, why it is
    // unhealthy, and any output its init could not write to the logs.
    let mut notes: Vec<(&str, String)> = Vec::new();
    for i in &s.instances {
        let detail = i
            .last_exit
            .as_ref()
            .map(|e| e.detail.as_str())
            .unwrap_or_default();
        let note = if i.last_error.is_empty() {
            detail
        } else {
            i.last_error.as_str()
        };
        if !note.is_empty() {
            notes.push((i.id.as_str(), note.to_string()));
        }
        if checked && health_name(i.health) == "unhealthy" && !i.health_reason.is_empty() {
            notes.push((i.id.as_str(), format!("unhealthy: {}", i.health_reason)));
        }
        if i.log_lines_dropped > 0 {
            notes.push((
                i.id.as_str(),
                format!(
                    "{} log lines ({}) could not be written",
                    i.log_lines_dropped,
                    human_bytes(i.log_bytes_dropped)
                ),
            ));
        }
    }
    if !notes.is_empty() {
        writeln!(out)?;
        for (id, note) in notes {
            let mut lines = note.lines();
            writeln!(out, "{id}: {}", lines.next().unwrap_or_default())?;
            for line in lines {
                writeln!(out, "  {line}")?;
            }
        }
    }
    Ok(())
}

/// What `status` says of a paused service.
pub const PAUSED_HINT: &str = "a rollout failed; apply, restart or rollback to continue";

/// A rollout's kind and revisions: `restart, revision 2` or `update, revision 1 → 2`.
fn rollout_kind(r: &pb::RolloutStatus) -> String {
    let kind = match rollout_kind_name(r.kind) {
        "" => "rollout".to_owned(),
        kind => kind.to_owned(),
    };
    if r.from_revision == r.to_revision {
        format!("{kind}, revision {}", r.to_revision)
    } else {
        format!("{kind}, revision {} → {}", r.from_revision, r.to_revision)
    }
}

/// A rollout's counts: `2/4 replaced, 3/4 ready, 4 available`.
fn rollout_counts(r: &pb::RolloutStatus) -> String {
    format!(
        "{}/{} replaced, {}/{} ready, {} available",
        r.replaced, r.to_replace, r.ready, r.replicas, r.available
    )
}

/// How long a rollout that ended took, by the agent's clock.
pub fn rollout_took(r: &pb::RolloutStatus) -> Option<Duration> {
    let started = SystemTime::try_from(r.started_at?).ok()?;
    let finished = SystemTime::try_from(r.finished_at?).ok()?;
    finished.duration_since(started).ok()
}

/// A rollout in one or two lines, as `status` shows a service's running or last one:
/// `web-r3 (restart, revision 2) running: 2/4 replaced, 3/4 ready, 4 available`, or its
/// outcome, and what it is a rollback of or was rolled back by.
pub fn rollout_summary(r: &pb::RolloutStatus) -> String {
    let head = format!("{} ({})", one_line(&r.id), rollout_kind(r));
    let reason = if r.reason.is_empty() {
        String::new()
    } else {
        format!(": {}", one_line(&r.reason))
    };
    let mut text = match rollout_state_name(r.state) {
        "running" => format!("{head} running: {}", rollout_counts(r)),
        "succeeded" => match rollout_took(r) {
            Some(took) => format!("{head} succeeded in {}", human_duration(took)),
            None => format!("{head} succeeded"),
        },
        "" => format!("{head}: {}", rollout_counts(r)),
        state => format!("{head} {}{reason}", one_line(state)),
    };
    if !r.rollback_id.is_empty() {
        text.push_str(&format!("\nrolled back by {}", one_line(&r.rollback_id)));
    }
    if !r.rollback_of.is_empty() {
        text.push_str(&format!(
            "\nstarted by the failure of {}",
            one_line(&r.rollback_of)
        ));
    }
    text
}

/// A rollout policy: `max_surge 1, max_unavailable 0, min_healthy 2s, ...`, each part present.
fn policy_text(p: &pb::RolloutPolicy) -> String {
    let mut parts = Vec::new();
    if let Some(n) = p.max_surge {
        parts.push(format!("max_surge {n}"));
    }
    if let Some(n) = p.max_unavailable {
        parts.push(format!("max_unavailable {n}"));
    }
    if let Some(ms) = p.min_healthy_ms {
        parts.push(format!("min_healthy {}", human_ms(ms)));
    }
    if let Some(ms) = p.healthy_deadline_ms {
        parts.push(format!("healthy_deadline {}", human_ms(ms)));
    }
    if let Some(on) = p.auto_rollback {
        parts.push(format!("auto_rollback {}", if on { "on" } else { "off" }));
    }
    if let Some(cores) = p.start_cpu {
        parts.push(format!("start_cpu {cores}"));
    }
    parts.join(", ")
}

/// `rollout ID`: the rollout's fields, then its steps. `rollback` is the status of the
/// rollback it started, when known.
pub fn write_rollout(
    out: &mut dyn Write,
    r: &pb::RolloutStatus,
    rollback: Option<&pb::RolloutStatus>,
) -> io::Result<()> {
    let or_dash = |text: &str| {
        if text.is_empty() {
            "-".to_owned()
        } else {
            one_line(text)
        }
    };
    let time = |ts: &Option<prost_types::Timestamp>| ts.as_ref().and_then(time_millis);
    let mut fields = vec![
        ("rollout", or_dash(&r.id)),
        ("service", or_dash(&r.service)),
        ("kind", or_dash(rollout_kind_name(r.kind))),
        ("state", or_dash(rollout_state_name(r.state))),
        (
            "revision",
            if r.from_revision == r.to_revision {
                r.to_revision.to_string()
            } else {
                format!("{} → {}", r.from_revision, r.to_revision)
            },
        ),
        (
            "progress",
            format!(
                "{}/{} old replaced ({} left), {}/{} new ready ({} started), {} available",
                r.replaced,
                r.to_replace,
                r.old_instances,
                r.ready,
                r.replicas,
                r.new_instances,
                r.available
            ),
        ),
        (
            "policy",
            r.policy
                .as_ref()
                .map(policy_text)
                .filter(|p| !p.is_empty())
                .unwrap_or_else(|| "-".to_owned()),
        ),
        (
            "started",
            time(&r.started_at).unwrap_or_else(|| "-".to_owned()),
        ),
    ];
    if let Some(finished) = time(&r.finished_at) {
        let took =
            rollout_took(r).map_or_else(String::new, |d| format!(" (after {})", human_duration(d)));
        fields.push(("finished", format!("{finished}{took}")));
    }
    if !r.reason.is_empty() {
        fields.push(("reason", one_line(&r.reason)));
    }
    if !r.rollback_id.is_empty() {
        let state = rollback
            .map(|b| rollout_state_name(b.state))
            .filter(|state| !state.is_empty())
            .map_or_else(String::new, |state| format!(" ({state})"));
        fields.push((
            "rolled back by",
            format!("{}{state}", one_line(&r.rollback_id)),
        ));
    }
    if !r.rollback_of.is_empty() {
        fields.push(("rollback of", one_line(&r.rollback_of)));
    }
    write_fields(out, &fields)?;
    writeln!(out)?;
    if r.steps.is_empty() {
        return writeln!(out, "no steps yet");
    }
    let mut table = Table::new(vec!["TIME", "STEP", "INSTANCE", "MESSAGE"]);
    for step in &r.steps {
        table.row(vec![
            step.time
                .as_ref()
                .and_then(time_millis)
                .unwrap_or_else(|| "-".to_owned()),
            or_dash(&step.step),
            or_dash(&step.instance),
            step.message.clone(),
        ]);
    }
    table.write(out)
}

/// One step of a rollout on one line, as `--wait` prints them when not on a terminal:
/// `2026-11-22T23:45:01.123Z started web-5 started with revision 2`.
pub fn rollout_step_line(step: &pb::RolloutStep) -> String {
    let or_dash = |text: &str| {
        if text.is_empty() {
            "-".to_owned()
        } else {
            one_line(text)
        }
    };
    let time = step
        .time
        .as_ref()
        .and_then(time_millis)
        .unwrap_or_else(|| format!("{:<24}", "-"));
    let line = format!(
        "{time} {} {} {}",
        or_dash(&step.step),
        or_dash(&step.instance),
        one_line(&step.message)
    );
    line.trim_end().to_owned()
}

/// The width of the bar in [`rollout_progress_line`].
const BAR_WIDTH: u32 = 10;

/// A running rollout on one line, as `--wait` redraws it on a terminal:
/// `web-r3 restart rev 2 → 2  [#####-----]  2/4 replaced · 3/4 ready · 4 available · started web-5`.
/// The bar counts old instances stopped and new ones ready: it is full when the rollout is
/// complete.
/// A service's package (`[artifact]` or `[image]`) of a revision: its phase, how much of it
/// is done — when `bytes`, to the tenth of a MiB (`rev 2 fetching 3.0 MiB / 8.0 MiB (37%)`),
/// else in steps that change seldom, for printed lines (`rev 2 fetching 30% of 8.0 MiB`) —
/// and the reason when it failed.
pub fn package_line(p: &pb::PackageStatus, bytes: bool) -> String {
    let mut line = format!("rev {} {}", p.revision, one_line(&p.phase));
    if matches!(p.phase.as_str(), "fetching" | "unpacking") {
        let total = p.total.filter(|t| *t > 0);
        if bytes {
            line.push_str(&format!(" {}", mib(p.done)));
            if let Some(total) = total {
                let pct = p.done.saturating_mul(100) / total;
                line.push_str(&format!(" / {} ({}%)", mib(total), pct.min(100)));
            }
        } else if let Some(total) = total {
            // Lines that are printed, not redrawn: in steps of 10%, so that a download
            // prints a dozen lines at most.
            let pct = (p.done.saturating_mul(100) / total).min(100) / 10 * 10;
            line.push_str(&format!(" {pct}% of {}", mib(total)));
        } else {
            line.push_str(&format!(" {} MiB", p.done >> 20));
        }
    }
    if let Some(error) = &p.error {
        line.push_str(&format!(": {}", one_line(error)));
    }
    line
}

/// Bytes in MiB, one decimal.
fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

pub fn rollout_progress_line(r: &pb::RolloutStatus) -> String {
    let total = u64::from(r.to_replace) + u64::from(r.replicas);
    let done = u64::from(r.replaced.min(r.to_replace)) + u64::from(r.ready.min(r.replicas));
    let filled = (done * u64::from(BAR_WIDTH))
        .checked_div(total)
        .unwrap_or(u64::from(BAR_WIDTH));
    let filled = usize::try_from(filled.min(u64::from(BAR_WIDTH))).unwrap_or_default();
    let bar = format!(
        "{}{}",
        "#".repeat(filled),
        "-".repeat((BAR_WIDTH as usize).saturating_sub(filled))
    );
    let kind = match rollout_kind_name(r.kind) {
        "" => "rollout".to_owned(),
        kind => kind.to_owned(),
    };
    let mut line = format!(
        "{} {kind} rev {} → {}  [{bar}]  {}/{} replaced · {}/{} ready · {} available",
        one_line(&r.id),
        r.from_revision,
        r.to_revision,
        r.replaced,
        r.to_replace,
        r.ready,
        r.replicas,
        r.available
    );
    if let Some(last) = r.steps.last() {
        let what = format!("{} {}", one_line(&last.step), one_line(&last.instance));
        let what = what.trim();
        if !what.is_empty() {
            line.push_str(" · ");
            line.push_str(what);
        }
    }
    line
}

/// What `diff` adds about the instances: whether applying would replace them by a rolling
/// update, with the current spec's policy when `current` (the service's status) is known.
pub fn write_replacement(
    out: &mut dyn Write,
    r: &pb::ApplyResponse,
    current: Option<&pb::ServiceStatus>,
) -> io::Result<()> {
    if r.replaces_instances {
        let count = current
            .map(|s| s.instances.len())
            .filter(|n| *n > 0)
            .map(|n| format!("{n} {}", if n == 1 { "instance" } else { "instances" }));
        let policy = current
            .and_then(|s| s.spec.as_ref()?.rollout.as_ref())
            .and_then(|p| Some((p.max_surge?, p.max_unavailable?)))
            .map_or_else(String::new, |(surge, unavailable)| {
                format!(" (max_surge {surge}, max_unavailable {unavailable})")
            });
        return match count {
            Some(count) => writeln!(out, "would replace {count} by a rolling update{policy}"),
            None => writeln!(
                out,
                "instances would be replaced by a rolling update{policy}"
            ),
        };
    }
    match apply_outcome_name(r.outcome) {
        "created" => Ok(()),
        "scaled" => writeln!(
            out,
            "no instance would be replaced: only the number of instances changes"
        ),
        "unchanged" => writeln!(out, "nothing would change: no instance would be replaced"),
        _ => writeln!(out, "no instance would be replaced"),
    }
}

/// How long a running instance has been up, or when an instance waiting to restart starts next.
fn uptime_or_next_start(i: &pb::InstanceStatus, now: SystemTime) -> String {
    let at = |ts: &Option<prost_types::Timestamp>| ts.and_then(|t| SystemTime::try_from(t).ok());
    match pb::InstanceState::try_from(i.state) {
        Ok(pb::InstanceState::Running | pb::InstanceState::Stopping) => at(&i.started_at)
            .map_or_else(
                || "-".to_owned(),
                |started| human_duration(now.duration_since(started).unwrap_or_default()),
            ),
        Ok(pb::InstanceState::Backoff | pb::InstanceState::Failed) => at(&i.next_start_at)
            .map_or_else(
                || "-".to_owned(),
                |next| match next.duration_since(now) {
                    Ok(wait) if !wait.is_zero() => format!("in {}", human_duration(wait)),
                    _ => "due now".to_owned(),
                },
            ),
        _ => "-".to_owned(),
    }
}

/// A command line as a person would type it: arguments with spaces or quotes are quoted.
fn command_line(args: &[String]) -> String {
    if args.is_empty() {
        return "-".to_owned();
    }
    args.iter()
        .map(|a| {
            let plain = !a.is_empty()
                && a.chars()
                    .all(|c| !c.is_whitespace() && !c.is_control() && !"\"'\\$`".contains(c));
            if plain { a.clone() } else { format!("{a:?}") }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// `cpu 0.5 cores, memory 256MiB, pids 256`; an absent limit is "unlimited".
fn limits(resources: Option<&pb::Resources>) -> String {
    let r = resources.cloned().unwrap_or_default();
    let cpu = r.cpu.map_or_else(
        || "unlimited".to_owned(),
        |c| format!("{c} {}", if c == 1.0 { "core" } else { "cores" }),
    );
    let memory = r
        .memory_bytes
        .map_or_else(|| "unlimited".to_owned(), human_bytes);
    let pids = r
        .pids
        .map_or_else(|| "unlimited".to_owned(), |p| p.to_string());
    format!("cpu {cpu}, memory {memory}, pids {pids}")
}

/// The service's own cgroup: the parent of its instances' cgroups.
fn service_cgroup(s: &pb::ServiceStatus) -> Option<String> {
    let cgroup = s.instances.iter().find(|i| !i.cgroup.is_empty())?;
    let parent = Path::new(&cgroup.cgroup).parent()?;
    Some(parent.display().to_string())
}

/// `node`: the host, what it can enforce, and the agent.
pub fn write_node(out: &mut dyn Write, n: &pb::NodeInfo) -> io::Result<()> {
    let list = |items: &[String]| {
        if items.is_empty() {
            "none".to_owned()
        } else {
            items.join(", ")
        }
    };
    let unavailable = if n.unavailable.is_empty() {
        "none".to_owned()
    } else {
        n.unavailable.join("\n")
    };
    let cgroup = if n.cgroup_parent.is_empty() {
        n.cgroup_version.clone()
    } else {
        format!("{} under {}", n.cgroup_version, n.cgroup_parent)
    };
    let mut fields = vec![
        ("hostname", n.hostname.clone()),
        ("os", n.os.clone()),
        ("kernel", n.kernel.clone()),
        ("cpus", n.cpus.to_string()),
        (
            "memory",
            format!(
                "{} total, {} available",
                human_bytes(n.memory_total_bytes),
                human_bytes(n.memory_available_bytes)
            ),
        ),
        (
            "load",
            format!("{:.2} {:.2} {:.2}", n.load1, n.load5, n.load15),
        ),
        ("cgroup", cgroup),
        ("controllers", list(&n.controllers)),
        ("unavailable", unavailable),
        ("namespaces", list(&n.namespaces)),
        (
            "agent",
            format!(
                "corrald {}, up {}",
                n.agent_version,
                human_duration(Duration::from_secs(n.agent_uptime_seconds))
            ),
        ),
        (
            "services",
            format!("{} ({} instances)", n.services, n.instances),
        ),
    ];
    // Identity and capacity, when the agent reports them.
    let amounts = |c: &pb::Capacity| {
        format!(
            "cpu {}, memory {}",
            cores(c.cpu),
            human_bytes(c.memory_bytes)
        )
    };
    if !n.node_id.is_empty() {
        fields.push(("node", n.node_id.clone()));
    }
    if !n.boot_id.is_empty() {
        fields.push(("boot", n.boot_id.clone()));
    }
    if let (Some(cap), Some(alloc), Some(used)) = (&n.capacity, &n.allocatable, &n.committed) {
        fields.push(("capacity", amounts(cap)));
        fields.push(("allocatable", amounts(alloc)));
        fields.push(("committed", amounts(used)));
        fields.push((
            "overcommit",
            format!("cpu {}, memory {}", n.overcommit_cpu, n.overcommit_memory),
        ));
    }
    if !n.quarantined.is_empty() {
        fields.push(("quarantined", n.quarantined.join("\n")));
    }
    if n.records_unsaved > 0 {
        let since = n
            .records_unsaved_since
            .as_ref()
            .and_then(time_seconds)
            .unwrap_or_else(|| "-".to_owned());
        fields.push((
            "unsaved",
            format!(
                "{} instance record(s) since {since}: {} (saved again until they are; until then an agent restart could take those instances for lost)",
                n.records_unsaved, n.records_unsaved_error
            ),
        ));
    }
    if let Some(f) = &n.fleet {
        let since = f
            .since
            .as_ref()
            .and_then(time_seconds)
            .unwrap_or_else(|| "-".to_owned());
        let link = if f.connected {
            format!("connected since {since}")
        } else {
            format!("disconnected since {since}: {}", f.reason)
        };
        fields.push((
            "fleet",
            format!(
                "{link} (node {}, etcd {}, revision {})",
                f.node,
                f.endpoints.join(","),
                f.revision
            ),
        ));
    }
    write_fields(out, &fields)
}

/// Cores as the spec writes them: `0.5`, `4`.
fn cores(c: f64) -> String {
    let text = format!("{c:.3}");
    text.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// One log record on one line: `2026-11-22T23:45:01.123Z web-0 out| text`. The time is `-`
/// (padded to the same width) when the record has none; a stream other than stdout and stderr
/// is shown by its name.
pub fn write_log_line(out: &mut dyn Write, l: &pb::LogLine) -> io::Result<()> {
    let time = l
        .time
        .as_ref()
        .and_then(time_millis)
        .unwrap_or_else(|| "-".to_owned());
    let stream = match l.stream.as_str() {
        "stdout" => "out",
        "stderr" => "err",
        other => other,
    };
    writeln!(
        out,
        "{time:<24} {} {stream}| {}",
        with_run(&l.instance, l.incarnation),
        l.text
    )
}

/// An incarnation id as the CLI shows it: 16 hex digits; `None` for 0 (none).
pub fn run_id(incarnation: u64) -> Option<String> {
    (incarnation != 0).then(|| format!("{incarnation:016x}"))
}

/// `web-0@00c0ffee12345678`: an instance and the run of it a line or event is about.
fn with_run(instance: &str, incarnation: u64) -> String {
    match run_id(incarnation) {
        Some(run) if !instance.is_empty() => format!("{instance}@{run}"),
        _ => instance.to_owned(),
    }
}

/// The table of `events`, written as events arrive: each column is as wide as the widest cell
/// seen so far (never narrower than its header), so that a batch lines up and later rows stay
/// aligned unless a wider cell comes.
#[derive(Debug)]
pub struct EventTable {
    widths: [usize; 5],
    header_written: bool,
}

impl Default for EventTable {
    fn default() -> Self {
        EventTable {
            widths: [0, 1, 2, 3, 4].map(|i| EVENT_HEADER[i].len()),
            header_written: false,
        }
    }
}

const EVENT_HEADER: [&str; 6] = ["INDEX", "TIME", "SERVICE", "INSTANCE", "TYPE", "MESSAGE"];

impl EventTable {
    /// Writes the header before the first rows, then one line per event.
    pub fn write(&mut self, out: &mut dyn Write, events: &[pb::Event]) -> io::Result<()> {
        let rows: Vec<[String; 6]> = events.iter().map(event_cells).collect();
        for row in &rows {
            for (w, cell) in self.widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        if !self.header_written {
            self.write_row(out, &EVENT_HEADER.map(str::to_owned))?;
            self.header_written = true;
        }
        for row in &rows {
            self.write_row(out, row)?;
        }
        Ok(())
    }

    fn write_row(&self, out: &mut dyn Write, row: &[String; 6]) -> io::Result<()> {
        let mut line = String::new();
        for (cell, width) in row.iter().zip(self.widths) {
            line.push_str(cell);
            let pad = width.saturating_sub(cell.chars().count());
            line.extend(std::iter::repeat_n(' ', pad + 2));
        }
        line.push_str(&row[5]);
        writeln!(out, "{}", line.trim_end())
    }
}

fn event_cells(e: &pb::Event) -> [String; 6] {
    let or_dash = |s: &str| {
        if s.is_empty() {
            "-".to_owned()
        } else {
            one_line(s)
        }
    };
    [
        e.index.to_string(),
        e.time
            .as_ref()
            .and_then(time_millis)
            .unwrap_or_else(|| "-".to_owned()),
        or_dash(&e.service),
        or_dash(&with_run(&e.instance, e.incarnation)),
        or_dash(event_type_name(e.r#type)),
        one_line(&e.message),
    ]
}

/// One frame of `top`: a line about the node, then one row per instance.
pub fn write_top(
    out: &mut dyn Write,
    node: &pb::NodeInfo,
    at: SystemTime,
    rows: &[TopRowView],
    scaled: &[(String, pb::AutoscaleStatus)],
) -> io::Result<()> {
    let time = time_seconds(&prost_types::Timestamp::from(at)).unwrap_or_default();
    writeln!(
        out,
        "{}  load {:.2} {:.2} {:.2}  memory {} available of {}  {time}",
        one_line(&node.hostname),
        node.load1,
        node.load5,
        node.load15,
        human_bytes(node.memory_available_bytes),
        human_bytes(node.memory_total_bytes),
    )?;
    writeln!(out)?;
    if rows.is_empty() {
        return writeln!(out, "no instances");
    }
    let mut table = Table::new(vec![
        "SERVICE",
        "INSTANCE",
        "STATE",
        "HEALTH",
        "PID",
        "CPU%",
        "MEM",
        "RESTARTS",
        "LAST EXIT",
    ]);
    let dash = || "-".to_owned();
    for r in rows {
        table.row(vec![
            r.service.clone(),
            r.instance.clone(),
            r.state.to_owned(),
            health_cell(r.health_checked, r.health.as_deref().unwrap_or_default()),
            r.pid.map_or_else(dash, |p| p.to_string()),
            r.cpu_percent.map_or_else(dash, |c| format!("{c:.1}")),
            r.memory_bytes.map_or_else(dash, human_bytes),
            r.restarts.to_string(),
            r.last_exit.clone().unwrap_or_else(dash),
        ]);
    }
    table.write(out)?;
    write_autoscale_lines(out, scaled)
}

/// Under `top`'s table: each autoscaled service's recommendation and what it saw.
fn write_autoscale_lines(
    out: &mut dyn Write,
    scaled: &[(String, pb::AutoscaleStatus)],
) -> io::Result<()> {
    if scaled.is_empty() {
        return Ok(());
    }
    writeln!(out)?;
    let mut table = Table::new(vec![
        "SERVICE",
        "RECOMMENDS",
        "CONNS",
        "QUEUED",
        "CPU",
        "WHY",
    ]);
    for (name, a) in scaled {
        table.row(vec![
            name.clone(),
            a.recommended.to_string(),
            a.connections.to_string(),
            a.queued.to_string(),
            format!("{:.2}", a.cpu),
            one_line(&autoscale_reason(a)),
        ]);
    }
    table.write(out)
}

/// The autoscaler's last word on a service, as one line.
pub fn autoscale_reason(a: &pb::AutoscaleStatus) -> String {
    match (a.waiting, a.reason.is_empty()) {
        (true, true) => "waiting for a first connection".to_owned(),
        (true, false) => format!("waiting for a first connection (last: {})", a.reason),
        (false, true) => "no sample yet".to_owned(),
        (false, false) => a.reason.clone(),
    }
}

/// One apply (or dry run) result: a summary line, then each change indented.
pub fn write_apply(
    out: &mut dyn Write,
    fallback_name: &str,
    r: &pb::ApplyResponse,
    dry_run: bool,
) -> io::Result<()> {
    let name = if r.name.is_empty() {
        fallback_name
    } else {
        &r.name
    };
    let rev = r.revision;
    let summary = match (apply_outcome_name(r.outcome), dry_run) {
        ("created", false) => format!("created (revision {rev})"),
        ("created", true) => "would be created".to_owned(),
        ("updated", false) if r.replaces_instances && !r.rollout_id.is_empty() => format!(
            "updated to revision {rev}, rollout {} replaces the instances",
            one_line(&r.rollout_id)
        ),
        ("updated", false) if r.replaces_instances => {
            format!("updated to revision {rev}, instances will be replaced")
        }
        ("updated", false) => format!("updated to revision {rev}"),
        ("updated", true) if r.replaces_instances => {
            "would be updated, instances would be replaced".to_owned()
        }
        ("updated", true) => "would be updated".to_owned(),
        ("scaled", false) => format!("scaled (revision {rev})"),
        ("scaled", true) => "would be scaled".to_owned(),
        ("unchanged", _) => format!("unchanged (revision {rev})"),
        ("labeled", false) => format!("labels updated (revision {rev})"),
        ("labeled", true) => "would have its labels updated".to_owned(),
        (other, false) => format!("{other} (revision {rev})"),
        (other, true) => format!("would be {other}"),
    };
    let summary = if r.rollout_id.is_empty() || summary.contains(&r.rollout_id) || dry_run {
        summary
    } else {
        format!("{summary}, rollout {}", one_line(&r.rollout_id))
    };
    writeln!(out, "{name}: {summary}")?;
    for change in &r.changes {
        writeln!(out, "  {}", one_line(change))?;
    }
    Ok(())
}

/// `restart` and `rollback`: the rollout started.
pub fn write_rollout_started(
    out: &mut dyn Write,
    kind: &str,
    r: &pb::RolloutResponse,
) -> io::Result<()> {
    let what = match kind {
        "rollback" => format!("rollback to revision {}", r.revision),
        kind => format!("{kind}, revision {}", r.revision),
    };
    if r.rollout_id.is_empty() {
        writeln!(out, "{}: no rollout started ({what})", one_line(&r.name))
    } else {
        writeln!(
            out,
            "{}: rollout {} started ({what})",
            one_line(&r.name),
            one_line(&r.rollout_id)
        )
    }
}

/// `scale`: what changed.
pub fn write_scale(out: &mut dyn Write, r: &pb::ScaleResponse) -> io::Result<()> {
    if r.previous == r.replicas {
        writeln!(out, "{}: already at {} replicas", r.name, r.replicas)
    } else {
        writeln!(
            out,
            "{}: scaled from {} to {} replicas",
            r.name, r.previous, r.replicas
        )
    }
}

/// `delete`: what was removed.
pub fn write_delete(out: &mut dyn Write, r: &pb::DeleteResponse) -> io::Result<()> {
    let n = r.stopped_instances;
    let plural = if n == 1 { "instance" } else { "instances" };
    writeln!(out, "{}: deleted ({n} {plural} stopped)", r.name)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::views::wire;

    #[test]
    fn package_lines_show_phase_bytes_and_reason() {
        let mut p = pb::PackageStatus {
            revision: 2,
            url: "http://127.0.0.1/web.tar".into(),
            phase: "fetching".into(),
            done: 3 << 20,
            total: Some(8 << 20),
            error: None,
        };
        assert_eq!(
            package_line(&p, true),
            "rev 2 fetching 3.0 MiB / 8.0 MiB (37%)"
        );
        assert_eq!(package_line(&p, false), "rev 2 fetching 30% of 8.0 MiB");
        p.total = None;
        p.phase = "unpacking".into();
        assert_eq!(package_line(&p, true), "rev 2 unpacking 3.0 MiB");
        assert_eq!(package_line(&p, false), "rev 2 unpacking 3 MiB");
        p.phase = "failed".into();
        p.error = Some("sha256 mismatch:\nexpected a, got b".into());
        assert_eq!(
            package_line(&p, true),
            "rev 2 failed: sha256 mismatch: expected a, got b"
        );
    }

    fn text(f: impl FnOnce(&mut dyn Write) -> io::Result<()>) -> String {
        let mut buf = Vec::new();
        f(&mut buf).unwrap();
        String::from_utf8(buf).unwrap()
    }

    fn at(now: SystemTime, offset_ms: i64) -> prost_types::Timestamp {
        let t = if offset_ms >= 0 {
            now + Duration::from_millis(offset_ms.unsigned_abs())
        } else {
            now - Duration::from_millis(offset_ms.unsigned_abs())
        };
        prost_types::Timestamp::from(t)
    }

    #[test]
    fn sizes_read_as_binary_units() {
        let cases = [
            (0, "0B"),
            (1023, "1023B"),
            (1024, "1KiB"),
            (1536, "1.5KiB"),
            (12_900_000, "12.3MiB"),
            (256 << 20, "256MiB"),
            ((1 << 20) - 1, "1MiB"),
            (16_700_000_000, "15.6GiB"),
            (u64::MAX, "16EiB"),
        ];
        for (bytes, want) in cases {
            assert_eq!(human_bytes(bytes), want, "{bytes}");
        }
    }

    #[test]
    fn durations_are_short_and_coarse() {
        let cases = [
            (Duration::ZERO, "0ms"),
            (Duration::from_millis(350), "350ms"),
            (Duration::from_millis(1_234), "1.2s"),
            (Duration::from_millis(59_999), "59.9s"),
            (Duration::from_secs(60), "1m0s"),
            (Duration::from_secs(192), "3m12s"),
            (Duration::from_secs(5 * 3600 + 3 * 60 + 59), "5h3m"),
            (Duration::from_secs(2 * 86_400 + 4 * 3600), "2d4h"),
            (Duration::MAX, "213503982334601d7h"),
        ];
        for (d, want) in cases {
            assert_eq!(human_duration(d), want, "{d:?}");
        }
    }

    #[test]
    fn cpu_time_in_seconds() {
        assert_eq!(cpu_seconds(0), "0.00s");
        assert_eq!(cpu_seconds(1_520_000_000), "1.52s");
    }

    #[test]
    fn tables_align_columns() {
        let mut t = Table::new(vec!["NAME", "N", "LAST"]);
        t.row(vec!["a-long-name".into(), "1".into(), "x".into()]);
        t.row(vec!["b".into(), "22".into(), "two\nlines".into()]);
        assert_eq!(
            text(|o| t.write(o)),
            "NAME         N   LAST\n\
             a-long-name  1   x\n\
             b            22  two lines\n"
        );
    }

    fn service(now: SystemTime) -> pb::ServiceStatus {
        let running = pb::InstanceStatus {
            incarnation: 0,
            id: "web-0".into(),
            index: 0,
            revision: 3,
            state: pb::InstanceState::Running as i32,
            pid: 4242,
            init_pid: 4241,
            restarts: 0,
            last_exit: None,
            usage: Some(pb::ResourceUsage {
                cpu_usage_ns: 1_520_000_000,
                memory_bytes: 12_900_000,
                memory_peak_bytes: 13_000_000,
                oom_kills: 0,
                pids: 3,
                cpu_rate: 0.0,
                ..Default::default()
            }),
            started_at: Some(at(now, -192_000)),
            next_start_at: None,
            last_error: String::new(),
            cgroup: "/sys/fs/cgroup/corral/web/web-0".into(),
            ports: HashMap::new(),
            log_lines_dropped: 0,
            log_bytes_dropped: 0,
            health: wire::health("unhealthy"),
            health_reason: "HTTP 503".into(),
            notify_status: String::new(),
        };
        let backoff = pb::InstanceStatus {
            id: "web-1".into(),
            index: 1,
            state: pb::InstanceState::Backoff as i32,
            pid: 0,
            init_pid: 0,
            restarts: 2,
            last_exit: Some(pb::ExitInfo {
                class: pb::ExitClass::OomKilled as i32,
                code: 0,
                signal: 9,
                at: Some(at(now, -500)),
                text: "oom_killed".into(),
                detail: String::new(),
                ..Default::default()
            }),
            usage: Some(pb::ResourceUsage::default()),
            started_at: None,
            next_start_at: Some(at(now, 1_200)),
            last_error: String::new(),
            cgroup: "/sys/fs/cgroup/corral/web/web-1".into(),
            health: wire::health("unknown"),
            health_reason: String::new(),
            ..running.clone()
        };
        let failed = pb::InstanceStatus {
            id: "web-2".into(),
            index: 2,
            state: pb::InstanceState::Failed as i32,
            pid: 0,
            init_pid: 0,
            restarts: 5,
            last_exit: None,
            usage: None,
            started_at: None,
            next_start_at: Some(at(now, -10)),
            last_error: "exec /usr/bin/python3: permission denied".into(),
            cgroup: "/sys/fs/cgroup/corral/web/web-2".into(),
            health: wire::health("unknown"),
            health_reason: "connect 127.0.0.1:41000: connection refused".into(),
            ..running.clone()
        };
        pb::ServiceStatus {
            package: None,
            next_run_at: None,
            next_run_local: String::new(),
            autoscale: None,
            name: "web".into(),
            revision: 3,
            owner: pb::ServiceOwner::Local as i32,
            health: wire::service_health("unhealthy"),
            spec: Some(pb::ServiceSpec {
                name: "web".into(),
                command: vec![
                    "/usr/bin/python3".into(),
                    "-m".into(),
                    "http.server".into(),
                    "--bind".into(),
                    "127.0.0.1 ::1".into(),
                ],
                user: Some("nobody".into()),
                replicas: Some(3),
                resources: Some(pb::Resources {
                    cpu: Some(0.5),
                    memory_bytes: Some(268_435_456),
                    pids: None,
                    nofile: None,
                }),
                health: Some(pb::Health {
                    http: Some("http://127.0.0.1:{port.admin}/healthz".into()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            desired: 3,
            running: 1,
            healthy: 0,
            instances: vec![running, backoff, failed],
            deleting: false,
            rollout: None,
            revisions: Vec::new(),
            paused: false,
            ..Default::default()
        }
    }

    #[test]
    fn status_shows_header_instances_and_errors() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_740_830_400);
        let got = text(|o| write_status(o, &service(now), now));
        let want = "\
service:    web
revision:   3
instances:  3 desired, 1 running, 0 healthy
health:     unhealthy
command:    /usr/bin/python3 -m http.server --bind \"127.0.0.1 ::1\"
user:       nobody
limits:     cpu 0.5 cores, memory 256MiB, pids unlimited
cgroup:     /sys/fs/cgroup/corral/web

INSTANCE  STATE    HEALTH     PID   RESTARTS  LAST EXIT   CPU    MEMORY   UPTIME/NEXT START  RUN
web-0     running  unhealthy  4242  0         -           1.52s  12.3MiB  3m12s              -
web-1     backoff  unknown    -     2         oom_killed  0.00s  0B       in 1.2s            -
web-2     failed   unknown    -     5         -           -      -        due now            -

web-0: unhealthy: HTTP 503
web-2: exec /usr/bin/python3: permission denied
";
        assert_eq!(got, want);
    }

    #[test]
    fn status_of_a_service_without_instances() {
        let now = SystemTime::UNIX_EPOCH;
        let mut s = service(now);
        s.instances.clear();
        s.desired = 0;
        s.deleting = true;
        s.spec = None;
        let got = text(|o| write_status(o, &s, now));
        assert!(got.contains("state:      deleting\n"), "{got}");
        assert!(
            got.contains("limits:     cpu unlimited, memory unlimited, pids unlimited\n"),
            "{got}"
        );
        assert!(got.ends_with("\nno instances\n"), "{got}");
        assert!(!got.contains("cgroup:"), "{got}");
    }

    #[test]
    fn ls_is_one_line_per_service() {
        let now = SystemTime::UNIX_EPOCH;
        let mut gone = service(now);
        gone.name = "batch".into();
        gone.revision = 12;
        gone.deleting = true;
        gone.health = wire::service_health("degraded");
        gone.healthy = 1;
        gone.owner = pb::ServiceOwner::Etcd as i32;
        let mut old = service(now);
        old.name = "old".into();
        old.owner = pb::ServiceOwner::Unspecified as i32;
        old.health = wire::service_health("");
        let got = text(|o| write_services(o, &[service(now), gone, old]));
        assert_eq!(
            got,
            "NAME              REVISION  DESIRED  RUNNING  HEALTHY  HEALTH     SOURCE\n\
             web               3         3        1        0        unhealthy  local\n\
             batch (deleting)  12        3        1        1        degraded   etcd\n\
             old               3         3        1        0        -          -\n"
        );
    }

    #[test]
    fn status_without_a_health_check_shows_no_health() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_740_830_400);
        let mut s = service(now);
        s.spec.as_mut().unwrap().health = None;
        s.instances.truncate(2);
        let got = text(|o| write_status(o, &s, now));
        assert!(
            got.contains("\nINSTANCE  STATE    HEALTH  PID   RESTARTS"),
            "{got}"
        );
        assert!(
            got.contains("\nweb-0     running  -       4242  0"),
            "{got}"
        );
        assert!(
            got.contains("\nweb-1     backoff  -       -     2"),
            "{got}"
        );
        assert!(!got.contains("HTTP 503"), "{got}");
    }

    #[test]
    fn times_to_the_millisecond_have_one_width() {
        let t = |seconds, nanos| time_millis(&prost_types::Timestamp { seconds, nanos });
        assert_eq!(t(1_740_830_400, 0).unwrap(), "2025-03-01T12:00:00.000Z");
        assert_eq!(
            t(1_740_830_400, 123_999_999).unwrap(),
            "2025-03-01T12:00:00.123Z"
        );
        // Not normalized: 1.5 s past.
        assert_eq!(
            t(1_740_830_400, 1_500_000_000).unwrap(),
            "2025-03-01T12:00:01.500Z"
        );
        assert_eq!(t(i64::MAX, 0), None);
        assert_eq!(t(i64::MIN, i32::MIN), None);
    }

    #[test]
    fn log_lines_tell_stdout_from_stderr() {
        let line = |stream: &str, time: Option<prost_types::Timestamp>, text: &str| pb::LogLine {
            incarnation: 0,
            instance: "web-0".into(),
            stream: stream.into(),
            time,
            text: text.into(),
        };
        let t = Some(prost_types::Timestamp {
            seconds: 1_795_909_501,
            nanos: 123_456_000,
        });
        let got = text(|o| {
            write_log_line(o, &line("stdout", t, "GET / 200"))?;
            write_log_line(o, &line("stderr", t, "warning: slow"))?;
            write_log_line(o, &line("stdout", None, "no time"))?;
            write_log_line(o, &line("stdout", t, ""))?;
            write_log_line(o, &line("other", t, "x"))
        });
        assert_eq!(
            got,
            "2026-11-28T23:45:01.123Z web-0 out| GET / 200\n\
             2026-11-28T23:45:01.123Z web-0 err| warning: slow\n\
             -                        web-0 out| no time\n\
             2026-11-28T23:45:01.123Z web-0 out| \n\
             2026-11-28T23:45:01.123Z web-0 other| x\n"
        );
    }

    fn event(index: u64, instance: &str, kind: &str, message: &str) -> pb::Event {
        pb::Event {
            incarnation: 0,
            index,
            time: Some(prost_types::Timestamp {
                seconds: 1_740_830_400,
                nanos: 250_000_000,
            }),
            service: "web".into(),
            instance: instance.into(),
            r#type: wire::event_type(kind),
            message: message.into(),
            attributes: HashMap::new(),
        }
    }

    #[test]
    fn events_are_a_table_whose_columns_only_grow() {
        let mut table = EventTable::default();
        let got = text(|o| {
            table.write(
                o,
                &[
                    event(7, "", "applied", "revision 3 applied"),
                    event(8, "web-0", "instance_started", "started\nas pid 4242"),
                ],
            )?;
            let mut late = event(1000, "web-10", "instance_exited", "exited(3)");
            late.time = None;
            late.service = String::new();
            table.write(o, &[late])
        });
        assert_eq!(
            got,
            "INDEX  TIME                      SERVICE  INSTANCE  TYPE              MESSAGE\n\
             7      2025-03-01T12:00:00.250Z  web      -         applied           revision 3 applied\n\
             8      2025-03-01T12:00:00.250Z  web      web-0     instance_started  started as pid 4242\n\
             1000   -                         -        web-10    instance_exited   exited(3)\n"
        );
        // An empty batch prints the header once, and nothing else.
        let mut table = EventTable::default();
        let got = text(|o| {
            table.write(o, &[])?;
            table.write(o, &[])
        });
        assert_eq!(got, "INDEX  TIME  SERVICE  INSTANCE  TYPE  MESSAGE\n");
    }

    #[test]
    fn top_shows_the_node_then_one_row_per_instance() {
        let node = pb::NodeInfo {
            hostname: "node1".into(),
            memory_total_bytes: 4 << 30,
            memory_available_bytes: 3 << 29,
            load1: 0.5,
            load5: 0.25,
            load15: 0.125,
            ..Default::default()
        };
        let row = TopRowView {
            service: "web".into(),
            instance: "web-0".into(),
            index: 0,
            state: "running",
            health: Some("healthy".into()),
            health_checked: true,
            pid: Some(4242),
            cpu_percent: Some(12.345),
            cpu_usage_ns: Some(1),
            memory_bytes: Some(12_900_000),
            restarts: 1,
            last_exit: Some("exited(3)".into()),
        };
        let idle = TopRowView {
            service: "batch".into(),
            instance: "batch-0".into(),
            state: "backoff",
            health: Some("healthy".into()),
            health_checked: false,
            pid: None,
            cpu_percent: None,
            memory_bytes: None,
            last_exit: None,
            ..row.clone()
        };
        let at = SystemTime::UNIX_EPOCH + Duration::from_millis(1_740_830_400_900);
        let got = text(|o| write_top(o, &node, at, &[row, idle], &[]));
        assert_eq!(
            got,
            "node1  load 0.50 0.25 0.12  memory 1.5GiB available of 4GiB  2025-03-01T12:00:00Z\n\
             \n\
             SERVICE  INSTANCE  STATE    HEALTH   PID   CPU%  MEM      RESTARTS  LAST EXIT\n\
             web      web-0     running  healthy  4242  12.3  12.3MiB  1         exited(3)\n\
             batch    batch-0   backoff  -        -     -     -        1         -\n"
        );
        let got = text(|o| write_top(o, &node, at, &[], &[]));
        assert!(got.ends_with("\n\nno instances\n"), "{got}");
    }

    #[test]
    fn node_lists_what_the_host_can_enforce() {
        let n = pb::NodeInfo {
            hostname: "node1".into(),
            kernel: "6.1.0-18-amd64".into(),
            os: "Debian GNU/Linux 12 (bookworm)".into(),
            cgroup_version: "v1".into(),
            cpus: 2,
            memory_total_bytes: 4 << 30,
            memory_available_bytes: 3 << 29,
            load1: 0.5,
            load5: 0.25,
            load15: 0.125,
            agent_version: "0.1.0".into(),
            agent_uptime_seconds: 3 * 3600 + 12 * 60,
            cgroup_parent: "/corral.slice".into(),
            controllers: vec!["cpu".into(), "memory".into(), "pids".into()],
            unavailable: vec![
                "memsw: swap accounting is off".into(),
                "net: no permission".into(),
            ],
            namespaces: vec!["pid".into(), "mount".into()],
            services: 2,
            instances: 5,
            fleet: None,
            node_id: "0b6e1f9c-3a2d-4c1e-9f7a-2d5c8e4b1a60".into(),
            boot_id: "5f1d2c3b-0000-4000-8000-000000000001".into(),
            capacity: Some(pb::Capacity {
                cpu: 2.0,
                memory_bytes: 4 << 30,
            }),
            allocatable: Some(pb::Capacity {
                cpu: 1.5,
                memory_bytes: 3 << 30,
            }),
            committed: Some(pb::Capacity {
                cpu: 1.25,
                memory_bytes: 1 << 30,
            }),
            overcommit_cpu: 4.0,
            overcommit_memory: 1.0,
            quarantined: vec![],
            records_unsaved: 0,
            records_unsaved_since: None,
            records_unsaved_error: String::new(),
        };
        let got = text(|o| write_node(o, &n));
        let want = "\
hostname:     node1
os:           Debian GNU/Linux 12 (bookworm)
kernel:       6.1.0-18-amd64
cpus:         2
memory:       4GiB total, 1.5GiB available
load:         0.50 0.25 0.12
cgroup:       v1 under /corral.slice
controllers:  cpu, memory, pids
unavailable:  memsw: swap accounting is off
              net: no permission
namespaces:   pid, mount
agent:        corrald 0.1.0, up 3h12m
services:     2 (5 instances)
node:         0b6e1f9c-3a2d-4c1e-9f7a-2d5c8e4b1a60
boot:         5f1d2c3b-0000-4000-8000-000000000001
capacity:     cpu 2, memory 4GiB
allocatable:  cpu 1.5, memory 3GiB
committed:    cpu 1.25, memory 1GiB
overcommit:   cpu 4, memory 1
";
        assert_eq!(got, want);
    }

    #[test]
    fn node_says_how_many_records_are_unsaved_and_since_when() {
        let n = pb::NodeInfo {
            records_unsaved: 2,
            records_unsaved_since: Some(prost_types::Timestamp {
                seconds: 1_740_830_400,
                nanos: 0,
            }),
            records_unsaved_error: "No space left on device (os error 28)".into(),
            ..Default::default()
        };
        let got = text(|o| write_node(o, &n));
        assert!(
            got.contains(
                "\nunsaved:      2 instance record(s) since 2025-03-01T12:00:00Z: No space left on device (os error 28) (saved again"
            ),
            "{got}"
        );
        let none = text(|o| write_node(o, &pb::NodeInfo::default()));
        assert!(!none.contains("unsaved"), "{none}");
    }

    #[test]
    fn node_says_since_when_the_fleet_is_out_of_reach() {
        let mut link = pb::FleetLink {
            node: "n1".into(),
            endpoints: vec!["https://etcd-1:2379".into(), "https://etcd-2:2379".into()],
            connected: false,
            since: Some(prost_types::Timestamp {
                seconds: 1_740_830_400,
                nanos: 0,
            }),
            reason: "granting the node's lease: no answer from etcd within 5s".into(),
            revision: 42,
        };
        let node = |link: &pb::FleetLink| pb::NodeInfo {
            fleet: Some(link.clone()),
            ..Default::default()
        };
        let got = text(|o| write_node(o, &node(&link)));
        assert!(
            got.contains(
                "\nfleet:        disconnected since 2025-03-01T12:00:00Z: granting the node's lease: \
                 no answer from etcd within 5s (node n1, etcd https://etcd-1:2379,https://etcd-2:2379, revision 42)\n"
            ),
            "{got}"
        );
        link.connected = true;
        link.reason.clear();
        let got = text(|o| write_node(o, &node(&link)));
        assert!(
            got.contains("\nfleet:        connected since 2025-03-01T12:00:00Z (node n1,"),
            "{got}"
        );
    }

    #[test]
    fn apply_says_what_happened() {
        let resp = |outcome: &str, revision, replaces, changes: &[&str]| pb::ApplyResponse {
            name: "web".into(),
            revision,
            outcome: wire::apply_outcome(outcome),
            changes: changes.iter().map(|c| (*c).to_owned()).collect(),
            replaces_instances: replaces,
            rollout_id: String::new(),
            ..Default::default()
        };
        let cases = [
            (
                resp("created", 1, false, &[]),
                false,
                "web: created (revision 1)\n",
            ),
            (
                resp("unchanged", 3, false, &[]),
                false,
                "web: unchanged (revision 3)\n",
            ),
            (
                resp("updated", 4, true, &["command: [\"a\"] -> [\"b\"]"]),
                false,
                "web: updated to revision 4, instances will be replaced\n  command: [\"a\"] -> [\"b\"]\n",
            ),
            (
                resp("scaled", 3, false, &["replicas: 2 -> 3"]),
                false,
                "web: scaled (revision 3)\n  replicas: 2 -> 3\n",
            ),
            (
                resp("created", 0, false, &[]),
                true,
                "web: would be created\n",
            ),
            (
                resp("updated", 4, true, &["resources.memory: 128MiB -> 256MiB"]),
                true,
                "web: would be updated, instances would be replaced\n  resources.memory: 128MiB -> 256MiB\n",
            ),
            (
                resp("unchanged", 3, false, &[]),
                true,
                "web: unchanged (revision 3)\n",
            ),
        ];
        for (r, dry_run, want) in cases {
            assert_eq!(text(|o| write_apply(o, "x.toml", &r, dry_run)), want);
        }
    }

    #[test]
    fn scale_and_delete_say_what_happened() {
        let r = pb::ScaleResponse {
            name: "web".into(),
            previous: 2,
            replicas: 5,
            ..Default::default()
        };
        assert_eq!(
            text(|o| write_scale(o, &r)),
            "web: scaled from 2 to 5 replicas\n"
        );
        let r = pb::ScaleResponse { previous: 5, ..r };
        assert_eq!(text(|o| write_scale(o, &r)), "web: already at 5 replicas\n");
        let r = pb::DeleteResponse {
            name: "web".into(),
            stopped_instances: 1,
            ..Default::default()
        };
        assert_eq!(
            text(|o| write_delete(o, &r)),
            "web: deleted (1 instance stopped)\n"
        );
    }

    fn ts(seconds: i64, millis: i32) -> Option<prost_types::Timestamp> {
        Some(prost_types::Timestamp {
            seconds,
            nanos: millis * 1_000_000,
        })
    }

    fn rollout_step(seconds: i64, step: &str, instance: &str, message: &str) -> pb::RolloutStep {
        pb::RolloutStep {
            time: ts(seconds, 250),
            step: step.into(),
            instance: instance.into(),
            message: message.into(),
        }
    }

    /// A restart of 4 instances half done.
    fn running_rollout() -> pb::RolloutStatus {
        pb::RolloutStatus {
            id: "web-r3".into(),
            service: "web".into(),
            kind: wire::rollout_kind("restart"),
            state: wire::rollout_state("running"),
            from_revision: 2,
            to_revision: 2,
            replicas: 4,
            to_replace: 4,
            replaced: 2,
            new_instances: 3,
            ready: 3,
            old_instances: 2,
            available: 4,
            policy: Some(pb::RolloutPolicy {
                max_surge: Some(1),
                max_unavailable: Some(0),
                min_healthy_ms: Some(2000),
                healthy_deadline_ms: Some(60_000),
                auto_rollback: Some(true),
                start_cpu: None,
            }),
            started_at: ts(1_740_830_400, 0),
            finished_at: None,
            reason: String::new(),
            rollback_id: String::new(),
            rollback_of: String::new(),
            steps: vec![
                rollout_step(1_740_830_401, "started", "web-4", "web-4 started"),
                rollout_step(1_740_830_404, "ready", "web-4", "web-4 ready\nafter 2s"),
                rollout_step(1_740_830_405, "started", "web-5", "web-5 started"),
            ],
        }
    }

    #[test]
    fn a_rollout_in_status_is_one_or_two_lines() {
        let running = running_rollout();
        assert_eq!(
            rollout_summary(&running),
            "web-r3 (restart, revision 2) running: 2/4 replaced, 3/4 ready, 4 available"
        );
        let done = pb::RolloutStatus {
            kind: wire::rollout_kind("update"),
            state: wire::rollout_state("succeeded"),
            from_revision: 1,
            finished_at: ts(1_740_830_409, 400),
            ..running.clone()
        };
        assert_eq!(
            rollout_summary(&done),
            "web-r3 (update, revision 1 → 2) succeeded in 9.4s"
        );
        let failed = pb::RolloutStatus {
            state: wire::rollout_state("failed"),
            reason: "web-5 not ready within 60s".into(),
            rollback_id: "web-r4".into(),
            ..done.clone()
        };
        assert_eq!(
            rollout_summary(&failed),
            "web-r3 (update, revision 1 → 2) failed: web-5 not ready within 60s\n\
             rolled back by web-r4"
        );
        let back = pb::RolloutStatus {
            id: "web-r4".into(),
            kind: wire::rollout_kind("auto_rollback"),
            from_revision: 2,
            to_revision: 1,
            rollback_of: "web-r3".into(),
            ..done
        };
        assert_eq!(
            rollout_summary(&back),
            "web-r4 (auto_rollback, revision 2 → 1) succeeded in 9.4s\n\
             started by the failure of web-r3"
        );
    }

    #[test]
    fn status_shows_the_rollout_revisions_and_a_pause() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_740_830_400);
        let mut s = service(now);
        s.paused = true;
        s.revisions = vec![1, 2, 3];
        s.rollout = Some(pb::RolloutStatus {
            state: wire::rollout_state("failed"),
            reason: "web-5 exited(1)".into(),
            ..running_rollout()
        });
        let got = text(|o| write_status(o, &s, now));
        assert!(
            got.starts_with(
                "service:    web\n\
                 revision:   3\n\
                 instances:  3 desired, 1 running, 0 healthy\n\
                 health:     unhealthy\n\
                 state:      paused (a rollout failed; apply, restart or rollback to continue)\n\
                 rollout:    web-r3 (restart, revision 2) failed: web-5 exited(1)\n\
                 revisions:  1, 2, 3\n\
                 command:    "
            ),
            "{got}"
        );
    }

    #[test]
    fn a_rollout_shows_its_fields_then_its_steps() {
        let r = pb::RolloutStatus {
            state: wire::rollout_state("failed"),
            finished_at: ts(1_740_830_409, 400),
            reason: "web-5 not ready within 60s".into(),
            rollback_id: "web-r4".into(),
            ..running_rollout()
        };
        let back = pb::RolloutStatus {
            state: wire::rollout_state("succeeded"),
            ..Default::default()
        };
        let got = text(|o| write_rollout(o, &r, Some(&back)));
        let want = "\
rollout:         web-r3
service:         web
kind:            restart
state:           failed
revision:        2
progress:        2/4 old replaced (2 left), 3/4 new ready (3 started), 4 available
policy:          max_surge 1, max_unavailable 0, min_healthy 2s, healthy_deadline 1m, auto_rollback on
started:         2025-03-01T12:00:00.000Z
finished:        2025-03-01T12:00:09.400Z (after 9.4s)
reason:          web-5 not ready within 60s
rolled back by:  web-r4 (succeeded)

TIME                      STEP     INSTANCE  MESSAGE
2025-03-01T12:00:01.250Z  started  web-4     web-4 started
2025-03-01T12:00:04.250Z  ready    web-4     web-4 ready after 2s
2025-03-01T12:00:05.250Z  started  web-5     web-5 started
";
        assert_eq!(got, want);

        let bare = pb::RolloutStatus {
            id: "web-r4".into(),
            rollback_of: "web-r3".into(),
            ..Default::default()
        };
        let got = text(|o| write_rollout(o, &bare, None));
        assert!(got.contains("\nrollback of:  web-r3\n"), "{got}");
        assert!(got.contains("\npolicy:       -\n"), "{got}");
        assert!(got.ends_with("\n\nno steps yet\n"), "{got}");
    }

    #[test]
    fn rollout_progress_on_one_line() {
        let r = running_rollout();
        assert_eq!(
            rollout_progress_line(&r),
            "web-r3 restart rev 2 → 2  [######----]  2/4 replaced · 3/4 ready · 4 available · started web-5"
        );
        let empty = pb::RolloutStatus::default();
        assert_eq!(
            rollout_progress_line(&empty),
            " rollout rev 0 → 0  [##########]  0/0 replaced · 0/0 ready · 0 available"
        );
        // Counts beyond the totals do not overflow the bar.
        let odd = pb::RolloutStatus {
            replaced: 9,
            ready: u32::MAX,
            ..r
        };
        assert!(rollout_progress_line(&odd).contains("[##########]"));
        assert_eq!(
            rollout_step_line(&running_rollout().steps[1]),
            "2025-03-01T12:00:04.250Z ready web-4 web-4 ready after 2s"
        );
        assert_eq!(
            rollout_step_line(&pb::RolloutStep {
                step: "succeeded".into(),
                ..Default::default()
            }),
            "-                        succeeded -"
        );
    }

    #[test]
    fn diff_says_whether_instances_would_be_rolled() {
        let resp = |outcome: &str, replaces| pb::ApplyResponse {
            name: "web".into(),
            revision: 3,
            outcome: wire::apply_outcome(outcome),
            changes: vec![],
            replaces_instances: replaces,
            rollout_id: String::new(),
            ..Default::default()
        };
        let mut current = service(SystemTime::UNIX_EPOCH);
        current
            .spec
            .as_mut()
            .unwrap()
            .rollout
            .replace(running_rollout().policy.unwrap());
        assert_eq!(
            text(|o| write_replacement(o, &resp("updated", true), Some(&current))),
            "would replace 3 instances by a rolling update (max_surge 1, max_unavailable 0)\n"
        );
        current.instances.truncate(1);
        current.spec = None;
        assert_eq!(
            text(|o| write_replacement(o, &resp("updated", true), Some(&current))),
            "would replace 1 instance by a rolling update\n"
        );
        assert_eq!(
            text(|o| write_replacement(o, &resp("updated", true), None)),
            "instances would be replaced by a rolling update\n"
        );
        assert_eq!(
            text(|o| write_replacement(o, &resp("scaled", false), None)),
            "no instance would be replaced: only the number of instances changes\n"
        );
        assert_eq!(
            text(|o| write_replacement(o, &resp("unchanged", false), None)),
            "nothing would change: no instance would be replaced\n"
        );
        assert_eq!(
            text(|o| write_replacement(o, &resp("created", false), None)),
            ""
        );
    }

    #[test]
    fn started_rollouts_and_applies_name_their_rollout() {
        let r = pb::RolloutResponse {
            name: "web".into(),
            revision: 2,
            rollout_id: "web-r3".into(),
            ..Default::default()
        };
        assert_eq!(
            text(|o| write_rollout_started(o, "restart", &r)),
            "web: rollout web-r3 started (restart, revision 2)\n"
        );
        assert_eq!(
            text(|o| write_rollout_started(o, "rollback", &r)),
            "web: rollout web-r3 started (rollback to revision 2)\n"
        );
        let none = pb::RolloutResponse {
            rollout_id: String::new(),
            ..r
        };
        assert_eq!(
            text(|o| write_rollout_started(o, "restart", &none)),
            "web: no rollout started (restart, revision 2)\n"
        );
        let applied = pb::ApplyResponse {
            name: "web".into(),
            revision: 4,
            outcome: wire::apply_outcome("updated"),
            changes: vec!["command: changed".into()],
            replaces_instances: true,
            rollout_id: "web-r5".into(),
            ..Default::default()
        };
        assert_eq!(
            text(|o| write_apply(o, "web.toml", &applied, false)),
            "web: updated to revision 4, rollout web-r5 replaces the instances\n  command: changed\n"
        );
    }

    #[test]
    fn rollout_events_read_as_rows() {
        let mut table = EventTable::default();
        let got = text(|o| {
            table.write(
                o,
                &[
                    event(
                        9,
                        "",
                        "rollout_started",
                        "rollout web-r3 started: restart of revision 2",
                    ),
                    event(10, "web-5", "rollout_step", "web-r3: web-5 ready"),
                    event(
                        11,
                        "",
                        "rollout_finished",
                        "rollout web-r3 succeeded in 9.4s",
                    ),
                ],
            )
        });
        assert_eq!(
            got,
            "INDEX  TIME                      SERVICE  INSTANCE  TYPE              MESSAGE\n\
             9      2025-03-01T12:00:00.250Z  web      -         rollout_started   rollout web-r3 started: restart of revision 2\n\
             10     2025-03-01T12:00:00.250Z  web      web-5     rollout_step      web-r3: web-5 ready\n\
             11     2025-03-01T12:00:00.250Z  web      -         rollout_finished  rollout web-r3 succeeded in 9.4s\n"
        );
    }
}
