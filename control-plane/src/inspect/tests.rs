//! Tests of `crankctl cert inspect`: file reports, rendering, and real
//! handshakes with loopback TLS servers.

use std::sync::Arc;

use rustls::RootCertStore;

use super::connect::split_address;
use super::*;
use crank_certs::{Ca, Identity, IssuedLeaf, LeafRequest};
use std::net::SocketAddr;
use std::sync::mpsc;
use tempfile::TempDir;

const DAY: Duration = Duration::from_secs(24 * 3600);
const WEB: &str = "spiffe://crank.local/tenant/acme/svc/web";

fn id(service: &str) -> Identity {
    Identity::new(service, "acme", "crank.local").unwrap()
}

/// A root, its intermediate, and web's leaf (cert_pem = leaf + intermediate).
fn pki() -> (Ca, Ca, IssuedLeaf) {
    let root = Ca::generate("crank.local", 30 * DAY).unwrap();
    let inter = root.generate_intermediate(7 * DAY).unwrap();
    let leaf = inter.issue(&LeafRequest::new(id("web"), DAY)).unwrap();
    (root, inter, leaf)
}

fn write(dir: &TempDir, name: &str, contents: &[u8]) -> PathBuf {
    let p = dir.path().join(name);
    std::fs::write(&p, contents).unwrap();
    p
}

#[test]
fn output_parses_and_names_choices() {
    assert_eq!("human".parse::<Output>().unwrap(), Output::Human);
    assert_eq!("json".parse::<Output>().unwrap(), Output::Json);
    let err = "yaml".parse::<Output>().unwrap_err();
    assert!(err.contains("human") && err.contains("json"), "{err}");
    assert_eq!(Output::Json.to_string(), "json");
}

#[test]
fn short_durations() {
    assert_eq!(short_duration(86_340), "23h 59m");
    assert_eq!(short_duration(300), "5m");
    assert_eq!(short_duration(330), "5m 30s");
    assert_eq!(short_duration(3 * 86_400 + 7_200), "3d 2h");
    assert_eq!(short_duration(86_400), "1d");
    assert_eq!(short_duration(42), "42s");
}

#[test]
fn addresses() {
    assert_eq!(
        split_address("web.acme:8443").unwrap(),
        ("web.acme".into(), 8443)
    );
    assert_eq!(split_address("[::1]:443").unwrap(), ("::1".into(), 443));
    for bad in ["web.acme", "::1:443", ":443", "web:x", "[::1:443"] {
        let e = split_address(bad).unwrap_err().to_string();
        assert!(e.contains("HOST:PORT"), "{bad}: {e}");
    }
}

#[test]
fn file_with_leaf_and_intermediate() {
    let (_root, _inter, leaf) = pki();
    let dir = TempDir::new().unwrap();
    let path = write(&dir, "web.crt", leaf.cert_pem.as_bytes());
    let report = file_report(&path).unwrap();
    assert_eq!(report.kind, SourceKind::File);
    assert_eq!(report.certificates.len(), 2);
    let l = &report.certificates[0];
    assert_eq!(l.position, "leaf");
    let ident = l.identity.as_ref().unwrap();
    assert_eq!(ident.spiffe_id, WEB);
    assert_eq!(ident.dns_name, "web.acme.crank.local");
    assert!(!l.expired && !l.not_yet_valid && !l.is_ca);
    assert!(l.expires_in_seconds > 86_000 && l.expires_in_seconds <= 86_400);
    assert_eq!(l.dns_sans, vec!["web.acme.crank.local".to_string()]);
    assert_eq!(l.uri_sans, vec![WEB.to_string()]);
    assert!(l.serial.contains(':'), "{}", l.serial);
    assert!(l.not_after_rfc3339.ends_with('Z'));
    let i = &report.certificates[1];
    assert_eq!(i.position, "intermediate");
    assert!(i.is_ca && i.identity.is_none() && i.identity_error.is_none());
    assert_eq!(l.issuer, i.subject);

    let human = render_human(&report);
    assert!(human.starts_with(&format!("{}: 2 certificates", path.display())));
    assert!(
        human.contains("expires in 23h 59m") || human.contains("expires in 1d"),
        "{human}"
    );
    // Identity first in the leaf's block.
    let block = &human[human.find("[0] leaf").unwrap()..];
    let first = block.lines().nth(1).unwrap();
    assert!(
        first.contains("identity:") && first.contains(WEB),
        "{human}"
    );
    assert!(human.contains("[1] intermediate"), "{human}");

    let json: serde_json::Value = serde_json::from_str(&render_json(&report).unwrap()).unwrap();
    assert_eq!(json["certificates"][0]["identity"]["spiffe_id"], WEB);
    assert_eq!(json["certificates"][0]["expired"], false);
    assert_eq!(json["kind"], "file");
    assert!(json["verified"].is_null());
}

#[test]
fn root_file_is_a_root() {
    let (root, _, _) = pki();
    let dir = TempDir::new().unwrap();
    let path = write(&dir, "bundle.pem", root.cert_pem().as_bytes());
    let report = file_report(&path).unwrap();
    assert_eq!(report.certificates.len(), 1);
    assert_eq!(report.certificates[0].position, "root");
    assert!(render_human(&report).contains(": 1 certificate\n"));
}

#[test]
fn expired_leaf_renders_expired() {
    let (_, inter, _) = pki();
    let now = SystemTime::now();
    let mut req = LeafRequest::new(id("web"), DAY);
    req.not_before = Some((now - Duration::from_secs(7200)).into());
    req.not_after = Some((now - Duration::from_secs(300)).into());
    let leaf = inter.issue(&req).unwrap();
    let dir = TempDir::new().unwrap();
    let path = write(&dir, "old.crt", leaf.cert_pem.as_bytes());
    let report = file_report(&path).unwrap();
    let l = &report.certificates[0];
    assert!(l.expired);
    assert!(l.expires_in_seconds <= -300 && l.expires_in_seconds > -400);
    let human = render_human(&report);
    assert!(human.contains("EXPIRED 5m"), "{human}");
    assert!(human.contains(" ago)"), "{human}");
}

#[test]
fn file_errors_name_problem_and_fix() {
    let (_, _, leaf) = pki();
    let dir = TempDir::new().unwrap();
    let empty = write(&dir, "empty.pem", b"\n");
    let e = file_report(&empty).unwrap_err().to_string();
    assert!(e.contains("empty") && e.contains("empty.pem"), "{e}");
    let key = write(&dir, "web.key", leaf.key_pem.as_bytes());
    let e = file_report(&key).unwrap_err().to_string();
    assert!(e.contains("private key"), "{e}");
    let junk = write(&dir, "junk.pem", b"hello");
    let e = file_report(&junk).unwrap_err().to_string();
    assert!(e.contains("BEGIN CERTIFICATE"), "{e}");
    let e = file_report(&dir.path().join("missing.pem"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("cannot read") && e.contains("missing.pem"),
        "{e}"
    );
}

#[test]
fn der_file_is_accepted() {
    let (_, _, leaf) = pki();
    let der = crank_certs::pem::certs_from_pem(leaf.cert_pem.as_bytes()).unwrap();
    let dir = TempDir::new().unwrap();
    let path = write(&dir, "web.der", &der[0]);
    let report = file_report(&path).unwrap();
    assert_eq!(report.certificates.len(), 1);
    assert_eq!(
        report.certificates[0].identity.as_ref().unwrap().spiffe_id,
        WEB
    );
}

// --- connect ---------------------------------------------------------

enum ClientAuthMode {
    None,
    Optional,
    Required,
}

/// A TLS 1.3 server on 127.0.0.1:0 in its own thread and runtime,
/// serving `leaf`. Each handshake sends the client's SPIFFE ID (or the
/// handshake error) on the channel.
fn serve(
    leaf: &IssuedLeaf,
    client_roots: &str,
    mode: ClientAuthMode,
) -> (SocketAddr, mpsc::Receiver<Result<Option<String>, String>>) {
    use rustls::server::WebPkiClientVerifier;
    use tokio::io::AsyncReadExt;

    let certs = crank_certs::pem::certs_from_pem(leaf.cert_pem.as_bytes()).unwrap();
    let key = crank_certs::pem::key_from_pem(leaf.key_pem.as_bytes()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap();
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(
        crank_certs::pem::certs_from_pem(client_roots.as_bytes()).unwrap(),
    );
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
    let builder = match mode {
        ClientAuthMode::None => builder.with_no_client_auth(),
        ClientAuthMode::Optional => {
            builder.with_client_cert_verifier(verifier.allow_unauthenticated().build().unwrap())
        }
        ClientAuthMode::Required => builder.with_client_cert_verifier(verifier.build().unwrap()),
    };
    let mut config = builder.with_single_cert(certs, key).unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));

    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    match acceptor.accept(tcp).await {
                        Ok(mut tls) => {
                            let who = tls
                                .get_ref()
                                .1
                                .peer_certificates()
                                .and_then(|c| c.first())
                                .and_then(|c| crank_certs::identity_from_der(c).ok())
                                .map(|i| i.spiffe_id());
                            let _ = tx.send(Ok(who));
                            let mut buf = [0u8; 64];
                            let _ = tls.read(&mut buf).await;
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e.to_string()));
                        }
                    }
                });
            }
        });
    });
    (addr, rx)
}

fn opts(addr: impl ToString) -> ConnectOptions {
    ConnectOptions {
        address: addr.to_string(),
        server_name: None,
        ca: None,
        cert: None,
        key: None,
        timeout: Duration::from_secs(5),
    }
}

#[test]
fn connect_reports_chain_and_verification() {
    let (root, _, leaf) = pki();
    let other_root = Ca::generate("other.local", DAY).unwrap();
    let (twin_root, _, _) = pki();
    let dir = TempDir::new().unwrap();
    let good = write(&dir, "bundle.pem", root.cert_pem().as_bytes());
    let bad = write(&dir, "other.pem", other_root.cert_pem().as_bytes());
    let twin = write(&dir, "twin.pem", twin_root.cert_pem().as_bytes());
    let (addr, seen) = serve(&leaf, root.cert_pem(), ClientAuthMode::Optional);

    // Unverified: the chain, TLS 1.3, h2.
    let report = connect_report(&opts(addr)).unwrap();
    assert_eq!(report.kind, SourceKind::Connect);
    assert_eq!(report.certificates.len(), 2);
    assert_eq!(
        report.certificates[0].identity.as_ref().unwrap().spiffe_id,
        WEB
    );
    assert_eq!(report.certificates[1].position, "intermediate");
    assert_eq!(report.tls_version.as_deref(), Some("TLSv1.3"));
    assert_eq!(report.alpn.as_deref(), Some("h2"));
    assert!(report.verified.is_none());
    assert_eq!(
        report.client_cert,
        Some(ClientCertStatus {
            requested: true,
            sent: false
        })
    );
    let human = render_human(&report);
    assert!(
        human.starts_with(&format!(
            "{addr} (server name 127.0.0.1): TLSv1.3, ALPN h2\n"
        )),
        "{human}"
    );
    assert!(
        human.contains("not verified (pass --ca BUNDLE to verify)"),
        "{human}"
    );
    assert!(human.contains("2 certificates presented"), "{human}");
    assert_eq!(seen.recv().unwrap(), Ok(None));

    // Verified against the right root for the leaf's name.
    let mut o = opts(addr);
    o.ca = Some(good.clone());
    o.server_name = Some("web.acme.crank.local".into());
    let report = connect_report(&o).unwrap();
    let v = report.verified.clone().unwrap();
    assert!(v.ok, "{v:?}");
    assert_eq!(v.error, None);
    let human = render_human(&report);
    assert!(
        human.contains(&format!(
            "chain verified against {} for web.acme.crank.local",
            good.display()
        )),
        "{human}"
    );
    let json: serde_json::Value = serde_json::from_str(&render_json(&report).unwrap()).unwrap();
    assert_eq!(json["verified"]["ok"], true);
    assert_eq!(json["tls_version"], "TLSv1.3");

    // Another root: the chain is still reported, verification fails.
    o.ca = Some(bad);
    let report = connect_report(&o).unwrap();
    assert_eq!(report.certificates.len(), 2);
    let v = report.verified.clone().unwrap();
    assert!(!v.ok);
    let err = v.error.unwrap();
    assert!(err.contains("UnknownIssuer"), "{err}");
    let human = render_human(&report);
    assert!(
        human.contains("chain NOT verified: invalid peer certificate: UnknownIssuer"),
        "{human}"
    );
    assert!(human.contains("hint: the chain does not lead"), "{human}");

    // A re-made CA (another key) has another name too: it is not taken
    // for the issuer (that failed as BadSignature when roots shared a name).
    o.ca = Some(twin);
    let v = connect_report(&o).unwrap().verified.unwrap();
    assert!(!v.ok);
    assert!(v.error.unwrap().contains("UnknownIssuer"));
    assert!(v.hint.unwrap().contains("does not lead"));

    // The right root, but verified for the IP: the name does not match.
    let mut o = opts(addr);
    o.ca = Some(good);
    let v = connect_report(&o).unwrap().verified.unwrap();
    assert!(!v.ok);
    let err = v.error.unwrap();
    assert!(err.contains("not valid for name"), "{err}");
    assert!(v.hint.unwrap().contains("--server-name"));
}

#[test]
fn connect_with_client_certificate() {
    let (root, inter, leaf) = pki();
    let client = inter.issue(&LeafRequest::new(id("api"), DAY)).unwrap();
    let dir = TempDir::new().unwrap();
    let cert = write(&dir, "api.crt", client.cert_pem.as_bytes());
    let key = write(&dir, "api.key", client.key_pem.as_bytes());
    let (addr, seen) = serve(&leaf, root.cert_pem(), ClientAuthMode::Required);

    let mut o = opts(addr);
    o.cert = Some(cert.clone());
    o.key = Some(key);
    let report = connect_report(&o).unwrap();
    assert_eq!(
        report.client_cert,
        Some(ClientCertStatus {
            requested: true,
            sent: true
        })
    );
    assert_eq!(
        seen.recv().unwrap(),
        Ok(Some("spiffe://crank.local/tenant/acme/svc/api".into()))
    );

    // Without one, the server's rejection is reported with the fix.
    let e = connect_report(&opts(addr)).unwrap_err().to_string();
    assert!(e.contains("--cert and --key"), "{e}");
    assert!(seen.recv().unwrap().is_err());

    // Half a client identity is refused up front.
    let mut o = opts(addr);
    o.cert = Some(cert);
    let e = connect_report(&o).unwrap_err().to_string();
    assert!(e.contains("--cert and --key go together"), "{e}");
}

#[test]
fn connect_without_client_auth_server() {
    let (root, _, leaf) = pki();
    let (addr, _seen) = serve(&leaf, root.cert_pem(), ClientAuthMode::None);
    let report = connect_report(&opts(addr)).unwrap();
    assert_eq!(
        report.client_cert,
        Some(ClientCertStatus {
            requested: false,
            sent: false
        })
    );
    assert!(report.notes.is_empty());
}

#[test]
fn connect_refused_is_clear() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let e = connect_report(&opts(format!("127.0.0.1:{port}")))
        .unwrap_err()
        .to_string();
    assert!(e.contains("connection refused"), "{e}");
    assert!(e.contains(&format!("127.0.0.1:{port}")), "{e}");
}

#[test]
fn connect_to_plain_http_says_not_tls() {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = l.accept() {
            let mut buf = [0u8; 512];
            let _ = s.read(&mut buf);
            let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n");
        }
    });
    let e = connect_report(&opts(addr)).unwrap_err().to_string();
    assert!(e.contains("is this a TLS port"), "{e}");
}

#[test]
fn connect_timeout_is_clear() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    // Accepted by the kernel backlog, never answered.
    let mut o = opts(addr);
    o.timeout = Duration::from_millis(300);
    let e = connect_report(&o).unwrap_err().to_string();
    assert!(e.contains("timed out after 300ms"), "{e}");
    assert!(e.contains("TLS port"), "{e}");
    drop(l);
}

#[test]
fn connect_option_errors() {
    let dir = TempDir::new().unwrap();
    let mut o = opts("127.0.0.1:1");
    o.ca = Some(dir.path().join("nope.pem"));
    let e = connect_report(&o).unwrap_err().to_string();
    assert!(e.contains("--ca") && e.contains("bundle.pem"), "{e}");
    let e = connect_report(&opts("no-port")).unwrap_err().to_string();
    assert!(e.contains("HOST:PORT"), "{e}");
}
