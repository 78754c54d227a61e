//! Sealing intermediate private keys before they go into the store: AES-256-GCM
//! under a key-encryption key (KEK) that every replica loads from a file.
//! The associated data names the generation (trust domain and the
//! intermediate's serial), so a sealed key moved to another generation's
//! entry does not open. Someone who reads the store (a snapshot, a member's
//! disk) learns certificates but cannot sign without the KEK.
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
    #[error("sealing failed: {0}")]
    Seal(String),
}

/// The key-encryption key: 32 random bytes.
pub struct Kek {
    key: LessSafeKey,
}

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
        Ok(Kek {
            key: LessSafeKey::new(key),
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
