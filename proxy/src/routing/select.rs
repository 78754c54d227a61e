//! The outbound route-select stage: the route a request takes, by the
//! local port it arrived on or the authority it names, or a `no-route`
//! refusal that lists the known routes and says how to fix it.

use std::sync::Arc;

use pingora_http::RequestHeader;

use super::authority::request_authority;
use super::{egress_route, Route, RouteTable};
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
    let nr = match table.select_path(port, host, req.uri.path()) {
        Ok(route) => return Ok(route),
        Err(nr) => nr,
    };
    if let Some(route) = egress_fallback(table, host, req)? {
        return Ok(route);
    }
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

/// A host no route takes: a declared egress destination gets a route of
/// its own (`egress:<name>`, the route defaults); an undeclared one what
/// `egress.mode` says (None: the caller answers `no-route`).
fn egress_fallback(
    table: &RouteTable,
    authority: Option<&str>,
    req: &RequestHeader,
) -> Result<Option<Arc<Route>>, Refusal> {
    use crate::egress::{decide, split_authority, Decision, Destination, Target, Undeclared};
    let Some(authority) = authority else {
        return Ok(None);
    };
    let target = Target::Authority {
        authority,
        default_port: 80,
    };
    let undeclared = match decide(table.egress(), target) {
        Decision::Declared(d) => return Ok(Some(egress_route(format!("egress:{}", d.name), d))),
        Decision::Undeclared(Undeclared::Uncontrolled) => return Ok(None),
        Decision::Undeclared(u) => u,
    };
    let reason = Reason::EgressNotDeclared.as_str();
    if undeclared == Undeclared::Deny {
        let detail = format!(
            "host {authority:?}; egress.mode is deny and no route or egress destination declares it; known routes: {}",
            table.names().join(", ")
        );
        return Err(Refusal::new(Reason::EgressNotDeclared, detail));
    }
    let Some((host, port)) = split_authority(authority, 80) else {
        return Ok(None);
    };
    if crate::egress::passed_through_before(req) {
        // Passed through once already: the host leads back to a sidecar's
        // own HTTP proxy listener, a loop.
        let detail = format!("host {authority:?} was passed through by a sidecar already (Via: {}): a loop; call the destination's own address", crate::egress::VIA);
        return Err(Refusal::new(Reason::NoRoute, detail));
    }
    if undeclared == Undeclared::Audit {
        tracing::warn!(reason, mode = "audit", host = %host, port, "passing through a request to an undeclared destination outside the mesh");
    }
    match Destination::undeclared(&host, port) {
        Ok(d) => Ok(Some(egress_route(
            crate::egress::UNDECLARED_ROUTE.into(),
            Arc::new(d),
        ))),
        Err(_) => Ok(None),
    }
}

/// Counts a request for an undeclared destination by mode: passed through
/// (its route is [`crate::egress::UNDECLARED_ROUTE`]) or refused.
pub fn count_undeclared(
    table: &crate::routing::RouteTable,
    selected: &Result<Arc<crate::routing::Route>, crate::errors::Refusal>,
    m: &crate::metrics::Metrics,
) {
    let undeclared = match selected {
        Ok(r) => r.name == crate::egress::UNDECLARED_ROUTE,
        Err(r) => r.reason == crate::errors::Reason::EgressNotDeclared,
    };
    if let (true, Some(mode)) = (undeclared, table.egress().mode()) {
        m.egress
            .undeclared
            .with_label_values(&[mode.as_str()])
            .inc();
    }
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

    /// A host no route takes, by `egress.mode`: (mode, host, Via, the route
    /// chosen or the refusal's reason).
    #[test]
    fn hosts_no_route_takes_follow_the_egress_mode() {
        type Case = (
            &'static str,
            &'static str,
            Option<&'static str>,
            Result<&'static str, Reason>,
        );
        let cases: &[Case] = &[
            ("", "nope", None, Err(Reason::NoRoute)),
            ("", "ray-head.internal:8000", None, Ok("egress:ray")),
            ("mode: deny", "nope", None, Err(Reason::EgressNotDeclared)),
            (
                "mode: deny",
                "ray-head.internal:8000",
                None,
                Ok("egress:ray"),
            ),
            ("mode: deny", "back", None, Ok("back")),
            ("mode: allow", "nope:81", None, Ok("egress-undeclared")),
            ("mode: audit", "nope", None, Ok("egress-undeclared")),
            (
                "mode: audit",
                "nope",
                Some("1.1 crank-egress"),
                Err(Reason::NoRoute),
            ),
            (
                "mode: audit",
                "nope",
                Some("1.1 other, 1.1 crank-egress"),
                Err(Reason::NoRoute),
            ),
            (
                "mode: audit",
                "nope",
                Some("1.1 other"),
                Ok("egress-undeclared"),
            ),
        ];
        for (mode, host, via, want) in cases {
            let cfg = crate::config::parse(
                "p.yaml",
                &format!("identity: {{cert: a, key: b, trust_bundle: c}}\nadmin: {{listen: 127.0.0.1:1}}\negress: {{{mode}, destinations: [{{name: ray, address: 'ray-head.internal:8000'}}]}}\nroutes: [{{name: back, endpoints: [{{address: 127.0.0.1:3, identity: back.acme.crank.local}}]}}]\n").replace("{, ", "{"),
            )
            .unwrap();
            let t = RouteTable::from_config(&cfg);
            let mut r = RequestHeader::build("GET", b"/x", None).unwrap();
            r.insert_header("host", *host).unwrap();
            if let Some(v) = via {
                r.insert_header("via", *v).unwrap();
            }
            let got = select(&t, None, &r, None)
                .map(|route| route.name.clone())
                .map_err(|e| e.reason);
            assert_eq!(
                got.as_ref().map(String::as_str),
                want.as_ref().map(|w| *w),
                "{mode} {host} {via:?}"
            );
        }
    }
}
