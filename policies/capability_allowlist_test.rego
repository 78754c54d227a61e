# Tests for capability_allowlist.rego. The allow-list is set per test with
# `with data.capability_callers as ...`.
package crank.capability_allowlist_test

import data.crank.authz

callers := {
	"billing.charge:v1": [
		"checkout.acme",
		"spiffe://crank.local/tenant/acme/svc/renewals",
	],
	"locked:v1": [],
}

workload(service, tenant) := {
	"spiffe_id": sprintf("spiffe://crank.local/tenant/%s/svc/%s", [tenant, service]),
	"service": service,
	"tenant": tenant,
	"trust_domain": "crank.local",
	"address": "10.0.0.9:40000",
}

# A same-tenant call (so tenant isolation does not interfere) to capability `cap`.
call(source, cap) := {
	"source": source,
	"destination": {
		"spiffe_id": "spiffe://crank.local/tenant/acme/svc/billing",
		"service": "billing",
		"tenant": "acme",
		"trust_domain": "crank.local",
		"capability": cap,
		"route": null,
		"direction": "inbound",
	},
	"request": {"method": "POST", "path": "/v1/charges", "body_size": 300},
}

test_caller_listed_by_service_tenant_allowed if {
	authz.allow with input as call(workload("checkout", "acme"), "billing.charge:v1") with data.capability_callers as callers
}

test_caller_listed_by_spiffe_id_allowed if {
	authz.allow with input as call(workload("renewals", "acme"), "billing.charge:v1") with data.capability_callers as callers
}

test_unlisted_caller_denied if {
	authz.deny == {`web.acme may not call capability "billing.charge:v1": the caller is not on that capability's allow-list`} with input as call(workload("web", "acme"), "billing.charge:v1")
		with data.capability_callers as callers
}

# A SPIFFE id entry pins the trust domain; "service.tenant" would not.
test_spiffe_entry_pins_trust_domain if {
	src := object.union(workload("renewals", "acme"), {
		"spiffe_id": "spiffe://partner.example/tenant/acme/svc/renewals",
		"trust_domain": "partner.example",
	})
	`renewals.acme may not call capability "billing.charge:v1": the caller is not on that capability's allow-list` in authz.deny with input as call(src, "billing.charge:v1")
		with data.capability_callers as callers
}

test_unlisted_capability_not_restricted if {
	authz.allow with input as call(workload("web", "acme"), "invoices:v1") with data.capability_callers as callers
}

test_no_capability_not_restricted if {
	authz.allow with input as call(workload("web", "acme"), null) with data.capability_callers as callers
}

test_no_allow_list_data_restricts_nothing if {
	authz.allow with input as call(workload("web", "acme"), "billing.charge:v1") with data.capability_callers as {}
}

test_empty_list_closes_capability if {
	`checkout.acme may not call capability "locked:v1": the caller is not on that capability's allow-list` in authz.deny with input as call(workload("checkout", "acme"), "locked:v1")
		with data.capability_callers as callers
}

test_unauthenticated_caller_never_listed if {
	`unauthenticated caller may not call capability "billing.charge:v1": the caller is not on that capability's allow-list` in authz.deny with input as call(null, "billing.charge:v1")
		with data.capability_callers as callers
}

# The reason must not reveal who is on the list.
test_reason_does_not_list_callers if {
	some msg in authz.deny with input as call(workload("web", "acme"), "billing.charge:v1") with data.capability_callers as callers
	not contains(msg, "checkout")
	not contains(msg, "renewals")
}
