//! The etcd store (etcd v3 API through the `etcd-client` crate): keys live
//! under the configured prefix; revisions are etcd's mod revisions;
//! compare-and-swap is a transaction; leases and watches are etcd's own.

use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    PutOptions, TlsOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};

use super::{
    Change, ChangeStream, EtcdSettings, LeaseId, Listed, Result, Rev, Store, StoreError, Versioned,
};

pub struct EtcdStore {
    client: Client,
    /// The configured prefix with a trailing `/`.
    prefix: String,
    request_timeout: Duration,
}

fn unavailable(e: etcd_client::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// A refused connection: the request never reached a member, so it is safe
/// to send again (the balanced channel moves to a live member).
fn never_sent(e: &etcd_client::Error) -> bool {
    let m = e.to_string();
    m.contains("tcp connect error") || m.contains("Connection refused")
}

impl EtcdStore {
    /// Connects to the cluster (fails after `dial_timeout` if no member answers).
    pub async fn connect(s: &EtcdSettings) -> anyhow::Result<EtcdStore> {
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(s.dial_timeout)
            .with_timeout(s.request_timeout)
            .with_keep_alive(Duration::from_secs(5), s.request_timeout);
        if let Some(t) = &s.tls {
            let read = |p: &std::path::Path| {
                std::fs::read(p).map_err(|e| {
                    anyhow::anyhow!("store.etcd.tls: cannot read {}: {e}", p.display())
                })
            };
            let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(read(&t.ca)?));
            if let (Some(cert), Some(key)) = (&t.cert, &t.key) {
                tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            opts = opts.with_tls(tls);
        }
        let client = Client::connect(&s.endpoints, Some(opts)).await.map_err(|e| {
            anyhow::anyhow!("store.etcd: cannot reach etcd at {}: {e}; check the endpoints and that etcd runs", s.endpoints.join(", "))
        })?;
        let store = EtcdStore {
            client,
            prefix: format!("{}/", s.prefix.trim_end_matches('/')),
            request_timeout: s.request_timeout,
        };
        // Dialing is lazy: one read proves a member answers.
        store.get("").await.map_err(|e| {
            anyhow::anyhow!("store.etcd: {e}; check the endpoints, TLS and that etcd runs")
        })?;
        Ok(store)
    }

    /// Runs `op` on the client, again while the member it reached refused
    /// the connection, for at most `request_timeout`.
    async fn call<T, F, Fut>(&self, mut op: F) -> std::result::Result<T, etcd_client::Error>
    where
        F: FnMut(Client) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        let deadline = tokio::time::Instant::now() + self.request_timeout;
        loop {
            match op(self.client.clone()).await {
                Err(e) if never_sent(&e) && tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                r => return r,
            }
        }
    }

    fn full(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    fn relative(&self, key: &[u8]) -> String {
        let key = String::from_utf8_lossy(key);
        key.strip_prefix(&self.prefix).unwrap_or(&key).to_string()
    }

    /// The revision `key` has in the `or_else` branch of a lost transaction.
    /// A transaction that runs `op` only while `full` is at `expected`
    /// (0: absent), and otherwise reads it back for the conflict.
    fn guarded(full: String, expected: Rev, op: TxnOp) -> Txn {
        Txn::new()
            .when([Compare::mod_revision(
                full.clone(),
                CompareOp::Equal,
                expected,
            )])
            .and_then([op])
            .or_else([TxnOp::get(full, None)])
    }

    /// The conflict a failed guarded transaction reports.
    fn conflict(key: &str, expected: Rev, responses: Vec<TxnOpResponse>) -> StoreError {
        StoreError::Conflict {
            key: key.to_string(),
            expected,
            actual: Self::actual_rev(responses),
        }
    }

    fn actual_rev(responses: Vec<TxnOpResponse>) -> Rev {
        responses
            .into_iter()
            .find_map(|r| match r {
                TxnOpResponse::Get(g) => Some(g.kvs().first().map_or(0, |kv| kv.mod_revision())),
                _ => None,
            })
            .unwrap_or(0)
    }
}

impl Store for EtcdStore {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Versioned>>> {
        async move {
            let k = self.full(key);
            let resp = self
                .call(|mut c| {
                    let k = k.clone();
                    async move { c.get(k, None).await }
                })
                .await
                .map_err(unavailable)?;
            Ok(resp
                .kvs()
                .first()
                .map(|kv| (kv.value().to_vec(), kv.mod_revision())))
        }
        .boxed()
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<Listed>>> {
        async move {
            let opts = GetOptions::new().with_prefix();
            let k = self.full(prefix);
            let resp = self
                .call(|mut c| {
                    let (k, opts) = (k.clone(), opts.clone());
                    async move { c.get(k, Some(opts)).await }
                })
                .await
                .map_err(unavailable)?;
            Ok(resp
                .kvs()
                .iter()
                .map(|kv| {
                    (
                        self.relative(kv.key()),
                        kv.value().to_vec(),
                        kv.mod_revision(),
                    )
                })
                .collect())
        }
        .boxed()
    }

    fn put_if<'a>(
        &'a self,
        key: &'a str,
        value: Vec<u8>,
        expected: Rev,
        lease: Option<LeaseId>,
    ) -> BoxFuture<'a, Result<Rev>> {
        async move {
            let full = self.full(key);
            let opts = lease.map(|l| PutOptions::new().with_lease(l.0));
            let txn = Self::guarded(full.clone(), expected, TxnOp::put(full, value, opts));
            let resp = self
                .call(|mut c| {
                    let txn = txn.clone();
                    async move { c.txn(txn).await }
                })
                .await
                .map_err(|e| match lease {
                    Some(l) if e.to_string().contains("lease not found") => {
                        StoreError::LeaseGone(l.0)
                    }
                    _ => unavailable(e),
                })?;
            if resp.succeeded() {
                Ok(resp.header().map_or(0, |h| h.revision()))
            } else {
                Err(Self::conflict(key, expected, resp.op_responses()))
            }
        }
        .boxed()
    }

    fn put_if_guarded<'a>(
        &'a self,
        key: &'a str,
        value: Vec<u8>,
        expected: Rev,
        guard: &'a str,
        guard_rev: Rev,
    ) -> BoxFuture<'a, Result<Rev>> {
        async move {
            let (full, full_guard) = (self.full(key), self.full(guard));
            let txn = Txn::new()
                .when([
                    Compare::mod_revision(full.clone(), CompareOp::Equal, expected),
                    Compare::mod_revision(full_guard.clone(), CompareOp::Equal, guard_rev),
                ])
                .and_then([TxnOp::put(full.clone(), value, None)])
                .or_else([TxnOp::get(full, None), TxnOp::get(full_guard, None)]);
            let resp = self
                .call(|mut c| {
                    let txn = txn.clone();
                    async move { c.txn(txn).await }
                })
                .await
                .map_err(unavailable)?;
            if resp.succeeded() {
                return Ok(resp.header().map_or(0, |h| h.revision()));
            }
            let revs: Vec<Rev> = resp
                .op_responses()
                .into_iter()
                .filter_map(|r| match r {
                    TxnOpResponse::Get(g) => {
                        Some(g.kvs().first().map_or(0, |kv| kv.mod_revision()))
                    }
                    _ => None,
                })
                .collect();
            let (actual, actual_guard) = (
                revs.first().copied().unwrap_or(0),
                revs.get(1).copied().unwrap_or(0),
            );
            Err(if actual_guard != guard_rev {
                StoreError::Conflict {
                    key: guard.to_string(),
                    expected: guard_rev,
                    actual: actual_guard,
                }
            } else {
                StoreError::Conflict {
                    key: key.to_string(),
                    expected,
                    actual,
                }
            })
        }
        .boxed()
    }

    fn delete_if<'a>(&'a self, key: &'a str, expected: Rev) -> BoxFuture<'a, Result<()>> {
        async move {
            let full = self.full(key);
            let txn = Self::guarded(full.clone(), expected, TxnOp::delete(full, None));
            let resp = self
                .call(|mut c| {
                    let txn = txn.clone();
                    async move { c.txn(txn).await }
                })
                .await
                .map_err(unavailable)?;
            if resp.succeeded() && expected != 0 {
                Ok(())
            } else {
                Err(Self::conflict(key, expected, resp.op_responses()))
            }
        }
        .boxed()
    }

    fn watch<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<ChangeStream>> {
        async move {
            let opts = WatchOptions::new().with_prefix();
            let k = self.full(prefix);
            let (watcher, stream) = self
                .call(|mut c| {
                    let (k, opts) = (k.clone(), opts.clone());
                    async move { c.watch(k, Some(opts)).await }
                })
                .await
                .map_err(unavailable)?;
            let strip = self.prefix.clone();
            let events = futures::stream::unfold((watcher, stream), |(w, mut s)| async move {
                match s.message().await {
                    Ok(Some(resp)) if !resp.canceled() => Some((resp.events().to_vec(), (w, s))),
                    _ => None,
                }
            });
            let changes = events.flat_map(move |evs| {
                let out: Vec<Change> = evs.iter().filter_map(|ev| to_change(ev, &strip)).collect();
                futures::stream::iter(out)
            });
            Ok(changes.boxed())
        }
        .boxed()
    }

    fn grant(&self, ttl: Duration) -> BoxFuture<'_, Result<LeaseId>> {
        async move {
            // etcd counts whole seconds; round up so a key never outlives its holder by less than asked.
            let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
            let resp = self
                .call(|mut c| async move { c.lease_grant(secs.max(1) as i64, None).await })
                .await
                .map_err(unavailable)?;
            Ok(LeaseId(resp.id()))
        }
        .boxed()
    }

    fn keep_alive(&self, lease: LeaseId) -> BoxFuture<'_, Result<()>> {
        async move {
            let gone = |e: etcd_client::Error| {
                if e.to_string().contains("lease not found") {
                    StoreError::LeaseGone(lease.0)
                } else {
                    unavailable(e)
                }
            };
            // Bounded: a member that takes the request and never answers
            // must not hold the caller past its lease's deadline.
            let reply = tokio::time::timeout(self.request_timeout, async {
                let (mut keeper, mut stream) = self
                    .call(|mut c| async move { c.lease_keep_alive(lease.0).await })
                    .await
                    .map_err(gone)?;
                keeper.keep_alive().await.map_err(gone)?;
                stream.message().await.map_err(gone)
            })
            .await
            .map_err(|_| {
                StoreError::Unavailable(format!(
                    "no keep-alive reply for lease {:x} within {:?}",
                    lease.0, self.request_timeout
                ))
            })??;
            match reply {
                Some(r) if r.ttl() > 0 => Ok(()),
                _ => Err(StoreError::LeaseGone(lease.0)),
            }
        }
        .boxed()
    }

    fn revoke(&self, lease: LeaseId) -> BoxFuture<'_, Result<()>> {
        async move {
            match self
                .call(|mut c| async move { c.lease_revoke(lease.0).await })
                .await
            {
                Ok(_) => Ok(()),
                Err(e) if e.to_string().contains("lease not found") => Ok(()),
                Err(e) => Err(unavailable(e)),
            }
        }
        .boxed()
    }
}

fn to_change(ev: &etcd_client::Event, prefix: &str) -> Option<Change> {
    let kv = ev.kv()?;
    let key = String::from_utf8_lossy(kv.key());
    let key = key.strip_prefix(prefix).unwrap_or(&key).to_string();
    Some(match ev.event_type() {
        EventType::Put => Change::Put {
            key,
            value: kv.value().to_vec(),
            rev: kv.mod_revision(),
        },
        EventType::Delete => Change::Delete {
            key,
            rev: kv.mod_revision(),
        },
    })
}
