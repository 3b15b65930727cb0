//! `rrt node` as a process: it prints its address, reports SERVING on grpc.health.v1, streams
//! the same greedy tokens as `rrt_model::generate`, and exits cleanly on SIGTERM.

use rrt_proto::v1::node as pb;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_process_serves_and_drains_on_sigterm() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_rrt"))
        .args(["node", "--listen", "127.0.0.1:0", "--kv-mib", "64"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("rrt node starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .split(" listening on ")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    let url = format!("http://{addr}");

    let channel = tonic::transport::Endpoint::from_shared(url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let h = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "rrt.v1.node.Node".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        h.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );

    let lm = rrt_model::load(&rrt_model::default_model_path().unwrap()).unwrap();
    let mut client = pb::node_client::NodeClient::connect(url).await.unwrap();
    for text in ["The quick brown fox", "To be, or not to be"] {
        let prompt = lm.tokenizer.encode(text, true, false).unwrap();
        let want = rrt_model::generate::generate(&lm, &prompt, 12, Default::default(), |_| Ok(())).unwrap();
        let mut s = client
            .run(pb::RunRequest {
                prompt: prompt.clone(),
                max_new_tokens: 12,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let mut got = Vec::new();
        while let Some(e) = s.message().await.unwrap() {
            if let Some(pb::run_event::Event::Token(t)) = e.event {
                got.push(t.token_id);
            }
        }
        assert_eq!(got, want.ids, "{text}");
    }
    let st = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        if let Some(code) = child.try_wait().unwrap() {
            assert!(code.success(), "clean exit after SIGTERM: {code:?}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "rrt node did not exit after SIGTERM"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
