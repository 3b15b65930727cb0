//! Running a coordinator: the node registry's poller, the `rrt.v1.Generation` gRPC service
//! (with `grpc.health.v1`, whose status follows readiness, and server reflection) and the
//! OpenAI HTTP API, until a shutdown signal.

use crate::core::{Coordinator, CoordinatorConfig};
use crate::grpc::GenerationService;
use crate::registry::{NodeSource, Registry};
use rrt_proto::v1::generation_server::GenerationServer;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// Where the nodes are and how often to poll them.
#[derive(Clone, Debug)]
pub struct Discovery {
    pub sources: Vec<NodeSource>,
    pub poll_interval: Duration,
}

/// Builds the coordinator and polls the nodes once (so a request arriving at once finds them).
pub async fn start(discovery: &Discovery, cfg: CoordinatorConfig) -> Arc<Coordinator> {
    let registry = match &cfg.node_tls {
        Some(t) => Registry::with_tls(t.client_config()),
        None => Registry::new(),
    };
    registry
        .refresh(
            &discovery.sources,
            discovery.poll_interval.max(Duration::from_millis(500)),
        )
        .await;
    Coordinator::new(registry, cfg)
}

/// Serves gRPC on `grpc` and HTTP on `http` until `shutdown` resolves; then both stop taking
/// connections and let open streams finish.
pub async fn serve(
    coord: Arc<Coordinator>,
    discovery: Discovery,
    grpc: TcpListener,
    http: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let poller = {
        // Poll the nodes; after each poll, move requests off nodes that started draining.
        // A node answers its load between engine steps, and one step of a long prefill can
        // take longer than the poll interval: the poll waits for the node timeout, not the
        // interval, or a busy node would be taken for a dead one.
        let coord = coord.clone();
        let discovery = discovery.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(discovery.poll_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let timeout = coord.node_timeout().max(Duration::from_millis(200));
            loop {
                tick.tick().await;
                coord.registry.refresh(&discovery.sources, timeout).await;
                coord.move_off_draining();
            }
        })
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let (health_reporter, health) = tonic_health::server::health_reporter();
    let readiness = {
        let coord = coord.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let mut serving = None;
            loop {
                let now = coord.healthy_nodes() > 0 && !*stop.borrow() && !coord.is_shutting_down();
                if serving != Some(now) {
                    if now {
                        health_reporter
                            .set_serving::<GenerationServer<GenerationService>>()
                            .await;
                    } else {
                        health_reporter
                            .set_not_serving::<GenerationServer<GenerationService>>()
                            .await;
                    }
                    serving = Some(now);
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = stop.changed() => {}
                }
            }
        })
    };
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(rrt_proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("the embedded descriptor set is valid");
    let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let max = coord.config().max_body_bytes;
    let generation = GenerationServer::new(GenerationService::new(coord.clone()))
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    // Every service but health (liveness) needs a key when keys are configured.
    let auth = coord.config().api_keys.clone();
    let check = move |req: tonic::Request<()>| match &auth {
        Some(k) => k.interceptor()(req),
        None => Ok(req),
    };
    let mut builder = tonic::transport::Server::builder();
    let builder_fix = tower::util::MapResponseLayer::new(decode_errors_are_invalid_argument);
    if let Some(id) = &coord.config().client_tls {
        builder = builder
            .tls_config(tonic::transport::ServerTlsConfig::new().identity(id.tonic()))
            .map_err(std::io::Error::other)?;
    }
    let grpc_server = builder
        .layer(builder_fix)
        .add_service(health)
        .add_service(tonic::service::interceptor::InterceptedService::new(
            reflection,
            check.clone(),
        ))
        .add_service(tonic::service::interceptor::InterceptedService::new(generation, check))
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(grpc).with_nodelay(Some(true)),
            wait(stop_rx.clone()),
        );
    let router = crate::http::router(coord.clone());
    let http_server = async {
        match &coord.config().client_tls {
            Some(id) => {
                let acceptor = crate::tls::http_acceptor(id).map_err(std::io::Error::other)?;
                let listener = crate::tls::TlsListener::new(http, acceptor)?;
                axum::serve(listener, router)
                    .with_graceful_shutdown(wait(stop_rx))
                    .await
            }
            None => {
                // Streamed tokens are small writes: without TCP_NODELAY, Nagle's algorithm
                // holds them back up to a delayed-ACK period (40 ms on Linux).
                let http = axum::serve::ListenerExt::tap_io(http, |tcp: &mut tokio::net::TcpStream| {
                    let _ = tcp.set_nodelay(true);
                });
                axum::serve(http, router).with_graceful_shutdown(wait(stop_rx)).await
            }
        }
    };
    let (g, h) = tokio::join!(grpc_server, http_server);
    poller.abort();
    readiness.abort();
    g.map_err(std::io::Error::other)?;
    h
}

/// A request that does not decode (e.g. invalid UTF-8 in a string field) is the caller's
/// fault: tonic reports it as INTERNAL (gRPC's convention for parse errors); clients get
/// INVALID_ARGUMENT with prost's message, which names the field.
fn decode_errors_are_invalid_argument<B>(
    mut r: tonic::codegen::http::Response<B>,
) -> tonic::codegen::http::Response<B> {
    let h = r.headers_mut();
    let internal = h.get("grpc-status").is_some_and(|v| v.as_bytes() == b"13");
    let decode = h
        .get("grpc-message")
        .is_some_and(|m| m.as_bytes().windows(6).any(|w| w == b"decode"));
    if internal && decode {
        h.insert("grpc-status", tonic::codegen::http::HeaderValue::from_static("3"));
    }
    r
}
