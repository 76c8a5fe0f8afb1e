//! A recording runtime for the supervisor's tests: spawns nothing, remembers every call, and
//! lets the test end an instance with any [`InitExit`].

use std::collections::HashMap;
use std::io;
use std::sync::Mutex;

use tokio::sync::oneshot;

use super::{
    InitExit, InstanceFiles, ProcessRef, ProcessStatus, Processes, SocketBroker, SpawnError,
    Spawned, StartRequest,
};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeSpawn {
    pub instance: String,
    pub index: u32,
    pub incarnation: u64,
    pub pid: i32,
    pub command: Vec<String>,
    /// The package tree it was given (`[artifact]`).
    pub artifact: Option<std::path::PathBuf>,
    /// The image rootfs it was given (`[image]`).
    pub image: Option<std::path::PathBuf>,
}

#[derive(Debug, Default)]
struct State {
    next_pid: i32,
    spawns: Vec<FakeSpawn>,
    signals: Vec<(i32, i32)>,
    exits: HashMap<i32, oneshot::Sender<InitExit>>,
    fail_spawns: u32,
    refuse_command: Option<String>,
    /// Processes of an "earlier agent run": pid -> start time.
    alive: HashMap<i32, u64>,
    adopted: Vec<i32>,
    exit_records: HashMap<String, super::ExitRecord>,
    notify: HashMap<String, super::NotifyState>,
    /// Services whose held resources were released, in order.
    released: Vec<String>,
    log_stats: HashMap<String, super::LogStat>,
    /// Ports another process holds (`check_port` answers EADDRINUSE).
    busy_ports: Vec<u16>,
}

#[derive(Debug, Default)]
pub struct FakeRuntime {
    state: Mutex<State>,
}

impl FakeRuntime {
    pub fn new() -> FakeRuntime {
        FakeRuntime::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Make `port` look held by another process.
    pub fn hold_port(&self, port: u16) {
        self.lock().busy_ports.push(port);
    }

    /// Every spawn so far, in order.
    pub fn spawns(&self) -> Vec<FakeSpawn> {
        self.lock().spawns.clone()
    }

    /// Every (pid, signal) sent so far, in order.
    pub fn signals(&self) -> Vec<(i32, i32)> {
        self.lock().signals.clone()
    }

    /// PIDs of the instances still running.
    pub fn running(&self) -> Vec<i32> {
        let mut v: Vec<i32> = self.lock().exits.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// End the instance with init PID `pid`. False when no such instance runs.
    pub fn exit(&self, pid: i32, exit: InitExit) -> bool {
        let mut st = self.lock();
        st.alive.remove(&pid);
        match st.exits.remove(&pid) {
            Some(tx) => tx.send(exit).is_ok(),
            None => false,
        }
    }

    /// End the instance as a plain exit with `code`.
    pub fn exit_code(&self, pid: i32, code: i32) -> bool {
        self.exit(
            pid,
            InitExit {
                status: ProcessStatus::Exited(code),
                record: Some(super::ExitRecord {
                    code: Some(code),
                    ..Default::default()
                }),
                spawn_error: None,
            },
        )
    }

    /// Make `preflight` refuse specs whose command is `command`.
    /// Every service released so far (deleted), in order.
    pub fn released(&self) -> Vec<String> {
        self.lock().released.clone()
    }

    pub fn refuse_command(&self, command: &str) {
        self.lock().refuse_command = Some(command.to_string());
    }

    /// Pretend a process with this PID and start time is running (left by an earlier run).
    pub fn set_alive(&self, pid: i32, start_time: u64) {
        self.lock().alive.insert(pid, start_time);
    }

    /// Pretend the init of `instance` left this exit record.
    pub fn set_exit_record(&self, instance: &str, record: super::ExitRecord) {
        self.lock()
            .exit_records
            .insert(instance.to_string(), record);
    }

    /// What an instance's init reports of its logs (as its `logstat.json` would).
    pub fn set_log_stat(&self, instance: &str, stat: super::LogStat) {
        self.lock().log_stats.insert(instance.to_string(), stat);
    }

    /// Pretend `instance` reported this over its NOTIFY_SOCKET.
    pub fn set_notify(&self, instance: &str, state: super::NotifyState) {
        self.lock().notify.insert(instance.to_string(), state);
    }

    /// PIDs adopted so far.
    pub fn adopted(&self) -> Vec<i32> {
        self.lock().adopted.clone()
    }

    /// Make the next `n` spawns fail.
    pub fn fail_next_spawns(&self, n: u32) {
        self.lock().fail_spawns = n;
    }
}

impl Processes for FakeRuntime {
    fn spawn(&self, req: StartRequest<'_>) -> Result<Spawned, SpawnError> {
        let mut st = self.lock();
        if st.fail_spawns > 0 {
            st.fail_spawns -= 1;
            return Err(SpawnError::Invalid {
                instance: req.instance.to_string(),
                reason: "injected spawn failure".into(),
            });
        }
        st.next_pid += 1;
        let pid = 1000 + st.next_pid;
        st.spawns.push(FakeSpawn {
            instance: req.instance.to_string(),
            index: req.index,
            incarnation: req.incarnation,
            pid,
            command: req.spec.command.clone(),
            artifact: req.artifact.map(std::path::Path::to_path_buf),
            image: req.image.map(|i| i.rootfs.clone()),
        });
        let (tx, rx) = oneshot::channel();
        st.exits.insert(pid, tx);
        st.alive.insert(pid, 1_000 + u64::from(pid.cast_unsigned()));
        Ok(Spawned {
            process: ProcessRef { pid, pidfd: None },
            start_time: 1_000 + u64::from(pid.cast_unsigned()),
            exit: Box::pin(async move {
                rx.await.unwrap_or(InitExit {
                    status: ProcessStatus::Signaled(9),
                    record: None,
                    spawn_error: None,
                })
            }),
        })
    }

    fn signal(&self, process: &ProcessRef, signal: i32) -> io::Result<()> {
        self.lock().signals.push((process.pid, signal));
        Ok(())
    }

    fn main_pid(&self, init_pid: i32) -> Option<i32> {
        Some(init_pid + 100_000)
    }

    fn roots(&self, pids: &[i32]) -> Vec<i32> {
        pids.to_vec()
    }

    fn release_service(&self, service: &str) {
        self.lock().released.push(service.to_string());
    }

    fn preflight(
        &self,
        spec: &crate::spec::ServiceSpec,
    ) -> Result<(), Vec<crate::spec::FieldError>> {
        match self.lock().refuse_command.as_deref() {
            Some(bad) if spec.command.first().map(String::as_str) == Some(bad) => {
                Err(vec![crate::spec::FieldError::new(
                    "command[0]",
                    format!("{bad:?} does not exist on this host"),
                )])
            }
            _ => Ok(()),
        }
    }

    fn adopt(&self, instance: &str, pid: i32, start_time: u64) -> Result<Spawned, SpawnError> {
        let mut st = self.lock();
        match st.alive.get(&pid) {
            Some(t) if *t == start_time => {}
            _ => {
                return Err(SpawnError::Invalid {
                    instance: instance.to_string(),
                    reason: format!("pid {pid} is not the recorded process"),
                });
            }
        }
        st.adopted.push(pid);
        let (tx, rx) = oneshot::channel();
        st.exits.insert(pid, tx);
        Ok(Spawned {
            process: ProcessRef { pid, pidfd: None },
            start_time,
            exit: Box::pin(async move {
                rx.await.unwrap_or(InitExit {
                    status: ProcessStatus::Unknown,
                    record: None,
                    spawn_error: None,
                })
            }),
        })
    }

    fn boot_id(&self) -> String {
        "fake-boot".into()
    }

    fn exec_runner(
        &self,
        _req: super::ExecRequest<'_>,
    ) -> std::sync::Arc<dyn crate::health::ExecRunner> {
        std::sync::Arc::new(FakeExec)
    }
}

impl InstanceFiles for FakeRuntime {
    fn exit_record(&self, instance: &str) -> Option<super::ExitRecord> {
        self.lock().exit_records.get(instance).cloned()
    }

    fn notify_state(&self, instance: &str) -> Option<super::NotifyState> {
        self.lock().notify.get(instance).cloned()
    }

    fn log_stat(&self, instance: &str) -> super::LogStat {
        self.lock()
            .log_stats
            .get(instance)
            .copied()
            .unwrap_or_default()
    }

    fn output_tail(&self, _instance: &str) -> Option<String> {
        None
    }

    fn remove_instance_files(&self, _instance: &str) {}
}

impl SocketBroker for FakeRuntime {
    fn free_port(&self) -> io::Result<u16> {
        let mut st = self.lock();
        st.next_pid += 1;
        u16::try_from(20_000 + st.next_pid)
            .map_err(|_| io::Error::other("the fake runtime ran out of ports"))
    }

    fn check_port(&self, port: u16) -> io::Result<()> {
        if self.lock().busy_ports.contains(&port) {
            Err(io::Error::from_raw_os_error(libc::EADDRINUSE))
        } else {
            Ok(())
        }
    }

    fn bind_socket(&self, _listen: &crate::spec::ListenAddr) -> io::Result<std::os::fd::OwnedFd> {
        // Any real fd stands in for a socket.
        Ok(std::fs::File::open("/dev/null")?.into())
    }

    fn unlink_socket(&self, _listen: &crate::spec::ListenAddr) {}

    fn take_socket(
        &self,
        _process: &ProcessRef,
        _fd: std::os::fd::RawFd,
        _listen: &crate::spec::ListenAddr,
    ) -> io::Result<std::os::fd::OwnedFd> {
        Err(io::Error::other("the fake has no instance fds"))
    }
}

/// An exec probe runner for tests: every command exits 0.
#[derive(Debug)]
pub struct FakeExec;

impl crate::health::ExecRunner for FakeExec {
    fn run<'a>(
        &'a self,
        _argv: &'a [String],
        _timeout: std::time::Duration,
    ) -> std::pin::Pin<Box<dyn Future<Output = io::Result<crate::health::ExecResult>> + Send + 'a>>
    {
        Box::pin(async {
            Ok(crate::health::ExecResult {
                code: Some(0),
                signal: None,
                output_tail: String::new(),
            })
        })
    }
}
