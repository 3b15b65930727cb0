//! A KV move whose export stream breaks mid-transfer (with an error, or ended early without
//! one), in process with two real nodes (the default GGUF model, from
//! `scripts/fetch-model.sh`): the coordinator asks the draining node for the same export
//! again (the node kept it, `rrt_node::outbound`), the peer stages it and continues the
//! request without recomputing its prompt, the client's tokens equal an undisturbed run's,
//! and the draining node's export is released.

use rrt_coordinator::registry::{NodeSource, Registry};
use rrt_coordinator::{Coordinator, CoordinatorConfig, GenEvent, GenRequest, Generation, Input};
use rrt_node::grpc::NodeService;
use rrt_proto::v1 as pbv1;
use rrt_proto::v1::node as pb;
use rrt_proto::v1::node::node_client::NodeClient;
use rrt_proto::v1::node::node_server::{Node, NodeServer};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

fn model_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// How an export breaks.
#[derive(Clone, Copy, Debug)]
enum Cut {
    /// After the header and the first data chunk, an error (a connection cut mid-stream).
    Error,
    /// After the header, the stream just ends (the peer sees too few floats).
    Short,
}

/// A node whose next `cuts` exports break as `how` says; everything else is the real node's.
#[derive(Clone)]
struct CutExports {
    inner: NodeService,
    cuts: Arc<AtomicUsize>,
    how: Cut,
}

#[tonic::async_trait]
impl Node for CutExports {
    type RunStream = <NodeService as Node>::RunStream;
    type ExportStream = <NodeService as Node>::ExportStream;

    async fn run(&self, r: Request<pb::RunRequest>) -> Result<Response<Self::RunStream>, Status> {
        self.inner.run(r).await
    }

    async fn cancel(&self, r: Request<pb::CancelRequest>) -> Result<Response<pb::CancelResponse>, Status> {
        self.inner.cancel(r).await
    }

    async fn load(&self, r: Request<pb::LoadRequest>) -> Result<Response<pb::LoadReport>, Status> {
        self.inner.load(r).await
    }

    async fn drain(&self, r: Request<pb::DrainRequest>) -> Result<Response<pb::DrainResponse>, Status> {
        self.inner.drain(r).await
    }

    async fn tokenize(&self, r: Request<pb::TokenizeRequest>) -> Result<Response<pb::TokenizeResponse>, Status> {
        self.inner.tokenize(r).await
    }

    async fn info(&self, r: Request<pb::InfoRequest>) -> Result<Response<pbv1::ModelInfoResponse>, Status> {
        Node::info(&self.inner, r).await
    }

    async fn export(&self, r: Request<pb::ExportRequest>) -> Result<Response<Self::ExportStream>, Status> {
        let s = self.inner.export(r).await?.into_inner();
        if self
            .cuts
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_err()
        {
            return Ok(Response::new(s));
        }
        Ok(Response::new(match self.how {
            Cut::Error => Box::pin(
                s.take(2)
                    .chain(tokio_stream::once(Err(Status::unavailable("connection cut")))),
            ),
            Cut::Short => Box::pin(s.take(1)),
        }))
    }

    async fn import(&self, r: Request<tonic::Streaming<pb::KvChunk>>) -> Result<Response<pb::ImportResponse>, Status> {
        self.inner.import(r).await
    }
}

/// A node on loopback serving the default model; its next `cuts` exports break as `how` says.
async fn node(id: &str, cuts: usize, how: Cut) -> (NodeService, String, Arc<AtomicUsize>) {
    let lm = rrt_model::load(&model_path()).expect("the default model (scripts/fetch-model.sh)");
    let n = rrt_node::server::start_as(
        lm,
        rrt_node::EngineConfig::default(),
        false,
        id,
        rrt_node::server::Placement::default(),
        None,
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let cuts = Arc::new(AtomicUsize::new(cuts));
    let svc = CutExports {
        inner: n.service.clone(),
        cuts: cuts.clone(),
        how,
    };
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(NodeServer::new(svc))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await;
    });
    (n.service, addr, cuts)
}

fn request(id: &str) -> GenRequest {
    let mut r = GenRequest::new(Input::Prompt(
        "Write a short story about a lighthouse keeper who finds a message in a bottle.".into(),
    ));
    r.id = id.into();
    r.max_new_tokens = Some(96);
    r.ignore_eos = true;
    r
}

/// The generation's token ids, calling `after(n)` once `n` tokens arrived.
async fn tokens(mut g: Generation, mut after: impl FnMut(usize)) -> Vec<u32> {
    let mut out = Vec::new();
    while let Some(e) = g.next().await {
        match e.unwrap() {
            GenEvent::Token(t) => {
                out.push(t.id);
                after(out.len());
            }
            GenEvent::Done { .. } => return out,
        }
    }
    panic!("the generation ended without Done");
}

async fn load(addr: &str) -> pb::LoadReport {
    let mut c = NodeClient::connect(format!("http://{addr}")).await.unwrap();
    c.load(pb::LoadRequest {}).await.unwrap().into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_export_is_asked_for_again_and_the_peer_recomputes_nothing() {
    moves_despite(Cut::Error).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_export_is_asked_for_again_and_the_peer_recomputes_nothing() {
    moves_despite(Cut::Short).await;
}

/// Node A serves a request, node B joins, A drains: the request moves with its keys/values
/// although A's first export breaks as `how` says.
async fn moves_despite(how: Cut) {
    let (a_svc, a, cuts) = node("node-a", 1, how).await;
    let (_, b, _) = node("node-b", 0, how).await;
    // The coordinator first knows node A only (so the request starts there), then both.
    let sources = Arc::new(Mutex::new(vec![NodeSource::Static(a.clone())]));
    let reg = Registry::new();
    let first = sources.lock().unwrap().clone();
    reg.refresh(&first, Duration::from_secs(10)).await;
    let coord = Coordinator::new(reg, CoordinatorConfig::default());
    {
        let (coord, sources) = (coord.clone(), sources.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let s = sources.lock().unwrap().clone();
                coord.registry.refresh(&s, Duration::from_secs(5)).await;
                coord.move_off_draining();
            }
        });
    }
    let undisturbed = tokens(coord.generate(request("r0")).await.unwrap(), |_| {}).await;
    assert_eq!(undisturbed.len(), 96);

    // Node B joins after the request's 8th token, node A drains: the request moves, and the
    // first export breaks on the way.
    let (joined, joined_rx) = tokio::sync::oneshot::channel::<()>();
    let mut joined = Some(joined);
    let drain = {
        let (sources, a, b) = (sources.clone(), a.clone(), b.clone());
        tokio::spawn(async move {
            let _ = joined_rx.await;
            sources.lock().unwrap().push(NodeSource::Static(b.clone()));
            let t = Instant::now();
            while load(&b).await.model_fingerprint.is_empty() {
                assert!(
                    t.elapsed() < Duration::from_secs(30),
                    "node B never knew its fingerprint"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            tokio::time::sleep(Duration::from_millis(150)).await;
            let mut c = NodeClient::connect(format!("http://{a}")).await.unwrap();
            c.drain(pb::DrainRequest::default()).await.unwrap();
        })
    };
    let g = coord.generate(request("r1")).await.unwrap();
    let disturbed = tokens(g, |n| {
        if n == 8 {
            let _ = joined.take().map(|j| j.send(()));
        }
    })
    .await;
    drain.await.unwrap();
    assert_eq!(disturbed, undisturbed, "the moved request's tokens");
    assert_eq!(cuts.load(Ordering::Acquire), 0, "the export broke once");

    let (la, lb) = (load(&a).await, load(&b).await);
    assert_eq!(
        la.kv_exports_total, 1,
        "the engine let go once; the retry resent its bytes: {la:?}"
    );
    assert_eq!(lb.kv_imports_total, 1, "{lb:?}");
    assert_eq!(lb.kv_import_fallbacks_total, 0, "{lb:?}");
    assert_eq!(
        lb.prefill_tokens_total, 0,
        "node B recomputed the moved request's prompt: {lb:?}"
    );
    assert!(lb.tokens_total > 0, "node B finished the request: {lb:?}");
    // The coordinator released the export: a draining node A may close now.
    tokio::time::timeout(Duration::from_secs(5), a_svc.exports_settled())
        .await
        .expect("the export was released");
}
