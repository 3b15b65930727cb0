//! The coordinator's request lifecycle in process, against fake nodes on loopback (no model):
//! duplicate request ids, a node that starts draining between routing and `Run`, node loss
//! mid-stream, a client that goes away, a deadline. Each case runs in well under a second.

use rrt_coordinator::registry::{NodeSource, Registry};
use rrt_coordinator::{CoordError, Coordinator, CoordinatorConfig, Finish, GenEvent, GenRequest, Input};
use rrt_node::fake::FakeNode;
use rrt_proto::v1::node::node_server::NodeServer;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A fake node producing one token every `step`, served on loopback; aborting the task is a
/// node loss.
async fn fake(id: &str, step: Duration) -> (FakeNode, String, tokio::task::JoinHandle<()>) {
    let node = FakeNode::new(id, step, 2, Instant::now());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let svc = node.clone();
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(NodeServer::new(svc))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await;
    });
    (node, addr, task)
}

async fn coordinator(addrs: &[String]) -> (Arc<Coordinator>, Vec<NodeSource>) {
    let reg = Registry::new();
    let sources: Vec<NodeSource> = addrs.iter().map(|a| NodeSource::Static(a.clone())).collect();
    reg.refresh(&sources, Duration::from_secs(2)).await;
    assert_eq!(reg.snapshot().iter().filter(|n| n.healthy).count(), addrs.len());
    (Coordinator::new(reg, CoordinatorConfig::default()), sources)
}

fn request(id: &str, max_new_tokens: u32) -> GenRequest {
    let mut r = GenRequest::new(Input::Prompt("hello".into()));
    r.id = id.into();
    r.max_new_tokens = Some(max_new_tokens);
    r
}

/// Reads a generation to its end: (tokens, finish) or the error.
async fn drain(mut g: rrt_coordinator::Generation) -> Result<(usize, Finish), CoordError> {
    let mut n = 0;
    while let Some(e) = g.next().await {
        match e? {
            GenEvent::Token(_) => n += 1,
            GenEvent::Done { finish, .. } => return Ok((n, finish)),
        }
    }
    panic!("the generation ended without Done");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_ids_are_refused_atomically() {
    let (_n, a, _t) = fake("a", Duration::from_millis(2)).await;
    let (coord, _) = coordinator(&[a]).await;
    // Two requests with one id, as close together as the runtime allows: exactly one runs.
    let (r1, r2) = tokio::join!(coord.generate(request("dup", 8)), coord.generate(request("dup", 8)));
    let (ok, err) = match (r1, r2) {
        (Ok(g), Err(e)) | (Err(e), Ok(g)) => (g, e),
        (Ok(_), Ok(_)) => panic!("both requests with the id `dup` were admitted"),
        (Err(a), Err(b)) => panic!("both refused: {a} / {b}"),
    };
    assert!(matches!(err, CoordError::AlreadyExists(ref id) if id == "dup"), "{err}");
    assert_eq!(err.code(), tonic::Code::AlreadyExists);
    assert_eq!(err.http_status(), 409);
    assert_eq!(drain(ok).await.unwrap(), (8, Finish::Length));
    // Once it finished (its pump cleans up right after the last message), the id is free
    // again; the refused request left nothing behind.
    let t = Instant::now();
    while coord.in_flight() != 0 {
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "the request table keeps an entry"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(
        drain(coord.generate(request("dup", 3)).await.unwrap()).await.unwrap().0,
        3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_draining_since_its_last_report_gets_no_request_and_fails_none() {
    let (na, a, _ta) = fake("a", Duration::ZERO).await;
    let (nb, b, _tb) = fake("b", Duration::ZERO).await;
    let (coord, _) = coordinator(&[a.clone(), b]).await;
    // `a` starts draining after the registry's last poll: routing still picks it.
    na.set_draining(true);
    let mut tasks = Vec::new();
    for i in 0..12 {
        let c = coord.clone();
        tasks.push(tokio::spawn(async move {
            drain(c.generate(request(&format!("r{i}"), 4)).await?).await
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), (4, Finish::Length));
    }
    assert_eq!(na.counts().0, 0, "the draining node ran a request");
    assert_eq!(nb.counts().0, 12);
    let snap = coord.registry.snapshot();
    let va = snap.iter().find(|n| n.id.ends_with(&a)).unwrap();
    assert!(va.draining && va.healthy, "{va:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_loss_mid_stream_moves_the_request() {
    let (_na, a, ta) = fake("a", Duration::from_millis(5)).await;
    let (_nb, b, tb) = fake("b", Duration::from_millis(5)).await;
    let (coord, _) = coordinator(&[a.clone(), b.clone()]).await;
    let mut g = coord.generate(request("loss", 40)).await.unwrap();
    let victim = if g.node.ends_with(&a) { ta } else { tb };
    let mut n = 0;
    let mut finish = None;
    while let Some(e) = g.next().await {
        match e.unwrap() {
            GenEvent::Token(_) => {
                n += 1;
                if n == 5 {
                    victim.abort();
                }
            }
            GenEvent::Done { finish: f, usage, .. } => {
                assert_eq!(usage.completion_tokens, 40);
                finish = Some(f);
            }
        }
    }
    assert_eq!((n, finish), (40, Some(Finish::Length)));
    let t = coord.tracked("loss");
    assert!(t.is_none(), "a finished request stays in the table");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_cancels_its_request_on_the_node() {
    let (na, a, _t) = fake("a", Duration::from_millis(2)).await;
    let (coord, _) = coordinator(&[a]).await;
    let mut g = coord.generate(request("gone", 10_000)).await.unwrap();
    for _ in 0..2 {
        assert!(matches!(g.next().await, Some(Ok(GenEvent::Token(_)))));
    }
    assert_eq!(na.counts().1, 1);
    drop(g);
    let t = Instant::now();
    while na.counts().1 != 0 || coord.in_flight() != 0 {
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "still running after the client left"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_ends_the_request_and_frees_the_node() {
    let (na, a, _t) = fake("a", Duration::from_millis(2)).await;
    let (coord, _) = coordinator(&[a]).await;
    let mut r = request("late", 10_000);
    let started = Instant::now();
    r.deadline = Some(started + Duration::from_millis(150));
    let res = drain(coord.generate(r).await.unwrap()).await;
    match res {
        Err(CoordError::DeadlineExceeded(_)) => {}
        other => panic!("expected the deadline, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_millis(600));
    let t = Instant::now();
    while na.counts().1 != 0 || coord.in_flight() != 0 {
        assert!(t.elapsed() < Duration::from_millis(500), "the node still runs it");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
