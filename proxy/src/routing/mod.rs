//! Outbound route selection: which route a request from the local app takes,
//! and which endpoint (peer sidecar) serves it. Pure over plain data; the
//! proxy phases only call [`RouteTable::select`] and [`Route::pick`].
//!
//! Each route carries its resilience state (outlier detection, endpoint
//! weights and latency estimates for the balancer, retry budget,
//! concurrency limit). A config reload keeps a route's state when its
//! endpoints (address, identity, weight) and those settings are unchanged,
//! so changing a timeout, a fault drill or an endpoint's labels does not
//! forget which endpoints are ejected.

pub mod authority;
pub mod captured;
pub mod select;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use crank_api::proxy::{ProxyConfig, RouteConfig};
use crank_certs::Identity;
use pingora_core::upstreams::peer::HttpPeer;

use crate::resilience::breaker::{BreakerConfig, Endpoints, Pick};
use crate::resilience::retry::Budget;
use crate::resilience::shed::Limiter;

/// A route with its endpoints and its settings.
#[derive(Debug)]
pub struct Route {
    pub name: String,
    /// The capability this route reaches, sent to the peer in `x-crank-capability`.
    pub capability: Option<String>,
    pub endpoints: Vec<Endpoint>,
    /// The route's config as written (timeout, retry, fault, ...).
    pub cfg: RouteConfig,
    /// Outlier detection, retry budget and concurrency limit.
    pub state: Arc<RouteState>,
    /// The destination outside the mesh this route sends to (`egress`);
    /// `endpoints` then holds one stand-in entry for the breaker.
    pub egress: Option<Arc<crate::egress::Destination>>,
}

/// What a route remembers between requests.
#[derive(Debug)]
pub struct RouteState {
    pub breakers: Endpoints,
    pub budget: Budget,
    pub limiter: Option<Limiter>,
}

impl RouteState {
    fn new(cfg: &RouteConfig) -> Self {
        let weights: Vec<(u32, u32)> = match cfg.egress {
            // An egress route has one endpoint: its destination.
            Some(_) => vec![(1, 0)],
            None => cfg
                .endpoints
                .iter()
                .map(|e| (e.weight, e.backend))
                .collect(),
        };
        RouteState {
            breakers: Endpoints::grouped(&weights, breaker_config(cfg)),
            budget: Budget::new(&cfg.retry),
            limiter: cfg.concurrency.as_ref().map(Limiter::new),
        }
    }
}

fn breaker_config(cfg: &RouteConfig) -> BreakerConfig {
    BreakerConfig {
        consecutive_failures: cfg.circuit.consecutive_failures,
        base_ejection: cfg.circuit.base_ejection,
        max_ejection: cfg.circuit.max_ejection,
        max_ejected_percent: cfg.circuit.max_ejected_percent,
        jitter: 0.25,
    }
}

/// Whether a reloaded route may keep the old route's state. Labels are
/// informational and do not count.
fn same_state(a: &RouteConfig, b: &RouteConfig) -> bool {
    let key = |r: &RouteConfig| -> Vec<_> {
        r.endpoints
            .iter()
            .map(|e| (e.address, e.identity.clone(), e.weight, e.backend))
            .collect()
    };
    key(a) == key(b)
        && a.egress == b.egress
        && a.circuit == b.circuit
        && a.retry == b.retry
        && a.concurrency == b.concurrency
}

/// A peer sidecar that serves a route, and the identity it must prove.
#[derive(Debug, Clone, PartialEq)]
pub struct Endpoint {
    pub address: SocketAddr,
    pub identity: Identity,
    /// The SNI and the DNS SAN the peer's certificate must carry.
    pub server_name: String,
    /// `identity` as a SPIFFE id, made once (each request to the endpoint
    /// names it).
    pub spiffe_id: Arc<str>,
    /// The outbound peer for this endpoint, built once per TLS epoch.
    pub peer: Arc<PreparedPeer>,
}

/// An endpoint's Pingora peer with its TLS settings, built at its first
/// request and cloned for the next ones while the workload's TLS epoch
/// ([`crate::identity::WorkloadTls::peer_epoch`]) is the same.
#[derive(Default)]
pub struct PreparedPeer(Mutex<Option<(u64, HttpPeer)>>);

impl PreparedPeer {
    /// The peer prepared at `epoch`, or the one `build` makes (kept for
    /// the next request).
    pub fn get_or_build(&self, epoch: u64, build: impl FnOnce() -> HttpPeer) -> HttpPeer {
        let mut slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match &*slot {
            Some((at, peer)) if *at == epoch => peer.clone(),
            _ => {
                let peer = build();
                *slot = Some((epoch, peer.clone()));
                peer
            }
        }
    }
}

impl PartialEq for PreparedPeer {
    /// A cache: every endpoint's is alike.
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl std::fmt::Debug for PreparedPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PreparedPeer")
    }
}

impl Route {
    /// The identity every endpoint proves, when they all prove the same one
    /// (the usual case: one service behind a route). Egress policy sees it
    /// as the destination.
    pub fn single_identity(&self) -> Option<&Identity> {
        let first = &self.endpoints.first()?.identity;
        self.endpoints
            .iter()
            .all(|e| e.identity == *first)
            .then_some(first)
    }

    /// Power of two choices by weight and latency (see [`crate::balancer`])
    /// over the endpoints that can take a request, skipping ejected ones
    /// and, when another can take it, those in `tried`. None: every
    /// endpoint is ejected (the circuit is open).
    pub fn pick(&self, tried: &[usize]) -> Option<(Pick, &Endpoint)> {
        let p = self.state.breakers.pick(tried)?;
        self.endpoints.get(p.index).map(|e| (p, e))
    }
}

/// Routes indexed by host and by local listener port.
#[derive(Debug, Default)]
pub struct RouteTable {
    routes: Vec<Arc<Route>>,
    /// Routes by host; several when they differ by `path_prefix`.
    by_host: HashMap<String, Vec<usize>>,
    by_port: HashMap<u16, usize>,
    /// Destinations outside the mesh and the mode for undeclared ones.
    egress: Arc<crate::egress::EgressTable>,
}

/// Why no route was found, with what the request named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoRoute {
    pub host: Option<String>,
}

impl RouteTable {
    /// Builds the table from a validated config.
    pub fn from_config(cfg: &ProxyConfig) -> Self {
        Self::reloaded(cfg, None)
    }

    /// Builds the table, keeping the state of routes from `prev` whose
    /// endpoints and resilience settings did not change.
    pub fn reloaded(cfg: &ProxyConfig, prev: Option<&RouteTable>) -> Self {
        let mut t = RouteTable {
            egress: Arc::new(crate::egress::EgressTable::from_config(&cfg.egress)),
            ..Default::default()
        };
        for r in &cfg.routes {
            let idx = t.routes.len();
            let egress = r
                .egress
                .as_deref()
                .and_then(|n| t.egress.by_name(n))
                .cloned();
            let endpoints = match &egress {
                Some(d) => vec![egress_endpoint(d)],
                None => r.endpoints.iter().map(mesh_endpoint).collect(),
            };
            let state = prev
                .and_then(|p| p.routes.iter().find(|o| o.name == r.name))
                .filter(|o| same_state(&o.cfg, r))
                .map(|o| o.state.clone())
                .unwrap_or_else(|| Arc::new(RouteState::new(r)));
            t.routes.push(Arc::new(Route {
                name: r.name.clone(),
                capability: r.capability.clone(),
                endpoints,
                cfg: r.clone(),
                state,
                egress,
            }));
            for h in std::iter::once(&r.name).chain(r.hosts.iter()) {
                let list = t.by_host.entry(normalize_host(h)).or_default();
                if !list.contains(&idx) {
                    list.push(idx);
                }
            }
        }
        for p in &cfg.outbound.ports {
            if let Some(idx) = t.routes.iter().position(|r| r.name == p.route) {
                t.by_port.insert(p.listen.port(), idx);
            }
        }
        t
    }

    /// Chooses the route: a local upstream port is bound to one route; on the
    /// HTTP proxy listener the host (from the absolute URI, `:authority` or
    /// `Host`) decides.
    pub fn select(
        &self,
        local_port: Option<u16>,
        host: Option<&str>,
    ) -> Result<Arc<Route>, NoRoute> {
        self.select_path(local_port, host, "/")
    }

    /// As [`RouteTable::select`]; among the host's routes, the one with the
    /// longest `path_prefix` that `path` starts with wins (no prefix: any path).
    pub fn select_path(
        &self,
        local_port: Option<u16>,
        host: Option<&str>,
        path: &str,
    ) -> Result<Arc<Route>, NoRoute> {
        if let Some(idx) = local_port.and_then(|p| self.by_port.get(&p)) {
            return Ok(self.routes[*idx].clone());
        }
        let host = host.map(normalize_host);
        let best = host
            .as_ref()
            .and_then(|h| self.by_host.get(h))
            .and_then(|list| {
                list.iter()
                    .filter_map(|i| {
                        let prefix = self.routes[*i].cfg.path_prefix.as_deref().unwrap_or("");
                        path.starts_with(prefix).then_some((prefix.len(), *i))
                    })
                    .max_by_key(|(len, i)| (*len, std::cmp::Reverse(*i)))
            });
        match best {
            Some((_, idx)) => Ok(self.routes[idx].clone()),
            None => Err(NoRoute { host }),
        }
    }

    pub fn names(&self) -> Vec<&str> {
        self.routes.iter().map(|r| r.name.as_str()).collect()
    }

    pub fn routes(&self) -> &[Arc<Route>] {
        &self.routes
    }

    /// The declared egress destinations and the undeclared mode.
    pub fn egress(&self) -> &Arc<crate::egress::EgressTable> {
        &self.egress
    }
}

/// A route of its own to an egress destination no route names (a declared
/// one on the HTTP proxy listener, or an undeclared one passed through):
/// the route defaults, no capability.
pub fn egress_route(name: String, dest: Arc<crate::egress::Destination>) -> Arc<Route> {
    let cfg: RouteConfig = serde_json::from_value(serde_json::json!({
        "name": name,
        "endpoints": [],
        "egress": dest.name,
    }))
    .expect("a route of name, endpoints and egress parses");
    Arc::new(Route {
        name,
        capability: None,
        endpoints: vec![egress_endpoint(&dest)],
        state: Arc::new(RouteState::new(&cfg)),
        cfg,
        egress: Some(dest),
    })
}

/// A peer sidecar of a validated route.
fn mesh_endpoint(e: &crank_api::proxy::EndpointConfig) -> Endpoint {
    let identity: Identity = e.identity.parse().expect("validated identity");
    Endpoint {
        address: e.address,
        server_name: identity.dns_name(),
        spiffe_id: identity.spiffe_id().into(),
        identity,
        peer: Arc::default(),
    }
}

/// The stand-in endpoint of an egress route: the destination's IP, or
/// `0.0.0.0:port` for a DNS name (resolved at each connect). It proves
/// no mesh identity; the identity below only names the destination.
fn egress_endpoint(d: &crate::egress::Destination) -> Endpoint {
    let address = match d.host {
        crank_api::proxy::EgressHost::Ip(ip) => SocketAddr::new(ip, d.port),
        crank_api::proxy::EgressHost::Name(_) => SocketAddr::from(([0, 0, 0, 0], d.port)),
    };
    let identity = Identity {
        service: d.name.clone(),
        tenant: "egress".into(),
        trust_domain: "external".into(),
    };
    Endpoint {
        address,
        spiffe_id: identity.spiffe_id().into(),
        identity,
        server_name: d.host_str(),
        peer: Arc::default(),
    }
}

/// Lower-cases a host and strips any port and trailing dot.
pub fn normalize_host(h: &str) -> String {
    let h = h.trim();
    let without_port = if let Some(rest) = h.strip_prefix('[') {
        // [v6]:port
        rest.split(']').next().unwrap_or(rest)
    } else {
        match h.rsplit_once(':') {
            Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
            _ => h,
        }
    };
    without_port.trim_end_matches('.').to_ascii_lowercase()
}

/// Sets `crank_circuit_state` for every endpoint of a new route table,
/// and drops the series of endpoints the previous table had and this one
/// does not (a removed endpoint must not keep an alert firing).
pub fn init_circuit_gauges(
    table: &RouteTable,
    prev: Option<&RouteTable>,
    m: &crate::metrics::Metrics,
) {
    let key = |r: &Route, e: &Endpoint| (r.name.clone(), e.address.to_string());
    let now: std::collections::HashSet<_> = table
        .routes()
        .iter()
        .flat_map(|r| r.endpoints.iter().map(move |e| key(r, e)))
        .collect();
    for r in prev.map(|p| p.routes()).unwrap_or_default() {
        for e in &r.endpoints {
            let k = key(r, e);
            if !now.contains(&k) {
                let _ = m
                    .resilience
                    .circuit_state
                    .remove_label_values(&[&k.0, &k.1]);
            }
        }
    }
    for r in table.routes() {
        for (i, e) in r.endpoints.iter().enumerate() {
            m.resilience
                .circuit_state
                .with_label_values(&[r.name.as_str(), &e.address.to_string()])
                .set(r.state.breakers.state(i).gauge());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> RouteTable {
        let cfg: ProxyConfig = serde_yaml::from_str(
            r#"
identity: {cert: a, key: b, trust_bundle: c}
admin: {listen: 127.0.0.1:9901}
outbound:
  http_proxy: 127.0.0.1:4140
  ports: [{listen: 127.0.0.1:5001, route: "transcode:v1"}]
routes:
  - name: "transcode:v1"
    hosts: [transcoder, transcoder.media.svc]
    endpoints:
      - {address: 127.0.0.1:7001, identity: transcoder.media.crank.local}
      - {address: 127.0.0.1:7002, identity: "spiffe://crank.local/tenant/media/svc/transcoder"}
  - name: backend
    endpoints: [{address: 127.0.0.1:7003, identity: backend.demo.crank.local}]
"#,
        )
        .unwrap();
        RouteTable::from_config(&cfg)
    }

    #[test]
    fn the_longest_matching_path_prefix_wins() {
        let cfg: ProxyConfig = serde_yaml::from_str(
            r#"
identity: {cert: a, key: b, trust_bundle: c}
admin: {listen: 127.0.0.1:9901}
routes:
  - name: api
    hosts: [media]
    endpoints: [{address: 127.0.0.1:7001, identity: api.media.crank.local}]
  - name: transcode
    hosts: [media]
    path_prefix: /v1/transcode
    endpoints: [{address: 127.0.0.1:7002, identity: transcoder.media.crank.local}]
  - name: legacy
    hosts: [old]
    path_prefix: /legacy/
    endpoints: [{address: 127.0.0.1:7003, identity: legacy.media.crank.local}]
"#,
        )
        .unwrap();
        let t = RouteTable::from_config(&cfg);
        let pick = |host: &str, path: &str| {
            t.select_path(None, Some(host), path)
                .ok()
                .map(|r| r.name.clone())
        };
        assert_eq!(
            pick("media", "/v1/transcode/jobs").as_deref(),
            Some("transcode")
        );
        assert_eq!(pick("media", "/v1/other").as_deref(), Some("api"));
        assert_eq!(pick("media", "/").as_deref(), Some("api"));
        assert_eq!(pick("old", "/legacy/x").as_deref(), Some("legacy"));
        assert_eq!(
            pick("old", "/new"),
            None,
            "no route of that host takes the path"
        );
    }

    #[test]
    fn selection_table() {
        let t = table();
        let cases: &[(Option<u16>, Option<&str>, Option<&str>)] = &[
            (Some(5001), None, Some("transcode:v1")),
            (Some(5001), Some("backend"), Some("transcode:v1")),
            (Some(4140), Some("backend"), Some("backend")),
            (Some(4140), Some("BACKEND:8080"), Some("backend")),
            (Some(4140), Some("backend."), Some("backend")),
            (
                Some(4140),
                Some("transcoder.media.svc"),
                Some("transcode:v1"),
            ),
            (Some(4140), Some("unknown"), None),
            (Some(4140), None, None),
            (None, Some("[::1]:80"), None),
        ];
        for (port, host, want) in cases {
            let got = t.select(*port, *host).ok().map(|r| r.name.clone());
            assert_eq!(got.as_deref(), *want, "port {port:?} host {host:?}");
        }
    }

    #[test]
    fn no_route_reports_normalized_host() {
        let e = table().select(None, Some("Nope:80")).unwrap_err();
        assert_eq!(e.host.as_deref(), Some("nope"));
    }

    #[test]
    fn picks_spread_and_server_names() {
        let t = table();
        let r = t.select(Some(5001), None).unwrap();
        let ports: std::collections::HashSet<u16> = (0..100)
            .map(|_| r.pick(&[]).unwrap().1.address.port())
            .collect();
        assert_eq!(ports, [7001, 7002].into());
        assert_eq!(r.endpoints[1].server_name, "transcoder.media.crank.local");
        // A retry goes to the endpoint not tried yet.
        let (p, _) = r.pick(&[]).unwrap();
        let (q, _) = r.pick(&[p.index]).unwrap();
        assert_ne!(p.index, q.index);
    }

    #[test]
    fn reload_keeps_state_only_when_endpoints_and_settings_match() {
        let old = table();
        let cfg: ProxyConfig = serde_yaml::from_str(
            r#"
identity: {cert: a, key: b, trust_bundle: c}
admin: {listen: 127.0.0.1:9901}
routes:
  - name: "transcode:v1"
    timeout: 2s
    endpoints:
      - {address: 127.0.0.1:7001, identity: transcoder.media.crank.local}
      - {address: 127.0.0.1:7002, identity: "spiffe://crank.local/tenant/media/svc/transcoder"}
  - name: backend
    endpoints: [{address: 127.0.0.1:7009, identity: backend.demo.crank.local}]
"#,
        )
        .unwrap();
        let new = RouteTable::reloaded(&cfg, Some(&old));
        let same = |name: &str| {
            Arc::ptr_eq(
                &old.select(None, Some(name)).unwrap().state,
                &new.select(None, Some(name)).unwrap().state,
            )
        };
        assert!(same("transcode:v1"), "a timeout change keeps the breakers");
        assert!(!same("backend"), "a new endpoint list starts afresh");
        let relabel = |extra: &str| -> ProxyConfig {
            serde_yaml::from_str(&format!(
                "identity: {{cert: a, key: b, trust_bundle: c}}\n\
                 admin: {{listen: 127.0.0.1:9901}}\n\
                 routes: [{{name: backend, endpoints: [{{address: 127.0.0.1:7009, identity: backend.demo.crank.local{extra}}}]}}]\n"
            ))
            .unwrap()
        };
        let kept = |a: &RouteTable, b: &RouteTable| {
            let state = |t: &RouteTable| t.select(None, Some("backend")).unwrap().state.clone();
            Arc::ptr_eq(&state(a), &state(b))
        };
        let labelled = RouteTable::reloaded(&relabel(", labels: {pool: a}"), Some(&new));
        assert!(kept(&new, &labelled), "labels are informational");
        let weighted = RouteTable::reloaded(&relabel(", weight: 3"), Some(&labelled));
        assert!(!kept(&labelled, &weighted), "a new weight starts afresh");
    }

    #[test]
    fn weights_come_from_the_config() {
        let cfg: ProxyConfig = serde_yaml::from_str(
            r#"
identity: {cert: a, key: b, trust_bundle: c}
admin: {listen: 127.0.0.1:9901}
routes:
  - name: split
    endpoints:
      - {address: 127.0.0.1:7001, identity: a.t.crank.local, weight: 90, labels: {pool: stable}}
      - {address: 127.0.0.1:7002, identity: a.t.crank.local, weight: 10, labels: {pool: canary}}
"#,
        )
        .unwrap();
        assert_eq!(cfg.routes[0].endpoints[1].labels["pool"], "canary");
        let t = RouteTable::from_config(&cfg);
        let r = t.select(None, Some("split")).unwrap();
        let mut counts = [0usize; 2];
        for _ in 0..10_000 {
            let (p, _) = r.pick(&[]).unwrap();
            counts[p.index] += 1;
            r.state.breakers.start(p.index).finish(true);
        }
        assert!((8700..=9300).contains(&counts[0]), "{counts:?}");
    }

    #[test]
    fn host_normalization() {
        assert_eq!(normalize_host("Example.COM:443"), "example.com");
        assert_eq!(normalize_host("[::1]:80"), "::1");
        assert_eq!(normalize_host("svc"), "svc");
    }
}
