use super::*;
use std::sync::Arc;
use tokio::time::advance;

const MS: Duration = Duration::from_millis(1);

fn cfg() -> BreakerConfig {
    BreakerConfig {
        consecutive_failures: 5,
        base_ejection: Duration::from_secs(5),
        max_ejection: Duration::from_secs(300),
        max_ejected_percent: 50,
        jitter: 0.0,
    }
}

fn plain(index: usize) -> Pick {
    Pick {
        index,
        probe: false,
    }
}

/// Records `times` failures of ordinary requests on `index`; returns the
/// last transition.
fn fail(eps: &Endpoints, index: usize, times: u32) -> Option<Transition> {
    let mut last = None;
    for _ in 0..times {
        last = eps.record(plain(index), false);
    }
    last
}

/// Picks until endpoint `index` is handed out (at most 2n picks).
fn pick_until(eps: &Endpoints, index: usize) -> Option<Pick> {
    (0..2 * eps.len())
        .filter_map(|_| eps.pick(&[]))
        .find(|p| p.index == index)
}

fn opened(index: usize, from: CircuitState, len: Duration) -> Option<Transition> {
    Some(Transition {
        index,
        from,
        to: CircuitState::Open,
        ejection: Some(len),
    })
}

#[test]
fn defaults_and_labels() {
    let d = BreakerConfig::default();
    assert_eq!(d.consecutive_failures, 5);
    assert_eq!(d.base_ejection, Duration::from_secs(5));
    assert_eq!(d.max_ejection, Duration::from_secs(60));
    assert_eq!(d.max_ejected_percent, 50);
    assert_eq!(d.jitter, 0.25);
    let all = [
        CircuitState::Closed,
        CircuitState::Open,
        CircuitState::HalfOpen,
    ];
    assert_eq!(all.map(CircuitState::gauge), [0, 1, 2]);
    assert_eq!(
        all.map(CircuitState::as_str),
        ["closed", "open", "half-open"]
    );
    assert_eq!(CircuitState::HalfOpen.to_string(), "half-open");
}

#[tokio::test(start_paused = true)]
async fn five_failures_eject_and_picks_avoid_it() {
    let eps = Endpoints::new(3, cfg());
    assert_eq!(fail(&eps, 0, 4), None);
    assert_eq!(eps.state(0), CircuitState::Closed);
    assert_eq!(
        eps.record(plain(0), false),
        opened(0, CircuitState::Closed, Duration::from_secs(5))
    );
    assert_eq!(eps.state(0), CircuitState::Open);
    assert_eq!(eps.ejected(), 1);
    assert_eq!(
        eps.states(),
        [
            CircuitState::Open,
            CircuitState::Closed,
            CircuitState::Closed
        ]
    );
    for _ in 0..30 {
        let p = eps.pick(&[]).unwrap();
        assert_ne!(p.index, 0);
        assert!(!p.probe);
    }
    // Still ejected just before the ejection runs out.
    advance(Duration::from_secs(5) - MS).await;
    assert_eq!(eps.state(0), CircuitState::Open);
    for _ in 0..6 {
        assert_ne!(eps.pick(&[]).unwrap().index, 0);
    }
}

#[tokio::test(start_paused = true)]
async fn success_in_between_resets_the_counter() {
    let eps = Endpoints::new(3, cfg());
    assert_eq!(fail(&eps, 1, 4), None);
    assert_eq!(eps.record(plain(1), true), None);
    assert_eq!(fail(&eps, 1, 4), None);
    assert_eq!(eps.state(1), CircuitState::Closed);
    assert_eq!(eps.ejected(), 0);
    assert_eq!(
        eps.record(plain(1), false),
        opened(1, CircuitState::Closed, Duration::from_secs(5))
    );
    assert_eq!(eps.state(1), CircuitState::Open);
}

#[tokio::test(start_paused = true)]
async fn never_ejects_with_zero_threshold() {
    let eps = Endpoints::new(
        1,
        BreakerConfig {
            consecutive_failures: 0,
            ..cfg()
        },
    );
    assert_eq!(fail(&eps, 0, 1000), None);
    assert_eq!(eps.state(0), CircuitState::Closed);
    assert_eq!(eps.pick(&[]), Some(plain(0)));
}

#[tokio::test(start_paused = true)]
async fn one_probe_at_a_time_and_success_closes() {
    let eps = Endpoints::new(2, cfg());
    fail(&eps, 0, 5);
    advance(Duration::from_secs(5)).await;
    assert_eq!(eps.state(0), CircuitState::HalfOpen);
    let probe = pick_until(&eps, 0).unwrap();
    assert_eq!(
        probe,
        Pick {
            index: 0,
            probe: true
        }
    );
    // While the probe is out, other requests skip the endpoint.
    for _ in 0..10 {
        assert_eq!(eps.pick(&[]), Some(plain(1)));
    }
    assert_eq!(eps.state(0), CircuitState::HalfOpen);
    assert_eq!(eps.ejected(), 1);
    assert_eq!(
        eps.record(probe, true),
        Some(Transition {
            index: 0,
            from: CircuitState::HalfOpen,
            to: CircuitState::Closed,
            ejection: None,
        })
    );
    assert_eq!(eps.state(0), CircuitState::Closed);
    assert_eq!(eps.ejected(), 0);
    let picked: Vec<Pick> = (0..100).map(|_| eps.pick(&[]).unwrap()).collect();
    assert!(picked.iter().filter(|p| p.index == 0).count() > 20);
    assert!(picked.iter().all(|p| !p.probe));
    // The counter was reset: four failures do not eject again.
    assert_eq!(fail(&eps, 0, 4), None);
    assert_eq!(eps.state(0), CircuitState::Closed);
}

#[tokio::test(start_paused = true)]
async fn single_endpoint_probe_is_exclusive() {
    let eps = Endpoints::new(1, cfg());
    fail(&eps, 0, 5);
    assert_eq!(eps.pick(&[]), None);
    advance(Duration::from_secs(5)).await;
    let probe = eps.pick(&[]).unwrap();
    assert!(probe.probe);
    assert_eq!(eps.pick(&[]), None);
    assert_eq!(eps.pick(&[0]), None);
    eps.record(probe, true).unwrap();
    assert_eq!(eps.pick(&[]), Some(plain(0)));
}

#[tokio::test(start_paused = true)]
async fn probe_failure_doubles_the_ejection_up_to_the_cap() {
    let eps = Endpoints::new(
        1,
        BreakerConfig {
            max_ejection: Duration::from_secs(12),
            ..cfg()
        },
    );
    let secs = Duration::from_secs;
    assert_eq!(fail(&eps, 0, 5), opened(0, CircuitState::Closed, secs(5)));
    advance(secs(5)).await;
    let probe = eps.pick(&[]).unwrap();
    assert!(probe.probe);
    assert_eq!(
        eps.record(probe, false),
        opened(0, CircuitState::HalfOpen, secs(10))
    );
    // Not pickable before 2 x base, pickable at 2 x base.
    advance(secs(10) - MS).await;
    assert_eq!(eps.state(0), CircuitState::Open);
    assert_eq!(eps.pick(&[]), None);
    advance(MS).await;
    let probe = eps.pick(&[]).unwrap();
    assert!(probe.probe);
    // 20s is capped at 12s, and stays there.
    assert_eq!(
        eps.record(probe, false),
        opened(0, CircuitState::HalfOpen, secs(12))
    );
    advance(secs(12) - MS).await;
    assert_eq!(eps.pick(&[]), None);
    advance(MS).await;
    let probe = eps.pick(&[]).unwrap();
    assert_eq!(
        eps.record(probe, false),
        opened(0, CircuitState::HalfOpen, secs(12))
    );
}

#[tokio::test(start_paused = true)]
async fn huge_durations_do_not_overflow() {
    let eps = Endpoints::new(
        1,
        BreakerConfig {
            base_ejection: Duration::MAX / 2,
            max_ejection: Duration::MAX,
            jitter: 1.0,
            ..cfg()
        },
    );
    let t = fail(&eps, 0, 5).unwrap();
    assert!(t.ejection.unwrap() >= Duration::MAX / 2);
    assert_eq!(eps.pick(&[]), None);
    assert_eq!(eps.state(0), CircuitState::Open);
}

#[tokio::test(start_paused = true)]
async fn streak_is_forgotten_after_staying_closed_for_max_ejection() {
    let eps = Endpoints::new(
        1,
        BreakerConfig {
            max_ejection: Duration::from_secs(60),
            ..cfg()
        },
    );
    let secs = Duration::from_secs;
    fail(&eps, 0, 5); // 5s
    advance(secs(5)).await;
    let probe = eps.pick(&[]).unwrap();
    eps.record(probe, false); // 10s
    advance(secs(10)).await;
    let probe = eps.pick(&[]).unwrap();
    eps.record(probe, true).unwrap();
    // Failing again soon: third ejection in a row.
    advance(secs(60) - MS).await;
    assert_eq!(fail(&eps, 0, 5), opened(0, CircuitState::Closed, secs(20)));
    advance(secs(20)).await;
    let probe = eps.pick(&[]).unwrap();
    eps.record(probe, true).unwrap();
    // Closed for max_ejection: back to the base length.
    advance(secs(60)).await;
    assert_eq!(fail(&eps, 0, 5), opened(0, CircuitState::Closed, secs(5)));
}

#[tokio::test(start_paused = true)]
async fn sustained_success_forgets_the_streak() {
    // The drill: a backend crashes twice, minutes apart, and serves well
    // in between. The second crash must cost a base ejection, not a
    // doubled one that keeps the route failing after it is healthy.
    let eps = Endpoints::new(1, cfg());
    let secs = Duration::from_secs;
    assert_eq!(fail(&eps, 0, 5), opened(0, CircuitState::Closed, secs(5)));
    advance(secs(5)).await;
    let probe = eps.pick(&[]).unwrap();
    eps.record(probe, true).unwrap();
    // Nine successes are not yet sustained: a crash now doubles.
    for _ in 0..STREAK_RESET_SUCCESSES - 1 {
        assert_eq!(eps.record(plain(0), true), None);
    }
    assert_eq!(fail(&eps, 0, 5), opened(0, CircuitState::Closed, secs(10)));
    advance(secs(10)).await;
    let probe = eps.pick(&[]).unwrap();
    eps.record(probe, true).unwrap();
    // A failure in between starts the count of successes over.
    for _ in 0..STREAK_RESET_SUCCESSES - 1 {
        eps.record(plain(0), true);
    }
    eps.record(plain(0), false);
    for _ in 0..STREAK_RESET_SUCCESSES {
        eps.record(plain(0), true);
    }
    // Sustained success: the next crash is a base ejection again.
    assert_eq!(fail(&eps, 0, 5), opened(0, CircuitState::Closed, secs(5)));
}

#[tokio::test(start_paused = true)]
async fn released_results_neither_count_nor_reset() {
    let eps = Endpoints::new(2, cfg());
    fail(&eps, 0, 4);
    // A request-specific refusal in between: not a failure, and not a
    // success that would hide the four failures before it.
    for _ in 0..100 {
        eps.release(plain(0));
    }
    assert_eq!(eps.state(0), CircuitState::Closed);
    assert_eq!(
        eps.record(plain(0), false),
        opened(0, CircuitState::Closed, Duration::from_secs(5))
    );
    // A released probe does not hold the endpoint: the next pick probes.
    advance(Duration::from_secs(5)).await;
    let probe = pick_until(&eps, 0).unwrap();
    assert!(probe.probe);
    assert!(pick_until(&eps, 0).is_none(), "one probe at a time");
    eps.release(probe);
    let again = pick_until(&eps, 0).unwrap();
    assert!(again.probe);
    eps.record(again, true).unwrap();
    assert_eq!(eps.state(0), CircuitState::Closed);
}

#[tokio::test(start_paused = true)]
async fn jitter_stretches_within_bounds_and_respects_the_cap() {
    let base = Duration::from_secs(4);
    let mut lens = Vec::new();
    for _ in 0..200 {
        let eps = Endpoints::new(
            1,
            BreakerConfig {
                base_ejection: base,
                jitter: 0.5,
                ..cfg()
            },
        );
        let len = fail(&eps, 0, 5).unwrap().ejection.unwrap();
        assert!(len >= base && len <= base.mul_f64(1.5), "{len:?}");
        lens.push(len);
    }
    // Jitter actually varies the length.
    assert!(lens.iter().any(|l| *l != lens[0]));
    // The endpoint stays ejected for the jittered length.
    let eps = Endpoints::new(
        1,
        BreakerConfig {
            base_ejection: base,
            jitter: 1.0,
            ..cfg()
        },
    );
    let len = fail(&eps, 0, 5).unwrap().ejection.unwrap();
    advance(len - MS).await;
    assert_eq!(eps.pick(&[]), None);
    advance(MS).await;
    assert!(eps.pick(&[]).unwrap().probe);
    // At the cap, jitter does not push past it.
    let eps = Endpoints::new(
        1,
        BreakerConfig {
            base_ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(10),
            jitter: 1.0,
            ..cfg()
        },
    );
    let len = fail(&eps, 0, 5).unwrap().ejection.unwrap();
    assert_eq!(len, Duration::from_secs(10));
}

#[tokio::test(start_paused = true)]
async fn max_ejected_share_limits_ejections() {
    let eps = Endpoints::new(4, cfg());
    assert_eq!(eps.max_ejected(), 2);
    assert!(fail(&eps, 0, 5).is_some());
    assert!(fail(&eps, 1, 5).is_some());
    assert_eq!(fail(&eps, 2, 7), None);
    assert_eq!(eps.state(2), CircuitState::Closed);
    assert_eq!(eps.ejected(), 2);
    for _ in 0..8 {
        let p = eps.pick(&[]).unwrap();
        assert!(p.index >= 2);
    }
    // Once endpoint 0 is back, the next failure of 2 ejects it: its
    // counter was kept.
    advance(Duration::from_secs(5)).await;
    let probe = pick_until(&eps, 0).unwrap();
    assert!(probe.probe);
    // Endpoint 0 still counts as ejected while probing.
    assert_eq!(fail(&eps, 2, 1), None);
    eps.record(probe, true).unwrap();
    assert_eq!(eps.ejected(), 1);
    assert_eq!(
        eps.record(plain(2), false),
        opened(2, CircuitState::Closed, Duration::from_secs(5))
    );
    assert_eq!(eps.ejected(), 2);
}

#[tokio::test(start_paused = true)]
async fn at_least_one_endpoint_may_be_ejected() {
    let eps = Endpoints::new(1, cfg());
    assert!(fail(&eps, 0, 5).is_some());
    assert_eq!(eps.ejected(), 1);
    assert_eq!(eps.pick(&[]), None);
    assert_eq!(eps.pick(&[0]), None);

    let eps = Endpoints::new(
        4,
        BreakerConfig {
            max_ejected_percent: 0,
            ..cfg()
        },
    );
    assert!(fail(&eps, 3, 5).is_some());
    assert_eq!(fail(&eps, 2, 5), None);
    assert_eq!(eps.ejected(), 1);
}

#[tokio::test(start_paused = true)]
async fn exclude_skips_tried_endpoints_unless_nothing_else() {
    let eps = Endpoints::new(2, cfg());
    for _ in 0..6 {
        assert_eq!(eps.pick(&[0]), Some(plain(1)));
    }
    // Only the tried endpoint is left: the retry gets it back.
    assert!(eps.pick(&[0, 1]).is_some_and(|p| !p.probe));
    fail(&eps, 1, 5);
    for _ in 0..4 {
        assert_eq!(eps.pick(&[0]), Some(plain(0)));
    }
    // Out-of-range indices in `exclude` are harmless.
    assert_eq!(eps.pick(&[7]), Some(plain(0)));
}

/// Picks `n` times, each request finishing at once; counts by index.
fn spread<const N: usize>(eps: &Endpoints, n: usize) -> [usize; N] {
    let mut counts = [0; N];
    for _ in 0..n {
        let p = eps.pick(&[]).unwrap();
        counts[p.index] += 1;
        eps.start(p.index).finish(true);
    }
    counts
}

#[tokio::test(start_paused = true)]
async fn healthy_endpoints_share_and_ejected_ones_get_nothing() {
    let eps = Endpoints::new(4, cfg());
    let counts: [usize; 4] = spread(&eps, 4000);
    assert!(
        counts.iter().all(|c| (850..=1150).contains(c)),
        "{counts:?}"
    );
    // Endpoint 1 ejected: the others share, it gets nothing.
    fail(&eps, 1, 5);
    let counts: [usize; 4] = spread(&eps, 3000);
    assert_eq!(counts[1], 0);
    assert!(
        counts.iter().all(|c| *c == 0 || (850..=1150).contains(c)),
        "{counts:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn weights_split_the_traffic() {
    let eps = Endpoints::weighted(&[9, 1], cfg());
    let counts: [usize; 2] = spread(&eps, 10_000);
    assert!((8700..=9300).contains(&counts[0]), "{counts:?}");
    // A weight of 0 counts as 1.
    let eps = Endpoints::weighted(&[0, 1], cfg());
    let counts: [usize; 2] = spread(&eps, 2000);
    assert!(counts[0] > 800, "{counts:?}");
}

#[tokio::test(start_paused = true)]
async fn slow_failing_and_busy_endpoints_get_less() {
    let eps = Endpoints::new(2, cfg());
    let mut slow = eps.start(1);
    eps.start(0).finish(true);
    advance(Duration::from_millis(200)).await;
    slow.sent();
    advance(Duration::from_millis(300)).await;
    assert_eq!(slow.finish(true), Some(0.3));
    let counts: [usize; 2] = spread(&eps, 1000);
    assert!(counts[1] < 30, "{counts:?}");

    // Failures double the estimate: chosen less before ejection.
    let eps = Endpoints::new(2, cfg());
    for _ in 0..4 {
        eps.start(1).finish(false);
    }
    assert!((eps.latency_estimate(1).unwrap() - 0.16).abs() < 1e-12);
    assert_eq!(eps.state(1), CircuitState::Closed);
    let counts: [usize; 2] = spread(&eps, 1000);
    assert!(counts[1] < 150, "{counts:?}");

    // Requests in flight count; a dropped guard stops counting.
    let eps = Endpoints::new(2, cfg());
    let busy: Vec<InFlight> = (0..9).map(|_| eps.start(0)).collect();
    let mut counts = [0; 2];
    for _ in 0..1000 {
        counts[eps.pick(&[]).unwrap().index] += 1;
    }
    assert!(counts[0] < 150, "{counts:?}");
    drop(busy);
    let counts: [usize; 2] = spread(&eps, 1000);
    assert!(counts[0] > 350, "{counts:?}");
    assert_eq!(eps.latency_estimate(5), None);
}

#[tokio::test(start_paused = true)]
async fn a_successful_probe_resets_the_latency_estimate() {
    let eps = Endpoints::new(2, cfg());
    for _ in 0..5 {
        eps.start(0).finish(false);
        eps.record(plain(0), false);
    }
    assert_eq!(eps.state(0), CircuitState::Open);
    assert!(eps.latency_estimate(0).unwrap() > 0.3);
    advance(Duration::from_secs(5)).await;
    let probe = eps.pick(&[]).unwrap();
    assert!(probe.probe);
    eps.record(probe, true).unwrap();
    assert_eq!(eps.latency_estimate(0), Some(0.01));
}

#[tokio::test(start_paused = true)]
async fn unrecorded_probe_expires_after_base_ejection() {
    let eps = Endpoints::new(1, cfg());
    fail(&eps, 0, 5);
    advance(Duration::from_secs(5)).await;
    let lost = eps.pick(&[]).unwrap();
    assert!(lost.probe);
    advance(Duration::from_secs(5) - MS).await;
    assert_eq!(eps.pick(&[]), None);
    advance(MS).await;
    let probe = eps.pick(&[]).unwrap();
    assert!(probe.probe);
    assert_eq!(eps.pick(&[]), None);
    // The new probe decides.
    assert_eq!(
        eps.record(probe, false),
        opened(0, CircuitState::HalfOpen, Duration::from_secs(10))
    );
    // The lost probe's late result no longer counts.
    assert_eq!(eps.record(lost, true), None);
    assert_eq!(eps.state(0), CircuitState::Open);
}

#[tokio::test(start_paused = true)]
async fn late_results_of_an_ejected_endpoint_are_ignored() {
    let eps = Endpoints::new(2, cfg());
    fail(&eps, 0, 5);
    // In-flight requests finishing after the ejection change nothing.
    assert_eq!(eps.record(plain(0), true), None);
    assert_eq!(eps.record(plain(0), false), None);
    assert_eq!(eps.state(0), CircuitState::Open);
    advance(Duration::from_secs(5)).await;
    let probe = pick_until(&eps, 0).unwrap();
    assert_eq!(eps.record(plain(0), true), None);
    assert_eq!(eps.state(0), CircuitState::HalfOpen);
    assert!(eps.record(probe, true).is_some());
}

#[tokio::test(start_paused = true)]
async fn no_endpoints() {
    let eps = Endpoints::new(0, BreakerConfig::default());
    assert!(eps.is_empty());
    assert_eq!(eps.len(), 0);
    assert_eq!(eps.pick(&[]), None);
    assert_eq!(eps.pick(&[0]), None);
    assert_eq!(eps.record(plain(0), false), None);
    assert_eq!(eps.state(0), CircuitState::Closed);
    assert!(eps.states().is_empty());
    assert_eq!(eps.ejected(), 0);
}

#[test]
fn concurrent_picks_spread_and_release() {
    let eps = Arc::new(Endpoints::new(4, BreakerConfig::default()));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let eps = Arc::clone(&eps);
            std::thread::spawn(move || {
                let mut counts = [0usize; 4];
                for _ in 0..1000 {
                    let p = eps.pick(&[]).unwrap();
                    counts[p.index] += 1;
                    let flight = eps.start(p.index);
                    eps.record(p, true);
                    flight.finish(true);
                }
                counts
            })
        })
        .collect();
    let mut total = [0usize; 4];
    for t in threads {
        for (sum, c) in total.iter_mut().zip(t.join().unwrap()) {
            *sum += c;
        }
    }
    // Real time: a thread preempted mid-request makes its endpoint
    // look slow (peak EWMA) for a while, so only a loose spread holds.
    assert_eq!(total.iter().sum::<usize>(), 8000);
    assert!(total.iter().all(|c| *c > 500), "{total:?}");
    // Every guard was dropped: nothing counts as in flight.
    assert!(eps.lock().slots.iter().all(|s| s.pending == 0));
}
