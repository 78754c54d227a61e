//! Single sidecars and direct mTLS clients, for tests that need a certificate
//! `Mesh::start` does not make: a sidecar with an expired, foreign or
//! identity-less certificate from the mesh's own PKI, or curl talking to an
//! inbound listener directly with a chosen client certificate.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

use crate::pki::{Leaf, Pki};
use crate::proxy::{free_addr, Proxy};

/// A started sidecar and the data listener it was given.
pub struct Sidecar {
    pub proxy: Proxy,
    /// The inbound mTLS listener (server side) or the local port bound to
    /// route `backend` (client side).
    pub listen: SocketAddr,
}

/// A server sidecar (inbound only) presenting `leaf`, trusting `pki`'s bundle,
/// in front of `app`. Config and log are `pki.path()/<name>.{yaml,log}`.
pub fn server_sidecar(
    pki: &Pki,
    name: &str,
    leaf: &Leaf,
    app: SocketAddr,
    drain: &str,
) -> Result<Sidecar, String> {
    let (listen, admin) = (free_addr(), free_addr());
    let yaml = format!(
        "identity: {{cert: {}, key: {}, trust_bundle: {}}}\n\
         inbound: {{listen: {listen}, app: {app}}}\n\
         admin: {{listen: {admin}}}\ndrain: {{deadline: {drain}}}\n",
        leaf.cert.display(),
        leaf.key.display(),
        pki.bundle().display(),
    );
    let proxy = Proxy::try_start(pki.path(), name, &yaml, admin)?;
    Ok(Sidecar { proxy, listen })
}

/// A client sidecar (outbound only) presenting `leaf`, with a local port bound
/// to route `backend`, whose one endpoint is `inbound` proving `identity`.
pub fn client_sidecar(
    pki: &Pki,
    name: &str,
    leaf: &Leaf,
    inbound: SocketAddr,
    identity: &str,
    drain: &str,
) -> Result<Sidecar, String> {
    let (listen, admin) = (free_addr(), free_addr());
    let yaml = format!(
        "identity: {{cert: {}, key: {}, trust_bundle: {}}}\n\
         outbound:\n  ports: [{{listen: {listen}, route: backend}}]\n\
         routes:\n  - name: backend\n    endpoints: [{{address: {inbound}, identity: {identity}}}]\n\
         admin: {{listen: {admin}}}\ndrain: {{deadline: {drain}}}\n",
        leaf.cert.display(),
        leaf.key.display(),
        pki.bundle().display(),
    );
    // Live is enough: a sidecar with an expired cert is never ready.
    let proxy = Proxy::try_start_until(pki.path(), name, &yaml, admin, "/live")?;
    Ok(Sidecar { proxy, listen })
}

/// What curl made of one request.
#[derive(Debug)]
pub struct CurlResult {
    /// curl's exit code: 0 on an HTTP answer; 35, 56 or 58 when TLS failed.
    pub exit: i32,
    /// The HTTP status, 0 when there was none.
    pub status: u16,
    /// Response headers and body (`-i`).
    pub out: String,
    /// curl's own error text.
    pub err: String,
}

/// `curl https://<dns_name>:<port><path>` straight at an inbound mTLS
/// listener, verifying the server against `pki`'s bundle, presenting
/// `client` when given, with `extra` curl arguments.
pub fn curl_mtls(
    pki: &Pki,
    inbound: SocketAddr,
    dns_name: &str,
    client: Option<&Leaf>,
    extra: &[&str],
    path: &str,
) -> CurlResult {
    let port = inbound.port();
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "-i", "--max-time", "10", "--cacert"])
        .arg(pki.bundle())
        .arg("--resolve")
        .arg(format!("{dns_name}:{port}:{}", inbound.ip()));
    if let Some(leaf) = client {
        cmd.arg("--cert")
            .arg(&leaf.cert)
            .arg("--key")
            .arg(&leaf.key);
    }
    let out = cmd
        .args(extra)
        .arg(format!("https://{dns_name}:{port}{path}"))
        .output()
        .expect("curl is installed");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let status = crate::status_of(&text);
    CurlResult {
        exit: out.status.code().unwrap_or(-1),
        status,
        out: text,
        err: String::from_utf8_lossy(&out.stderr).to_string(),
    }
}

/// A leaf signed by `pki`'s CA that carries no Crank identity (no SPIFFE URI
/// SAN, only `DNS:legacy.example`), made with the `openssl` CLI because the
/// mesh CA refuses to issue one. Saved as `pki.path()/<name>.{crt,key}`.
pub fn leaf_without_identity(pki: &Pki, name: &str) -> Leaf {
    let dir = pki.path();
    let key = dir.join(format!("{name}.key"));
    let csr = dir.join(format!("{name}.csr"));
    let cert = dir.join(format!("{name}.crt"));
    let ext = dir.join(format!("{name}.ext"));
    std::fs::write(
        &ext,
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n\
         extendedKeyUsage=clientAuth,serverAuth\nsubjectAltName=DNS:legacy.example\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            "/CN=legacy.example",
            "-keyout",
            path(&key),
            "-out",
            path(&csr),
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            path(&csr),
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-set_serial",
            "4242",
            "-days",
            "1",
            "-extfile",
            path(&ext),
            "-out",
            path(&cert),
        ],
    );
    Leaf { cert, key }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the openssl CLI is installed");
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
