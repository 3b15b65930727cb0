//! `rrt node --device cuda:0` on a machine without a usable GPU (CI has none; a default build
//! has no CUDA backend at all) serves on the CPU backend, says so in one warning line, and
//! never panics; a device that is not a device is refused naming the key.

mod common;

use common::{root, rrt_bin};
use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};

#[test]
fn a_node_asked_for_a_gpu_it_cannot_use_serves_on_the_cpu_with_one_warning() {
    let mut child = Command::new(rrt_bin())
        .args(["node", "--listen", "127.0.0.1:0", "--device", "cuda:0"])
        .env("RRT_LOG", "warn")
        .current_dir(root())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(
        line.contains("listening on") && line.contains("backend cpu"),
        "{line:?}\n{err}"
    );
    let warnings: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("falling back to the CPU backend"))
        .collect();
    assert_eq!(warnings.len(), 1, "{err}");
    assert!(warnings[0].contains("cuda:0"), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    let bad = Command::new(rrt_bin())
        .args(["node", "--listen", "127.0.0.1:0", "--device", "tpu:1"])
        .current_dir(root())
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let msg = String::from_utf8_lossy(&bad.stderr);
    assert!(
        msg.contains("node.device") || msg.contains("cpu, cuda or cuda:N"),
        "{msg}"
    );
}
