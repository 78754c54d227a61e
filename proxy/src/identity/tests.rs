//! Table tests of the identity mechanisms: certificate checks, the
//! verifier, the resolver and the deny list.

use super::*;

/// Material for `web.acme.crank.local` from a throw-away CA (unit tests).
pub(crate) fn test_material() -> Material {
    let root = Ca::generate("crank.local", Duration::from_secs(86_400)).unwrap();
    let int = root
        .generate_intermediate(Duration::from_secs(86_400))
        .unwrap();
    material(&leaf(&int, "web"), &root)
}

#[test]
fn tls13_detection() {
    assert!(offers_tls13(&[CipherSuite::TLS13_AES_128_GCM_SHA256]));
    assert!(!offers_tls13(&[
        CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
    ]));
    assert!(!offers_tls13(&[]));
}

use crank_certs::{Ca, LeafRequest};
use std::time::Duration;

fn id(svc: &str) -> Identity {
    Identity::new(svc, "acme", "crank.local").unwrap()
}

fn leaf(ca: &Ca, who: &str) -> crank_certs::IssuedLeaf {
    ca.issue(&LeafRequest::new(id(who), Duration::from_secs(3600)))
        .unwrap()
}

fn material(l: &crank_certs::IssuedLeaf, root: &Ca) -> Material {
    Material::from_pem(
        l.cert_pem.as_bytes(),
        l.key_pem.as_bytes(),
        root.cert_pem().as_bytes(),
        "test",
    )
    .unwrap()
}

fn tls_for(root: &Ca, l: &crank_certs::IssuedLeaf, m: &Metrics) -> WorkloadTls {
    WorkloadTls::from_material(material(l, root), m).unwrap()
}

#[test]
fn swap_keeps_the_identity_and_refuses_another() {
    let root = Ca::generate("crank.local", Duration::from_secs(86_400)).unwrap();
    let int = root
        .generate_intermediate(Duration::from_secs(86_400))
        .unwrap();
    let m = Metrics::new();
    let tls = tls_for(&root, &leaf(&int, "web"), &m);
    let before = tls.summary().serial.clone();

    let other = material(&leaf(&int, "api"), &root);
    let e = tls.swap_cert(other.chain, other.key).unwrap_err();
    assert!(e.to_string().contains("not this workload's"), "{e}");
    assert_eq!(tls.summary().serial, before);

    let next = material(&leaf(&int, "web"), &root);
    tls.swap_cert(next.chain, next.key).unwrap();
    let after = tls.summary();
    assert_ne!(after.serial, before);
    assert_eq!(tls.identity, id("web"));
    // the client cert presented outbound is the new one
    let presented = CertSummary::from_der(tls.client_cert().leaf().borrow_raw_cert()).unwrap();
    assert_eq!(presented.serial, after.serial);
    let text = String::from_utf8(m.render()).unwrap();
    let leaf_lines: Vec<_> = text
        .lines()
        .filter(|l| l.starts_with("crank_cert_expiry_timestamp_seconds{cert=\"leaf\""))
        .collect();
    assert_eq!(leaf_lines.len(), 1, "{text}");
    assert!(leaf_lines[0].contains(&canonical_serial(&after.serial)));
}

#[test]
fn swapping_roots_replaces_the_root_series_and_the_pool_key() {
    let root = Ca::generate("crank.local", Duration::from_secs(86_400)).unwrap();
    let root2 = Ca::generate("crank.local", Duration::from_secs(86_400)).unwrap();
    let m = Metrics::new();
    let tls = tls_for(&root, &leaf(&root, "web"), &m);
    let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let k0 = tls.pool_key(&addr);
    let r2 = crank_certs::pem::certs_from_pem(root2.cert_pem().as_bytes()).unwrap();
    tls.swap_roots(&r2).unwrap();
    assert_ne!(tls.pool_key(&addr), k0);
    let serial2 = canonical_serial(&CertSummary::from_der(&r2[0]).unwrap().serial);
    let text = String::from_utf8(m.render()).unwrap();
    let roots: Vec<_> = text
        .lines()
        .filter(|l| l.starts_with("crank_cert_expiry_timestamp_seconds{cert=\"root\""))
        .collect();
    assert_eq!(roots.len(), 1, "{text}");
    assert!(roots[0].contains(&serial2), "{}", roots[0]);
    assert_eq!(tls.bundle().len(), 1);
    let k1 = tls.pool_key(&addr);
    tls.retire_pooled(addr);
    assert_ne!(tls.pool_key(&addr), k1);
    assert_eq!(tls.pool_key(&"127.0.0.1:2".parse().unwrap()), k1);
}

#[test]
fn verifier_refuses_a_denied_serial_as_revoked() {
    let root = Ca::generate("crank.local", Duration::from_secs(86_400)).unwrap();
    let int = root
        .generate_intermediate(Duration::from_secs(86_400))
        .unwrap();
    let m = Metrics::new();
    let tls = tls_for(&root, &leaf(&int, "web"), &m);
    let peer = material(&leaf(&int, "api"), &root);
    let now = UnixTime::now();
    let v = &tls.verifier;
    assert!(v
        .verify_client_cert(&peer.chain[0], &peer.chain[1..], now)
        .is_ok());
    // x509-parser's form: colon-separated hex
    let raw = CertSummary::from_der(&peer.chain[0]).unwrap().serial;
    assert!(raw.contains(':'));
    tls.set_deny_list([raw.to_uppercase()]);
    assert!(tls.is_revoked(&canonical_serial(&raw)));
    assert!(tls.is_revoked(&raw));
    let e = v
        .verify_client_cert(&peer.chain[0], &peer.chain[1..], now)
        .unwrap_err();
    assert_eq!(refusal_reason(&e), "revoked");
    assert_eq!(
        m.handshake_failures
            .with_label_values(&["inbound", "revoked"])
            .get(),
        1
    );
    assert_eq!(m.identity.revoked_serials.get(), 1);
    // our own serial is not on the list
    assert!(!tls.is_revoked(&tls.summary().serial));
    tls.set_deny_list(Vec::<String>::new());
    assert!(v
        .verify_client_cert(&peer.chain[0], &peer.chain[1..], now)
        .is_ok());
}

#[test]
fn peer_identity_keeps_the_canonical_serial() {
    let root = Ca::generate("crank.local", Duration::from_secs(86_400)).unwrap();
    let peer = material(&leaf(&root, "api"), &root);
    let p = peer_identity(&peer.chain[0]).unwrap();
    let raw = CertSummary::from_der(&peer.chain[0]).unwrap().serial;
    assert_eq!(p.serial, raw.replace(':', "").trim_start_matches("00"));
    assert_eq!(p.spiffe_id, "spiffe://crank.local/tenant/acme/svc/api");
}

#[test]
fn a_name_mismatch_names_the_expected_and_the_presented_identity() {
    use rustls::client::danger::ServerCertVerifier;
    let root = Ca::generate("crank.local", Duration::from_secs(86_400)).unwrap();
    let peer = material(&leaf(&root, "backend"), &root);
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        root_store(&peer.roots).unwrap(),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .unwrap();
    // What the outbound handshake meets when the route expects payments.
    let name = rustls::pki_types::ServerName::try_from("payments.acme.crank.local").unwrap();
    let e = verifier
        .verify_server_cert(
            &peer.chain[0],
            &peer.chain[1..],
            &name,
            &[],
            UnixTime::now(),
        )
        .unwrap_err();
    // Pingora wraps it: "TLSHandshakeFailure context: … cause: <rustls>".
    let text = format!("TLSHandshakeFailure context: tls stream error cause: {e}");
    let want = "expected spiffe://crank.local/tenant/acme/svc/payments, \
                presented spiffe://crank.local/tenant/acme/svc/backend";
    assert_eq!(
        mismatch_detail(&text, None).as_deref(),
        Some(want),
        "{text}"
    );
    assert_eq!(
        mismatch_detail(&text, Some("spiffe://crank.local/tenant/acme/svc/payments")).as_deref(),
        Some(want)
    );

    // (error text, detail)
    let cases = [
        (
            r#"certificate not valid for name "a.t.td"; certificate is only valid for DnsName("b.t.td")"#,
            Some("expected spiffe://td/tenant/t/svc/a, presented spiffe://td/tenant/t/svc/b"),
        ),
        (
            r#"certificate not valid for name "a.t.td"; certificate is only valid for DnsName("x") or DnsName("c.t.td")"#,
            Some("expected spiffe://td/tenant/t/svc/a, presented x, spiffe://td/tenant/t/svc/c"),
        ),
        (
            r#"certificate not valid for name "a.t.td"; certificate is not valid for any names (according to its subjectAltName extension)"#,
            Some("expected spiffe://td/tenant/t/svc/a, presented no identity"),
        ),
        ("invalid peer certificate: UnknownIssuer", None),
        ("invalid peer certificate: NotValidForName", None),
    ];
    for (text, want) in cases {
        assert_eq!(mismatch_detail(text, None).as_deref(), want, "{text}");
    }
}

#[test]
fn refusal_reasons() {
    use rustls::Error::InvalidCertificate as IC;
    assert_eq!(refusal_reason(&IC(CertificateError::Expired)), "expired");
    assert_eq!(
        refusal_reason(&IC(CertificateError::NotValidYet)),
        "not-yet-valid"
    );
    assert_eq!(
        refusal_reason(&IC(CertificateError::UnknownIssuer)),
        "unknown-ca"
    );
    assert_eq!(
        refusal_reason(&IC(CertificateError::BadEncoding)),
        "invalid-cert"
    );
}
