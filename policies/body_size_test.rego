# Tests for body_size.rego. Limits are set per test with `with data.limits`.
package crank.body_size_test

import data.crank.authz

limits := {
	"max_body_bytes": 1000,
	"capability_max_body_bytes": {"upload:v1": 5000},
}

# A same-tenant POST of `size` bytes (null: streamed) to capability `cap`.
post(size, cap) := {
	"source": {
		"spiffe_id": "spiffe://crank.local/tenant/demo/svc/frontend",
		"service": "frontend",
		"tenant": "demo",
		"trust_domain": "crank.local",
		"address": "10.0.0.7:41000",
	},
	"destination": {
		"spiffe_id": "spiffe://crank.local/tenant/demo/svc/backend",
		"service": "backend",
		"tenant": "demo",
		"trust_domain": "crank.local",
		"capability": cap,
		"route": null,
		"direction": "inbound",
	},
	"request": {"method": "POST", "path": "/upload", "body_size": size},
}

test_body_at_limit_allowed if {
	authz.allow with input as post(1000, null) with data.limits as limits
}

test_body_over_limit_denied if {
	authz.deny == {"request body of 1001 bytes is over the limit of 1000 bytes for calls to backend.demo"} with input as post(1001, null)
		with data.limits as limits
}

test_capability_override_raises_limit if {
	authz.allow with input as post(5000, "upload:v1") with data.limits as limits
}

test_capability_override_denies_over_its_own_limit if {
	authz.deny == {`request body of 5001 bytes is over the limit of 5000 bytes for capability "upload:v1"`} with input as post(5001, "upload:v1")
		with data.limits as limits
}

test_capability_without_override_uses_global_limit if {
	"request body of 1001 bytes is over the limit of 1000 bytes for calls to backend.demo" in authz.deny with input as post(1001, "other:v1")
		with data.limits as limits
}

test_default_limit_is_100_mib if {
	authz.allow with input as post(104857600, null) with data.limits as {}
	"request body of 104857601 bytes is over the limit of 104857600 bytes for calls to backend.demo" in authz.deny with input as post(104857601, null)
		with data.limits as {}
}

test_default_limit_without_limits_key if {
	authz.body_size_limit == 104857600 with input as post(1, null) with data.limits as null
}

test_streamed_body_not_limited if {
	authz.allow with input as post(null, null) with data.limits as limits
}

test_empty_body_allowed if {
	authz.allow with input as post(0, null) with data.limits as limits
}

test_non_numeric_limit_fails_closed if {
	authz.deny == {"the request body limit for calls to backend.demo is misconfigured (not a number of bytes); the request is denied until the policy data is fixed"} with input as post(10, null)
		with data.limits as {"max_body_bytes": "10MB"}
	authz.deny == {`the request body limit for capability "upload:v1" is misconfigured (not a number of bytes); the request is denied until the policy data is fixed`} with input as post(10, "upload:v1")
		with data.limits as {"capability_max_body_bytes": {"upload:v1": "1GB"}}
}

# A streamed body is not limited even when the limit is broken: the rule
# only looks at the limit when there is a size.
test_non_numeric_limit_ignored_without_size if {
	authz.allow with input as post(null, null) with data.limits as {"max_body_bytes": "10MB"}
}

test_null_limits_mean_default if {
	authz.body_size_limit == 104857600 with input as post(1, "upload:v1")
		with data.limits as {"max_body_bytes": null, "capability_max_body_bytes": {"upload:v1": null}}
	authz.body_size_limit == 1000 with input as post(1, "upload:v1")
		with data.limits as {"max_body_bytes": 1000, "capability_max_body_bytes": {"upload:v1": null}}
}

# The shipped data.yaml: 10 MiB everywhere, 100 MiB for transcode:v1.
test_shipped_limits if {
	is_number(data.limits.max_body_bytes)
	every _, n in data.limits.capability_max_body_bytes {
		is_number(n)
	}
	authz.body_size_limit == 10485760 with input as post(1, null)
	authz.body_size_limit == 104857600 with input as post(1, "transcode:v1")
}
