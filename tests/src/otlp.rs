//! A real OTLP/HTTP receiver for tests: it accepts `POST /v1/traces` with a
//! protobuf `ExportTraceServiceRequest`, decodes it with the official proto
//! definitions (`opentelemetry-proto`), and keeps every span with its
//! resource. It can be made slow, to play a collector that falls behind.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value, KeyValue};
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;

/// One received span with its resource's attributes.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    pub resource: Vec<KeyValue>,
    pub span: Span,
}

impl ReceivedSpan {
    pub fn trace_id_hex(&self) -> String {
        hex(&self.span.trace_id)
    }
    pub fn span_id_hex(&self) -> String {
        hex(&self.span.span_id)
    }
    pub fn parent_id_hex(&self) -> String {
        hex(&self.span.parent_span_id)
    }
    /// A span attribute as a string (ints are formatted).
    pub fn attr(&self, key: &str) -> Option<String> {
        attr(&self.span.attributes, key)
    }
    pub fn resource_attr(&self, key: &str) -> Option<String> {
        attr(&self.resource, key)
    }
    /// `SPAN_KIND_SERVER` → "server", and so on.
    pub fn kind(&self) -> &'static str {
        match self.span.kind {
            1 => "internal",
            2 => "server",
            3 => "client",
            4 => "producer",
            5 => "consumer",
            _ => "unspecified",
        }
    }
    /// Status code: 0 unset, 1 ok, 2 error.
    pub fn status_code(&self) -> i32 {
        self.span.status.as_ref().map_or(0, |s| s.code)
    }
}

pub struct OtlpReceiver {
    pub addr: SocketAddr,
    grpc: bool,
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
    requests: Arc<AtomicU64>,
    delay_ms: Arc<AtomicU64>,
    _shutdown: tokio::sync::oneshot::Sender<()>,
}

impl OtlpReceiver {
    pub fn start() -> OtlpReceiver {
        let spans: Arc<Mutex<Vec<ReceivedSpan>>> = Arc::default();
        let requests = Arc::new(AtomicU64::new(0));
        let delay_ms = Arc::new(AtomicU64::new(0));
        let (s2, r2, d2) = (spans.clone(), requests.clone(), delay_ms.clone());
        let (addr, tx) = crate::serve_on_thread(move |listener| async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (s, r, d) = (s2.clone(), r2.clone(), d2.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        handle(req, s.clone(), r.clone(), d.clone())
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        OtlpReceiver {
            addr,
            grpc: false,
            spans,
            requests,
            delay_ms,
            _shutdown: tx,
        }
    }

    /// An OTLP/gRPC receiver (`TraceService/Export`, served by tonic with
    /// the official service definition).
    pub fn start_grpc() -> OtlpReceiver {
        use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer;
        let spans: Arc<Mutex<Vec<ReceivedSpan>>> = Arc::default();
        let requests = Arc::new(AtomicU64::new(0));
        let svc = GrpcTraces {
            spans: spans.clone(),
            requests: requests.clone(),
        };
        let (addr, tx) = crate::serve_on_thread(move |listener| async move {
            let _ = tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(svc))
                .serve_with_incoming(tokio_stream_from(listener))
                .await;
        });
        OtlpReceiver {
            addr,
            grpc: true,
            spans,
            requests,
            delay_ms: Arc::new(AtomicU64::new(0)),
            _shutdown: tx,
        }
    }

    /// What to put in `tracing.otlp.endpoint`: the traces URL for HTTP,
    /// the server address for gRPC.
    pub fn endpoint(&self) -> String {
        if self.grpc {
            format!("http://{}", self.addr)
        } else {
            format!("http://{}/v1/traces", self.addr)
        }
    }

    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans.lock().unwrap().clone()
    }

    /// Export requests received.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Makes every export request wait this long before it is answered.
    pub fn set_delay(&self, d: Duration) {
        self.delay_ms.store(d.as_millis() as u64, Ordering::Relaxed);
    }

    /// The spans of one trace.
    pub fn trace(&self, trace_id_hex: &str) -> Vec<ReceivedSpan> {
        self.spans()
            .into_iter()
            .filter(|s| s.trace_id_hex() == trace_id_hex)
            .collect()
    }
}

struct GrpcTraces {
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
    requests: Arc<AtomicU64>,
}

#[tonic::async_trait]
impl opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService
    for GrpcTraces
{
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        keep(&self.spans, request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// Accepted connections as the stream tonic's server takes.
fn tokio_stream_from(
    listener: tokio::net::TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures::stream::unfold(listener, |l| async move {
        let r = l.accept().await.map(|(s, _)| s);
        Some((r, l))
    })
}

fn keep(spans: &Mutex<Vec<ReceivedSpan>>, export: ExportTraceServiceRequest) {
    let mut out = spans.lock().unwrap();
    for rs in export.resource_spans {
        let resource = rs.resource.map(|r| r.attributes).unwrap_or_default();
        for ss in rs.scope_spans {
            for span in ss.spans {
                out.push(ReceivedSpan {
                    resource: resource.clone(),
                    span,
                });
            }
        }
    }
}

async fn handle(
    req: Request<Incoming>,
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
    requests: Arc<AtomicU64>,
    delay_ms: Arc<AtomicU64>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path_ok = req.uri().path() == "/v1/traces";
    let ctype_ok = req
        .headers()
        .get("content-type")
        .is_some_and(|v| v == "application/x-protobuf");
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let delay = delay_ms.load(Ordering::Relaxed);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    requests.fetch_add(1, Ordering::Relaxed);
    if !path_ok || !ctype_ok {
        return Ok(Response::builder()
            .status(if path_ok { 415 } else { 404 })
            .body(Full::new(Bytes::new()))
            .unwrap());
    }
    let Ok(export) = ExportTraceServiceRequest::decode(body) else {
        return Ok(Response::builder()
            .status(400)
            .body(Full::new(Bytes::from_static(
                b"not an ExportTraceServiceRequest",
            )))
            .unwrap());
    };
    keep(&spans, export);
    let resp = ExportTraceServiceResponse::default().encode_to_vec();
    Ok(Response::builder()
        .header("content-type", "application/x-protobuf")
        .body(Full::new(Bytes::from(resp)))
        .unwrap())
}

fn attr(kvs: &[KeyValue], key: &str) -> Option<String> {
    let v = kvs.iter().find(|kv| kv.key == key)?.value.as_ref()?;
    match v.value.as_ref()? {
        any_value::Value::StringValue(s) => Some(s.clone()),
        any_value::Value::IntValue(i) => Some(i.to_string()),
        any_value::Value::BoolValue(b) => Some(b.to_string()),
        any_value::Value::DoubleValue(d) => Some(d.to_string()),
        other => Some(format!("{other:?}")),
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
