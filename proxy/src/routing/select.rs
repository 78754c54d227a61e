//! The outbound route-select stage: the route a request takes, by the
//! local port it arrived on or the authority it names, or a `no-route`
//! refusal that lists the known routes and says how to fix it.

use std::sync::Arc;

use pingora_http::RequestHeader;

use super::authority::request_authority;
use super::{Route, RouteTable};
use crate::errors::{Reason, Refusal};

/// Chooses the route for a request that arrived on local `port`.
/// `pushed_to` is this service's name when crank-control sends the routes
/// (it sends only those whose `clients` name the service).
pub fn select(
    table: &RouteTable,
    port: Option<u16>,
    req: &RequestHeader,
    pushed_to: Option<&str>,
) -> Result<Arc<Route>, Refusal> {
    let host = request_authority(req);
    let nr = match table.select_path(port, host.as_deref(), req.uri.path()) {
        Ok(route) => return Ok(route),
        Err(nr) => nr,
    };
    let mut detail = format!(
        "host {:?}; known routes: {}",
        nr.host.unwrap_or_default(),
        table.names().join(", ")
    );
    if let Some(svc) = pushed_to {
        // The route may exist and leave this service out.
        detail.push_str(&format!("; crank-control sends this sidecar only the routes whose clients list is empty or names service {svc:?}: if the route exists, add {svc:?} to its clients (`crankctl routes` lists them)"));
    }
    Err(Refusal::new(Reason::NoRoute, detail))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> RouteTable {
        let cfg = crate::config::parse(
            "p.yaml",
            "identity: {cert: a, key: b, trust_bundle: c}\nadmin: {listen: 127.0.0.1:1}\noutbound: {http_proxy: 127.0.0.1:2}\nroutes: [{name: back, hosts: [back], endpoints: [{address: 127.0.0.1:3, identity: back.acme.crank.local}]}]\n",
        )
        .unwrap();
        RouteTable::from_config(&cfg)
    }

    #[test]
    fn a_known_host_selects_its_route_and_an_unknown_one_is_refused_with_the_fix() {
        let t = table();
        let mut r = RequestHeader::build("GET", b"/x", None).unwrap();
        r.insert_header("host", "back").unwrap();
        assert_eq!(select(&t, None, &r, None).unwrap().name, "back");
        let mut other = RequestHeader::build("GET", b"/x", None).unwrap();
        other.insert_header("host", "nope").unwrap();
        let e = select(&t, None, &other, None).unwrap_err();
        assert_eq!(e.reason, Reason::NoRoute);
        assert_eq!(e.detail, "host \"nope\"; known routes: back");
        let e = select(&t, None, &other, Some("web")).unwrap_err();
        assert!(e.detail.contains("names service \"web\""), "{}", e.detail);
    }
}
