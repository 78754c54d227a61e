# Tenant isolation: a tenant's workloads reach only
#
#   - services of the same tenant (always), and
#   - services of other tenants through a *shared capability*: one listed in
#     data.shared_capabilities (data.yaml), e.g. "transcode:v1".
#
# A request without a verified mesh identity (input.source == null) is
# denied outright: isolation cannot be decided for an unknown caller.
#
# Data:
#   shared_capabilities: ["transcode:v1", ...]   # absent or empty: none
#
# Notes for platform engineers:
#   - Tenants are compared by name (a verified identity always has a
#     non-empty tenant). If you federate several trust domains and the same
#     tenant name may mean different owners in each, also compare
#     input.source.trust_domain with input.destination.trust_domain.
#   - destination.capability is the capability the caller's sidecar asked
#     for (its route's `capability`, sent in x-crank-capability) or, when it
#     names none, the one this sidecar's inbound config says the app serves.
#     Only list a capability as shared if every service that may be called
#     under that name is meant to be reachable from every tenant; pair it
#     with capability_allowlist.rego or a role check (see transcode.rego) to
#     narrow who may call it.
package crank.authz

# One rule for both cases, because every `deny contains` definition costs
# evaluation time on each request, whether it matches or not. The same-tenant
# test comes first: it is the common case and is decided by one comparison.
# For an unauthenticated caller input.source.tenant is undefined, so the
# comparison is not true and the rule goes on to deny it.
deny contains msg if {
	not input.source.tenant == input.destination.tenant
	not tenant_isolation_shared
	msg := tenant_isolation_reason
}

# A verified caller asking for a shared capability. Evaluated only for
# cross-tenant (or unauthenticated) requests.
tenant_isolation_shared if {
	is_object(input.source)
	input.destination.capability in data.shared_capabilities
}

# The reason, computed only once a request is denied. `not is_object(...)`
# is true for a null and for a missing source alike: a malformed input fails
# closed.
tenant_isolation_reason := sprintf(
	"unauthenticated caller may not call %s: the mesh requires a verified workload identity (mTLS client certificate)",
	[callee_name],
) if {
	not is_object(input.source)
} else := sprintf(
	"tenant %q may not call %s: capability %q is not shared across tenants",
	[object.get(input, ["source", "tenant"], "?"), callee_name, input.destination.capability],
) if {
	is_string(input.destination.capability)
} else := sprintf(
	"tenant %q may not call %s: a call to another tenant must name a shared capability",
	[object.get(input, ["source", "tenant"], "?"), callee_name],
)
