use std::time::Duration;

use tokio::time::Instant;

use super::{Autoscaler, Load};
use crate::spec::ScaleSpec;

fn spec() -> ScaleSpec {
    ScaleSpec {
        min: 0,
        max: 8,
        target_connections: Some(20),
        target_cpu: None,
        idle_after: Duration::from_secs(60),
        scale_down_delay: Duration::from_secs(10),
    }
}

fn conns(n: u32) -> Load {
    Load {
        connections: n,
        ..Load::default()
    }
}

fn at(t0: Instant, secs: u64) -> Instant {
    t0 + Duration::from_secs(secs)
}

#[test]
fn up_at_once_to_the_connections_over_target_with_the_reason() {
    let t0 = Instant::now();
    let mut a = Autoscaler::new(t0);
    let d = a.decide(&spec(), None, 2, conns(83), t0);
    assert_eq!(d.target, 5);
    assert_eq!(d.reason, "2 → 5: 83 connections, target 20 per instance");
}

#[test]
fn queued_connections_count_and_max_caps() {
    let t0 = Instant::now();
    let mut a = Autoscaler::new(t0);
    let load = Load {
        connections: 600,
        queued: 500,
        cpu: 0.0,
    };
    assert_eq!(a.decide(&spec(), None, 1, load, t0).target, 8);
    let one = Load {
        queued: 1,
        ..Load::default()
    };
    assert_eq!(a.decide(&spec(), None, 0, one, t0).target, 1);
}

#[test]
fn cpu_target_is_a_fraction_of_the_limit_and_the_larger_signal_wins() {
    let t0 = Instant::now();
    let mut a = Autoscaler::new(t0);
    let s = ScaleSpec {
        target_cpu: Some(0.5),
        ..spec()
    };
    // 1.2 cores over 0.5 × 0.4 cores per instance: 6; 10 connections ask for 1.
    let load = Load {
        connections: 10,
        queued: 0,
        cpu: 1.2,
    };
    let d = a.decide(&s, Some(0.4), 1, load, t0);
    assert_eq!(d.target, 6);
    assert!(
        d.reason.contains("cpu 1.20 cores, target 0.20"),
        "{}",
        d.reason
    );
}

#[test]
fn down_only_after_the_delay_of_low_load_to_the_most_asked_meanwhile() {
    let t0 = Instant::now();
    let s = spec();
    let mut a = Autoscaler::new(t0);
    // 4 instances, load for 1 then 2 for less than the delay: held.
    assert_eq!(a.decide(&s, None, 4, conns(5), at(t0, 0)).target, 4);
    assert_eq!(a.decide(&s, None, 4, conns(30), at(t0, 5)).target, 4);
    let d = a.decide(&s, None, 4, conns(5), at(t0, 9));
    assert_eq!(d.target, 4);
    assert!(d.reason.starts_with("holding 4"), "{}", d.reason);
    // The delay passed: down to 2, the most any sample asked for.
    let d = a.decide(&s, None, 4, conns(5), at(t0, 10));
    assert_eq!(d.target, 2);
    assert_eq!(
        d.reason,
        "4 → 2: 5 connections, target 20 per instance for 10s"
    );
}

#[test]
fn a_high_sample_restarts_the_delay() {
    let t0 = Instant::now();
    let s = spec();
    let mut a = Autoscaler::new(t0);
    assert_eq!(a.decide(&s, None, 3, conns(1), at(t0, 0)).target, 3);
    assert_eq!(a.decide(&s, None, 3, conns(60), at(t0, 8)).target, 3);
    assert_eq!(a.decide(&s, None, 3, conns(1), at(t0, 12)).target, 3);
    assert_eq!(a.decide(&s, None, 3, conns(1), at(t0, 21)).target, 3);
    assert_eq!(a.decide(&s, None, 3, conns(1), at(t0, 22)).target, 1);
}

#[test]
fn never_below_one_until_idle_then_to_min() {
    let t0 = Instant::now();
    let s = spec();
    let mut a = Autoscaler::new(t0);
    assert_eq!(a.decide(&s, None, 2, conns(0), at(t0, 0)).target, 2);
    assert_eq!(a.decide(&s, None, 2, conns(0), at(t0, 10)).target, 1);
    assert_eq!(a.decide(&s, None, 1, conns(0), at(t0, 30)).target, 1);
    let d = a.decide(&s, None, 1, conns(0), at(t0, 60));
    assert_eq!(d.target, 0);
    assert_eq!(d.reason, "1 → 0: no connection for 60s");
    assert_eq!(a.decide(&s, None, 0, conns(0), at(t0, 90)).target, 0);
}

#[test]
fn an_open_connection_keeps_the_service_from_idling() {
    let t0 = Instant::now();
    let s = spec();
    let mut a = Autoscaler::new(t0);
    for t in [0, 30, 60, 120] {
        assert_eq!(a.decide(&s, None, 1, conns(1), at(t0, t)).target, 1);
    }
    // Idle counts from the last connection seen.
    assert_eq!(a.decide(&s, None, 1, conns(0), at(t0, 150)).target, 1);
    assert_eq!(a.decide(&s, None, 1, conns(0), at(t0, 180)).target, 0);
}

#[test]
fn min_is_kept_and_touch_counts_as_activity() {
    let t0 = Instant::now();
    let s = ScaleSpec { min: 2, ..spec() };
    let mut a = Autoscaler::new(t0);
    assert_eq!(a.decide(&s, None, 0, conns(0), at(t0, 0)).target, 2);
    assert_eq!(a.decide(&s, None, 2, conns(0), at(t0, 500)).target, 2);
    let s = spec();
    let mut a = Autoscaler::new(t0);
    a.touch(at(t0, 50));
    assert_eq!(a.decide(&s, None, 1, conns(0), at(t0, 100)).target, 1);
    assert_eq!(a.decide(&s, None, 1, conns(0), at(t0, 110)).target, 0);
}

#[test]
fn odd_cpu_readings_ask_for_nothing() {
    let t0 = Instant::now();
    let s = ScaleSpec {
        target_connections: None,
        target_cpu: Some(0.5),
        ..spec()
    };
    let mut a = Autoscaler::new(t0);
    for cpu in [f64::NAN, f64::INFINITY, -1.0, 0.0] {
        let load = Load {
            cpu,
            ..Load::default()
        };
        assert_eq!(a.decide(&s, None, 1, load, t0).target, 1, "{cpu}");
    }
}
