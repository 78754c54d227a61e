//! crank-control's store on a real etcd (Debian's etcd-server): the same
//! behaviour bodies the file store passes in the unit tests
//! (control-plane/src/store/conformance.rs), run against one etcd member and
//! against a three-member cluster that loses a member.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crank_control::store::{conformance, EtcdSettings, EtcdStore, Store, StoreError};
use crank_tests::etcd::EtcdCluster;

/// etcd's shortest lease is about two seconds with its default timings.
const TTL: Duration = Duration::from_secs(2);

fn settings(endpoints: Vec<String>, prefix: &str) -> EtcdSettings {
    EtcdSettings {
        endpoints,
        prefix: prefix.into(),
        tls: None,
        dial_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_secs(5),
    }
}

async fn client(cluster: &EtcdCluster, prefix: &str) -> Arc<dyn Store> {
    Arc::new(
        EtcdStore::connect(&settings(cluster.endpoints(), prefix))
            .await
            .unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_store_behaves_like_the_file_store() {
    let etcd = EtcdCluster::start(1);
    let a = client(&etcd, "/crank").await;
    let b = client(&etcd, "/crank").await;
    conformance::cas_conflicts(&*a).await;
    conformance::publish_is_monotonic(a.clone(), b.clone()).await;
    conformance::watch_sees_other_client(&*a, &*b).await;
    conformance::lease_expiry(&*a, TTL).await;
    conformance::observers_see_who_leads(a.clone(), b.clone(), TTL).await;
    conformance::leadership_lost_with_its_lease(a.clone(), b.clone(), TTL).await;
    conformance::guarded_writes_fence(a.clone(), b.clone(), TTL).await;
    let started = Instant::now();
    conformance::election_fails_over(a, b, TTL).await;
    eprintln!("election failover body took {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefixes_keep_meshes_apart() {
    let etcd = EtcdCluster::start(1);
    let one = client(&etcd, "/mesh-one").await;
    let two = client(&etcd, "/mesh-two").await;
    one.put_if("ca/state", b"one".to_vec(), 0, None)
        .await
        .unwrap();
    assert_eq!(two.get("ca/state").await.unwrap(), None);
    let rev = two
        .put_if("ca/state", b"two".to_vec(), 0, None)
        .await
        .unwrap();
    assert_eq!(
        two.get("ca/state").await.unwrap(),
        Some((b"two".to_vec(), rev))
    );
    assert_eq!(one.list("").await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_member_cluster_survives_losing_a_member() {
    let mut etcd = EtcdCluster::start(3);
    let store = client(&etcd, "/crank").await;
    let rev = store
        .put_if("mesh/version", b"1".to_vec(), 0, None)
        .await
        .unwrap();
    etcd.members[0].kill();
    // The client moves to a live member; a write may fail once while it does.
    let deadline = Instant::now() + Duration::from_secs(15);
    let next = loop {
        match store.put_if("mesh/version", b"2".to_vec(), rev, None).await {
            Ok(r) => break r,
            Err(StoreError::Unavailable(e)) if Instant::now() < deadline => {
                eprintln!("retrying after: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("no write after losing one member of three: {e}"),
        }
    };
    assert!(next > rev);
    assert_eq!(
        store.get("mesh/version").await.unwrap(),
        Some((b"2".to_vec(), next))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_etcd_is_named_with_the_fix() {
    let port = crank_tests::free_port();
    let mut s = settings(vec![format!("http://127.0.0.1:{port}")], "/crank");
    s.dial_timeout = Duration::from_millis(500);
    s.request_timeout = Duration::from_secs(1);
    let started = Instant::now();
    let e = EtcdStore::connect(&s)
        .await
        .err()
        .expect("nothing listens there")
        .to_string();
    assert!(
        e.contains(&format!("127.0.0.1:{port}")) || e.contains("etcd"),
        "{e}"
    );
    assert!(e.contains("check the endpoints"), "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}
