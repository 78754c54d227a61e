//! Span export over OTLP (HTTP/protobuf or gRPC), off the request path.
//!
//! Request threads hand finished spans to a queue bounded by
//! `max_queue_size`, whose memory is taken as spans arrive, not up front;
//! one exporter thread batches them (by size, or after `scheduled_delay`)
//! and sends each batch with `opentelemetry-otlp`'s exporter (a hyper
//! client, or a tonic channel for gRPC) on its own current-thread runtime. When the collector is slow or
//! gone the queue fills and new spans are dropped and counted
//! (`crank_spans_dropped_total{reason="queue_full"}`); a batch that fails to
//! send is counted as `export_failed`. A request never waits on export.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crank_api::proxy::{OtlpProtocol, TracingConfig};
use opentelemetry::KeyValue;
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig, WithTonicConfig};
use opentelemetry_sdk::trace::{SpanData, SpanExporter as _};
use opentelemetry_sdk::Resource;
use prometheus::{IntCounter, IntCounterVec};

/// The request side of the queue.
#[derive(Clone)]
pub struct SpanSink {
    tx: Sender<SpanData>,
    dropped_full: IntCounter,
    /// Spans queued and not yet taken by the exporter.
    pending: Arc<AtomicUsize>,
    /// The bound on `pending` (`max_queue_size`). An unbounded channel with
    /// this check, because a bounded one reserves every slot at start: 4,096
    /// spans took 1.5 MiB of every process with tracing on (issue #19).
    capacity: usize,
    /// At this many pending spans the exporter is woken.
    batch: usize,
    /// The exporter thread, once started.
    worker: Arc<OnceLock<std::thread::Thread>>,
}

impl SpanSink {
    /// Queues a span, or drops and counts it when the queue is full. Wakes
    /// the exporter only when a batch is complete.
    pub fn offer(&self, span: SpanData) {
        // Counted before the send, so that `pending` never falls below what
        // the channel holds when the exporter takes a span and subtracts.
        let queued = self.pending.fetch_add(1, Ordering::AcqRel).wrapping_add(1);
        if queued > self.capacity || self.tx.send(span).is_err() {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            self.dropped_full.inc();
            return;
        }
        if queued == self.batch {
            if let Some(t) = self.worker.get() {
                t.unpark();
            }
        }
    }

    /// A sink whose spans a test reads from the returned receiver.
    pub fn for_test(capacity: usize) -> (SpanSink, Receiver<SpanData>) {
        let (tx, rx) = mpsc::channel();
        let dropped = IntCounter::new("test_dropped", "test").expect("valid counter");
        (
            SpanSink {
                tx,
                dropped_full: dropped,
                pending: Arc::default(),
                capacity,
                batch: capacity,
                worker: Arc::default(),
            },
            rx,
        )
    }
}

/// Export counters (registered in [`crate::metrics::Metrics`]).
#[derive(Clone)]
pub struct ExportMetrics {
    pub exported: IntCounter,
    pub dropped: IntCounterVec,
}

/// What the exporter thread needs to know to flush before the process exits.
struct Control {
    flush: AtomicBool,
    done: Mutex<Option<mpsc::Sender<()>>>,
    worker: Arc<OnceLock<std::thread::Thread>>,
}

static CONTROL: OnceLock<Arc<Control>> = OnceLock::new();

/// Longest the exporter thread sleeps between checks for a flush request.
const POLL: Duration = Duration::from_millis(100);

/// The resource every span carries: `OTEL_RESOURCE_ATTRIBUTES`, then the
/// workload's identity and the config's attributes, and `service.name` from
/// (first found) `tracing.service_name`, `OTEL_SERVICE_NAME`, `service.name`
/// in `OTEL_RESOURCE_ATTRIBUTES`, the service part of this identity.
pub fn resource(cfg: &TracingConfig, identity: &crank_certs::Identity) -> Resource {
    let env_attr_name = std::env::var("OTEL_RESOURCE_ATTRIBUTES")
        .ok()
        .and_then(|attrs| {
            attrs.split(',').find_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                (k.trim() == "service.name" && !v.trim().is_empty()).then(|| v.trim().to_string())
            })
        });
    let service_name = cfg
        .service_name
        .clone()
        .or_else(|| {
            std::env::var("OTEL_SERVICE_NAME")
                .ok()
                .filter(|v| !v.trim().is_empty())
        })
        .or(env_attr_name)
        .unwrap_or_else(|| identity.service.clone());
    Resource::builder()
        .with_attributes([
            KeyValue::new("service.namespace", identity.tenant.clone()),
            KeyValue::new("crank.identity", identity.spiffe_id()),
            KeyValue::new("crank.trust_domain", identity.trust_domain.clone()),
            KeyValue::new("crank.proxy.version", env!("CARGO_PKG_VERSION")),
        ])
        .with_attributes(
            cfg.resource
                .iter()
                .map(|(k, v)| KeyValue::new(k.clone(), v.clone())),
        )
        .with_service_name(service_name)
        .build()
}

/// The export deadline: the config's, else `OTEL_EXPORTER_OTLP_TRACES_TIMEOUT`
/// or `OTEL_EXPORTER_OTLP_TIMEOUT` (milliseconds), else 10 s.
fn export_timeout(cfg: &TracingConfig) -> Duration {
    cfg.otlp.timeout.unwrap_or_else(|| {
        [
            "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
            "OTEL_EXPORTER_OTLP_TIMEOUT",
        ]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.trim().parse::<u64>().ok())
        .map_or(Duration::from_secs(10), Duration::from_millis)
    })
}

/// The protocol in force: the config's, else the OTLP variables', else
/// `http/protobuf`.
pub fn protocol(cfg: &TracingConfig) -> anyhow::Result<OtlpProtocol> {
    if let Some(p) = cfg.otlp.protocol {
        return Ok(p);
    }
    for var in [
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ] {
        if let Ok(v) = std::env::var(var) {
            return match v.trim() {
                "grpc" => Ok(OtlpProtocol::Grpc),
                "http/protobuf" => Ok(OtlpProtocol::HttpProtobuf),
                other => Err(anyhow::anyhow!(
                    "{var}={other:?} is not supported; use grpc or http/protobuf"
                )),
            };
        }
    }
    Ok(OtlpProtocol::HttpProtobuf)
}

/// Refuses an `https://` collector from the OTLP variables (the config's
/// endpoint is checked with the rest of the config): the exporter speaks
/// plain HTTP; TLS to a remote collector goes through a local one.
fn check_env_endpoint(cfg: &TracingConfig) -> anyhow::Result<()> {
    if cfg.otlp.endpoint.is_some() {
        return Ok(());
    }
    for var in [
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ] {
        if let Ok(v) = std::env::var(var) {
            if !v.trim().starts_with("http://") {
                return Err(anyhow::anyhow!(
                    "{var}={v:?}: only plain http:// collector endpoints are supported; run an OpenTelemetry Collector on loopback to forward over TLS"
                ));
            }
            return Ok(());
        }
    }
    Ok(())
}

fn build_exporter(
    cfg: &TracingConfig,
    protocol: OtlpProtocol,
) -> anyhow::Result<opentelemetry_otlp::SpanExporter> {
    let timeout = export_timeout(cfg);
    let built = match protocol {
        OtlpProtocol::HttpProtobuf => {
            let mut b = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_http_client(
                    opentelemetry_http::hyper::HyperClient::with_default_connector(timeout, None),
                );
            if let Some(ep) = &cfg.otlp.endpoint {
                b = b.with_endpoint(ep.clone());
            }
            b = b.with_timeout(timeout);
            if !cfg.otlp.headers.is_empty() {
                let headers: HashMap<String, String> = cfg
                    .otlp
                    .headers
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                b = b.with_headers(headers);
            }
            b.build()
        }
        OtlpProtocol::Grpc => {
            let mut b = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_protocol(opentelemetry_otlp::Protocol::Grpc);
            if let Some(ep) = &cfg.otlp.endpoint {
                b = b.with_endpoint(ep.clone());
            }
            b = b.with_timeout(timeout);
            let mut md = tonic::metadata::MetadataMap::new();
            for (k, v) in &cfg.otlp.headers {
                let key =
                    tonic::metadata::MetadataKey::from_bytes(k.to_ascii_lowercase().as_bytes())
                        .map_err(|_| {
                            anyhow::anyhow!(
                                "tracing.otlp.headers.{k}: not a valid gRPC metadata name"
                            )
                        })?;
                let val = v.parse().map_err(|_| {
                    anyhow::anyhow!("tracing.otlp.headers.{k}: not a valid gRPC metadata value")
                })?;
                md.insert(key, val);
            }
            b.with_metadata(md).build()
        }
    };
    built.map_err(|e| {
        anyhow::anyhow!(
            "tracing.otlp: cannot build the OTLP exporter: {e}; check tracing.otlp and the OTEL_EXPORTER_OTLP_* variables"
        )
    })
}

/// Builds the OTLP exporter and starts the exporter thread. Errors name the
/// config field or environment variable at fault.
pub fn start(
    cfg: &TracingConfig,
    resource: Resource,
    metrics: ExportMetrics,
) -> anyhow::Result<SpanSink> {
    let protocol = protocol(cfg)?;
    check_env_endpoint(cfg)?;
    let (tx, rx) = mpsc::channel();
    let worker: Arc<OnceLock<std::thread::Thread>> = Arc::default();
    let control = Arc::new(Control {
        flush: AtomicBool::new(false),
        done: Mutex::new(None),
        worker: worker.clone(),
    });
    let _ = CONTROL.set(control.clone());
    let batch = cfg.max_export_batch_size;
    let delay = cfg.scheduled_delay;
    let pending: Arc<AtomicUsize> = Arc::default();
    let sink = SpanSink {
        tx,
        dropped_full: metrics.dropped.with_label_values(&["queue_full"]),
        pending: pending.clone(),
        capacity: cfg.max_queue_size,
        batch,
        worker: worker.clone(),
    };
    // The exporter is built on the thread's own runtime (the gRPC channel
    // needs one); whether that worked comes back before `start` returns.
    let (ready_tx, ready_rx) = mpsc::channel::<anyhow::Result<()>>();
    let cfg = cfg.clone();
    std::thread::Builder::new()
        .name("crank-otlp".into())
        .spawn(move || {
            let _ = worker.set(std::thread::current());
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(anyhow::anyhow!(
                        "tracing: cannot start the exporter runtime: {e}"
                    )));
                    return;
                }
            };
            let exporter = {
                let _guard = rt.enter();
                build_exporter(&cfg, protocol)
            };
            let mut exporter = match exporter {
                Ok(e) => e,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            exporter.set_resource(&resource);
            let _ = ready_tx.send(Ok(()));
            let mut w = Worker {
                exporter,
                metrics,
                last_warn: None,
            };
            w.run(&rt, rx, &pending, &control, batch, delay);
        })?;
    ready_rx
        .recv()
        .map_err(|_| anyhow::anyhow!("tracing: the exporter thread stopped while starting"))??;
    Ok(sink)
}

struct Worker {
    exporter: opentelemetry_otlp::SpanExporter,
    metrics: ExportMetrics,
    last_warn: Option<Instant>,
}

impl Worker {
    /// Sleeps until a batch is full (the request side wakes it), the
    /// scheduled delay passes, or a flush is asked for; then drains the
    /// queue. A span does not wake the thread by itself: waking it per span
    /// cost more than encoding and sending (measured, docs/benchmarks.md).
    fn run(
        &mut self,
        rt: &tokio::runtime::Runtime,
        rx: Receiver<SpanData>,
        pending: &AtomicUsize,
        control: &Control,
        max_batch: usize,
        delay: Duration,
    ) {
        let mut due = Instant::now() + delay;
        loop {
            let flush = control.flush.load(Ordering::Acquire);
            let now = Instant::now();
            if flush || now >= due || pending.load(Ordering::Acquire) >= max_batch {
                // Drain in batches; stop at a partial one unless it is due.
                loop {
                    let mut batch: Vec<SpanData> = Vec::with_capacity(max_batch);
                    let mut closed = false;
                    while batch.len() < max_batch {
                        match rx.try_recv() {
                            Ok(span) => batch.push(span),
                            Err(TryRecvError::Empty) => break,
                            Err(TryRecvError::Disconnected) => {
                                closed = true;
                                break;
                            }
                        }
                    }
                    pending.fetch_sub(batch.len(), Ordering::AcqRel);
                    let full = batch.len() == max_batch;
                    if !batch.is_empty() {
                        self.send(rt, batch);
                    }
                    if closed {
                        return;
                    }
                    if !full {
                        break;
                    }
                }
                due = Instant::now() + delay;
                if flush {
                    control.flush.store(false, Ordering::Release);
                    if let Some(done) = control
                        .done
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .take()
                    {
                        let _ = done.send(());
                    }
                }
                continue;
            }
            std::thread::park_timeout((due - now).min(POLL));
        }
    }

    fn send(&mut self, rt: &tokio::runtime::Runtime, batch: Vec<SpanData>) {
        let n = batch.len() as u64;
        match rt.block_on(self.exporter.export(batch)) {
            Ok(()) => self.metrics.exported.inc_by(n),
            Err(e) => {
                self.metrics
                    .dropped
                    .with_label_values(&["export_failed"])
                    .inc_by(n);
                // One warning per 30 s: a dead collector must not flood the log.
                let now = Instant::now();
                if self
                    .last_warn
                    .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(30))
                {
                    self.last_warn = Some(now);
                    tracing::warn!(spans = n, error = %e, "tracing: OTLP export failed; spans dropped (counted in crank_spans_dropped_total). Check that the collector at tracing.otlp.endpoint is up");
                }
            }
        }
    }
}

/// Exports what is queued, waiting at most `timeout`. Called before the
/// process exits after a drain.
pub fn flush(timeout: Duration) {
    let Some(control) = CONTROL.get() else {
        return;
    };
    let (tx, rx) = mpsc::channel();
    *control.done.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
    control.flush.store(true, Ordering::Release);
    if let Some(t) = control.worker.get() {
        t.unpark();
    }
    let _ = rx.recv_timeout(timeout);
}
