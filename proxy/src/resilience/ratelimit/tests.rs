use super::*;
use tokio::time::advance;

fn limit(name: &str, tenant: &str, capability: &str, count: u32, per_secs: u64) -> Limit {
    Limit {
        name: name.to_string(),
        tenant: tenant.to_string(),
        capability: capability.to_string(),
        count,
        per: Duration::from_secs(per_secs),
        burst: count,
    }
}

fn allowed(quotas: &Quotas, tenant: &str, capability: &str) -> bool {
    quotas
        .check(tenant, capability)
        .expect("a limit matches")
        .allowed
}

/// Checks `n` times; how many passed.
fn passes(quotas: &Quotas, tenant: &str, capability: &str, n: usize) -> usize {
    (0..n)
        .filter(|_| allowed(quotas, tenant, capability))
        .count()
}

#[tokio::test(start_paused = true)]
async fn hundred_per_minute_then_429_with_headers() {
    let quotas = Quotas::new(
        vec![limit("acme-transcode", "acme", "transcode:v1", 100, 60)],
        1000,
    );
    for i in 0..100u32 {
        let d = quotas.check("acme", "transcode:v1").unwrap();
        assert!(d.allowed, "request {} denied", i + 1);
        assert_eq!(d.remaining, 99 - i);
        assert_eq!(d.retry_after_secs, 0);
        // i + 1 tokens out, 0.6 s each, rounded up.
        assert_eq!(d.reset_secs, ((u64::from(i) + 1) * 600).div_ceil(1000));
    }
    let denied = quotas.check("acme", "transcode:v1").unwrap();
    assert_eq!(
        denied,
        RateDecision {
            allowed: false,
            policy: "acme-transcode".into(),
            quota: 100,
            burst: 100,
            window_secs: 60,
            remaining: 0,
            reset_secs: 1,
            retry_after_secs: 1,
        }
    );
    assert_eq!(denied.policy_header(), r#""acme-transcode";q=100;w=60"#);
    assert_eq!(denied.ratelimit_header(), r#""acme-transcode";r=0;t=1"#);
    // The limit names acme only: other tenants and capabilities are not
    // limited by it.
    assert_eq!(quotas.check("globex", "transcode:v1"), None);
    assert_eq!(quotas.check("acme", "thumbnail:v1"), None);
    assert!(!allowed(&quotas, "acme", "transcode:v1"));
}

#[tokio::test(start_paused = true)]
async fn wildcard_tenant_gives_each_tenant_its_own_bucket() {
    let quotas = Quotas::new(vec![limit("transcode", "*", "transcode:v1", 100, 60)], 1000);
    assert_eq!(passes(&quotas, "acme", "transcode:v1", 101), 100);
    assert!(!allowed(&quotas, "acme", "transcode:v1"));

    // globex is not affected by acme's empty bucket.
    let first = quotas.check("globex", "transcode:v1").unwrap();
    assert!(first.allowed);
    assert_eq!(first.remaining, 99);
    assert_eq!(passes(&quotas, "globex", "transcode:v1", 100), 99);
    assert!(!allowed(&quotas, "acme", "transcode:v1"));
    assert_eq!(quotas.key_count(), 2);
}

#[tokio::test(start_paused = true)]
async fn exact_tenant_limit_and_the_rest() {
    let quotas = Quotas::new(
        vec![
            limit("acme-transcode", "acme", "transcode:v1", 2, 60),
            limit("default", "*", "*", 5, 60),
        ],
        1000,
    );
    assert_eq!(passes(&quotas, "acme", "transcode:v1", 2), 2);
    let denied = quotas.check("acme", "transcode:v1").unwrap();
    assert!(!denied.allowed);
    assert_eq!(&*denied.policy, "acme-transcode");
    assert_eq!(denied.retry_after_secs, 30);

    // Other tenants fall through to the default limit, own buckets.
    for tenant in ["globex", "initech"] {
        for _ in 0..5 {
            let d = quotas.check(tenant, "transcode:v1").unwrap();
            assert!(d.allowed);
            assert_eq!(&*d.policy, "default");
        }
        let d = quotas.check(tenant, "transcode:v1").unwrap();
        assert!(!d.allowed);
        assert_eq!(d.retry_after_secs, 12);
        assert_eq!(d.ratelimit_header(), r#""default";r=0;t=12"#);
    }
    // acme on another capability: the default limit, its own bucket.
    assert_eq!(passes(&quotas, "acme", "thumbnail:v1", 6), 5);
}

#[tokio::test(start_paused = true)]
async fn two_per_minute() {
    let quotas = Quotas::new(vec![limit("p", "acme", "c", 2, 60)], 10);
    let first = quotas.check("acme", "c").unwrap();
    assert_eq!(
        (first.allowed, first.remaining, first.reset_secs),
        (true, 1, 30)
    );
    let second = quotas.check("acme", "c").unwrap();
    assert_eq!(
        (second.allowed, second.remaining, second.reset_secs),
        (true, 0, 60)
    );
    assert_eq!(second.ratelimit_header(), r#""p";r=0;t=60"#);
    let third = quotas.check("acme", "c").unwrap();
    assert!(!third.allowed);
    assert_eq!((third.retry_after_secs, third.reset_secs), (30, 30));
    assert_eq!(third.ratelimit_header(), r#""p";r=0;t=30"#);

    advance(Duration::from_secs(29)).await;
    let d = quotas.check("acme", "c").unwrap();
    assert!(!d.allowed);
    assert_eq!(d.retry_after_secs, 1);
    advance(Duration::from_secs(1)).await;
    let d = quotas.check("acme", "c").unwrap();
    assert_eq!((d.allowed, d.remaining, d.reset_secs), (true, 0, 60));
    assert_eq!(quotas.check("acme", "c").unwrap().retry_after_secs, 30);
}

#[tokio::test(start_paused = true)]
async fn refill_over_paused_time() {
    let quotas = Quotas::new(vec![limit("p", "*", "c", 100, 60)], 10);
    assert_eq!(passes(&quotas, "acme", "c", 100), 100);
    assert!(!allowed(&quotas, "acme", "c"));

    // One token every 600 ms.
    advance(Duration::from_millis(599)).await;
    let d = quotas.check("acme", "c").unwrap();
    assert!(!d.allowed);
    assert_eq!(d.retry_after_secs, 1);
    advance(Duration::from_millis(1)).await;
    let d = quotas.check("acme", "c").unwrap();
    assert_eq!((d.allowed, d.remaining, d.reset_secs), (true, 0, 60));
    assert!(!allowed(&quotas, "acme", "c"));

    // A full window: the full burst again, and no more.
    advance(Duration::from_secs(60)).await;
    assert_eq!(passes(&quotas, "acme", "c", 101), 100);
}

#[tokio::test(start_paused = true)]
async fn reset_and_remaining_follow_the_bucket_exactly() {
    let quotas = Quotas::new(vec![limit("p", "acme", "c", 2, 60)], 10);
    let d = quotas.check("acme", "c").unwrap();
    assert_eq!((d.remaining, d.reset_secs), (1, 30));
    // 10 s later: 1/3 of a token back, so the bucket is full again
    // 50 s from now (not 60).
    advance(Duration::from_secs(10)).await;
    let d = quotas.check("acme", "c").unwrap();
    assert_eq!((d.allowed, d.remaining, d.reset_secs), (true, 0, 50));
    let d = quotas.check("acme", "c").unwrap();
    assert_eq!(
        (d.allowed, d.retry_after_secs, d.reset_secs),
        (false, 20, 20)
    );
    advance(Duration::from_millis(19_500)).await;
    assert_eq!(quotas.check("acme", "c").unwrap().retry_after_secs, 1);
    advance(Duration::from_millis(500)).await;
    assert!(allowed(&quotas, "acme", "c"));
}

#[tokio::test(start_paused = true)]
async fn burst_smaller_than_count() {
    let quotas = Quotas::new(
        vec![Limit {
            burst: 3,
            ..limit("p", "acme", "c", 10, 60)
        }],
        10,
    );
    let seen: Vec<(u32, u64)> = (0..3)
        .map(|_| quotas.check("acme", "c").unwrap())
        .map(|d| {
            assert!(d.allowed);
            (d.remaining, d.reset_secs)
        })
        .collect();
    assert_eq!(seen, vec![(2, 6), (1, 12), (0, 18)]);
    let d = quotas.check("acme", "c").unwrap();
    assert_eq!((d.allowed, d.retry_after_secs), (false, 6));
    assert_eq!(d.policy_header(), r#""p";q=10;w=60"#);
}

#[tokio::test(start_paused = true)]
async fn first_match_in_config_order_decides() {
    let specific = limit("acme-transcode", "acme", "transcode:v1", 1, 60);
    let catch_all = limit("catch-all", "*", "*", 1000, 60);

    let quotas = Quotas::new(vec![specific.clone(), catch_all.clone()], 10);
    assert_eq!(
        &*quotas.check("acme", "transcode:v1").unwrap().policy,
        "acme-transcode"
    );
    // The specific limit is exhausted; the catch-all is not consulted.
    let d = quotas.check("acme", "transcode:v1").unwrap();
    assert_eq!((d.allowed, &*d.policy), (false, "acme-transcode"));
    assert_eq!(&*quotas.check("acme", "other").unwrap().policy, "catch-all");

    // Reversed: the catch-all shadows the specific limit.
    let quotas = Quotas::new(vec![catch_all, specific.clone()], 10);
    assert_eq!(passes(&quotas, "acme", "transcode:v1", 10), 10);
    assert_eq!(
        &*quotas.check("acme", "transcode:v1").unwrap().policy,
        "catch-all"
    );

    // No limit matches: not limited.
    let quotas = Quotas::new(vec![specific], 10);
    assert!(!quotas.is_empty());
    assert_eq!(quotas.check("acme", "thumbnail:v1"), None);
    assert_eq!(quotas.check("globex", "transcode:v1"), None);
    assert_eq!(quotas.key_count(), 0);

    let none = Quotas::new(Vec::new(), 10);
    assert!(none.is_empty());
    assert_eq!(none.check("acme", "transcode:v1"), None);
}

#[tokio::test(start_paused = true)]
async fn wildcard_capability_and_unambiguous_keys() {
    let quotas = Quotas::new(vec![limit("p", "*", "*", 1, 60)], 100);
    // Same concatenation, different (tenant, capability): two buckets.
    assert!(allowed(&quotas, "ab", "c"));
    assert!(allowed(&quotas, "a", "bc"));
    assert!(allowed(&quotas, "a\u{1f}b", "c"));
    assert!(allowed(&quotas, "a", "b\u{1f}c"));
    assert!(!allowed(&quotas, "ab", "c"));
    assert!(!allowed(&quotas, "a", "bc"));
    assert_eq!(quotas.key_count(), 4);

    let quotas = Quotas::new(vec![limit("p", "acme", "*", 1, 60)], 100);
    assert!(allowed(&quotas, "acme", "x"));
    assert!(allowed(&quotas, "acme", "y"));
    assert!(!allowed(&quotas, "acme", "x"));
    assert_eq!(quotas.check("globex", "x"), None);
}

#[tokio::test(start_paused = true)]
async fn evict_idle_drops_full_buckets_and_keeps_the_rest() {
    // 10 per minute: one token every 6 s.
    let quotas = Quotas::new(vec![limit("p", "*", "c", 10, 60)], 1000);
    for i in 0..20 {
        assert!(allowed(&quotas, &format!("idle-{i}"), "c"));
        assert_eq!(passes(&quotas, &format!("busy-{i}"), "c", 10), 10);
    }
    assert_eq!(quotas.key_count(), 40);
    assert_eq!(quotas.evict_idle(), 40);

    // The idle buckets are full again; the drained ones are not.
    advance(Duration::from_secs(30)).await;
    assert_eq!(quotas.evict_idle(), 20);
    assert_eq!(quotas.key_count(), 20);
    // A kept bucket kept its state: 5 tokens back, one taken now.
    assert_eq!(quotas.check("busy-0", "c").unwrap().remaining, 4);
    // An evicted one starts full.
    assert_eq!(quotas.check("idle-0", "c").unwrap().remaining, 9);
    assert_eq!(quotas.key_count(), 21);

    // At 70 s everything has been full for a refill interval except
    // busy-0, full again only at 66 s + 6 s.
    advance(Duration::from_secs(40)).await;
    assert_eq!(quotas.evict_idle(), 1);
    advance(Duration::from_secs(60)).await;
    assert_eq!(quotas.evict_idle(), 0);
    assert_eq!(quotas.key_count(), 0);
    assert_eq!(quotas.check("busy-1", "c").unwrap().remaining, 9);
}

#[tokio::test(start_paused = true)]
async fn max_keys_overflow_shares_one_bucket() {
    let quotas = Quotas::new(vec![limit("p", "*", "c", 2, 60)], 3);
    for tenant in ["t1", "t2", "t3"] {
        assert_eq!(quotas.check(tenant, "c").unwrap().remaining, 1);
    }
    assert_eq!(quotas.key_count(), 3);

    // t4 and t5 are new keys beyond the bound: one shared bucket.
    let t4 = quotas.check("t4", "c").unwrap();
    assert_eq!((t4.allowed, t4.remaining), (true, 1));
    let t5 = quotas.check("t5", "c").unwrap();
    assert_eq!((t5.allowed, t5.remaining), (true, 0));
    let t6 = quotas.check("t6", "c").unwrap();
    assert_eq!((t6.allowed, t6.retry_after_secs), (false, 30));
    assert!(!allowed(&quotas, "t4", "c"));
    assert_eq!(quotas.key_count(), 4);

    // Known keys keep their own buckets.
    assert_eq!(quotas.check("t1", "c").unwrap().remaining, 0);
    assert!(!allowed(&quotas, "t1", "c"));

    // Many more new keys: still limited, memory still bounded.
    assert_eq!(
        (0..100)
            .filter(|i| allowed(&quotas, &format!("flood-{i}"), "c"))
            .count(),
        0
    );
    assert_eq!(quotas.key_count(), 4);

    // Once the old buckets are idle, a new key gets its own bucket.
    advance(Duration::from_secs(120)).await;
    assert_eq!(quotas.check("t7", "c").unwrap().remaining, 1);
    assert_eq!(quotas.key_count(), 1);
}

#[tokio::test(start_paused = true)]
async fn max_keys_zero_puts_every_key_in_the_overflow_bucket() {
    let quotas = Quotas::new(vec![limit("p", "*", "c", 2, 60)], 0);
    assert!(allowed(&quotas, "a", "c"));
    assert!(allowed(&quotas, "b", "c"));
    assert!(!allowed(&quotas, "c", "c"));
    assert_eq!(quotas.key_count(), 1);
}

#[tokio::test(start_paused = true)]
async fn degenerate_limits_are_clamped_not_panics() {
    let quotas = Quotas::new(
        vec![
            Limit {
                name: "zero".into(),
                tenant: "zero".into(),
                capability: "*".into(),
                count: 0,
                per: Duration::ZERO,
                burst: 0,
            },
            Limit {
                name: "huge".into(),
                tenant: "huge".into(),
                capability: "*".into(),
                count: 1,
                per: Duration::MAX,
                burst: u32::MAX,
            },
            Limit {
                name: "tiny".into(),
                tenant: "tiny".into(),
                capability: "*".into(),
                count: u32::MAX,
                per: Duration::from_nanos(1),
                burst: u32::MAX,
            },
        ],
        10,
    );
    let d = quotas.check("zero", "c").unwrap();
    assert_eq!((d.allowed, d.quota, d.window_secs), (true, 1, 1));
    assert_eq!(d.reset_secs, 1);

    let d = quotas.check("huge", "c").unwrap();
    assert!(d.allowed);
    assert_eq!(d.window_secs, Duration::MAX.as_secs());
    let d = quotas.check("huge", "c").unwrap();
    assert!(!d.allowed);
    assert!(d.retry_after_secs > 365 * 24 * 3600);
    assert!(!d.ratelimit_header().is_empty());

    assert!(allowed(&quotas, "tiny", "c"));
    advance(Duration::from_secs(1)).await;
    assert!(allowed(&quotas, "tiny", "c"));
    // "zero" is full again; "huge" and "tiny" were used.
    assert_eq!(quotas.evict_idle(), 2);
}

#[test]
fn header_formatting() {
    let d = RateDecision {
        allowed: true,
        policy: "acme-transcode".into(),
        quota: 100,
        burst: 100,
        window_secs: 60,
        remaining: 57,
        reset_secs: 36,
        retry_after_secs: 0,
    };
    assert_eq!(d.policy_header(), r#""acme-transcode";q=100;w=60"#);
    assert_eq!(d.ratelimit_header(), r#""acme-transcode";r=57;t=36"#);

    // sf-string: quotes and backslashes escaped, controls and non-ASCII
    // replaced, so the value is always a valid header.
    let d = RateDecision {
        policy: "a\"b\\c\u{e9}\r\n/*".into(),
        ..d
    };
    assert_eq!(d.policy_header(), r#""a\"b\\c___/*";q=100;w=60"#);
    assert_eq!(d.ratelimit_header(), r#""a\"b\\c___/*";r=57;t=36"#);
}

#[test]
fn concurrent_checks_share_one_bucket() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Quotas>();

    // No runtime: tokio's clock is the system clock here. 100 per hour,
    // so nothing refills while the threads run.
    let quotas = Arc::new(Quotas::new(vec![limit("p", "*", "c", 100, 3600)], 10));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let quotas = Arc::clone(&quotas);
            std::thread::spawn(move || passes(&quotas, "acme", "c", 50))
        })
        .collect();
    let passed: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(passed, 100);
    assert_eq!(quotas.key_count(), 1);
}

/// Bucket keys come from the thread's recent keys when they repeat: the
/// same key for the same parts, never one of another (tenant, capability),
/// and the right one after more distinct keys than are held.
#[test]
fn recent_keys_are_reused_and_never_confused() {
    let mut recent = RecentKeys::default();
    let a = recent.get("ab", "c");
    let b = recent.get("a", "bc");
    assert_ne!(a, b, "(ab, c) and (a, bc) are different buckets");
    assert_eq!(recent.get("ab", "c"), a);
    for i in 0..(RECENT_KEYS_HELD * 2) {
        let t = format!("t{i}");
        assert_eq!(recent.get(&t, "x"), BucketKey::seen(&t, "x"));
    }
    assert_eq!(recent.get("a", "bc"), b);
    assert_eq!(recent.get("", ""), BucketKey::seen("", ""));
    let (BucketKey::Seen { parts: p1, .. }, BucketKey::Seen { parts: p2, .. }) =
        (recent.get("a", "bc"), recent.get("a", "bc"))
    else {
        panic!("seen keys")
    };
    assert!(Arc::ptr_eq(&p1, &p2), "a repeat clones the held key");
}
