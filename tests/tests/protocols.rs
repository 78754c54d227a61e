//! Protocols a service owner relies on, end to end through both sidecars:
//! gRPC (tonic, h2c to the app) with metadata, streaming and trailers;
//! WebSocket upgrades; and h2c prior knowledge with many streams on one
//! connection.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use crank_tests::{metric, wait_until, EchoApp, Mesh, MeshOptions};
use futures::{SinkExt, Stream, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio_tungstenite::tungstenite::Message;
use tonic::codegen::Service;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::server::NamedService;
use tonic::{Code, Request, Response, Status};

mod pb {
    tonic::include_proto!("crank.test.echo");
}

use pb::echo_client::EchoClient;
use pb::echo_server::{Echo, EchoServer};
use pb::{EchoReply, EchoRequest, StreamRequest};

const CALLER: &str = "spiffe://crank.local/tenant/demo/svc/frontend";
const INBOUND_2XX: &str =
    "crank_requests_total{direction=\"inbound\",route=\"app\",status_class=\"2xx\"}";

/// Starts the mesh from async code (it waits for the proxies synchronously).
fn mesh(app: SocketAddr) -> Mesh {
    tokio::task::block_in_place(|| Mesh::start(app, MeshOptions::default()))
}

// ---------------------------------------------------------------- gRPC --

/// The gRPC app: echoes, streams, fails on request.
struct EchoSvc;

#[tonic::async_trait]
impl Echo for EchoSvc {
    async fn unary(&self, req: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        let note = req.metadata().get("x-note").cloned();
        let caller = req
            .metadata()
            .get("x-crank-client-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("none");
        let message = format!("{} from {caller}", req.get_ref().message);
        let mut resp = Response::new(EchoReply { message, index: 0 });
        if let Some(note) = note {
            resp.metadata_mut().insert("x-note-seen", note);
        }
        Ok(resp)
    }

    type StreamStream = Pin<Box<dyn Stream<Item = Result<EchoReply, Status>> + Send>>;

    /// `count` replies; with message `fail-midway`, then a status carrying
    /// metadata, which can only travel in the HTTP/2 trailers.
    async fn stream(
        &self,
        req: Request<StreamRequest>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let StreamRequest { message, count } = req.into_inner();
        let fail = message == "fail-midway";
        let replies = (0..count).map(move |index| {
            Ok(EchoReply {
                message: message.clone(),
                index,
            })
        });
        let mut md = MetadataMap::new();
        md.insert("x-why", MetadataValue::from_static("quota"));
        let tail = fail.then(|| {
            Err(Status::with_metadata(
                Code::ResourceExhausted,
                "out of widgets",
                md,
            ))
        });
        Ok(Response::new(Box::pin(futures::stream::iter(
            replies.chain(tail),
        ))))
    }

    async fn fail(&self, req: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        Err(Status::not_found(format!(
            "no such thing: {}",
            req.get_ref().message
        )))
    }
}

/// Adds `x-trailer: from-app` to the trailers of every response that has
/// trailers, so a test can tell trailing metadata crossed the mesh.
#[derive(Clone)]
struct WithTrailer<S>(S);

impl<S: NamedService> NamedService for WithTrailer<S> {
    const NAME: &'static str = S::NAME;
}

type GrpcResponse = http::Response<tonic::body::Body>;

impl<S> Service<http::Request<tonic::body::Body>> for WithTrailer<S>
where
    S: Service<http::Request<tonic::body::Body>, Response = GrpcResponse, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = GrpcResponse;
    type Error = Infallible;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<GrpcResponse, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let fut = self.0.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            Ok(resp.map(|body| {
                tonic::body::Body::new(body.map_frame(|mut frame| {
                    if let Some(trailers) = frame.trailers_mut() {
                        trailers.insert("x-trailer", http::HeaderValue::from_static("from-app"));
                    }
                    frame
                }))
            }))
        })
    }
}

/// Starts the tonic app (HTTP/2 only, so h2c is the only way in) on an
/// ephemeral port, on the test's runtime.
async fn start_grpc_app() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(WithTrailer(EchoServer::new(EchoSvc)))
            .serve_with_incoming(incoming),
    );
    addr
}

/// A grpc app, the mesh in front of it, and a client on the local port.
async fn grpc_setup() -> (Mesh, EchoClient<tonic::transport::Channel>) {
    let app = start_grpc_app().await;
    let mesh = mesh(app);
    let client = EchoClient::connect(format!("http://{}", mesh.port))
        .await
        .expect("client connects to the local port");
    (mesh, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_carries_metadata_both_ways_and_trailers() {
    let (mesh, mut client) = grpc_setup().await;
    let mut req = Request::new(EchoRequest {
        message: "hello".into(),
    });
    req.metadata_mut()
        .insert("x-note", MetadataValue::from_static("from-client"));
    let resp = client.unary(req).await.expect("unary call succeeds");

    // The app got the message, the request metadata and the verified caller.
    assert_eq!(resp.get_ref().message, format!("hello from {CALLER}"));
    assert_eq!(
        resp.metadata()
            .get("x-note-seen")
            .map(|v| v.to_str().unwrap()),
        Some("from-client")
    );
    // Trailing metadata (tonic merges it into a unary response's metadata).
    assert_eq!(
        resp.metadata()
            .get("x-trailer")
            .map(|v| v.to_str().unwrap()),
        Some("from-app")
    );
    assert_eq!(metric(&mesh.server.metrics(), INBOUND_2XX), Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_server_streaming_delivers_every_message_then_trailers() {
    let (_mesh, mut client) = grpc_setup().await;
    let req = StreamRequest {
        message: "tick".into(),
        count: 40,
    };
    let mut stream = client
        .stream(req)
        .await
        .expect("stream starts")
        .into_inner();
    let mut indexes = Vec::new();
    while let Some(reply) = stream.message().await.expect("no error mid-stream") {
        assert_eq!(reply.message, "tick");
        indexes.push(reply.index);
    }
    assert_eq!(
        indexes,
        (0..40).collect::<Vec<_>>(),
        "all replies, in order"
    );
    let trailers = stream
        .trailers()
        .await
        .unwrap()
        .expect("the response ended with HTTP/2 trailers");
    assert_eq!(
        trailers.get("grpc-status").map(|v| v.to_str().unwrap()),
        Some("0")
    );
    assert_eq!(
        trailers.get("x-trailer").map(|v| v.to_str().unwrap()),
        Some("from-app")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_error_status_arrives_intact() {
    let (mesh, mut client) = grpc_setup().await;

    // An immediate error (a trailers-only response).
    let err = client
        .fail(EchoRequest {
            message: "widget".into(),
        })
        .await
        .expect_err("the app answers NOT_FOUND");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert_eq!(err.message(), "no such thing: widget");

    // An error after some messages: status, message and metadata travel
    // only in the trailers.
    let req = StreamRequest {
        message: "fail-midway".into(),
        count: 3,
    };
    let mut stream = client
        .stream(req)
        .await
        .expect("stream starts")
        .into_inner();
    for want in 0..3 {
        let reply = stream
            .message()
            .await
            .expect("messages before the error")
            .expect("a message");
        assert_eq!(reply.index, want);
    }
    let err = stream
        .message()
        .await
        .expect_err("the stream ends with the app's error");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert_eq!(err.message(), "out of widgets");
    assert_eq!(
        err.metadata().get("x-why").map(|v| v.to_str().unwrap()),
        Some("quota")
    );
    assert_eq!(
        err.metadata().get("x-trailer").map(|v| v.to_str().unwrap()),
        Some("from-app")
    );

    // gRPC errors are HTTP 200s: the sidecars pass them through, they do not
    // turn them into proxy errors.
    assert_eq!(metric(&mesh.server.metrics(), INBOUND_2XX), Some(2.0));
    assert!(
        !mesh.client.metrics().contains("crank_proxy_errors_total{"),
        "{}",
        mesh.client.metrics()
    );
}

// ----------------------------------------------------------- WebSocket --

/// What the WebSocket app saw in the upgrade request.
#[derive(Default, Debug)]
struct Upgrade {
    path: String,
    caller: Option<String>,
}

/// A tokio-tungstenite echo server on an ephemeral port.
async fn start_ws_app() -> (SocketAddr, Arc<std::sync::Mutex<Vec<Upgrade>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Arc<std::sync::Mutex<Vec<Upgrade>>> = Arc::default();
    let seen2 = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let seen = seen2.clone();
            tokio::spawn(async move {
                // The callback's error type is tungstenite's, not ours.
                #[allow(clippy::result_large_err)]
                let record = |req: &tokio_tungstenite::tungstenite::handshake::server::Request,
                              resp| {
                    let caller = req
                        .headers()
                        .get("x-crank-client-id")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string);
                    seen.lock().unwrap().push(Upgrade {
                        path: req.uri().path().to_string(),
                        caller,
                    });
                    Ok(resp)
                };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(tcp, record).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_echoes_text_and_binary_and_closes_cleanly() {
    let (app, seen) = start_ws_app().await;
    let mesh = mesh(app);
    let (mut ws, resp) = tokio_tungstenite::connect_async(format!("ws://{}/ws", mesh.port))
        .await
        .expect("the WebSocket upgrade succeeds through the mesh");
    assert_eq!(resp.status(), 101);

    ws.send(Message::text("hello mesh")).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::text("hello mesh")
    );
    // A binary message bigger than one TLS record and one WebSocket read.
    let blob: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    ws.send(Message::binary(blob.clone())).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::binary(blob));
    for i in 0..20 {
        ws.send(Message::text(format!("msg {i}"))).await.unwrap();
    }
    for i in 0..20 {
        assert_eq!(
            ws.next().await.unwrap().unwrap(),
            Message::text(format!("msg {i}"))
        );
    }

    // A clean close: our Close is answered with the app's Close, then EOF.
    ws.close(None).await.unwrap();
    match ws.next().await {
        Some(Ok(Message::Close(_))) => {}
        other => panic!("expected the app's Close frame, got {other:?}"),
    }
    assert!(
        ws.next().await.is_none(),
        "the stream ends after the close handshake"
    );

    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert_eq!(seen[0].path, "/ws");
        assert_eq!(seen[0].caller.as_deref(), Some(CALLER));
    }
    // The server sidecar logs the upgraded request once the tunnel ends.
    let series = "crank_requests_total{direction=\"inbound\",route=\"app\",status_class=\"1xx\"}";
    tokio::task::block_in_place(|| {
        wait_until(
            "the server sidecar to count the upgrade",
            Duration::from_secs(10),
            || metric(&mesh.server.metrics(), series) == Some(1.0),
        )
    });
}

// ----------------------------------------------------------------- h2c --

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_prior_knowledge_multiplexes_many_streams_on_one_connection() {
    let app = EchoApp::start();
    let mesh = mesh(app.addr);
    let tcp = tokio::net::TcpStream::connect(mesh.port).await.unwrap();
    let (sender, conn) = hyper::client::conn::http2::handshake::<_, _, Full<Bytes>>(
        TokioExecutor::new(),
        TokioIo::new(tcp),
    )
    .await
    .expect("h2c prior-knowledge handshake with the client sidecar");
    tokio::spawn(conn);

    // 5 slow requests go first, then 45 quick ones, all at once on the one
    // connection: the quick ones must not queue behind the slow ones.
    let slow_done = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..50usize {
        let slow = i < 5;
        let path = if slow {
            format!("/slow/{i}")
        } else {
            format!("/mux/{i}")
        };
        let mut sender = sender.clone();
        let slow_done = slow_done.clone();
        tasks.push(tokio::spawn(async move {
            let body = Bytes::from(vec![b'x'; i * 100]);
            let req = http::Request::post(format!("http://backend{path}"))
                .body(Full::new(body))
                .unwrap();
            let resp = sender.send_request(req).await.expect("response");
            let status = resp.status();
            let version = resp.version();
            let body = resp.into_body().collect().await.expect("body").to_bytes();
            let slow_finished_before = if slow {
                slow_done.fetch_add(1, Ordering::SeqCst);
                0
            } else {
                slow_done.load(Ordering::SeqCst)
            };
            (i, path, status, version, body, slow_finished_before)
        }));
    }
    for t in tasks {
        let (i, path, status, version, body, slow_finished_before) = t.await.unwrap();
        assert_eq!(status, 200, "{path}: {body:?}");
        assert_eq!(version, http::Version::HTTP_2);
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            json["path"],
            path.as_str(),
            "each stream gets its own response"
        );
        assert_eq!(json["body_bytes"], i * 100, "{path}");
        assert_eq!(
            slow_finished_before, 0,
            "{path} waited for a slow request on another stream"
        );
    }
    assert_eq!(app.count(), 50);
    let m = mesh.client.metrics();
    assert_eq!(
        metric(
            &m,
            "crank_requests_total{direction=\"outbound\",route=\"backend\",status_class=\"2xx\"}"
        ),
        Some(50.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "crank_open_connections{direction=\"outbound\"}"),
        Some(1.0),
        "{m}"
    );
    drop(sender);
}
