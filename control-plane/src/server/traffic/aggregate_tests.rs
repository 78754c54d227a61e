//! Table tests of the dashboard's aggregation.

use super::*;
use crate::server::state::{IntermediateEntry, Issued, RevokedEntry, RootEntry};
use crank_api::report::RequestCount;
use crank_certs::Identity;

use super::super::store::Received;

const BOUNDS: [f64; 3] = [0.01, 0.1, 1.0];

fn series(route: &str, ok: u64, err: u64) -> Vec<RequestCount> {
    let c = |class: &str, count| RequestCount {
        direction: "outbound".into(),
        route: route.into(),
        status_class: class.into(),
        count,
    };
    vec![c("2xx", ok), c("5xx", err)]
}

fn hist(route: &str, counts: [u64; 3], count: u64) -> LatencyHistogram {
    LatencyHistogram {
        direction: "outbound".into(),
        route: route.into(),
        bounds: BOUNDS.to_vec(),
        counts: counts.to_vec(),
        count,
        sum: 0.0,
    }
}

fn report(requests: Vec<RequestCount>, latency: Vec<LatencyHistogram>) -> TrafficReport {
    TrafficReport {
        instance: "i".into(),
        interval_ms: 1000,
        requests,
        latency,
        refusals: vec![],
    }
}

fn inst(
    id: &str,
    instance: &str,
    last: (i64, TrafficReport),
    prev: Option<(i64, TrafficReport)>,
) -> InstanceReports {
    InstanceReports {
        identity: id.into(),
        instance: instance.into(),
        last: Received {
            at_ms: last.0,
            report: last.1,
        },
        prev: prev.map(|(at_ms, report)| Received { at_ms, report }),
    }
}

#[test]
fn quantiles_interpolate_inside_the_bucket() {
    let cases: &[(f64, &[u64], u64, Option<f64>)] = &[
        (0.99, &[0, 0, 0], 0, None),
        // all 100 in the first bucket: 99% of the way to 10 ms
        (0.99, &[100, 100, 100], 100, Some(0.0099)),
        // 50 fast, 50 in (0.1, 1]: rank 99 is 49/50 of the way
        (0.99, &[50, 50, 100], 100, Some(0.1 + 0.9 * 49.0 / 50.0)),
        (0.5, &[50, 50, 100], 100, Some(0.01)),
        // beyond the largest bound: that bound
        (0.99, &[10, 10, 10], 100, Some(1.0)),
    ];
    for (q, counts, count, want) in cases {
        let got = quantile(*q, &BOUNDS, counts, *count);
        match (got, want) {
            (Some(g), Some(w)) => assert!((g - w).abs() < 1e-9, "{counts:?}: {g} != {w}"),
            _ => assert_eq!(got, *want, "{counts:?}"),
        }
    }
}

#[test]
fn edges_take_rates_from_the_last_two_reports_of_live_instances() {
    let caps = HashMap::from([("hello".to_string(), "hello:v1".to_string())]);
    let front = "front.acme.crank.local";
    let a = inst(
        front,
        "a",
        (
            12_000,
            report(
                series("hello", 120, 10),
                vec![hist("hello", [100, 130, 130], 130)],
            ),
        ),
        Some((
            10_000,
            report(
                series("hello", 100, 0),
                vec![hist("hello", [100, 100, 100], 100)],
            ),
        )),
    );
    // A second instance with one report: counted, but no rate yet.
    let b = inst(
        front,
        "b",
        (12_000, report(series("hello", 5, 1), vec![])),
        None,
    );
    // A silent instance: its counts stay, its last interval is no rate.
    let c = inst(
        front,
        "c",
        (1_000, report(series("hello", 50, 0), vec![])),
        Some((0, report(series("hello", 0, 0), vec![]))),
    );
    // Another caller, a route the config does not know, no route at all.
    let other = inst(
        "other.acme.crank.local",
        "d",
        (
            12_000,
            report(
                [series("legacy", 4, 0), series("none", 3, 0)].concat(),
                vec![],
            ),
        ),
        Some((11_000, report(series("legacy", 0, 0), vec![]))),
    );
    let got = edges(&[&a, &b, &c, &other], &caps, 12_500);
    assert_eq!(got.len(), 2, "{got:?}");
    let e = &got[0];
    assert_eq!(
        (e.source.as_str(), e.destination.as_str(), e.route.as_str()),
        (front, "hello:v1", "hello")
    );
    // 30 requests in 2 s from instance a only
    assert!((e.rps - 15.0).abs() < 1e-9, "{}", e.rps);
    assert!((e.success_rate.unwrap() - 20.0 / 30.0).abs() < 1e-9);
    assert_eq!((e.requests, e.errors), (130 + 6 + 50, 11));
    // the 30 new requests took (0.01, 0.1]: p99 near 100 ms
    let p99 = e.p99_ms.unwrap();
    assert!(p99 > 90.0 && p99 <= 100.0, "{p99}");
    let e = &got[1];
    assert_eq!(
        (e.destination.as_str(), e.route.as_str()),
        ("legacy", "legacy")
    );
    assert!((e.rps - 4.0).abs() < 1e-9);
    assert_eq!(e.success_rate, Some(1.0));
    assert_eq!(e.p99_ms, None, "no histogram reported");
}

#[test]
fn a_restarted_counter_counts_from_zero() {
    let r = inst(
        "front.acme.crank.local",
        "a",
        (2_000, report(series("hello", 3, 0), vec![])),
        Some((1_000, report(series("hello", 100, 0), vec![]))),
    );
    let e = &edges(&[&r], &HashMap::new(), 2_000)[0];
    assert!((e.rps - 3.0).abs() < 1e-9);
    let idle = inst(
        "front.acme.crank.local",
        "a",
        (2_000, report(series("hello", 3, 0), vec![])),
        Some((1_000, report(series("hello", 3, 0), vec![]))),
    );
    let e = &edges(&[&idle], &HashMap::new(), 2_000)[0];
    assert_eq!((e.rps, e.success_rate), (0.0, None), "no requests: no rate");
}

#[test]
fn error_budgets() {
    let cases = [
        (Some(1.0), Some(0.999), Some(1.0)),
        (Some(0.999), Some(0.999), Some(0.0)),
        (Some(0.9995), Some(0.999), Some(0.5)),
        (Some(0.99), Some(0.999), Some(-9.0)),
        (None, Some(0.999), None),
        (Some(0.99), None, None),
        (Some(0.99), Some(1.0), None),
    ];
    for (sli, target, want) in cases {
        let got = budget_left(sli, target);
        match (got, want) {
            (Some(g), Some(w)) => assert!((g - w).abs() < 1e-6, "{sli:?} {target:?}: {g}"),
            _ => assert_eq!(got, want, "{sli:?} {target:?}"),
        }
    }
}

#[test]
fn slos_count_the_outbound_requests_of_their_routes() {
    let o = CapabilitySlo {
        capability: "hello:v1".into(),
        routes: vec!["hello".into(), "hello-b".into()],
        availability: Some(0.9),
        latency: vec![],
        window: std::time::Duration::from_secs(3600),
    };
    let mut inbound = series("hello", 1000, 1000);
    inbound
        .iter_mut()
        .for_each(|c| c.direction = "inbound".into());
    let a = inst(
        "a.t.crank.local",
        "a",
        (
            1,
            report(
                [series("hello", 90, 5), series("other", 1, 1), inbound].concat(),
                vec![],
            ),
        ),
        None,
    );
    let b = inst(
        "b.t.crank.local",
        "b",
        (1, report(series("hello-b", 5, 0), vec![])),
        None,
    );
    let got = slos(std::slice::from_ref(&o), &[&a, &b]);
    assert_eq!((got[0].requests, got[0].errors), (100, 5));
    assert!((got[0].sli.unwrap() - 0.95).abs() < 1e-9);
    assert!((got[0].budget_left.unwrap() - 0.5).abs() < 1e-9);
    let none = slos(&[o], &[]);
    assert_eq!(
        (none[0].sli, none[0].budget_left, none[0].requests),
        (None, None, 0)
    );
}

/// identity, service, tenant, capabilities, endpoints, proxies, last report
type Row<'a> = (
    &'a str,
    &'a str,
    &'a str,
    Vec<String>,
    usize,
    usize,
    Option<i64>,
);

#[test]
fn workloads_join_the_registry_and_the_reports() {
    let now = std::time::SystemTime::now();
    let entry = |port: u16, id: &str, cap: &str, left: u64| Entry {
        lease: crate::registry::LeaseId::new(format!("l{port}")),
        registration: crank_api::mesh::EndpointRegistration {
            address: format!("127.0.0.1:{port}").parse().unwrap(),
            identity: id.into(),
            capabilities: vec![cap.into()],
            labels: Default::default(),
        },
        registered_at: now,
        last_heartbeat: now,
        expires_in: std::time::Duration::from_secs(left),
    };
    let entries = [
        entry(1, "hello.acme.crank.local", "hello:v1", 10),
        entry(2, "hello.acme.crank.local", "greet:v1", 10),
        entry(3, "hello.acme.crank.local", "hello:v1", 0),
    ];
    let live = inst(
        "front.acme.crank.local",
        "a",
        (9_000, report(vec![], vec![])),
        None,
    );
    let silent = inst(
        "front.acme.crank.local",
        "b",
        (1_000, report(vec![], vec![])),
        None,
    );
    let got = workloads(&[&live, &silent], &entries, 10_000);
    let rows: Vec<Row> = got
        .iter()
        .map(|w| {
            (
                w.identity.as_str(),
                w.service.as_str(),
                w.tenant.as_str(),
                w.capabilities.clone(),
                w.endpoints,
                w.proxies,
                w.last_report,
            )
        })
        .collect();
    assert_eq!(
        rows,
        [
            (
                "front.acme.crank.local",
                "front",
                "acme",
                vec![],
                0,
                1,
                Some(9)
            ),
            (
                "hello.acme.crank.local",
                "hello",
                "acme",
                vec!["greet:v1".to_string(), "hello:v1".to_string()],
                2,
                0,
                None
            ),
        ]
    );
}

fn issued(serial: &str, instance: &str, not_before: i64, not_after: i64, at: i64) -> Issued {
    Issued {
        serial: serial.into(),
        identity: Identity::new("hello", "acme", "crank.local").unwrap(),
        instance: instance.into(),
        not_before,
        not_after,
        requester: "enroll".into(),
        issuer: "int".into(),
        issuer_serial: "01".into(),
        issued_at: at,
    }
}

#[test]
fn certs_say_how_long_they_have_left() {
    let t = 1_000_000_000;
    let day = 86_400;
    let st = CaState {
        trust_domain: "crank.local".into(),
        roots: vec![RootEntry {
            cert_pem: String::new(),
            subject: "root".into(),
            serial: "aa".into(),
            not_after: t + 365 * day,
            added_at: 0,
        }],
        intermediates: [
            ("signing", IntermediateState::Signing, t + 10 * day),
            ("old", IntermediateState::Retired, t - day),
        ]
        .into_iter()
        .map(|(subject, state, not_after)| IntermediateEntry {
            cert_pem: String::new(),
            key_pem: None,
            subject: subject.into(),
            serial: subject.into(),
            not_after,
            state,
        })
        .collect(),
        bundle_version: 1,
        tokens: vec![],
        inventory: vec![
            issued("01", "a", t - 100, t + 200, t - 100),
            // a's renewal replaced 01: only the newest shows
            issued("02", "a", t - 10, t + 290, t - 10),
            issued("03", "b", t - 250, t + 50, t - 250),
            issued("04", "c", t - 400, t - 1, t - 400),
            issued("05", "d", t - 10, t + 290, t - 10),
        ],
        revoked: BTreeMap::from([(
            "05".to_string(),
            RevokedEntry {
                not_after: t + 290,
                revoked_at: t,
                identity: None,
            },
        )]),
        revocations_version: 1,
        rotation: Default::default(),
    };
    let got: Vec<(String, String, i64, String)> = certs(&st, t)
        .into_iter()
        .map(|c| (c.kind, c.serial, c.seconds_left, c.status))
        .collect();
    let want = [
        ("root", "aa", 365 * day, "valid"),
        ("intermediate", "signing", 10 * day, "expiring"),
        ("leaf", "02", 290, "valid"),
        ("leaf", "03", 50, "expiring"),
        ("leaf", "04", -1, "expired"),
        ("leaf", "05", 290, "revoked"),
    ];
    let want: Vec<(String, String, i64, String)> = want
        .iter()
        .map(|(k, s, l, st)| (k.to_string(), s.to_string(), *l, st.to_string()))
        .collect();
    assert_eq!(got, want);
}

#[test]
fn failed_requests_are_5xx_and_no_response() {
    let cases = [
        ("2xx", false),
        ("3xx", false),
        ("4xx", false),
        ("5xx", true),
        ("error", true),
        ("other", false),
    ];
    for (class, want) in cases {
        assert_eq!(is_error(class), want, "{class}");
    }
    let c = |class: &str, count| RequestCount {
        direction: "outbound".into(),
        route: "hello".into(),
        status_class: class.into(),
        count,
    };
    let r = inst(
        "a.t.crank.local",
        "a",
        (2_000, report(vec![c("2xx", 18), c("error", 2)], vec![])),
        Some((1_000, report(vec![c("2xx", 9), c("error", 1)], vec![]))),
    );
    let e = &edges(&[&r], &HashMap::new(), 2_000)[0];
    assert_eq!((e.requests, e.errors), (20, 2));
    assert!((e.success_rate.unwrap() - 0.9).abs() < 1e-9, "{e:?}");
}

#[test]
fn huge_counts_saturate_instead_of_overflowing() {
    let big = |id: &str| {
        inst(
            id,
            "a",
            (
                2_000,
                report(
                    series("hello", u64::MAX, u64::MAX),
                    vec![hist("hello", [u64::MAX; 3], u64::MAX)],
                ),
            ),
            Some((
                1_000,
                report(series("hello", 0, 0), vec![hist("hello", [0; 3], 0)]),
            )),
        )
    };
    let (a, b) = (big("a.t.crank.local"), big("a.t.crank.local"));
    let mut b = b;
    b.instance = "b".into();
    let e = &edges(&[&a, &b], &HashMap::new(), 2_000)[0];
    assert_eq!((e.requests, e.errors), (u64::MAX, u64::MAX));
    let o = CapabilitySlo {
        capability: "hello:v1".into(),
        routes: vec!["hello".into()],
        availability: Some(0.9),
        latency: vec![],
        window: std::time::Duration::from_secs(3600),
    };
    let got = slos(&[o], &[&a, &b]);
    assert_eq!((got[0].requests, got[0].errors), (u64::MAX, u64::MAX));
}
