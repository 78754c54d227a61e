use std::sync::Arc;
use std::time::Duration;

use super::conformance;
use super::*;

const TTL: Duration = Duration::from_secs(2);

#[tokio::test(start_paused = true)]
async fn file_store_cas_conflicts() {
    conformance::cas_conflicts(&FileStore::in_memory()).await;
}

#[tokio::test(start_paused = true)]
async fn file_store_watch_sees_other_writer() {
    let s = Arc::new(FileStore::in_memory());
    conformance::watch_sees_other_client(&*s, &*s).await;
}

#[tokio::test(start_paused = true)]
async fn file_store_lease_expiry() {
    conformance::lease_expiry(&FileStore::in_memory(), TTL).await;
}

#[tokio::test(start_paused = true)]
async fn file_store_election_fails_over() {
    let s: Arc<dyn Store> = Arc::new(FileStore::in_memory());
    conformance::election_fails_over(s.clone(), s, TTL).await;
}

#[tokio::test(start_paused = true)]
async fn file_store_observers_see_who_leads() {
    let s: Arc<dyn Store> = Arc::new(FileStore::in_memory());
    conformance::observers_see_who_leads(s.clone(), s, TTL).await;
}

#[tokio::test(start_paused = true)]
async fn file_store_leadership_lost_with_its_lease() {
    let s: Arc<dyn Store> = Arc::new(FileStore::in_memory());
    conformance::leadership_lost_with_its_lease(s.clone(), s, TTL).await;
}

#[tokio::test(start_paused = true)]
async fn file_store_keeps_documents_across_restarts_but_not_leased_keys() {
    let dir = tempfile::tempdir().unwrap();
    let rev = {
        let s = FileStore::open(dir.path()).unwrap();
        let lease = s.grant(TTL).await.unwrap();
        put_with_lease(&s, "registry/ep", b"e".to_vec(), lease)
            .await
            .unwrap();
        s.put_if("ca/state", b"{}".to_vec(), 0, None).await.unwrap()
    };
    let s = FileStore::open(dir.path()).unwrap();
    assert_eq!(
        s.get("ca/state").await.unwrap(),
        Some((b"{}".to_vec(), rev))
    );
    assert_eq!(s.get("registry/ep").await.unwrap(), None);
    let next = s
        .put_if("ca/state", b"{\"a\":1}".to_vec(), rev, None)
        .await
        .unwrap();
    assert!(next > rev, "revisions keep growing after a restart");
}

#[test]
fn a_broken_state_file_names_itself() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("store.json"), "not json").unwrap();
    let e = FileStore::open(dir.path()).err().unwrap().to_string();
    assert!(e.contains("store.json"), "{e}");
}

#[test]
fn config_defaults_to_file_and_checks_etcd() {
    use crate::server::config::parse;
    let base =
        "listen: 127.0.0.1:8443\nstate_dir: state\nca: {intermediate: ca/int}\nkek_file: kek\n";
    assert_eq!(parse("c.yaml", base).unwrap().store, StoreSettings::File {});
    let file = format!("{base}store: {{file: {{}}}}\n");
    assert_eq!(
        parse("c.yaml", &file).unwrap().store,
        StoreSettings::File {}
    );
    let etcd = format!("{base}store: {{etcd: {{endpoints: [http://127.0.0.1:2379]}}}}\n");
    let StoreSettings::Etcd(e) = parse("c.yaml", &etcd).unwrap().store else {
        panic!("etcd")
    };
    assert_eq!(e.prefix, "/crank");
    assert_eq!(e.request_timeout, Duration::from_secs(5));
    let cases = [
        (
            "{etcd: {endpoints: []}}",
            "store.etcd.endpoints",
            "at least one",
        ),
        (
            "{etcd: {endpoints: [127.0.0.1:2379]}}",
            "store.etcd.endpoints",
            "http://",
        ),
        (
            "{etcd: {endpoints: [https://e:2379]}}",
            "store.etcd.tls",
            "tls.ca",
        ),
        (
            "{etcd: {endpoints: [http://e:2379], prefix: crank}}",
            "store.etcd.prefix",
            "start with /",
        ),
        (
            "{etcd: {endpoints: [http://e:2379], dial_timeout: 0s}}",
            "store.etcd.dial_timeout",
            "100ms",
        ),
        (
            "{etcd: {endpoints: [http://e:2379], tls: {ca: ca.pem, cert: c.pem}}}",
            "store.etcd.tls",
            "together",
        ),
        ("{consul: {}}", "store", "unknown field"),
        (
            "{file: {}, etcd: {endpoints: [http://e:2379]}}",
            "store",
            "exactly one",
        ),
    ];
    let no_kek = "listen: 127.0.0.1:8443\nstate_dir: state\nca: {intermediate: ca/int}\nstore: {etcd: {endpoints: [http://e:2379]}}\n";
    let e = parse("c.yaml", no_kek).unwrap_err().to_string();
    assert!(e.contains("kek_file") && e.contains("head -c 32"), "{e}");
    let short_ttl = format!("{etcd}leader_ttl: 1s\n");
    let e = parse("c.yaml", &short_ttl).unwrap_err().to_string();
    assert!(e.contains("leader_ttl") && e.contains("2s to 60s"), "{e}");
    for (section, field, msg) in cases {
        let e = parse("c.yaml", &format!("{base}store: {section}\n")).unwrap_err();
        assert!(
            e.to_string().contains(field) && e.to_string().contains(msg),
            "{section}: {e}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn file_store_publish_is_monotonic_under_two_contenders() {
    let s: Arc<dyn Store> = Arc::new(FileStore::in_memory());
    conformance::publish_is_monotonic(s.clone(), s).await;
}

#[tokio::test(start_paused = true)]
async fn file_store_guarded_writes_fence() {
    let s: Arc<dyn Store> = Arc::new(FileStore::in_memory());
    conformance::guarded_writes_fence(s.clone(), s, TTL).await;
}

/// A FileStore whose keep-alives fail while `fail` is set; the store still
/// renews the lease (the reply was lost, not the request), so the key can
/// only go when the leader revokes it.
struct LostReplies {
    inner: FileStore,
    fail: std::sync::atomic::AtomicBool,
}

impl Store for LostReplies {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Versioned>>> {
        self.inner.get(key)
    }
    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<Listed>>> {
        self.inner.list(prefix)
    }
    fn put_if<'a>(
        &'a self,
        key: &'a str,
        value: Vec<u8>,
        expected: Rev,
        lease: Option<LeaseId>,
    ) -> BoxFuture<'a, Result<Rev>> {
        self.inner.put_if(key, value, expected, lease)
    }
    fn put_if_guarded<'a>(
        &'a self,
        key: &'a str,
        value: Vec<u8>,
        expected: Rev,
        guard: &'a str,
        guard_rev: Rev,
    ) -> BoxFuture<'a, Result<Rev>> {
        self.inner
            .put_if_guarded(key, value, expected, guard, guard_rev)
    }
    fn delete_if<'a>(&'a self, key: &'a str, expected: Rev) -> BoxFuture<'a, Result<()>> {
        self.inner.delete_if(key, expected)
    }
    fn watch<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<ChangeStream>> {
        self.inner.watch(prefix)
    }
    fn grant(&self, ttl: Duration) -> BoxFuture<'_, Result<LeaseId>> {
        self.inner.grant(ttl)
    }
    fn keep_alive(&self, lease: LeaseId) -> BoxFuture<'_, Result<()>> {
        use futures::FutureExt;
        let fail = self.fail.load(std::sync::atomic::Ordering::SeqCst);
        let renewed = self.inner.keep_alive(lease);
        async move {
            renewed.await?;
            if fail {
                return Err(StoreError::Unavailable("reply lost".into()));
            }
            Ok(())
        }
        .boxed()
    }
    fn revoke(&self, lease: LeaseId) -> BoxFuture<'_, Result<()>> {
        self.inner.revoke(lease)
    }
}

#[tokio::test(start_paused = true)]
async fn a_leader_rides_out_failed_keep_alives_shorter_than_the_ttl_and_revokes_when_it_steps_down()
{
    use std::sync::atomic::Ordering;
    let s = Arc::new(LostReplies {
        inner: FileStore::in_memory(),
        fail: false.into(),
    });
    let mut held = campaign(s.clone(), "flaky", "replica-a", TTL)
        .await
        .unwrap();
    s.fail.store(true, Ordering::SeqCst);
    tokio::time::sleep(TTL / 2).await;
    s.fail.store(false, Ordering::SeqCst);
    tokio::time::sleep(TTL * 2).await;
    assert!(
        held.is_leader(),
        "a short outage must not end the leadership"
    );
    s.fail.store(true, Ordering::SeqCst);
    tokio::time::timeout(TTL * 2, held.lost())
        .await
        .expect("no keep-alive accepted for the ttl: step down");
    // The store itself still renewed the lease: only the revoke on
    // stepping down frees the key for the next leader.
    let free = tokio::time::timeout(TTL / 4, async {
        while leader(&*s, "flaky").await.unwrap().is_some() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(free.is_ok(), "the key goes when the leader steps down");
}
