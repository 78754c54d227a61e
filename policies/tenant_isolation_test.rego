# Tests for tenant_isolation.rego. Data is set per test with `with`, so they
# hold whatever data.yaml says.
package crank.tenant_isolation_test

import data.crank.authz

web_acme := {
	"spiffe_id": "spiffe://crank.local/tenant/acme/svc/web",
	"service": "web",
	"tenant": "acme",
	"trust_domain": "crank.local",
	"address": "10.0.0.7:41000",
}

# A request from `source` to service `service` of tenant `tenant`.
call(source, service, tenant, capability) := {
	"source": source,
	"destination": {
		"spiffe_id": sprintf("spiffe://crank.local/tenant/%s/svc/%s", [tenant, service]),
		"service": service,
		"tenant": tenant,
		"trust_domain": "crank.local",
		"capability": capability,
		"route": null,
		"direction": "inbound",
	},
	"request": {"method": "GET", "path": "/", "body_size": null},
}

shared := ["transcode:v1"]

test_same_tenant_allowed_without_capability if {
	authz.allow with input as call(web_acme, "api", "acme", null) with data.shared_capabilities as shared
}

test_same_tenant_allowed_with_unshared_capability if {
	authz.allow with input as call(web_acme, "ledger", "acme", "ledger:v1") with data.shared_capabilities as shared
}

test_same_tenant_allowed_with_no_shared_list if {
	authz.allow with input as call(web_acme, "api", "acme", null) with data.shared_capabilities as null
}

test_other_tenant_through_shared_capability_allowed if {
	req := call(web_acme, "transcoder", "media", "transcode:v1")
	count(authz.deny) == 0 with input as req with data.shared_capabilities as shared with data.roles as {"acme": ["media"]}
}

test_other_tenant_unshared_capability_denied if {
	authz.deny == {`tenant "acme" may not call ledger.bank: capability "ledger:v1" is not shared across tenants`} with input as call(web_acme, "ledger", "bank", "ledger:v1")
		with data.shared_capabilities as shared
}

test_other_tenant_without_capability_denied if {
	authz.deny == {`tenant "acme" may not call backend.demo: a call to another tenant must name a shared capability`} with input as call(web_acme, "backend", "demo", null)
		with data.shared_capabilities as shared
}

test_other_tenant_denied_when_nothing_is_shared if {
	req := call(web_acme, "transcoder", "media", "transcode:v1")
	`tenant "acme" may not call transcoder.media: capability "transcode:v1" is not shared across tenants` in authz.deny with input as req
		with data.shared_capabilities as []
	`tenant "acme" may not call transcoder.media: capability "transcode:v1" is not shared across tenants` in authz.deny with input as req
		with data.shared_capabilities as null
}

test_unauthenticated_denied if {
	authz.deny == {`unauthenticated caller may not call backend.demo: the mesh requires a verified workload identity (mTLS client certificate)`} with input as call(null, "backend", "demo", null)
	not authz.allow with input as call(null, "backend", "demo", null)
}

# Being unauthenticated is not fixed by naming a shared capability.
test_unauthenticated_denied_even_for_shared_capability if {
	req := call(null, "transcoder", "media", "transcode:v1")
	`unauthenticated caller may not call transcoder.media: the mesh requires a verified workload identity (mTLS client certificate)` in authz.deny with input as req
		with data.shared_capabilities as shared
}

test_missing_source_denied_like_null if {
	req := object.remove(call(web_acme, "backend", "demo", null), ["source"])
	`unauthenticated caller may not call backend.demo: the mesh requires a verified workload identity (mTLS client certificate)` in authz.deny with input as req
}

test_same_tenant_name_in_other_trust_domain_allowed if {
	# Documented behaviour: tenants are compared by name (see the file's notes).
	src := object.union(web_acme, {"trust_domain": "partner.example"})
	authz.allow with input as call(src, "api", "acme", null)
}
