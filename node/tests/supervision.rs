//! A node whose engine thread dies (its backend fails a pass, as a failed GPU allocation
//! does) stops looking alive: the request in flight ends with UNAVAILABLE (which the
//! coordinator migrates), gRPC health turns NOT_SERVING, new requests are refused, and the
//! server stops with the death recorded (the `rrt node` process then exits non-zero).

mod common;

use common::*;
use rrt_node::engine_actor::EngineHandle;
use rrt_node::grpc::NodeService;
use rrt_node::supervisor::{EngineExit, EngineWatch};
use rrt_node::{Engine, EngineConfig, ResidentModel};
use rrt_proto::v1::node as pb;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_engine_fails_its_requests_and_stops_serving() {
    let tok = tokenizer();
    let model = tiny_model(2, 2, 4, 1);
    let served = served(&model, tok.clone());
    let armed = Arc::new(AtomicBool::new(false));
    let backend = Faulty {
        cpu: rrt_kernels::CpuBackend,
        armed: armed.clone(),
    };
    let engine = Engine::new(
        ResidentModel::new(backend, model).unwrap(),
        tok,
        EngineConfig::default(),
    )
    .unwrap();
    let (handle, thread) = EngineHandle::spawn(engine, 64);
    let svc = NodeService::new("n", served, handle.clone());
    let watch = {
        let svc = svc.clone();
        EngineWatch::spawn(thread, move |e| {
            if let EngineExit::Died(m) = e {
                svc.engine_died(m);
            }
        })
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(rrt_node::server::serve(
        listener,
        svc,
        handle,
        watch.clone(),
        Duration::from_secs(5),
        None,
        std::future::pending(),
    ));
    let channel = tonic::transport::Endpoint::from_shared(addr)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let check = || tonic_health::pb::HealthCheckRequest {
        service: "rrt.v1.node.Node".into(),
    };
    assert_eq!(
        health.check(check()).await.unwrap().into_inner().status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
    let mut client = pb::node_client::NodeClient::new(channel);
    let run = pb::RunRequest {
        request_id: "r".into(),
        prompt: vec![5, 6, 7],
        max_new_tokens: 2_000,
        ignore_eos: true,
        ..Default::default()
    };
    let mut stream = client.run(run.clone()).await.unwrap().into_inner();
    // A few tokens, then the engine dies at its next pass.
    for _ in 0..3 {
        let m = stream.message().await.unwrap().unwrap();
        assert!(matches!(m.event, Some(pb::run_event::Event::Token(_))), "{m:?}");
    }
    armed.store(true, Ordering::Relaxed);
    let err = loop {
        match stream.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream ended quietly instead of failing"),
            Err(s) => break s,
        }
    };
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
    assert!(err.message().contains("engine died"), "{err}");
    assert!(err.message().contains("simulated device failure"), "{err}");
    let exit = tokio::time::timeout(Duration::from_secs(5), watch.ended())
        .await
        .unwrap();
    assert!(
        matches!(exit, EngineExit::Died(ref m) if m.contains("simulated device failure")),
        "{exit:?}"
    );
    // The server stops by itself; until it does, it refuses new work and reports NOT_SERVING.
    match client.run(run).await {
        Err(s) => assert_eq!(s.code(), tonic::Code::Unavailable, "{s}"),
        Ok(_) => panic!("a node with a dead engine accepted a request"),
    }
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
