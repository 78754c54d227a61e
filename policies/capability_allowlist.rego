# Capability allow-list: some capabilities may be called only by named
# callers.
#
# Data:
#   capability_callers:
#     "billing.charge:v1":                                  # the capability
#       - checkout.acme                                     # "service.tenant"
#       - spiffe://crank.local/tenant/acme/svc/renewals     # or a SPIFFE id
#
# - A capability that is not a key of capability_callers (or is mapped to
#   null: a key with nothing after the colon) is not restricted by this file;
#   tenant isolation and the other files still apply.
# - A capability mapped to an empty list is closed to every caller.
# - "service.tenant" entries match that service in any trust domain; use the
#   SPIFFE id form to pin the trust domain too.
# - An unauthenticated caller never matches.
#
# The deny reason names the caller and the capability but not the list: who
# else may call a capability is not the caller's business.
#
# Cost: one map lookup and at most two membership tests in a short list.
package crank.authz

# The first line lets most requests (no capability) through at the cost of
# one comparison. `callers != null` stops capabilities that are not in the
# map: on regorus's VM an assignment from a missing key does not end the
# rule by itself (see authz.rego, "SAME RESULT ON BOTH ENGINES").
deny contains msg if {
	input.destination.capability != null
	cap := input.destination.capability
	callers := data.capability_callers[cap]
	callers != null
	not capability_allowlist_listed(callers)
	msg := sprintf(
		"%s may not call capability %q: the caller is not on that capability's allow-list",
		[caller_name, cap],
	)
}

# The caller is listed by SPIFFE id ...
capability_allowlist_listed(callers) if input.source.spiffe_id in callers

# ... or by "service.tenant".
capability_allowlist_listed(callers) if {
	sprintf("%s.%s", [input.source.service, input.source.tenant]) in callers
}
