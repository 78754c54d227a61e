//! The one rescue table: every error the proxy answers for itself becomes a
//! status, an `x-crank-error` reason and a short body saying what happened and
//! what to do. Errors keep their source (downstream, upstream, internal).

use pingora_error::{Error, ErrorSource, ErrorType};

use crate::direction::Direction;

/// Why the proxy, not the app, produced a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// No route matches the request's host or port.
    NoRoute,
    /// Outbound: the destination is outside the mesh and nothing declares
    /// it, and `egress.mode` is `deny` (403).
    EgressNotDeclared,
    /// An inbound peer completed TLS without a client certificate.
    ClientCertRequired,
    /// An inbound peer's certificate carries no valid Crank identity.
    PeerIdentityInvalid,
    /// The request's framing is ambiguous or invalid (smuggling defence).
    BadFraming,
    /// The request could not be parsed.
    BadRequest,
    /// TCP connect to the upstream was refused or failed.
    UpstreamConnectFailed,
    /// TCP/TLS connect to the upstream did not finish in time.
    ConnectTimeout,
    /// The peer sidecar's certificate does not prove the expected identity.
    TlsIdentityMismatch,
    /// The TLS handshake with the peer sidecar failed for another reason.
    UpstreamTlsFailed,
    /// The upstream did not answer in time.
    UpstreamTimeout,
    /// The upstream closed or reset the connection mid-request.
    UpstreamReset,
    /// The upstream sent a response the proxy could not parse.
    UpstreamProtocolError,
    /// The caller went away mid-request; nothing can be sent (logged as 499).
    ClientClosed,
    /// A bug or resource problem inside the proxy.
    Internal,
    /// The Rego policy denied the request.
    PolicyDenied,
    /// The policy could not be evaluated (error or timeout) and fails closed.
    PolicyError,
    /// The tenant's quota for this capability is spent (429).
    RateLimited,
    /// The concurrency limit and its wait queue are full (503).
    Overloaded,
    /// The request waited for a concurrency slot and timed out (503).
    QueueTimeout,
    /// Every endpoint of the route is ejected by outlier detection (503).
    CircuitOpen,
    /// The route has no endpoint at all: nothing registered serves its
    /// capabilities right now (503).
    NoEndpoints,
    /// The route's request deadline passed (504).
    RequestTimeout,
    /// The route's fault injection aborted this request (configured status).
    FaultInjected,
    /// A request with this `Idempotency-Key` is still running (409).
    IdempotencyKeyInUse,
    /// The `Idempotency-Key` was used before with a different request (422).
    IdempotencyKeyMismatch,
    /// The first response under this key was too large to keep (409).
    IdempotencyReplayUnavailable,
    /// The idempotency store is full of running requests (503).
    IdempotencyStoreFull,
    /// The `Idempotency-Key` header is empty or longer than 255 bytes (400).
    IdempotencyKeyInvalid,
    /// Inbound: the calling sidecar's certificate is on the deny list (403).
    PeerCertRevoked,
    /// Outbound: the peer sidecar's certificate is on the deny list; the
    /// request was not sent (502). Same `x-crank-error` as [`Reason::PeerCertRevoked`].
    UpstreamCertRevoked,
    /// The request's header list is larger than `limits.max_request_header_bytes` (431).
    RequestHeaderTooLarge,
    /// Outbound: the peer sidecar refused this one request as malformed
    /// (HTTP/2 `PROTOCOL_ERROR` on its stream); not retried, and not held
    /// against the endpoint (400).
    PeerRefusedRequest,
    /// Outbound: this sidecar's own certificate is revoked, so every peer
    /// would refuse it; the request was not sent (503).
    OwnCertRevoked,
    /// Outbound: this sidecar's own certificate has expired (503).
    OwnCertExpired,
}

/// The error type `connected_to_upstream` raises for a revoked peer.
pub const UPSTREAM_REVOKED: ErrorType = ErrorType::Custom("PeerCertRevoked");

impl Reason {
    /// The value of the `x-crank-error` header.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::NoRoute => "no-route",
            Reason::EgressNotDeclared => "egress-not-declared",
            Reason::ClientCertRequired => "client-cert-required",
            Reason::PeerIdentityInvalid => "peer-identity-invalid",
            Reason::BadFraming => "bad-request-framing",
            Reason::BadRequest => "bad-request",
            Reason::UpstreamConnectFailed => "upstream-connect-failed",
            Reason::ConnectTimeout => "connect-timeout",
            Reason::TlsIdentityMismatch => "tls-identity-mismatch",
            Reason::UpstreamTlsFailed => "upstream-tls-failed",
            Reason::UpstreamTimeout => "upstream-timeout",
            Reason::UpstreamReset => "upstream-reset",
            Reason::UpstreamProtocolError => "upstream-protocol-error",
            Reason::ClientClosed => "client-closed",
            Reason::Internal => "internal",
            Reason::PolicyDenied => "policy-denied",
            Reason::PolicyError => "policy-error",
            Reason::RateLimited => "rate-limited",
            Reason::Overloaded => "overloaded",
            Reason::QueueTimeout => "queue-timeout",
            Reason::CircuitOpen => "circuit-open",
            Reason::NoEndpoints => "no-endpoints",
            Reason::RequestTimeout => "request-timeout",
            Reason::FaultInjected => "fault-injected",
            Reason::IdempotencyKeyInUse => "idempotency-key-in-use",
            Reason::IdempotencyKeyMismatch => "idempotency-key-mismatch",
            Reason::IdempotencyReplayUnavailable => "idempotency-replay-unavailable",
            Reason::IdempotencyStoreFull => "idempotency-store-full",
            Reason::IdempotencyKeyInvalid => "idempotency-key-invalid",
            Reason::PeerCertRevoked | Reason::UpstreamCertRevoked => "peer-cert-revoked",
            Reason::RequestHeaderTooLarge => "request-header-too-large",
            Reason::PeerRefusedRequest => "peer-refused-request",
            Reason::OwnCertRevoked => "own-cert-revoked",
            Reason::OwnCertExpired => "own-cert-expired",
        }
    }

    pub fn status(self) -> u16 {
        match self {
            Reason::NoRoute => 404,
            Reason::EgressNotDeclared => 403,
            Reason::ClientCertRequired
            | Reason::PeerIdentityInvalid
            | Reason::PolicyDenied
            | Reason::PolicyError
            | Reason::PeerCertRevoked => 403,
            Reason::BadFraming
            | Reason::BadRequest
            | Reason::IdempotencyKeyInvalid
            | Reason::PeerRefusedRequest => 400,
            Reason::RequestHeaderTooLarge => 431,
            Reason::OwnCertRevoked | Reason::OwnCertExpired => 503,
            Reason::RateLimited => 429,
            Reason::Overloaded
            | Reason::QueueTimeout
            | Reason::CircuitOpen
            | Reason::NoEndpoints
            | Reason::IdempotencyStoreFull
            | Reason::FaultInjected => 503,
            Reason::RequestTimeout => 504,
            Reason::IdempotencyKeyInUse | Reason::IdempotencyReplayUnavailable => 409,
            Reason::IdempotencyKeyMismatch => 422,
            Reason::UpstreamConnectFailed
            | Reason::TlsIdentityMismatch
            | Reason::UpstreamTlsFailed
            | Reason::UpstreamReset
            | Reason::UpstreamProtocolError
            | Reason::UpstreamCertRevoked => 502,
            Reason::ConnectTimeout | Reason::UpstreamTimeout => 504,
            Reason::ClientClosed => 499,
            Reason::Internal => 500,
        }
    }

    /// What happened and what to do, for the response body.
    pub fn advice(self) -> &'static str {
        match self {
            Reason::NoRoute => "no route matches this request's host or port; add a route whose name or hosts match it",
            Reason::EgressNotDeclared => "the destination is outside the mesh and no route or egress destination declares it, and egress.mode is deny; declare it in the mesh config's egress.yaml with a route to it (docs/reference/mesh-config.md), or call a route that exists",
            Reason::ClientCertRequired => "this port accepts mesh sidecars only; connect with a client certificate issued by the mesh CA",
            Reason::PeerIdentityInvalid => "the client certificate carries no valid Crank identity (spiffe://<trust-domain>/tenant/<t>/svc/<s>); reissue it with crankctl",
            Reason::BadFraming => "the request framing is ambiguous (Content-Length with Transfer-Encoding, repeated Content-Length, folded headers or bad chunks); fix the client",
            Reason::BadRequest => "the request could not be parsed; fix the client",
            Reason::UpstreamConnectFailed => "could not connect to the upstream; check that it runs and listens on the configured address",
            Reason::ConnectTimeout => "connecting to the upstream timed out; check the network path and the upstream's load",
            Reason::TlsIdentityMismatch => "the peer sidecar's certificate does not prove the identity this route expects; check the endpoint's identity in the route or the peer's certificate",
            Reason::UpstreamTlsFailed => "the mTLS handshake with the peer sidecar failed or the peer closed the new connection at once, most likely refusing our client certificate; check that both sides trust the same CA, that certificates are valid, and the peer's log",
            Reason::UpstreamTimeout => "the upstream did not answer in time; it may be overloaded or stuck",
            Reason::UpstreamReset => "the upstream closed the connection before the response was complete",
            Reason::UpstreamProtocolError => "the upstream sent a response that is not valid HTTP",
            Reason::ClientClosed => "the caller closed the connection before the response was complete",
            Reason::Internal => "the proxy hit an internal error; see its log",
            Reason::PolicyDenied => "the mesh policy denied this request; the reasons say why, and the security team can find the decision in the decision log by its id",
            Reason::PolicyError => "the mesh policy could not be evaluated, and the policy set fails closed; the decision log has the error under this decision id",
            Reason::RateLimited => "your tenant's quota for this capability is spent; retry after the Retry-After seconds, or ask the platform team for a larger quota",
            Reason::Overloaded => "the upstream is at its concurrency limit and its wait queue is full; retry after the Retry-After seconds, preferably elsewhere",
            Reason::QueueTimeout => "the request waited for a free slot at the upstream's concurrency limit and timed out; retry after the Retry-After seconds",
            Reason::CircuitOpen => "every endpoint of this route failed repeatedly and is ejected; retry after the Retry-After seconds, and check the endpoints' health",
            Reason::NoEndpoints => "no live endpoint serves this route: no worker with its capability and labels is registered right now; `crankctl routes` shows the route's backends and `crankctl endpoints` the registry",
            Reason::RequestTimeout => "the route's request timeout passed before the upstream answered (retries included); the upstream may be slow or stuck",
            Reason::FaultInjected => "this response was injected by the route's fault configuration (a chaos drill); it is not a real failure",
            Reason::IdempotencyKeyInUse => "a request with this Idempotency-Key is still running; retry after the Retry-After seconds to get its result",
            Reason::IdempotencyKeyMismatch => "this Idempotency-Key was already used with a different request (method, path or body); use a new key for a new request",
            Reason::IdempotencyReplayUnavailable => "the first request with this Idempotency-Key completed, but its response was too large to keep for replay; do not resend it, look up its result instead",
            Reason::IdempotencyStoreFull => "the sidecar holds as many running idempotent requests as it may; retry after the Retry-After seconds",
            Reason::IdempotencyKeyInvalid => "the Idempotency-Key header must be 1 to 255 bytes; send a unique key such as a UUID",
            Reason::PeerCertRevoked => "the calling sidecar's certificate has been revoked by the mesh CA and this connection is closed; a revoked certificate cannot be renewed: fix the cause, then re-enroll the caller's sidecar with a new join token (`crankctl token create`); `crankctl cert list` shows the status",
            Reason::UpstreamCertRevoked => "the peer sidecar's certificate has been revoked by the mesh CA, so the request was not sent to it; the peer must re-enroll with a new join token (`crankctl cert list` shows its status); other endpoints of the route still serve",
            Reason::RequestHeaderTooLarge => "the request's headers are larger than this mesh accepts (limits.max_request_header_bytes, counted as HTTP/2 counts them: name + value + 32 bytes per field); send fewer or smaller headers",
            Reason::PeerRefusedRequest => "the peer sidecar refused this request as malformed for HTTP/2 (invalid or oversized headers); it was not retried and the endpoint is healthy; fix the request",
            Reason::OwnCertRevoked => "this sidecar's own certificate has been revoked, so every peer would refuse it; the request was not sent. Its /ready says cert-revoked: put a new join token (`crankctl token create`) in identity.enroll.token_file and it re-enrolls",
            Reason::OwnCertExpired => "this sidecar's own certificate has expired, so every peer would refuse it; the request was not sent. Check that it can reach crank-control to renew (its log and /ready say why), or re-enroll it with a new join token",
        }
    }
}

/// A request the proxy answers by itself: the reason (status,
/// `x-crank-error` and advice come from the table above) and what it adds
/// for this request. Every request stage returns one instead of writing a
/// response; `request::respond` is the one place that writes them.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub reason: Reason,
    /// What happened to this request (the route, the quota, ...); may be empty.
    pub detail: String,
    /// A status other than the reason's (a fault abort's configured one).
    pub status: Option<u16>,
    /// Extra response headers (`retry-after`, `ratelimit`, ...).
    pub headers: Vec<(&'static str, String)>,
    /// Body fields next to `error` and `message` (the policy 403's
    /// `decision_id`, `reasons`, ...).
    pub fields: serde_json::Map<String, serde_json::Value>,
}

impl Refusal {
    pub fn new(reason: Reason, detail: impl Into<String>) -> Self {
        Refusal {
            reason,
            detail: detail.into(),
            status: None,
            headers: Vec::new(),
            fields: serde_json::Map::new(),
        }
    }

    /// Adds a response header.
    pub fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    /// Adds a body field.
    pub fn field(mut self, key: &str, value: impl Into<serde_json::Value>) -> Self {
        self.fields.insert(key.to_string(), value.into());
        self
    }

    /// Answers with `status` instead of the reason's.
    pub fn with_status(mut self, status: u16) -> Self {
        self.status = Some(status);
        self
    }

    /// The status sent.
    pub fn status(&self) -> u16 {
        self.status.unwrap_or(self.reason.status())
    }

    /// What happened and what to do: the reason's advice, then this
    /// request's detail in parentheses.
    pub fn message(&self) -> String {
        if self.detail.is_empty() {
            self.reason.advice().to_string()
        } else {
            format!("{} ({})", self.reason.advice(), self.detail)
        }
    }

    /// The body: the mesh's one error body (see [`body`]), with the trace
    /// id when the request has one and the stage did not name it already.
    pub fn body(&self, trace_id: Option<&str>) -> Vec<u8> {
        let mut fields = self.fields.clone();
        if let Some(id) = trace_id {
            fields
                .entry("trace_id")
                .or_insert_with(|| serde_json::Value::from(id));
        }
        body(self.status(), self.reason.as_str(), self.message(), fields)
    }
}

/// The content type of [`body`].
pub const BODY_TYPE: &str = "application/json";

/// The one error body of every response the mesh makes on its own
/// (crank-plumbing's): `{"error": reason, "message": what happened and
/// what to do, ...fields}` and a newline.
pub fn body(
    status: u16,
    reason: &'static str,
    message: String,
    fields: serde_json::Map<String, serde_json::Value>,
) -> Vec<u8> {
    let status = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::BAD_GATEWAY);
    let mut r = crank_plumbing::refusal::Refusal::new(status, reason, message);
    r.extra = fields;
    r.body()
}

/// A whole HTTP/1.1 refusal for the answers written before any phase runs
/// (an unparsable head, plaintext on the mTLS port): the status line, the
/// `x-crank-error*` headers, the one error body, `connection: close`.
pub fn raw_refusal(
    status_line: &str,
    reason: &'static str,
    message: &str,
    origin: &str,
    sidecar: &str,
) -> Vec<u8> {
    let status = status_line
        .split(' ')
        .next()
        .and_then(|c| c.parse().ok())
        .unwrap_or(400);
    let body = body(status, reason, message.to_string(), Default::default());
    let mut out = format!(
        "HTTP/1.1 {status_line}\r\n{}: {reason}\r\n{}: {origin}\r\n{}: {sidecar}\r\ncontent-type: {BODY_TYPE}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        crate::headers::ERROR_HEADER,
        crate::headers::ERROR_ORIGIN_HEADER,
        crate::headers::ERROR_SIDECAR_HEADER,
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(&body);
    out
}

/// Maps a Pingora error to a reason. Pure, so it is tested with a table.
pub fn classify(e: &Error) -> Reason {
    let text = format!("{e}");
    classify_parts(e.etype(), e.esource(), &text)
}

fn classify_parts(etype: &ErrorType, source: &ErrorSource, text: &str) -> Reason {
    use ErrorType::*;
    if *etype == UPSTREAM_REVOKED {
        return Reason::UpstreamCertRevoked;
    }
    let identity_problem = text.contains("NotValidForName") || text.contains("not valid for name");
    // Pingora's chunked-body errors are a custom type ("InvalidChunk").
    if *source == ErrorSource::Downstream
        && (text.contains("InvalidChunk") || text.contains("chunked encoding"))
    {
        return Reason::BadFraming;
    }
    // With TLS 1.3 a server's refusal of our client certificate arrives as an
    // alert after the client considers the handshake done: the first read fails.
    if *source == ErrorSource::Upstream && text.contains("received fatal alert") {
        return Reason::UpstreamTlsFailed;
    }
    match etype {
        ConnectTimedout | TLSHandshakeTimedout => Reason::ConnectTimeout,
        ConnectRefused | ConnectNoRoute | ConnectError | BindError | SocketError => {
            Reason::UpstreamConnectFailed
        }
        TLSHandshakeFailure | InvalidCert | HandshakeError | TLSWantX509Lookup => {
            if identity_problem {
                Reason::TlsIdentityMismatch
            } else {
                Reason::UpstreamTlsFailed
            }
        }
        ReadTimedout | WriteTimedout => match source {
            ErrorSource::Downstream => Reason::BadRequest,
            _ => Reason::UpstreamTimeout,
        },
        InvalidHTTPHeader | H1Error | H2Error | InvalidH2 | H2Downgrade => match source {
            ErrorSource::Downstream => {
                if text.contains("chunk")
                    || text.contains("Content-Length")
                    || text.contains("Transfer-Encoding")
                {
                    Reason::BadFraming
                } else {
                    Reason::BadRequest
                }
            }
            _ => Reason::UpstreamProtocolError,
        },
        ReadError | WriteError | ConnectionClosed => match source {
            ErrorSource::Upstream => Reason::UpstreamReset,
            ErrorSource::Downstream => {
                if text.contains("chunk") {
                    Reason::BadFraming
                } else {
                    Reason::ClientClosed
                }
            }
            _ => Reason::Internal,
        },
        _ => Reason::Internal,
    }
}

/// A peer sidecar that hangs up on a brand-new mTLS connection before any
/// response has refused us during the handshake (with TLS 1.3 its alert can
/// lose the race with the close, leaving only a reset or broken pipe).
pub fn refine(reason: Reason, direction: Direction, fresh_upstream: bool) -> Reason {
    match (reason, direction, fresh_upstream) {
        (Reason::UpstreamReset, Direction::Outbound, true) => Reason::UpstreamTlsFailed,
        (r, _, _) => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ErrorSource::*;
    use ErrorType::*;

    #[test]
    fn rescue_table() {
        let cases: &[(ErrorType, ErrorSource, &str, Reason)] = &[
            (ConnectRefused, Upstream, "", Reason::UpstreamConnectFailed),
            (ConnectTimedout, Upstream, "", Reason::ConnectTimeout),
            (
                TLSHandshakeFailure,
                Upstream,
                "invalid peer certificate: NotValidForName",
                Reason::TlsIdentityMismatch,
            ),
            (
                TLSHandshakeFailure,
                Upstream,
                "invalid peer certificate: UnknownIssuer",
                Reason::UpstreamTlsFailed,
            ),
            (InvalidCert, Upstream, "", Reason::UpstreamTlsFailed),
            (ReadTimedout, Upstream, "", Reason::UpstreamTimeout),
            (ConnectionClosed, Upstream, "", Reason::UpstreamReset),
            (
                InvalidHTTPHeader,
                Upstream,
                "",
                Reason::UpstreamProtocolError,
            ),
            (
                InvalidHTTPHeader,
                Downstream,
                "invalid chunk size",
                Reason::BadFraming,
            ),
            (
                InvalidHTTPHeader,
                Downstream,
                "bad header",
                Reason::BadRequest,
            ),
            (
                ReadError,
                Downstream,
                "Invalid chunked encoding",
                Reason::BadFraming,
            ),
            (InternalError, Internal, "", Reason::Internal),
            (UPSTREAM_REVOKED, Upstream, "", Reason::UpstreamCertRevoked),
        ];
        for (t, s, text, want) in cases {
            assert_eq!(classify_parts(t, s, text), *want, "{t:?} {s:?} {text}");
        }
    }

    #[test]
    fn statuses_and_reasons_are_distinct_and_sane() {
        let all = [
            Reason::NoRoute,
            Reason::EgressNotDeclared,
            Reason::ClientCertRequired,
            Reason::PeerIdentityInvalid,
            Reason::BadFraming,
            Reason::BadRequest,
            Reason::UpstreamConnectFailed,
            Reason::ConnectTimeout,
            Reason::TlsIdentityMismatch,
            Reason::UpstreamTlsFailed,
            Reason::UpstreamTimeout,
            Reason::UpstreamReset,
            Reason::UpstreamProtocolError,
            Reason::ClientClosed,
            Reason::Internal,
            Reason::PolicyDenied,
            Reason::PolicyError,
            Reason::RateLimited,
            Reason::Overloaded,
            Reason::QueueTimeout,
            Reason::CircuitOpen,
            Reason::NoEndpoints,
            Reason::RequestTimeout,
            Reason::FaultInjected,
            Reason::IdempotencyKeyInUse,
            Reason::IdempotencyKeyMismatch,
            Reason::IdempotencyReplayUnavailable,
            Reason::IdempotencyStoreFull,
            Reason::IdempotencyKeyInvalid,
            Reason::PeerCertRevoked,
            Reason::UpstreamCertRevoked,
            Reason::RequestHeaderTooLarge,
            Reason::PeerRefusedRequest,
            Reason::OwnCertRevoked,
            Reason::OwnCertExpired,
        ];
        let names: std::collections::HashSet<_> = all.iter().map(|r| r.as_str()).collect();
        // peer-cert-revoked is the one reason both directions answer (403 / 502).
        assert_eq!(names.len(), all.len() - 1);
        for r in all {
            assert!((400..600).contains(&r.status()));
            assert!(!r.advice().is_empty());
        }
    }

    #[test]
    fn reset_on_a_fresh_peer_connection_is_a_tls_refusal() {
        use crate::direction::Direction::*;
        assert_eq!(
            refine(Reason::UpstreamReset, Outbound, true),
            Reason::UpstreamTlsFailed
        );
        assert_eq!(
            refine(Reason::UpstreamReset, Outbound, false),
            Reason::UpstreamReset
        );
        assert_eq!(
            refine(Reason::UpstreamReset, Inbound, true),
            Reason::UpstreamReset
        );
        assert_eq!(
            refine(Reason::UpstreamTimeout, Outbound, true),
            Reason::UpstreamTimeout
        );
    }

    #[test]
    fn refusals_have_the_one_json_body() {
        let r = Refusal::new(Reason::NoRoute, "host \"x\"");
        let v: serde_json::Value = serde_json::from_slice(&r.body(Some("abc"))).unwrap();
        assert_eq!(v["error"], "no-route");
        assert_eq!(
            v["message"],
            format!("{} (host \"x\")", Reason::NoRoute.advice())
        );
        assert_eq!(v["trace_id"], "abc");
        let plain: serde_json::Value =
            serde_json::from_slice(&Refusal::new(Reason::Overloaded, "").body(None)).unwrap();
        assert_eq!(plain.as_object().unwrap().len(), 2, "{plain}");
        assert_eq!(plain["message"], Reason::Overloaded.advice());
        // A stage's own trace_id (the policy 403's, null without tracing) wins.
        let policy = Refusal::new(Reason::PolicyDenied, "")
            .field("decision_id", "d1")
            .field("trace_id", serde_json::Value::Null);
        let body = policy.body(Some("abc"));
        assert!(
            body.starts_with(b"{\"error\":\"policy-denied\",\"message\":"),
            "{}",
            String::from_utf8_lossy(&body)
        );
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["decision_id"], "d1");
        assert!(v["trace_id"].is_null());
    }

    #[test]
    fn raw_refusals_carry_the_headers_and_a_matching_length() {
        let raw = raw_refusal(
            "400 Bad Request",
            "mtls-required",
            "use mTLS",
            "inbound",
            "spiffe://td/x",
        );
        let text = String::from_utf8(raw).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 400 Bad Request\r\nx-crank-error: mtls-required\r\nx-crank-error-origin: inbound\r\nx-crank-error-sidecar: spiffe://td/x\r\ncontent-type: application/json\r\n"), "{head}");
        assert!(head.contains(&format!("content-length: {}", body.len())));
        assert_eq!(
            body,
            "{\"error\":\"mtls-required\",\"message\":\"use mTLS\"}\n"
        );
    }
}
