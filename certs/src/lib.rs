//! crank-certs: workload identities and the certificates that carry them.
//!
//! A workload identity is written two ways in every leaf certificate:
//! a DNS SAN `<service>.<tenant>.<trust-domain>` and a SPIFFE URI SAN
//! `spiffe://<trust-domain>/tenant/<tenant>/svc/<service>`. This crate makes
//! the dev CA and leaves ([`ca`]), and reads identities back from DER
//! ([`parse`]). Enrollment and rotation build on it in the control plane.

pub mod ca;
pub mod identity;
pub mod parse;
pub mod pem;

pub use ca::{
    new_key_and_csr, random_hex, Ca, CsrError, IssuedLeaf, LeafRequest, SignCsrError, SignedLeaf,
};
pub use identity::{Identity, IdentityError, DEFAULT_TRUST_DOMAIN};
pub use parse::{identity_from_der, CertSummary, ParseError};
