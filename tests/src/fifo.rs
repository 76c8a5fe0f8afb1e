//! A FIFO the benchmark's instances write one byte to once their process runs (inside its
//! cgroup and namespaces, under its init): reading the bytes times a start with no polling.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;

#[derive(Debug)]
pub struct Fifo {
    pub path: PathBuf,
    rx: pipe::Receiver,
    // Held so the reader never sees end-of-file between writers.
    _tx: pipe::Sender,
}

impl Fifo {
    /// A new FIFO `name` in `dir`, writable by anyone (a userns instance's root is an
    /// unprivileged host id).
    pub fn new(dir: &Path, name: &str) -> Fifo {
        let path = dir.join(name);
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o666))
            .unwrap_or_else(|e| panic!("mkfifo {}: {e}", path.display()));
        // Whatever the umask.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).expect("chmod");
        let rx = pipe::OpenOptions::new()
            .open_receiver(&path)
            .expect("open fifo reader");
        let tx = pipe::OpenOptions::new()
            .open_sender(&path)
            .expect("open fifo writer");
        Fifo { path, rx, _tx: tx }
    }

    /// Waits (up to 30 s) for the next `n` bytes.
    pub async fn wait_bytes(&mut self, n: usize) {
        let mut buf = vec![0u8; n];
        tokio::time::timeout(Duration::from_secs(30), self.rx.read_exact(&mut buf))
            .await
            .expect("instances signalled in time")
            .expect("read fifo");
    }

    /// The arrival time of each of the next `n` bytes, each within `timeout`.
    pub async fn arrivals(&mut self, n: usize, timeout: Duration) -> Vec<Instant> {
        let mut at = Vec::with_capacity(n);
        let mut b = [0u8; 1];
        for _ in 0..n {
            tokio::time::timeout(timeout, self.rx.read_exact(&mut b))
                .await
                .expect("instances signalled in time")
                .expect("read fifo");
            at.push(Instant::now());
        }
        at
    }
}
