//! `apply` and `diff`: send spec files to the agent as TOML text, unparsed — the agent parses
//! and validates them, so an error reads the same whether it came from here, a scheduler or the
//! agent's own `--services` directory. `apply --wait` then waits for each service in turn
//! (see `rollout`).

use std::ffi::OsStr;
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use corral_proto::v1::{ApplyRequest, ApplyResponse, apply_request::Source};

use super::rollout::Waiter;
use super::{Console, Outcome};
use crate::args::{ApplyArgs, ConnectArgs, DiffArgs, Format};
use crate::client::{self, Session};
use crate::render::{write_apply, write_json, write_replacement};
use crate::views::ApplyView;

/// The spec files `-f PATH` names: the file itself, or every `*.toml` file directly inside a
/// directory (not hidden ones, not subdirectories), in name order. `-` is standard input.
pub fn spec_files(path: &Path) -> anyhow::Result<Vec<PathBuf>> {
    if path == Path::new("-") {
        return Ok(vec![path.to_owned()]);
    }
    let meta = fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    if !meta.is_dir() {
        return Ok(vec![path.to_owned()]);
    }
    let entries = fs::read_dir(path).with_context(|| format!("cannot list {}", path.display()))?;
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot list {}", path.display()))?;
        let name = entry.file_name();
        if !is_spec_file_name(&name) {
            continue;
        }
        let file = entry.path();
        // A dangling link or unreadable entry is kept, so that applying it reports why.
        if fs::metadata(&file).is_ok_and(|m| m.is_dir()) {
            continue;
        }
        files.push(file);
    }
    if files.is_empty() {
        bail!("{}: no *.toml spec files in this directory", path.display());
    }
    files.sort();
    Ok(files)
}

/// `web.toml` is a spec file; `.web.toml` (editor lock and swap files) is not.
fn is_spec_file_name(name: &OsStr) -> bool {
    let bytes = name.as_encoded_bytes();
    !bytes.starts_with(b".") && bytes.ends_with(b".toml")
}

pub async fn apply(
    conn: &ConnectArgs,
    format: Format,
    args: &ApplyArgs,
    out: &mut dyn Write,
    err: &mut dyn Write,
    console: Console,
) -> anyhow::Result<Outcome> {
    let mut files = Vec::new();
    for path in &args.file {
        files.extend(spec_files(path)?);
    }
    if files.iter().filter(|f| *f == Path::new("-")).count() > 1 {
        bail!("-f -: standard input can be given once");
    }
    let batch = args.atomic || args.file.len() > 1;
    if args.expected_revision.is_some() && files.len() != 1 {
        let given: Vec<String> = args.file.iter().map(|f| label(f)).collect();
        bail!(
            "--expected-revision: {} holds {} spec files; it applies to one service, so give one file",
            given.join(", "),
            files.len()
        );
    }
    let mut session = client::connect(conn).await?;
    let done = if batch {
        apply_all(&mut session, format, args, &files, out, err).await?
    } else {
        apply_each(&mut session, format, args, &files, out, err).await?
    };
    let (views, outcome) = wait_all(&mut session, format, args, console, done, out, err).await?;
    if format == Format::Json {
        write_json(out, &views)?;
    }
    Ok(outcome)
}

/// What applying the files gave: one view per file, what to wait for (the entry in the
/// views, the service, and what the agent answered), and whether all went well.
type Applied = (Vec<ApplyView>, Vec<(usize, String, ApplyResponse)>, Outcome);

/// A file the agent accepted: reported, and kept to be waited for.
fn accepted(
    format: Format,
    dry_run: bool,
    file: &Path,
    resp: ApplyResponse,
    (views, applied): (
        &mut Vec<ApplyView>,
        &mut Vec<(usize, String, ApplyResponse)>,
    ),
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    if format == Format::Table {
        write_apply(out, &fallback_name(file), &resp, dry_run)?;
    }
    let name = if resp.name.is_empty() {
        fallback_name(file)
    } else {
        resp.name.clone()
    };
    views.push(ApplyView::applied(as_given(file), dry_run, &resp));
    applied.push((views.len() - 1, name, resp));
    Ok(())
}

/// Each file in its own Apply call: a failure is reported and the others are still applied.
async fn apply_each(
    session: &mut Session,
    format: Format,
    args: &ApplyArgs,
    files: &[PathBuf],
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> anyhow::Result<Applied> {
    let mut views = Vec::with_capacity(files.len());
    let mut applied = Vec::new();
    let mut outcome = Outcome::Success;
    for file in files {
        let request = ApplyOptions {
            dry_run: args.dry_run,
            force: args.force,
            expected_revision: args.expected_revision,
        };
        match apply_file(session, file, request).await {
            Ok(resp) => accepted(
                format,
                args.dry_run,
                file,
                resp,
                (&mut views, &mut applied),
                out,
            )?,
            Err(e) => {
                outcome = Outcome::Failed;
                writeln!(err, "error: {}: {e:#}", label(file))?;
                views.push(ApplyView::failed(
                    as_given(file),
                    args.dry_run,
                    format!("{e:#}"),
                ));
            }
        }
    }
    Ok((views, applied, outcome))
}

/// Every file in one ApplyBatch call: all applied, or none.
async fn apply_all(
    session: &mut Session,
    format: Format,
    args: &ApplyArgs,
    files: &[PathBuf],
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> anyhow::Result<Applied> {
    let mut requests = Vec::with_capacity(files.len());
    for file in files {
        let text = read_spec(file).with_context(|| label(file))?;
        // A dry run is asked for on the batch as a whole.
        requests.push(ApplyRequest {
            source: Some(Source::SpecToml(text)),
            dry_run: false,
            force: args.force,
            expected_revision: args.expected_revision,
        });
    }
    let labels: Vec<String> = files.iter().map(|f| label(f)).collect();
    let results = match session.apply_batch(requests, args.dry_run, &labels).await {
        Ok(results) => results,
        Err(e) => {
            let why = format!("{e:#}");
            writeln!(err, "error: nothing applied: {why}")?;
            let views = files
                .iter()
                .map(|f| ApplyView::failed(as_given(f), args.dry_run, why.clone()))
                .collect();
            return Ok((views, Vec::new(), Outcome::Failed));
        }
    };
    if results.len() != files.len() {
        bail!(
            "the agent answered {} results for {} spec files",
            results.len(),
            files.len()
        );
    }
    let mut views = Vec::with_capacity(files.len());
    let mut applied = Vec::new();
    for (file, resp) in files.iter().zip(results) {
        accepted(
            format,
            args.dry_run,
            file,
            resp,
            (&mut views, &mut applied),
            out,
        )?;
    }
    Ok((views, applied, Outcome::Success))
}

/// With --wait, each applied service in turn: its rollout followed, or its instances waited
/// for.
async fn wait_all(
    session: &mut Session,
    format: Format,
    args: &ApplyArgs,
    console: Console,
    (mut views, applied, mut outcome): Applied,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> anyhow::Result<(Vec<ApplyView>, Outcome)> {
    if !args.wait.wait || args.dry_run {
        return Ok((views, outcome));
    }
    out.flush()?;
    let mut waiter = Waiter::new(format, args.wait.timeout, console);
    for (entry, name, resp) in applied {
        let followed = if resp.rollout_id.is_empty() {
            // Instances replaced without a rollout are only done once all are of the new
            // revision.
            let revision = resp.replaces_instances.then_some(resp.revision);
            waiter.until_ready(session, &name, revision, out, err).await
        } else {
            waiter.follow(session, &resp.rollout_id, out, err).await
        };
        let Some(view) = views.get_mut(entry) else {
            continue;
        };
        match followed {
            Ok(followed) => {
                if followed.outcome == Outcome::Failed {
                    outcome = Outcome::Failed;
                }
                view.rollout = followed.view();
                view.error = followed.error;
                if followed.interrupted {
                    break;
                }
            }
            Err(e) => {
                outcome = Outcome::Failed;
                writeln!(err, "error: {name}: {e:#}")?;
                view.error = Some(format!("{e:#}"));
            }
        }
    }
    Ok((views, outcome))
}

pub async fn diff(
    conn: &ConnectArgs,
    format: Format,
    args: &DiffArgs,
    out: &mut dyn Write,
) -> anyhow::Result<Outcome> {
    let mut session = client::connect(conn).await?;
    let resp = apply_file(&mut session, &args.file, ApplyOptions::DRY_RUN)
        .await
        .with_context(|| label(&args.file))?;
    match format {
        Format::Table => {
            write_apply(out, &fallback_name(&args.file), &resp, true)?;
            // The current spec's policy, for how instances would be replaced; without it (an
            // agent that cannot answer now), the plain sentence.
            let current = if resp.replaces_instances {
                session.get(&resp.name).await.ok()
            } else {
                None
            };
            write_replacement(out, &resp, current.as_ref())?;
        }
        Format::Json => write_json(out, &ApplyView::applied(as_given(&args.file), true, &resp))?,
    }
    Ok(Outcome::Success)
}

/// How one spec file is applied.
#[derive(Debug, Clone, Copy)]
struct ApplyOptions {
    dry_run: bool,
    force: bool,
    expected_revision: Option<u64>,
}

impl ApplyOptions {
    const DRY_RUN: ApplyOptions = ApplyOptions {
        dry_run: true,
        force: false,
        expected_revision: None,
    };
}

async fn apply_file(
    session: &mut Session,
    file: &Path,
    o: ApplyOptions,
) -> anyhow::Result<ApplyResponse> {
    let text = read_spec(file)?;
    let request = ApplyRequest {
        source: Some(Source::SpecToml(text)),
        dry_run: o.dry_run,
        force: o.force,
        expected_revision: o.expected_revision,
    };
    session.apply(request).await
}

pub(super) fn read_spec(file: &Path) -> anyhow::Result<String> {
    let mut text = String::new();
    if file == Path::new("-") {
        std::io::stdin()
            .read_to_string(&mut text)
            .context("cannot read standard input")?;
    } else {
        text = fs::read_to_string(file).context("cannot read the file")?;
    }
    Ok(text)
}

/// A spec file as named in messages.
fn label(file: &Path) -> String {
    if file == Path::new("-") {
        "<stdin>".to_owned()
    } else {
        file.display().to_string()
    }
}

/// A spec file as given on the command line (`-` for standard input), for JSON output.
fn as_given(file: &Path) -> String {
    file.display().to_string()
}

/// What to call a service in output when the agent's answer leaves the name out.
fn fallback_name(file: &Path) -> String {
    file.file_stem().map_or_else(
        || file.display().to_string(),
        |s| s.to_string_lossy().into_owned(),
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_gives_its_toml_files_sorted() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "web.toml",
            "api.toml",
            "zeta.toml",
            "README.md",
            "notes.toml.bak",
            ".#web.toml",
        ] {
            fs::write(dir.path().join(name), "name = \"x\"\n").unwrap();
        }
        fs::create_dir(dir.path().join("nested.toml")).unwrap();
        fs::create_dir(dir.path().join("sub")).unwrap();
        fs::write(dir.path().join("sub/inner.toml"), "").unwrap();

        let files = spec_files(dir.path()).unwrap();
        let names: Vec<String> = files
            .iter()
            .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["api.toml", "web.toml", "zeta.toml"]);
        assert!(files.iter().all(|f| f.parent() == Some(dir.path())));
    }

    #[test]
    fn a_file_is_taken_as_it_is_whatever_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("web.spec");
        fs::write(&file, "").unwrap();
        assert_eq!(spec_files(&file).unwrap(), [file]);
        assert_eq!(spec_files(Path::new("-")).unwrap(), [PathBuf::from("-")]);
    }

    #[test]
    fn a_directory_without_specs_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("README.md"), "").unwrap();
        let err = spec_files(dir.path()).unwrap_err().to_string();
        assert!(err.contains("no *.toml spec files"), "{err}");
    }

    #[test]
    fn a_missing_path_is_named() {
        let err = format!(
            "{:#}",
            spec_files(Path::new("/nonexistent/specs")).unwrap_err()
        );
        assert!(err.starts_with("cannot read /nonexistent/specs: "), "{err}");
    }
}
