//! Connection-level policy on captured connections that no tunnel's peer
//! checks, with the opaque TCP tunnel's input shape (`input.connection`,
//! method `CONNECT`, protocol `tcp`):
//!
//! * inbound, a caller without a sidecar (`capture.inbound_plaintext:
//!   allow`): the inbound policy decides with `input.source` and
//!   `input.connection.source` null (unauthenticated), the caller's
//!   address and the app's port, as Istio's PERMISSIVE mode still applies
//!   authorization to plaintext callers;
//! * outbound, an opaque or TLS connection from the app (before it is
//!   tunnelled or forwarded): the outbound policy decides with
//!   `input.destination.egress`, and for a destination outside the mesh
//!   `host`, `port`, `declared` and `name`, as for egress HTTP.
//!
//! Without a policy set for the direction every connection passes.

use std::net::SocketAddr;

use crank_policy::Workload;

use crate::direction::Direction;
use crate::policy::facts::{connection_input, connection_request_facts, ConnectionFacts};
use crate::policy::PolicyHandle;
use crate::runtime::Runtime;

/// A connection the policy refused: the outcome label and why.
#[derive(Debug, PartialEq, Eq)]
pub struct Denied {
    /// `policy-denied`, or `policy-error` when evaluation failed.
    pub outcome: &'static str,
    pub detail: String,
}

/// Inbound: may `peer`, with no sidecar, connect to the app's port `dst`?
pub fn inbound(rt: &Runtime, peer: Option<SocketAddr>, dst: SocketAddr) -> Result<(), Denied> {
    let Some(handle) = rt.policies.for_direction(Direction::Inbound) else {
        return Ok(());
    };
    let facts = ConnectionFacts {
        source: None,
        source_address: peer,
        destination: rt.me.clone(),
        capability: None,
        original_destination: Some(dst),
        app: dst,
    };
    decide(rt, handle, &facts, Direction::Inbound, None)
}

/// Outbound: may the app connect to `dst`? `capability` is what a tunnel
/// claims; `egress` the destination outside the mesh it goes to
/// (`None`: a mesh destination).
/// `dst` is `None` for an `outbound.tcp` port (no original destination:
/// `input.connection.destination` is null address, port 0; decide on the
/// capability).
pub fn outbound(
    rt: &Runtime,
    dst: Option<SocketAddr>,
    capability: Option<String>,
    egress: Option<&crate::egress::Destination>,
) -> Result<(), Denied> {
    let Some(handle) = rt.policies.for_direction(Direction::Outbound) else {
        return Ok(());
    };
    let facts = ConnectionFacts {
        source: Some(rt.me.clone()),
        source_address: None,
        destination: Workload::default(),
        capability,
        original_destination: dst,
        app: dst.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0))),
    };
    decide(rt, handle, &facts, Direction::Outbound, Some(egress))
}

/// Builds the input, evaluates, counts and logs the decision.
pub(crate) fn decide(
    rt: &Runtime,
    handle: &PolicyHandle,
    facts: &ConnectionFacts,
    direction: Direction,
    egress: Option<Option<&crate::egress::Destination>>,
) -> Result<(), Denied> {
    let set = handle.current();
    let mut req = connection_request_facts(facts);
    req.direction = direction.as_str();
    let mut doc = crank_policy::input::build(&req, set.manifest());
    if let Some(e) = egress {
        crate::policy::facts::egress_input(&mut doc, e);
    }
    if let Some(o) = doc.as_object_mut() {
        o.insert("connection".into(), connection_input(facts));
    }
    let d = rt
        .policies
        .check_input(handle, &set, &req, doc, None, &rt.metrics);
    if d.permitted {
        return Ok(());
    }
    let outcome = match d.outcome {
        crank_policy::Outcome::Error => "policy-error",
        _ => "policy-denied",
    };
    Err(Denied {
        outcome,
        detail: format!(
            "decision {} (revision {}): {}",
            req.id,
            set.revision(),
            d.reasons.join("; ")
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Denies plaintext callers of port 9000 inbound, and outbound any
    /// connection leaving the mesh for an undeclared destination or port
    /// 6379 on a declared one, each with a reason naming what it saw.
    const POLICY: &str = r#"
package crank.authz

default allow := false
allow if count(deny) == 0

deny contains sprintf("plaintext caller %v of port %d", [input.connection.source_address, input.connection.destination.port]) if {
    input.connection.source == null
    input.connection.destination.port == 9000
}

deny contains sprintf("undeclared %v:%d", [input.destination.host, input.destination.port]) if {
    input.destination.egress
    not input.destination.declared
}

deny contains sprintf("%v may not reach port 6379", [input.destination.name]) if {
    input.destination.egress
    input.destination.port == 6379
}
"#;

    fn runtime(dir: &std::path::Path) -> Runtime {
        std::fs::write(dir.join("p.rego"), POLICY).unwrap();
        let yaml = format!(
            "identity: {{cert: a, key: b, trust_bundle: c}}\nadmin: {{listen: 127.0.0.1:1}}\npolicy: {{inbound: {{dir: {d}}}, outbound: {{dir: {d}}}}}\n",
            d = dir.display()
        );
        let cfg = crate::config::parse("p.yaml", &yaml).unwrap();
        let mut rt = Runtime::for_tests(&cfg);
        let p = cfg.policy.as_ref().unwrap();
        rt.policies = crate::policy::Policies::start(p, dir, &rt.metrics).unwrap();
        rt
    }

    #[test]
    fn a_plaintext_caller_meets_the_inbound_policy() {
        let dir = tempfile::tempdir().unwrap();
        let rt = runtime(dir.path());
        let peer = Some("10.0.0.3:40000".parse().unwrap());
        assert_eq!(inbound(&rt, peer, "10.0.0.2:8080".parse().unwrap()), Ok(()));
        let e = inbound(&rt, peer, "10.0.0.2:9000".parse().unwrap()).unwrap_err();
        assert_eq!(e.outcome, "policy-denied");
        assert!(
            e.detail
                .contains("plaintext caller 10.0.0.3:40000 of port 9000"),
            "{}",
            e.detail
        );
        let without = Runtime::for_tests(
            &crate::config::parse(
                "p.yaml",
                "identity: {cert: a, key: b, trust_bundle: c}\nadmin: {listen: 127.0.0.1:1}\n",
            )
            .unwrap(),
        );
        assert_eq!(
            inbound(&without, peer, "10.0.0.2:9000".parse().unwrap()),
            Ok(())
        );
    }

    #[test]
    fn an_outbound_connection_meets_the_outbound_policy_with_its_egress_facts() {
        let dir = tempfile::tempdir().unwrap();
        let rt = runtime(dir.path());
        let declared = |port: u16| {
            crate::egress::Destination::build(&crank_api::proxy::EgressDestination {
                name: "cache".into(),
                address: format!("192.0.2.5:{port}"),
                tls: None,
            })
            .unwrap()
        };
        let to = |port: u16| SocketAddr::from(([192, 0, 2, 5], port));
        assert_eq!(
            outbound(&rt, Some(to(443)), None, Some(&declared(443))),
            Ok(())
        );
        let e = outbound(&rt, Some(to(6379)), None, Some(&declared(6379))).unwrap_err();
        assert!(
            e.detail.contains("cache may not reach port 6379"),
            "{}",
            e.detail
        );
        let undeclared = crate::egress::Destination::undeclared("192.0.2.9", 443).unwrap();
        let e = outbound(
            &rt,
            Some("192.0.2.9:443".parse().unwrap()),
            None,
            Some(&undeclared),
        )
        .unwrap_err();
        assert!(
            e.detail.contains("undeclared 192.0.2.9:443"),
            "{}",
            e.detail
        );
        // A mesh destination is no egress: the egress rules do not apply.
        let mesh = outbound(&rt, Some(to(6379)), Some("cache".into()), None);
        assert_eq!(mesh, Ok(()));
    }
}
