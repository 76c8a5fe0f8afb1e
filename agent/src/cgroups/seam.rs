//! The only door to cgroups-rs. Every library call runs under `catch_unwind`, so a panic inside
//! it (it has known ones on odd kernel state) becomes `CgroupError::Panicked` instead of taking
//! a supervisor thread down, and its errors become `CgroupError`s naming the cgroup, the file
//! and the value. [`set_verified`] adds what the library lacks for limits: the control file
//! must exist first (its setters would create a plain file), and the value is read back.

use std::any::Any;
use std::error::Error as _;
use std::io;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

use cgroups_rs::fs::error::Error as LibError;

use super::CgroupError;
use super::fsutil::{clone_io, memory_matches, parse_u64, read_err, read_trimmed};

/// What a library call does to `file`, for its error.
#[derive(Debug, Clone, Copy)]
pub(super) enum Op<'a> {
    Write(&'a str),
}

/// Runs one cgroups-rs call for the cgroup `path`, which reads or writes `file`.
pub(super) fn call<T>(
    path: &str,
    file: &Path,
    op: Op<'_>,
    f: impl FnOnce() -> Result<T, LibError>,
) -> Result<T, CgroupError> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(lib_error(path, file, op, &e)),
        Err(payload) => Err(CgroupError::Panicked {
            path: path.to_string(),
            message: format!(
                "writing {}: {}",
                file.display(),
                panic_message(payload.as_ref())
            ),
        }),
    }
}

fn lib_error(path: &str, file: &Path, op: Op<'_>, e: &LibError) -> CgroupError {
    let io = e.source().and_then(|s| s.downcast_ref::<io::Error>());
    match (op, io) {
        (Op::Write(value), Some(io)) => CgroupError::Write {
            path: path.to_string(),
            file: file.to_path_buf(),
            value: value.to_string(),
            source: clone_io(io),
        },
        (Op::Write(value), None) => CgroupError::Library {
            path: path.to_string(),
            message: format!("writing {value:?} to {}: {e}", file.display()),
        },
    }
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_string()
    }
}

/// How a limit file must read after the write.
#[derive(Debug, Clone, Copy)]
pub(super) enum Expect {
    /// Exactly the written text.
    Same,
    /// A memory limit of this many bytes: the kernel keeps whole pages, so it may read lower
    /// by less than one page.
    Bytes(u64),
}

/// Writes `value` to the control file `file` of the cgroup `path` with the cgroups-rs `setter`,
/// then reads the file back. A missing file means the kernel does not offer the control in
/// this cgroup: `Unsupported` (checked first, as the library would create a plain file).
pub(super) fn set_verified(
    path: &str,
    file: &Path,
    value: &str,
    expect: Expect,
    page_size: u64,
    setter: impl FnOnce() -> Result<(), LibError>,
) -> Result<(), CgroupError> {
    if !file.exists() {
        return Err(CgroupError::Unsupported {
            path: path.to_string(),
            reason: format!("{} does not exist", file.display()),
        });
    }
    call(path, file, Op::Write(value), setter)?;
    let found = read_trimmed(file).map_err(|e| read_err(path, file, e))?;
    let applied = match expect {
        Expect::Same => found == value,
        Expect::Bytes(wanted) => {
            parse_u64(&found).is_ok_and(|got| memory_matches(wanted, got, page_size))
        }
    };
    if applied {
        Ok(())
    } else {
        Err(CgroupError::NotApplied {
            path: path.to_string(),
            file: file.to_path_buf(),
            wanted: value.to_string(),
            found,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cgroups_rs::fs::MaxValue;
    use cgroups_rs::fs::cpu::CpuController;
    use cgroups_rs::fs::pid::PidController;

    #[test]
    fn panic_becomes_an_error() {
        let err = call::<()>(
            "corral/a/a-0",
            Path::new("/x/pids.max"),
            Op::Write("32"),
            || panic!("index out of bounds"),
        )
        .expect_err("panicked");
        assert!(
            matches!(&err, CgroupError::Panicked { message, .. } if message.contains("index out of bounds")),
            "{err}"
        );
        assert!(err.to_string().contains("/x/pids.max"), "{err}");
    }

    #[test]
    fn io_errors_keep_file_value_and_errno() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let gone = tmp.path().join("gone");
        let c = PidController::new(gone.clone(), tmp.path().to_path_buf(), false);
        let file = gone.join("pids.max");
        let err = call("corral/a/a-0", &file, Op::Write("32"), || {
            c.set_pid_max(MaxValue::Value(32))
        })
        .expect_err("no such directory");
        match err {
            CgroupError::Write {
                file: f,
                value,
                source,
                ..
            } => {
                assert_eq!(f, file);
                assert_eq!(value, "32");
                assert_eq!(source.raw_os_error(), Some(libc::ENOENT));
            }
            other => panic!("unexpected {other}"),
        }
    }

    #[test]
    fn library_errors_without_io_cause() {
        let tmp = tempfile::tempdir().expect("tempdir");
        std::fs::write(tmp.path().join("cpu.max"), "garbage").expect("plant");
        let c = CpuController::new(tmp.path().to_path_buf(), tmp.path().to_path_buf(), true);
        let file = tmp.path().join("cpu.max");
        let err = call("corral/a/a-0", &file, Op::Write("25000 100000"), || {
            c.set_cfs_quota_and_period(Some(25_000), Some(100_000))
        })
        .expect_err("cpu.max unparsable");
        assert!(matches!(err, CgroupError::Library { .. }), "{err}");
        assert!(err.to_string().contains("cpu.max"), "{err}");
    }

    #[test]
    fn set_verified_checks_existence_and_read_back() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_path_buf();
        let c = PidController::new(dir.clone(), dir.clone(), false);
        let file = dir.join("pids.max");

        let err = set_verified("p", &file, "32", Expect::Same, 4096, || {
            c.set_pid_max(MaxValue::Value(32))
        })
        .expect_err("missing file");
        assert!(matches!(err, CgroupError::Unsupported { .. }), "{err}");
        assert!(
            !file.exists(),
            "the missing control file must not be created"
        );

        std::fs::write(&file, "max\n").expect("plant");
        set_verified("p", &file, "32", Expect::Same, 4096, || {
            c.set_pid_max(MaxValue::Value(32))
        })
        .expect("applied");
        assert_eq!(std::fs::read_to_string(&file).expect("read"), "32");

        // A setter that writes something else is caught by the read-back.
        let err = set_verified("p", &file, "64", Expect::Same, 4096, || {
            c.set_pid_max(MaxValue::Value(65))
        })
        .expect_err("differs");
        assert!(
            matches!(&err, CgroupError::NotApplied { wanted, found, .. } if wanted == "64" && found == "65"),
            "{err}"
        );
    }
}
