# The transcoding example: tenants may call the transcode:v1 capability only
# if they hold the role "media".
#
# Data:
#   roles:                 # tenant -> list of roles
#     acme: [media]
#
# transcode:v1 is also listed in shared_capabilities (data.yaml), so that
# tenant isolation lets other tenants reach the transcoder at all; this file
# narrows that to tenants with the role.
#
# Bodies: uploads to the transcoder may be up to 100 MiB, more than the
# mesh-wide limit. That is not a rule here: body_size.rego enforces it from
# data.yaml, limits.capability_max_body_bytes["transcode:v1"] = 104857600,
# so a large upload is denied once, with one reason.
#
# To gate another capability on a role, copy this file and change
# "transcode:v1" and "media" (they are written inline rather than as
# constants: every rule reference costs time on each request).
package crank.authz

deny contains msg if {
	input.destination.capability == "transcode:v1"
	not "media" in data.roles[input.source.tenant]
	msg := sprintf("%s may not call transcode:v1: it needs role \"media\"", [transcode_caller])
}

# `tenant "acme"`, or "unauthenticated caller".
transcode_caller := sprintf("tenant %q", [input.source.tenant]) if {
	is_string(input.source.tenant)
} else := "unauthenticated caller"
