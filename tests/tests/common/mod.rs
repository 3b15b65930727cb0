//! What the process-level tests share: the `rrt` binary of the test's profile, child
//! processes killed on drop, and reading the address a process prints at start.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The `rrt` binary next to this test's profile directory (target/<profile>/rrt).
pub fn rrt_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join("rrt");
    assert!(
        bin.is_file(),
        "{} is missing: run the tests with `cargo test --release --workspace` (it builds the rrt binary)",
        bin.display()
    );
    bin
}

/// A child process killed when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `rrt ARGS` and returns it with its first stdout line.
pub fn spawn(args: &[&str]) -> (Proc, String) {
    let mut child = Command::new(rrt_bin())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("rrt starts");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert!(!line.is_empty(), "rrt {args:?} printed nothing");
    // Keep reading so that later prints never meet a closed pipe.
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    (Proc(child), line)
}

pub fn word_after<'a>(line: &'a str, marker: &str) -> &'a str {
    line.split(marker)
        .nth(1)
        .unwrap_or_else(|| panic!("no `{marker}` in {line:?}"))
        .split([' ', ','])
        .next()
        .unwrap()
}
