# Tests for methods.rego.
package crank.methods_test

import data.crank.authz

# A same-tenant call with HTTP method `method`.
call(method) := {
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
		"capability": null,
		"route": null,
		"direction": "inbound",
	},
	"request": {"method": method, "path": "/", "body_size": null},
}

test_listed_methods_allowed if {
	every m in ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"] {
		authz.allow with input as call(m) with data.allowed_methods as ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
	}
}

test_unlisted_method_denied if {
	authz.deny == {`method "TRACE" is not allowed; allowed methods: GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS`} with input as call("TRACE")
		with data.allowed_methods as ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
}

test_connect_denied_by_shipped_list if {
	not authz.allow with input as call("CONNECT")
}

# `allowed_methods:` left empty in YAML is null: the default list applies.
# (The same happens when the key is absent, which a test cannot arrange.)
test_null_list_means_default if {
	every m in ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"] {
		authz.allow with input as call(m) with data.allowed_methods as null
	}
	authz.deny == {`method "TRACE" is not allowed; allowed methods: GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS`} with input as call("TRACE")
		with data.allowed_methods as null
}

test_empty_list_denies_everything if {
	authz.deny == {`method "GET" is not allowed; allowed methods: none`} with input as call("GET")
		with data.allowed_methods as []
}

test_methods_are_case_sensitive if {
	`method "get" is not allowed; allowed methods: GET, POST` in authz.deny with input as call("get")
		with data.allowed_methods as ["GET", "POST"]
}

test_data_list_replaces_default if {
	authz.allow with input as call("GET") with data.allowed_methods as ["GET"]
	`method "DELETE" is not allowed; allowed methods: GET` in authz.deny with input as call("DELETE")
		with data.allowed_methods as ["GET"]
}

test_custom_method_can_be_allowed if {
	authz.allow with input as call("PROPFIND") with data.allowed_methods as ["GET", "PROPFIND"]
}

# The shipped list keeps the quickstart's GET and POST.
test_shipped_list if {
	"GET" in data.allowed_methods
	"POST" in data.allowed_methods
	not "TRACE" in data.allowed_methods
}
