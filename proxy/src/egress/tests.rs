use super::*;

fn table(yaml: &str) -> EgressTable {
    let cfg: EgressConfig = serde_yaml::from_str(yaml).unwrap();
    EgressTable::from_config(&cfg)
}

const DECLARED: &str = "mode: deny\ndestinations:\n  - {name: ray, address: 'Ray-Head.internal:8000'}\n  - {name: dask, address: '10.0.0.5:8786'}\n  - {name: v6, address: '[fd00::5]:8265'}\n";

#[test]
fn lookup_table() {
    let t = table(DECLARED);
    let addr = |s: &str| Target::Addr(s.parse().unwrap());
    let auth = |a: &'static str| Target::Authority {
        authority: a,
        default_port: 80,
    };
    let cases: &[(Target<'_>, Option<&str>)] = &[
        (auth("ray-head.internal:8000"), Some("ray")),
        (auth("RAY-HEAD.internal.:8000"), Some("ray")),
        (auth("ray-head.internal"), None),
        (auth("ray-head.internal:8001"), None),
        (auth("10.0.0.5:8786"), Some("dask")),
        (auth("[fd00::5]:8265"), Some("v6")),
        (auth("[fd00:0::5]:8265"), Some("v6")),
        (addr("10.0.0.5:8786"), Some("dask")),
        (addr("[fd00::5]:8265"), Some("v6")),
        (addr("10.0.0.5:80"), None),
        (addr("10.0.0.6:8786"), None),
        (auth("bad:port"), None),
    ];
    for (dst, want) in cases {
        let got = lookup(&t, *dst).map(|d| d.name.clone());
        assert_eq!(got.as_deref(), *want, "{dst:?}");
    }
}

#[test]
fn undeclared_destinations_follow_the_mode() {
    let cases = [
        ("{}", Undeclared::Uncontrolled, true),
        ("mode: allow", Undeclared::Allow, true),
        ("mode: audit", Undeclared::Audit, true),
        ("mode: deny", Undeclared::Deny, false),
    ];
    for (yaml, want, passes) in cases {
        let t = table(yaml);
        let d = decide(&t, Target::Addr("192.0.2.1:443".parse().unwrap()));
        assert!(
            matches!(d, Decision::Undeclared(u) if u == want),
            "{yaml}: {d:?}"
        );
        assert_eq!(want.passes(), passes);
    }
    let t = table(DECLARED);
    let d = decide(&t, Target::Addr("10.0.0.5:8786".parse().unwrap()));
    assert!(
        matches!(d, Decision::Declared(ref x) if x.name == "dask"),
        "{d:?}"
    );
}

#[tokio::test]
async fn a_dns_name_is_matched_by_its_last_resolution() {
    let t = table("destinations: [{name: local, address: 'localhost:8000'}]");
    let a: SocketAddr = "127.0.0.1:8000".parse().unwrap();
    assert!(lookup(&t, Target::Addr(a)).is_none(), "not resolved yet");
    let d = t.by_name("local").unwrap();
    let got = d.resolve().await.unwrap();
    assert_eq!(got.port(), 8000);
    assert!(got.ip().is_loopback());
    assert_eq!(lookup(&t, Target::Addr(got)).unwrap().name, "local");
}

#[test]
fn the_peer_is_built_once_and_only_its_address_changes() {
    let t = table(DECLARED);
    let d = t.by_name("dask").unwrap();
    let a = d.peer("10.0.0.5:8786".parse().unwrap());
    let b = d.peer("10.0.0.7:8786".parse().unwrap());
    assert_eq!(a.sni, b.sni);
    assert!(!a.is_tls());
    assert!(a.client_cert_key.is_none(), "never the mesh identity");
    assert_eq!(b._address.to_string(), "10.0.0.7:8786");
}

#[test]
fn authority_splitting() {
    assert_eq!(split_authority("Api.X:81", 80), Some(("api.x".into(), 81)));
    assert_eq!(split_authority("api.x", 80), Some(("api.x".into(), 80)));
    assert_eq!(split_authority("[::1]", 80), Some(("::1".into(), 80)));
    assert_eq!(split_authority("[::1]:9", 80), Some(("::1".into(), 9)));
    assert_eq!(split_authority("api.x:0", 80), None);
    assert_eq!(split_authority("", 80), None);
}

#[test]
fn config_problems_name_the_field_and_the_fix() {
    let cfg = crate::config::parse(
        "p.yaml",
        "identity: {cert: a, key: b, trust_bundle: c}\nadmin: {listen: 127.0.0.1:1}\n\
         egress:\n  destinations:\n    - {name: ray, address: '10.0.0.5:8265', tls: {ca: missing.pem}}\n    - {name: ray, address: 'nope'}\n\
         routes:\n  - {name: a, egress: ray, endpoints: [{address: 127.0.0.1:3, identity: a.b.crank.local}]}\n  - {name: b, egress: other, endpoints: []}\n",
    )
    .unwrap();
    let p = problems(&cfg, Path::new("/nonexistent"));
    let has = |field: &str, text: &str| {
        assert!(
            p.iter().any(|(f, m)| f == field && m.contains(text)),
            "{field}: {text} in {p:#?}"
        )
    };
    has("egress.destinations[0].tls.server_name", "is an IP");
    has(
        "egress.destinations[0].tls.ca",
        "cannot read /nonexistent/missing.pem",
    );
    has("egress.destinations[1].address", "has no port");
    has("egress.destinations[1].name", "declared twice");
    has("routes[0].endpoints", "has no endpoints; remove them");
    has(
        "routes[1].egress",
        "\"other\" is not in egress.destinations",
    );
}

use std::path::Path;

#[test]
fn destinations_never_share_pooled_connections() {
    use crank_api::proxy::{EgressDestination, EgressTls};
    let dest = |name: &str, ca: String| EgressDestination {
        name: name.into(),
        address: "127.0.0.1:8443".into(),
        tls: Some(EgressTls {
            ca,
            server_name: Some("ray.example".into()),
        }),
    };
    let ca = || {
        crank_certs::Ca::generate("example", std::time::Duration::from_secs(60))
            .unwrap()
            .cert_pem()
            .to_string()
    };
    let t = EgressTable::from_config(&EgressConfig {
        mode: None,
        destinations: vec![dest("ours", ca()), dest("theirs", ca())],
    });
    let addr = "127.0.0.1:8443".parse().unwrap();
    let (a, b) = (
        t.by_name("ours").unwrap().peer(addr),
        t.by_name("theirs").unwrap().peer(addr),
    );
    assert!(a.is_tls() && b.is_tls());
    assert_eq!(a.sni, "ray.example");
    assert_ne!(
        a.group_key, b.group_key,
        "a connection verified against one CA is not reused for the other"
    );
}
