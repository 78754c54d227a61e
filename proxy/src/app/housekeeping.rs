//! The `crank-resilience` thread: drops idle quota buckets and expired
//! idempotency entries every 10 s. It gets the quotas, the store and the
//! gauge it sets, nothing else.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus::IntGauge;

use crate::resilience::idempotency::IdempotencyStore;
use crate::resilience::quota::QuotaSet;

pub fn spawn(
    quotas: Arc<ArcSwap<QuotaSet>>,
    idempotency: Option<Arc<dyn IdempotencyStore>>,
    keys_gauge: IntGauge,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("crank-resilience".into())
        .spawn(move || loop {
            std::thread::sleep(Duration::from_secs(10));
            sweep(&quotas.load(), idempotency.as_deref(), &keys_gauge);
        })?;
    Ok(())
}

/// One round of housekeeping.
fn sweep(q: &QuotaSet, idempotency: Option<&dyn IdempotencyStore>, keys_gauge: &IntGauge) {
    q.inbound.evict_idle();
    q.outbound.evict_idle();
    if let Some(store) = idempotency {
        store.sweep();
        keys_gauge.set(store.stats().entries as i64);
    }
}
