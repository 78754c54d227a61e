//! The identity agent's state directory: `key.pem` (0600), `cert.pem`
//! (leaf then intermediate), `bundle.pem`, `instance` and `token.used` (the
//! SHA-256 of the join token of the last enrollment, never the token). Each
//! file is written whole to a temporary file and renamed into place.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crank_certs::{CertSummary, Identity};

use crate::identity::{check_chain, Material};

pub const KEY: &str = "key.pem";
pub const CERT: &str = "cert.pem";
pub const BUNDLE: &str = "bundle.pem";
pub const INSTANCE: &str = "instance";
pub const TOKEN_USED: &str = "token.used";

/// Material found in the state directory, ready to serve.
#[derive(Debug)]
pub struct Stored {
    pub chain_pem: String,
    pub key_pem: String,
    pub bundle_pem: String,
    pub summary: CertSummary,
}

/// What the state directory holds.
#[derive(Debug)]
pub enum StateCheck {
    /// A certificate for this identity, unexpired, with its key and a bundle.
    Valid(Box<Stored>),
    /// Nothing enrolled yet (one of the files is absent).
    Missing,
    /// The certificate expired at `not_after`.
    Expired { not_after: i64 },
    /// The certificate is for another identity (the config changed).
    WrongIdentity { found: String },
    /// Files that cannot be used (bad PEM, key of another certificate).
    Unusable(String),
}

impl StateCheck {
    /// Why the state cannot be used, for the error shown at start.
    pub fn why(&self) -> String {
        match self {
            StateCheck::Valid(_) => "it holds a valid certificate".into(),
            StateCheck::Missing => "nothing is enrolled yet".into(),
            StateCheck::Expired { not_after } => {
                format!("its certificate expired at {not_after} (Unix time)")
            }
            StateCheck::WrongIdentity { found } => {
                format!("its certificate is for {found}, not the configured identity")
            }
            StateCheck::Unusable(e) => format!("its files are unusable: {e}"),
        }
    }
}

/// Reads and checks the state directory against the configured identity at `now`.
pub fn check_state(dir: &Path, expected: &Identity, now: i64) -> StateCheck {
    let read = |name: &str| std::fs::read_to_string(dir.join(name));
    let (Ok(chain_pem), Ok(key_pem), Ok(bundle_pem)) = (read(CERT), read(KEY), read(BUNDLE)) else {
        return StateCheck::Missing;
    };
    let m = match Material::from_pem(
        chain_pem.as_bytes(),
        key_pem.as_bytes(),
        bundle_pem.as_bytes(),
        &dir.display().to_string(),
    ) {
        Ok(m) => m,
        Err(e) => return StateCheck::Unusable(e.to_string()),
    };
    let (summary, identity) = match check_chain(&m.chain) {
        Ok(x) => x,
        Err(e) => return StateCheck::Unusable(e.to_string()),
    };
    if identity != *expected {
        return StateCheck::WrongIdentity {
            found: identity.to_string(),
        };
    }
    if summary.not_after <= now {
        return StateCheck::Expired {
            not_after: summary.not_after,
        };
    }
    if let Err(e) = crate::identity::certified_key(&m.chain, &m.key) {
        return StateCheck::Unusable(e.to_string());
    }
    StateCheck::Valid(Box::new(Stored {
        chain_pem,
        key_pem,
        bundle_pem,
        summary,
    }))
}

/// Creates the directory (mode 0700) if it does not exist.
pub fn ensure_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Writes a new key and chain: both temporary files first, then the key
/// and the chain renamed into place.
pub fn save_cert(dir: &Path, key_pem: &str, chain_pem: &str) -> std::io::Result<()> {
    let key = write_temp(dir, KEY, key_pem, true)?;
    let cert = write_temp(dir, CERT, chain_pem, false)?;
    std::fs::rename(key, dir.join(KEY))?;
    std::fs::rename(cert, dir.join(CERT))
}

/// Writes the trust bundle.
pub fn save_bundle(dir: &Path, pem: &str) -> std::io::Result<()> {
    let tmp = write_temp(dir, BUNDLE, pem, false)?;
    std::fs::rename(tmp, dir.join(BUNDLE))
}

/// The roots saved in `bundle.pem` (the current ones, followed through
/// rotations); none when the file is absent or unreadable.
pub fn saved_roots(dir: &Path) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    std::fs::read(dir.join(BUNDLE))
        .ok()
        .and_then(|pem| crank_certs::pem::certs_from_pem(&pem).ok())
        .unwrap_or_default()
}

/// The digest of the join token the last enrollment used, if recorded.
pub fn token_used(dir: &Path) -> Option<String> {
    let s = std::fs::read_to_string(dir.join(TOKEN_USED)).ok()?;
    let s = s.trim();
    (!s.is_empty()).then(|| s.to_string())
}

/// Records the digest of the join token an enrollment just used.
pub fn save_token_used(dir: &Path, digest: &str) -> std::io::Result<()> {
    let tmp = write_temp(dir, TOKEN_USED, &format!("{digest}\n"), false)?;
    std::fs::rename(tmp, dir.join(TOKEN_USED))
}

/// This instance's id: read from `instance`, or made once and kept there.
pub fn instance_id(dir: &Path) -> std::io::Result<String> {
    if let Ok(s) = std::fs::read_to_string(dir.join(INSTANCE)) {
        let s = s.trim();
        if !s.is_empty() {
            return Ok(s.to_string());
        }
    }
    let id = crank_certs::random_hex(8);
    let tmp = write_temp(dir, INSTANCE, &format!("{id}\n"), false)?;
    std::fs::rename(tmp, dir.join(INSTANCE))?;
    Ok(id)
}

fn write_temp(dir: &Path, name: &str, contents: &str, secret: bool) -> std::io::Result<PathBuf> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    if secret {
        opts.mode(0o600);
    }
    let mut f = opts.open(&tmp)?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()?;
    Ok(tmp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crank_certs::{Ca, LeafRequest};
    use std::time::Duration;

    fn now() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    fn id(svc: &str) -> Identity {
        Identity::new(svc, "acme", "crank.local").unwrap()
    }

    fn enrolled(dir: &Path, ca: &Ca, who: &Identity) {
        let leaf = ca
            .issue(&LeafRequest::new(who.clone(), Duration::from_secs(3600)))
            .unwrap();
        save_cert(dir, &leaf.key_pem, &leaf.cert_pem).unwrap();
        save_bundle(dir, ca.cert_pem()).unwrap();
    }

    #[test]
    fn valid_state_loads_and_the_key_is_private() {
        let d = tempfile::tempdir().unwrap();
        let root = Ca::generate("crank.local", Duration::from_secs(86_400)).unwrap();
        let int = root
            .generate_intermediate(Duration::from_secs(86_400))
            .unwrap();
        enrolled(d.path(), &int, &id("web"));
        match check_state(d.path(), &id("web"), now()) {
            StateCheck::Valid(s) => {
                assert_eq!(
                    crank_certs::pem::certs_from_pem(s.chain_pem.as_bytes())
                        .unwrap()
                        .len(),
                    2
                );
                assert!(s.summary.not_after > now());
            }
            other => panic!("{other:?}"),
        }
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(d.path().join(KEY))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!d.path().join(".key.pem.tmp").exists());
    }

    #[test]
    fn expired_wrong_identity_and_missing_are_told_apart() {
        let d = tempfile::tempdir().unwrap();
        let ca = Ca::generate("crank.local", Duration::from_secs(86_400)).unwrap();
        assert!(matches!(
            check_state(d.path(), &id("web"), now()),
            StateCheck::Missing
        ));
        enrolled(d.path(), &ca, &id("web"));
        match check_state(d.path(), &id("web"), now() + 7200) {
            StateCheck::Expired { not_after } => assert!(not_after < now() + 7200),
            other => panic!("{other:?}"),
        }
        match check_state(d.path(), &id("api"), now()) {
            StateCheck::WrongIdentity { found } => {
                assert_eq!(found, "spiffe://crank.local/tenant/acme/svc/web")
            }
            other => panic!("{other:?}"),
        }
        // a key of another certificate
        let other = ca
            .issue(&LeafRequest::new(id("web"), Duration::from_secs(60)))
            .unwrap();
        std::fs::write(d.path().join(KEY), other.key_pem).unwrap();
        assert!(matches!(
            check_state(d.path(), &id("web"), now()),
            StateCheck::Unusable(_)
        ));
        std::fs::remove_file(d.path().join(BUNDLE)).unwrap();
        assert!(matches!(
            check_state(d.path(), &id("web"), now()),
            StateCheck::Missing
        ));
    }

    #[test]
    fn token_digest_and_saved_roots_round_trip() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(token_used(d.path()), None);
        assert!(saved_roots(d.path()).is_empty());
        save_token_used(d.path(), "ab12").unwrap();
        assert_eq!(token_used(d.path()).as_deref(), Some("ab12"));
        let ca = Ca::generate("crank.local", Duration::from_secs(60)).unwrap();
        save_bundle(d.path(), ca.cert_pem()).unwrap();
        assert_eq!(saved_roots(d.path()).len(), 1);
        std::fs::write(d.path().join(BUNDLE), "garbage").unwrap();
        assert!(saved_roots(d.path()).is_empty());
    }

    #[test]
    fn instance_id_is_made_once() {
        let d = tempfile::tempdir().unwrap();
        let a = instance_id(d.path()).unwrap();
        assert_eq!(a.len(), 16);
        assert_eq!(instance_id(d.path()).unwrap(), a);
    }
}
