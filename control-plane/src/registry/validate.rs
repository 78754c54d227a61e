//! Validation of a registration and its lease duration, before the
//! registry accepts it. Each error names the field and the fix.

use std::time::Duration;

use crank_api::mesh::EndpointRegistration;

use super::RegistryError;

/// The shortest lease a registration may ask for.
pub const MIN_LEASE: Duration = Duration::from_secs(1);
/// The longest lease a registration may ask for.
pub const MAX_LEASE: Duration = Duration::from_secs(5 * 60);

/// Checks a registration: a non-zero port, a non-empty identity, at least
/// one capability, capabilities non-empty and without whitespace, label
/// keys and values non-empty, and a lease of 1 s to 5 min.
pub fn validate(reg: &EndpointRegistration, lease: Duration) -> Result<(), RegistryError> {
    if !(MIN_LEASE..=MAX_LEASE).contains(&lease) {
        return Err(RegistryError::invalid(
            "lease",
            format!("{lease:?} is out of range"),
            "ask for a lease of 1s to 5m and heartbeat about every third of it",
        ));
    }
    if reg.address.port() == 0 {
        return Err(RegistryError::invalid(
            "address",
            format!("{} has port 0", reg.address),
            "register the inbound address peers dial, with its port",
        ));
    }
    if reg.identity.trim().is_empty() {
        return Err(RegistryError::invalid(
            "identity",
            "is empty",
            "set the identity of the endpoint's certificate (<svc>.<tenant>.<trust domain>)",
        ));
    }
    validate_capabilities(&reg.capabilities)?;
    for (key, value) in &reg.labels {
        if key.is_empty() {
            return Err(RegistryError::invalid(
                "labels",
                "has an empty key",
                "give every label a name, or remove it",
            ));
        }
        if value.is_empty() {
            return Err(RegistryError::invalid(
                format!("labels.{key}"),
                "is empty",
                "give the label a value, or remove it",
            ));
        }
    }
    Ok(())
}

fn validate_capabilities(capabilities: &[String]) -> Result<(), RegistryError> {
    if capabilities.is_empty() {
        return Err(RegistryError::invalid(
            "capabilities",
            "is empty",
            "list at least one capability the endpoint serves (`transcode:v1`)",
        ));
    }
    for (i, capability) in capabilities.iter().enumerate() {
        if capability.is_empty() {
            return Err(RegistryError::invalid(
                format!("capabilities[{i}]"),
                "is empty",
                "remove it or name the capability (`transcode:v1`)",
            ));
        }
        if capability.chars().any(char::is_whitespace) {
            return Err(RegistryError::invalid(
                format!("capabilities[{i}]"),
                format!("{capability:?} contains whitespace"),
                "remove the whitespace (`transcode:v1`)",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn reg() -> EndpointRegistration {
        EndpointRegistration {
            address: "10.0.0.1:8443".parse().unwrap(),
            identity: "transcode.acme.crank.local".into(),
            capabilities: vec!["transcode:v1".into()],
            labels: BTreeMap::from([("gpu".into(), "nvidia".into())]),
        }
    }

    fn field_of(r: Result<(), RegistryError>) -> Option<String> {
        match r {
            Ok(()) => None,
            Err(RegistryError::Invalid { field, fix, .. }) => {
                assert!(!fix.is_empty(), "{field}: no fix");
                Some(field)
            }
            Err(e) => panic!("unexpected error {e}"),
        }
    }

    #[test]
    fn validation_table() {
        let s = Duration::from_secs;
        type Edit = fn(&mut EndpointRegistration);
        let cases: &[(&str, Edit, Duration, Option<&str>)] = &[
            ("valid", |_| {}, s(30), None),
            ("shortest lease", |_| {}, s(1), None),
            ("longest lease", |_| {}, s(300), None),
            (
                "lease too short",
                |_| {},
                Duration::from_millis(999),
                Some("lease"),
            ),
            ("lease zero", |_| {}, s(0), Some("lease")),
            ("lease too long", |_| {}, s(301), Some("lease")),
            ("port 0", |r| r.address.set_port(0), s(30), Some("address")),
            (
                "no identity",
                |r| r.identity.clear(),
                s(30),
                Some("identity"),
            ),
            (
                "no capabilities",
                |r| r.capabilities.clear(),
                s(30),
                Some("capabilities"),
            ),
            (
                "empty capability",
                |r| r.capabilities.push(String::new()),
                s(30),
                Some("capabilities[1]"),
            ),
            (
                "capability with space",
                |r| r.capabilities[0] = "transcode v1".into(),
                s(30),
                Some("capabilities[0]"),
            ),
            (
                "capability with tab",
                |r| r.capabilities[0] = "transcode:v1\t".into(),
                s(30),
                Some("capabilities[0]"),
            ),
            (
                "empty label key",
                |r| drop(r.labels.insert(String::new(), "x".into())),
                s(30),
                Some("labels"),
            ),
            (
                "empty label value",
                |r| drop(r.labels.insert("zone".into(), String::new())),
                s(30),
                Some("labels.zone"),
            ),
            ("no labels is fine", |r| r.labels.clear(), s(30), None),
        ];
        for (name, edit, lease, want) in cases {
            let mut r = reg();
            edit(&mut r);
            assert_eq!(field_of(validate(&r, *lease)).as_deref(), *want, "{name}");
        }
    }

    #[test]
    fn lease_error_names_the_range() {
        let err = validate(&reg(), Duration::from_secs(600)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid registration: lease: 600s is out of range; \
             ask for a lease of 1s to 5m and heartbeat about every third of it"
        );
    }
}
