//! Workloads for the end-to-end tests: small, dependency-free behaviours a service can have
//! (report its own view of the world, hog CPU or memory, fork without end, ignore SIGTERM,
//! exit with a code), so the tests need nothing from the host but this binary.
//!
//! Usage: corral-testbin MODE [ARGS]; see `main` for the modes.

use std::io::Write;
use std::time::Duration;

extern "C" fn exit_zero(_: libc::c_int) {
    // SAFETY: _exit is async-signal-safe.
    unsafe { libc::_exit(0) }
}

fn on_term_exit_zero() {
    // SAFETY: installing a handler that only calls _exit.
    unsafe {
        libc::signal(libc::SIGTERM, exit_zero as *const () as libc::sighandler_t);
    }
}

fn ignore_term() {
    // SAFETY: SIG_IGN is always a valid disposition.
    unsafe {
        libc::signal(libc::SIGTERM, libc::SIG_IGN);
    }
}

static USR1: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
static USR2: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_usr1(_: libc::c_int) {
    USR1.store(true, std::sync::atomic::Ordering::SeqCst);
}

extern "C" fn on_usr2(_: libc::c_int) {
    USR2.store(true, std::sync::atomic::Ordering::SeqCst);
}

fn sleep_forever() -> ! {
    loop {
        // SAFETY: pause has no preconditions.
        unsafe { libc::pause() };
    }
}

fn line(k: &str, v: impl std::fmt::Display) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{k}={v}");
    let _ = out.flush();
}

fn status_field(name: &str) -> String {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{name}:"))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default()
}

/// Print `key=value` lines describing what the process sees, then a `ready=1` line.
fn report() {
    line("pid", std::process::id());
    // SAFETY: getuid/getgid cannot fail.
    line("uid", unsafe { libc::getuid() });
    // SAFETY: as above.
    line("gid", unsafe { libc::getgid() });
    line("groups", status_field("Groups"));
    line("no_new_privs", status_field("NoNewPrivs"));
    line(
        "hostname",
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .unwrap_or_default()
            .trim(),
    );
    line(
        "cwd",
        std::env::current_dir()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
    );
    let procs = std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .bytes()
                        .all(|b| b.is_ascii_digit())
                })
                .count()
        })
        .unwrap_or(0);
    line("visible_pids", procs);
    let tmp = std::fs::read_dir("/tmp")
        .map(|d| d.count())
        .unwrap_or(usize::MAX);
    line("tmp_entries", tmp);
    let tmp_fs = std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("/tmp"))
        .and_then(|l| l.split_whitespace().nth(2).map(str::to_string))
        .unwrap_or_default();
    line("tmp_fs", tmp_fs);
    let fds = std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0);
    // read_dir itself holds one fd while listing.
    line("open_fds", fds.saturating_sub(1));
    let ifaces: Vec<String> = std::fs::read_dir("/sys/class/net")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    let mut ifaces = ifaces;
    ifaces.sort();
    line("net_ifaces", ifaces.join(","));
    for (k, v) in std::env::vars() {
        if k.starts_with("CORRAL_")
            || k.starts_with("PORT_")
            || k == "PATH"
            || k == "HOME"
            || k == "GREETING"
        {
            line(&format!("env.{k}"), v);
        }
    }
    // Loopback works only when lo is up in the instance's network namespace.
    let loopback = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| std::net::TcpStream::connect(l.local_addr()?))
        .is_ok();
    line("loopback_ok", u8::from(loopback));
    line("ready", 1);
}

/// What limits the process: its capability sets (as `/proc/self/status` shows them, 16 hex
/// digits), supplementary groups, uid, `no_new_privs` and open-file limit, in print order.
fn privileges() -> Vec<(&'static str, String)> {
    let mut soft_hard = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut soft_hard) };
    vec![
        ("cap_inh", status_field("CapInh")),
        ("cap_prm", status_field("CapPrm")),
        ("cap_eff", status_field("CapEff")),
        ("cap_bnd", status_field("CapBnd")),
        ("cap_amb", status_field("CapAmb")),
        ("groups", status_field("Groups")),
        // SAFETY: getuid cannot fail.
        ("uid", unsafe { libc::getuid() }.to_string()),
        ("no_new_privs", status_field("NoNewPrivs")),
        ("nofile_soft", soft_hard.rlim_cur.to_string()),
        ("nofile_hard", soft_hard.rlim_max.to_string()),
        (
            "oom_score_adj",
            std::fs::read_to_string("/proc/self/oom_score_adj")
                .unwrap_or_default()
                .trim()
                .to_string(),
        ),
        ("seccomp", status_field("Seccomp")),
    ]
}

/// `EROFS`, `EACCES`, ... for the errors the tests look for; the number otherwise.
fn errno_name(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EROFS) => "EROFS".into(),
        Some(libc::EACCES) => "EACCES".into(),
        Some(libc::EPERM) => "EPERM".into(),
        Some(libc::ENOENT) => "ENOENT".into(),
        Some(libc::EINVAL) => "EINVAL".into(),
        Some(libc::EADDRINUSE) => "EADDRINUSE".into(),
        Some(n) => format!("errno {n}"),
        None => e.to_string(),
    }
}

/// Try to write at `target`: a new file in it when it is a directory (removed again unless
/// `keep`; kept as `written-by-corral-testbin`), else the existing file itself ("0\n").
/// Returns `ok` or the errno name.
fn try_write(target: &str, keep: bool) -> String {
    let path = std::path::Path::new(target);
    let result = if path.is_dir() {
        let file = if keep {
            path.join("written-by-corral-testbin")
        } else {
            path.join(format!(".corral-testbin-{}", std::process::id()))
        };
        std::fs::write(&file, b"written from inside the instance\n").map(|()| {
            if !keep {
                let _ = std::fs::remove_file(&file);
            }
        })
    } else {
        std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .and_then(|mut f| f.write_all(b"0\n"))
    };
    match result {
        Ok(()) => "ok".into(),
        Err(e) => errno_name(&e),
    }
}

fn hog_memory(mib: usize) {
    let mut chunks: Vec<Vec<u8>> = Vec::new();
    for i in 0..mib {
        let mut v = vec![0u8; 1 << 20];
        for b in v.iter_mut().step_by(4096) {
            *b = u8::try_from(i % 251).unwrap_or(0) + 1;
        }
        chunks.push(v);
    }
    line("allocated_mib", chunks.len());
    // Held for the life of the process.
    std::mem::forget(chunks);
}

fn hog_cpu() -> ! {
    let mut x: u64 = 1;
    loop {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        std::hint::black_box(x);
    }
}

/// Fork children that sleep until `n` exist or fork fails; report the count.
fn fork_bomb(n: usize) {
    let mut ok = 0usize;
    let mut failed = 0usize;
    for _ in 0..n {
        // SAFETY: the child only calls async-signal-safe pause/_exit.
        match unsafe { libc::fork() } {
            0 => loop {
                // SAFETY: pause has no preconditions.
                unsafe { libc::pause() };
            },
            -1 => failed += 1,
            _ => ok += 1,
        }
    }
    line("forked", ok);
    line("fork_failed", failed);
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| args.get(i).cloned().unwrap_or_default();
    let num = |i: usize, default: u64| arg(i).parse::<u64>().unwrap_or(default);
    match arg(0).as_str() {
        // Print the report, then run until SIGTERM (exit 0).
        "report" => {
            on_term_exit_zero();
            report();
            sleep_forever();
        }
        // Run until SIGTERM (exit 0).
        "serve" => {
            on_term_exit_zero();
            line("ready", 1);
            sleep_forever();
        }
        // Run until SIGTERM (exit 0); on SIGUSR1 exit with code 3; on SIGUSR2 allocate
        // 1 GiB (to be OOM-killed inside a memory limit). For tests of ends that happen
        // while no agent runs.
        "serve-signals" => {
            on_term_exit_zero();
            // USR1 and USR2 stay blocked except inside sigsuspend, so one sent before the
            // wait (even before "ready") is taken there rather than lost before a pause.
            // SAFETY: the handlers only store to atomics; the sets are initialised by
            // sigemptyset before use.
            unsafe {
                libc::signal(libc::SIGUSR1, on_usr1 as *const () as libc::sighandler_t);
                libc::signal(libc::SIGUSR2, on_usr2 as *const () as libc::sighandler_t);
                let mut usr: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut usr);
                libc::sigaddset(&mut usr, libc::SIGUSR1);
                libc::sigaddset(&mut usr, libc::SIGUSR2);
                libc::sigprocmask(libc::SIG_BLOCK, &usr, std::ptr::null_mut());
            }
            line("ready", 1);
            loop {
                if USR1.load(std::sync::atomic::Ordering::SeqCst) {
                    std::process::exit(3);
                }
                if USR2.swap(false, std::sync::atomic::Ordering::SeqCst) {
                    hog_memory(1024);
                }
                // SAFETY: an empty set, initialised by sigemptyset.
                unsafe {
                    let mut none: libc::sigset_t = std::mem::zeroed();
                    libc::sigemptyset(&mut none);
                    libc::sigsuspend(&none);
                }
            }
        }
        // Ignore SIGTERM: only SIGKILL ends it.
        "ignore-term" => {
            ignore_term();
            line("ready", 1);
            sleep_forever();
        }
        // Exit with CODE after MS milliseconds.
        "exit" => {
            std::thread::sleep(Duration::from_millis(num(2, 0)));
            line("exiting", arg(1));
            std::process::exit(i32::try_from(num(1, 0)).unwrap_or(1));
        }
        // Allocate and touch MIB MiB, then run until SIGTERM.
        "hog-mem" => {
            on_term_exit_zero();
            hog_memory(usize::try_from(num(1, 256)).unwrap_or(usize::MAX));
            sleep_forever();
        }
        "hog-cpu" => {
            on_term_exit_zero();
            line("ready", 1);
            hog_cpu();
        }
        // Fork up to N sleeping children, report, then run until SIGTERM.
        "fork-bomb" => {
            on_term_exit_zero();
            fork_bomb(usize::try_from(num(1, 10_000)).unwrap_or(usize::MAX));
            sleep_forever();
        }
        // Leave N orphans behind: each child forks a grandchild that outlives it by MS
        // milliseconds, so the grandchildren are re-parented to the instance's init, which
        // must reap them. Then run until SIGTERM.
        "orphans" => {
            on_term_exit_zero();
            let n = num(1, 5);
            let ms = u32::try_from(num(2, 100)).unwrap_or(u32::MAX);
            for _ in 0..n {
                // SAFETY: the children only call async-signal-safe fork/usleep/_exit.
                match unsafe { libc::fork() } {
                    // SAFETY: in the child: fork, usleep and _exit only.
                    0 => unsafe {
                        if libc::fork() == 0 {
                            libc::usleep(ms * 1000);
                        }
                        libc::_exit(0)
                    },
                    pid if pid > 0 => {
                        let mut st = 0;
                        // SAFETY: waiting for our own child.
                        unsafe { libc::waitpid(pid, &mut st, 0) };
                    }
                    _ => {}
                }
            }
            line("orphaned", n);
            sleep_forever();
        }
        // Write COUNT numbered 100-byte lines to stdout as fast as possible, then
        // `flood_done=COUNT` and run until SIGTERM.
        "flood" => {
            on_term_exit_zero();
            let count = num(1, 100_000);
            let mut out = std::io::BufWriter::with_capacity(1 << 16, std::io::stdout().lock());
            let pad = "x".repeat(100 - "seq=00000000 ".len() - 1);
            for i in 0..count {
                let _ = writeln!(out, "seq={i:08} {pad}");
            }
            let _ = out.flush();
            drop(out);
            line("flood_done", count);
            // Also where a test can see it when the logs cannot be written (a full disk).
            let _ = std::fs::write("/tmp/flood_done", count.to_string());
            // Then a trickle, so that a log that could not be written to can recover.
            for tick in 0.. {
                std::thread::sleep(Duration::from_millis(100));
                line("tick", tick);
            }
        }
        // Serve health endpoints on the ports the agent gave (PORT_HTTP, PORT_TCP, PORT_GRPC)
        // and keep /tmp/healthy while healthy (for exec probes). SIGUSR1 makes it unhealthy
        // (HTTP 503, TCP listener closed, gRPC NOT_SERVING, /tmp/healthy removed), SIGUSR2
        // healthy again. `health-server unhealthy` starts unhealthy. HTTP /hang never answers.
        "health-server" => health_server(arg(1) != "unhealthy"),
        // Send READY=1 (and a STATUS=) on $NOTIFY_SOCKET after MS milliseconds, then run
        // until SIGTERM.
        "notify-after" => {
            on_term_exit_zero();
            std::thread::sleep(Duration::from_millis(num(1, 1000)));
            notify(&format!(
                "STATUS=warmed up after {} ms\nREADY=1",
                num(1, 1000)
            ));
            line("notified", 1);
            sleep_forever();
        }
        // Serve HTTP on the listening socket inherited as fd 3 (LISTEN_FDS), after DELAY_MS:
        // each response says which instance and $VERSION answered. $PORT_ADMIN, when set,
        // serves /healthz for probes (answering $ADMIN_STATUS, default 200). SIGTERM: stop accepting, finish what was accepted,
        // exit 0 (a graceful stop).
        // $ACCEPT_LOG (a directory): append `accept`, `term` and at the end `drained N` (N
        // connections still open) to `$ACCEPT_LOG/$CORRAL_INSTANCE.START_NS`, as they happen.
        "http-listen" => http_listen(num(1, 0)),
        // Print `tick=N` (N = 0, 1, 2, ... within this run, tagged with $CORRAL_INSTANCE's
        // pid) every MS milliseconds, to stdout, and every tenth also to stderr.
        "ticker" => {
            on_term_exit_zero();
            let pid = std::process::id();
            for n in 0.. {
                line("tick", format!("{pid}.{n}"));
                if n % 10 == 0 {
                    eprintln!("errtick={pid}.{n}");
                }
                std::thread::sleep(Duration::from_millis(num(1, 10)));
            }
        }
        // Write one byte to the FIFO/file at PATH, then run until SIGTERM (benchmarks).
        // Write one byte to the FIFO ARG1 and exit 0: a job's run that has executed.
        "signal-fifo-exit" => {
            if let Ok(mut f) = std::fs::OpenOptions::new().write(true).open(arg(1)) {
                let _ = f.write_all(b"x");
            }
            // Long enough for an observer of exec events to read this process's command line.
            std::thread::sleep(Duration::from_millis(20));
        }
        "signal-fifo" => {
            on_term_exit_zero();
            if let Ok(mut f) = std::fs::OpenOptions::new().write(true).open(arg(1)) {
                let _ = f.write_all(b"x");
            }
            sleep_forever();
        }
        // Print what limits the process (`cap_eff=0000000000000400`, `nofile_soft=...`, see
        // `privileges`) and, with PORT, `bind=ok` or why binding 0.0.0.0:PORT failed; then
        // `ready=1` and run until SIGTERM.
        "privileges" => {
            on_term_exit_zero();
            for (k, v) in privileges() {
                line(k, v);
            }
            if !arg(1).is_empty() {
                let bound =
                    std::net::TcpListener::bind(("0.0.0.0", u16::try_from(num(1, 0)).unwrap_or(0)));
                line(
                    "bind",
                    bound.map_or_else(|e| errno_name(&e), |_| "ok".into()),
                );
            }
            line("ready", 1);
            sleep_forever();
        }
        // Exit 0 when `privileges` would print KEY=VALUE, else 1 (for exec probes).
        "check" => {
            let found = privileges()
                .into_iter()
                .find(|(k, _)| *k == arg(1))
                .map(|(_, v)| v);
            if found.as_deref() == Some(arg(2).as_str()) {
                std::process::exit(0);
            }
            println!("{}={found:?}, expected {:?}", arg(1), arg(2));
            std::process::exit(1);
        }
        // For each PATH, try writing there (see `try_write`; `keep:PATH` keeps the file) and
        // print `write:PATH=ok` or `write:PATH=EROFS` (the errno); then `ready=1` and run
        // until SIGTERM.
        "writes" => {
            on_term_exit_zero();
            for target in &args[1..] {
                let (path, keep) = match target.strip_prefix("keep:") {
                    Some(path) => (path, true),
                    None => (target.as_str(), false),
                };
                line(&format!("write:{path}"), try_write(path, keep));
            }
            line("ready", 1);
            sleep_forever();
        }
        // Try to connect to the Unix socket PATH; print `connect=ok` or the errno, then
        // `ready=1`, and run until SIGTERM.
        "connect-unix" => {
            on_term_exit_zero();
            let r = std::os::unix::net::UnixStream::connect(arg(1));
            line(
                "connect",
                r.map_or_else(|e| errno_name(&e), |_| "ok".into()),
            );
            line("ready", 1);
            sleep_forever();
        }
        // Try each way out of the instance (see `escape`) and print `escape.NAME=refused:ERRNO`
        // or `escape.NAME=ESCAPED:...`, then `ready=1`, and run until SIGTERM. Arguments:
        // the agent's API socket, a block device node to write, a token for the process that
        // tries to outlive the instance.
        // On SIGUSR1 it tries the API socket again (`escape.api_socket_again=...`).
        "escape" => {
            on_term_exit_zero();
            // SAFETY: the handler only stores to an atomic.
            unsafe { libc::signal(libc::SIGUSR1, on_usr1 as *const () as libc::sighandler_t) };
            for (name, outcome) in escape(&arg(1), &arg(2), &arg(3)) {
                line(&format!("escape.{name}"), outcome);
            }
            line("ready", 1);
            loop {
                // SAFETY: pause has no preconditions.
                unsafe { libc::pause() };
                if USR1.swap(false, std::sync::atomic::Ordering::SeqCst) {
                    let again = std::os::unix::net::UnixStream::connect(arg(1))
                        .map(|_| "connected".to_string());
                    line("escape.api_socket_again", outcome(again));
                }
            }
        }
        // What root may do to the host from inside: `userns SHARED SECRET FOREIGN`; reports
        // each attempt (see `userns_probe`), then runs until SIGTERM.
        "userns" => {
            on_term_exit_zero();
            for (name, value) in userns_probe(&arg(1), &arg(2), &arg(3)) {
                line(&format!("userns.{name}"), value);
            }
            line("ready", 1);
            sleep_forever();
        }
        // Print N numbered lines to stdout and M to stderr, then run until SIGTERM.
        "print" => {
            on_term_exit_zero();
            for i in 0..num(1, 10) {
                line("out", i);
            }
            for i in 0..num(2, 0) {
                eprintln!("err={i}");
            }
            sleep_forever();
        }
        other => {
            eprintln!("corral-testbin: unknown mode {other:?}");
            std::process::exit(2);
        }
    }
}

/// sd_notify: one datagram to $NOTIFY_SOCKET (a path, or `@name` for an abstract socket).
fn notify(msg: &str) {
    use std::os::linux::net::SocketAddrExt;
    let Ok(target) = std::env::var("NOTIFY_SOCKET") else {
        line("notify_error", "no NOTIFY_SOCKET");
        return;
    };
    let addr = match target.strip_prefix('@') {
        Some(name) => std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()),
        None => std::os::unix::net::SocketAddr::from_pathname(&target),
    };
    let sent = addr.and_then(|a| {
        let s = std::os::unix::net::UnixDatagram::unbound()?;
        s.send_to_addr(msg.as_bytes(), &a)
    });
    if let Err(e) = sent {
        line("notify_error", e);
    }
}

fn health_server(start_healthy: bool) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("runtime: {e}");
            std::process::exit(1);
        }
    };
    let port = |name: &str| std::env::var(name).ok().and_then(|p| p.parse::<u16>().ok());
    rt.block_on(async move {
        let healthy = Arc::new(AtomicBool::new(start_healthy));
        let set_file = |ok: bool| {
            if ok {
                let _ = std::fs::write("/tmp/healthy", "1");
            } else {
                let _ = std::fs::remove_file("/tmp/healthy");
            }
        };
        set_file(start_healthy);
        let (reporter, health_svc) = tonic_health::server::health_reporter();
        let grpc_status = |ok: bool| {
            if ok {
                tonic_health::ServingStatus::Serving
            } else {
                tonic_health::ServingStatus::NotServing
            }
        };
        reporter.set_service_status("", grpc_status(start_healthy)).await;
        if let Some(p) = port("PORT_HTTP") {
            let healthy = healthy.clone();
            let listener = tokio::net::TcpListener::bind(("127.0.0.1", p)).await.expect("bind http");
            tokio::spawn(async move {
                loop {
                    let Ok((mut conn, _)) = listener.accept().await else { continue };
                    let healthy = healthy.clone();
                    tokio::spawn(async move {
                        let mut buf = [0u8; 1024];
                        let n = conn.read(&mut buf).await.unwrap_or(0);
                        let req = String::from_utf8_lossy(&buf[..n]);
                        if req.starts_with("GET /hang") {
                            std::future::pending::<()>().await;
                        }
                        let status = if healthy.load(Ordering::SeqCst) { "200 OK" } else { "503 Service Unavailable" };
                        let _ = conn
                            .write_all(format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").as_bytes())
                            .await;
                    });
                }
            });
        }
        if let Some(p) = port("PORT_GRPC") {
            tokio::spawn(async move {
                let _ = tonic::transport::Server::builder()
                    .add_service(health_svc)
                    .serve(std::net::SocketAddr::from(([127, 0, 0, 1], p)))
                    .await;
            });
        }
        // The TCP listener exists exactly while healthy.
        let tcp_port = port("PORT_TCP");
        let bind_tcp = |ok: bool| async move {
            match (ok, tcp_port) {
                (true, Some(p)) => tokio::net::TcpListener::bind(("127.0.0.1", p)).await.ok(),
                _ => None,
            }
        };
        let mut tcp = bind_tcp(start_healthy).await;
        let log_accepts = std::env::var_os("LOG_ACCEPTS").is_some();
        let mut usr1 = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1()).expect("usr1");
        let mut usr2 = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined2()).expect("usr2");
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("term");
        line("ready", 1);
        loop {
            let accept = async {
                match &tcp {
                    Some(l) => {
                        if l.accept().await.is_ok() && log_accepts {
                            line("accept", "");
                        }
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            let now = tokio::select! {
                _ = usr1.recv() => false,
                _ = usr2.recv() => true,
                _ = term.recv() => std::process::exit(0),
                _ = accept => continue,
            };
            healthy.store(now, Ordering::SeqCst);
            set_file(now);
            reporter.set_service_status("", grpc_status(now)).await;
            // Close before binding the same port again.
            drop(tcp.take());
            tcp = bind_tcp(now).await;
            line("healthy", u8::from(now));
        }
    });
}

fn http_listen(delay_ms: u64) {
    use std::os::fd::FromRawFd;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let fds: usize = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let pid_ok = std::env::var("LISTEN_PID").ok() == Some(std::process::id().to_string());
    line("listen_fds", fds);
    line("listen_pid_ok", u8::from(pid_ok));
    line(
        "listen_fdnames",
        std::env::var("LISTEN_FDNAMES").unwrap_or_default(),
    );
    if fds == 0 {
        std::process::exit(2);
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("runtime: {e}");
            std::process::exit(1);
        }
    };
    rt.block_on(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("term");
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        if let Some(p) = std::env::var("PORT_ADMIN").ok().and_then(|p| p.parse::<u16>().ok()) {
            let admin = tokio::net::TcpListener::bind(("127.0.0.1", p)).await.expect("bind admin");
            // $ADMIN_STATUS (default 200) is what /healthz answers.
            let status: Arc<str> = std::env::var("ADMIN_STATUS").unwrap_or_else(|_| "200".into()).into();
            tokio::spawn(async move {
                loop {
                    if let Ok((mut c, _)) = admin.accept().await {
                        let status = status.clone();
                        tokio::spawn(async move {
                            let mut buf = [0u8; 512];
                            let _ = c.read(&mut buf).await;
                            let resp = format!("HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                            let _ = c.write_all(resp.as_bytes()).await;
                        });
                    }
                }
            });
        }
        // SAFETY: fd 3 is the listening socket handed over by LISTEN_FDS; nothing else owns it.
        let std_listener = unsafe { std::net::TcpListener::from_raw_fd(3) };
        std_listener.set_nonblocking(true).expect("nonblocking");
        let listener = tokio::net::TcpListener::from_std(std_listener).expect("listener");
        let instance = std::env::var("CORRAL_INSTANCE").unwrap_or_default();
        // $VERSION_FILE (a file of the service's package) wins over $VERSION.
        let version = match std::env::var("VERSION_FILE") {
            Ok(path) => std::fs::read_to_string(path).map(|v| v.trim().to_owned()).unwrap_or_else(|e| format!("unreadable: {e}")),
            Err(_) => std::env::var("VERSION").unwrap_or_default(),
        };
        let body: Arc<str> = format!("{instance} {version}\n").into();
        let inflight = Arc::new(AtomicUsize::new(0));
        let mut accept_log = std::env::var_os("ACCEPT_LOG").and_then(|dir| {
            // The instance's index may be reused by its successor: the start time tells them apart.
            let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            let path = std::path::Path::new(&dir).join(format!("{instance}.{}", t.as_nanos()));
            std::fs::OpenOptions::new().create(true).append(true).open(path).ok()
        });
        let mut note = |what: &str| {
            if let Some(f) = accept_log.as_mut() {
                let _ = f.write_all(format!("{what}\n").as_bytes());
            }
        };
        line("serving", 1);
        loop {
            tokio::select! {
                conn = listener.accept() => {
                    let Ok((mut c, _)) = conn else { continue };
                    note("accept");
                    let (body, inflight) = (body.clone(), inflight.clone());
                    inflight.fetch_add(1, Ordering::SeqCst);
                    tokio::spawn(async move {
                        let mut buf = [0u8; 2048];
                        let mut got = Vec::new();
                        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                            match c.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => got.extend_from_slice(&buf[..n]),
                            }
                        }
                        let resp = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
                        let _ = c.write_all(resp.as_bytes()).await;
                        let _ = c.shutdown().await;
                        inflight.fetch_sub(1, Ordering::SeqCst);
                    });
                }
                _ = term.recv() => break,
            }
        }
        note("term");
        // Graceful: stop accepting (the other instances keep the shared socket), finish.
        drop(listener);
        for _ in 0..1000 {
            if inflight.load(Ordering::SeqCst) == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        note(&format!("drained {}", inflight.load(Ordering::SeqCst)));
        std::process::exit(0);
    });
}

/// `refused:ERRNO` for a failed attempt, `ESCAPED:what` for one that worked.
fn outcome(r: Result<String, std::io::Error>) -> String {
    match r {
        Ok(what) => format!("ESCAPED:{what}"),
        Err(e) => format!("refused:{}", errno_name(&e)),
    }
}

fn last_os_error<T>() -> Result<T, std::io::Error> {
    Err(std::io::Error::last_os_error())
}

fn cstr(s: &str) -> std::ffi::CString {
    std::ffi::CString::new(s).unwrap_or_default()
}

/// `isolation.userns` from inside, each a real system call: the id map; a file made in
/// `shared` (a directory anyone may write; the host reads its owner), one made in the
/// workdir and marked setuid; reading `secret` (a root-only host file: CAP_DAC_OVERRIDE in
/// the effective set); taking `foreign` (a host user's file, CAP_CHOWN held); `mknod`;
/// writing `/dev/null`. Outcomes `ok` or the errno's name.
fn userns_probe(shared: &str, secret: &str, foreign: &str) -> Vec<(&'static str, String)> {
    let done = |r: std::io::Result<()>| match r {
        Ok(()) => "ok".to_string(),
        Err(e) => errno_name(&e),
    };
    let first_map = std::fs::read_to_string("/proc/self/uid_map")
        .unwrap_or_default()
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    let made = format!("{shared}/made-by-{}", std::process::id());
    let in_workdir = format!("made-in-workdir-{}", std::process::id());
    let setuid = std::fs::write(&in_workdir, b"#!/bin/sh\n").and_then(|()| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&in_workdir, std::fs::Permissions::from_mode(0o4755))
    });
    let mknod = {
        let path = cstr(&format!("{shared}/node-{}", std::process::id()));
        // SAFETY: mknod(2) with a NUL-terminated path.
        if unsafe { libc::mknod(path.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 1)) } == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    vec![
        ("uid", nix_uid().to_string()),
        ("uid_map", first_map),
        ("cap_eff", status_field("CapEff")),
        ("write_shared", done(std::fs::write(&made, b"x"))),
        ("made", made),
        ("write_workdir", done(setuid)),
        ("made_in_workdir", in_workdir),
        ("read_secret", done(std::fs::read(secret).map(|_| ()))),
        (
            "chown_foreign",
            done(std::os::unix::fs::chown(foreign, Some(0), Some(0))),
        ),
        ("mknod", done(mknod)),
        (
            "devnull",
            done(
                std::fs::OpenOptions::new()
                    .write(true)
                    .open("/dev/null")
                    .and_then(|mut f| f.write_all(b"x")),
            ),
        ),
    ]
}

fn nix_uid() -> u32 {
    // SAFETY: getuid(2) cannot fail.
    unsafe { libc::getuid() }
}

/// Every escape this instance tries, each a real system call: (name, outcome).
fn escape(api_socket: &str, block: &str, token: &str) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    // Write to a block device node the host left within reach.
    out.push((
        "block_write",
        outcome(
            std::fs::OpenOptions::new()
                .write(true)
                .open(block)
                .and_then(|mut f| f.write_all(b"corral-escape").map(|()| block.to_string())),
        ),
    ));
    // Make a device node: the host's memory, and a disk.
    for (name, kind, dev) in [
        ("mknod_char", libc::S_IFCHR, libc::makedev(1, 1)),
        ("mknod_block", libc::S_IFBLK, libc::makedev(7, 0)),
    ] {
        let path = cstr(&format!("/tmp/corral-escape-{name}"));
        // SAFETY: mknod(2) with a NUL-terminated path.
        let r = if unsafe { libc::mknod(path.as_ptr(), kind | 0o666, dev) } == 0 {
            Ok("created".to_string())
        } else {
            last_os_error()
        };
        out.push((name, outcome(r)));
    }
    // The kernel's log.
    out.push((
        "kmsg",
        outcome(
            std::fs::OpenOptions::new()
                .write(true)
                .open("/dev/kmsg")
                .and_then(|mut f| f.write_all(b"corral-escape\n").map(|()| "written".into())),
        ),
    ));
    // Leave the cgroup: every cgroup.procs this instance can see.
    let mut procs_files: Vec<String> = std::fs::read_dir("/sys/fs/cgroup")
        .map(|d| {
            d.flatten()
                .map(|e| format!("{}/cgroup.procs", e.path().display()))
                .collect()
        })
        .unwrap_or_default();
    procs_files.push("/sys/fs/cgroup/cgroup.procs".into());
    let mut moved = Err(std::io::Error::from_raw_os_error(libc::ENOENT));
    for f in &procs_files {
        let r = std::fs::OpenOptions::new()
            .write(true)
            .open(f)
            .and_then(|mut h| h.write_all(std::process::id().to_string().as_bytes()));
        match r {
            Ok(()) => {
                moved = Ok(f.clone());
                break;
            }
            // The most telling refusal: a read-only file system over a missing one.
            Err(e) if moved.as_ref().err().and_then(|x| x.raw_os_error()) == Some(libc::ENOENT) => {
                moved = Err(e)
            }
            Err(_) => {}
        }
    }
    out.push(("cgroup_procs", outcome(moved)));
    // Rewrite a host sysctl.
    out.push((
        "sysctl",
        outcome(
            std::fs::OpenOptions::new()
                .write(true)
                .open("/proc/sys/kernel/core_pattern")
                .and_then(|mut f| {
                    f.write_all(b"|/tmp/corral-escape")
                        .map(|()| "core_pattern".into())
                }),
        ),
    ));
    // Read the kernel's memory.
    out.push((
        "kcore",
        outcome(std::fs::File::open("/proc/kcore").and_then(|mut f| {
            let mut buf = [0u8; 64];
            match std::io::Read::read(&mut f, &mut buf)? {
                0 => Err(std::io::Error::from_raw_os_error(libc::ENODATA)),
                n => Ok(format!("{n} bytes")),
            }
        })),
    ));
    // Mount something.
    let _ = std::fs::create_dir_all("/tmp/corral-escape-mnt");
    let (src, target, fstype) = (cstr("none"), cstr("/tmp/corral-escape-mnt"), cstr("tmpfs"));
    // SAFETY: mount(2) with NUL-terminated strings and no data.
    let r = if unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    } == 0
    {
        Ok("tmpfs mounted".to_string())
    } else {
        last_os_error()
    };
    out.push(("mount", outcome(r)));
    // Load a kernel module (an empty image: reaching the loader at all is the escape).
    // SAFETY: init_module with a null image of length 0 and an empty parameter string.
    let r = if unsafe {
        libc::syscall(
            libc::SYS_init_module,
            std::ptr::null::<u8>(),
            0,
            c"".as_ptr(),
        )
    } == 0
    {
        Ok("loaded".to_string())
    } else {
        match std::io::Error::last_os_error().raw_os_error() {
            // The loader looked at the image: the call was allowed.
            Some(libc::EINVAL | libc::ENOEXEC | libc::EFAULT | libc::ENOKEY) => {
                Ok("init_module reached the loader".to_string())
            }
            _ => last_os_error(),
        }
    };
    out.push(("init_module", outcome(r)));
    let r = match std::fs::File::open("/proc/self/exe") {
        Ok(f) => {
            use std::os::fd::AsRawFd;
            // SAFETY: finit_module with an open fd and an empty parameter string.
            if unsafe { libc::syscall(libc::SYS_finit_module, f.as_raw_fd(), c"".as_ptr(), 0) } == 0
            {
                Ok("loaded".to_string())
            } else {
                match std::io::Error::last_os_error().raw_os_error() {
                    Some(libc::ENOEXEC | libc::EINVAL | libc::ENOKEY | libc::EBADMSG) => {
                        Ok("finit_module reached the loader".to_string())
                    }
                    _ => last_os_error(),
                }
            }
        }
        Err(e) => Err(e),
    };
    out.push(("finit_module", outcome(r)));
    // A new user namespace (where this process would be root with every capability).
    // SAFETY: unshare(2) with a flag only; the process stays as it is when refused.
    let r = if unsafe { libc::unshare(libc::CLONE_NEWUSER) } == 0 {
        Ok("in a new user namespace".to_string())
    } else {
        last_os_error()
    };
    out.push(("unshare_user", outcome(r)));
    // The agent's API.
    out.push((
        "api_socket",
        outcome(std::os::unix::net::UnixStream::connect(api_socket).map(|_| "connected".into())),
    ));
    // Outlive the instance: double fork and setsid; the grandchild renames itself to the
    // token and sleeps. Which way it went is only known from outside (after `delete`).
    let name = cstr(token);
    // SAFETY: the children make only async-signal-safe calls.
    match unsafe { libc::fork() } {
        // SAFETY: in the child: setsid, fork, prctl, pause and _exit only.
        0 => unsafe {
            libc::setsid();
            if libc::fork() == 0 {
                libc::prctl(libc::PR_SET_NAME, name.as_ptr(), 0, 0, 0);
                loop {
                    libc::pause();
                }
            }
            libc::_exit(0)
        },
        pid if pid > 0 => {
            let mut st = 0;
            // SAFETY: waiting for our own child.
            unsafe { libc::waitpid(pid, &mut st, 0) };
            out.push(("double_fork", "started".to_string()));
        }
        _ => out.push(("double_fork", outcome(last_os_error()))),
    }
    out
}
