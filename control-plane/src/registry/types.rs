//! The registry's data: lease ids, entries as `crankctl endpoints` shows
//! them, snapshots and errors.

use std::fmt;
use std::time::{Duration, SystemTime};

use crank_api::mesh::EndpointRegistration;
use serde::{Deserialize, Serialize};

/// An opaque lease handle returned by [`Registry::register`](super::Registry::register):
/// 32 random hex characters. The endpoint sends it back with heartbeats.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct LeaseId(String);

impl LeaseId {
    /// A fresh random lease id (128 bits).
    pub fn random() -> Self {
        Self(crank_certs::random_hex(16))
    }

    /// Wraps a lease id received from a client. Unknown ids simply fail
    /// with [`RegistryError::UnknownLease`].
    pub fn new(id: impl Into<String>) -> Self {
        Self(id.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A live (or just expired) endpoint as the registry holds it.
///
/// The time fields are for display: JSON carries them as unix seconds
/// (`registered_at_unix`, `last_heartbeat_unix`) and milliseconds
/// (`expires_in_ms`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub lease: LeaseId,
    pub registration: EndpointRegistration,
    /// When this registration (the latest one for the address) was made.
    #[serde(rename = "registered_at_unix", with = "unix_secs")]
    pub registered_at: SystemTime,
    /// The latest renewal, or the registration when there was none.
    #[serde(rename = "last_heartbeat_unix", with = "unix_secs")]
    pub last_heartbeat: SystemTime,
    /// Time left on the lease; zero for an expired entry.
    #[serde(rename = "expires_in_ms", with = "millis")]
    pub expires_in: Duration,
}

/// The registry at one moment: its live entries, sorted by address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    /// Goes up on every change of registrations (see the module docs).
    pub version: u64,
    pub entries: Vec<Entry>,
}

/// Why a registry operation failed. Each message says what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// The registration or lease is invalid: `field` names it (as
    /// `capabilities[1]`, `labels.gpu`, `lease`).
    #[error("invalid registration: {field}: {problem}; {fix}")]
    Invalid {
        field: String,
        problem: String,
        fix: String,
    },
    /// The lease is unknown, expired or deregistered.
    #[error("lease {0} is unknown or has expired; register the endpoint again")]
    UnknownLease(LeaseId),
    /// The store behind the registry did not answer (`store: etcd`).
    #[error("the registry's store is unavailable ({0}); retry, another replica may answer")]
    Unavailable(String),
}

impl RegistryError {
    pub(crate) fn invalid(
        field: impl Into<String>,
        problem: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Self::Invalid {
            field: field.into(),
            problem: problem.into(),
            fix: fix.into(),
        }
    }
}

/// `SystemTime` as whole unix seconds.
mod unix_secs {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        s.serialize_u64(secs)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        Ok(UNIX_EPOCH + Duration::from_secs(u64::deserialize(d)?))
    }
}

/// `Duration` as whole milliseconds.
mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::UNIX_EPOCH;

    use super::*;

    #[test]
    fn lease_ids_are_random_hex() {
        let (a, b) = (LeaseId::random(), LeaseId::random());
        assert_ne!(a, b);
        assert_eq!(a.as_str().len(), 32);
        assert!(a.as_str().chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(LeaseId::new(a.to_string()), a);
    }

    #[test]
    fn entry_json_shows_unix_seconds_and_millis() {
        let entry = Entry {
            lease: LeaseId::new("ab12"),
            registration: EndpointRegistration {
                address: "10.0.0.1:8443".parse().unwrap(),
                identity: "transcode.acme.crank.local".into(),
                capabilities: vec!["transcode:v1".into()],
                labels: BTreeMap::from([("gpu".into(), "nvidia".into())]),
            },
            registered_at: UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            last_heartbeat: UNIX_EPOCH + Duration::from_secs(1_700_000_010),
            expires_in: Duration::from_millis(29_500),
        };
        let json = serde_json::to_value(&entry).unwrap();
        assert_eq!(json["lease"], "ab12");
        assert_eq!(json["registered_at_unix"], 1_700_000_000u64);
        assert_eq!(json["last_heartbeat_unix"], 1_700_000_010u64);
        assert_eq!(json["expires_in_ms"], 29_500u64);
        assert_eq!(json["registration"]["labels"]["gpu"], "nvidia");
        let back: Entry = serde_json::from_value(json).unwrap();
        assert_eq!(back, entry);
    }

    #[test]
    fn errors_say_what_to_do() {
        let e = RegistryError::UnknownLease(LeaseId::new("ff"));
        assert_eq!(
            e.to_string(),
            "lease ff is unknown or has expired; register the endpoint again"
        );
        let e = RegistryError::invalid("lease", "0s is too short", "use 1s to 5m");
        assert_eq!(
            e.to_string(),
            "invalid registration: lease: 0s is too short; use 1s to 5m"
        );
    }
}
