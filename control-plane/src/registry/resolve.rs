//! Route resolution: which registered endpoints serve each of a route's
//! backends, and with what weight. A pure function of the route and the
//! registry's entries.
//!
//! An endpoint belongs to a backend when it lists the backend's capability
//! and carries every selector label with the same value (extra labels are
//! fine). Each backend's weight is split evenly among its endpoints, in
//! integers that keep the ratios exact (reduced by their common divisor):
//! backends weighted 90/10 with 3 and 1 endpoints give 3, 3, 3 and 1.
//! Weights are relative, so a backend without endpoints simply drops out
//! and its share goes to the others; it is listed in
//! [`Resolved::empty_backends`] so operators can see it.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use crank_api::mesh::{Backend, EndpointRegistration, MeshRoute};
use serde::{Deserialize, Serialize};

use super::Entry;

/// The largest per-endpoint weight when exact integer ratios do not fit a
/// `u32` (thousands of endpoints in backends of many different sizes):
/// weights are then scaled to at most this, rounded, and at least 1.
const FALLBACK_SCALE: f64 = 1_000_000.0;

/// A route's endpoints with their weights.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resolved {
    /// Sorted by backend index, then address. An endpoint that two backends
    /// select appears once for each, with each backend's weight.
    pub endpoints: Vec<WeightedEndpoint>,
    /// Indexes (into the route's `backends`) of backends no endpoint
    /// serves; they receive no traffic.
    pub empty_backends: Vec<usize>,
}

/// An endpoint chosen for a route, with its share of the route's traffic
/// relative to the other endpoints' weights.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightedEndpoint {
    pub address: SocketAddr,
    /// The identity the proxy expects the endpoint's certificate to prove.
    pub identity: String,
    pub labels: BTreeMap<String, String>,
    /// Never 0.
    pub weight: u32,
    /// Which of the route's backends selected it (index into `backends`).
    pub backend: usize,
}

/// Whether `labels` carry every `selector` label with the same value. An
/// empty selector matches everything.
pub fn matches(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector
        .iter()
        .all(|(key, value)| labels.get(key) == Some(value))
}

/// The weighted endpoints of `route` among `endpoints` (see the module
/// docs). Backends with weight 0 are drained: their endpoints get no
/// traffic and are left out, and they are not listed as empty. Duplicate
/// addresses in `endpoints` count once per backend.
pub fn resolve(route: &MeshRoute, endpoints: &[Entry]) -> Resolved {
    let members: Vec<Vec<&EndpointRegistration>> = route
        .backends
        .iter()
        .map(|backend| members(backend, endpoints))
        .collect();
    let shares: Vec<(u32, usize)> = route
        .backends
        .iter()
        .zip(&members)
        .map(|(backend, m)| (backend.weight, m.len()))
        .collect();
    let weights = per_endpoint_weights(&shares);
    let endpoints = members
        .iter()
        .zip(weights)
        .enumerate()
        .filter(|(_, (_, weight))| *weight > 0)
        .flat_map(|(backend, (m, weight))| {
            m.iter().map(move |reg| WeightedEndpoint {
                address: reg.address,
                identity: reg.identity.clone(),
                labels: reg.labels.clone(),
                weight,
                backend,
            })
        })
        .collect();
    let empty_backends = members
        .iter()
        .enumerate()
        .filter(|(_, m)| m.is_empty())
        .map(|(i, _)| i)
        .collect();
    Resolved {
        endpoints,
        empty_backends,
    }
}

/// The registrations that serve `backend`, sorted by address, once each.
fn members<'a>(backend: &Backend, endpoints: &'a [Entry]) -> Vec<&'a EndpointRegistration> {
    let mut found: Vec<&EndpointRegistration> = endpoints
        .iter()
        .map(|e| &e.registration)
        .filter(|reg| reg.capabilities.contains(&backend.capability))
        .filter(|reg| matches(&backend.selector, &reg.labels))
        .collect();
    found.sort_by_key(|reg| reg.address);
    found.dedup_by_key(|reg| reg.address);
    found
}

/// For each backend's `(weight, endpoint count)`, the weight of each of its
/// endpoints: `weight * L / count` with `L` the least common multiple of
/// the counts, divided by the common divisor of all results; 0 for
/// backends without endpoints or with weight 0.
fn per_endpoint_weights(shares: &[(u32, usize)]) -> Vec<u32> {
    let live = |&(weight, count): &(u32, usize)| weight > 0 && count > 0;
    let mut l: u128 = 1;
    for &(_, count) in shares.iter().filter(|s| live(s)) {
        l = lcm(l, count as u128);
        if l > u128::from(u64::MAX) {
            return scaled_weights(shares);
        }
    }
    let exact: Vec<u128> = shares
        .iter()
        .map(|s| {
            if live(s) {
                u128::from(s.0) * l / s.1 as u128
            } else {
                0
            }
        })
        .collect();
    let divisor = exact.iter().fold(0, |g, &w| gcd(g, w)).max(1);
    let reduced: Option<Vec<u32>> = exact
        .iter()
        .map(|w| u32::try_from(w / divisor).ok())
        .collect();
    reduced.unwrap_or_else(|| scaled_weights(shares))
}

/// The fallback: per-endpoint shares scaled so the largest is
/// [`FALLBACK_SCALE`], each at least 1.
fn scaled_weights(shares: &[(u32, usize)]) -> Vec<u32> {
    let share = |&(weight, count): &(u32, usize)| {
        if weight > 0 && count > 0 {
            f64::from(weight) / count as f64
        } else {
            0.0
        }
    };
    let max = shares.iter().map(share).fold(0.0, f64::max);
    shares
        .iter()
        .map(|s| match share(s) {
            0.0 => 0,
            x => ((x / max * FALLBACK_SCALE).round() as u32).max(1),
        })
        .collect()
}

fn gcd(mut a: u128, mut b: u128) -> u128 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

fn lcm(a: u128, b: u128) -> u128 {
    a / gcd(a, b) * b
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use crank_api::mesh::RouteMatch;

    use super::super::LeaseId;
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn backend(capability: &str, selector: &[(&str, &str)], weight: u32) -> Backend {
        Backend {
            capability: capability.into(),
            selector: labels(selector),
            weight,
            egress: None,
        }
    }

    fn route(backends: Vec<Backend>) -> MeshRoute {
        MeshRoute {
            name: "transcode".into(),
            matches: RouteMatch::default(),
            backends,
            timeout: None,
            retry: Default::default(),
            circuit: Default::default(),
            clients: vec![],
            server_speaks_first: false,
        }
    }

    fn ep(address: &str, capabilities: &[&str], pairs: &[(&str, &str)]) -> Entry {
        Entry {
            lease: LeaseId::new(address),
            registration: EndpointRegistration {
                address: address.parse().unwrap(),
                identity: format!("svc-{address}"),
                capabilities: capabilities.iter().map(|c| c.to_string()).collect(),
                labels: labels(pairs),
            },
            registered_at: UNIX_EPOCH,
            last_heartbeat: UNIX_EPOCH,
            expires_in: Duration::from_secs(30),
        }
    }

    /// `(backend, address, weight)` of each resolved endpoint.
    fn summary(r: &Resolved) -> Vec<(usize, String, u32)> {
        r.endpoints
            .iter()
            .map(|e| (e.backend, e.address.to_string(), e.weight))
            .collect()
    }

    fn backend_sums(r: &Resolved, backends: usize) -> Vec<u64> {
        let mut sums = vec![0u64; backends];
        for e in &r.endpoints {
            sums[e.backend] += u64::from(e.weight);
        }
        sums
    }

    #[test]
    fn selector_matching_table() {
        type Labels = &'static [(&'static str, &'static str)];
        let gpu: Labels = &[("gpu", "nvidia")];
        let cases: &[(&str, Labels, Labels, bool)] = &[
            ("empty selector, no labels", &[], &[], true),
            ("empty selector, some labels", &[], gpu, true),
            ("exact", gpu, gpu, true),
            (
                "extra labels are fine",
                gpu,
                &[("gpu", "nvidia"), ("zone", "eu")],
                true,
            ),
            ("missing label", gpu, &[("zone", "eu")], false),
            ("no labels at all", gpu, &[], false),
            ("different value", gpu, &[("gpu", "amd")], false),
            (
                "values are case-sensitive",
                gpu,
                &[("gpu", "NVIDIA")],
                false,
            ),
            (
                "every selector label needed",
                &[("gpu", "nvidia"), ("zone", "eu")],
                gpu,
                false,
            ),
        ];
        for (name, selector, have, want) in cases {
            assert_eq!(matches(&labels(selector), &labels(have)), *want, "{name}");
        }
    }

    #[test]
    fn resolution_filters_by_capability_and_selector() {
        let r = route(vec![backend("transcode:v1", &[("gpu", "nvidia")], 100)]);
        let entries = [
            ep("10.0.0.1:8443", &["transcode:v1"], &[("gpu", "nvidia")]),
            ep("10.0.0.2:8443", &["transcode:v2"], &[("gpu", "nvidia")]),
            ep("10.0.0.3:8443", &["transcode:v1"], &[("gpu", "amd")]),
            ep("10.0.0.4:8443", &["transcode:v1"], &[]),
            ep(
                "10.0.0.5:8443",
                &["thumbnail:v1", "transcode:v1"],
                &[("gpu", "nvidia"), ("zone", "eu")],
            ),
        ];
        let resolved = resolve(&r, &entries);
        assert_eq!(
            summary(&resolved),
            [
                (0, "10.0.0.1:8443".into(), 1),
                (0, "10.0.0.5:8443".into(), 1)
            ]
        );
        assert!(resolved.empty_backends.is_empty());
        let first = &resolved.endpoints[0];
        assert_eq!(first.identity, "svc-10.0.0.1:8443");
        assert_eq!(first.labels, labels(&[("gpu", "nvidia")]));
    }

    #[test]
    fn weights_90_10_with_3_and_1_endpoints() {
        let r = route(vec![
            backend("transcode:v1", &[("pool", "a")], 90),
            backend("transcode:v1", &[("pool", "b")], 10),
        ]);
        let entries = [
            ep("10.0.0.1:8443", &["transcode:v1"], &[("pool", "a")]),
            ep("10.0.0.2:8443", &["transcode:v1"], &[("pool", "a")]),
            ep("10.0.0.3:8443", &["transcode:v1"], &[("pool", "a")]),
            ep("10.0.1.1:8443", &["transcode:v1"], &[("pool", "b")]),
        ];
        let resolved = resolve(&r, &entries);
        assert_eq!(
            summary(&resolved),
            [
                (0, "10.0.0.1:8443".into(), 3),
                (0, "10.0.0.2:8443".into(), 3),
                (0, "10.0.0.3:8443".into(), 3),
                (1, "10.0.1.1:8443".into(), 1),
            ]
        );
        let sums = backend_sums(&resolved, 2);
        assert_eq!(sums[0] * 10, sums[1] * 90, "sums {sums:?} are 90:10");
    }

    #[test]
    fn weights_keep_ratios_for_uneven_counts() {
        // 2 endpoints vs 3, equal backend weights: 3+3 = 2+2+2.
        let r = route(vec![
            backend("a", &[], 100),
            backend("b", &[], 100),
            backend("c", &[], 7),
        ]);
        let entries = [
            ep("10.0.0.1:1", &["a"], &[]),
            ep("10.0.0.2:1", &["a"], &[]),
            ep("10.0.1.1:1", &["b"], &[]),
            ep("10.0.1.2:1", &["b"], &[]),
            ep("10.0.1.3:1", &["b"], &[]),
            ep("10.0.2.1:1", &["c"], &[]),
            ep("10.0.2.2:1", &["c"], &[]),
            ep("10.0.2.3:1", &["c"], &[]),
            ep("10.0.2.4:1", &["c"], &[]),
            ep("10.0.2.5:1", &["c"], &[]),
        ];
        let resolved = resolve(&r, &entries);
        let sums = backend_sums(&resolved, 3);
        assert_eq!(sums[0], sums[1]);
        assert_eq!(sums[0] * 7, sums[2] * 100, "sums {sums:?}");
        assert!(resolved.endpoints.iter().all(|e| e.weight > 0));
    }

    #[test]
    fn empty_backend_gets_no_traffic_and_is_listed() {
        let r = route(vec![
            backend("a", &[], 50),
            backend("b", &[], 30),
            backend("c", &[], 20),
        ]);
        let entries = [
            ep("10.0.0.1:1", &["a"], &[]),
            ep("10.0.0.2:1", &["a"], &[]),
            ep("10.0.2.1:1", &["c"], &[]),
        ];
        let resolved = resolve(&r, &entries);
        assert_eq!(resolved.empty_backends, [1]);
        assert!(resolved.endpoints.iter().all(|e| e.backend != 1));
        let sums = backend_sums(&resolved, 3);
        assert_eq!(sums[0] * 20, sums[2] * 50, "a:c keep 50:20, sums {sums:?}");
        assert_eq!(sums[1], 0);
    }

    #[test]
    fn no_endpoints_at_all() {
        let r = route(vec![backend("a", &[], 50), backend("b", &[], 50)]);
        let resolved = resolve(&r, &[ep("10.0.0.1:1", &["z"], &[])]);
        assert!(resolved.endpoints.is_empty());
        assert_eq!(resolved.empty_backends, [0, 1]);
    }

    #[test]
    fn weight_zero_backend_is_drained_not_empty() {
        let r = route(vec![backend("a", &[], 100), backend("b", &[], 0)]);
        let entries = [ep("10.0.0.1:1", &["a"], &[]), ep("10.0.0.2:1", &["b"], &[])];
        let resolved = resolve(&r, &entries);
        assert_eq!(summary(&resolved), [(0, "10.0.0.1:1".into(), 1)]);
        assert!(resolved.empty_backends.is_empty());
    }

    #[test]
    fn endpoint_in_two_backends_appears_once_per_backend() {
        let r = route(vec![
            backend("a", &[("gpu", "nvidia")], 75),
            backend("a", &[("zone", "eu")], 25),
        ]);
        let both = ep("10.0.0.1:1", &["a"], &[("gpu", "nvidia"), ("zone", "eu")]);
        let resolved = resolve(&r, &[both.clone(), both]);
        assert_eq!(
            summary(&resolved),
            [(0, "10.0.0.1:1".into(), 3), (1, "10.0.0.1:1".into(), 1)]
        );
    }

    #[test]
    fn order_is_deterministic() {
        let r = route(vec![backend("b", &[], 1), backend("a", &[], 1)]);
        let mut entries = vec![
            ep("10.0.0.9:1", &["a"], &[]),
            ep("10.0.0.2:1", &["b"], &[]),
            ep("10.0.0.10:1", &["a"], &[]),
            ep("10.0.0.1:1", &["b"], &[]),
        ];
        let first = resolve(&r, &entries);
        assert_eq!(
            summary(&first),
            [
                (0, "10.0.0.1:1".into(), 1),
                (0, "10.0.0.2:1".into(), 1),
                (1, "10.0.0.9:1".into(), 1),
                (1, "10.0.0.10:1".into(), 1),
            ]
        );
        entries.reverse();
        assert_eq!(resolve(&r, &entries), first);
    }

    #[test]
    fn huge_ratios_fall_back_to_scaled_weights() {
        // lcm(1..=40) * 100 does not fit a u32.
        let shares: Vec<(u32, usize)> = (1..=40).map(|n| (100, n)).collect();
        let weights = per_endpoint_weights(&shares);
        assert_eq!(weights[0], FALLBACK_SCALE as u32);
        for (i, w) in weights.iter().enumerate() {
            let want = FALLBACK_SCALE / (i + 1) as f64;
            assert!((f64::from(*w) - want).abs() <= 0.5, "n={}: {w}", i + 1);
        }
        // A tiny share still gets some traffic.
        assert_eq!(
            per_endpoint_weights(&[(u32::MAX, 1), (1, 2)]),
            [1_000_000, 1]
        );
    }

    #[test]
    fn exact_weights_are_reduced() {
        assert_eq!(per_endpoint_weights(&[(100, 1)]), [1]);
        assert_eq!(per_endpoint_weights(&[(90, 3), (10, 1)]), [3, 1]);
        assert_eq!(
            per_endpoint_weights(&[(100, 2), (0, 3), (50, 0)]),
            [1, 0, 0]
        );
        assert_eq!(per_endpoint_weights(&[(0, 2)]), [0]);
        assert_eq!(per_endpoint_weights(&[]), Vec::<u32>::new());
    }
}
