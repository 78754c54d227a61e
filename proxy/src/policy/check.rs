//! The policy stage: evaluate the direction's policy set for one request
//! and turn a denial (or an evaluation error that fails closed) into a 403
//! refusal whose JSON body names the decision.

use crank_policy::{Manifest, Outcome, RequestFacts};

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
    let mut doc = crank_policy::input::build(&facts, set.manifest());
    extend(&mut doc);
    let d = policies.check_input(handle, &set, &facts, doc, trace_id, metrics);
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
