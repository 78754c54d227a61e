# HTTP method allow-list.
#
# Data (optional):
#   allowed_methods: [GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS]
#
# Absent (or null, as an empty `allowed_methods:` line in YAML reads), the
# list above is the default: TRACE, CONNECT and non-standard methods are
# denied. gRPC uses POST. Methods are compared exactly, as HTTP method names
# are case-sensitive ("get" is not GET).
#
# Files can only add reasons to deny, never take one away. To allow, say,
# PROPFIND for one service only: add it to the list, and add a file that
# denies PROPFIND to every other destination.
package crank.authz

deny contains msg if {
	not input.request.method in methods_allowed
	msg := sprintf("method %q is not allowed; allowed methods: %s", [object.get(input, ["request", "method"], "?"), methods_allowed_text])
}

methods_allowed := data.allowed_methods if {
	data.allowed_methods != null
} else := ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]

# For the reason only.
methods_allowed_text := concat(", ", methods_allowed) if {
	is_array(methods_allowed)
	count(methods_allowed) > 0
} else := "none"
