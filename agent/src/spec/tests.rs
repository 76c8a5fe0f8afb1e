//! Table-driven tests of the spec module: the SPEC example, defaults, every rule's error,
//! round trips, change lines, and inputs that must not panic.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::*;

/// The example of `SPEC.md`, verbatim.
const EXAMPLE: &str = r#"name = "web"                       # [a-z0-9][a-z0-9-]{0,62}; unique on the host
command = ["/usr/bin/python3", "-m", "http.server"]
env = { LOG_LEVEL = "info" }
workdir = "/srv/web"               # optional
user = "nobody"                    # optional: name or uid[:gid]; default: the agent's user
replicas = 3

[resources]                        # each optional; absent means unlimited
cpu = 0.5                          # cores, fractional; CFS quota = cpu × period
memory = "256MiB"                  # hard limit; exceeding it gets the process OOM-killed
pids = 256                         # max tasks in the instance

[isolation]
namespaces = ["pid", "mount", "uts", "ipc"]   # the default; add "net" for a private network with loopback only
hostname = "web-{index}"           # optional; {index} and {instance} are expanded
private_tmp = true                 # a fresh tmpfs on /tmp

[ports]                            # per-instance ports chosen by the agent, given as env PORT_<NAME>
admin = "auto"

[[sockets]]                        # listening sockets the AGENT owns and hands to every instance
name = "http"                      # via the LISTEN_FDS / LISTEN_FDNAMES protocol (sd_listen_fds)
listen = "127.0.0.1:8080"          # tcp host:port, or "unix:/path"

[restart]
policy = "always"                  # always | on-failure | never
backoff = "100ms"                  # first delay, doubling up to backoff_max; reset after 60 s up
backoff_max = "30s"

[health]                           # exactly one of http / tcp / grpc / exec
http = "http://127.0.0.1:{port.admin}/healthz"   # probes reach ONE instance, never another
interval = "2s"
timeout = "1s"
start_period = "5s"                # failures during it do not count
failure_threshold = 3
success_threshold = 1
restart_on_failure = true          # liveness: restart an instance that stays unhealthy
notify = false                     # true: instances report READY=1 on NOTIFY_SOCKET (sd_notify)

[rollout]
max_surge = 1                      # extra instances started before old ones stop
max_unavailable = 0
min_healthy = "2s"                 # a new instance must stay healthy this long
healthy_deadline = "60s"           # ...within this time, or the rollout fails
auto_rollback = true

[stop]
signal = "SIGTERM"
grace = "10s"                      # then SIGKILL to everything in the instance's cgroup

[logs]
max_size = "10MiB"                 # per file, rotated
max_files = 5
"#;

const MINIMAL: &str = "name = \"web\"\ncommand = [\"/bin/app\"]\n";

fn parse(text: &str) -> ServiceSpec {
    match parse_toml(text) {
        Ok(spec) => spec,
        Err(e) => panic!("spec refused:\n{e}\n--- spec:\n{text}"),
    }
}

fn refused(text: &str) -> SpecError {
    match parse_toml(text) {
        Ok(spec) => panic!("spec accepted: {spec:?}\n--- spec:\n{text}"),
        Err(e) => e,
    }
}

#[test]
fn example_parses() {
    let spec = parse(EXAMPLE);
    assert_eq!(spec.name, "web");
    assert_eq!(spec.command, ["/usr/bin/python3", "-m", "http.server"]);
    assert_eq!(
        spec.env,
        BTreeMap::from([("LOG_LEVEL".to_owned(), "info".to_owned())])
    );
    assert_eq!(spec.workdir, PathBuf::from("/srv/web"));
    assert_eq!(spec.user, Some(UserSpec::Name("nobody".into())));
    assert_eq!(spec.replicas, 3);
    assert_eq!(
        spec.resources,
        Resources {
            cpu: Some(0.5),
            memory: Some(256 << 20),
            pids: Some(256),
            nofile: None,
        }
    );
    assert_eq!(
        spec.isolation.namespaces,
        [
            Namespace::Pid,
            Namespace::Mount,
            Namespace::Uts,
            Namespace::Ipc
        ]
    );
    assert_eq!(spec.isolation.hostname.as_deref(), Some("web-{index}"));
    assert!(spec.isolation.private_tmp);
    assert_eq!(
        spec.ports,
        BTreeMap::from([("admin".to_owned(), PortSpec::Auto)])
    );
    assert_eq!(
        spec.sockets,
        [SocketSpec {
            name: "http".into(),
            listen: ListenAddr::Tcp("127.0.0.1:8080".parse::<SocketAddr>().expect("addr")),
        }]
    );
    assert_eq!(
        spec.restart,
        RestartSpec {
            policy: RestartPolicy::Always,
            backoff: Duration::from_millis(100),
            backoff_max: Duration::from_secs(30),
        }
    );
    assert_eq!(
        spec.health,
        Some(HealthSpec {
            probe: Some(Probe::Http("http://127.0.0.1:{port.admin}/healthz".into())),
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            start_period: Duration::from_secs(5),
            failure_threshold: 3,
            success_threshold: 1,
            restart_on_failure: true,
            notify: false,
        })
    );
    assert_eq!(
        spec.rollout,
        RolloutSpec {
            max_surge: 1,
            max_unavailable: 0,
            min_healthy: Duration::from_secs(2),
            healthy_deadline: Duration::from_secs(60),
            auto_rollback: true,
            start_cpu: None,
        }
    );
    assert_eq!(
        spec.stop,
        StopSpec {
            signal: 15,
            signal_name: "SIGTERM".into(),
            grace: Duration::from_secs(10)
        }
    );
    assert_eq!(
        spec.logs,
        LogSpec {
            max_size: 10 << 20,
            max_files: 5
        }
    );
    assert_eq!(spec.hostname_for(2).as_deref(), Some("web-2"));
}

#[test]
fn minimal_spec_gets_documented_defaults() {
    let spec = parse(MINIMAL);
    let expected = ServiceSpec {
        name: "web".into(),
        command: vec!["/bin/app".into()],
        env: BTreeMap::new(),
        workdir: PathBuf::from("/"),
        user: None,
        replicas: 1,
        resources: Resources::default(),
        isolation: Isolation {
            namespaces: vec![
                Namespace::Pid,
                Namespace::Mount,
                Namespace::Uts,
                Namespace::Ipc,
                Namespace::Cgroup,
            ],
            hostname: None,
            private_tmp: true,
            capabilities: None,
            readonly_root: false,
            seccomp: Seccomp::Default,
            devices: Devices::Minimal,
            system_paths: SystemPaths::Masked,
            userns: false,
        },
        ports: BTreeMap::new(),
        sockets: Vec::new(),
        restart: RestartSpec {
            policy: RestartPolicy::Always,
            backoff: Duration::from_millis(100),
            backoff_max: Duration::from_secs(30),
        },
        health: None,
        rollout: RolloutSpec {
            max_surge: 1,
            max_unavailable: 0,
            min_healthy: Duration::from_millis(500),
            healthy_deadline: Duration::from_secs(60),
            auto_rollback: true,
            start_cpu: None,
        },
        scale: None,
        stop: StopSpec {
            signal: 15,
            signal_name: "SIGTERM".into(),
            grace: Duration::from_secs(10),
        },
        logs: LogSpec {
            max_size: 10 << 20,
            max_files: 5,
        },
        package: None,
        labels: BTreeMap::new(),
        annotations: BTreeMap::new(),
        job: None,
    };
    assert_eq!(spec, expected);
    assert_eq!(spec.hostname_for(2).as_deref(), Some("web-2"));
}

#[test]
fn health_section_defaults() {
    let spec = parse(&format!("{MINIMAL}[health]\ntcp = \"127.0.0.1:9000\"\n"));
    assert_eq!(
        spec.health,
        Some(HealthSpec {
            probe: Some(Probe::Tcp("127.0.0.1:9000".into())),
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            start_period: Duration::from_secs(10),
            failure_threshold: 3,
            success_threshold: 1,
            restart_on_failure: true,
            notify: false,
        })
    );
    // The default timeout never exceeds a short interval.
    let spec = parse(&format!(
        "{MINIMAL}[health]\ntcp = \"127.0.0.1:9000\"\ninterval = \"500ms\"\n"
    ));
    let health = spec.health.expect("health section");
    assert_eq!(health.timeout, Duration::from_millis(500));
    // notify alone is a complete health section.
    let spec = parse(&format!("{MINIMAL}[health]\nnotify = true\n"));
    let health = spec.health.expect("health section");
    assert_eq!(health.probe, None);
    assert!(health.notify);
}

#[test]
fn isolation_variants() {
    let cases: &[(&str, &[Namespace], bool, Option<&str>)] = &[
        ("namespaces = []", &[], false, None),
        (
            "namespaces = [\"net\", \"uts\"]",
            &[Namespace::Uts, Namespace::Net],
            false,
            Some("web-7"),
        ),
        (
            "namespaces = [\"mount\", \"pid\"]",
            &[Namespace::Pid, Namespace::Mount],
            true,
            None,
        ),
        (
            "namespaces = [\"mount\"]\nprivate_tmp = false",
            &[Namespace::Mount],
            false,
            None,
        ),
        (
            "namespaces = [\"uts\"]\nhostname = \"{instance}.corral\"",
            &[Namespace::Uts],
            false,
            Some("web-7.corral"),
        ),
    ];
    for (isolation, namespaces, private_tmp, hostname) in cases {
        let spec = parse(&format!("{MINIMAL}[isolation]\n{isolation}\n"));
        assert_eq!(spec.isolation.namespaces, *namespaces, "{isolation}");
        assert_eq!(spec.isolation.private_tmp, *private_tmp, "{isolation}");
        assert_eq!(spec.hostname_for(7).as_deref(), *hostname, "{isolation}");
    }
}

#[test]
fn capability_names() {
    let ok: &[(&str, Capability)] = &[
        ("CAP_NET_BIND_SERVICE", Capability::CAP_NET_BIND_SERVICE),
        ("NET_BIND_SERVICE", Capability::CAP_NET_BIND_SERVICE),
        ("net_bind_service", Capability::CAP_NET_BIND_SERVICE),
        ("cap_kill", Capability::CAP_KILL),
        ("Cap_Sys_Admin", Capability::CAP_SYS_ADMIN),
        ("checkpoint_restore", Capability::CAP_CHECKPOINT_RESTORE),
    ];
    for (name, cap) in ok {
        assert_eq!(capability_by_name(name), Some(*cap), "{name}");
        // The canonical name reads back as itself.
        assert_eq!(capability_by_name(&cap.to_string()), Some(*cap), "{cap}");
    }
    for bad in [
        "",
        "CAP_",
        "cap",
        "ALL",
        "CAP_ALL",
        "NET BIND SERVICE",
        "CAP_KILL ",
        " KILL",
        "CAP_CAP_KILL",
        "KİLL",
        "CAP-KILL",
        "0",
        "CAP_41",
    ] {
        assert_eq!(capability_by_name(bad), None, "{bad:?}");
    }
}

#[test]
fn capability_masks() {
    assert_eq!(capability_mask(&[]), 0);
    assert_eq!(capability_mask(&[Capability::CAP_NET_BIND_SERVICE]), 0x400);
    assert_eq!(
        capability_mask(&[Capability::CAP_CHOWN, Capability::CAP_KILL]),
        0x21
    );
    // Docker's default bounding set less CAP_MKNOD (bit 27), as /proc/PID/status shows it.
    assert_eq!(capability_mask(&DEFAULT_ROOT_CAPABILITIES), 0xa0_04_25_fb);
    let mut sorted = DEFAULT_ROOT_CAPABILITIES.to_vec();
    sorted.sort_by_key(Capability::index);
    assert_eq!(sorted, DEFAULT_ROOT_CAPABILITIES, "kept sorted by number");
}

#[test]
fn accepted_value_forms() {
    type Case = (&'static str, fn(&ServiceSpec) -> bool);
    let cases: &[Case] = &[
        ("[resources]\nmemory = 1048576", |s| {
            s.resources.memory == Some(1 << 20)
        }),
        ("[resources]\nmemory = \"2097152\"", |s| {
            s.resources.memory == Some(2 << 20)
        }),
        ("[resources]\ncpu = 2", |s| s.resources.cpu == Some(2.0)),
        ("[rollout]\nstart_cpu = 0.25", |s| {
            s.rollout.start_cpu == Some(0.25)
        }),
        ("[rollout]\nstart_cpu = 1", |s| {
            s.rollout.start_cpu == Some(1.0)
        }),
        ("", |s| s.rollout.start_cpu.is_none()),
        ("[ports]\nadmin = 9000", |s| {
            s.ports.get("admin") == Some(&PortSpec::Fixed(9000))
        }),
        ("[ports]\nadmin = \"9000\"", |s| {
            s.ports.get("admin") == Some(&PortSpec::Fixed(9000))
        }),
        ("user = \"1000\"", |s| {
            s.user
                == Some(UserSpec::Id {
                    uid: 1000,
                    gid: None,
                })
        }),
        ("user = \"1000:100\"", |s| {
            s.user
                == Some(UserSpec::Id {
                    uid: 1000,
                    gid: Some(100),
                })
        }),
        ("user = \"machine$\"", |s| {
            s.user == Some(UserSpec::Name("machine$".into()))
        }),
        ("command = [\"python3\", \"app.py\"]", |s| {
            s.command[0] == "python3"
        }),
        ("[stop]\nsignal = \"int\"", |s| {
            s.stop.signal == 2 && s.stop.signal_name == "SIGINT"
        }),
        ("[stop]\nsignal = \"KILL\"", |s| s.stop.signal == 9),
        ("[resources]\nnofile = 1", |s| s.resources.nofile == Some(1)),
        ("[resources]\nnofile = 1048576", |s| {
            s.resources.nofile == Some(1 << 20)
        }),
        ("[isolation]\nreadonly_root = true", |s| {
            s.isolation.readonly_root && s.isolation.has(Namespace::Mount)
        }),
        (
            "[isolation]\nnamespaces = [\"mount\"]\nprivate_tmp = false\nreadonly_root = true",
            |s| s.isolation.readonly_root && !s.isolation.private_tmp,
        ),
        ("[isolation]\ncapabilities = []", |s| {
            s.isolation.capabilities == Some(Vec::new())
        }),
        ("[isolation]\nseccomp = \"unconfined\"", |s| {
            s.isolation.seccomp == Seccomp::Unconfined
        }),
        ("[isolation]\ndevices = \"host\"", |s| {
            s.isolation.devices == Devices::Host
        }),
        ("[isolation]\nsystem_paths = \"host\"", |s| {
            s.isolation.system_paths == SystemPaths::Host
        }),
        ("[isolation]\nnamespaces = [\"uts\"]", |s| {
            s.isolation.system_paths == SystemPaths::Host && s.isolation.devices == Devices::Minimal
        }),
        ("[isolation]\nuserns = true", |s| s.isolation.userns),
        ("user = \"dynamic\"", |s| s.user == Some(UserSpec::Dynamic)),
        // Any case, with or without CAP_, sorted by number.
        (
            "[isolation]\ncapabilities = [\"Kill\", \"cap_net_bind_service\", \"CAP_CHOWN\", \"sys_admin\"]",
            |s| {
                s.isolation.capabilities
                    == Some(vec![
                        Capability::CAP_CHOWN,
                        Capability::CAP_KILL,
                        Capability::CAP_NET_BIND_SERVICE,
                        Capability::CAP_SYS_ADMIN,
                    ])
            },
        ),
        (
            "[[sockets]]\nname = \"a\"\nlisten = \"localhost:80\"",
            |s| s.sockets[0].listen == ListenAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], 80))),
        ),
        (
            "[[sockets]]\nname = \"a\"\nlisten = \"[::1]:80\"",
            |s| matches!(s.sockets[0].listen, ListenAddr::Tcp(addr) if addr.is_ipv6()),
        ),
        (
            "[[sockets]]\nname = \"a\"\nlisten = \"unix:/run/web.sock\"",
            |s| s.sockets[0].listen == ListenAddr::Unix("/run/web.sock".into()),
        ),
        (
            "[restart]\nbackoff = \"1m 30s\"\nbackoff_max = \"1h\"",
            |s| s.restart.backoff == Duration::from_secs(90),
        ),
        ("replicas = 0", |s| s.replicas == 0),
        (
            "replicas = 2\n[isolation]\nnamespaces = [\"net\"]\n[ports]\nadmin = 80",
            |s| s.ports.get("admin") == Some(&PortSpec::Fixed(80)),
        ),
        (
            "[health]\nexec = [\"/bin/check\", \"--port\", \"{port.admin}\"]\n[ports]\nadmin = \"auto\"",
            |s| matches!(&s.health, Some(HealthSpec { probe: Some(Probe::Exec(argv)), .. }) if argv.len() == 3),
        ),
        (
            "[health]\nexec = [\"sh\", \"-c\", \"find /tmp -exec true {} +\"]",
            |s| s.health.is_some(),
        ),
    ];
    for (extra, check) in cases {
        let spec = parse(&with_minimal(extra));
        assert!(check(&spec), "{extra}: {spec:?}");
    }
}

/// Invalid specs: (TOML added to a minimal spec, field named, fragment of the reason).
/// Lines meant for the top level come first; `name`/`command` lines replace the minimal ones.
#[rustfmt::skip]
const INVALID: &[(&str, &str, &str)] = &[
    // sizes
    ("[resources]\nmemory = \"12XB\"", "resources.memory", "\"12XB\" is not a size (use bytes"),
    ("[resources]\nmemory = \"-5\"", "resources.memory", "\"-5\" is not a size"),
    ("[resources]\nmemory = -5", "resources.memory", "-5 is not a size (it is negative)"),
    ("[resources]\nmemory = \"1.5GiB\"", "resources.memory", "\"1.5GiB\" is not a size"),
    ("[resources]\nmemory = \"1 MiB\"", "resources.memory", "is not a size"),
    ("[resources]\nmemory = \"1mib\"", "resources.memory", "is not a size"),
    ("[resources]\nmemory = \"99999999TiB\"", "resources.memory", "\"99999999TiB\" is too large"),
    ("[resources]\nmemory = \"18446744073709551616\"", "resources.memory", "too large"),
    ("[resources]\nmemory = \"16EiB\"", "resources.memory", "is not a size"),
    ("[resources]\nmemory = \"9223372036854775808\"", "resources.memory", "is more than 9223372036854775807 bytes"),
    ("[resources]\nmemory = \"512KiB\"", "resources.memory", "\"512KiB\" is less than 1MiB"),
    ("[resources]\nmemory = 1.5", "resources.memory", "expected a size"),
    ("[logs]\nmax_size = \"1KiB\"", "logs.max_size", "less than 4KiB"),
    ("[logs]\nmax_size = \"2TiB\"", "logs.max_size", "\"2TiB\" is more than 1TiB"),
    ("[logs]\nmax_size = 4095", "logs.max_size", "4095 is less than 4KiB"),
    // durations
    ("[health]\ntcp = \"127.0.0.1:1\"\ninterval = \"10 parsecs\"", "health.interval", "\"10 parsecs\" is not a duration"),
    ("[restart]\nbackoff = \"-1s\"", "restart.backoff", "\"-1s\" is not a duration (it is negative)"),
    ("[restart]\nbackoff = \"10\"", "restart.backoff", "a unit is needed"),
    ("[restart]\nbackoff = \"\"", "restart.backoff", "is not a duration"),
    ("[restart]\nbackoff_max = \"2h\"", "restart.backoff_max", "\"2h\" is longer than 1h"),
    ("[stop]\ngrace = \"99999999999999999999h\"", "stop.grace", "is not a duration"),
    ("[health]\ntcp = \"127.0.0.1:1\"\ninterval = 5", "health.interval", "expected a duration string such as \"10s\", found an integer"),
    // names
    ("name = \"Web/../x\"", "name", "\"Web/../x\" is not a valid name ([a-z0-9][a-z0-9-]{0,62})"),
    ("name = \"a/b\"", "name", "is not a valid name"),
    ("name = \"..\"", "name", "\"..\" is not a valid name"),
    ("name = \"a.b\"", "name", "is not a valid name"),
    ("name = \"Web\"", "name", "is not a valid name"),
    ("name = \"-web\"", "name", "is not a valid name"),
    ("name = \"\"", "name", "\"\" is not a valid name"),
    ("name = \"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\"", "name", "is not a valid name"),
    ("name = \"web\\u0000\"", "name", "is not a valid name"),
    ("name = 5", "name", "expected a string, found an integer"),
    // command
    ("command = []", "command", "must not be empty"),
    ("command = [\"bin/app\"]", "command[0]", "\"bin/app\" is a relative path"),
    ("command = [\"./app\"]", "command[0]", "is a relative path"),
    ("command = [\"\"]", "command[0]", "the program must not be empty"),
    ("command = [\"/bin/app\", \"a\\u0000b\"]", "command[1]", "\"a\\0b\" contains a NUL byte"),
    ("command = \"/bin/app\"", "command", "expected an array of strings, found a string"),
    ("command = [\"/bin/app\", 1]", "command[1]", "expected a string, found an integer"),
    // replicas
    ("replicas = -1", "replicas", "-1 is out of range (0..=1000)"),
    ("replicas = 1001", "replicas", "1001 is out of range (0..=1000)"),
    ("replicas = \"3\"", "replicas", "expected an integer, found a string"),
    ("replicas = 2.0", "replicas", "expected an integer, found a float"),
    // unknown fields and wrong types
    ("colour = \"blue\"", "colour", "unknown field (expected one of name, command, env"),
    ("[health]\nhtpp = \"http://x/\"\nnotify = true", "health.htpp", "unknown field (expected one of http, tcp, grpc, exec"),
    ("[resources]\nmemroy = \"1GiB\"", "resources.memroy", "unknown field"),
    ("[[sockets]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\nbacklog = 5", "sockets[0].backlog", "unknown field (expected one of name, listen)"),
    ("[helth]\ntcp = \"x\"", "helth", "unknown field"),
    ("resources = 5", "resources", "expected a table, found an integer"),
    ("[sockets]\nname = \"a\"", "sockets", "expected an array of tables ([[sockets]]), found a table"),
    ("sockets = [1]", "sockets[0]", "expected a table, found an integer"),
    ("env = { FOO = 1 }", "env.FOO", "expected a string, found an integer"),
    ("[isolation]\nprivate_tmp = \"yes\"", "isolation.private_tmp", "expected a boolean, found a string"),
    ("[ports]\nadmin = true", "ports.admin", "expected \"auto\" or a port number, found a boolean"),
    ("[resources]\ncpu = \"lots\"", "resources.cpu", "expected a number, found a string"),
    ("workdir = 1979-05-27", "workdir", "expected a string, found a datetime"),
    // syntax
    ("name = ", "(toml)", "line 1, column"),
    ("[health\n", "(toml)", "line 3"),
    ("replicas = 1\nreplicas = 2", "(toml)", "duplicate key"),
    // integers beyond 64 bits: the TOML reader's own message names an i128
    ("[resources]\npids = 18446744073709551616", "(toml)", "line 4, column 8: resources.pids = 18446744073709551616 is out of range (a TOML integer is 64-bit: -9223372036854775808 to 9223372036854775807)"),
    ("replicas = -9223372036854775809", "(toml)", "replicas = -9223372036854775809 is out of range"),
    ("[[sockets]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\n[[sockets]]\nname = \"b\"\nlisten = 99999999999999999999", "(toml)", "sockets[1].listen = 99999999999999999999 is out of range"),
    ("env = { A = 99999999999999999999 }", "(toml)", ": 99999999999999999999 is out of range"),
    // env
    ("env = { CORRAL_SERVICE = \"x\" }", "env.CORRAL_SERVICE", "\"CORRAL_SERVICE\" is reserved"),
    ("env = { CORRAL_ANYTHING = \"x\" }", "env.CORRAL_ANYTHING", "reserved (the CORRAL_ prefix"),
    ("env = { LISTEN_FDS = \"3\" }", "env.LISTEN_FDS", "reserved"),
    ("env = { LISTEN_FDNAMES = \"a\" }", "env.LISTEN_FDNAMES", "reserved"),
    ("env = { LISTEN_PID = \"1\" }", "env.LISTEN_PID", "reserved"),
    ("env = { NOTIFY_SOCKET = \"/x\" }", "env.NOTIFY_SOCKET", "reserved"),
    ("env = { PORT_ADMIN = \"1\" }\n[ports]\nadmin = \"auto\"", "env.PORT_ADMIN", "reserved (set by the agent from ports.admin)"),
    ("env = { \"1FOO\" = \"x\" }", "env.1FOO", "\"1FOO\" is not a valid variable name"),
    ("env = { \"A B\" = \"x\" }", "env.\"A B\"", "is not a valid variable name"),
    ("env = { \"\" = \"x\" }", "env.\"\"", "the name is empty"),
    ("env = { FOO = \"a\\u0000b\" }", "env.FOO", "the value contains a NUL byte"),
    // workdir and user
    ("workdir = \"srv\"", "workdir", "\"srv\" is not an absolute path"),
    ("workdir = \"/srv\\u0000\"", "workdir", "contains a NUL byte"),
    ("user = \"Bad User\"", "user", "\"Bad User\" is not a user name, uid or uid:gid"),
    ("user = \"4294967295\"", "user", "is not a user name, uid or uid:gid"),
    ("user = \"1000:\"", "user", "is not a user"),
    ("user = \"root:root\"", "user", "is not a user"),
    ("user = \"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\"", "user", "is not a user"),
    // resources
    ("[resources]\ncpu = 0", "resources.cpu", "0 is out of range (0.01..=1024 cores)"),
    ("[resources]\ncpu = -1.0", "resources.cpu", "out of range"),
    ("[resources]\ncpu = 2000", "resources.cpu", "out of range"),
    ("[resources]\ncpu = nan", "resources.cpu", "NaN is not a finite number"),
    ("[resources]\ncpu = inf", "resources.cpu", "not a finite number"),
    ("[resources]\npids = 0", "resources.pids", "0 is out of range (1..=4194304)"),
    ("[resources]\npids = 1", "resources.pids", "1 is below 2, the least an instance needs: the instance's init and its service process each count as a task"),
    ("[resources]\npids = 3\n[health]\nexec = [\"/bin/true\"]", "resources.pids", "3 is below 4, the least an instance needs: the instance's init, its service process, and an exec probe's helper"),
    ("[resources]\npids = 4194305", "resources.pids", "out of range"),
    ("[resources]\nnofile = 0", "resources.nofile", "0 is out of range (1..=1048576)"),
    ("[resources]\nnofile = 1048577", "resources.nofile", "out of range"),
    ("[resources]\nnofile = -1", "resources.nofile", "out of range"),
    ("[resources]\nnofile = \"1024\"", "resources.nofile", "expected an integer, found a string"),
    // isolation
    ("[isolation]\nnamespaces = [\"pid\"]", "isolation.namespaces", "\"pid\" requires \"mount\""),
    ("[isolation]\ncapabilities = [\"NET_BIND_SERVICE\", \"CAP_FLY\"]", "isolation.capabilities[1]", "\"CAP_FLY\" is not a capability"),
    ("[isolation]\ncapabilities = [\"\"]", "isolation.capabilities[0]", "\"\" is not a capability"),
    ("[isolation]\ncapabilities = [\"CAP_\"]", "isolation.capabilities[0]", "\"CAP_\" is not a capability"),
    ("[isolation]\ncapabilities = [\"net bind service\"]", "isolation.capabilities[0]", "is not a capability"),
    ("[isolation]\ncapabilities = [\"ALL\"]", "isolation.capabilities[0]", "\"ALL\" is not a capability"),
    ("[isolation]\ncapabilities = [\"kill\", \"CAP_KILL\"]", "isolation.capabilities[1]", "\"CAP_KILL\" is listed twice (CAP_KILL)"),
    ("[isolation]\ncapabilities = \"CAP_KILL\"", "isolation.capabilities", "expected an array of strings, found a string"),
    ("[isolation]\ncapabilities = [7]", "isolation.capabilities[0]", "expected a string, found an integer"),
    ("[isolation]\nnamespaces = [\"pid\", \"uts\"]\nreadonly_root = true", "isolation.namespaces", "\"pid\" requires \"mount\""),
    ("[isolation]\nnamespaces = [\"uts\"]\nreadonly_root = true", "isolation.readonly_root", "needs the \"mount\" namespace"),
    ("[isolation]\nreadonly_root = \"yes\"", "isolation.readonly_root", "expected a boolean, found a string"),
    ("[isolation]\nnamespaces = [\"pid\", \"mount\", \"pid\"]", "isolation.namespaces[2]", "\"pid\" is listed twice"),
    ("[isolation]\nnamespaces = [\"user\"]", "isolation.namespaces[0]", "\"user\" is not a namespace (use pid, mount, uts, ipc, net or cgroup)"),
    ("[isolation]\nnamespaces = [\"UTS\"]", "isolation.namespaces[0]", "is not a namespace"),
    ("[isolation]\nnamespaces = [\"mount\"]\nhostname = \"web\"", "isolation.hostname", "needs the \"uts\" namespace"),
    ("[isolation]\nhostname = \"web-{foo}\"", "isolation.hostname", "\"{foo}\" is not a placeholder (use {index} or {instance})"),
    ("[isolation]\nhostname = \"web-{index\"", "isolation.hostname", "is not closed"),
    ("[isolation]\nhostname = \"-{index}\"", "isolation.hostname", "not a valid hostname"),
    ("[isolation]\nhostname = \"web_{index}\"", "isolation.hostname", "not a valid hostname"),
    ("[isolation]\nhostname = \"{instance}-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\"", "isolation.hostname", "\"w-999-aaaa"),
    ("[isolation]\nnamespaces = [\"pid\", \"uts\"]\nprivate_tmp = true", "isolation.private_tmp", "needs the \"mount\" namespace"),
    // the confinement switches: each bad value refused with its field
    ("[isolation]\nseccomp = \"strict\"", "isolation.seccomp", "\"strict\" is not one of \"default\", \"unconfined\""),
    ("[isolation]\nseccomp = \"Default\"", "isolation.seccomp", "\"Default\" is not one of"),
    ("[isolation]\nseccomp = \"\"", "isolation.seccomp", "\"\" is not one of"),
    ("[isolation]\nseccomp = false", "isolation.seccomp", "expected a string, found a boolean"),
    ("[isolation]\nseccomp = [\"default\"]", "isolation.seccomp", "expected a string, found an array"),
    ("[isolation]\ndevices = \"none\"", "isolation.devices", "\"none\" is not one of \"minimal\", \"host\""),
    ("[isolation]\ndevices = \"/dev/sda\"", "isolation.devices", "is not one of"),
    ("[isolation]\ndevices = 1", "isolation.devices", "expected a string, found an integer"),
    ("[isolation]\nsystem_paths = \"hidden\"", "isolation.system_paths", "\"hidden\" is not one of \"masked\", \"host\""),
    ("[isolation]\nsystem_paths = true", "isolation.system_paths", "expected a string, found a boolean"),
    ("[isolation]\nnamespaces = [\"uts\"]\nsystem_paths = \"masked\"", "isolation.system_paths", "\"masked\" needs the \"mount\" namespace"),
    ("[isolation]\nuserns = \"yes\"", "isolation.userns", "expected a boolean, found a string"),
    ("[isolation]\nuserns = 1", "isolation.userns", "expected a boolean, found an integer"),
    ("[isolation]\nnamespaces = [\"uts\"]\nuserns = true", "isolation.userns", "needs the \"mount\" namespace"),
    ("user = \"dynamic\"\n[isolation]\nuserns = true", "isolation.userns", "cannot be combined with user = \"dynamic\""),
    ("[isolation]\nsecomp = \"default\"", "isolation.secomp", "unknown field"),
    // ports
    ("replicas = 3\n[ports]\nadmin = 8080", "ports.admin", "fixed port 8080 would collide between the 3 instances"),
    ("replicas = 2\n[ports]\nadmin = \"8080\"", "ports.admin", "would collide"),
    ("[ports]\nadmin = 0", "ports.admin", "0 is not a port (use \"auto\" or 1..=65535)"),
    ("[ports]\nadmin = 70000", "ports.admin", "70000 is not a port"),
    ("[ports]\nadmin = \"http\"", "ports.admin", "\"http\" is not a port"),
    ("[ports]\nAdmin = \"auto\"", "ports.Admin", "\"Admin\" is not a valid port name ([a-z][a-z0-9_]{0,31})"),
    ("[ports]\nadmin-port = \"auto\"", "ports.admin-port", "is not a valid port name"),
    // sockets
    ("[[sockets]]\nname = \"http\"\nlisten = \"example.com:80\"", "sockets[0].listen", "\"example.com:80\" is not a listen address"),
    ("[[sockets]]\nname = \"http\"\nlisten = \"8080\"", "sockets[0].listen", "is not a listen address"),
    ("[[sockets]]\nname = \"http\"\nlisten = \"localhost:http\"", "sockets[0].listen", "is not a listen address"),
    ("[[sockets]]\nname = \"http\"\nlisten = \"127.0.0.1:0\"", "sockets[0].listen", "port 0 is not allowed"),
    ("[[sockets]]\nname = \"http\"\nlisten = \"unix:run/web.sock\"", "sockets[0].listen", "needs an absolute path"),
    ("[[sockets]]\nname = \"http\"\nlisten = \"unix:/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\"", "sockets[0].listen", "bytes long (at most 107)"),
    ("[[sockets]]\nname = \"http\"", "sockets[0].listen", "required"),
    ("[[sockets]]\nlisten = \"127.0.0.1:80\"", "sockets[0].name", "required"),
    ("[[sockets]]\nname = \"a:b\"\nlisten = \"127.0.0.1:80\"", "sockets[0].name", "\"a:b\" is not a valid socket name"),
    ("[[sockets]]\nname = \"a\"\nlisten = \"127.0.0.1:80\"\n[[sockets]]\nname = \"a\"\nlisten = \"127.0.0.1:81\"", "sockets[1].name", "\"a\" is already the name of sockets[0]"),
    ("[[sockets]]\nname = \"a\"\nlisten = \"127.0.0.1:80\"\n[[sockets]]\nname = \"b\"\nlisten = \"127.0.0.1:80\"", "sockets[1].listen", "already where sockets[0] listens"),
    // restart
    ("[restart]\nbackoff = \"1m\"", "restart.backoff", "\"1m\" is longer than restart.backoff_max (30s)"),
    ("[restart]\nbackoff = \"5s\"\nbackoff_max = \"1s\"", "restart.backoff", "longer than restart.backoff_max (1s)"),
    ("[restart]\nbackoff = \"1500us\"", "restart.backoff", "\"1500us\" is not a whole number of milliseconds"),
    ("[restart]\npolicy = \"sometimes\"", "restart.policy", "\"sometimes\" is not a policy (use always, on-failure or never)"),
    // health
    ("[health]\nhttp = \"http://127.0.0.1:1/\"\ntcp = \"127.0.0.1:1\"", "health", "http and tcp are both set"),
    ("[health]\nhttp = \"http://127.0.0.1:1/\"\ntcp = \"127.0.0.1:1\"\nexec = [\"/bin/true\"]", "health", "http, tcp and exec are all set"),
    ("[health]\ninterval = \"5s\"", "health", "no probe"),
    ("[health]\nhttp = \"http://127.0.0.1:{port.admn}/\"\n[ports]\nadmin = \"auto\"", "health.http", "\"{port.admn}\" names no port ([ports] has admin)"),
    ("[health]\ntcp = \"127.0.0.1:{port.admin}\"", "health.tcp", "names no port ([ports] is empty)"),
    ("[health]\nexec = [\"/bin/check\", \"{port.x}\"]", "health.exec[1]", "\"{port.x}\" names no port"),
    ("[health]\nhttp = \"https://127.0.0.1/\"", "health.http", "does not start with http://"),
    ("[health]\nhttp = \"http:///healthz\"", "health.http", "has no host"),
    ("[health]\ntcp = \"localhost\"", "health.tcp", "\"localhost\" is not host:port"),
    ("[health]\ngrpc = \":50051\"", "health.grpc", "is not host:port"),
    ("[health]\nexec = []", "health.exec", "must not be empty"),
    ("[health]\nexec = [\"bin/check\"]", "health.exec[0]", "is a relative path"),
    ("[health]\ntcp = \"127.0.0.1:1\"\ntimeout = \"5s\"", "health.timeout", "\"5s\" is longer than health.interval (2s)"),
    ("[health]\ntcp = \"127.0.0.1:1\"\ninterval = \"10ms\"", "health.interval", "shorter than 100ms"),
    ("[health]\ntcp = \"127.0.0.1:1\"\nstart_period = \"2days\"", "health.start_period", "longer than 1day"),
    ("[health]\ntcp = \"127.0.0.1:1\"\nfailure_threshold = 0", "health.failure_threshold", "0 is out of range (1..=100)"),
    ("[health]\ntcp = \"127.0.0.1:1\"\nsuccess_threshold = 101", "health.success_threshold", "out of range"),
    ("[health]\ntcp = \"127.0.0.1:8080\"\n[[sockets]]\nname = \"http\"\nlisten = \"0.0.0.0:8080\"", "health.tcp", "port 8080 is the shared socket \"http\""),
    ("[health]\nhttp = \"http://127.0.0.1/\"\n[[sockets]]\nname = \"http\"\nlisten = \"0.0.0.0:80\"", "health.http", "port 80 is the shared socket"),
    // rollout
    ("[rollout]\nmax_surge = 0", "rollout", "max_surge and max_unavailable are both 0"),
    ("[rollout]\nmax_surge = -1", "rollout.max_surge", "out of range (0..=1000)"),
    ("[rollout]\nmax_unavailable = 1001", "rollout.max_unavailable", "out of range"),
    ("[rollout]\nmin_healthy = \"10s\"\nhealthy_deadline = \"5s\"", "rollout.healthy_deadline", "\"5s\" is shorter than rollout.min_healthy (10s)"),
    ("[rollout]\nmin_healthy = \"2h\"", "rollout.min_healthy", "longer than 1h"),
    ("[rollout]\nstart_cpu = 0", "rollout.start_cpu", "0 is out of range (0.01..=1024 cores)"),
    ("[rollout]\nstart_cpu = -0.5", "rollout.start_cpu", "out of range"),
    ("[rollout]\nstart_cpu = 2000", "rollout.start_cpu", "out of range"),
    ("[rollout]\nstart_cpu = \"half\"", "rollout.start_cpu", "expected a number, found a string"),
    ("[rollout]\nstart_cpu = nan", "rollout.start_cpu", "NaN is not a finite number"),
    // stop and logs
    ("[stop]\nsignal = \"SIGSTOP\"", "stop.signal", "would pause the instance"),
    ("[stop]\nsignal = \"SIGFOO\"", "stop.signal", "\"SIGFOO\" is not a signal name"),
    ("[stop]\nsignal = \"15\"", "stop.signal", "is not a signal name"),
    ("[stop]\ngrace = \"2h\"", "stop.grace", "longer than 1h"),
    ("[logs]\nmax_files = 0", "logs.max_files", "0 is out of range (1..=100)"),
    // artifact and image
    ("[artifact]\nurl = \"https://repo.example/web.tar.gz\"\nmount = \"/app\"", "artifact.sha256", "required for an http(s):// url"),
    ("[artifact]\nurl = \"http://repo.example/web.tar\"\nsha256 = \"0000000000000000000000000000000000000000000000000000000000000001\"\nmount = \"/app\"", "artifact.url", "only allowed to a loopback host"),
    ("[artifact]\nurl = \"/srv/web.tar\"\nmount = \"/proc/x\"", "artifact.mount", "/proc"),
    ("[artifact]\nurl = \"/srv/web.bin\"\nmount = \"/app\"", "artifact.format", "cannot be told from the name"),
    ("[artifact]\nurl = \"/srv/web.tar\"\nmount = \"/app\"\n[image]\nurl = \"/srv/img\"\ndigest = \"sha256:0000000000000000000000000000000000000000000000000000000000000001\"", "image", "cannot both be given"),
    ("[image]\nurl = \"/srv/img\"", "image.digest", "required"),
    ("[image]\nurl = \"/srv/img\"\ndigest = \"sha512:00\"", "image.digest", "only sha256 digests"),
    ("[image]\nurl = \"/srv/img\"\ndigest = \"sha256:0000000000000000000000000000000000000000000000000000000000000001\"\n[isolation]\nnamespaces = [\"pid\"]", "image", "add \"mount\" to isolation.namespaces"),
    ("[artifact]\nurl = \"/srv/web.tar\"\nmount = \"/app\"\n[isolation]\nnamespaces = [\"pid\"]", "artifact", "add \"mount\" to isolation.namespaces"),
    ("[image]\nurl = \"/srv/img\"\ndigest = \"sha256:0000000000000000000000000000000000000000000000000000000000000001\"\npersist = true\n[isolation]\nreadonly_root = true", "isolation.readonly_root", "nothing for image.persist to keep"),
    ("command = [\"../bin/app\"]\n[artifact]\nurl = \"/srv/web.tar\"\nmount = \"/app\"", "command[0]", "leaves artifact.mount"),
    ("command = [\"bin/app\"]", "command[0]", "is a relative path"),
    ("[artifact]\nurl = \"/srv/web.tar\"\nmount = \"/app\"\nkind = 1", "artifact.kind", "unknown"),
];

fn with_minimal(extra: &str) -> String {
    let mut base = MINIMAL.to_owned();
    if extra.starts_with("name =") {
        base = base.replace("name = \"web\"\n", "");
    }
    if extra.starts_with("command =") {
        base = base.replace("command = [\"/bin/app\"]\n", "");
    }
    match extra.find("\n[") {
        // Top-level lines first, then the minimal keys, then the tables.
        _ if extra.starts_with('[') => format!("{base}{extra}\n"),
        Some(at) => format!("{}\n{base}{}\n", &extra[..at], &extra[at + 1..]),
        None => format!("{extra}\n{base}"),
    }
}

#[test]
fn invalid_specs_name_field_and_reason() {
    assert!(INVALID.len() >= 30);
    for (extra, field, fragment) in INVALID {
        let text = with_minimal(extra);
        let error = refused(&text);
        assert!(
            error
                .errors
                .iter()
                .any(|e| e.field == *field && e.message.contains(fragment)),
            "expected `{field}: ...{fragment}...`, got:\n{error}\n--- spec:\n{text}"
        );
    }
}

#[test]
fn missing_required_fields() {
    let error = refused("replicas = 1\n");
    assert_eq!(
        error.to_string(),
        "name: required\ncommand: required",
        "{error:?}"
    );
    assert_eq!(refused("").errors.len(), 2);
}

#[test]
fn a_field_of_the_wrong_type_is_not_also_missing() {
    let error = refused("name = 5\ncommand = [\"/bin/app\", 7]\n");
    assert_eq!(
        error.to_string(),
        "name: expected a string, found an integer\ncommand[1]: expected a string, found an integer"
    );
}

#[test]
fn one_spec_reports_every_error() {
    let text = r#"
name = "Bad Name"
command = []
replicas = 1001
colour = "blue"

[env]
CORRAL_X = "1"

[resources]
memory = "12XB"
cpu = "lots"

[isolation]
namespaces = ["pid"]
hostname = "h-{index}"

[restart]
backoff = "10 parsecs"

[health]
htpp = "x"
tcp = "127.0.0.1:{port.nope}"

[rollout]
max_surge = 0
max_unavailable = 0

[logs]
max_files = 0
"#;
    let error = refused(text);
    let mut fields: Vec<&str> = error.errors.iter().map(|e| e.field.as_str()).collect();
    fields.sort_unstable();
    assert_eq!(
        fields,
        [
            "colour",
            "command",
            "env.CORRAL_X",
            "health.htpp",
            "health.tcp",
            "isolation.hostname",
            "isolation.namespaces",
            "logs.max_files",
            "name",
            "replicas",
            "resources.cpu",
            "resources.memory",
            "restart.backoff",
            "rollout",
        ],
        "{error}"
    );
    assert_eq!(error.to_string().lines().count(), 14);
}

#[test]
fn read_toml_reports_reading_problems_only() {
    let raw = read_toml(EXAMPLE).expect("example reads");
    assert_eq!(raw.replicas, Some(3));
    assert_eq!(
        raw.resources.and_then(|r| r.memory),
        Some(RawSize::Text("256MiB".into()))
    );
    // Reading does not check values.
    let raw = read_toml("name = \"Bad Name\"\nreplicas = -4\n").expect("reads");
    assert_eq!(raw.name.as_deref(), Some("Bad Name"));
    let error = read_toml("replicas = \"x\"\n[stop]\nsignl = \"TERM\"\n").expect_err("refused");
    assert_eq!(
        error.to_string(),
        "replicas: expected an integer, found a string\nstop.signl: unknown field (expected one of signal, grace)"
    );
    let error = read_toml("name = \"a\"\nname = \"b\"\n").expect_err("refused");
    assert_eq!(error.errors.len(), 1);
    assert_eq!(error.errors[0].field, SYNTAX_FIELD);
    assert!(
        error.errors[0].message.starts_with("line 2, column 1"),
        "{error}"
    );
}

#[test]
fn validate_checks_raw_specs_from_any_source() {
    let raw = RawSpec {
        name: Some("web".into()),
        command: Some(vec!["/bin/app".into()]),
        resources: Some(RawResources {
            memory: Some(RawSize::Bytes(-5)),
            ..RawResources::default()
        }),
        ports: Some(BTreeMap::from([(
            "admin".to_owned(),
            RawPort::Number(70000),
        )])),
        logs: Some(RawLogs {
            max_size: Some(RawSize::Bytes(4096)),
            max_files: Some(1),
        }),
        ..RawSpec::default()
    };
    let error = raw.validate().expect_err("refused");
    assert_eq!(
        error.to_string(),
        "resources.memory: -5 is not a size (it is negative)\nports.admin: 70000 is not a port (use \"auto\" or 1..=65535)"
    );
    assert!(error.has_field("ports.admin"));
}

#[test]
fn long_values_are_cut_in_messages() {
    let long = "x".repeat(10_000);
    let error = refused(&with_minimal(&format!("workdir = \"{long}\"")));
    let message = &error.errors[0].message;
    assert!(message.len() < 200, "{message}");
    assert!(message.contains("(10000 bytes)"), "{message}");
}

#[test]
fn command_limits() {
    let many = vec!["\"a\""; 4096].join(", ");
    let error = refused(&format!(
        "name = \"web\"\ncommand = [\"/bin/app\", {many}]\n"
    ));
    assert!(error.has_field("command"), "{error}");
    assert!(
        error.errors[0].message.contains("4097 arguments"),
        "{error}"
    );
    let big = "a".repeat(140_000);
    let error = refused(&format!(
        "name = \"web\"\ncommand = [\"/bin/app\", \"{big}\"]\n"
    ));
    assert!(
        error.errors[0].message.contains("at most 131072"),
        "{error}"
    );
}

#[test]
fn env_limits() {
    let entries: Vec<String> = (0..1025).map(|i| format!("V{i} = \"x\"")).collect();
    let error = refused(&format!("{MINIMAL}[env]\n{}\n", entries.join("\n")));
    assert_eq!(error.to_string(), "env: has 1025 entries (at most 1024)");
    let error = refused(&format!(
        "{MINIMAL}[env]\nBIG = \"{}\"\n",
        "x".repeat(32 * 1024 + 1)
    ));
    assert_eq!(
        error.to_string(),
        "env.BIG: the value is 32769 bytes long (at most 32768)"
    );
}

// ------------------------------------------------------------------------------------------
// Round trips.

const ROUND_TRIP: &[&str] = &[
    MINIMAL,
    r#"
name = "web"
command = ["bin/server", "--port", "8080"]
[artifact]
url = "http://127.0.0.1:8000/web-1.4.2.tgz"
sha256 = "0000000000000000000000000000000000000000000000000000000000000001"
mount = "/app"
"#,
    r#"
name = "img"
[image]
url = "file:///srv/images/web.oci.tar"
digest = "sha256:0000000000000000000000000000000000000000000000000000000000000001"
persist = true
"#,
    EXAMPLE,
    r#"
name = "worker"
command = ["worker", "--queue", "jobs"]
env = { A = "1", B = "" }
workdir = "/var/lib/worker"
user = "1000:1000"
replicas = 4
[resources]
cpu = 1.25
memory = 1048577
pids = 4
[isolation]
namespaces = ["net", "ipc", "uts"]
hostname = "{instance}.workers"
[ports]
metrics = 9100
admin = "auto"
[[sockets]]
name = "b"
listen = "unix:/run/worker.sock"
[[sockets]]
name = "a"
listen = "localhost:7000"
[[sockets]]
name = "c"
listen = "[::]:7001"
[restart]
policy = "on-failure"
backoff = "1500ms"
backoff_max = "1h"
[health]
exec = ["/bin/check", "{port.admin}"]
interval = "1m 30s"
timeout = "1m"
start_period = "24h"
failure_threshold = 100
success_threshold = 100
restart_on_failure = false
[rollout]
max_surge = 0
max_unavailable = 1000
min_healthy = "0s"
healthy_deadline = "1s"
auto_rollback = false
[stop]
signal = "int"
grace = "0s"
[logs]
max_size = 4097
max_files = 100
"#,
    r#"
name = "h"
command = ["/h"]
user = "nobody"
workdir = "/srv/h"
[resources]
nofile = 4096
[isolation]
namespaces = ["mount", "net"]
private_tmp = false
readonly_root = true
capabilities = ["net_bind_service", "CAP_NET_RAW"]
"#,
    r#"
name = "e"
command = ["/e"]
[isolation]
capabilities = []
"#,
    r#"
name = "n"
command = ["/n"]
user = "7"
[isolation]
namespaces = []
[health]
notify = true
[stop]
signal = "kill"
"#,
    r#"
name = "g"
command = ["/g"]
[isolation]
namespaces = ["mount"]
private_tmp = false
[health]
grpc = "127.0.0.1:{port.grpc}"
[ports]
grpc = "auto"
[logs]
max_size = "1TiB"
"#,
];

#[test]
fn to_raw_validates_back_to_the_same_spec() {
    for text in ROUND_TRIP {
        let spec = parse(text);
        let raw = spec.to_raw();
        assert_eq!(raw.validate().as_ref(), Ok(&spec), "{text}");
        // Canonical: every default is written out.
        let isolation = raw.isolation.as_ref().expect("isolation");
        assert!(
            isolation.namespaces.is_some()
                && isolation.private_tmp.is_some()
                && isolation.readonly_root.is_some()
        );
        let restart = raw.restart.as_ref().expect("restart");
        assert!(restart.policy.is_some() && restart.backoff.is_some());
        assert!(
            raw.rollout
                .as_ref()
                .and_then(|r| r.healthy_deadline.as_ref())
                .is_some()
        );
        assert!(raw.stop.as_ref().and_then(|s| s.signal.as_ref()).is_some());
        assert!(
            raw.logs
                .as_ref()
                .and_then(|l| l.max_size.as_ref())
                .is_some()
        );
    }
}

#[test]
fn sizes() {
    let ok: &[(&str, u64)] = &[
        ("0", 0),
        ("1", 1),
        ("0B", 0),
        ("1B", 1),
        ("1KiB", 1024),
        ("256MiB", 256 << 20),
        ("3GiB", 3 << 30),
        ("1TiB", 1 << 40),
        ("16777215TiB", 16_777_215 << 40),
        ("18446744073709551615", u64::MAX),
        ("007KiB", 7 << 10),
    ];
    for (text, bytes) in ok {
        assert_eq!(parse_size(text), Ok(*bytes), "{text}");
    }
    let bad: &[(&str, &str)] = &[
        ("", "is not a size"),
        ("KiB", "is not a size"),
        ("1 KiB", "is not a size"),
        ("1kib", "is not a size"),
        ("1KB", "is not a size"),
        ("1MB", "is not a size"),
        ("+1", "is not a size"),
        ("-1", "is not a size"),
        ("1.5GiB", "is not a size"),
        ("1e3", "is not a size"),
        (" 1", "is not a size"),
        ("18446744073709551616", "is too large"),
        ("16777216TiB", "is too large"),
        ("99999999999999999999999999B", "is too large"),
    ];
    for (text, fragment) in bad {
        let error = parse_size(text).expect_err(text);
        assert!(error.contains(fragment), "{text}: {error}");
    }
    let formats: &[(u64, &str)] = &[
        (0, "0"),
        (1, "1"),
        (1023, "1023"),
        (1024, "1KiB"),
        (1536, "1536"),
        (10 << 20, "10MiB"),
        (3 << 30, "3GiB"),
        (5 << 40, "5TiB"),
        (u64::MAX, "18446744073709551615"),
    ];
    for (bytes, text) in formats {
        assert_eq!(format_size(*bytes), *text);
    }
    for bytes in [
        0,
        1,
        4095,
        4096,
        1 << 20,
        (1 << 20) + 1,
        7 << 40,
        u64::MAX,
        u64::MAX - 1,
    ] {
        assert_eq!(parse_size(&format_size(bytes)), Ok(bytes), "{bytes}");
    }
}

#[test]
fn durations() {
    let ok: &[(&str, Duration)] = &[
        ("100ms", Duration::from_millis(100)),
        ("10s", Duration::from_secs(10)),
        ("1m 30s", Duration::from_secs(90)),
        ("2h", Duration::from_secs(7200)),
        ("0s", Duration::ZERO),
    ];
    for (text, d) in ok {
        assert_eq!(parse_duration(text), Ok(*d), "{text}");
    }
    for (text, fragment) in [
        ("10 parsecs", "unknown unit \"parsecs\""),
        ("-1s", "negative"),
        (" -1s", "negative"),
        ("10", "a unit is needed"),
        ("", "is not a duration"),
        ("1s!", "is not a duration"),
        ("99999999999999999999h", "is not a duration"),
    ] {
        let error = parse_duration(text).expect_err(text);
        assert!(error.contains(fragment), "{text}: {error}");
    }
    for d in [
        Duration::ZERO,
        Duration::from_nanos(1),
        Duration::from_millis(100),
        Duration::from_millis(1500),
        Duration::from_secs(90),
        Duration::from_secs(3600),
        Duration::from_secs(36 * 3600),
        Duration::from_secs(400 * 24 * 3600),
        Duration::new(12_345, 678_901_234),
    ] {
        assert_eq!(parse_duration(&format_duration(d)), Ok(d), "{d:?}");
    }
    assert_eq!(format_duration(Duration::from_secs(90)), "1m 30s");
}

#[test]
fn signals() {
    for name in ["SIGTERM", "TERM", "sigterm", "Term"] {
        assert_eq!(signal_by_name(name), Some((15, "SIGTERM")), "{name}");
    }
    assert_eq!(signal_by_name("KILL"), Some((9, "SIGKILL")));
    assert_eq!(signal_by_name("hup"), Some((1, "SIGHUP")));
    assert_eq!(signal_by_name("SIGUSR1"), Some((10, "SIGUSR1")));
    assert_eq!(signal_by_name("WINCH"), Some((28, "SIGWINCH")));
    assert_eq!(signal_by_name("PWR"), Some((30, "SIGPWR")));
    for bad in ["", "SIG", "15", "SIGFOO", "SIGSIGTERM", "TERM ", "SIGRTMIN"] {
        assert_eq!(signal_by_name(bad), None, "{bad}");
    }
}

#[test]
fn names_and_ids() {
    for good in ["a", "0", "web", "web-2", "a-", &"a".repeat(63)] {
        assert!(valid_service_name(good), "{good}");
    }
    for bad in [
        "",
        "-a",
        "Web",
        "a_b",
        "a.b",
        "a/b",
        "..",
        "é",
        &"a".repeat(64),
    ] {
        assert!(!valid_service_name(bad), "{bad}");
    }
    assert_eq!(instance_id("web", 2), "web-2");
}

// ------------------------------------------------------------------------------------------
// Changes between revisions.

fn changed(edit: impl FnOnce(&mut ServiceSpec)) -> (ServiceSpec, ServiceSpec) {
    let old = parse(EXAMPLE);
    let mut new = old.clone();
    edit(&mut new);
    (old, new)
}

#[test]
fn changes_between_specs() {
    type Case = (fn(&mut ServiceSpec), Vec<&'static str>);
    let cases: Vec<Case> = vec![
        (|_| {}, vec![]),
        (
            |s| s.resources.memory = Some(128 << 20),
            vec!["resources.memory: 256MiB -> 128MiB"],
        ),
        (
            |s| s.resources.cpu = None,
            vec!["resources.cpu: 0.5 -> unlimited"],
        ),
        (
            |s| s.command = vec!["/bin/b".into()],
            vec![r#"command: ["/usr/bin/python3", "-m", "http.server"] -> ["/bin/b"]"#],
        ),
        (
            |s| {
                s.env.insert("FOO".into(), "secret".into());
                s.env.insert("LOG_LEVEL".into(), "debug".into());
            },
            vec!["env.FOO: added", "env.LOG_LEVEL: changed"],
        ),
        (|s| s.env.clear(), vec!["env.LOG_LEVEL: removed"]),
        (|s| s.replicas = 5, vec!["replicas: 3 -> 5"]),
        (|s| s.health = None, vec!["health: removed"]),
        (
            |s| {
                if let Some(h) = &mut s.health {
                    h.probe = Some(Probe::Tcp("127.0.0.1:{port.admin}".into()));
                    h.failure_threshold = 5;
                }
            },
            vec![
                "health.tcp: added (\"127.0.0.1:{port.admin}\")",
                "health.failure_threshold: 3 -> 5",
                "health.http: removed (\"http://127.0.0.1:{port.admin}/healthz\")",
            ],
        ),
        (
            |s| {
                s.ports.insert("metrics".into(), PortSpec::Auto);
                s.sockets.clear();
                s.stop.grace = Duration::from_secs(90);
                s.user = None;
            },
            vec![
                "user: \"nobody\" -> the agent's user",
                "ports.metrics: added (auto)",
                "sockets[0]: removed (\"http\" 127.0.0.1:8080)",
                "stop.grace: 10s -> 1m 30s",
            ],
        ),
        (
            |s| {
                s.resources.nofile = Some(4096);
                s.isolation.capabilities = Some(vec![Capability::CAP_NET_BIND_SERVICE]);
                s.isolation.readonly_root = true;
            },
            vec![
                "resources.nofile: the agent's -> 4096",
                "isolation.capabilities: the default -> [\"CAP_NET_BIND_SERVICE\"]",
                "isolation.readonly_root: false -> true",
            ],
        ),
        (
            |s| s.isolation.capabilities = Some(Vec::new()),
            vec!["isolation.capabilities: the default -> []"],
        ),
    ];
    for (edit, expected) in cases {
        let (old, new) = changed(edit);
        assert_eq!(new.changes_from(&old), expected);
        // Anything but `replicas` replaces instances: a rolling update.
        let scale_only = expected.iter().all(|line| line.starts_with("replicas:"));
        assert_eq!(new.same_except_replicas(&old), scale_only, "{expected:?}");
    }
    // Adding a whole section is one line.
    let (old, new) = changed(|s| s.health = None);
    assert_eq!(old.changes_from(&new), ["health: added"]);
}

#[test]
fn env_values_never_appear_in_changes() {
    let (old, new) = changed(|s| {
        s.env.insert("LOG_LEVEL".into(), "hunter2".into());
        s.env.insert("TOKEN".into(), "hunter3".into());
    });
    let lines = new.changes_from(&old).join("\n") + &old.changes_from(&new).join("\n");
    assert!(!lines.contains("hunter"), "{lines}");
}

#[test]
fn same_except_replicas() {
    let (old, new) = changed(|s| s.replicas = 10);
    assert!(new.same_except_replicas(&old));
    assert!(old.same_except_replicas(&old));
    let (old, new) = changed(|s| {
        s.replicas = 10;
        s.logs.max_files = 6;
    });
    assert!(!new.same_except_replicas(&old));
}

#[test]
fn hostnames() {
    let spec = parse(EXAMPLE);
    assert_eq!(spec.hostname_for(0).as_deref(), Some("web-0"));
    assert_eq!(spec.hostname_for(999).as_deref(), Some("web-999"));
    let spec = parse(&format!(
        "{MINIMAL}[isolation]\nhostname = \"{{instance}}.i{{index}}\"\n"
    ));
    assert_eq!(spec.hostname_for(4).as_deref(), Some("web-4.i4"));
    let spec = parse(&format!(
        "{MINIMAL}[isolation]\nnamespaces = [\"pid\", \"mount\"]\n"
    ));
    assert_eq!(spec.hostname_for(4), None);
}

/// The longest valid name (63 characters) is accepted with the default hostname: the service
/// name inside `{instance}` is shortened so each hostname fits the kernel's 64 bytes and keeps
/// its index; "{instance}" written out is the default itself.
#[test]
fn longest_names_get_hostnames_that_fit() {
    let name = "a".repeat(63);
    for text in [
        format!("name = \"{name}\"\ncommand = [\"/bin/true\"]\n"),
        format!(
            "name = \"{name}\"\ncommand = [\"/bin/true\"]\n[isolation]\nhostname = \"{{instance}}\"\n"
        ),
    ] {
        let spec = parse(&text);
        assert_eq!(spec.isolation.hostname, None, "{text}");
        assert_eq!(spec.hostname_for(0), Some(format!("{}-0", "a".repeat(62))));
        let last = spec.hostname_for(999).expect("uts is on by default");
        assert_eq!(last.len(), 64);
        assert_eq!(last, format!("{}-999", "a".repeat(60)));
    }
}

// ------------------------------------------------------------------------------------------
// Robustness.

/// Checks one input: refusals explain themselves, acceptances round-trip.
fn check_any(text: &str) {
    match parse_toml(text) {
        Ok(spec) => assert_eq!(spec.to_raw().validate().as_ref(), Ok(&spec), "{text}"),
        Err(error) => {
            assert!(!error.errors.is_empty(), "{text}");
            assert!(
                error
                    .errors
                    .iter()
                    .all(|e| !e.field.is_empty() && !e.message.is_empty()),
                "{error:?}"
            );
        }
    }
}

#[test]
fn no_input_panics() {
    // Every prefix.
    for (at, _) in EXAMPLE.char_indices() {
        check_any(&EXAMPLE[..at]);
    }
    // Every line removed, or doubled.
    let lines: Vec<&str> = EXAMPLE.lines().collect();
    for i in 0..lines.len() {
        let mut removed = lines.clone();
        removed.remove(i);
        check_any(&removed.join("\n"));
        let mut doubled = lines.clone();
        doubled.insert(i, lines[i]);
        check_any(&doubled.join("\n"));
    }
    // Every character replaced by a few troublemakers.
    for (at, c) in EXAMPLE.char_indices() {
        for with in ["", "\"", "[", "0", "-", "{", "é", "\\u0000"] {
            let mut text = String::with_capacity(EXAMPLE.len() + 8);
            text.push_str(&EXAMPLE[..at]);
            text.push_str(with);
            text.push_str(&EXAMPLE[at + c.len_utf8()..]);
            check_any(&text);
        }
    }
    // Extreme values.
    for extra in [
        "replicas = 9223372036854775807",
        "replicas = -9223372036854775808",
        "[resources]\nmemory = -9223372036854775808",
        "[resources]\ncpu = 1e308",
        "[resources]\npids = 9223372036854775807",
        "[resources]\nnofile = -9223372036854775808",
        "[isolation]\ncapabilities = [\"é\", \"CAP_É\", \"\\u0000\"]",
        "[ports]\na = -9223372036854775808",
        "[health]\nexec = [\"{port.\"]",
        "[health]\ntcp = \"[::1]:{port.\"",
        "[isolation]\nhostname = \"{\"",
        "[isolation]\nhostname = \"}\"",
        "[[sockets]]\nname = \"é\"\nlisten = \"unix:\"",
    ] {
        check_any(&with_minimal(extra));
    }
}

/// The specs in `examples/` are what newcomers apply first: they must stay valid.
#[test]
fn examples_are_valid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("examples/") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            let text = std::fs::read_to_string(&path).expect("read");
            if let Err(e) = parse_toml(&text) {
                panic!("{}: {e}", path.display());
            }
            n += 1;
        }
    }
    assert!(n >= 3, "examples found: {n}");
}

#[test]
fn artifact_and_image_sections_become_the_package() {
    use super::artifact::{ArchiveFormat, Digest, Package, Source};
    let hex = "ab".repeat(32);
    let spec = parse(&format!(
        "name = \"web\"\ncommand = [\"bin/server\"]\n[artifact]\nurl = \"http://127.0.0.1:8000/web-1.4.2.tgz\"\nsha256 = \"sha256:{hex}\"\nmount = \"/app\"\n"
    ));
    let Some(Package::Artifact(a)) = &spec.package else {
        panic!("no artifact: {spec:?}");
    };
    assert_eq!(a.format, ArchiveFormat::TarGz, "inferred from .tgz");
    assert_eq!(a.sha256, Digest::from_hex(&hex));
    assert_eq!(a.mount, std::path::Path::new("/app"));
    assert_eq!(spec.command, ["bin/server"]);

    // An image's config supplies the command when the spec has none.
    let spec = parse(&format!(
        "name = \"img\"\n[image]\nurl = \"/srv/web.oci\"\ndigest = \"sha256:{hex}\"\n"
    ));
    let Some(Package::Image(i)) = &spec.package else {
        panic!("no image: {spec:?}");
    };
    assert!(spec.command.is_empty());
    assert_eq!(i.source, Source::File("/srv/web.oci".into()));
    assert!(!i.persist);
    // Without [image], the command is still required.
    assert!(refused("name = \"web\"\n").has_field("command"));
}

#[test]
fn a_new_package_is_a_new_revision_named_in_the_changes() {
    use super::artifact::{Digest, Package, Source};
    let hex = "ab".repeat(32);
    let old = parse(&format!(
        "name = \"web\"\ncommand = [\"bin/server\"]\n[artifact]\nurl = \"/srv/web-1.tar\"\nsha256 = \"{hex}\"\nmount = \"/app\"\n"
    ));
    let mut new = old.clone();
    if let Some(Package::Artifact(a)) = &mut new.package {
        a.source = Source::File("/srv/web-2.tar".into());
        a.sha256 = Digest::from_hex(&"cd".repeat(32));
    }
    assert!(!new.same_except_replicas(&old));
    assert_eq!(
        new.changes_from(&old),
        [
            "artifact.url: \"/srv/web-1.tar\" -> \"/srv/web-2.tar\"".to_owned(),
            format!("artifact.sha256: {hex} -> {}", "cd".repeat(32)),
        ]
    );
    let mut none = old.clone();
    none.package = None;
    assert!(
        none.changes_from(&old)
            .iter()
            .any(|l| l.starts_with("artifact.url: removed")),
        "{:?}",
        none.changes_from(&old)
    );
}

#[test]
fn a_job_spec_has_no_replicas_retries_on_failure_and_round_trips() {
    let spec = parse(
        "name = \"report\"\nkind = \"job\"\ncommand = [\"/app/report\"]\n[schedule]\ncron = \"*/5 * * * * *\"\ntimezone = \"Europe/Berlin\"\nconcurrency = \"replace\"\ncatch_up = \"1h\"\n[job]\ntimeout = \"2m\"\nretries = 2\nparallelism = 3\nhistory = 5\n",
    );
    assert_eq!(spec.replicas, 0);
    assert_eq!(spec.restart.policy, RestartPolicy::OnFailure);
    let job = spec.job.as_ref().expect("a job");
    assert_eq!((job.retries, job.parallelism, job.history), (2, 3, 5));
    assert_eq!(job.timeout, Some(Duration::from_secs(120)));
    let schedule = job.schedule.as_ref().expect("a schedule");
    assert_eq!(schedule.timezone.name(), "Europe/Berlin");
    assert_eq!(spec.to_raw().validate().as_ref(), Ok(&spec));
    assert!(parse(MINIMAL).job.is_none());
}

#[test]
fn a_job_with_service_sections_is_refused_naming_them() {
    let text = "name = \"report\"\nkind = \"job\"\ncommand = [\"/app/report\"]\nreplicas = 2\n[[sockets]]\nname = \"http\"\nlisten = \"127.0.0.1:8080\"\n[schedule]\ncron = \"61 * * * *\"\ntimezone = \"Mars/Olympus\"\n[job]\ntimeout = \"0s\"\n";
    let err = parse_toml(text).expect_err("refused");
    let fields: Vec<&str> = err.errors.iter().map(|e| e.field.as_str()).collect();
    for field in [
        "replicas",
        "sockets",
        "schedule.cron",
        "schedule.timezone",
        "job.timeout",
    ] {
        assert!(fields.contains(&field), "{field} not in {fields:?}");
    }
}

const SCALED: &str = "name = \"web\"\ncommand = [\"/bin/app\"]\n[[sockets]]\nname = \"http\"\nlisten = \"127.0.0.1:8080\"\n";
const SCALED_3: &str = "name = \"web\"\ncommand = [\"/bin/app\"]\nreplicas = 3\n[[sockets]]\nname = \"http\"\nlisten = \"127.0.0.1:8080\"\n";

#[test]
fn scale_defaults_and_round_trip() {
    let spec = parse(&format!(
        "{SCALED}[scale]\nmax = 8\ntarget_connections = 20\n"
    ));
    let scale = spec.scale.expect("[scale]");
    assert_eq!(spec.replicas, 0, "replicas starts at min");
    assert_eq!(scale.min, 0);
    assert_eq!(scale.max, 8);
    assert_eq!(scale.target_connections, Some(20));
    assert_eq!(scale.target_cpu, None);
    assert_eq!(scale.idle_after, Duration::from_secs(300));
    assert_eq!(scale.scale_down_delay, Duration::from_secs(30));
    assert_eq!(spec.to_raw().validate().expect("canonical form"), spec);

    let spec = parse(&format!(
        "{SCALED_3}[scale]\nmin = 1\nmax = 4\ntarget_cpu = 0.7\nidle_after = \"2s\"\nscale_down_delay = \"500ms\"\n"
    ));
    assert_eq!(spec.replicas, 3);
    let scale = spec.scale.expect("[scale]");
    assert_eq!(scale.target_cpu, Some(0.7));
    assert_eq!(scale.scale_down_delay, Duration::from_millis(500));
    assert_eq!(spec.to_raw().validate().expect("canonical form"), spec);
}

#[test]
fn scale_bad_input_is_refused_naming_the_field() {
    let cases: &[(&str, &str, &str)] = &[
        ("", "[scale]\nmax = 2\ntarget_connections = 5\n", "scale"),
        (SCALED, "[scale]\ntarget_connections = 5\n", "scale.max"),
        (
            SCALED,
            "[scale]\nmax = 0\ntarget_connections = 5\n",
            "scale.max",
        ),
        (
            SCALED,
            "[scale]\nmin = 3\nmax = 2\ntarget_connections = 5\n",
            "scale.min",
        ),
        (
            SCALED,
            "[scale]\nmin = -1\nmax = 2\ntarget_connections = 5\n",
            "scale.min",
        ),
        (SCALED, "[scale]\nmax = 2\n", "scale"),
        (
            SCALED,
            "[scale]\nmax = 2\ntarget_connections = 0\n",
            "scale.target_connections",
        ),
        (
            SCALED,
            "[scale]\nmax = 2\ntarget_cpu = 0.0\n",
            "scale.target_cpu",
        ),
        (
            SCALED,
            "[scale]\nmax = 2\ntarget_cpu = 1.5\n",
            "scale.target_cpu",
        ),
        (
            SCALED,
            "[scale]\nmax = 2\ntarget_cpu = nan\n",
            "scale.target_cpu",
        ),
        (
            SCALED,
            "[scale]\nmax = 2\ntarget_connections = 5\nidle_after = \"0s\"\n",
            "scale.idle_after",
        ),
        (
            SCALED,
            "[scale]\nmax = 2\ntarget_connections = 5\nscale_down_delay = \"soon\"\n",
            "scale.scale_down_delay",
        ),
        (
            SCALED_3,
            "[scale]\nmax = 2\ntarget_connections = 5\n",
            "replicas",
        ),
        (
            SCALED,
            "[scale]\nmax = 2\ntarget_connections = 5\nburst = 3\n",
            "scale.burst",
        ),
    ];
    for (base, extra, field) in cases {
        let text = format!("{}{}", if base.is_empty() { MINIMAL } else { base }, extra);
        let e = refused(&text);
        assert!(
            e.errors.iter().any(|f| f.field == *field),
            "{extra:?}: expected an error on {field}, got {e}"
        );
    }
}
