//! Endpoint choice for an outbound route: power of two choices over a peak
//! latency EWMA (as Linkerd does), with endpoint weights.
//!
//! Pure: the breaker (`resilience::breaker`) keeps the per-endpoint state,
//! leaves out ejected and excluded endpoints, and hands [`choose`] the
//! candidates with their cost and three random numbers.
//!
//! * **Cost** of an endpoint: its latency estimate (at least [`MIN_RTT`])
//!   times its requests in flight plus one.
//! * **Latency estimate** ([`PeakEwma`]): the first response sets it; a
//!   slower response raises it at once (peak); a faster one pulls it down
//!   with time constant [`TAU`]; without responses it decays toward zero,
//!   so an endpoint that was slow is tried again. Before any response it is
//!   [`DEFAULT_RTT`]. A failure doubles it (up to [`FAILURE_CAP`]).
//! * **Choice**: the first candidate is drawn with probability proportional
//!   to its weight, the second uniformly among the others. Of the two, each
//!   wins with odds proportional to `weight / cost`. With equal costs this
//!   sends each endpoint exactly its weight's share of the traffic; a
//!   cheaper endpoint wins more often than its weight alone would say. (A
//!   plain "lower cost wins" cannot honour a 90/10 split between two
//!   endpoints: both are always the two candidates.)

use std::time::Duration;

use tokio::time::Instant;

/// Time constant of the EWMA (Linkerd's default).
pub const TAU: Duration = Duration::from_secs(10);
/// The estimate of an endpoint that has not answered yet.
pub const DEFAULT_RTT: Duration = Duration::from_millis(10);
/// Latencies below this count as this much: sub-millisecond differences
/// are noise and must not skew a configured split.
pub const MIN_RTT: Duration = Duration::from_millis(1);
/// A failure doubles the estimate, up to this (or the estimate, if higher).
pub const FAILURE_CAP: Duration = Duration::from_secs(1);

/// Linkerd's peak-EWMA latency estimate of one endpoint, in seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PeakEwma {
    /// `None` until the first response.
    rtt: Option<f64>,
    at: Instant,
}

impl PeakEwma {
    /// No sample yet: the estimate is [`DEFAULT_RTT`].
    pub fn new(now: Instant) -> Self {
        Self { rtt: None, at: now }
    }

    /// The estimate at `now` in seconds, decayed since the last update.
    pub fn estimate(&self, now: Instant) -> f64 {
        match self.rtt {
            Some(rtt) => rtt * self.decay(now),
            None => DEFAULT_RTT.as_secs_f64(),
        }
    }

    /// A response after `rtt`: above the estimate it becomes the estimate;
    /// below, it is blended in by how long ago the last update was.
    pub fn observe(&mut self, rtt: Duration, now: Instant) {
        let sample = rtt.as_secs_f64();
        self.rtt = Some(match self.rtt {
            Some(prev) if sample < self.estimate(now) => {
                let decay = self.decay(now);
                prev * decay + sample * (1.0 - decay)
            }
            _ => sample,
        });
        self.at = now;
    }

    /// A failure (connect error, 5xx, reset, timeout): doubles the
    /// estimate, up to [`FAILURE_CAP`] (a higher estimate stays).
    pub fn penalize(&mut self, now: Instant) {
        let cur = self.estimate(now);
        self.rtt = Some((cur * 2.0).min(FAILURE_CAP.as_secs_f64()).max(cur));
        self.at = now;
    }

    fn decay(&self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        (-elapsed / TAU.as_secs_f64()).exp()
    }
}

/// The cost of an endpoint with latency estimate `rtt` (seconds) and
/// `pending` requests in flight.
pub fn cost(rtt: f64, pending: u32) -> f64 {
    rtt.max(MIN_RTT.as_secs_f64()) * (f64::from(pending) + 1.0)
}

/// An endpoint that can take the request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    pub index: usize,
    pub weight: u32,
    /// The route's weighted backend (crank-control's split); 0 for all
    /// endpoints of a route from the config file.
    pub group: u32,
    /// From [`cost`]; positive.
    pub cost: f64,
}

/// Chooses an endpoint. `u` holds four uniform numbers in `[0, 1)`.
///
/// 1. The split: a backend group is drawn with odds proportional to the sum
///    of its candidates' weights (crank-control's 90/10 between pools). A
///    route from the config file has one group, so this step is a no-op.
/// 2. Power of two choices within the group: the first candidate is drawn
///    by weight, the second uniformly among the others, and the third
///    number settles which of the two wins, with odds `weight / cost`: at
///    equal cost each endpoint gets its weight's share, a slower, busier
///    or failing one gets less.
///
/// Returns the winner's `index`; `None` without candidates.
pub fn choose(cands: &[Candidate], u: [f64; 4]) -> Option<usize> {
    let first = cands.first()?;
    // 1. The backend group, by total weight (no allocation: a request
    //    picks among a handful of candidates).
    let group = if cands.iter().all(|c| c.group == first.group) {
        first.group
    } else {
        split_group(cands, u[3])
    };
    let in_group = || cands.iter().filter(move |c| c.group == group);
    let n = in_group().count();
    // 2. Two choices within it.
    let (first, rest) = match n {
        0 => return None,
        1 => return in_group().next().map(|c| c.index),
        _ => {
            let total: f64 = in_group().map(weight).sum();
            let mut target = u[0] * total;
            let pos = in_group()
                .position(|c| {
                    target -= weight(c);
                    target < 0.0
                })
                .unwrap_or(n - 1);
            (pos, n - 1)
        }
    };
    let mut second = ((u[1] * rest as f64) as usize).min(rest - 1);
    if second >= first {
        second += 1;
    }
    let (a, b) = (in_group().nth(first)?, in_group().nth(second)?);
    let score = |c: &Candidate| weight(c) / c.cost.max(f64::MIN_POSITIVE);
    let (sa, sb) = (score(a), score(b));
    Some(if u[2] * (sa + sb) < sa {
        a.index
    } else {
        b.index
    })
}

fn weight(c: &Candidate) -> f64 {
    f64::from(c.weight.max(1))
}

/// The backend group drawn with `u` (uniform in `[0, 1)`), odds by the sum
/// of its candidates' weights; groups in order of first appearance.
fn split_group(cands: &[Candidate], u: f64) -> u32 {
    let groups = cands
        .iter()
        .enumerate()
        .filter(|(i, c)| !cands[..*i].iter().any(|p| p.group == c.group))
        .map(|(_, c)| c.group);
    let group_weight = |g: u32| -> f64 {
        let mut w = cands.iter().filter(|c| c.group == g).map(weight);
        let first = w.next().unwrap_or(0.0);
        w.fold(first, |acc, x| acc + x)
    };
    let total: f64 = groups.clone().map(group_weight).sum();
    let mut target = u * total;
    let mut last = None;
    for g in groups {
        last = Some(g);
        target -= group_weight(g);
        if target < 0.0 {
            return g;
        }
    }
    last.unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    const MS: f64 = 0.001;

    fn c(index: usize, weight: u32, cost: f64) -> Candidate {
        Candidate {
            index,
            weight,
            group: 0,
            cost,
        }
    }

    /// Shares of `n` choices among `cands`, by index (up to 8).
    fn shares(cands: &[Candidate], n: usize) -> [f64; 8] {
        let mut rng = rand::rng();
        let mut counts = [0usize; 8];
        for _ in 0..n {
            let u = [rng.random(), rng.random(), rng.random(), rng.random()];
            counts[choose(cands, u).unwrap()] += 1;
        }
        counts.map(|k| k as f64 / n as f64)
    }

    #[test]
    fn choice_table() {
        let two = [c(0, 1, 10.0 * MS), c(1, 1, 90.0 * MS)];
        let cases: &[(&[Candidate], [f64; 3], Option<usize>)] = &[
            (&[], [0.5; 3], None),
            (&[c(3, 1, 1.0)], [0.99; 3], Some(3)),
            // Lower cost wins with odds 90:10.
            (&two, [0.1, 0.5, 0.0], Some(0)),
            (&two, [0.9, 0.5, 0.89], Some(0)),
            (&two, [0.1, 0.5, 0.91], Some(1)),
            // u[0] draws by weight, u[1] the other one among the rest; an
            // endpoint left out of the pair cannot win, a slow one drawn
            // first still loses to a fast one.
            (
                &[c(0, 1, MS), c(1, 1, MS), c(2, 1, 100.0)],
                [0.0, 0.0, 0.5],
                Some(1),
            ),
            (
                &[c(0, 1, MS), c(1, 1, MS), c(2, 1, 100.0)],
                [0.99, 0.0, 0.5],
                Some(0),
            ),
            (
                &[c(0, 1, 100.0), c(1, 1, MS), c(2, 1, MS)],
                [0.0, 0.99, 0.5],
                Some(2),
            ),
            // Equal costs: weight decides the odds.
            (&[c(4, 9, MS), c(7, 1, MS)], [0.5, 0.5, 0.89], Some(4)),
            (&[c(4, 9, MS), c(7, 1, MS)], [0.5, 0.5, 0.91], Some(7)),
        ];
        for (cands, u, want) in cases {
            // One backend group: the fourth number (the split) plays no part.
            let u4 = [u[0], u[1], u[2], 0.5];
            assert_eq!(choose(cands, u4), *want, "{cands:?} {u:?}");
        }
    }

    #[test]
    fn backends_split_by_weight_even_when_one_is_busier() {
        // Backend 0 (weight 80 over two endpoints) is slower and busier than
        // backend 1 (weight 20): the split still holds, the cost only
        // decides within a backend.
        let g = |index, weight, group, cost| Candidate {
            index,
            weight,
            group,
            cost,
        };
        let cands = [
            g(0, 40, 0, 50.0 * MS),
            g(1, 40, 0, 80.0 * MS),
            g(2, 20, 1, MS),
        ];
        let s = shares(&cands, 20_000);
        assert!((s[0] + s[1] - 0.8).abs() < 0.02, "{s:?}");
        assert!(
            s[0] > s[1],
            "the faster endpoint of the backend wins more: {s:?}"
        );
    }

    #[test]
    fn weights_split_traffic_when_costs_are_equal() {
        let s = shares(&[c(0, 9, MS), c(1, 1, MS)], 10_000);
        assert!((s[0] - 0.9).abs() < 0.03, "{s:?}");
        // Two pools of two, 90/10 in all.
        let pools = [c(0, 45, MS), c(1, 45, MS), c(2, 5, MS), c(3, 5, MS)];
        let s = shares(&pools, 10_000);
        assert!((s[0] + s[1] - 0.9).abs() < 0.03, "{s:?}");
        assert!((s[2] - s[3]).abs() < 0.03, "{s:?}");
    }

    #[test]
    fn slow_or_busy_endpoints_get_far_fewer_picks() {
        let s = shares(&[c(0, 1, 5.0 * MS), c(1, 1, 500.0 * MS)], 10_000);
        assert!(s[1] < 0.03, "{s:?}");
        let s = shares(
            &[c(0, 1, 5.0 * MS), c(1, 1, 500.0 * MS), c(2, 1, 5.0 * MS)],
            10_000,
        );
        assert!(s[1] < 0.02 && s[0] > 0.4 && s[2] > 0.4, "{s:?}");
        // Cost counts requests in flight.
        assert_eq!(cost(0.004, 3), 4.0 * 0.004);
        assert_eq!(cost(0.0, 0), MIN_RTT.as_secs_f64());
    }

    #[test]
    fn ewma_first_sample_then_peak_then_decay() {
        let t0 = Instant::now();
        let secs = Duration::from_secs;
        let mut e = PeakEwma::new(t0);
        assert_eq!(e.estimate(t0 + secs(100)), DEFAULT_RTT.as_secs_f64());
        e.observe(Duration::from_millis(4), t0);
        assert!((e.estimate(t0) - 0.004).abs() < 1e-12);
        // A slower response jumps to it.
        e.observe(Duration::from_millis(100), t0);
        assert!((e.estimate(t0) - 0.1).abs() < 1e-12);
        // A fast one a tau later: weight 1 - 1/e for the sample.
        e.observe(Duration::ZERO, t0 + TAU);
        let want = 0.1 / std::f64::consts::E;
        assert!((e.estimate(t0 + TAU) - want).abs() < 1e-9);
        // Without responses it decays toward zero with tau.
        assert!((e.estimate(t0 + TAU * 2) - want / std::f64::consts::E).abs() < 1e-9);
        // A fast response right after a slow one barely moves it.
        let mut e = PeakEwma::new(t0);
        e.observe(Duration::from_millis(100), t0);
        e.observe(Duration::from_millis(1), t0 + Duration::from_millis(10));
        assert!(e.estimate(t0 + Duration::from_millis(10)) > 0.099);
    }

    #[test]
    fn failures_double_the_estimate_up_to_the_cap() {
        let t0 = Instant::now();
        let mut e = PeakEwma::new(t0);
        e.penalize(t0);
        assert!((e.estimate(t0) - 0.02).abs() < 1e-12);
        for _ in 0..10 {
            e.penalize(t0);
        }
        assert_eq!(e.estimate(t0), FAILURE_CAP.as_secs_f64());
        // A slower endpoint than the cap is not made faster.
        let mut e = PeakEwma::new(t0);
        e.observe(Duration::from_secs(3), t0);
        e.penalize(t0);
        assert_eq!(e.estimate(t0), 3.0);
    }

    /// The allocation-free `choose` picks exactly what the version with
    /// vectors picked, for the same random numbers (split routes too).
    #[test]
    fn same_choice_as_before() {
        let mut rng = rand::rng();
        for _ in 0..20_000 {
            let n = rng.random_range(1..7);
            let cands: Vec<Candidate> = (0..n)
                .map(|i| Candidate {
                    index: i * 3,
                    weight: rng.random_range(0..5),
                    group: rng.random_range(0..3),
                    cost: rng.random_range(0.0001..0.5),
                })
                .collect();
            let u = [rng.random(), rng.random(), rng.random(), rng.random()];
            assert_eq!(
                choose(&cands, u),
                choose_before(&cands, u),
                "{cands:?} {u:?}"
            );
        }
        assert_eq!(choose(&[], [0.5; 4]), None);
    }

    /// `choose` as it was (two vectors per call): the test's reference.
    fn choose_before(cands: &[Candidate], u: [f64; 4]) -> Option<usize> {
        let weight = |c: &Candidate| f64::from(c.weight.max(1));
        if cands.is_empty() {
            return None;
        }
        // 1. The backend group, by total weight.
        let mut groups: Vec<(u32, f64)> = Vec::new();
        for c in cands {
            match groups.iter_mut().find(|(g, _)| *g == c.group) {
                Some((_, w)) => *w += weight(c),
                None => groups.push((c.group, weight(c))),
            }
        }
        let group = if groups.len() == 1 {
            groups[0].0
        } else {
            let total: f64 = groups.iter().map(|(_, w)| w).sum();
            let mut target = u[3] * total;
            groups
                .iter()
                .find(|(_, w)| {
                    target -= w;
                    target < 0.0
                })
                .unwrap_or(&groups[groups.len() - 1])
                .0
        };
        let in_group: Vec<&Candidate> = cands.iter().filter(|c| c.group == group).collect();
        // 2. Two choices within it.
        let (first, rest) = match in_group.as_slice() {
            [only] => return Some(only.index),
            _ => {
                let total: f64 = in_group.iter().map(|c| weight(c)).sum();
                let mut target = u[0] * total;
                let pos = in_group
                    .iter()
                    .position(|c| {
                        target -= weight(c);
                        target < 0.0
                    })
                    .unwrap_or(in_group.len() - 1);
                (pos, in_group.len() - 1)
            }
        };
        let mut second = ((u[1] * rest as f64) as usize).min(rest - 1);
        if second >= first {
            second += 1;
        }
        let (a, b) = (in_group[first], in_group[second]);
        let score = |c: &Candidate| weight(c) / c.cost.max(f64::MIN_POSITIVE);
        let (sa, sb) = (score(a), score(b));
        Some(if u[2] * (sa + sb) < sa {
            a.index
        } else {
            b.index
        })
    }
}
