//! The registry on etcd (`store: etcd`): two replicas, each with its own
//! etcd client and watched cache, over one etcd member. The same behaviour
//! bodies the memory and file-store registries pass in the unit tests
//! (control-plane/src/registry/conformance.rs): a registration made on
//! replica A is served by replica B, heartbeats through B keep A's
//! registration alive, and once they stop the endpoint leaves both after
//! its lease.

use std::sync::Arc;
use std::time::Duration;

use crank_control::registry::{conformance, StoreRegistry};
use crank_control::store::{EtcdSettings, EtcdStore, Store};
use crank_tests::etcd::EtcdCluster;

async fn replica(cluster: &EtcdCluster) -> StoreRegistry {
    let settings = EtcdSettings {
        endpoints: cluster.endpoints(),
        prefix: "/crank".into(),
        tls: None,
        dial_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_secs(5),
    };
    let store: Arc<dyn Store> = Arc::new(EtcdStore::connect(&settings).await.unwrap());
    StoreRegistry::start(store).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_the_registry_on_etcd() {
    let etcd = EtcdCluster::start(1);
    let a = replica(&etcd).await;
    let b = replica(&etcd).await;
    conformance::served_by_every_replica(&a, &b).await;
    conformance::deregister_and_replace(&a, &b).await;
    conformance::expiry_leaves_every_replica(&a, &b).await;
    // A replica that starts now lists what is there.
    let lease = crank_control::registry::Registry::register(
        &a,
        conformance::reg("10.0.0.7:8443"),
        conformance::LEASE * 5,
        conformance::now(),
    )
    .await
    .unwrap();
    let c = replica(&etcd).await;
    let snap = crank_control::registry::Registry::snapshot(&c, conformance::now());
    assert_eq!(snap.entries.len(), 1, "{snap:?}");
    assert_eq!(snap.entries[0].lease, lease);
}
