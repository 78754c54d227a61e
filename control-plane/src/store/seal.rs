//! Sealing intermediate private keys before they go into the store: AES-256-GCM
//! under a key-encryption key (KEK) that every replica loads from a file.
//! The associated data names the generation (trust domain and the
//! intermediate's serial), so a sealed key moved to another generation's
//! entry does not open. Someone who reads the store (a snapshot, a member's
//! disk) learns certificates but cannot sign without the KEK.
//!
//! The KEK also authenticates the store's documents that decide who gets
//! an identity (`ca/state`, `ca/inventory/*`, `mesh/version`): an
//! HMAC-SHA256 tag under a key derived from the KEK, over the key name and
//! the document, so a writer to etcd without the KEK can neither forge nor
//! move a document ([`Kek::authenticate`], [`Kek::verify`]).
//!
//! AES-256-GCM comes from `ring` (already the workspace's crypto provider)
//! rather than a second AES implementation.

use std::path::Path;

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

/// Why a KEK could not be loaded or a sealed key could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("kek_file {path}: {message}")]
    Kek { path: String, message: String },
    #[error("a sealed intermediate key does not open with this KEK for {generation} (a different kek_file on this replica, or the entry was tampered with); give every replica the same kek_file")]
    Open { generation: String },
    #[error("the store's {key} fails its integrity check (written without this KEK: a different kek_file, or tampered with); it is ignored and the last good copy kept; restore it from an etcd snapshot or give every replica the same kek_file")]
    Tampered { key: String },
    #[error("sealing failed: {0}")]
    Seal(String),
}

/// The key-encryption key: 32 random bytes.
pub struct Kek {
    key: LessSafeKey,
    /// HMAC-SHA256 key derived from the KEK for document integrity.
    mac: ring::hmac::Key,
}

/// A document as the store holds it when authenticated: its JSON text and
/// the hex HMAC over the store key and that text.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Authenticated {
    doc: String,
    mac: String,
}

/// Separates derived keys by purpose.
const MAC_LABEL: &[u8] = b"crank-control store document mac v1";

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Kek(..)")
    }
}

impl Kek {
    /// Loads the KEK: exactly 32 bytes, in a file only its owner can read
    /// (mode 0600 or 0400). Make one with `head -c 32 /dev/urandom > kek && chmod 600 kek`.
    pub fn load(path: &Path) -> Result<Kek, SealError> {
        use std::os::unix::fs::PermissionsExt;
        let err = |message: String| SealError::Kek {
            path: path.display().to_string(),
            message,
        };
        let meta = std::fs::metadata(path).map_err(|e| {
            err(format!(
                "cannot read it ({e}); make one with `head -c 32 /dev/urandom > {0} && chmod 600 {0}` and copy it to every replica",
                path.display()
            ))
        })?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(err(format!(
                "mode {mode:04o} lets others read the key that unlocks the CA; `chmod 600 {}`",
                path.display()
            )));
        }
        let bytes = std::fs::read(path).map_err(|e| err(format!("cannot read it ({e})")))?;
        Kek::from_bytes(&bytes).map_err(err)
    }

    /// A KEK from its 32 bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Kek, String> {
        if bytes.len() != 32 {
            return Err(format!(
                "holds {} bytes; a KEK is exactly 32 random bytes (`head -c 32 /dev/urandom`)",
                bytes.len()
            ));
        }
        let key = UnboundKey::new(&AES_256_GCM, bytes).map_err(|_| "not an AES-256 key")?;
        // HKDF-style derivation: HMAC(KEK, label) is the MAC key, so the
        // AES key and the MAC key are never the same bytes.
        let derived = ring::hmac::sign(
            &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, bytes),
            MAC_LABEL,
        );
        Ok(Kek {
            key: LessSafeKey::new(key),
            mac: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, derived.as_ref()),
        })
    }

    /// Seals `plain` for `generation`: hex of a random nonce, then the ciphertext and tag.
    pub fn seal(&self, plain: &[u8], generation: &str) -> Result<String, SealError> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| SealError::Seal("no randomness for a nonce".into()))?;
        let mut data = plain.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(generation.as_bytes()),
                &mut data,
            )
            .map_err(|_| SealError::Seal("AES-256-GCM refused".into()))?;
        Ok(hex(&nonce) + &hex(&data))
    }

    /// Opens what [`Kek::seal`] made for the same `generation`.
    pub fn open(&self, sealed: &str, generation: &str) -> Result<Vec<u8>, SealError> {
        let refused = || SealError::Open {
            generation: generation.to_string(),
        };
        let bytes = unhex(sealed).ok_or_else(refused)?;
        if bytes.len() < NONCE_LEN {
            return Err(refused());
        }
        let (nonce, data) = bytes.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| refused())?;
        let mut data = data.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(generation.as_bytes()), &mut data)
            .map_err(|_| refused())?;
        Ok(plain.to_vec())
    }
}

impl Kek {
    /// What the store holds at `key` for the JSON document `doc`: the
    /// document with its tag, bound to `key`.
    pub fn authenticate(&self, key: &str, doc: &[u8]) -> Result<Vec<u8>, SealError> {
        let text = std::str::from_utf8(doc).map_err(|e| SealError::Seal(e.to_string()))?;
        let a = Authenticated {
            doc: text.to_string(),
            mac: hex(ring::hmac::sign(&self.mac, &mac_input(key, doc)).as_ref()),
        };
        serde_json::to_vec(&a).map_err(|e| SealError::Seal(e.to_string()))
    }

    /// The document [`Kek::authenticate`] stored at `key`, once its tag
    /// checks (constant time); [`SealError::Tampered`] otherwise.
    pub fn verify(&self, key: &str, stored: &[u8]) -> Result<Vec<u8>, SealError> {
        let tampered = || SealError::Tampered {
            key: key.to_string(),
        };
        let a: Authenticated = serde_json::from_slice(stored).map_err(|_| tampered())?;
        let tag = unhex(&a.mac).ok_or_else(tampered)?;
        ring::hmac::verify(&self.mac, &mac_input(key, a.doc.as_bytes()), &tag)
            .map_err(|_| tampered())?;
        Ok(a.doc.into_bytes())
    }
}

/// The MAC covers the key name (length-prefixed) and the document.
fn mac_input(key: &str, doc: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(8 + key.len() + doc.len());
    m.extend_from_slice(&(key.len() as u64).to_be_bytes());
    m.extend_from_slice(key.as_bytes());
    m.extend_from_slice(doc);
    m
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_key_opens_only_with_its_kek_and_its_generation() {
        let kek = Kek::from_bytes(&[7; 32]).unwrap();
        let sealed = kek.seal(b"-----BEGIN PRIVATE KEY-----", "td/ab01").unwrap();
        assert!(!sealed.contains("PRIVATE"), "sealed text is not the key");
        assert_eq!(
            kek.open(&sealed, "td/ab01").unwrap(),
            b"-----BEGIN PRIVATE KEY-----"
        );
        let other = Kek::from_bytes(&[8; 32]).unwrap();
        let wrong_kek = other.open(&sealed, "td/ab01").unwrap_err().to_string();
        assert!(wrong_kek.contains("same kek_file"), "{wrong_kek}");
        assert!(
            kek.open(&sealed, "td/cd02").is_err(),
            "a key swapped to another generation must not open"
        );
        assert!(kek.open("zz", "td/ab01").is_err());
        assert!(kek.open(&sealed[..10], "td/ab01").is_err());
    }

    #[test]
    fn an_authenticated_document_is_refused_when_changed_moved_or_unsigned() {
        let kek = Kek::from_bytes(&[7; 32]).unwrap();
        let doc = br#"{"revoked":{"ab":1}}"#;
        let stored = kek.authenticate("ca/state", doc).unwrap();
        assert_eq!(kek.verify("ca/state", &stored).unwrap(), doc);
        // Changed: an etcd writer empties the deny list.
        let text = String::from_utf8(stored.clone()).unwrap();
        let changed = text.replace(r#"\"ab\":1"#, "");
        assert_ne!(changed, text);
        let e = kek.verify("ca/state", changed.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("integrity"), "{e}");
        // Moved to another key, signed by another KEK, or plain JSON.
        assert!(kek.verify("ca/inventory/ab", &stored).is_err());
        let other = Kek::from_bytes(&[8; 32]).unwrap();
        assert!(other.verify("ca/state", &stored).is_err());
        assert!(kek.verify("ca/state", doc).is_err());
    }

    #[test]
    fn the_kek_file_must_be_private_and_32_bytes() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kek");
        let missing = Kek::load(&path).unwrap_err().to_string();
        assert!(missing.contains("head -c 32 /dev/urandom"), "{missing}");
        std::fs::write(&path, [1u8; 32]).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let open = Kek::load(&path).unwrap_err().to_string();
        assert!(open.contains("chmod 600"), "{open}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(Kek::load(&path).is_ok());
        std::fs::write(&path, [1u8; 16]).unwrap();
        let short = Kek::load(&path).unwrap_err().to_string();
        assert!(short.contains("holds 16 bytes"), "{short}");
    }
}
