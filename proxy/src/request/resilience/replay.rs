//! `Idempotency-Key` (inbound): the first request with a key runs and its
//! response is kept; a duplicate gets the kept response (or 409 while the
//! first runs, 422 when it is a different request).

use bytes::{Bytes, BytesMut};
use crank_api::proxy::InFlightMode;
use pingora_http::ResponseHeader;
use pingora_proxy::Session;

use super::admit::Stop;
use super::{IdemCtx, IDEMPOTENCY_KEY, REPLAYED_HEADER};
use crate::errors::{Reason, Refusal};
use crate::request::{Ctx, MeshProxy};
use crate::resilience::idempotency::{self, Begin, Completed, RequestHasher, WaitOutcome};

impl MeshProxy {
    /// Inbound `Idempotency-Key` on a non-idempotent request: the first
    /// runs (and its response is kept), a duplicate gets the kept response.
    pub(super) async fn check_idempotency(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
    ) -> Result<(), Stop> {
        let Some(store) = self.rt.idempotency.as_ref() else {
            return Ok(());
        };
        let req = session.req_header();
        let Some(key) = idempotency_key(req)? else {
            return Ok(());
        };
        let scope = self
            .inbound_capability(req)
            .unwrap_or_else(|| "app".to_string());
        let tenant = ctx.peer.as_ref().map_or("", |p| p.tenant.as_str());
        let scoped = format!(
            "{tenant}\u{1f}{scope}\u{1f}{}",
            String::from_utf8_lossy(key)
        );
        let hasher = RequestHasher::new(
            req.method.as_str(),
            &String::from_utf8_lossy(req.raw_path()),
        );
        let cfg = self.rt.config.load();
        let Some(icfg) = cfg.inbound.as_ref().map(|i| &i.idempotency) else {
            return Ok(());
        };
        match idempotency::begin(store, &scoped) {
            Begin::First(claim) => {
                ctx.res.idem = Some(Box::new(IdemCtx::new(claim, Some(hasher), None)));
                Ok(())
            }
            Begin::Full => {
                self.count_shed(ctx, "idempotency-store-full");
                Err(Refusal::new(Reason::IdempotencyStoreFull, "")
                    .header("retry-after", "1")
                    .into())
            }
            Begin::Done(c) => {
                let hash = self.hash_body(session, hasher).await?;
                Err(self.replay(session, ctx, &c, hash).await)
            }
            Begin::InFlight(_) if icfg.in_flight == InFlightMode::Reject => {
                Err(self.in_use().into())
            }
            Begin::InFlight(w) => {
                let hash = self.hash_body(session, hasher).await?;
                match w.wait(icfg.wait_timeout).await {
                    WaitOutcome::Done(c) => Err(self.replay(session, ctx, &c, hash).await),
                    // The first failed without a response: this one may
                    // run, if its body is still held to send upstream.
                    WaitOutcome::Abandoned if !session.as_ref().retry_buffer_truncated() => {
                        match idempotency::begin(store, &scoped) {
                            Begin::First(claim) => {
                                ctx.res.idem =
                                    Some(Box::new(IdemCtx::new(claim, None, Some(hash))));
                                Ok(())
                            }
                            Begin::Done(c) => Err(self.replay(session, ctx, &c, hash).await),
                            _ => Err(self.in_use().into()),
                        }
                    }
                    _ => Err(self.in_use().into()),
                }
            }
        }
    }

    fn in_use(&self) -> Refusal {
        self.count_replay("in-use");
        Refusal::new(Reason::IdempotencyKeyInUse, "").header("retry-after", "1")
    }

    fn count_replay(&self, result: &str) {
        self.rt
            .metrics
            .resilience
            .replays
            .with_label_values(&[result])
            .inc();
    }

    /// Reads a duplicate's whole body to hash it. The first 64 KiB stay in
    /// Pingora's retry buffer, so the request can still be sent upstream.
    async fn hash_body(
        &self,
        session: &mut Session,
        mut hasher: RequestHasher,
    ) -> Result<[u8; 32], Refusal> {
        session.as_mut().enable_retry_buffering();
        loop {
            match session.as_mut().read_request_body().await {
                Ok(Some(chunk)) => hasher.update(&chunk),
                Ok(None) => return Ok(hasher.finish()),
                Err(e) => {
                    tracing::warn!(error = %e, "reading the body of a duplicate idempotent request failed");
                    return Err(Refusal::new(
                        Reason::BadRequest,
                        "reading the request body failed",
                    ));
                }
            }
        }
    }

    /// Answers a duplicate from the completed first request, or says why not.
    async fn replay(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        c: &Completed,
        hash: [u8; 32],
    ) -> Stop {
        if c.request_hash != hash {
            self.count_replay("mismatch");
            return Refusal::new(Reason::IdempotencyKeyMismatch, "").into();
        }
        let Some(r) = &c.response else {
            self.count_replay("unavailable");
            return Refusal::new(Reason::IdempotencyReplayUnavailable, "").into();
        };
        self.count_replay("replayed");
        ctx.res.answered_by = Some("idempotency-replay");
        let Ok(mut resp) = ResponseHeader::build(r.status, Some(r.headers.len() + 2)) else {
            return Stop::Answered;
        };
        for (k, v) in &r.headers {
            if let Ok(v) = http::HeaderValue::from_bytes(v) {
                let _ = resp.append_header(k.clone(), v);
            }
        }
        let _ = resp.insert_header(REPLAYED_HEADER, "true");
        let _ = resp.insert_header(http::header::CONTENT_LENGTH, r.body.len().to_string());
        if session
            .write_response_header(Box::new(resp), false)
            .await
            .is_ok()
        {
            let _ = session
                .write_response_body(Some(r.body.clone()), true)
                .await;
        }
        Stop::Answered
    }

    /// `response_filter`: `RateLimit` headers, and the start of the
    /// response kept for idempotent replay.
    pub(crate) fn on_response(&self, resp: &mut ResponseHeader, ctx: &mut Ctx) {
        // Captured before this request's RateLimit headers: a replay must
        // not carry stale quota figures.
        if let Some(i) = ctx.res.idem.as_mut() {
            i.status = resp.status.as_u16();
            i.headers = resp
                .headers
                .iter()
                .filter(|(k, _)| !is_hop_header(k.as_str()))
                .map(|(k, v)| (k.as_str().to_string(), Bytes::copy_from_slice(v.as_bytes())))
                .collect();
        }
        if let Some(d) = &ctx.res.rate {
            let _ = resp.insert_header("ratelimit-policy", d.policy_header());
            let _ = resp.insert_header("ratelimit", d.ratelimit_header());
        }
    }

    /// `request_body_filter`: hash the first idempotent request's body.
    pub(crate) fn on_request_body(&self, body: &Option<Bytes>, ctx: &mut Ctx) {
        if let (Some(i), Some(b)) = (ctx.res.idem.as_mut(), body) {
            if let Some(h) = i.hasher.as_mut() {
                h.update(b);
            }
        }
    }

    /// `response_body_filter`: keep the first idempotent response's body,
    /// up to the size limit.
    pub(crate) fn on_response_body(&self, body: &Option<Bytes>, ctx: &mut Ctx) {
        let (Some(i), Some(b)) = (ctx.res.idem.as_mut(), body) else {
            return;
        };
        if i.too_large {
            return;
        }
        if i.body.len() + b.len() > i.claim.max_response_bytes() {
            i.too_large = true;
            i.body = BytesMut::new();
        } else {
            i.body.extend_from_slice(b);
        }
    }

    /// `logging`: a complete response from the app completes the claim; a
    /// failure abandons it (dropped with the context), so a retry runs.
    pub(crate) fn finish_idempotency(&self, ctx: &mut Ctx, ok: bool) {
        let Some(i) = ctx.res.idem.take().map(|i| *i) else {
            return;
        };
        if !ok || ctx.reason.is_some() || i.status == 0 {
            return;
        }
        let request_hash = match (i.hash, i.hasher) {
            (Some(h), _) => h,
            (None, Some(h)) => h.finish(),
            (None, None) => return,
        };
        let response = (!i.too_large).then(|| idempotency::StoredResponse {
            status: i.status,
            headers: i.headers,
            body: i.body.freeze(),
        });
        i.claim.complete(Completed {
            request_hash,
            response,
        });
        if let Some(store) = &self.rt.idempotency {
            self.rt
                .metrics
                .resilience
                .idempotency_keys
                .set(store.stats().entries as i64);
        }
    }
}

/// The key of a non-idempotent request (a structured-field string or a
/// bare token); `None` when there is none to honour; 400 when invalid.
fn idempotency_key(req: &pingora_http::RequestHeader) -> Result<Option<&[u8]>, Refusal> {
    if req.method.is_idempotent() {
        return Ok(None);
    }
    let Some(raw) = req.headers.get(IDEMPOTENCY_KEY) else {
        return Ok(None);
    };
    let raw = raw.as_bytes();
    let key = raw
        .strip_prefix(b"\"")
        .and_then(|k| k.strip_suffix(b"\""))
        .unwrap_or(raw);
    if key.is_empty() || key.len() > 255 {
        return Err(Refusal::new(Reason::IdempotencyKeyInvalid, ""));
    }
    Ok(Some(key))
}

/// The endpoint affinity of a non-idempotent request with an
/// `Idempotency-Key`: a hash of the key, the same in every sidecar.
pub(super) fn idempotency_affinity(req: &pingora_http::RequestHeader) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    if req.method.is_idempotent() {
        return None;
    }
    let key = req.headers.get(IDEMPOTENCY_KEY)?;
    // SipHash with fixed keys: stable across processes and hosts.
    let mut h = std::hash::DefaultHasher::new();
    key.as_bytes().hash(&mut h);
    Some(h.finish())
}

/// Headers a replay does not copy: they describe one connection
/// (crank-plumbing's hop-by-hop list), or the body's length, which the
/// replay sets.
fn is_hop_header(name: &str) -> bool {
    crank_plumbing::headers::is_hop_by_hop(name) || name == "content-length"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotency_keys_map_to_a_stable_endpoint() {
        let req = |method: &str, key: Option<&str>| {
            let mut r = pingora_http::RequestHeader::build(method, b"/", None).unwrap();
            if let Some(k) = key {
                r.insert_header(IDEMPOTENCY_KEY, k).unwrap();
            }
            r
        };
        let a = idempotency_affinity(&req("POST", Some("job-1")));
        assert!(a.is_some());
        assert_eq!(a, idempotency_affinity(&req("POST", Some("job-1"))));
        assert_ne!(a, idempotency_affinity(&req("POST", Some("job-2"))));
        assert_eq!(idempotency_affinity(&req("GET", Some("job-1"))), None);
        assert_eq!(idempotency_affinity(&req("POST", None)), None);
    }

    #[test]
    fn hop_headers_are_not_replayed() {
        assert!(is_hop_header("transfer-encoding"));
        assert!(is_hop_header("content-length"));
        assert!(!is_hop_header("content-type"));
        assert!(!is_hop_header("etag"));
    }
}
