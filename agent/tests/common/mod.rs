//! Shared by the property tests: their configuration, generators of hostile input built from
//! the real spec keys (TOML text and `corral.v1.ServiceSpec` messages), the checks every
//! refusal must pass, and the API served in-process over the supervisor's fakes.
//!
//! Each test binary uses only part of this module.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use corral_agent::api::AgentService;
use corral_agent::cgroups::CgroupBackend;
use corral_agent::cgroups::recording::RecordingCgroups;
use corral_agent::events::EventLog;
use corral_agent::host::Host;
use corral_agent::runtime::fake::FakeRuntime;
use corral_agent::spec::{FieldError, Namespace, SYNTAX_FIELD, SpecError};
use corral_agent::store::MemStore;
use corral_agent::supervisor::{Deps, Driver};
use corral_proto::v1 as pb;
use proptest::collection::{hash_map, vec};
use proptest::option::weighted;
use proptest::prelude::*;
use proptest::test_runner::Config;

/// Cases per property: `PROPTEST_CASES` when set, else `default`.
pub fn config(default: u32) -> Config {
    let mut config = Config::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = default;
    }
    config
}

/// The top-level keys of a spec file: every error must be about one of them (or the syntax,
/// or be an unknown key named as such).
pub use corral_agent::spec::TOP_KEYS;

/// Why `e` does not name a field of the spec, or `None` when it does.
fn unnamed(e: &FieldError) -> Option<String> {
    if e.message.trim().is_empty() {
        return Some(format!("empty message for {:?}", e.field));
    }
    if e.field == SYNTAX_FIELD {
        return None;
    }
    let first = e.field.split(['.', '[']).next().unwrap_or_default();
    if TOP_KEYS.contains(&first) || e.message.starts_with("unknown field") {
        None
    } else {
        Some(format!(
            "{:?} is not a field of a spec: {}",
            e.field, e.message
        ))
    }
}

/// A refusal explains itself: at least one error, each naming a field of the spec and saying
/// something, and the text sent to clients (`Display`) carries every one of them.
pub fn check_refusal(e: &SpecError) -> Result<(), TestCaseError> {
    prop_assert!(!e.errors.is_empty(), "a refusal without errors");
    for error in &e.errors {
        if let Some(why) = unnamed(error) {
            return Err(TestCaseError::fail(why));
        }
    }
    let text = e.to_string();
    for error in &e.errors {
        prop_assert!(
            text.contains(&format!("{}: ", error.field)),
            "{:?} missing from {text:?}",
            error.field
        );
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------
// Value pools: for each field, values a careful writer uses, and values a careless or hostile
// one does. Generators mix them by a hostility (the chance of a bad value per field), so that
// both every rule and the acceptance path are reached.

/// A field's values: valid ones, and wrong ones.
#[derive(Debug, Clone, Copy)]
pub struct Pool {
    pub ok: &'static [&'static str],
    pub bad: &'static [&'static str],
}

pub const NAMES: Pool = Pool {
    ok: &["web", "a", "0", "x-1"],
    bad: &[
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        "web-",
        "-web",
        "Web",
        "web_1",
        "a/b",
        "../x",
        "/",
        "",
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        "\u{e9}t\u{e9}",
        "web\0",
        " web",
    ],
};
pub const PROGRAMS: Pool = Pool {
    ok: &[
        "/bin/true",
        "true",
        "/usr/bin/env",
        "--flag",
        "{port.admin}",
    ],
    bad: &["bin/true", "./x", "", "a\0b"],
};
pub const PATHS: Pool = Pool {
    ok: &["/", "/srv/web", "/srv/web/", "//", "/../.."],
    bad: &["/tmp", "/tmp/x", "relative", "", "/a\0b", "./"],
};
pub const USERS: Pool = Pool {
    ok: &[
        "nobody",
        "root",
        "0",
        "65534",
        "65534:65534",
        "0:0",
        "4294967294:1",
        "nobody$",
    ],
    bad: &[
        "4294967295",
        "1:4294967295",
        "a:b",
        ":",
        "1:",
        "Nobody",
        "",
        "-x",
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        "99999999999999999999",
    ],
};
pub const NAMESPACES: Pool = Pool {
    ok: &["pid", "mount", "uts", "ipc", "net", "cgroup"],
    bad: &["user", "PID", ""],
};
pub const CAPABILITIES: Pool = Pool {
    ok: &[
        "NET_BIND_SERVICE",
        "CAP_KILL",
        "cap_chown",
        "Net_Raw",
        "SYS_ADMIN",
    ],
    bad: &[
        "",
        "CAP_",
        "NOT_A_CAP",
        "CAP_NET_BIND_SERVICE\0",
        "ALL",
        "40",
        "cap-kill",
    ],
};
pub const HOSTNAMES: Pool = Pool {
    ok: &["web-{index}", "{instance}", "{index}", "a.b", "host"],
    bad: &[
        "{",
        "}",
        "{x}",
        "{port.a}",
        "",
        "-x",
        "\u{e9}",
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    ],
};
pub const PORT_NAMES: Pool = Pool {
    ok: &["admin", "admin", "admin", "http", "a_1"],
    bad: &[
        "A",
        "1a",
        "a-b",
        "\u{e9}",
        "",
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    ],
};
pub const PORT_TEXTS: Pool = Pool {
    ok: &["auto", "auto", "auto", "8080", "080"],
    bad: &[
        "1", "65535", "0", "65536", "70000", "-1", "", "auto ", "+80", "AUTO",
    ],
};
pub const ENV_KEYS: Pool = Pool {
    ok: &["A", "LOG_LEVEL", "_", "PATH", "a1"],
    bad: &[
        "1A",
        "a=b",
        "A\0B",
        "CORRAL_SERVICE",
        "CORRAL_",
        "LISTEN_FDS",
        "NOTIFY_SOCKET",
        "PORT_ADMIN",
        "",
        "\u{e9}",
    ],
};
pub const POLICIES: Pool = Pool {
    ok: &["always", "on-failure", "never"],
    bad: &["sometimes", "", "Always", "on_failure"],
};
/// The valid durations are all one second, so that every order between two durations holds
/// (a timeout no longer than the interval, a backoff no longer than its maximum...); the
/// others are valid for some fields and not for others.
pub const DURATIONS: Pool = Pool {
    ok: &["1s", "1000ms", "1s 0ns"],
    bad: &[
        "100ms",
        "10ms",
        "0s",
        "2s",
        "10s",
        "1m 30s",
        "1h",
        "1ms",
        "25h",
        "1w",
        "99999999999999999999s",
        "18446744073709551615s",
        "18446744073709551615ns",
        "584942417355y",
        "1e308s",
        "-1s",
        "- 1s",
        "1.5s",
        "10 parsecs",
        "",
        "10",
        "NaN",
        "inf s",
        "1s\0",
    ],
};
/// Rollout deadlines: at least the default `min_healthy` when valid.
pub const DEADLINES: Pool = Pool {
    ok: &["60s", "1m", "2s", "1h 1ns"],
    bad: &[
        "1s",
        "0s",
        "25h",
        "99999999999999999999s",
        "-1s",
        "1e308s",
        "",
    ],
};
pub const SIZES: Pool = Pool {
    ok: &["256MiB", "1MiB", "10MiB", "1GiB", "1048576", "1TiB"],
    bad: &[
        "4KiB",
        "1KiB",
        "2TiB",
        "-1MiB",
        "1.5GiB",
        "12XB",
        "16EiB",
        "1 MiB",
        "MiB",
        "0",
        "18446744073709551615",
        "18446744073709551616",
        "17179869184GiB",
        "9223372036854775807",
        "",
    ],
};
pub const URLS: Pool = Pool {
    ok: &[
        "http://127.0.0.1:{port.admin}/healthz",
        "http://[::1]:{port.admin}",
    ],
    bad: &[
        "http://127.0.0.1:8080/",
        "http://:80/",
        "https://x/",
        "http://",
        "http://x:{port.nope}/",
        "http://x:{port.",
        "ftp://x",
        "http://127.0.0.1:{port.admin}/\0",
    ],
};
pub const TARGETS: Pool = Pool {
    ok: &[
        "127.0.0.1:{port.admin}",
        "localhost:1",
        "[::1]:{port.admin}",
        "127.0.0.1:8080",
    ],
    bad: &[
        "127.0.0.1:{port.admin}/grpc.health.v1.Health",
        "127.0.0.1:0",
        ":1",
        "x",
        "127.0.0.1:65536",
        "127.0.0.1:{port.admin}/",
        "127.0.0.1:{port.admin}/bad name",
    ],
};
pub const SIGNALS: Pool = Pool {
    ok: &["SIGTERM", "TERM", "sigterm", "SIGKILL", "SIGINT", "hup"],
    bad: &["SIGSTOP", "SIGRTMIN", "15", "0", "", "SIG", "SIGTERM\0"],
};
pub const LISTENS: Pool = Pool {
    ok: &[
        "127.0.0.1:8080",
        "localhost:8080",
        "[::1]:9000",
        "0.0.0.0:65535",
        "unix:/run/x.sock",
        "[fe80::1%2]:80",
    ],
    bad: &[
        "localhost:",
        "127.0.0.1:0",
        "127.0.0.1:65536",
        "127.0.0.1:70000",
        "unix:../../etc/x",
        "unix:relative",
        "unix:",
        "unix:/a\0b",
        "host:80",
        "unix:/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    ],
};
pub const SOCKET_NAMES: Pool = Pool {
    ok: &["http", "a.b", "admin-2", "A_b"],
    bad: &[
        "a:b",
        "",
        "\u{e9}",
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    ],
};
/// Integers as TOML text; among the bad ones, some beyond i64 (a syntax error).
pub const INTS: Pool = Pool {
    ok: &["1", "2", "3", "+5", "1_0"],
    bad: &[
        "0",
        "-0",
        "100",
        "-1",
        "1001",
        "10000",
        "4194304",
        "4194305",
        "65536",
        "70000",
        "4294967295",
        "4294967296",
        "9223372036854775807",
        "-9223372036854775808",
        "18446744073709551616",
        "99999999999999999999999",
        "0x10",
    ],
};
/// cpu values as TOML text.
pub const CPUS: Pool = Pool {
    ok: &["0.5", "0.01", "1", "1024", "2.5"],
    bad: &[
        "0.001", "1025", "-0.5", "nan", "inf", "-inf", "1e308", "5e-324", "0", "0.0", "-0.0",
        "\"0.5\"",
    ],
};

/// The chance that a generated field holds a wrong value (from the pool's bad values or
/// anything at all) rather than a valid one.
#[derive(Debug, Clone, Copy)]
pub struct Hostility(pub f64);

impl Hostility {
    /// Mostly wrong values: every rule and every refusal.
    pub const HIGH: Hostility = Hostility(0.3);
    /// Mostly valid specs, one field wrong now and then: the acceptance path and the
    /// checks between fields.
    pub const LOW: Hostility = Hostility(0.02);

    fn weights(self) -> (u32, u32, u32) {
        // A fraction in [0, 1] (the constants above): per mille, exact after rounding.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let bad = (self.0.clamp(0.0, 1.0) * 1000.0).round() as u32;
        ((1000 - bad).max(1), (bad * 2 / 3).max(1), (bad / 3).max(1))
    }
}

fn pick(values: &'static [&'static str]) -> BoxedStrategy<String> {
    prop::sample::select(values).prop_map(str::to_owned).boxed()
}

/// Any string at all, biased towards the troublesome: control characters, NUL, unicode,
/// very long runs, placeholders and path tricks.
pub fn hostile_string() -> BoxedStrategy<String> {
    prop_oneof![
        4 => any::<String>(),
        2 => "[ -~]{0,40}",
        1 => (
            0usize..6000,
            prop::sample::select(vec!['a', '/', '{', '\u{e9}', '\0', '-', '9', '.'])
        )
            .prop_map(|(n, c)| std::iter::repeat_n(c, n).collect()),
        2 => prop::sample::select(vec![
            "", " ", "\0", "a\0b", "../..", "/", "{", "}", "{port.", "{port.admin}", "{index}",
            "{instance}", "\u{202e}", "\u{feff}", "NaN", "nan", "inf", "-1", "0",
            "18446744073709551616", "1e308", "-0", "unix:", "unix:../../etc/x", "auto",
        ])
        .prop_map(str::to_owned),
    ]
    .boxed()
}

/// A value of `pool`: valid, wrong, or anything at all, as `h` says.
pub fn field(pool: Pool, h: Hostility) -> BoxedStrategy<String> {
    let (ok, bad, any) = h.weights();
    prop_oneof![
        ok => pick(pool.ok),
        bad => pick(pool.bad),
        any => hostile_string(),
    ]
    .boxed()
}

// ------------------------------------------------------------------------------------------
// TOML text.

/// `s` as a TOML basic string; any Rust string can be written this way.
pub fn toml_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                out.push_str(&format!("\\u{:04X}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn float_text(f: f64) -> String {
    if f.is_nan() {
        "nan".into()
    } else if f.is_infinite() {
        if f > 0.0 { "inf" } else { "-inf" }.into()
    } else {
        format!("{f:?}")
    }
}

/// A key: a real one or anything at all, quoted.
fn toml_key() -> BoxedStrategy<String> {
    prop_oneof![
        prop::sample::select(TOP_KEYS).prop_map(str::to_owned),
        hostile_string().prop_map(|s| toml_str(&s)),
        Just("a.b".to_owned()),
    ]
    .boxed()
}

/// Any TOML value, as text: numbers of every kind (beyond i64 too), NaN and infinities,
/// strings, booleans, datetimes, and arrays and inline tables of those.
pub fn toml_value() -> BoxedStrategy<String> {
    let leaf = prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        pick(INTS.bad),
        any::<f64>().prop_map(float_text),
        pick(CPUS.bad),
        any::<bool>().prop_map(|b| b.to_string()),
        hostile_string().prop_map(|s| toml_str(&s)),
        pick(&["1979-05-27T07:32:00Z", "1979-05-27", "07:32:00"]),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..6).prop_map(|v| format!("[{}]", v.join(", "))),
            vec((toml_key(), inner), 0..4).prop_map(|kv| {
                let body: Vec<String> = kv.into_iter().map(|(k, v)| format!("{k} = {v}")).collect();
                format!("{{ {} }}", body.join(", "))
            }),
        ]
    })
    .boxed()
}

fn quoted(pool: Pool, h: Hostility) -> BoxedStrategy<String> {
    field(pool, h).prop_map(|s| toml_str(&s)).boxed()
}

fn toml_array(item: BoxedStrategy<String>, len: std::ops::Range<usize>) -> BoxedStrategy<String> {
    vec(item, len)
        .prop_map(|v| format!("[{}]", v.join(", ")))
        .boxed()
}

fn toml_bool() -> BoxedStrategy<String> {
    any::<bool>().prop_map(|b| b.to_string()).boxed()
}

/// A size: a string in the size syntax or an integer.
fn toml_size(h: Hostility) -> BoxedStrategy<String> {
    let (ok, bad, anything) = h.weights();
    prop_oneof![
        ok => quoted(SIZES, h),
        bad => pick(INTS.ok),
        bad => pick(INTS.bad),
        anything => any::<i64>().prop_map(|n| n.to_string()),
    ]
    .boxed()
}

/// What a writer might put for `key` of `section` ("" for the top level).
fn plausible(section: &str, key: &str, h: Hostility) -> BoxedStrategy<String> {
    match (section, key) {
        ("", "name") => quoted(NAMES, h),
        ("", "command") | ("health", "exec") => {
            // The program first, then arguments: an argument may be anything.
            (quoted(PROGRAMS, h), vec(quoted(PROGRAMS, h), 0..3))
                .prop_map(|(program, args)| {
                    let mut argv = vec![program];
                    argv.extend(args);
                    format!("[{}]", argv.join(", "))
                })
                .boxed()
        }
        ("", "workdir") => quoted(PATHS, h),
        ("", "user") => quoted(USERS, h),
        ("resources", "cpu") => field(CPUS, h),
        ("resources", "memory") | ("logs", "max_size") => toml_size(h),
        ("isolation", "namespaces") => {
            let (ok, bad, _) = h.weights();
            prop_oneof![
                ok => prop::sample::select(vec![
                    r#"["pid", "mount", "uts", "ipc"]"#,
                    r#"["uts", "mount", "pid"]"#,
                    r#"["mount", "uts"]"#,
                    r#"["uts", "ipc", "net", "mount"]"#,
                ])
                .prop_map(str::to_owned),
                bad => toml_array(quoted(NAMESPACES, h), 0..6),
            ]
            .boxed()
        }
        ("isolation", "hostname") => quoted(HOSTNAMES, h),
        ("isolation", "capabilities") => toml_array(quoted(CAPABILITIES, h), 0..4),
        ("isolation", "private_tmp" | "readonly_root")
        | ("health", "restart_on_failure" | "notify")
        | ("rollout", "auto_rollback") => toml_bool(),
        ("restart", "policy") => quoted(POLICIES, h),
        ("health", "http") => quoted(URLS, h),
        ("health", "tcp" | "grpc") => quoted(TARGETS, h),
        ("stop", "signal") => quoted(SIGNALS, h),
        ("sockets", "name") => quoted(SOCKET_NAMES, h),
        ("sockets", "listen") => quoted(LISTENS, h),
        ("rollout", "healthy_deadline") => quoted(DEADLINES, h),
        (
            _,
            "backoff" | "backoff_max" | "interval" | "timeout" | "start_period" | "min_healthy"
            | "healthy_deadline" | "grace",
        ) => quoted(DURATIONS, h),
        _ => field(INTS, h),
    }
}

/// `key = value` for `section` with probability `p`: a plausible value, or (as hostile as
/// `h`) a value of any type.
fn line(
    section: &'static str,
    key: &'static str,
    p: f64,
    h: Hostility,
) -> BoxedStrategy<Option<String>> {
    let (ok, _, any) = h.weights();
    let value = prop_oneof![ok => plausible(section, key, h), any => toml_value()]
        .prop_map(move |v| format!("{key} = {v}"));
    if p >= 1.0 {
        value.prop_map(Some).boxed()
    } else {
        weighted(p, value).boxed()
    }
}

/// Sometimes a key that is not in the spec, with anything as its value.
fn unknown_lines(h: Hostility) -> BoxedStrategy<Vec<String>> {
    vec(weighted(h.0 / 2.0, (toml_key(), toml_value())), 0..2)
        .prop_map(|v| {
            v.into_iter()
                .flatten()
                .map(|(k, v)| format!("{k} = {v}"))
                .collect()
        })
        .boxed()
}

/// A table's lines: each of `keys` present with probability `p`, plus unknown keys.
fn table(
    section: &'static str,
    keys: &'static [&'static str],
    p: f64,
    h: Hostility,
) -> BoxedStrategy<String> {
    let lines: Vec<BoxedStrategy<Option<String>>> =
        keys.iter().map(|key| line(section, key, p, h)).collect();
    (lines, unknown_lines(h))
        .prop_map(|(lines, unknown)| {
            lines
                .into_iter()
                .flatten()
                .chain(unknown)
                .collect::<Vec<_>>()
                .join("\n")
        })
        .boxed()
}

/// A table whose keys are free (`[ports]`, `[env]`): entries of `name = value`.
fn free_table(
    keys: BoxedStrategy<String>,
    values: BoxedStrategy<String>,
    n: std::ops::Range<usize>,
) -> BoxedStrategy<String> {
    hash_map(keys, values, n)
        .prop_map(|entries| {
            entries
                .into_iter()
                .map(|(k, v)| format!("{} = {v}", toml_str(&k)))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .boxed()
}

const SECTIONS: &[(&str, &[&str])] = &[
    ("resources", &["cpu", "memory", "pids", "nofile"]),
    (
        "isolation",
        &[
            "namespaces",
            "hostname",
            "private_tmp",
            "capabilities",
            "readonly_root",
        ],
    ),
    ("restart", &["policy", "backoff", "backoff_max"]),
    (
        "health",
        &[
            "http",
            "tcp",
            "grpc",
            "exec",
            "interval",
            "timeout",
            "start_period",
            "failure_threshold",
            "success_threshold",
            "restart_on_failure",
            "notify",
        ],
    ),
    (
        "rollout",
        &[
            "max_surge",
            "max_unavailable",
            "min_healthy",
            "healthy_deadline",
            "auto_rollback",
        ],
    ),
    ("stop", &["signal", "grace"]),
    ("logs", &["max_size", "max_files"]),
];

/// A section header: mostly `[name]`, sometimes a nested table, an array of tables where a
/// table belongs, or a section that does not exist.
fn header(name: &'static str, h: Hostility) -> BoxedStrategy<String> {
    let (ok, bad, any) = h.weights();
    prop_oneof![
        ok => Just(format!("[{name}]")),
        bad => prop_oneof![Just(format!("[{name}.nested]")), Just(format!("[[{name}]]"))],
        any => toml_key().prop_map(|k| format!("[{k}]")),
    ]
    .boxed()
}

/// A spec file written from the real grammar with values as hostile as `h`: keys usually
/// present with plausible values, else with values of any type, unknown keys and tables,
/// misplaced table kinds, and every kind of number and string.
pub fn spec_file(h: Hostility) -> BoxedStrategy<String> {
    let top = (
        line("", "name", 1.0 - h.0 / 2.0, h),
        line("", "command", 1.0 - h.0 / 2.0, h),
        line("", "workdir", 0.2, h),
        line("", "user", 0.2, h),
        line("", "replicas", 0.4, h),
        unknown_lines(h),
    )
        .prop_map(|(name, command, workdir, user, replicas, unknown)| {
            [name, command, workdir, user, replicas]
                .into_iter()
                .flatten()
                .chain(unknown)
                .collect::<Vec<_>>()
                .join("\n")
        });
    // The health probe is written on its own so that mostly exactly one is set.
    let sections: Vec<BoxedStrategy<Option<String>>> = SECTIONS
        .iter()
        .map(|(name, keys)| {
            let body = if *name == "health" {
                let probe = prop_oneof![
                    line("health", "http", 1.0, h),
                    line("health", "tcp", 1.0, h),
                    line("health", "grpc", 1.0, h),
                    line("health", "exec", 1.0, h),
                    Just(Some("notify = true".to_owned())),
                ];
                (
                    probe,
                    table(name, &keys[4..], 0.3, h),
                    table(name, &keys[..4], h.0, h),
                )
                    .prop_map(|(probe, rest, extra)| {
                        [probe.unwrap_or_default(), rest, extra].join("\n")
                    })
                    .boxed()
            } else {
                table(name, keys, 0.5, h)
            };
            weighted(0.35, (header(name, h), body))
                .prop_map(|s| s.map(|(h, body)| format!("{h}\n{body}")))
                .boxed()
        })
        .collect();
    let (ok, _, any) = h.weights();
    let ports = weighted(
        0.7,
        free_table(
            field(PORT_NAMES, h),
            prop_oneof![ok => quoted(PORT_TEXTS, h), any => field(INTS, h), any => toml_value()]
                .boxed(),
            1..3,
        ),
    )
    .prop_map(|t| t.map(|body| format!("[ports]\n{body}")));
    let env = weighted(
        0.3,
        free_table(
            field(ENV_KEYS, h),
            prop_oneof![ok => hostile_string().prop_map(|s| toml_str(&s)), any => toml_value()]
                .boxed(),
            0..4,
        ),
    )
    .prop_map(|t| t.map(|body| format!("[env]\n{body}")));
    let sockets = vec(
        (
            line("sockets", "name", 0.95, h),
            line("sockets", "listen", 0.95, h),
        ),
        0..2,
    )
    .prop_map(|entries| {
        entries
            .into_iter()
            .map(|(name, listen)| {
                let body: Vec<String> = [name, listen].into_iter().flatten().collect();
                format!("[[sockets]]\n{}", body.join("\n"))
            })
            .collect::<Vec<_>>()
    });
    (top, sections, ports, env, sockets)
        .prop_map(|(top, sections, ports, env, sockets)| {
            let mut parts = vec![top];
            parts.extend(sections.into_iter().flatten());
            parts.extend(ports);
            parts.extend(env);
            parts.extend(sockets);
            parts.join("\n") + "\n"
        })
        .boxed()
}

// ------------------------------------------------------------------------------------------
// corral.v1.ServiceSpec.

fn numbers<T: Copy + std::fmt::Debug + 'static>(
    ok: Vec<T>,
    bad: Vec<T>,
    anything: BoxedStrategy<T>,
    h: Hostility,
) -> BoxedStrategy<T> {
    let (w_ok, w_bad, w_any) = h.weights();
    prop_oneof![
        w_ok => prop::sample::select(ok),
        w_bad => prop::sample::select(bad),
        w_any => anything,
    ]
    .boxed()
}

fn u32s(ok: Vec<u32>, h: Hostility) -> BoxedStrategy<u32> {
    let bad = vec![0, 1001, 10_000, 65_536, u32::MAX - 1, u32::MAX];
    numbers(ok, bad, any::<u32>().boxed(), h)
}

fn u64s(h: Hostility) -> BoxedStrategy<u64> {
    let bad = vec![
        0,
        4_194_305,
        u64::from(u32::MAX),
        i64::MAX as u64,
        i64::MAX as u64 + 1,
        u64::MAX,
    ];
    numbers(vec![1, 256, 4_194_304], bad, any::<u64>().boxed(), h)
}

fn f64s(h: Hostility) -> BoxedStrategy<f64> {
    let bad = vec![
        0.009_999,
        1_024.000_001,
        0.0,
        -0.0,
        -0.5,
        f64::NAN,
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::MIN_POSITIVE,
        f64::MAX,
    ];
    numbers(
        vec![0.5, 0.01, 1.0, 1024.0, 2.5],
        bad,
        any::<f64>().boxed(),
        h,
    )
}

/// Durations on the wire, in milliseconds.
fn millis(h: Hostility) -> BoxedStrategy<u64> {
    let ok = vec![0, 100, 1000, 2000, 10_000, 60_000];
    let bad = vec![1, 999_999_999_999, u64::MAX / 1000, u64::MAX];
    numbers(ok, bad, any::<u64>().boxed(), h)
}

/// Sizes on the wire, in bytes.
fn bytes(h: Hostility) -> BoxedStrategy<u64> {
    let ok = vec![4 << 20, 64 << 20, 1 << 30];
    let bad = vec![0, 1, i64::MAX as u64 + 1, u64::MAX];
    numbers(ok, bad, any::<u64>().boxed(), h)
}

fn opt<T: std::fmt::Debug + Clone + 'static>(
    s: impl Strategy<Value = T> + 'static,
) -> BoxedStrategy<Option<T>> {
    weighted(0.5, s).boxed()
}

fn resources(h: Hostility) -> BoxedStrategy<pb::Resources> {
    (opt(f64s(h)), opt(bytes(h)), opt(u64s(h)), opt(u64s(h)))
        .prop_map(|(cpu, memory_bytes, pids, nofile)| pb::Resources {
            cpu,
            memory_bytes,
            pids,
            nofile,
        })
        .boxed()
}

/// `isolation.seccomp`, `isolation.devices`, `isolation.system_paths` values.
const SECCOMP_MODES: Pool = Pool {
    ok: &["default", "unconfined"],
    bad: &["Default", "off", ""],
};
const DEVICE_MODES: Pool = Pool {
    ok: &["minimal", "host"],
    bad: &["all", "none", ""],
};
const SYSTEM_PATHS: Pool = Pool {
    ok: &["masked", "host"],
    bad: &["readonly", "MASKED", ""],
};

fn isolation(h: Hostility) -> BoxedStrategy<pb::Isolation> {
    (
        opt(vec(field(NAMESPACES, h), 0..6).prop_map(|names| pb::NamespaceList { names })),
        opt(field(HOSTNAMES, h)),
        opt(any::<bool>()),
        opt(vec(field(CAPABILITIES, h), 0..4).prop_map(|names| pb::CapabilityList { names })),
        opt(any::<bool>()),
        (
            opt(field(SECCOMP_MODES, h)),
            opt(field(DEVICE_MODES, h)),
            opt(field(SYSTEM_PATHS, h)),
            opt(any::<bool>()),
        ),
    )
        .prop_map(
            |(
                namespaces,
                hostname,
                private_tmp,
                capabilities,
                readonly_root,
                (seccomp, devices, system_paths, userns),
            )| pb::Isolation {
                namespaces,
                hostname,
                private_tmp,
                capabilities,
                readonly_root,
                seccomp,
                devices,
                system_paths,
                userns,
            },
        )
        .boxed()
}

fn socket(h: Hostility) -> BoxedStrategy<pb::Socket> {
    (field(SOCKET_NAMES, h), field(LISTENS, h))
        .prop_map(|(name, listen)| pb::Socket { name, listen })
        .boxed()
}

fn restart(h: Hostility) -> BoxedStrategy<pb::RestartPolicy> {
    (opt(field(POLICIES, h)), opt(millis(h)), opt(millis(h)))
        .prop_map(|(policy, backoff_ms, backoff_max_ms)| pb::RestartPolicy {
            policy,
            backoff_ms,
            backoff_max_ms,
        })
        .boxed()
}

fn health(h: Hostility) -> BoxedStrategy<pb::Health> {
    let (ok, bad, _) = h.weights();
    // Mostly exactly one probe (or notify); sometimes none or several.
    let probes = prop_oneof![
        ok => prop_oneof![
            field(URLS, h).prop_map(|u| (Some(u), None, None, Vec::new())),
            field(TARGETS, h).prop_map(|t| (None, Some(t), None, Vec::new())),
            field(TARGETS, h).prop_map(|t| (None, None, Some(t), Vec::new())),
            vec(field(PROGRAMS, h), 1..3).prop_map(|e| (None, None, None, e)),
        ],
        bad => (
            weighted(0.5, field(URLS, h)),
            weighted(0.5, field(TARGETS, h)),
            weighted(0.5, field(TARGETS, h)),
            vec(field(PROGRAMS, h), 0..3),
        ),
    ];
    let rest = (
        opt(millis(h)),
        opt(millis(h)),
        opt(millis(h)),
        opt(u32s(vec![1, 3, 100], h)),
        opt(u32s(vec![1, 2, 100], h)),
        opt(any::<bool>()),
        opt(any::<bool>()),
    );
    (probes, rest)
        .prop_map(
            |(
                (http, tcp, grpc, exec),
                (
                    interval_ms,
                    timeout_ms,
                    start_period_ms,
                    failure_threshold,
                    success_threshold,
                    restart_on_failure,
                    notify,
                ),
            )| pb::Health {
                http,
                tcp,
                grpc,
                exec,
                interval_ms,
                timeout_ms,
                start_period_ms,
                failure_threshold,
                success_threshold,
                restart_on_failure,
                notify,
            },
        )
        .boxed()
}

fn rollout(h: Hostility) -> BoxedStrategy<pb::RolloutPolicy> {
    (
        opt(u32s(vec![1, 2, 1000], h)),
        opt(u32s(vec![0, 1, 1000], h)),
        opt(millis(h)),
        opt(millis(h)),
        opt(any::<bool>()),
        opt(f64s(h)),
    )
        .prop_map(
            |(
                max_surge,
                max_unavailable,
                min_healthy_ms,
                healthy_deadline_ms,
                auto_rollback,
                start_cpu,
            )| {
                pb::RolloutPolicy {
                    max_surge,
                    max_unavailable,
                    min_healthy_ms,
                    healthy_deadline_ms,
                    auto_rollback,
                    start_cpu,
                }
            },
        )
        .boxed()
}

fn scale(h: Hostility) -> BoxedStrategy<pb::Scale> {
    (
        opt(u32s(vec![0, 1, 1000], h)),
        opt(u32s(vec![1, 8, 1000], h)),
        opt(u32s(vec![1, 20, 1_000_000], h)),
        opt(f64s(h)),
        opt(field(DURATIONS, h)),
        opt(field(DURATIONS, h)),
    )
        .prop_map(
            |(min, max, target_connections, target_cpu, idle_after, scale_down_delay)| pb::Scale {
                min,
                max,
                target_connections,
                target_cpu,
                idle_after,
                scale_down_delay,
            },
        )
        .boxed()
}

fn stop(h: Hostility) -> BoxedStrategy<pb::Stop> {
    (opt(field(SIGNALS, h)), opt(millis(h)))
        .prop_map(|(signal, grace_ms)| pb::Stop { signal, grace_ms })
        .boxed()
}

fn logs(h: Hostility) -> BoxedStrategy<pb::LogRotation> {
    (opt(bytes(h)), opt(u32s(vec![1, 5, 100], h)))
        .prop_map(|(max_size_bytes, max_files)| pb::LogRotation {
            max_size_bytes,
            max_files,
        })
        .boxed()
}

/// Any `corral.v1.ServiceSpec`: every field and sub-message, each present or not, with
/// values from the pools above and the extremes of each number type, as hostile as `h`.
pub fn proto_spec(h: Hostility) -> BoxedStrategy<pb::ServiceSpec> {
    let (ok, bad, _) = h.weights();
    let top = (
        field(NAMES, h),
        prop_oneof![
            ok => vec(field(PROGRAMS, h), 1..3),
            bad => vec(hostile_string(), 0..5),
        ],
        hash_map(field(ENV_KEYS, h), hostile_string(), 0..4),
        opt(field(PATHS, h)),
        opt(field(USERS, h)),
        opt(u32s(vec![0, 1, 3, 1000], h)),
    );
    let sections = (
        opt(resources(h)),
        opt(isolation(h)),
        hash_map(field(PORT_NAMES, h), u32s(vec![0, 8080, 9100], h), 0..3),
        vec(socket(h), 0..3),
        opt(restart(h)),
        opt(health(h)),
        opt(rollout(h)),
        opt(stop(h)),
        opt(logs(h)),
    );
    (top, sections, opt(scale(h)))
        .prop_map(
            |(
                (name, command, env, workdir, user, replicas),
                (resources, isolation, ports, sockets, restart, health, rollout, stop, logs),
                scale,
            )| pb::ServiceSpec {
                name,
                command,
                env: env.into_iter().collect::<HashMap<_, _>>(),
                workdir,
                user,
                replicas,
                resources,
                isolation,
                ports: ports.into_iter().collect::<HashMap<_, _>>(),
                sockets,
                restart,
                health,
                rollout,
                stop,
                logs,
                scale,
                ..Default::default()
            },
        )
        .boxed()
}

// ------------------------------------------------------------------------------------------
// The API in-process, over the supervisor's fakes: everything up to the kernel is real.

/// A runtime and an `AgentService` on a supervisor with a fake runtime, cgroups that can
/// enforce everything and every namespace: a refusal here is the validation's own.
#[derive(Debug)]
pub struct Api {
    pub rt: tokio::runtime::Runtime,
    pub service: AgentService,
    _logs: tempfile::TempDir,
}

/// The one in-process API of this test binary.
pub fn api() -> &'static Api {
    static API: OnceLock<Api> = OnceLock::new();
    API.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let logs = tempfile::tempdir().expect("tempdir");
        let cgroups = Arc::new(RecordingCgroups::default());
        let capabilities = cgroups.capabilities().clone();
        let events = Arc::new(EventLog::in_memory(1000));
        let deps = Deps::new(
            Arc::new(FakeRuntime::new()),
            cgroups,
            Arc::new(MemStore::new()),
            Namespace::ALL.to_vec(),
            events.clone(),
        );
        let handle = rt.block_on(async {
            let (mut driver, handle) = Driver::new(deps);
            driver.restore().await;
            tokio::spawn(driver.run(tokio_util::sync::CancellationToken::new()));
            handle
        });
        let service = AgentService {
            supervisor: handle,
            events,
            log_root: logs.path().to_path_buf(),
            host: Arc::new(Host::new()),
            capabilities,
            namespaces: Namespace::ALL.to_vec(),
            fleet: None,
            defaults: corral_agent::api::convert::HostDefaults::of_this_process(),
            node_id: "test-node".into(),
            boot_id: String::new(),
            artifacts: None,
        };
        Api {
            rt,
            service,
            _logs: logs,
        }
    })
}
