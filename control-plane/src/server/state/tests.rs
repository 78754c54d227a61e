//! Tests of the CA state machine: tokens, issuing, revocation, rotations.

use super::*;

const DAY: Duration = Duration::from_secs(86400);

fn fresh() -> (CaState, Ca) {
    let root = Ca::generate("crank.local", 10 * DAY).unwrap();
    let inter = root.generate_intermediate(5 * DAY).unwrap();
    (CaState::seed(&inter, root.cert_pem(), 100).unwrap(), root)
}

fn id(s: &str) -> Identity {
    Identity::new(s, "acme", "crank.local").unwrap()
}

/// Issues a leaf for `name` from the current signer and reports it.
fn enroll(st: &mut CaState, reports: &mut HashMap<String, Report>, name: &str, now: i64) {
    let (_, csr) = crank_certs::new_key_and_csr(&id(name)).unwrap();
    let signed = st.signer().unwrap().sign_csr(&csr, &id(name), DAY).unwrap();
    st.record_issue(Issued {
        serial: signed.serial.clone(),
        identity: id(name),
        instance: name.into(),
        not_before: signed.not_before,
        not_after: signed.not_after,
        requester: "test".into(),
        issuer: st.signer_subject().unwrap().into(),
        issuer_serial: st.signer_entry().unwrap().serial.clone(),
        issued_at: now,
    });
    reports.insert(
        name.into(),
        Report {
            identity: id(name),
            instance: name.into(),
            serial: signed.serial,
            bundle_version: st.bundle_version,
            last_seen: now,
            told_renew: None,
        },
    );
}

#[test]
fn tokens_are_one_time_and_expire() {
    let (mut st, _) = fresh();
    let now = crank_now();
    let (t, _) = st.create_token(id("web"), Duration::from_secs(60), now);
    let (i, granted) = st.check_token(&t, now).unwrap();
    assert_eq!(granted, id("web"));
    st.use_token(i, now);
    assert_eq!(st.check_token(&t, now).unwrap_err().code, "token-reused");
    let (t2, _) = st.create_token(id("web"), Duration::from_secs(60), now);
    assert_eq!(
        st.check_token(&t2, now + 61).unwrap_err().code,
        "token-expired"
    );
    assert_eq!(
        st.check_token("crank-jt-nope", now).unwrap_err().code,
        "token-unknown"
    );
    assert!(
        !serde_json::to_string(&st).unwrap().contains(&t2),
        "tokens are stored hashed"
    );
}

#[test]
fn intermediate_rotation_waits_for_every_active_workload() {
    let (mut st, root) = fresh();
    let now = crank_now();
    let mut reports = HashMap::new();
    enroll(&mut st, &mut reports, "a", now);
    enroll(&mut st, &mut reports, "b", now);
    let stale = Duration::from_secs(600);
    let new = root.generate_intermediate(5 * DAY).unwrap();
    st.rotate_intermediate(&new, now).unwrap();
    assert_eq!(st.rotation.phase, Phase::Reissuing);
    assert!(
        st.rotate_intermediate(&new, now).is_err(),
        "one rotation at a time"
    );
    assert!(st.should_renew(&reports["a"].serial));
    assert_eq!(st.lagging(&reports, stale, now).len(), 2);
    assert_eq!(st.advance(&reports, stale, now), None);
    enroll(&mut st, &mut reports, "a", now + 1);
    assert_eq!(st.advance(&reports, stale, now + 1), None);
    // b goes quiet: once stale it no longer holds the rotation back.
    assert!(st.advance(&reports, stale, now + 700).is_some());
    assert_eq!(st.rotation.phase, Phase::Idle);
    let states: Vec<_> = st
        .intermediates
        .iter()
        .map(|i| (i.state, i.key_pem.is_some()))
        .collect();
    assert_eq!(
        states,
        vec![
            (IntermediateState::Retired, false),
            (IntermediateState::Signing, true)
        ]
    );
    assert_eq!(
        st.bundle_version, 1,
        "an intermediate rotation leaves the bundle alone"
    );
}

#[test]
fn root_rotation_walks_every_phase() {
    let (mut st, _) = fresh();
    let now = crank_now();
    let mut reports = HashMap::new();
    enroll(&mut st, &mut reports, "a", now);
    let stale = Duration::from_secs(600);
    let root2 = Ca::generate("crank.local", 10 * DAY).unwrap();
    let inter2 = root2.generate_intermediate(5 * DAY).unwrap();
    let old_signer = st.signer_subject().unwrap().to_string();
    st.rotate_root(root2.cert_pem(), &inter2, now).unwrap();
    assert_eq!(st.rotation.phase, Phase::AddingRoot);
    assert_eq!(st.roots.len(), 2);
    assert_eq!(st.bundle_version, 2);
    assert_eq!(
        st.signer_subject().unwrap(),
        old_signer,
        "the new intermediate waits"
    );
    assert!(!st.should_renew(&reports["a"].serial));
    assert_eq!(st.advance(&reports, stale, now), None, "a has bundle v1");
    reports.get_mut("a").unwrap().bundle_version = 2;
    st.advance(&reports, stale, now).unwrap();
    assert_eq!(st.rotation.phase, Phase::Reissuing);
    assert_ne!(st.signer_subject().unwrap(), old_signer);
    assert!(st.should_renew(&reports["a"].serial));
    enroll(&mut st, &mut reports, "a", now + 1);
    st.advance(&reports, stale, now + 1).unwrap();
    assert_eq!(st.rotation.phase, Phase::RemovingRoot);
    assert_eq!(st.roots.len(), 1);
    assert_eq!(
        st.roots[0].subject,
        summary_of(root2.cert_pem()).unwrap().subject
    );
    assert_eq!(
        st.advance(&reports, stale, now + 1),
        None,
        "a has bundle v2, needs v3"
    );
    reports.get_mut("a").unwrap().bundle_version = 3;
    st.advance(&reports, stale, now + 2).unwrap();
    assert_eq!(st.rotation.phase, Phase::Idle);
    assert_eq!(st.rotation.history.len(), 1);
}

#[test]
fn rotation_refuses_an_intermediate_from_another_root() {
    let (mut st, _) = fresh();
    let other = Ca::generate("crank.local", DAY).unwrap();
    let inter = other.generate_intermediate(DAY).unwrap();
    let e = st.rotate_intermediate(&inter, crank_now()).unwrap_err();
    assert!(e.0.contains("does not chain"), "{e}");
    assert_eq!(st.rotation.phase, Phase::Idle);
}

#[test]
fn revoke_by_serial_and_identity() {
    let (mut st, _) = fresh();
    let now = crank_now();
    let mut reports = HashMap::new();
    enroll(&mut st, &mut reports, "a", now);
    enroll(&mut st, &mut reports, "b", now);
    enroll(&mut st, &mut reports, "b", now);
    let v0 = st.revocations_version;
    let a = reports["a"].serial.clone();
    assert_eq!(st.revoke(&a, now).unwrap(), vec![a.clone()]);
    assert!(st.is_revoked(&a));
    assert_eq!(st.revocations_version, v0 + 1);
    assert_eq!(st.revoke("b.acme.crank.local", now).unwrap().len(), 2);
    assert!(st.revoke("zz-not-hex", now).is_err());
    assert!(st
        .revoke("abcdef", now)
        .unwrap_err()
        .0
        .contains("no unexpired"));
    // Expired entries leave the deny list.
    assert!(st.prune(now + 2 * 86400));
    assert!(st.revoked.is_empty());
}

fn crank_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}
