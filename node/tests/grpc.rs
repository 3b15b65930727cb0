//! The node's gRPC ingress on loopback: Run streams the same tokens as the engine driven
//! directly; Load reports the engine; a client that drops its stream cancels its request;
//! invalid requests get INVALID_ARGUMENT naming the field.

mod common;

use common::*;
use rrt_node::engine_actor::EngineHandle;
use rrt_node::grpc::NodeService;
use rrt_node::{EngineConfig, GenParams, Request};
use rrt_proto::v1::node as pb;
use rrt_proto::v1::node::node_client::NodeClient;
use rrt_proto::v1::node::node_server::NodeServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_load_cancel_over_loopback() {
    let tok = tokenizer();
    let prompt: Vec<u32> = (0..12).map(|p| 200 + 7 * p).collect();
    let mut direct = engine(tiny_model(4, 2, 2, 31), tok.clone(), EngineConfig::default());
    let id = direct
        .submit(Request {
            prompt: prompt.clone(),
            params: GenParams {
                max_tokens: 9,
                ignore_eos: true,
                ..Default::default()
            },
        })
        .unwrap();
    let want = collect(&direct.run_to_completion().unwrap())[&id].0.clone();

    let (handle, _join) = EngineHandle::spawn(engine(tiny_model(4, 2, 2, 31), tok, EngineConfig::default()), 16);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let svc = NodeService::new("node-a", served(&tiny_model(4, 2, 2, 31), tokenizer()), handle.clone());
    serve_plain(svc, listener);
    let mut client = NodeClient::connect(format!("http://{addr}")).await.unwrap();
    let run = |max_new_tokens: u32| pb::RunRequest {
        request_id: format!("r{max_new_tokens}"),
        prompt: prompt.clone(),
        max_new_tokens,
        ignore_eos: true,
        ..Default::default()
    };
    let mut s = client.run(run(9)).await.unwrap().into_inner();
    let mut got = Vec::new();
    let mut fin = None;
    while let Some(e) = s.message().await.unwrap() {
        match e.event.unwrap() {
            pb::run_event::Event::Token(t) => {
                assert!((1..=2).contains(&t.exit_loop));
                got.push(t.token_id)
            }
            pb::run_event::Event::Finished(f) => fin = Some(f),
        }
    }
    assert_eq!(got, want);
    let fin = fin.unwrap();
    assert_eq!(
        (fin.reason(), fin.completion_tokens, fin.loops),
        (pb::FinishReason::Length, 9, 18)
    );

    // A moved request: 4 tokens generated elsewhere continue to the same output.
    let mut moved = run(9);
    moved.generated = want[..4].to_vec();
    let mut s = client.run(moved).await.unwrap().into_inner();
    let mut rest = Vec::new();
    while let Some(e) = s.message().await.unwrap() {
        if let Some(pb::run_event::Event::Token(t)) = e.event {
            rest.push(t.token_id);
        }
    }
    assert_eq!(rest, want[4..], "greedy continuation after moving");

    let bad = client
        .run(pb::RunRequest {
            max_new_tokens: 5,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(bad.message().contains("prompt"), "{}", bad.message());

    // Dropping the stream cancels the request on the node.
    let mut s = client.run(run(3000)).await.unwrap().into_inner();
    assert!(s.message().await.unwrap().is_some());
    let load = client.load(pb::LoadRequest {}).await.unwrap().into_inner();
    assert_eq!(
        (load.node_id.as_str(), load.running_requests, load.loops),
        ("node-a", 1, 2)
    );
    drop(s);
    let mut freed = false;
    for _ in 0..200 {
        let l = client.load(pb::LoadRequest {}).await.unwrap().into_inner();
        if l.running_requests + l.waiting_requests == 0 && l.free_kv_blocks == l.total_kv_blocks {
            freed = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(freed, "a dropped client stream cancels its request");
    let c = client
        .cancel(pb::CancelRequest {
            request_id: "nope".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!c.found);
}

/// Serves `svc` on `listener` in the background (no drain: the test's runtime ends it).
fn serve_plain(svc: NodeService, listener: tokio::net::TcpListener) {
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(NodeServer::new(svc))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
}

/// A node on a tiny model whose weights file (for the fingerprint KV moves need) is a
/// stand-in; its engine runs, its service is not served yet.
struct ExportingNode {
    svc: NodeService,
    handle: EngineHandle,
    thread: rrt_node::engine_actor::EngineThread,
    listener: tokio::net::TcpListener,
    addr: std::net::SocketAddr,
    weights: std::path::PathBuf,
}

impl ExportingNode {
    async fn new(tag: &str) -> Self {
        let weights = std::env::temp_dir().join(format!("rrt-{tag}-{}", std::process::id()));
        std::fs::write(&weights, b"stand-in weights for the fingerprint").unwrap();
        let (handle, thread) = EngineHandle::spawn(
            engine(tiny_model(4, 2, 2, 31), tokenizer(), EngineConfig::default()),
            16,
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let svc = NodeService::new("node-a", served(&tiny_model(4, 2, 2, 31), tokenizer()), handle.clone());
        svc.set_fingerprint_source(weights.clone());
        Self {
            svc,
            handle,
            thread,
            listener,
            addr,
            weights,
        }
    }
}

/// The prompt of the request `running` starts.
fn moving_prompt() -> Vec<u32> {
    (0..12).map(|p| 200 + 7 * p).collect()
}

/// Starts request "m" (long, so it is still running) and reads its first three events.
async fn running(client: &mut NodeClient<tonic::transport::Channel>) -> tonic::Streaming<pb::RunEvent> {
    let mut s = client
        .run(pb::RunRequest {
            request_id: "m".into(),
            prompt: moving_prompt(),
            max_new_tokens: 3000,
            ignore_eos: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    for _ in 0..3 {
        assert!(s.message().await.unwrap().is_some());
    }
    s
}

/// Every chunk of `Export` of `rid`.
async fn export(
    client: &mut NodeClient<tonic::transport::Channel>,
    rid: &str,
) -> Result<Vec<pb::KvChunk>, tonic::Status> {
    let mut st = client
        .export(pb::ExportRequest { request_id: rid.into() })
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(c) = st.message().await? {
        out.push(c);
    }
    Ok(out)
}

/// Export hands a running request's keys/values over (its Run stream ends MOVED, the engine
/// frees it), and a second Export of the same request (the coordinator's retry when the first
/// transfer broke) streams the same bytes again; the state imports on a node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_export_can_be_asked_for_again() {
    let node = ExportingNode::new("export-again").await;
    let weights = node.weights;
    serve_plain(node.svc, node.listener);
    let mut client = NodeClient::connect(format!("http://{}", node.addr)).await.unwrap();
    let prompt = moving_prompt();
    let mut s = running(&mut client).await;
    let first = export(&mut client, "m").await.unwrap();
    let Some(pb::kv_chunk::Chunk::Header(h)) = &first[0].chunk else {
        panic!("the first chunk is the header: {:?}", first[0]);
    };
    assert_eq!(h.tokens[..12], prompt[..]);
    assert!(h.positions as usize >= 12 + 2, "{h:?}");
    assert!(first.len() >= 2, "header and data");
    // The Run stream ends MOVED; the engine let go of the request.
    let mut reason = None;
    while let Some(e) = s.message().await.unwrap() {
        if let Some(pb::run_event::Event::Finished(f)) = e.event {
            reason = Some(f.reason());
        }
    }
    assert_eq!(reason, Some(pb::FinishReason::Moved));
    let load = client.load(pb::LoadRequest {}).await.unwrap().into_inner();
    assert_eq!((load.running_requests, load.kv_exports_total), (0, 1), "{load:?}");

    let again = export(&mut client, "m").await.unwrap();
    assert_eq!(again, first, "asked again: the same header and bytes");
    let load = client.load(pb::LoadRequest {}).await.unwrap().into_inner();
    assert_eq!(load.kv_exports_total, 1, "the engine exported once");
    let unknown = export(&mut client, "nope").await.unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);

    let ticket = client
        .import(tokio_stream::iter(again))
        .await
        .unwrap()
        .into_inner()
        .ticket;
    assert_eq!(ticket, "m");
    let _ = std::fs::remove_file(&weights);
}

/// A draining node keeps its connections open until the coordinator released what it
/// exported (`Cancel` of the moved request): bytes written but not yet delivered would be
/// lost with the process. Released, it stops at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_node_waits_for_its_exports_to_be_released() {
    let node = ExportingNode::new("export-release").await;
    let watch = rrt_node::supervisor::EngineWatch::spawn(node.thread, |_| {});
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(rrt_node::server::serve(
        node.listener,
        node.svc,
        node.handle,
        watch,
        std::time::Duration::from_secs(20),
        None,
        async move {
            let _ = stopped.await;
        },
    ));
    let mut client = NodeClient::connect(format!("http://{}", node.addr)).await.unwrap();
    let mut s = running(&mut client).await;
    assert!(export(&mut client, "m").await.unwrap().len() >= 2, "header and data");
    while s.message().await.unwrap().is_some() {}
    // SIGTERM: nothing runs any more, every byte was sent, but the export is not released.
    stop.send(()).unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    assert!(
        !serving.is_finished(),
        "the node stopped before its export was released"
    );
    let found = client
        .cancel(pb::CancelRequest { request_id: "m".into() })
        .await
        .unwrap()
        .into_inner()
        .found;
    assert!(found, "the export was there to release");
    drop(client);
    tokio::time::timeout(std::time::Duration::from_secs(5), serving)
        .await
        .expect("released: the node stops")
        .unwrap()
        .unwrap();
    let _ = std::fs::remove_file(&node.weights);
}
