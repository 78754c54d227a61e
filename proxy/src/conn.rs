//! Counts open downstream connections for `crank_open_connections`.
//!
//! Pingora hands each accepted connection to `ServerApp::process_new` and
//! calls it again while the connection is kept alive. [`Counted`] runs that
//! keep-alive loop itself, so one guard spans the connection's whole life.

use std::sync::Arc;

use async_trait::async_trait;
use pingora_core::apps::ServerApp;
use pingora_core::protocols::Stream;
use pingora_core::server::ShutdownWatch;
use prometheus::IntGauge;

pub struct Counted<A> {
    inner: Arc<A>,
    gauge: IntGauge,
}

impl<A> Counted<A> {
    pub fn new(inner: A, gauge: IntGauge) -> Self {
        Counted {
            inner: Arc::new(inner),
            gauge,
        }
    }
}

struct Open(IntGauge);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for Counted<A> {
    async fn process_new(
        self: &Arc<Self>,
        session: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        self.gauge.inc();
        let _open = Open(self.gauge.clone());
        let mut next = self.inner.process_new(session, shutdown).await;
        while let Some(stream) = next {
            next = self.inner.process_new(stream, shutdown).await;
        }
        None
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await
    }
}
