# End-to-end tests of the whole set against the shipped data.yaml: what the
# proxy will decide. The per-file tests next to each policy test one rule in
# detail; these guard the composition and the shipped data (the quickstart
# must keep working).
#
# Run: crankctl policy test policies/    (add -v to list passing tests)
package crank.authz_test

import data.crank.authz

# The quickstart: frontend.demo -> backend.demo, GET /, no capability.
quickstart := {
	"source": {
		"spiffe_id": "spiffe://crank.local/tenant/demo/svc/frontend",
		"service": "frontend",
		"tenant": "demo",
		"trust_domain": "crank.local",
		"address": "127.0.0.1:41000",
	},
	"destination": {
		"spiffe_id": "spiffe://crank.local/tenant/demo/svc/backend",
		"service": "backend",
		"tenant": "demo",
		"trust_domain": "crank.local",
		"capability": null,
		"route": null,
		"direction": "inbound",
	},
	"request": {
		"method": "GET",
		"path": "/",
		"raw_path": "/",
		"parsed_path": [],
		"query": {},
		"host": "backend",
		"scheme": "https",
		"protocol": "HTTP/1.1",
		"headers": {},
		"body_size": null,
	},
	"time": {"unix_ns": 1700000000000000000, "rfc3339": "2023-11-14T22:13:20Z"},
}

# The issue's example: a tenant calls the media tenant's transcoder.
transcode_call(tenant) := object.union(quickstart, {
	"source": {
		"spiffe_id": sprintf("spiffe://crank.local/tenant/%s/svc/web", [tenant]),
		"service": "web",
		"tenant": tenant,
	},
	"destination": {
		"spiffe_id": "spiffe://crank.local/tenant/media/svc/transcoder",
		"service": "transcoder",
		"tenant": "media",
		"capability": "transcode:v1",
	},
	"request": {"method": "POST", "path": "/v1/jobs", "body_size": 1234},
})

# --- The quickstart traffic is allowed ----------------------------------------

test_quickstart_get_allowed if {
	authz.allow with input as quickstart
	count(authz.deny) == 0 with input as quickstart
}

test_quickstart_post_small_body_allowed if {
	authz.allow with input as object.union(quickstart, {"request": {"method": "POST", "body_size": 512}})
}

test_quickstart_http2_and_healthz_allowed if {
	authz.allow with input as object.union(quickstart, {"request": {"path": "/healthz", "protocol": "HTTP/2", "body_size": 0}})
}

# The same call checked on the frontend's sidecar (egress).
test_quickstart_outbound_allowed if {
	authz.allow with input as object.union(quickstart, {"destination": {"direction": "outbound", "route": "backend"}})
}

# --- The issue's example ------------------------------------------------------

test_media_tenant_may_transcode if {
	authz.allow with input as transcode_call("acme")
}

test_tenant_without_media_role_may_not_transcode if {
	authz.deny == {`tenant "evil" may not call transcode:v1: it needs role "media"`} with input as transcode_call("evil")
	not authz.allow with input as transcode_call("evil")
}

# Same as examples/transcode-denied.json, evaluated by
# `crankctl policy eval policies/ --input policies/examples/transcode-denied.json`.
test_example_file_input_denied if {
	example := object.union(transcode_call("evil"), {"source": {"service": "scraper"}})
	authz.deny == {`tenant "evil" may not call transcode:v1: it needs role "media"`} with input as example
}

# --- Composition --------------------------------------------------------------

# allow is false as soon as any file adds a reason, and every reason is kept.
test_every_reason_is_reported if {
	req := object.union(transcode_call("evil"), {"request": {"method": "TRACE", "body_size": 209715200}})
	authz.deny == {
		`tenant "evil" may not call transcode:v1: it needs role "media"`,
		`method "TRACE" is not allowed; allowed methods: GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS`,
		`request body of 209715200 bytes is over the limit of 104857600 bytes for capability "transcode:v1"`,
	} with input as req
	not authz.allow with input as req
}

# An empty or malformed input is denied, never allowed by accident.
test_empty_input_denied if {
	not authz.allow with input as {}
	`unauthenticated caller may not call ?.?: the mesh requires a verified workload identity (mTLS client certificate)` in authz.deny with input as {}
}

test_unauthenticated_quickstart_call_denied if {
	not authz.allow with input as object.union(quickstart, {"source": null})
}

# --- Helpers used in reasons --------------------------------------------------

test_caller_name if {
	authz.caller_name == "frontend.demo" with input as quickstart
	authz.caller_name == "unauthenticated caller" with input as object.union(quickstart, {"source": null})
}

test_callee_name if {
	authz.callee_name == "backend.demo" with input as quickstart
	authz.callee_name == "transcoder.media" with input as transcode_call("acme")
}

# --- The shipped data is well-formed ------------------------------------------

test_shipped_data_keeps_quickstart_tenant_out_of_transcode if {
	not "media" in data.roles.demo
}

test_shipped_data_types if {
	is_array(data.shared_capabilities)
	is_array(data.allowed_methods)
	every cap, callers in data.capability_callers {
		is_string(cap)
		is_array(callers)
	}
	every tenant, roles in data.roles {
		is_string(tenant)
		is_array(roles)
	}
}
