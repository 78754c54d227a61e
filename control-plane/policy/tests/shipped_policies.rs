//! The shipped policy set (`policies/`) runs on regorus's VM for speed. The
//! VM differs from OPA's semantics on a few idioms, so this test proves that,
//! for these policies, both engines make the same decision with the same
//! reasons on every combination of caller, callee, capability, method and
//! body size we can think of, with the shipped data and with no data.

use std::path::PathBuf;
use std::time::SystemTime;

use crank_policy::input::{self, RequestFacts, Workload};
use crank_policy::manifest::EngineChoice;
use crank_policy::{Bundle, Outcome, PolicySet};

fn shipped() -> Bundle {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../policies");
    Bundle::read(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

fn compile(bundle: &Bundle, engine: EngineChoice) -> PolicySet {
    let mut b = bundle.clone();
    b.manifest.engine = engine;
    let set = PolicySet::compile(&b).unwrap_or_else(|e| panic!("{engine:?}: {e}"));
    assert_eq!(
        set.engine(),
        if engine == EngineChoice::Rvm {
            "rvm"
        } else {
            "interpreter"
        }
    );
    set
}

fn workload(service: &str, tenant: &str) -> Workload {
    let id = crank_certs::Identity::new(service, tenant, "crank.local").expect("valid labels");
    Workload::from(&id)
}

fn inputs() -> Vec<RequestFacts> {
    let sources = [
        None,
        Some(("web", "acme")),
        Some(("frontend", "demo")),
        Some(("web", "evil")),
        Some(("transcoder", "media")),
        Some(("billing", "acme")),
    ];
    let dests = [
        ("backend", "demo"),
        ("transcoder", "media"),
        ("ledger", "bank"),
        ("web", "acme"),
    ];
    let caps = [
        None,
        Some("transcode:v1"),
        Some("billing.charge:v1"),
        Some("ledger:v1"),
        Some("auth.introspect:v1"),
        Some("unknown:v9"),
    ];
    let methods = ["GET", "POST", "DELETE", "TRACE", "get"];
    let bodies = [None, Some(0), Some(512), Some(20 << 20), Some(200 << 20)];
    let mut out = Vec::new();
    for s in &sources {
        for d in &dests {
            for c in &caps {
                for m in &methods {
                    for b in &bodies {
                        out.push(RequestFacts {
                            direction: "inbound",
                            source: s.map(|(svc, t)| workload(svc, t)),
                            source_address: None,
                            destination: workload(d.0, d.1),
                            capability: c.map(String::from),
                            route: None,
                            method: m.to_string(),
                            path_and_query: "/v1/jobs?x=1".into(),
                            host: Some(d.0.into()),
                            scheme: "https".into(),
                            protocol: "HTTP/2".into(),
                            headers: vec![("content-type".into(), "application/json".into())],
                            body_size: *b,
                            time: SystemTime::UNIX_EPOCH,
                            id: "t".into(),
                        });
                    }
                }
            }
        }
    }
    out
}

fn same_decisions(bundle: &Bundle) -> (usize, usize) {
    let vm = compile(bundle, EngineChoice::Rvm);
    let interp = compile(bundle, EngineChoice::Interpreter);
    let (mut allowed, mut denied) = (0, 0);
    for facts in inputs() {
        let doc = input::build(&facts, bundle.manifest_ref());
        let a = vm.decide(&doc);
        let b = interp.decide(&doc);
        assert_eq!(
            (a.outcome, &a.reasons),
            (b.outcome, &b.reasons),
            "the VM and the interpreter disagree on {doc}"
        );
        assert_ne!(a.outcome, Outcome::Error, "{doc}: {:?}", a.error);
        match a.outcome {
            Outcome::Allow => allowed += 1,
            _ => denied += 1,
        }
    }
    (allowed, denied)
}

#[test]
fn vm_and_interpreter_decide_alike_with_the_shipped_data() {
    let (allowed, denied) = same_decisions(&shipped());
    // Both outcomes must be well represented, or the comparison proves little.
    assert!(
        allowed > 100 && denied > 1000,
        "allowed {allowed}, denied {denied}"
    );
}

#[test]
fn vm_and_interpreter_decide_alike_without_data() {
    let mut b = shipped();
    b.data = serde_json::json!({});
    same_decisions(&b);
}

#[test]
fn the_shipped_set_loads_on_the_vm_in_enforce_mode() {
    let set = PolicySet::compile(&shipped()).unwrap();
    assert_eq!(set.engine(), "rvm", "{:?}", set.vm_fallback());
    assert_eq!(set.manifest().mode, crank_policy::Mode::Enforce);
}
