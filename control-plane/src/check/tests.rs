//! Table tests of every `crankctl check` decision over made-up status data.

use std::collections::BTreeMap;
use std::time::{Duration, UNIX_EPOCH};

use super::*;
use crate::registry::{Entry, LeaseId};
use crate::server::admin::{CaEntry, WorkloadRow};
use crate::server::mesh::ProxyRow;
use crank_api::mesh::{ConfigVersion, EndpointRegistration};

const NOW: i64 = 1_800_000_000;
const DAY: i64 = 86400;

fn ca() -> CaStatus {
    CaStatus {
        trust_domain: "crank.local".into(),
        phase: Phase::Idle,
        rotation_kind: None,
        rotation_started_at: None,
        phase_since: None,
        target_bundle: None,
        bundle_version: 1,
        revocations_version: 1,
        revoked_serials: 0,
        roots: vec![entry("root", 365 * DAY, "trusted")],
        intermediates: vec![entry("int", 300 * DAY, "signing")],
        workloads: vec![],
        history: vec![],
        now: NOW,
        resync_wait_seconds: None,
        stale_after_seconds: Some(600),
        replica: None,
        leader: None,
    }
}

fn entry(subject: &str, left: i64, state: &str) -> CaEntry {
    CaEntry {
        subject: subject.into(),
        serial: "01".into(),
        not_after: NOW + left,
        state: state.into(),
    }
}

/// A workload whose 100 s leaf has `left` seconds left, seen `ago` s ago.
fn workload(left: i64, ago: i64, state: &str) -> WorkloadRow {
    WorkloadRow {
        identity: "web.acme.crank.local".into(),
        instance: "i1".into(),
        serial: "ab".into(),
        issuer: None,
        not_before: Some(NOW + left - 100),
        not_after: Some(NOW + left),
        bundle_version: 1,
        last_seen: NOW - ago,
        state: state.into(),
        lagging: None,
    }
}

fn proxy(instance: &str, seq: u64, silent: bool, rev: Option<&str>) -> ProxyRow {
    ProxyRow {
        identity: "web.acme.crank.local".into(),
        instance: instance.into(),
        seq,
        last_seen: NOW - if silent { 100 } else { 1 },
        stale: silent || seq != 2,
        silent,
        hash: None,
        policy_revision: rev.map(String::from),
    }
}

fn mesh(proxies: Vec<ProxyRow>) -> MeshStatus {
    MeshStatus {
        config_dir: Some("/etc/crank/mesh".into()),
        version: Some(ConfigVersion {
            seq: 2,
            hash: "h2".into(),
        }),
        published_at: Some(NOW - 10),
        last_error: None,
        policy_revision: Some("p2".into()),
        proxies,
        now: NOW,
    }
}

fn levels(f: &[Finding]) -> Vec<Level> {
    f.iter().map(|f| f.level).collect()
}

fn worst(f: &[Finding]) -> Level {
    f.iter().map(|f| f.level).max().unwrap_or(Level::Ok)
}

#[test]
fn clock_skew() {
    let t = Thresholds::default();
    let cases = [
        (0, Level::Ok),
        (-5, Level::Ok),
        (6, Level::Warn),
        (-30, Level::Warn),
        (61, Level::Fail),
        (-3600, Level::Fail),
    ];
    for (skew, want) in cases {
        let f = clock(NOW + skew, NOW, &t);
        assert_eq!(worst(&f), want, "skew {skew}: {f:?}");
        if want != Level::Ok {
            assert!(f[0].fix.as_deref().unwrap().contains("timedatectl"));
        }
    }
}

#[test]
fn roots_and_intermediates_by_time_left() {
    let t = Thresholds::default();
    let cases = [
        (365 * DAY, "trusted", Level::Ok),
        (31 * DAY, "signing", Level::Ok),
        (29 * DAY, "signing", Level::Warn),
        (6 * DAY, "signing", Level::Fail),
        (-DAY, "signing", Level::Fail),
        (DAY, "retired", Level::Ok),
    ];
    for (left, state, want) in cases {
        let mut s = ca();
        s.intermediates = vec![entry("int", left, state)];
        let f = ca_certs(&s, &t);
        assert_eq!(worst(&f), want, "{left} {state}: {f:?}");
        if want != Level::Ok {
            assert!(f[0].what.contains("intermediate int"), "{f:?}");
            assert!(f[0]
                .fix
                .as_deref()
                .unwrap()
                .contains("crankctl ca rotate intermediate --root"));
        }
    }
    let mut s = ca();
    s.roots = vec![entry("root", 3 * DAY, "trusted")];
    let f = ca_certs(&s, &t);
    assert_eq!(levels(&f), [Level::Fail]);
    assert!(f[0].fix.as_deref().unwrap().contains("ca rotate root"));
    // The thresholds are the caller's.
    let lax = Thresholds {
        ca_fail: Duration::from_secs(DAY as u64),
        ca_warn: Duration::from_secs(2 * DAY as u64),
        ..Thresholds::default()
    };
    assert_eq!(worst(&ca_certs(&s, &lax)), Level::Ok);
}

#[test]
fn leaves_by_fraction_of_life_left() {
    let t = Thresholds::default();
    // (seconds left of a 100 s life, seen ago, state, want)
    let cases = [
        (60, 1, "active", Level::Ok),
        (21, 1, "active", Level::Ok),
        (19, 1, "active", Level::Warn),
        (0, 1, "expired", Level::Fail),
        (-50, 1, "expired", Level::Fail),
        (50, 1, "revoked", Level::Fail),
        // Gone for longer than workloads.stale_after: not counted.
        (-50, 700, "expired", Level::Ok),
        (10, 1, "stale", Level::Ok),
    ];
    for (left, ago, state, want) in cases {
        let mut s = ca();
        s.workloads = vec![workload(left, ago, state)];
        let f = leaves(&s, &t);
        assert_eq!(worst(&f), want, "{left} {ago} {state}: {f:?}");
        if want != Level::Ok {
            assert!(f[0].what.contains("web.acme.crank.local (instance i1)"));
            assert!(f[0]
                .fix
                .as_deref()
                .unwrap()
                .contains("crankctl token create --service web --tenant acme"));
        }
    }
    let mut s = ca();
    s.workloads = vec![workload(19, 1, "active")];
    let lax = Thresholds {
        leaf_warn_fraction: 0.1,
        ..Thresholds::default()
    };
    assert_eq!(worst(&leaves(&s, &lax)), Level::Ok);
}

#[test]
fn proxies_silent_or_behind_fail() {
    let cases = [
        (vec![proxy("a", 2, false, None)], vec![Level::Ok], ""),
        (
            vec![proxy("a", 1, false, None)],
            vec![Level::Fail],
            "runs config v1, v2 is published",
        ),
        (
            vec![proxy("a", 2, true, None)],
            vec![Level::Fail],
            "silent for 100s",
        ),
        (
            vec![proxy("a", 2, false, None), proxy("b", 1, false, None)],
            vec![Level::Fail],
            "instance b",
        ),
        (vec![], vec![Level::Ok], ""),
    ];
    for (rows, want, says) in cases {
        let f = proxies(&mesh(rows));
        assert_eq!(levels(&f), want, "{f:?}");
        assert!(f[0].what.contains(says), "{f:?}");
    }
    let f = proxies(&mesh(vec![proxy("a", 2, true, None)]));
    assert!(f[0]
        .fix
        .as_deref()
        .unwrap()
        .contains("systemctl restart crank-proxy@web"));
}

#[test]
fn policy_revision_the_same_everywhere() {
    let cases = [
        (vec![proxy("a", 2, false, Some("p2"))], Level::Ok),
        // An older version with the same policies runs the same revision.
        (vec![proxy("a", 1, false, Some("p2"))], Level::Ok),
        (
            vec![
                proxy("a", 2, false, Some("p2")),
                proxy("b", 1, false, Some("p1")),
            ],
            Level::Fail,
        ),
        (vec![proxy("a", 1, false, None)], Level::Fail),
        // A silent proxy is the proxies check's business.
        (vec![proxy("a", 1, true, Some("p1"))], Level::Ok),
    ];
    for (rows, want) in cases {
        let f = policy(&mesh(rows.clone()));
        assert_eq!(worst(&f), want, "{rows:?}: {f:?}");
    }
    let f = policy(&mesh(vec![
        proxy("a", 1, false, Some("p1")),
        proxy("b", 1, false, Some("p1")),
    ]));
    assert_eq!(f.len(), 1);
    assert!(
        f[0].what
            .contains("p1 on web.acme.crank.local (a), web.acme.crank.local (b); p2 is published"),
        "{f:?}"
    );
}

#[test]
fn config_directory_state() {
    let mut m = mesh(vec![]);
    assert_eq!(levels(&config(&m)), [Level::Ok]);
    m.last_error = Some((NOW, vec![]));
    let f = config(&m);
    assert_eq!(levels(&f), [Level::Warn]);
    assert_eq!(
        f[0].fix.as_deref(),
        Some("crankctl config validate /etc/crank/mesh")
    );
    m.version = None;
    assert_eq!(levels(&config(&m)), [Level::Fail]);
    m.config_dir = None;
    assert_eq!(levels(&config(&m)), [Level::Ok]);
}

#[test]
fn rotation_stuck_longer_than_the_threshold_warns() {
    let t = Thresholds::default();
    let cases = [
        (Phase::Idle, 0, Level::Ok),
        (Phase::Reissuing, 600, Level::Ok),
        (Phase::AddingRoot, 3601, Level::Warn),
    ];
    for (phase, ago, want) in cases {
        let mut s = ca();
        s.phase = phase;
        s.phase_since = Some(NOW - ago);
        let mut w = workload(60, 1, "active");
        w.lagging = Some("has trust bundle v1, needs v2".into());
        s.workloads = vec![w];
        let f = rotation(&s, &t);
        assert_eq!(worst(&f), want, "{phase:?} {ago}: {f:?}");
        if want == Level::Warn {
            assert!(f[0].what.contains("held back by web.acme.crank.local (i1)"));
        }
    }
}

fn reg(since_heartbeat: i64, expires_in: u64) -> Snapshot {
    Snapshot {
        version: 1,
        entries: vec![Entry {
            lease: LeaseId::new("l1".to_string()),
            registration: EndpointRegistration {
                address: "127.0.0.1:9000".parse().unwrap(),
                identity: "web.acme.crank.local".into(),
                capabilities: vec!["hello:v1".into()],
                labels: BTreeMap::new(),
            },
            registered_at: UNIX_EPOCH + Duration::from_secs(NOW as u64 - 100),
            last_heartbeat: UNIX_EPOCH + Duration::from_secs((NOW - since_heartbeat) as u64),
            expires_in: Duration::from_secs(expires_in),
        }],
    }
}

#[test]
fn endpoints_with_missed_heartbeats_or_silent_proxies_warn() {
    let live = mesh(vec![proxy("a", 2, false, None)]);
    let silent = mesh(vec![proxy("a", 2, true, None)]);
    let cases = [
        (reg(1, 9), &live, Level::Ok, ""),
        (reg(6, 4), &live, Level::Warn, "no heartbeat for 6s"),
        (reg(1, 9), &silent, Level::Warn, "no proxy of it watches"),
        (
            reg(1, 9),
            &mesh(vec![]),
            Level::Warn,
            "no proxy of it watches",
        ),
    ];
    for (r, m, want, says) in cases {
        let f = endpoints(&r, m);
        assert_eq!(worst(&f), want, "{f:?}");
        assert!(f[0].what.contains(says), "{f:?}");
    }
    // crank-control without a config dir has no proxies to compare with.
    let mut ca_only = mesh(vec![]);
    ca_only.config_dir = None;
    assert_eq!(worst(&endpoints(&reg(1, 9), &ca_only)), Level::Ok);
}

#[test]
fn exit_codes() {
    let f = |l| Finding {
        check: "x",
        level: l,
        what: String::new(),
        fix: None,
    };
    let cases = [
        (vec![], false, 0),
        (vec![f(Level::Ok)], false, 0),
        (vec![f(Level::Ok), f(Level::Warn)], false, 0),
        (vec![f(Level::Warn)], true, 1),
        (vec![f(Level::Fail), f(Level::Warn)], false, 1),
    ];
    for (findings, strict, want) in cases {
        assert_eq!(exit_code(&findings, strict), want, "{findings:?} {strict}");
    }
}

#[test]
fn a_healthy_mesh_reports_ok_everywhere() {
    let mut s = ca();
    s.workloads = vec![workload(60, 1, "active")];
    let m = mesh(vec![proxy("a", 2, false, Some("p2"))]);
    let r = reg(1, 9);
    let f = evaluate(
        &Inputs {
            ca: &s,
            mesh: &m,
            endpoints: &r,
            local_now: NOW,
        },
        &Thresholds::default(),
    );
    assert!(f.iter().all(|f| f.level == Level::Ok), "{f:?}");
    let text = render_human(&f);
    assert!(
        text.contains("ok    proxies    1 proxy(ies) on v2"),
        "{text}"
    );
    assert!(text.ends_with("0 failed, 0 warning(s), 8 ok\n"), "{text}");
}

#[test]
fn the_human_report_puts_the_fix_under_the_problem() {
    let f = proxies(&mesh(vec![proxy("a", 2, true, None)]));
    let text = render_human(&f);
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("FAIL  proxies"), "{text}");
    assert!(
        lines[1]
            .trim_start()
            .starts_with("fix: restart its sidecar"),
        "{text}"
    );
}
