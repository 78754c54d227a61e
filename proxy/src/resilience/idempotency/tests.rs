use super::*;
use tokio::time::advance;

const WAIT: Duration = Duration::from_secs(30);

fn limits() -> StoreLimits {
    StoreLimits {
        ttl: Duration::from_secs(3600),
        max_entries: 100,
        max_total_bytes: 1 << 20,
        max_response_bytes: 1 << 16,
    }
}

fn store(limits: StoreLimits) -> Arc<dyn IdempotencyStore> {
    Arc::new(MemoryStore::new(limits))
}

fn response(body: &'static [u8]) -> StoredResponse {
    StoredResponse {
        status: 201,
        headers: vec![("content-type".to_owned(), Bytes::from_static(b"text/plain"))],
        body: Bytes::from_static(body),
    }
}

fn completed(body: &'static [u8]) -> Completed {
    Completed {
        request_hash: RequestHasher::digest("POST", "/orders", b"req"),
        response: Some(response(body)),
    }
}

/// A completed entry for `key` whose response body is `body_len` bytes
/// and carries no headers.
fn complete_plain(store: &Arc<dyn IdempotencyStore>, key: &str, body_len: usize) {
    let claim = expect_first(begin(store, key));
    claim.complete(Completed {
        request_hash: [7; 32],
        response: Some(StoredResponse {
            status: 200,
            headers: Vec::new(),
            body: Bytes::from(vec![b'x'; body_len]),
        }),
    });
}

fn expect_first(b: Begin) -> Claim {
    match b {
        Begin::First(c) => c,
        other => panic!("expected First, got {other:?}"),
    }
}

fn expect_done(b: Begin) -> Arc<Completed> {
    match b {
        Begin::Done(c) => c,
        other => panic!("expected Done, got {other:?}"),
    }
}

fn expect_in_flight(b: Begin) -> InFlight {
    match b {
        Begin::InFlight(w) => w,
        other => panic!("expected InFlight, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn duplicate_replays_until_ttl_passes() {
    let store = store(limits());
    let claim = expect_first(begin(&store, "t1/r1/k"));
    // TTL counts from completion, not from the claim.
    advance(Duration::from_secs(1800)).await;
    claim.complete(completed(b"created"));

    let done = expect_done(begin(&store, "t1/r1/k"));
    assert_eq!(*done, completed(b"created"));
    // Another key is unaffected.
    drop(expect_first(begin(&store, "t1/r1/other")));

    advance(Duration::from_secs(3599)).await;
    let done = expect_done(begin(&store, "t1/r1/k"));
    assert_eq!(done.response, Some(response(b"created")));

    advance(Duration::from_secs(1)).await;
    let again = expect_first(begin(&store, "t1/r1/k"));
    assert_eq!(store.stats().in_flight, 1);
    drop(again);
    assert_eq!(store.stats(), StoreStats::default());
}

#[tokio::test(start_paused = true)]
async fn sweep_removes_expired_entries_only() {
    let store = store(limits());
    complete_plain(&store, "a", 10);
    advance(Duration::from_secs(600)).await;
    complete_plain(&store, "b", 10);
    let held = expect_first(begin(&store, "c"));
    assert_eq!(store.stats().entries, 3);

    assert_eq!(store.sweep(), 0);
    advance(Duration::from_secs(3000)).await;
    assert_eq!(store.sweep(), 1, "only a has expired");
    assert_eq!(
        store.stats(),
        StoreStats {
            entries: 2,
            in_flight: 1,
            bytes: (1 + 10) + 1,
        }
    );
    expect_done(begin(&store, "b"));
    advance(Duration::from_secs(600)).await;
    assert_eq!(store.sweep(), 1);
    // In-flight entries do not expire.
    expect_in_flight(begin(&store, "c"));
    held.complete(completed(b"c"));
    expect_done(begin(&store, "c"));
}

#[tokio::test(start_paused = true)]
async fn in_flight_duplicates_wait_for_completion() {
    let store = store(limits());
    let claim = expect_first(begin(&store, "k"));
    let w1 = expect_in_flight(begin(&store, "k"));
    let w2 = expect_in_flight(begin(&store, "k"));
    let h1 = tokio::spawn(w1.wait(WAIT));
    let h2 = tokio::spawn(w2.wait(WAIT));
    for _ in 0..5 {
        tokio::task::yield_now().await;
    }
    assert!(!h1.is_finished() && !h2.is_finished());

    advance(Duration::from_secs(5)).await;
    claim.complete(completed(b"ok"));
    let expected = WaitOutcome::Done(Arc::new(completed(b"ok")));
    assert_eq!(h1.await.unwrap(), expected);
    assert_eq!(h2.await.unwrap(), expected);
    expect_done(begin(&store, "k"));
}

#[tokio::test(start_paused = true)]
async fn waiter_after_completion_sees_outcome() {
    let store = store(limits());
    let claim = expect_first(begin(&store, "k"));
    let w = expect_in_flight(begin(&store, "k"));
    // Completed (and the sender dropped) before the waiter is polled.
    claim.complete(completed(b"ok"));
    assert_eq!(
        w.wait(WAIT).await,
        WaitOutcome::Done(Arc::new(completed(b"ok")))
    );
}

#[tokio::test(start_paused = true)]
async fn dropped_claim_abandons_key() {
    let store = store(limits());
    let claim = expect_first(begin(&store, "k"));
    let h1 = tokio::spawn(expect_in_flight(begin(&store, "k")).wait(WAIT));
    let h2 = tokio::spawn(expect_in_flight(begin(&store, "k")).wait(WAIT));
    tokio::task::yield_now().await;
    assert!(!h1.is_finished());

    drop(claim);
    assert_eq!(h1.await.unwrap(), WaitOutcome::Abandoned);
    assert_eq!(h2.await.unwrap(), WaitOutcome::Abandoned);
    assert_eq!(store.stats(), StoreStats::default());
    let next = expect_first(begin(&store, "k"));
    next.abandon();
    expect_first(begin(&store, "k"));
}

#[tokio::test(start_paused = true)]
async fn wait_times_out() {
    let store = store(limits());
    let claim = expect_first(begin(&store, "k"));
    let w = expect_in_flight(begin(&store, "k"));
    let start = Instant::now();
    assert_eq!(w.wait(Duration::from_secs(5)).await, WaitOutcome::TimedOut);
    assert_eq!(start.elapsed(), Duration::from_secs(5));
    // The first request is unaffected by a waiter giving up.
    expect_in_flight(begin(&store, "k"));
    claim.complete(completed(b"late"));
    expect_done(begin(&store, "k"));
}

#[test]
fn request_hash() {
    let whole = RequestHasher::digest("POST", "/orders", b"{\"qty\":1}");
    let mut split = RequestHasher::new("POST", "/orders");
    for chunk in [&b"{\"q"[..], b"", b"ty\":", b"1}"] {
        split.update(chunk);
    }
    assert_eq!(split.finish(), whole);

    assert_ne!(
        RequestHasher::digest("POST", "/orders", b"{\"qty\":2}"),
        whole
    );
    assert_ne!(
        RequestHasher::digest("PATCH", "/orders", b"{\"qty\":1}"),
        whole
    );
    assert_ne!(
        RequestHasher::digest("POST", "/orders/", b"{\"qty\":1}"),
        whole
    );
    // Bytes moved between path and body do not collide.
    assert_ne!(
        RequestHasher::digest("POST", "/orders{", b"\"qty\":1}"),
        whole
    );
    // Known SHA-256 framing: not just the body's hash.
    let body_only = digest::digest(&digest::SHA256, b"{\"qty\":1}");
    assert_ne!(&whole[..], body_only.as_ref());
}

#[tokio::test(start_paused = true)]
async fn max_entries_evicts_oldest_completed() {
    let store = store(StoreLimits {
        max_entries: 2,
        ..limits()
    });
    complete_plain(&store, "a", 1);
    advance(Duration::from_secs(1)).await;
    complete_plain(&store, "b", 1);
    let c = expect_first(begin(&store, "c"));
    assert_eq!(store.stats().entries, 2);
    expect_done(begin(&store, "b"));
    // a was evicted; claiming it again must evict b, not the in-flight c.
    let a = expect_first(begin(&store, "a"));
    assert_eq!(
        store.stats(),
        StoreStats {
            entries: 2,
            in_flight: 2,
            bytes: 2,
        }
    );
    assert!(matches!(begin(&store, "b"), Begin::Full));
    expect_in_flight(begin(&store, "c"));
    drop(a);
    drop(c);
    assert_eq!(store.stats(), StoreStats::default());
}

#[tokio::test(start_paused = true)]
async fn max_total_bytes_evicts_oldest_completed() {
    let store = store(StoreLimits {
        max_total_bytes: 100,
        ..limits()
    });
    complete_plain(&store, "k1", 40);
    complete_plain(&store, "k2", 40);
    assert_eq!(store.stats().bytes, 84);
    // The claim (2 bytes) still fits; completing with 40 more does not.
    let k3 = expect_first(begin(&store, "k3"));
    assert_eq!(store.stats().bytes, 86);
    k3.complete(Completed {
        request_hash: [1; 32],
        response: Some(StoredResponse {
            status: 200,
            headers: vec![("x-a".to_owned(), Bytes::from_static(b"12345"))],
            body: Bytes::from(vec![0u8; 32]),
        }),
    });
    assert_eq!(
        store.stats(),
        StoreStats {
            entries: 2,
            in_flight: 0,
            bytes: 42 + (2 + 3 + 5 + 32),
        }
    );
    expect_done(begin(&store, "k2"));
    let done = expect_done(begin(&store, "k3"));
    assert!(done.response.is_some());
    expect_first(begin(&store, "k1"));
}

#[tokio::test(start_paused = true)]
async fn oversized_response_is_stored_without_body() {
    let store = store(StoreLimits {
        max_response_bytes: 16,
        ..limits()
    });
    let claim = expect_first(begin(&store, "big"));
    let w = expect_in_flight(begin(&store, "big"));
    assert_eq!(claim.max_response_bytes(), 16);
    // 12 (content-type) + 10 (text/plain) + 1 body > 16.
    claim.complete(completed(b"x"));
    let expected = Completed {
        request_hash: RequestHasher::digest("POST", "/orders", b"req"),
        response: None,
    };
    assert_eq!(*expect_done(begin(&store, "big")), expected);
    assert_eq!(w.wait(WAIT).await, WaitOutcome::Done(Arc::new(expected)));
    assert_eq!(store.stats().bytes, 3);

    // Exactly at the limit is kept.
    complete_plain(&store, "fits", 16);
    assert!(expect_done(begin(&store, "fits")).response.is_some());
}

#[tokio::test(start_paused = true)]
async fn full_when_all_entries_in_flight() {
    let store = store(StoreLimits {
        max_entries: 2,
        ..limits()
    });
    let a = expect_first(begin(&store, "a"));
    let _b = expect_first(begin(&store, "b"));
    assert!(matches!(begin(&store, "c"), Begin::Full));
    // Lookups of held keys still work at capacity.
    expect_in_flight(begin(&store, "a"));
    a.complete(completed(b"a"));
    // Now the completed entry can make way.
    let c = expect_first(begin(&store, "c"));
    // a was evicted for c, and b and c leave no room for it again.
    assert!(matches!(begin(&store, "a"), Begin::Full));
    drop(c);
    expect_first(begin(&store, "d"));
}

#[tokio::test(start_paused = true)]
async fn stale_claim_cannot_touch_newer_entry() {
    let store = store(limits());
    let old = expect_first(begin(&store, "k"));
    let w = expect_in_flight(begin(&store, "k"));
    assert!(store.remove("k"));
    assert_eq!(w.wait(WAIT).await, WaitOutcome::Abandoned);

    let new = expect_first(begin(&store, "k"));
    old.complete(completed(b"old"));
    expect_in_flight(begin(&store, "k"));

    let stale_drop = expect_first({
        assert!(store.remove("k"));
        begin(&store, "k")
    });
    // `new` is stale now too: neither its drop nor a completion through
    // the store with its token touches `stale_drop`'s entry.
    drop(new);
    expect_in_flight(begin(&store, "k"));
    stale_drop.complete(completed(b"current"));
    assert_eq!(*expect_done(begin(&store, "k")), completed(b"current"));
    assert_eq!(store.stats().in_flight, 0);
}

#[tokio::test(start_paused = true)]
async fn store_level_tokens() {
    let store = MemoryStore::new(limits());
    let Lookup::Claimed { token } = store.claim("k") else {
        panic!("expected a claim");
    };
    assert!(!store.complete("k", token.wrapping_add(1), completed(b"x")));
    assert!(!store.abandon("k", token.wrapping_add(1)));
    assert!(!store.complete("other", token, completed(b"x")));
    assert!(store.complete("k", token, completed(b"x")));
    // A completed entry can be neither completed nor abandoned again.
    assert!(!store.complete("k", token, completed(b"y")));
    assert!(!store.abandon("k", token));
    assert!(matches!(store.claim("k"), Lookup::Done(c) if *c == completed(b"x")));
}
