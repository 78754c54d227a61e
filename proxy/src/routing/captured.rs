//! Where a captured outbound connection goes, decided from its original
//! destination alone (pure over the route table; the listener does the
//! I/O):
//!
//! 1. a route that lists the exact `address:port` in its `hosts`, else
//!    one that lists a range holding it (`10.96.0.0/12:5432`): how a
//!    platform team maps a Kubernetes Service's ClusterIP (which has no
//!    sidecar of its own) to a capability;
//! 2. else a route with an endpoint (a peer sidecar) on the destination's
//!    address: the app called a service on a mesh host, so the call is
//!    meshed to that host's sidecar (the first such route in table order
//!    when several have one there; an opaque connection then claims no
//!    capability ([`claim`]) and the peer sidecar serves the port that
//!    was dialled); or an egress route to exactly that address and port;
//! 3. else a declared egress destination (`egress.destinations`);
//! 4. else one of this host's own addresses: connected as asked;
//! 5. else undeclared: `egress.mode` decides when the mesh config sets
//!    it, otherwise `capture.undeclared`.
//!
//! HTTP on a captured connection goes through the outbound HTTP path;
//! [`captured_dst`] lets its route stage find the connection's original
//! destination and [`select`] gives the route (or `no-route`).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use crate::errors::{Reason, Refusal};
use crate::routing::{Route, RouteTable};

/// What a captured destination is.
#[derive(Debug, Clone)]
pub enum Destination {
    /// A mesh route serves it.
    Mesh(Arc<Route>),
    /// One of this host's own addresses that no route names.
    Local,
    /// Neither in the mesh nor this host.
    Undeclared,
}

impl Destination {
    /// The label used in logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Destination::Mesh(_) => "mesh",
            Destination::Local => "local",
            Destination::Undeclared => "undeclared",
        }
    }
}

/// The route a captured connection to `dst` takes, if any.
pub fn route_for(table: &RouteTable, dst: SocketAddr) -> Option<Arc<Route>> {
    let ip = canonical(dst.ip());
    let routes = table.routes();
    let listed = |exact: bool| {
        routes.iter().find(|r| {
            r.cfg
                .hosts
                .iter()
                .any(|h| host_matches(h, dst) == Some(exact))
        })
    };
    listed(true)
        .or_else(|| listed(false))
        .or_else(|| routes.iter().find(|r| serves(r, dst, ip)))
        .cloned()
        .or_else(|| declared_egress(table, dst))
}

/// Whether a route's `hosts` entry names `dst`: `Some(true)` for the
/// exact `address:port`, `Some(false)` for a range holding it
/// (`10.96.0.0/12:5432`, `[fd00::/108]:5432`), `None` otherwise (names
/// and entries without a port match HTTP authorities only).
pub fn host_matches(entry: &str, dst: SocketAddr) -> Option<bool> {
    let entry = entry.trim();
    if let Ok(a) = entry.parse::<SocketAddr>() {
        let same = canonical(a.ip()) == canonical(dst.ip()) && a.port() == dst.port();
        return same.then_some(true);
    }
    let (net, port) = entry.rsplit_once(':')?;
    if port.parse::<u16>().ok()? != dst.port() {
        return None;
    }
    let net = net.trim_start_matches('[').trim_end_matches(']');
    let (addr, prefix) = net.split_once('/')?;
    let addr = canonical(addr.parse::<IpAddr>().ok()?);
    let prefix = prefix.parse::<u32>().ok()?;
    in_range(addr, prefix, canonical(dst.ip())).then_some(false)
}

/// `ip` is in `net/prefix` (both of one family).
fn in_range(net: IpAddr, prefix: u32, ip: IpAddr) -> bool {
    match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(i)) if prefix <= 32 => {
            let m = u32::MAX.checked_shl(32 - prefix).unwrap_or(0);
            u32::from(n) & m == u32::from(i) & m
        }
        (IpAddr::V6(n), IpAddr::V6(i)) if prefix <= 128 => {
            let m = u128::MAX.checked_shl(128 - prefix).unwrap_or(0);
            u128::from(n) & m == u128::from(i) & m
        }
        _ => false,
    }
}

/// The capability an opaque connection to `dst` on `route` claims to the
/// peer sidecar: the route's (or its name). `None` when the route was
/// chosen only because it has a sidecar on that host and other routes do
/// too: the peer then serves the port that was dialled (its
/// `inbound.tcp` entry there), so a call to one service on a shared host
/// never claims another's capability.
pub fn claim(table: &RouteTable, dst: SocketAddr, route: &Route) -> Option<String> {
    let named = route
        .capability
        .clone()
        .or_else(|| Some(route.name.clone()));
    if route.egress.is_some()
        || route
            .cfg
            .hosts
            .iter()
            .any(|h| host_matches(h, dst).is_some())
    {
        return named;
    }
    let ip = canonical(dst.ip());
    let on_host = table
        .routes()
        .iter()
        .filter(|r| r.egress.is_none() && serves(r, dst, ip))
        .count();
    if on_host > 1 {
        None
    } else {
        named
    }
}

/// A mesh route with a sidecar on `dst`'s address, or an egress route to
/// exactly `dst` (an egress endpoint is the destination itself).
fn serves(r: &Route, dst: SocketAddr, ip: IpAddr) -> bool {
    r.endpoints.iter().any(|e| match r.egress {
        None => canonical(e.address.ip()) == ip,
        Some(_) => canonical(e.address.ip()) == ip && e.address.port() == dst.port(),
    })
}

/// A declared egress destination no route names (`egress.destinations`,
/// by address or a DNS name's last resolution): a route of its own, as
/// the HTTP proxy listener gives it.
fn declared_egress(table: &RouteTable, dst: SocketAddr) -> Option<Arc<Route>> {
    let d = crate::egress::lookup(table.egress(), crate::egress::Target::Addr(dst))?;
    Some(crate::routing::egress_route(
        format!("egress:{}", d.name),
        d,
    ))
}

/// Classifies `dst`; `is_local` says whether an address is this host's.
pub fn classify(
    table: &RouteTable,
    dst: SocketAddr,
    is_local: impl Fn(IpAddr) -> bool,
) -> Destination {
    if let Some(r) = route_for(table, dst) {
        return Destination::Mesh(r);
    }
    if is_local(canonical(dst.ip())) {
        return Destination::Local;
    }
    Destination::Undeclared
}

/// The outbound HTTP path's route stage for a captured connection.
pub fn select(table: &RouteTable, dst: SocketAddr) -> Result<Arc<Route>, Refusal> {
    route_for(table, dst).ok_or_else(|| {
        Refusal::new(
            Reason::NoRoute,
            format!(
                "captured connection to {dst}: no route lists {dst} in its hosts or has an endpoint on {}; known routes: {}",
                dst.ip(),
                table.names().join(", ")
            ),
        )
    })
}

/// The original destination of the connection `session` came on, when it
/// came through the outbound capture listener (which records it in the
/// socket digest); `None` for the HTTP proxy and local ports.
pub fn captured_dst(session: &pingora_proxy::Session) -> Option<SocketAddr> {
    let digest = session.as_downstream().digest()?;
    let socket = digest.socket_digest.as_ref()?;
    match socket.original_dst.get()? {
        Some(pingora_core::protocols::l4::socket::SocketAddr::Inet(a)) => Some(*a),
        _ => None,
    }
}

/// IPv4-mapped IPv6 addresses as IPv4, so both forms compare equal.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// This host's addresses (every interface's), for [`classify`].
pub fn local_addrs() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below; each
    // entry's ifa_addr is null or points to a sockaddr of its family.
    unsafe {
        if libc::getifaddrs(&mut head) != 0 {
            return out;
        }
        let mut cur = head;
        while !cur.is_null() {
            let sa = (*cur).ifa_addr;
            if !sa.is_null() {
                match i32::from((*sa).sa_family) {
                    libc::AF_INET => {
                        let sin = &*(sa as *const libc::sockaddr_in);
                        out.push(IpAddr::from(
                            u32::from_be(sin.sin_addr.s_addr).to_be_bytes(),
                        ));
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(sa as *const libc::sockaddr_in6);
                        out.push(IpAddr::from(sin6.sin6_addr.s6_addr));
                    }
                    _ => {}
                }
            }
            cur = (*cur).ifa_next;
        }
        libc::freeifaddrs(head);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> RouteTable {
        let cfg = crate::config::parse(
            "p.yaml",
            "identity: {cert: a, key: b, trust_bundle: c}\nadmin: {listen: 127.0.0.1:1}\n\
             routes:\n\
             - {name: db, hosts: ['10.0.0.2:5432'], endpoints: [{address: '10.0.0.9:4143', identity: db.acme.crank.local}]}\n\
             - {name: web, endpoints: [{address: '10.0.0.2:4143', identity: web.acme.crank.local}]}\n\
             - {name: web2, endpoints: [{address: '10.0.0.2:4243', identity: web2.acme.crank.local}]}\n\
             - {name: svc-pg, capability: 'db:postgres', hosts: ['10.96.0.0/12:5432', '[fd00::/108]:5432'], endpoints: [{address: '10.0.0.9:4143', identity: db.acme.crank.local}]}\n\
             - {name: svc-exact, hosts: ['10.96.0.10:5432'], endpoints: [{address: '10.0.0.8:4143', identity: other.acme.crank.local}]}\n\
             - {name: ray, egress: ray, endpoints: []}\n\
             egress:\n  destinations:\n  - {name: ray, address: '192.0.2.5:8265'}\n  - {name: dask, address: '192.0.2.6:8786'}\n",
        )
        .unwrap();
        RouteTable::from_config(&cfg)
    }

    fn kind(dst: &str) -> (String, &'static str) {
        let local = |ip: IpAddr| ip == IpAddr::from([10, 0, 0, 1]);
        match classify(&table(), dst.parse().unwrap(), local) {
            Destination::Mesh(r) => (r.name.clone(), "mesh"),
            d => (String::new(), d.kind()),
        }
    }

    #[test]
    fn destinations_table() {
        let cases = [
            // An exact host entry wins over the endpoint address.
            ("10.0.0.2:5432", ("db", "mesh")),
            // An app port on a mesh host: that host's sidecar (first route).
            ("10.0.0.2:8080", ("web", "mesh")),
            ("[::ffff:10.0.0.2]:8080", ("web", "mesh")),
            // The exact host entry only: another port on .9 is still db's host.
            ("10.0.0.9:22", ("db", "mesh")),
            ("10.0.0.1:8080", ("", "local")),
            ("192.0.2.7:443", ("", "undeclared")),
            // Egress: the route to exactly that address and port, a
            // declared destination no route names, another port: undeclared.
            ("192.0.2.5:8265", ("ray", "mesh")),
            ("192.0.2.6:8786", ("egress:dask", "mesh")),
            ("192.0.2.5:22", ("", "undeclared")),
            // A Service's ClusterIP: its range and port name the route;
            // an exact entry wins over a range; another port is not it.
            ("10.100.3.4:5432", ("svc-pg", "mesh")),
            ("[fd00::1:2]:5432", ("svc-pg", "mesh")),
            ("10.96.0.10:5432", ("svc-exact", "mesh")),
            ("10.100.3.4:5433", ("", "undeclared")),
            ("10.112.0.1:5432", ("", "undeclared")),
        ];
        for (dst, (name, kind_want)) in cases {
            assert_eq!(kind(dst), (name.to_string(), kind_want), "{dst}");
        }
    }

    #[test]
    fn an_unmeshed_destination_is_refused_on_the_http_path_with_the_fix() {
        let e = select(&table(), "192.0.2.7:80".parse().unwrap()).unwrap_err();
        assert_eq!(e.reason, Reason::NoRoute);
        assert!(
            e.detail
                .contains("known routes: db, web, web2, svc-pg, svc-exact, ray"),
            "{}",
            e.detail
        );
        assert_eq!(
            select(&table(), "10.0.0.2:80".parse().unwrap())
                .unwrap()
                .name,
            "web"
        );
    }

    #[test]
    fn host_entries_are_an_address_or_a_range_with_a_port() {
        let dst: SocketAddr = "10.96.3.4:5432".parse().unwrap();
        let cases = [
            ("10.96.3.4:5432", Some(true)),
            (" 10.96.3.4:5432 ", Some(true)),
            ("10.96.3.4:80", None),
            ("10.96.0.0/12:5432", Some(false)),
            ("10.96.0.0/12:80", None),
            ("10.0.0.0/16:5432", None),
            ("0.0.0.0/0:5432", Some(false)),
            ("10.96.0.0/40:5432", None),
            ("db.internal:5432", None),
            ("10.96.3.4", None),
            ("fd00::/8:5432", None),
        ];
        for (entry, want) in cases {
            assert_eq!(host_matches(entry, dst), want, "{entry}");
        }
    }

    #[test]
    fn a_shared_host_claims_no_capability_so_the_dialled_port_decides() {
        let t = table();
        let claim_of = |dst: &str| {
            let dst = dst.parse().unwrap();
            let r = route_for(&t, dst).unwrap();
            claim(&t, dst, &r)
        };
        // web and web2 both have a sidecar on 10.0.0.2.
        assert_eq!(claim_of("10.0.0.2:5432"), Some("db".into()));
        assert_eq!(claim_of("10.0.0.2:25"), None);
        // db and svc-pg both have a sidecar on 10.0.0.9.
        assert_eq!(claim_of("10.0.0.9:22"), None);
        assert_eq!(claim_of("10.96.0.10:5432"), Some("svc-exact".into()));
        assert_eq!(claim_of("10.100.0.1:5432"), Some("db:postgres".into()));
        assert_eq!(claim_of("192.0.2.5:8265"), Some("ray".into()));
    }

    #[test]
    fn this_hosts_loopback_is_among_its_addresses() {
        assert!(local_addrs().contains(&IpAddr::from([127, 0, 0, 1])));
    }
}
