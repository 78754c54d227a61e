//! The policy stage: evaluate the direction's policy set for one request
//! and turn a denial (or an evaluation error that fails closed) into a 403
//! refusal whose JSON body names the decision.

use crank_policy::{Manifest, Outcome, RegoValue, RequestFacts};

use super::{Policies, PolicyHandle};
use crate::errors::{Reason, Refusal};
use crate::headers::DECISION_HEADER;
use crate::metrics::Metrics;

/// The decision, for the access log and the span.
pub struct Checked {
    pub decision_id: String,
    /// `allow`, `deny`, `audit-deny`, `error` or `error-allowed`.
    pub label: &'static str,
    /// Set when the request may not go on.
    pub refusal: Option<Refusal>,
}

/// Decides one request. `facts` builds the input for the revision that
/// decides (one revision for the whole check, even if a reload lands).
pub fn check(
    policies: &Policies,
    handle: &PolicyHandle,
    facts: impl FnOnce(&Manifest) -> RequestFacts,
    trace_id: Option<&str>,
    metrics: &Metrics,
) -> Checked {
    check_with(policies, handle, facts, |_| {}, trace_id, metrics)
}

/// [`check`], with `extend` adding to the input document built from the
/// facts (an egress request's `input.destination.egress`, host and port).
pub fn check_with(
    policies: &Policies,
    handle: &PolicyHandle,
    facts: impl FnOnce(&Manifest) -> RequestFacts,
    extend: impl FnOnce(&mut serde_json::Value),
    trace_id: Option<&str>,
    metrics: &Metrics,
) -> Checked {
    let set = handle.current();
    let facts = facts(set.manifest());
    let mut input = crank_policy::build_value_for(&facts, set.manifest(), set.reads());
    extend_input(&mut input, extend);
    let d = policies.check_value(handle, &set, &facts, input, trace_id, metrics);
    let label = match (d.outcome, d.permitted) {
        (Outcome::Allow, _) => "allow",
        (Outcome::Deny, false) => "deny",
        (Outcome::Deny, true) => "audit-deny",
        (Outcome::Error, false) => "error",
        (Outcome::Error, true) => "error-allowed",
    };
    let refusal = (!d.permitted).then(|| {
        let reason = match d.outcome {
            Outcome::Error => Reason::PolicyError,
            _ => Reason::PolicyDenied,
        };
        let reasons: Vec<&str> = match d.outcome {
            // The error itself (a timeout, a conflict in a rule) is for the
            // decision log, not for the caller.
            Outcome::Error => vec!["policy evaluation failed"],
            _ => d.reasons.iter().map(String::as_str).collect(),
        };
        tracing::warn!(
            direction = handle.direction.as_str(),
            reason = reason.as_str(),
            decision_id = %facts.id,
            revision = %set.revision(),
            "refused request by policy"
        );
        Refusal::new(reason, "")
            .header(DECISION_HEADER, facts.id.as_str())
            .field("decision_id", facts.id.as_str())
            .field("revision", set.revision())
            .field("reasons", reasons)
            .field("trace_id", trace_id)
    });
    Checked {
        decision_id: facts.id,
        label,
        refusal,
    }
}

/// Runs `extend` on a document with an empty `destination` object and
/// merges what it added into the input's `destination` (the extensions,
/// such as [`super::facts::egress_input`], only add there). Nothing added,
/// nothing converted: the inbound path pays nothing for it.
fn extend_input(input: &mut RegoValue, extend: impl FnOnce(&mut serde_json::Value)) {
    let mut doc = serde_json::json!({ "destination": {} });
    extend(&mut doc);
    let Some(added) = doc
        .get_mut("destination")
        .and_then(|d| d.as_object_mut())
        .filter(|d| !d.is_empty())
    else {
        return;
    };
    let destination = RegoValue::from("destination");
    let Ok(obj) = input.as_object_mut() else {
        return;
    };
    let Some(Ok(dest)) = obj.get_mut(&destination).map(|d| d.as_object_mut()) else {
        return;
    };
    for (k, v) in std::mem::take(added) {
        dest.insert(RegoValue::from(k), RegoValue::from(v));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crank_policy::input::build;

    #[test]
    fn an_extension_lands_in_the_destination_as_in_the_json_document() {
        let facts = RequestFacts {
            direction: "outbound",
            source: None,
            source_address: None,
            destination: Default::default(),
            capability: None,
            route: Some("r".into()),
            method: "GET".into(),
            path_and_query: "/".into(),
            host: None,
            scheme: "http".into(),
            protocol: "HTTP/1.1".into(),
            headers: Vec::new(),
            body_size: None,
            time: std::time::SystemTime::now(),
            id: "d".into(),
        };
        let m = Manifest::default();
        let add = |doc: &mut serde_json::Value| {
            let d = doc["destination"].as_object_mut().unwrap();
            d.insert("egress".into(), true.into());
            d.insert("port".into(), 443.into());
        };
        let mut want = build(&facts, &m);
        add(&mut want);
        let mut got = crank_policy::build_value(&facts, &m);
        extend_input(&mut got, add);
        assert_eq!(got, RegoValue::from(want));
        // No extension: the value is left as built.
        let mut plain = crank_policy::build_value(&facts, &m);
        extend_input(&mut plain, |_| {});
        assert_eq!(plain, RegoValue::from(build(&facts, &m)));
    }
}
