//! `restart`, `rollback` and `rollout`, and `--wait`: following a rollout to its end by polling
//! `GetRollout`, or, for an apply that started none, polling `Get` until the service's desired
//! instances are running and healthy.
//!
//! Progress goes to `err`: on a terminal one line redrawn in place, otherwise one line per new
//! step of the rollout, so that a log of the run stays readable; nothing with `-o json`. The
//! outcome of a rollout that succeeded goes to `out`; every failure (failed, superseded, timed
//! out) is reported on `err` as `error: ...` and makes the command exit 1.

use std::io::{self, Write};
use std::time::Duration;

use corral_proto::v1 as pb;
use tokio::time::Instant;

use super::{Console, Interrupt, Outcome};
use crate::args::{ConnectArgs, Format, RestartArgs, RollbackArgs};
use crate::client::{self, Session};
use crate::render::{self, one_line, rollout_progress_line, rollout_step_line, rollout_took};
use crate::views::{RolloutStartedView, RolloutStatusView, health_name, rollout_state_name};

/// How often a followed rollout (or a service waited for) is read again.
const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// Redraws a terminal line: back to its start with auto-wrap off, so that a line wider than
/// the terminal is cut at its edge rather than wrapped onto a line `\r` cannot reach.
const REDRAW: &str = "\r\x1b[?7l";
/// Clears the rest of the line, then turns auto-wrap back on.
const END_REDRAW: &str = "\x1b[K\x1b[?7h";

/// How many not-ready instances a timed-out wait names.
const MISSING_NAMED_MAX: usize = 5;

pub async fn restart(
    conn: &ConnectArgs,
    format: Format,
    args: &RestartArgs,
    out: &mut dyn Write,
    err: &mut dyn Write,
    console: Console,
) -> anyhow::Result<Outcome> {
    let mut session = client::connect(conn).await?;
    let resp = session
        .restart(&args.name, args.force, args.expected_revision)
        .await?;
    let waiter = args
        .wait
        .wait
        .then(|| Waiter::new(format, args.wait.timeout, console));
    started(&mut session, format, "restart", &resp, waiter, out, err).await
}

pub async fn rollback(
    conn: &ConnectArgs,
    format: Format,
    args: &RollbackArgs,
    out: &mut dyn Write,
    err: &mut dyn Write,
    console: Console,
) -> anyhow::Result<Outcome> {
    let mut session = client::connect(conn).await?;
    let resp = session
        .rollback(
            &args.name,
            args.revision,
            args.force,
            args.expected_revision,
        )
        .await?;
    let waiter = args
        .wait
        .wait
        .then(|| Waiter::new(format, args.wait.timeout, console));
    started(&mut session, format, "rollback", &resp, waiter, out, err).await
}

/// Reports a rollout `restart` or `rollback` started and, with a `waiter` (--wait), follows it.
async fn started(
    session: &mut Session,
    format: Format,
    kind: &str,
    resp: &pb::RolloutResponse,
    waiter: Option<Waiter>,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> anyhow::Result<Outcome> {
    let Some(mut waiter) = waiter.filter(|_| !resp.rollout_id.is_empty()) else {
        match format {
            Format::Json => render::write_json(out, &RolloutStartedView::from(resp))?,
            Format::Table => render::write_rollout_started(out, kind, resp)?,
        }
        return Ok(Outcome::Success);
    };
    if format == Format::Table {
        render::write_rollout_started(out, kind, resp)?;
        out.flush()?;
    }
    let followed = waiter.follow(session, &resp.rollout_id, out, err).await?;
    if format == Format::Json {
        render::write_json(out, &followed.view())?;
    }
    Ok(followed.outcome)
}

/// `rollout ID`: one rollout, and the state of the rollback it started if the agent still
/// keeps it.
pub async fn show(
    conn: &ConnectArgs,
    format: Format,
    id: &str,
    out: &mut dyn Write,
) -> anyhow::Result<Outcome> {
    let mut session = client::connect(conn).await?;
    let status = session.get_rollout(id).await?;
    // The rollback's state only adds to the answer: one the agent no longer keeps (or cannot
    // read) is named without it.
    let rollback = if status.rollback_id.is_empty() {
        None
    } else {
        session.get_rollout(&status.rollback_id).await.ok()
    };
    match format {
        Format::Json => render::write_json(
            out,
            &RolloutStatusView::with_rollback(&status, rollback.as_ref()),
        )?,
        Format::Table => render::write_rollout(out, &status, rollback.as_ref())?,
    }
    Ok(Outcome::Success)
}

/// How a `--wait` ended.
#[derive(Debug)]
pub struct Followed {
    pub outcome: Outcome,
    /// The rollout's last status read (`None` when none was followed, or none could be read).
    pub status: Option<pb::RolloutStatus>,
    /// The last status read of the rollback the rollout's failure started.
    pub rollback: Option<pb::RolloutStatus>,
    /// Why the wait did not succeed; already reported on `err`.
    pub error: Option<String>,
    /// The user stopped the wait (Ctrl-C): nothing else is to be waited for.
    pub interrupted: bool,
}

impl Followed {
    fn new(outcome: Outcome) -> Self {
        Followed {
            outcome,
            status: None,
            rollback: None,
            error: None,
            interrupted: false,
        }
    }

    /// The rollout as `-o json` prints it; `None` (printed as `null`) when none was read.
    pub fn view(&self) -> Option<RolloutStatusView> {
        self.status
            .as_ref()
            .map(|s| RolloutStatusView::with_rollback(s, self.rollback.as_ref()))
    }
}

/// How one poll loop ended.
#[derive(Debug)]
enum Watched {
    /// The rollout ended (succeeded, failed or superseded).
    Ended(pb::RolloutStatus),
    /// The deadline passed; the last status read, if any, and the last error if reading failed.
    TimedOut(Option<pb::RolloutStatus>, Option<anyhow::Error>),
    /// The user stopped the wait.
    Interrupted(Option<pb::RolloutStatus>),
}

/// Whether a rollout in `state` will not change any more.
fn has_ended(state: &str) -> bool {
    matches!(state, "succeeded" | "failed" | "superseded")
}

/// Follows rollouts and waits for services, each within its own `timeout`.
pub struct Waiter {
    format: Format,
    timeout: Duration,
    progress: Progress,
    interrupt: Interrupt,
}

impl std::fmt::Debug for Waiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Waiter")
            .field("format", &self.format)
            .field("timeout", &self.timeout)
            .field("progress", &self.progress)
            .finish_non_exhaustive()
    }
}

impl Waiter {
    pub fn new(format: Format, timeout: Duration, console: Console) -> Self {
        let mode = match format {
            Format::Json => Mode::Off,
            Format::Table if console.progress_terminal => Mode::Live,
            Format::Table => Mode::Lines,
        };
        Waiter {
            format,
            timeout,
            progress: Progress::new(mode),
            interrupt: console.interrupt,
        }
    }

    /// Follows rollout `id` to its end, and then the rollback its failure started, if any.
    /// Success only when the rollout itself succeeded.
    pub async fn follow(
        &mut self,
        session: &mut Session,
        id: &str,
        out: &mut dyn Write,
        err: &mut dyn Write,
    ) -> anyhow::Result<Followed> {
        let deadline = Instant::now() + self.timeout;
        let watched = self.watch(session, id, deadline, err).await;
        self.progress.end(err)?;
        let status = match watched? {
            Watched::Ended(status) => status,
            other => return self.unfinished(id, other, err),
        };
        let mut followed = Followed::new(Outcome::Failed);
        let error = match rollout_state_name(status.state) {
            "succeeded" => {
                if self.format == Format::Table {
                    let took = rollout_took(&status).map_or_else(String::new, |d| {
                        format!(" in {}", render::human_duration(d))
                    });
                    writeln!(out, "rollout {id} succeeded{took}")?;
                }
                followed.outcome = Outcome::Success;
                None
            }
            state => Some(format!(
                "rollout {id} {}{}",
                one_line(state),
                reason(&status)
            )),
        };
        if let Some(error) = &error {
            writeln!(err, "error: {error}")?;
        }
        followed.error = error;
        let rollback_id = status.rollback_id.clone();
        let rolls_back = rollout_state_name(status.state) == "failed" && !rollback_id.is_empty();
        followed.status = Some(status);
        if rolls_back {
            if self.format == Format::Table {
                writeln!(err, "following its rollback, rollout {rollback_id}")?;
            }
            let watched = self.watch(session, &rollback_id, deadline, err).await;
            self.progress.end(err)?;
            match watched? {
                Watched::Ended(rollback) => {
                    if rollout_state_name(rollback.state) == "succeeded" {
                        writeln!(
                            err,
                            "rolled back to revision {} (rollout {rollback_id} succeeded)",
                            rollback.to_revision
                        )?;
                    } else {
                        writeln!(
                            err,
                            "error: the rollback did not succeed either: rollout {rollback_id} {}{}",
                            rollout_state_name(rollback.state),
                            reason(&rollback)
                        )?;
                    }
                    followed.rollback = Some(rollback);
                }
                other => {
                    let rollback = self.unfinished(&rollback_id, other, err)?;
                    followed.rollback = rollback.status;
                    followed.interrupted = rollback.interrupted;
                }
            }
        }
        Ok(followed)
    }

    /// Reports a rollout that was still running when the wait ended.
    fn unfinished(
        &self,
        id: &str,
        watched: Watched,
        err: &mut dyn Write,
    ) -> anyhow::Result<Followed> {
        let mut followed = Followed::new(Outcome::Failed);
        let goes_on = format!("the rollout goes on; `corral rollout {id}` shows it");
        let error = match watched {
            Watched::Ended(status) => {
                followed.status = Some(status);
                return Ok(followed);
            }
            Watched::Interrupted(status) => {
                followed.status = status;
                followed.interrupted = true;
                format!("stopped waiting: {goes_on}")
            }
            Watched::TimedOut(Some(status), _) => {
                let error = format!(
                    "rollout {id} still running after {}: {} ({goes_on})",
                    humantime::format_duration(self.timeout),
                    rollout_missing(&status)
                );
                followed.status = Some(status);
                error
            }
            Watched::TimedOut(None, cause) => {
                let cause = cause.map_or_else(String::new, |e| format!(": {e:#}"));
                format!(
                    "rollout {id}: no answer within {}{cause}",
                    humantime::format_duration(self.timeout)
                )
            }
        };
        writeln!(err, "error: {error}")?;
        followed.error = Some(error);
        Ok(followed)
    }

    /// Polls rollout `id` until it ends, the deadline passes or the user interrupts, showing
    /// its progress. The agent being unavailable for a while (restarting) is waited out.
    async fn watch(
        &mut self,
        session: &mut Session,
        id: &str,
        deadline: Instant,
        err: &mut dyn Write,
    ) -> anyhow::Result<Watched> {
        let mut last: Option<pb::RolloutStatus> = None;
        let mut last_error = None;
        loop {
            let read = tokio::select! {
                biased;
                () = self.interrupt.as_mut() => return Ok(Watched::Interrupted(last)),
                () = tokio::time::sleep_until(deadline) => {
                    return Ok(Watched::TimedOut(last, last_error));
                }
                read = session.get_rollout(id) => read,
            };
            match read {
                Ok(status) => {
                    // Before it replaces anything, a rollout may be fetching its package.
                    let package =
                        if status.replaced == 0 && !has_ended(rollout_state_name(status.state)) {
                            session
                                .get(&status.service)
                                .await
                                .ok()
                                .and_then(|s| s.package)
                                .filter(|p| {
                                    p.revision == status.to_revision
                                        && matches!(p.phase.as_str(), "fetching" | "unpacking")
                                })
                        } else {
                            None
                        };
                    match package {
                        Some(p) => self.progress.package(err, &status, &p)?,
                        None => self.progress.rollout(err, &status)?,
                    }
                    if has_ended(rollout_state_name(status.state)) {
                        return Ok(Watched::Ended(status));
                    }
                    last = Some(status);
                    last_error = None;
                }
                Err(e) if client::is_unavailable(&e) => last_error = Some(e),
                Err(e) => return Err(e),
            }
            tokio::select! {
                biased;
                () = self.interrupt.as_mut() => return Ok(Watched::Interrupted(last)),
                () = tokio::time::sleep_until(deadline) => {
                    return Ok(Watched::TimedOut(last, last_error));
                }
                () = tokio::time::sleep(POLL_INTERVAL) => {}
            }
        }
    }

    /// Waits until service `name` has its desired instances running and healthy — all of
    /// them of `revision` when given (an update that started no rollout).
    pub async fn until_ready(
        &mut self,
        session: &mut Session,
        name: &str,
        revision: Option<u64>,
        out: &mut dyn Write,
        err: &mut dyn Write,
    ) -> anyhow::Result<Followed> {
        let deadline = Instant::now() + self.timeout;
        let mut last: Option<pb::ServiceStatus> = None;
        let mut last_error = None;
        let mut interrupted = false;
        loop {
            let read = tokio::select! {
                biased;
                () = self.interrupt.as_mut() => { interrupted = true; break; }
                () = tokio::time::sleep_until(deadline) => break,
                read = session.get(name) => read,
            };
            match read {
                Ok(status) => {
                    if is_ready(&status, revision) {
                        self.progress.end(err)?;
                        if self.format == Format::Table {
                            writeln!(
                                out,
                                "{name}: {n}/{n} instances running and healthy",
                                n = status.desired
                            )?;
                        }
                        return Ok(Followed::new(Outcome::Success));
                    }
                    self.progress.text(
                        err,
                        format!(
                            "{name}: waiting for {}: {} running, {} healthy",
                            instances(status.desired),
                            status.running,
                            status.healthy
                        ),
                    )?;
                    last = Some(status);
                    last_error = None;
                }
                Err(e) if client::is_unavailable(&e) => last_error = Some(e),
                Err(e) => {
                    self.progress.end(err)?;
                    return Err(e);
                }
            }
            tokio::select! {
                biased;
                () = self.interrupt.as_mut() => { interrupted = true; break; }
                () = tokio::time::sleep_until(deadline) => break,
                () = tokio::time::sleep(POLL_INTERVAL) => {}
            }
        }
        self.progress.end(err)?;
        let mut followed = Followed::new(Outcome::Failed);
        let error = if interrupted {
            followed.interrupted = true;
            format!("{name}: stopped waiting")
        } else {
            let after = humantime::format_duration(self.timeout);
            match (&last, last_error) {
                (Some(status), _) => {
                    format!(
                        "{name}: not ready after {after}: {}",
                        service_missing(status, revision)
                    )
                }
                (None, Some(e)) => format!("{name}: no answer within {after}: {e:#}"),
                (None, None) => format!("{name}: no answer within {after}"),
            }
        };
        writeln!(err, "error: {error}")?;
        followed.error = Some(error);
        Ok(followed)
    }
}

/// `: <reason>`, or nothing when the rollout gives none.
fn reason(status: &pb::RolloutStatus) -> String {
    let reason = one_line(status.reason.trim());
    if reason.is_empty() {
        String::new()
    } else {
        format!(": {reason}")
    }
}

/// `1 instance`, `3 instances`.
fn instances(n: u32) -> String {
    format!("{n} {}", if n == 1 { "instance" } else { "instances" })
}

/// What a running rollout still has to do: `1 of 2 old instances still to replace, ...`.
fn rollout_missing(s: &pb::RolloutStatus) -> String {
    let mut missing = Vec::new();
    let to_replace = s.to_replace.saturating_sub(s.replaced);
    if to_replace > 0 {
        missing.push(format!(
            "{to_replace} of {} old instances still to replace",
            s.to_replace
        ));
    }
    let unready = s.replicas.saturating_sub(s.ready);
    if unready > 0 {
        missing.push(format!(
            "{unready} of {} new instances not ready",
            s.replicas
        ));
    }
    if missing.is_empty() {
        "finishing".to_owned()
    } else {
        missing.join(", ")
    }
}

/// Whether a service has its desired instances running and healthy (of `revision`, if given).
fn is_ready(s: &pb::ServiceStatus, revision: Option<u64>) -> bool {
    let current = |i: &pb::InstanceStatus| revision.is_none_or(|r| i.revision == r);
    s.running >= s.desired && s.healthy >= s.desired && s.instances.iter().all(current)
}

/// What a service still lacks: `2 of 3 instances not healthy: web-1 (unhealthy: HTTP 503), ...`.
fn service_missing(s: &pb::ServiceStatus, revision: Option<u64>) -> String {
    let mut missing = Vec::new();
    let not_running = s.desired.saturating_sub(s.running);
    if not_running > 0 {
        missing.push(format!(
            "{not_running} of {} instances not running",
            s.desired
        ));
    }
    let not_healthy = s.desired.saturating_sub(s.healthy);
    if not_healthy > 0 {
        missing.push(format!(
            "{not_healthy} of {} instances not healthy",
            s.desired
        ));
    }
    if let Some(revision) = revision {
        let old = s
            .instances
            .iter()
            .filter(|i| i.revision != revision)
            .count();
        if old > 0 {
            missing.push(format!(
                "{old} of {} instances not of revision {revision} yet",
                s.instances.len()
            ));
        }
    }
    let mut text = if missing.is_empty() {
        "not settled yet".to_owned()
    } else {
        missing.join(", ")
    };
    let named: Vec<String> = s
        .instances
        .iter()
        .filter(|i| health_name(i.health) != "healthy" || revision.is_some_and(|r| i.revision != r))
        .take(MISSING_NAMED_MAX)
        .map(|i| {
            let state = crate::views::state_name(i.state);
            match (health_name(i.health), i.health_reason.trim()) {
                ("unhealthy", "") => format!("{} ({state}, unhealthy)", i.id),
                ("unhealthy", why) => format!("{} ({state}, unhealthy: {why})", i.id),
                _ => format!("{} ({state})", i.id),
            }
        })
        .collect();
    if !named.is_empty() {
        text = format!("{text}: {}", named.join(", "));
    }
    text
}

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Not at all (`-o json`).
    Off,
    /// One line redrawn in place (a terminal).
    Live,
    /// One line per change (a pipe or a file).
    Lines,
}

/// The progress of what is waited for, written to `err`.
#[derive(Debug)]
struct Progress {
    mode: Mode,
    /// The last step printed, in [`Mode::Lines`].
    last_step: Option<pb::RolloutStep>,
    /// The last text line printed, in [`Mode::Lines`].
    last_line: Option<String>,
    /// A live line is on the screen, not yet ended.
    drawn: bool,
}

impl Progress {
    fn new(mode: Mode) -> Self {
        Progress {
            mode,
            last_step: None,
            last_line: None,
            drawn: false,
        }
    }

    /// Shows a rollout's status: redraws its line, or prints the steps not printed yet.
    fn rollout(&mut self, err: &mut dyn Write, s: &pb::RolloutStatus) -> io::Result<()> {
        match self.mode {
            Mode::Off => Ok(()),
            Mode::Live => self.draw(err, &rollout_progress_line(s)),
            Mode::Lines => {
                for step in new_steps(&s.steps, self.last_step.as_ref()) {
                    writeln!(err, "{}", rollout_step_line(step))?;
                }
                if let Some(step) = s.steps.last() {
                    self.last_step = Some(step.clone());
                }
                err.flush()
            }
        }
    }

    /// Shows a rollout fetching or unpacking its package: its line with the bytes done,
    /// redrawn, or (lines) the package's phase once per change.
    fn package(
        &mut self,
        err: &mut dyn Write,
        s: &pb::RolloutStatus,
        p: &pb::PackageStatus,
    ) -> io::Result<()> {
        let service = one_line(&s.service);
        match self.mode {
            Mode::Off => Ok(()),
            Mode::Live => self.draw(
                err,
                &format!(
                    "{} · package {}",
                    rollout_progress_line(s),
                    render::package_line(p, true)
                ),
            ),
            Mode::Lines => self.text(
                err,
                format!("{service}: package {}", render::package_line(p, false)),
            ),
        }
    }

    /// Shows a line of text: redrawn in place, or printed when it differs from the last one.
    fn text(&mut self, err: &mut dyn Write, line: String) -> io::Result<()> {
        match self.mode {
            Mode::Off => Ok(()),
            Mode::Live => self.draw(err, &line),
            Mode::Lines if self.last_line.as_ref() == Some(&line) => Ok(()),
            Mode::Lines => {
                writeln!(err, "{line}")?;
                self.last_line = Some(line);
                err.flush()
            }
        }
    }

    fn draw(&mut self, err: &mut dyn Write, line: &str) -> io::Result<()> {
        write!(err, "{REDRAW}{line}{END_REDRAW}")?;
        self.drawn = true;
        err.flush()
    }

    /// Ends what was shown (the live line stays on the screen), ready for something else.
    fn end(&mut self, err: &mut dyn Write) -> io::Result<()> {
        if self.drawn {
            writeln!(err)?;
            self.drawn = false;
        }
        self.last_step = None;
        self.last_line = None;
        err.flush()
    }
}

/// The steps after `last` (all of them when `last` is not among them any more).
fn new_steps<'a>(
    steps: &'a [pb::RolloutStep],
    last: Option<&pb::RolloutStep>,
) -> &'a [pb::RolloutStep] {
    let seen = last.and_then(|last| steps.iter().rposition(|s| s == last));
    match seen {
        Some(i) => steps.get(i + 1..).unwrap_or_default(),
        None => steps,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::views::wire;

    fn step(seconds: i64, step: &str, instance: &str) -> pb::RolloutStep {
        pb::RolloutStep {
            time: Some(prost_types::Timestamp { seconds, nanos: 0 }),
            step: step.into(),
            instance: instance.into(),
            message: format!("{step} {instance}"),
        }
    }

    #[test]
    fn only_steps_after_the_last_printed_are_new() {
        let steps = [
            step(1, "started", "web-2"),
            step(2, "ready", "web-2"),
            step(3, "stopping", "web-0"),
        ];
        assert_eq!(new_steps(&steps, None).len(), 3);
        assert_eq!(new_steps(&steps, Some(&steps[0])), &steps[1..]);
        assert!(new_steps(&steps, Some(&steps[2])).is_empty());
        // The kept window moved past the last one printed: all are new.
        assert_eq!(
            new_steps(&steps, Some(&step(0, "started", "web-1"))).len(),
            3
        );
        assert!(new_steps(&[], Some(&steps[0])).is_empty());
    }

    #[test]
    fn lines_mode_prints_each_step_once() {
        let mut progress = Progress::new(Mode::Lines);
        let mut err = Vec::new();
        let mut status = pb::RolloutStatus {
            steps: vec![step(1, "started", "web-2")],
            ..Default::default()
        };
        progress.rollout(&mut err, &status).unwrap();
        progress.rollout(&mut err, &status).unwrap();
        status.steps.push(step(2, "ready", "web-2"));
        progress.rollout(&mut err, &status).unwrap();
        progress.end(&mut err).unwrap();
        assert_eq!(
            String::from_utf8(err).unwrap(),
            "1970-01-01T00:00:01.000Z started web-2 started web-2\n\
             1970-01-01T00:00:02.000Z ready web-2 ready web-2\n"
        );
    }

    #[test]
    fn live_mode_redraws_one_line_and_ends_it() {
        let mut progress = Progress::new(Mode::Live);
        let mut err = Vec::new();
        let status = pb::RolloutStatus {
            id: "web-r3".into(),
            kind: wire::rollout_kind("restart"),
            from_revision: 2,
            to_revision: 2,
            replicas: 4,
            to_replace: 4,
            replaced: 2,
            ready: 3,
            available: 4,
            steps: vec![step(1, "started", "web-5")],
            ..Default::default()
        };
        progress.rollout(&mut err, &status).unwrap();
        progress.rollout(&mut err, &status).unwrap();
        progress.end(&mut err).unwrap();
        progress.end(&mut err).unwrap();
        let line = "web-r3 restart rev 2 → 2  [######----]  2/4 replaced · 3/4 ready · 4 available · started web-5";
        assert_eq!(
            String::from_utf8(err).unwrap(),
            format!("{REDRAW}{line}{END_REDRAW}{REDRAW}{line}{END_REDRAW}\n")
        );
    }

    #[test]
    fn nothing_is_shown_with_json() {
        let mut progress = Progress::new(Mode::Off);
        let mut err = Vec::new();
        let status = pb::RolloutStatus {
            steps: vec![step(1, "started", "web-2")],
            ..Default::default()
        };
        progress.rollout(&mut err, &status).unwrap();
        progress.text(&mut err, "web: waiting".into()).unwrap();
        progress.end(&mut err).unwrap();
        assert!(err.is_empty());
    }

    #[test]
    fn a_timed_out_rollout_says_what_is_left() {
        let s = pb::RolloutStatus {
            replicas: 4,
            to_replace: 4,
            replaced: 1,
            ready: 4,
            ..Default::default()
        };
        assert_eq!(rollout_missing(&s), "3 of 4 old instances still to replace");
        let s = pb::RolloutStatus { ready: 2, ..s };
        assert_eq!(
            rollout_missing(&s),
            "3 of 4 old instances still to replace, 2 of 4 new instances not ready"
        );
        let s = pb::RolloutStatus {
            replaced: 4,
            ready: 4,
            ..s
        };
        assert_eq!(rollout_missing(&s), "finishing");
    }

    fn instance(index: u32, revision: u64, health: &str, reason: &str) -> pb::InstanceStatus {
        pb::InstanceStatus {
            id: format!("web-{index}"),
            index,
            revision,
            state: pb::InstanceState::Running as i32,
            health: wire::health(health),
            health_reason: reason.into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_service_is_ready_with_every_desired_instance_healthy() {
        let mut s = pb::ServiceStatus {
            desired: 2,
            running: 2,
            healthy: 1,
            instances: vec![
                instance(0, 3, "healthy", ""),
                instance(1, 3, "unhealthy", "HTTP 503"),
            ],
            ..Default::default()
        };
        assert!(!is_ready(&s, None));
        assert_eq!(
            service_missing(&s, None),
            "1 of 2 instances not healthy: web-1 (running, unhealthy: HTTP 503)"
        );
        s.healthy = 2;
        s.instances[1].health = wire::health("healthy");
        assert!(is_ready(&s, None));
        assert!(is_ready(&s, Some(3)));
        s.instances[0].revision = 2;
        assert!(!is_ready(&s, Some(3)));
        assert_eq!(
            service_missing(&s, Some(3)),
            "1 of 2 instances not of revision 3 yet: web-0 (running)"
        );
        let none = pb::ServiceStatus::default();
        assert!(is_ready(&none, None));
    }

    #[test]
    fn only_final_states_end_a_rollout() {
        for state in ["succeeded", "failed", "superseded"] {
            assert!(has_ended(state), "{state}");
        }
        for state in ["running", "", "pending"] {
            assert!(!has_ended(state), "{state}");
        }
    }
}
