//! The registry against real node services on loopback: static and DNS sources, health from
//! load polls, routing over the healthy nodes only.

use rrt_coordinator::registry::{NodeSource, Registry};
use rrt_coordinator::routing::route;
use rrt_node::EngineConfig;
use rrt_proto::v1::node::node_server::NodeServer;
use std::time::Duration;

async fn start_node(name: &str) -> std::net::SocketAddr {
    let lm = rrt_model::load(&rrt_model::default_model_path().unwrap()).unwrap();
    let cfg = EngineConfig {
        kv_bytes: 64 << 20,
        ..Default::default()
    };
    let node = rrt_node::server::start(lm, cfg, false, name).unwrap();
    let svc = node.service;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(NodeServer::new(svc))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_tracks_health_and_routes_to_live_nodes() {
    let a = start_node("a").await;
    let b = start_node("b").await;
    // A port nothing listens on (bound then dropped).
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let reg = Registry::new();
    let sources = vec![
        NodeSource::Static(a.to_string()),
        NodeSource::Static(format!("http://{b}")),
        NodeSource::Static(dead.to_string()),
    ];
    for _ in 0..2 {
        reg.refresh(&sources, Duration::from_secs(2)).await;
    }
    let snap = reg.snapshot();
    assert_eq!(snap.len(), 3);
    let healthy: Vec<&str> = snap.iter().filter(|n| n.healthy).map(|n| n.id.as_str()).collect();
    assert_eq!(healthy.len(), 2, "{snap:?}");
    assert!(healthy.contains(&format!("http://{a}").as_str()));
    let live = snap.iter().find(|n| n.healthy).unwrap();
    assert_eq!((live.loops, live.total_kv_blocks > 0), (1, true));
    for s in 0..20u32 {
        let p: Vec<u32> = (s * 50..s * 50 + 40).collect();
        let to = route(&snap, &p, 16).unwrap();
        assert!(to.healthy && to.id != format!("http://{dead}"));
    }
    // DNS source: "localhost:PORT" resolves to the node; names nobody lists any more are dropped.
    let dns = vec![NodeSource::Dns(format!("localhost:{}", a.port()))];
    reg.refresh(&dns, Duration::from_secs(2)).await;
    let snap = reg.snapshot();
    assert!(
        snap.iter()
            .any(|n| n.healthy && n.id == format!("http://127.0.0.1:{}", a.port())),
        "{snap:?}"
    );
    assert!(
        !snap.iter().any(|n| n.id == format!("http://{b}")),
        "b is no longer listed"
    );
}
