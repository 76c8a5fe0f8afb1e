//! `logs` and `events`: server streams, printed as they arrive — lines of text or a table for
//! people, JSON Lines for scripts.
//!
//! Output is buffered while replies keep coming and flushed whenever the stream has nothing more
//! ready, so a long history is written in large blocks and a followed line shows at once.

use std::future;
use std::io::{self, BufWriter, Write};
use std::time::SystemTime;

use corral_proto::v1 as pb;

use super::service::instance_id;
use super::{Interrupt, Outcome};
use crate::args::{
    ConnectArgs, DEFAULT_EVENTS_LAST, EventsArgs, Format, LogTarget, LogsArgs, Since,
};
use crate::client::{self, Replies, Session};
use crate::render::{self, EventTable};
use crate::views::{EventView, LogLineView};

/// The most replies printed together before the output is written out.
const BATCH_MAX: usize = 1024;

pub async fn logs(
    conn: &ConnectArgs,
    format: Format,
    args: &LogsArgs,
    out: &mut dyn Write,
    interrupt: Interrupt,
) -> anyhow::Result<Outcome> {
    let since = args
        .since
        .and_then(|since| since_time(since, SystemTime::now()));
    let mut session = client::connect(conn).await?;
    let mut replies = open_logs(&mut session, args, since).await?;
    let mut interrupt = if args.follow {
        interrupt
    } else {
        Box::pin(future::pending())
    };
    let mut out = BufWriter::new(out);
    loop {
        let batch = next_batch(&mut replies, &mut out, &mut interrupt).await?;
        for line in &batch.items {
            match format {
                Format::Json => render::write_json_line(&mut out, &LogLineView::from(line))?,
                Format::Table => render::write_log_line(&mut out, line)?,
            }
        }
        if let Some(end) = batch.end {
            return end.finish(&mut out);
        }
    }
}

/// Opens the log stream of the service or instance asked for. A NAME-INDEX that names no
/// service is read as the instance of that id.
async fn open_logs(
    session: &mut Session,
    args: &LogsArgs,
    since: Option<prost_types::Timestamp>,
) -> anyhow::Result<Replies<pb::LogLine>> {
    let request = |service: &str, instance: &str| pb::LogsRequest {
        service: service.to_owned(),
        instance: instance.to_owned(),
        follow: args.follow,
        tail: args.tail,
        since,
    };
    match &args.target {
        LogTarget::Instance(id) => session.logs(request("", id)).await,
        LogTarget::Service(name) => match session.logs(request(name, "")).await {
            Err(e) if client::is_not_found(&e) => match args.target.instance_fallback() {
                Some(id) => session.logs(request("", id)).await,
                None => Err(e),
            },
            replies => replies,
        },
    }
}

/// The time `--since` stands for, `now` being when the command runs; `None` (everything) for a
/// duration reaching back before any time a clock can tell.
pub fn since_time(since: Since, now: SystemTime) -> Option<prost_types::Timestamp> {
    match since {
        Since::At(at) => Some(at),
        Since::Ago(ago) => now.checked_sub(ago).map(prost_types::Timestamp::from),
    }
}

pub async fn events(
    conn: &ConnectArgs,
    format: Format,
    args: &EventsArgs,
    out: &mut dyn Write,
    err: &mut dyn Write,
    interrupt: Interrupt,
) -> anyhow::Result<Outcome> {
    let request = watch_request(args);
    let mut replies = client::connect(conn).await?.watch(request).await?;
    let mut interrupt = if args.follow {
        interrupt
    } else {
        Box::pin(future::pending())
    };
    let mut out = BufWriter::new(out);
    let mut table = EventTable::default();
    if !args.follow {
        // All of them first, so that the table's columns fit every row.
        let mut events = Vec::new();
        let end = loop {
            let mut batch = next_batch(&mut replies, &mut out, &mut interrupt).await?;
            events.append(&mut batch.items);
            if let Some(end) = batch.end {
                break end;
            }
        };
        match format {
            Format::Json => write_event_lines(&mut out, &events)?,
            Format::Table if events.is_empty() => {
                if matches!(end, End::Finished) {
                    writeln!(err, "no events")?;
                }
            }
            Format::Table => table.write(&mut out, &events)?,
        }
        return end.finish(&mut out);
    }
    loop {
        let batch = next_batch(&mut replies, &mut out, &mut interrupt).await?;
        match format {
            Format::Json => write_event_lines(&mut out, &batch.items)?,
            Format::Table if batch.items.is_empty() => {}
            Format::Table => table.write(&mut out, &batch.items)?,
        }
        if let Some(end) = batch.end {
            return end.finish(&mut out);
        }
    }
}

/// The `Watch` request for `events`' flags: from `--since`, else the last `--last` events
/// (50 by default).
pub fn watch_request(args: &EventsArgs) -> pb::WatchRequest {
    let (from_index, last) = match args.since {
        Some(index) => (index, 0),
        None => (0, args.last.unwrap_or(DEFAULT_EVENTS_LAST)),
    };
    pb::WatchRequest {
        from_index,
        service: args.service.clone().unwrap_or_default(),
        instance: args
            .instance
            .as_deref()
            .map(instance_id)
            .unwrap_or_default(),
        follow: args.follow,
        last,
        selector: args.selector.clone().unwrap_or_default(),
        ..Default::default()
    }
}

fn write_event_lines(out: &mut dyn Write, events: &[pb::Event]) -> io::Result<()> {
    for e in events {
        render::write_json_line(out, &EventView::from(e))?;
    }
    Ok(())
}

/// Replies read together, and how the stream ended if it did.
#[derive(Debug)]
struct Batch<T> {
    items: Vec<T>,
    end: Option<End>,
}

/// How a stream ended.
#[derive(Debug)]
enum End {
    /// The agent ended it: everything asked for was sent.
    Finished,
    /// The user stopped it (Ctrl-C).
    Interrupted,
    /// The agent or the connection failed.
    Failed(anyhow::Error),
}

impl End {
    /// The command's result once what came before is written out.
    fn finish(self, out: &mut dyn Write) -> anyhow::Result<Outcome> {
        out.flush()?;
        match self {
            End::Finished | End::Interrupted => Ok(Outcome::Success),
            End::Failed(e) => Err(e),
        }
    }
}

enum Step<T> {
    Interrupted,
    Reply(anyhow::Result<Option<T>>),
    /// No reply ready right now.
    Idle,
}

/// The replies ready now: waits for at least one (flushing `out` first), then takes whatever
/// else is ready, up to [`BATCH_MAX`], or notes how the stream ended.
async fn next_batch<T>(
    replies: &mut Replies<T>,
    out: &mut dyn Write,
    interrupt: &mut Interrupt,
) -> io::Result<Batch<T>> {
    let mut items = Vec::new();
    let mut waiting = false;
    loop {
        let step = tokio::select! {
            biased;
            () = interrupt.as_mut() => Step::Interrupted,
            reply = replies.next() => Step::Reply(reply),
            () = future::ready(()), if !waiting => Step::Idle,
        };
        let end = match step {
            Step::Interrupted => End::Interrupted,
            Step::Reply(Ok(Some(item))) => {
                items.push(item);
                waiting = false;
                if items.len() >= BATCH_MAX {
                    return Ok(Batch { items, end: None });
                }
                continue;
            }
            Step::Reply(Ok(None)) => End::Finished,
            Step::Reply(Err(e)) => End::Failed(e),
            Step::Idle if items.is_empty() => {
                out.flush()?;
                waiting = true;
                continue;
            }
            Step::Idle => return Ok(Batch { items, end: None }),
        };
        return Ok(Batch {
            items,
            end: Some(end),
        });
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn since_is_now_minus_a_duration_or_a_time() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_740_830_400);
        assert_eq!(
            since_time(Since::Ago(Duration::from_secs(600)), now),
            Some(prost_types::Timestamp {
                seconds: 1_740_829_800,
                nanos: 0
            })
        );
        let at = prost_types::Timestamp {
            seconds: 5,
            nanos: 0,
        };
        assert_eq!(since_time(Since::At(at), now), Some(at));
        assert_eq!(since_time(Since::Ago(Duration::MAX), now), None);
    }

    fn events_args(since: Option<u64>, last: Option<u32>) -> EventsArgs {
        EventsArgs {
            follow: false,
            since,
            last,
            service: None,
            instance: Some("web/1".into()),
            selector: None,
        }
    }

    #[test]
    fn events_start_at_the_last_50_unless_told() {
        let r = watch_request(&events_args(None, None));
        assert_eq!((r.from_index, r.last), (0, 50));
        assert_eq!(r.instance, "web-1");
        let r = watch_request(&events_args(None, Some(7)));
        assert_eq!((r.from_index, r.last), (0, 7));
        let r = watch_request(&events_args(Some(120), None));
        assert_eq!((r.from_index, r.last), (120, 0));
        let r = watch_request(&events_args(Some(0), None));
        assert_eq!((r.from_index, r.last), (0, 0));
    }
}
