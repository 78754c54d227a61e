//! The tunnel's metrics (`docs/reference/metrics.md`, "Opaque TCP").

use prometheus::core::Collector;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};

/// Counters of opaque TCP tunnels, both directions.
#[derive(Clone)]
pub struct TunnelMetrics {
    /// `crank_tcp_connections_total{direction, capability, outcome}`;
    /// outcome is the close reason, or why the tunnel never opened.
    pub connections: IntCounterVec,
    /// `crank_tcp_bytes_total{direction, flow}`: `flow` is `sent` (client
    /// to server) or `received`.
    pub bytes: IntCounterVec,
    /// `crank_tcp_connection_duration_seconds{direction}`.
    pub duration: HistogramVec,
    /// `crank_tcp_open_connections{direction}`.
    pub open: IntGaugeVec,
}

impl TunnelMetrics {
    pub fn new(registry: &Registry) -> Self {
        let connections = IntCounterVec::new(
            Opts::new(
                "crank_tcp_connections_total",
                "Opaque TCP tunnels, by direction, capability and outcome (close reason or refusal)",
            ),
            &["direction", "capability", "outcome"],
        )
        .expect("static metric");
        let bytes = IntCounterVec::new(
            Opts::new(
                "crank_tcp_bytes_total",
                "Bytes carried by opaque TCP tunnels, by direction and flow (sent: client to server, received: server to client)",
            ),
            &["direction", "flow"],
        )
        .expect("static metric");
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "crank_tcp_connection_duration_seconds",
                "How long opaque TCP tunnels stayed open",
            )
            .buckets(vec![
                0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 1800.0, 3600.0, 14400.0,
            ]),
            &["direction"],
        )
        .expect("static metric");
        let open = IntGaugeVec::new(
            Opts::new("crank_tcp_open_connections", "Opaque TCP tunnels open now"),
            &["direction"],
        )
        .expect("static metric");
        for d in ["inbound", "outbound"] {
            open.with_label_values(&[d]);
            for f in ["sent", "received"] {
                bytes.with_label_values(&[d, f]);
            }
        }
        for c in [
            Box::new(connections.clone()) as Box<dyn Collector>,
            Box::new(bytes.clone()),
            Box::new(duration.clone()),
            Box::new(open.clone()),
        ] {
            registry.register(c).expect("unique metric names");
        }
        TunnelMetrics {
            connections,
            bytes,
            duration,
            open,
        }
    }
}
