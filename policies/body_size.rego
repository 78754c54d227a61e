# Request body size limits.
#
# Data (all optional):
#   limits:
#     max_body_bytes: 10485760              # every call; default 104857600 (100 MiB)
#     capability_max_body_bytes:            # per capability, replaces the above
#       "transcode:v1": 104857600
#
# input.request.body_size comes from Content-Length, so the proxy can decide
# before the body is read. It is null when the body is streamed without a
# Content-Length (HTTP/1.1 chunked, or HTTP/2 without the header): this file
# does NOT limit such requests, because the size is unknown when the policy
# runs. A platform that wants every body sized up front can deny them; see
# the commented-out rule at the end of this file.
package crank.authz

# A body over the limit that applies to this call. Requests without a body
# size (streamed, or most GETs) stop at the first line, a plain comparison.
deny contains msg if {
	input.request.body_size != null
	limit := body_size_limit
	not body_size_within(input.request.body_size, limit)
	msg := body_size_reason(input.request.body_size, limit)
}

# is_number first: in Rego any string sorts above any number, so a limit
# mistyped as "100MB" would otherwise allow every body. It denies instead,
# with a reason that says so (fail closed); body_size_test.rego checks that
# the shipped limits are numbers.
body_size_within(size, limit) if {
	is_number(limit)
	size <= limit
}

body_size_reason(size, limit) := sprintf("request body of %d bytes is over the limit of %d bytes for %s", [size, limit, body_size_scope]) if {
	is_number(limit)
} else := sprintf("the request body limit for %s is misconfigured (not a number of bytes); the request is denied until the policy data is fixed", [body_size_scope])

# The limit for this call: the capability's own, else the mesh-wide one,
# else 100 MiB. A null value (a key with nothing after the colon) counts as
# unset. The `n != null` lines also make a missing key fall through to the
# next branch on regorus's VM, where an assignment from a missing key does not
# end the body by itself (see authz.rego).
body_size_limit := n if {
	n := data.limits.capability_max_body_bytes[input.destination.capability]
	n != null
} else := n if {
	n := data.limits.max_body_bytes
	n != null
} else := 104857600

# What the limit applies to, for the reason.
body_size_scope := sprintf("capability %q", [input.destination.capability]) if {
	data.limits.capability_max_body_bytes[input.destination.capability] != null
} else := sprintf("calls to %s", [callee_name])

# Optional: deny streamed bodies of unknown size on methods that carry one.
# Note that clients which send no body at all may also omit Content-Length
# (a GET usually does), which is why this is limited to POST/PUT/PATCH.
# Uncomment to enable, and add a test for it.
#
# deny contains msg if {
# 	input.request.body_size == null
# 	input.request.method in {"POST", "PUT", "PATCH"}
# 	msg := sprintf("%s requests to %s must send a Content-Length header: bodies of unknown size are not accepted", [input.request.method, callee_name])
# }
