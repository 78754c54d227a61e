# Tests for transcode.rego, and the 100 MiB body limit it relies on from
# body_size.rego + data.yaml.
package crank.transcode_test

import data.crank.authz

roles := {"acme": ["media", "billing"], "evil": ["billing"], "demo": ["viewer"]}

# `tenant`'s web service calls the media tenant's transcoder with a body of
# `size` bytes.
transcode(tenant, size) := {
	"source": {
		"spiffe_id": sprintf("spiffe://crank.local/tenant/%s/svc/web", [tenant]),
		"service": "web",
		"tenant": tenant,
		"trust_domain": "crank.local",
		"address": "10.0.0.7:41000",
	},
	"destination": {
		"spiffe_id": "spiffe://crank.local/tenant/media/svc/transcoder",
		"service": "transcoder",
		"tenant": "media",
		"trust_domain": "crank.local",
		"capability": "transcode:v1",
		"route": null,
		"direction": "inbound",
	},
	"request": {
		"method": "POST",
		"path": "/v1/jobs",
		"headers": {"content-type": "video/mp4"},
		"body_size": size,
	},
}

test_tenant_with_media_role_allowed if {
	authz.allow with input as transcode("acme", 1234) with data.roles as roles
}

test_tenant_without_media_role_denied if {
	authz.deny == {`tenant "evil" may not call transcode:v1: it needs role "media"`} with input as transcode("evil", 1234)
		with data.roles as roles
}

test_tenant_without_roles_entry_denied if {
	authz.deny == {`tenant "nobody" may not call transcode:v1: it needs role "media"`} with input as transcode("nobody", 1234)
		with data.roles as roles
}

test_no_roles_data_denies if {
	`tenant "acme" may not call transcode:v1: it needs role "media"` in authz.deny with input as transcode("acme", 1234)
		with data.roles as {}
}

test_unauthenticated_caller_denied if {
	req := object.union(transcode("acme", 1234), {"source": null})
	`unauthenticated caller may not call transcode:v1: it needs role "media"` in authz.deny with input as req
		with data.roles as roles
}

test_other_capabilities_not_affected if {
	req := object.union(transcode("demo", 10), {"destination": {
		"service": "backend",
		"tenant": "demo",
		"capability": null,
	}})
	authz.allow with input as req with data.roles as roles
}

# A different version of the capability is not covered by this rule.
test_only_transcode_v1_is_gated if {
	req := object.union(transcode("evil", 10), {"destination": {"tenant": "evil", "capability": "transcode:v2"}})
	authz.allow with input as req with data.roles as roles
}

# The shipped data.yaml lets transcode:v1 take uploads up to 100 MiB ...
test_upload_up_to_100_mib_allowed if {
	authz.allow with input as transcode("acme", 104857600) with data.roles as roles
}

# ... and no more.
test_upload_over_100_mib_denied if {
	authz.deny == {`request body of 104857601 bytes is over the limit of 104857600 bytes for capability "transcode:v1"`} with input as transcode("acme", 104857601)
		with data.roles as roles
}

# Shipped roles: acme may transcode, the quickstart's demo tenant may not.
test_shipped_roles if {
	authz.allow with input as transcode("acme", 1234)
	`tenant "demo" may not call transcode:v1: it needs role "media"` in authz.deny with input as transcode("demo", 1234)
}
