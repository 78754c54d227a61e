# Crank Mesh example authorization policy: the entry point.
#
# THE CONTRACT
#
# The proxy evaluates two rules of this package on every request:
#
#   data.crank.authz.allow   a boolean
#   data.crank.authz.deny    a set of reason strings
#
# A request goes through iff `allow` is true AND `deny` is empty. Each member
# of `deny` is sent to the caller in the 403 body (and to the decision log),
# so write reasons as clear, specific sentences, and never put secrets in
# them (tokens, header values, the contents of allow-lists).
#
# The input document (input: crank in policy.yaml, the default):
#
#   input.source        the verified peer: spiffe_id, service, tenant,
#                       trust_domain, address. null when the peer did not
#                       present a mesh identity.
#   input.destination   spiffe_id, service, tenant, trust_domain,
#                       capability (e.g. "transcode:v1", may be null),
#                       route (may be null), direction ("inbound"/"outbound")
#   input.request       method, path, raw_path, parsed_path, query, host,
#                       scheme, protocol, headers (only those listed in
#                       policy.yaml `headers`), body_size (null when the body
#                       is streamed without Content-Length)
#   input.time          unix_ns, rfc3339
#
# `data` is data.yaml / data.json of this directory, merged at the path of the
# directory they are in (policies/data.yaml -> data.*; a file at
# policies/roles/data.yaml would become data.roles.*), as in OPA bundles.
#
# HOW THE FILES COMPOSE
#
# Every other file of this package adds reasons to `deny` with
#
#   deny contains msg if { ...condition...; msg := "..." }
#
# and nothing else (besides a few small helper rules named after the file).
# This file only says: allow when no file found a reason to deny. So:
#
#   - to add a rule, add a file with `package crank.authz` and a
#     `deny contains msg if {...}`, plus a *_test.rego next to it;
#   - to drop a rule, delete its file and its test; nothing else changes;
#   - a request denied by several files gets every reason.
#
# Run `crankctl policy test policies/` after any change, and
# `crankctl policy check policies/` to compile the set as the proxy will.
#
# KEEP IT FAST
#
# Every rule here runs on every request (timeout: 50ms in policy.yaml, but
# aim for microseconds: this set takes about 10-30µs on the VM). Each
# `deny contains` definition costs time even when it does not match, and so
# does each helper-rule reference and `data` lookup (several times more on
# the interpreter). So: one deny rule per concern, the cheapest and most
# selective test first (a plain comparison such as
# `input.destination.capability == "transcode:v1"`), and helpers that build
# the reason only on the deny path. No comprehensions or loops over data:
# look values up by key.
package crank.authz

# Deny unless proven otherwise: if the deny rules cannot be evaluated, the
# proxy treats the evaluation as an error (failure_mode in policy.yaml).
default allow := false

allow if count(deny) == 0

# SAME RESULT ON BOTH ENGINES
#
# The proxy runs this set on regorus's compiled VM (RVM: `engine: rvm` in
# policy.yaml), while `crankctl policy test` runs the tests on the
# interpreter, and control-plane/policy/tests/shipped_policies.rs proves in
# CI that both decide alike. Write rules that decide the same on both:
#
#   - Read data by path (`data.limits.max_body_bytes`); the VM refuses
#     the data root (`object.get(data, ...)`), and with `engine: rvm` the
#     set then fails to load.
#   - On the VM (regorus 0.14) an assignment from an undefined value
#     (`x := data.map[key]` with a missing key, `x := input.missing`) does
#     NOT end the rule body as it does in OPA: x is left undefined and the
#     body goes on, so a later `not f(x)` succeeds. After such an
#     assignment, test the value (`x != null`) before anything else.
#     Comparisons and builtins on undefined values behave as in OPA.
#   - Make every reason defined for every input (defaults, `else`): a deny
#     whose message is undefined adds nothing to `deny`, and the request
#     would be allowed.
#   - Write complete rules so that one definition applies (`else` chains):
#     when two give different values the VM picks one instead of failing.

# --- Helpers for deny reasons, shared by the other files ----------------------
#
# Helpers must not fail on any input (a null source, a missing field):
# `crankctl policy test` may evaluate them even where no rule needs them, and
# an error fails the request closed. Hence object.get with a path, which
# returns its default through null or missing parents.

# The caller as "service.tenant" (e.g. "web.acme"), or "unauthenticated
# caller" when the request carries no verified mesh identity.
default caller_name := "unauthenticated caller"

caller_name := sprintf("%s.%s", [
	object.get(input, ["source", "service"], "?"),
	object.get(input, ["source", "tenant"], "?"),
]) if is_object(input.source)

# The destination as "service.tenant" (e.g. "transcoder.media").
callee_name := sprintf("%s.%s", [
	object.get(input, ["destination", "service"], "?"),
	object.get(input, ["destination", "tenant"], "?"),
])
