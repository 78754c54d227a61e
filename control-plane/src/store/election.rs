//! Leader election on any [`Store`]: the leader is whoever holds the key
//! `elections/<name>`, written with compare-and-swap ("only if absent") under
//! a lease the leader keeps alive. When the leader resigns the key is
//! deleted; when it dies its lease expires and the key goes away; either
//! way a waiting contender's watch sees the delete and it tries again.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use futures::StreamExt;
use tokio::sync::watch;

use super::{Change, LeaseId, Result, Rev, Store, StoreError};

/// Held while this contender leads. Dropping it stops the keep-alive (the
/// lease then expires after its ttl, as when the process dies); [`resign`]
/// hands over at once.
///
/// [`resign`]: Leadership::resign
pub struct Leadership {
    store: Arc<dyn Store>,
    key: String,
    rev: Rev,
    lease: LeaseId,
    leading: watch::Receiver<bool>,
    keeper: tokio::task::JoinHandle<()>,
}

fn key_of(election: &str) -> String {
    format!("elections/{election}")
}

/// Waits until `id` leads `election`. `ttl` bounds how long a dead leader
/// keeps the role.
pub async fn campaign(
    store: Arc<dyn Store>,
    election: &str,
    id: &str,
    ttl: Duration,
) -> Result<Leadership> {
    let key = key_of(election);
    let lease = store.grant(ttl).await?;
    let (tx, leading) = watch::channel(true);
    // Keep the lease alive while campaigning too, so a long wait does not expire it.
    let keeper = tokio::spawn(keep(store.clone(), lease, ttl, tx));
    let rev = loop {
        // The watch is in place before the attempt, so a delete after a
        // lost attempt is never missed.
        let mut changes = store.watch(&key).await?;
        match store
            .put_if(&key, id.as_bytes().to_vec(), 0, Some(lease))
            .await
        {
            Ok(rev) => break rev,
            Err(StoreError::Conflict { .. }) => {}
            Err(e) => {
                keeper.abort();
                let _ = store.revoke(lease).await;
                return Err(e);
            }
        }
        // Wait for the holder to go, re-checking now and then in case the
        // watch broke.
        let gone = async {
            while let Some(c) = changes.next().await {
                if matches!(&c, Change::Delete { key: k, .. } if *k == key) {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(ttl, gone).await;
    };
    Ok(Leadership {
        store,
        key,
        rev,
        lease,
        leading,
        keeper,
    })
}

/// Keeps `lease` alive every third of `ttl`, retrying a failed keep-alive
/// until the lease's deadline (a store that answers again in time keeps
/// the role); once the time since the last keep-alive the store accepted
/// reaches `ttl`, or the store says the lease is gone, steps down and
/// revokes the lease, so the key goes now and the next leader need not
/// wait a full ttl.
async fn keep(store: Arc<dyn Store>, lease: LeaseId, ttl: Duration, tx: watch::Sender<bool>) {
    let every = (ttl / 3).max(Duration::from_millis(100));
    let retry = (ttl / 10).max(Duration::from_millis(50));
    let mut last_ok = Instant::now();
    let mut wait = every;
    loop {
        tokio::time::sleep(wait.min(ttl.saturating_sub(last_ok.elapsed()))).await;
        let left = ttl.saturating_sub(last_ok.elapsed());
        if left.is_zero() {
            tracing::error!(
                lease = lease.0,
                "no keep-alive accepted for the whole ttl; stepping down"
            );
            break;
        }
        let sent = Instant::now();
        match tokio::time::timeout(left, store.keep_alive(lease)).await {
            Ok(Ok(())) => {
                last_ok = sent;
                wait = every;
            }
            Ok(Err(StoreError::LeaseGone(_))) => {
                tracing::error!(
                    lease = lease.0,
                    "the store ended the leadership lease; stepping down"
                );
                break;
            }
            Ok(Err(e)) => {
                tracing::warn!(lease = lease.0, error = %e, "keep-alive failed; retrying until the lease's deadline");
                wait = retry;
            }
            Err(_) => wait = Duration::ZERO,
        }
    }
    let _ = tx.send(false);
    let _ = tokio::time::timeout(ttl, store.revoke(lease)).await;
}

/// Who leads `election` now, if anyone.
pub async fn leader(store: &dyn Store, election: &str) -> Result<Option<String>> {
    let found = store.get(&key_of(election)).await?;
    Ok(found.map(|(v, _)| String::from_utf8_lossy(&v).into_owned()))
}

/// Who leads `election`: the current leader first, then every change
/// (`None` while nobody leads). Ends when the store's watch ends.
pub async fn observe(
    store: &dyn Store,
    election: &str,
) -> Result<futures::stream::BoxStream<'static, Option<String>>> {
    let key = key_of(election);
    let changes = store.watch(&key).await?;
    let now = leader(store, election).await?;
    let rest = changes.filter_map(move |c| {
        futures::future::ready(match c {
            Change::Put { key: k, value, .. } if k == key => {
                Some(Some(String::from_utf8_lossy(&value).into_owned()))
            }
            Change::Delete { key: k, .. } if k == key => Some(None),
            _ => None,
        })
    });
    Ok(futures::stream::once(futures::future::ready(now))
        .chain(rest)
        .boxed())
}

impl Leadership {
    /// False once the lease could not be kept alive (the store was
    /// unreachable for longer than the ttl): stop acting as leader.
    pub fn is_leader(&self) -> bool {
        *self.leading.borrow()
    }

    /// The election key and the revision this leader wrote it at: the
    /// guard of [`Store::put_if_guarded`] that fences a deposed leader.
    pub fn fence(&self) -> (&str, Rev) {
        (&self.key, self.rev)
    }

    /// The lease that holds the role.
    pub fn lease(&self) -> LeaseId {
        self.lease
    }

    /// Resolves when leadership is lost.
    pub async fn lost(&mut self) {
        let _ = self.leading.wait_for(|l| !*l).await;
    }

    /// Gives up the role now; the next contender leads without waiting for the ttl.
    pub async fn resign(self) -> Result<()> {
        self.keeper.abort();
        let deleted = self.store.delete_if(&self.key, self.rev).await;
        self.store.revoke(self.lease).await?;
        match deleted {
            Ok(()) | Err(StoreError::Conflict { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

impl Drop for Leadership {
    fn drop(&mut self) {
        self.keeper.abort();
    }
}
