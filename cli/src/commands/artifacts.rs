//! `artifacts`: the node's artifact store — list, `import FILE`, `gc`.

use std::io::Write;

use corral_proto::v1 as pb;
use serde::Serialize;

use super::Outcome;
use crate::args::{ArtifactsAction, ConnectArgs, Format};
use crate::client;
use crate::render::{self, Table};

#[derive(Debug, Serialize)]
struct EntryView<'a> {
    kind: &'a str,
    digest: &'a str,
    size: u64,
    owners: &'a [String],
    users: u32,
    last_used: Option<String>,
}

#[derive(Debug, Serialize)]
struct ListView<'a> {
    /// 0: unbounded.
    max_cache: u64,
    entries: Vec<EntryView<'a>>,
}

pub async fn run(
    conn: &ConnectArgs,
    format: Format,
    action: Option<ArtifactsAction>,
    out: &mut dyn Write,
) -> anyhow::Result<Outcome> {
    let mut session = client::connect(conn).await?;
    match action.unwrap_or(ArtifactsAction::Ls) {
        ArtifactsAction::Ls => {
            let list = session.list_artifacts().await?;
            let entries: Vec<EntryView<'_>> = list.entries.iter().map(entry_view).collect();
            match format {
                Format::Json => render::write_json(
                    out,
                    &ListView {
                        max_cache: list.max_cache,
                        entries,
                    },
                )?,
                Format::Table => {
                    let mut table = Table::new(vec![
                        "KIND",
                        "DIGEST",
                        "SIZE",
                        "OWNERS",
                        "USERS",
                        "LAST-USED",
                    ]);
                    for e in entries {
                        table.row(vec![
                            e.kind.to_owned(),
                            e.digest.to_owned(),
                            render::human_bytes(e.size),
                            if e.owners.is_empty() {
                                "-".to_owned()
                            } else {
                                e.owners.join(",")
                            },
                            e.users.to_string(),
                            e.last_used.unwrap_or_else(|| "-".to_owned()),
                        ]);
                    }
                    table.write(out)?;
                }
            }
        }
        ArtifactsAction::Import { file } => {
            // The agent reads it on its host: a relative path means this directory.
            let path = std::path::absolute(&file)?;
            let reply = session.import_artifact(&path.to_string_lossy()).await?;
            match format {
                Format::Json => render::write_json(
                    out,
                    &serde_json::json!({"path": path, "digest": reply.digest}),
                )?,
                Format::Table => writeln!(out, "{}: {}", path.display(), reply.digest)?,
            }
        }
        ArtifactsAction::Gc => {
            let r = session.collect_artifacts().await?;
            match format {
                Format::Json => render::write_json(
                    out,
                    &serde_json::json!({
                        "removed": r.removed,
                        "evicted": r.evicted,
                        "freed_bytes": r.freed_bytes,
                    }),
                )?,
                Format::Table => {
                    for e in &r.removed {
                        writeln!(out, "removed {e}")?;
                    }
                    for e in &r.evicted {
                        writeln!(out, "evicted {e}")?;
                    }
                    writeln!(
                        out,
                        "{} removed, {} evicted, {} freed",
                        r.removed.len(),
                        r.evicted.len(),
                        render::human_bytes(r.freed_bytes)
                    )?;
                }
            }
        }
    }
    Ok(Outcome::Success)
}

fn entry_view(e: &pb::ArtifactEntry) -> EntryView<'_> {
    EntryView {
        kind: &e.kind,
        digest: &e.digest,
        size: e.size,
        owners: &e.owners,
        users: e.users,
        last_used: e.last_used.as_ref().and_then(render::time_millis),
    }
}
