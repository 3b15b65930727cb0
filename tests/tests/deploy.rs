//! The deployment files.
//!
//! `local_launcher_starts_serves_and_stops`: `deploy/local/cluster.sh start` runs a coordinator
//! and two `rrt node` processes; one greedy request through the OpenAI HTTP API and one through
//! gRPC `rrt.v1.Generation/Generate` give the same non-empty text; `cluster.sh stop` leaves none
//! of the processes of its pid files running.
//!
//! `deploy_files_use_only_real_flags_and_keys`: every `--flag` given to an `rrt` subcommand in
//! deploy/k8s (container `args:` / `command:`), deploy/docker (CMD / ENTRYPOINT) and
//! deploy/local/cluster.sh is in that subcommand's `--help`; every `RRT_*` variable they set
//! names a configuration key (or is one of the few other variables rrt or the launcher reads),
//! and the environment reaches that key's section; every key of the rrt.toml files under
//! deploy/ exists and `rrt config --config FILE` accepts the file. The keys come from the
//! binary itself: `rrt config` prints the sections, and its "unknown field" error for a probe
//! key lists every field of a section, set or not.
//!
//! Needs the `rrt` binary of the same profile (`cargo test --release --workspace` builds it),
//! bash, and curl or python3 (cluster.sh's readiness check); the first test needs the default
//! model (scripts/fetch-model.sh).

mod common;

use common::{root, rrt_bin};
use rrt_proto::v1 as api;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn launcher() -> PathBuf {
    root().join("deploy/local/cluster.sh")
}

/// `bash deploy/local/cluster.sh ARGS` with the test's rrt binary; no stdin.
fn cluster_sh(args: &[&str]) -> Output {
    Command::new("bash")
        .arg(launcher())
        .args(args)
        .env("RRT_BIN", rrt_bin())
        .stdin(Stdio::null())
        .output()
        .expect("bash runs cluster.sh")
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The launcher's logs, for failure messages.
fn logs(dir: &Path) -> String {
    let mut out = String::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        let mut files: Vec<PathBuf> = rd.map(|e| e.unwrap().path()).collect();
        files.sort();
        for f in files.into_iter().filter(|f| f.extension().is_some_and(|e| e == "log")) {
            let s = std::fs::read_to_string(&f).unwrap_or_default();
            let tail: Vec<&str> = s.lines().rev().take(20).collect();
            out += &format!("--- {}\n", f.display());
            for l in tail.into_iter().rev() {
                out += l;
                out.push('\n');
            }
        }
    }
    out
}

/// `(state, start time)` of a process from /proc/PID/stat, None when there is no such process.
fn proc_stat(pid: u32) -> Option<(String, String)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: fields 3.. come after its closing parenthesis.
    let rest = &s[s.rfind(") ")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some((f.first()?.to_string(), f.get(19)?.to_string()))
}

/// Whether the process recorded as (pid, start time) is gone: no such process, another process
/// with that pid, or a zombie (it exited; the launcher's shell that started it is gone, and
/// whichever process adopted it may not reap it).
fn gone(pid: u32, start: &str) -> bool {
    match proc_stat(pid) {
        None => true,
        Some((state, s)) => s != start || state == "Z",
    }
}

/// Stops the cluster when the test fails half-way.
struct Stopper(PathBuf);

impl Drop for Stopper {
    fn drop(&mut self) {
        let _ = cluster_sh(&["stop", "--dir", self.0.to_str().unwrap(), "--timeout", "10"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_launcher_starts_serves_and_stops() {
    let dir = std::env::temp_dir().join(format!("rrt-local-cluster-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let d = dir.to_str().unwrap();
    // The model the other cluster tests serve: the fetched default (RRT_MODEL_CACHE or models/).
    let gguf = root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let gguf = std::env::var_os("RRT_MODEL_CACHE")
        .map(|c| PathBuf::from(c).join("SmolLM2-135M-Instruct.Q4_1.gguf"))
        .filter(|p| p.is_file())
        .unwrap_or(gguf);
    assert!(
        gguf.is_file(),
        "{} is missing: run scripts/fetch-model.sh",
        gguf.display()
    );

    let stopper = Stopper(dir.clone());
    let out = cluster_sh(&[
        "start",
        "--nodes",
        "2",
        "--model",
        gguf.to_str().unwrap(),
        "--kv-mib",
        "128",
        "--dir",
        d,
    ]);
    assert!(
        out.status.success(),
        "cluster.sh start failed: {}\n{}",
        text(&out),
        logs(&dir)
    );
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(stdout.contains("ready: 2 nodes"), "{stdout}");

    // The pid files: the coordinator and two nodes, each "PID STARTTIME", each running.
    let mut procs: BTreeMap<String, (u32, String)> = BTreeMap::new();
    for name in ["coordinator", "node-0", "node-1"] {
        let s = std::fs::read_to_string(dir.join(format!("{name}.pid")))
            .unwrap_or_else(|e| panic!("{name}.pid: {e}\n{stdout}"));
        let mut w = s.split_whitespace();
        let pid: u32 = w.next().unwrap().parse().unwrap();
        let start = w.next().unwrap().to_string();
        assert!(!gone(pid, &start), "{name} (pid {pid}) does not run\n{}", logs(&dir));
        assert!(dir.join(format!("{name}.log")).is_file(), "{name} has no log");
        procs.insert(name.to_string(), (pid, start));
    }
    let pids: BTreeSet<u32> = procs.values().map(|p| p.0).collect();
    assert_eq!(pids.len(), 3, "{procs:?}");

    let env = std::fs::read_to_string(dir.join("cluster.env")).unwrap();
    let var = |k: &str| {
        env.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap_or_else(|| panic!("no {k} in cluster.env:\n{env}"))
            .to_string()
    };
    let http = var("RRT_CLUSTER_HTTP");
    let grpc = var("RRT_CLUSTER_GRPC");
    assert!(http.starts_with("http://127.0.0.1:"), "{http}");
    assert_eq!(var("RRT_CLUSTER_NODES").split(',').count(), 2, "{env}");

    // One greedy request through each API: the same text.
    let prompt = "The quick brown fox";
    let r = reqwest::Client::new()
        .post(format!("{http}/v1/completions"))
        .json(&json!({"prompt": prompt, "max_tokens": 8, "temperature": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    let http_text = v["choices"][0]["text"]
        .as_str()
        .unwrap_or_else(|| panic!("{v}"))
        .to_string();
    assert_eq!(v["usage"]["completion_tokens"], 8, "{v}");

    let mut client = api::generation_client::GenerationClient::connect(format!("http://{grpc}"))
        .await
        .unwrap();
    let g = client
        .generate(api::GenerateRequest {
            input: Some(api::generate_request::Input::Prompt(prompt.into())),
            max_new_tokens: Some(8),
            temperature: Some(0.0),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        !http_text.is_empty() && !g.text.is_empty(),
        "{http_text:?} {:?}",
        g.text
    );
    assert_eq!(g.token_ids.len(), 8);
    assert_eq!(g.text, http_text, "gRPC and HTTP differ for the same greedy request");
    drop(client);

    // Stop: every process of the pid files is gone, the pid files too; the logs stay.
    let out = cluster_sh(&["stop", "--dir", d]);
    assert!(
        out.status.success(),
        "cluster.sh stop failed: {}\n{}",
        text(&out),
        logs(&dir)
    );
    for (name, (pid, start)) in &procs {
        assert!(gone(*pid, start), "{name} (pid {pid}) still runs after cluster.sh stop");
        assert!(!dir.join(format!("{name}.pid")).exists(), "{name}.pid is left");
        assert!(dir.join(format!("{name}.log")).is_file(), "{name}.log is gone");
    }
    let out = cluster_sh(&["status", "--dir", d]);
    assert!(!out.status.success(), "status after stop: {}", text(&out));
    std::mem::forget(stopper);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `rrt ARGS` in an empty folder (no ./rrt.toml) without any RRT_* variable of the test's
/// environment, plus `env`.
fn rrt(args: &[&str], env: &[(&str, &str)]) -> Output {
    let cwd = std::env::temp_dir().join(format!("rrt-deploy-keys-{}", std::process::id()));
    std::fs::create_dir_all(&cwd).unwrap();
    let mut c = Command::new(rrt_bin());
    c.args(args).current_dir(&cwd).stdin(Stdio::null());
    for (k, _) in std::env::vars() {
        if k.starts_with("RRT_") {
            c.env_remove(k);
        }
    }
    c.envs(env.iter().copied());
    c.output().unwrap()
}

/// The fields serde lists in an "unknown field ... expected one of `a`, `b`" error.
fn expected_fields(err: &str) -> Option<BTreeSet<String>> {
    let list = err.split("expected").nth(1)?;
    let list = list.split(" for key").next().unwrap_or(list);
    let fields: BTreeSet<String> = list
        .split('`')
        .filter(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        })
        .map(str::to_string)
        .collect();
    (!fields.is_empty()).then_some(fields)
}

/// The configuration keys as the binary knows them.
struct Keys {
    /// Top-level keys that are not sections (`model`).
    scalars: BTreeSet<String>,
    /// Section -> its keys.
    sections: BTreeMap<String, BTreeSet<String>>,
    /// Sections whose RRT_<SECTION>__* variables reach the configuration.
    env_sections: BTreeSet<String>,
}

fn config_keys() -> Keys {
    const PROBE: &str = "zzz_deploy_probe";
    let dir = std::env::temp_dir().join(format!("rrt-deploy-probe-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let probe = |toml: &str| -> BTreeSet<String> {
        let f = dir.join("probe.toml");
        std::fs::write(&f, toml).unwrap();
        let o = rrt(&["config", "--config", f.to_str().unwrap()], &[]);
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(!o.status.success(), "rrt config accepted the unknown key in {toml:?}");
        expected_fields(&err).unwrap_or_else(|| panic!("no field list in {err:?}"))
    };
    let top = probe(&format!("{PROBE} = 1\n"));
    let printed = rrt(&["config"], &[]);
    assert!(printed.status.success(), "rrt config: {}", text(&printed));
    let printed = String::from_utf8_lossy(&printed.stdout).to_string();
    let headers: BTreeSet<String> = printed
        .lines()
        .filter_map(|l| l.trim().strip_prefix('[')?.strip_suffix(']'))
        .map(str::to_string)
        .collect();
    let mut keys = Keys {
        scalars: BTreeSet::new(),
        sections: BTreeMap::new(),
        env_sections: BTreeSet::new(),
    };
    for t in top {
        if !headers.contains(&t) {
            keys.scalars.insert(t);
            continue;
        }
        let fields = probe(&format!("[{t}]\n{PROBE} = 1\n"));
        // The environment reaches a section when an unknown RRT_<SECTION>__ key is refused
        // (a section that the env filter drops ignores it silently).
        let var = format!("RRT_{}__{}", t.to_uppercase(), PROBE.to_uppercase());
        let o = rrt(&["config"], &[(var.as_str(), "1")]);
        if !o.status.success() && expected_fields(&String::from_utf8_lossy(&o.stderr)).is_some() {
            keys.env_sections.insert(t.clone());
        }
        keys.sections.insert(t, fields);
    }
    keys
}

/// Files under `dir` (recursively) whose names satisfy `pick`.
fn files(dir: &Path, pick: &dyn Fn(&str) -> bool, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            files(&p, pick, out);
        } else if pick(p.file_name().unwrap().to_str().unwrap()) {
            out.push(p);
        }
    }
}

/// The subcommands `rrt --help` lists.
fn subcommands() -> BTreeSet<String> {
    let o = rrt(&["--help"], &[]);
    let h = String::from_utf8_lossy(&o.stdout).to_string();
    h.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .filter(|w| *w != "help")
        .map(str::to_string)
        .collect()
}

/// The long flags `rrt SUB --help` documents (the first `--` word of each option line).
fn help_flags(sub: &str) -> BTreeSet<String> {
    let o = rrt(&[sub, "--help"], &[]);
    assert!(o.status.success(), "rrt {sub} --help: {}", text(&o));
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter(|l| l.trim_start().starts_with('-'))
        .filter_map(|l| {
            l.split(|c: char| c.is_whitespace() || c == ',')
                .find(|w| w.starts_with("--"))
                .map(str::to_string)
        })
        .collect()
}

fn unquote(s: &str) -> &str {
    s.trim().trim_matches(|c| c == '"' || c == '\'')
}

/// `--flag` of a token (`--flag=value` too); None for anything else.
fn flag_of(token: &str) -> Option<String> {
    let t = unquote(token);
    t.starts_with("--").then(|| t.split('=').next().unwrap().to_string())
}

/// The lists given to `args:` / `command:` in a YAML file (block or flow style), as tokens.
fn yaml_arg_lists(text: &str) -> Vec<Vec<String>> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        let t = l.trim_start().trim_start_matches("- ");
        let Some(rest) = t.strip_prefix("args:").or_else(|| t.strip_prefix("command:")) else {
            continue;
        };
        let rest = rest.trim();
        if let Some(flow) = rest.strip_prefix('[') {
            let flow = flow.trim_end().trim_end_matches(']');
            out.push(flow.split(',').map(|s| unquote(s).to_string()).collect());
        } else if rest.is_empty() {
            let indent = l.len() - l.trim_start().len();
            let mut items = Vec::new();
            for m in &lines[i + 1..] {
                let mi = m.len() - m.trim_start().len();
                let mt = m.trim_start();
                if mt.is_empty() || mt.starts_with('#') {
                    continue;
                }
                if mi < indent || (mi == indent && !mt.starts_with("- ")) {
                    break;
                }
                match mt.strip_prefix("- ") {
                    Some(item) => items.push(unquote(item).to_string()),
                    None => break,
                }
            }
            out.push(items);
        }
    }
    out
}

/// The JSON-array CMD / ENTRYPOINT lines of a Dockerfile, concatenated (ENTRYPOINT first).
fn dockerfile_command(text: &str) -> Vec<String> {
    let mut entry = Vec::new();
    let mut cmd = Vec::new();
    for l in text.lines() {
        for (kw, into) in [("ENTRYPOINT ", &mut entry), ("CMD ", &mut cmd)] {
            if let Some(j) = l.strip_prefix(kw) {
                let v: Vec<String> =
                    serde_json::from_str(j.trim()).unwrap_or_else(|e| panic!("{kw}not a JSON array ({e}): {l}"));
                *into = v;
            }
        }
    }
    entry.into_iter().chain(cmd).collect()
}

/// The bash arrays of a script: name -> every `--flag` given to it in `NAME=(...)` or
/// `NAME+=(...)`, and the first word of its `NAME=(...)` (the subcommand it starts with).
fn bash_arrays(text: &str) -> BTreeMap<String, (Option<String>, Vec<String>)> {
    let b = text.as_bytes();
    let mut out: BTreeMap<String, (Option<String>, Vec<String>)> = BTreeMap::new();
    let mut i = 0;
    while i < b.len() {
        let (assign, len) = if text[i..].starts_with("+=(") {
            (false, 3)
        } else if text[i..].starts_with("=(") {
            (true, 2)
        } else {
            i += 1;
            continue;
        };
        let name_start = text[..i]
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(0, |p| p + 1);
        let name = text[name_start..i].to_string();
        // The list, up to the parenthesis that closes it ($(...) and $((...)) nest).
        let start = i + len;
        let mut depth = 1;
        let mut j = start;
        while j < b.len() && depth > 0 {
            match b[j] {
                b'(' => depth += 1,
                b')' => depth -= 1,
                _ => {}
            }
            j += 1;
        }
        let body = &text[start..j - 1];
        let words: Vec<&str> = body
            .lines()
            .map(|l| l.split(" #").next().unwrap())
            .flat_map(str::split_whitespace)
            .collect();
        if !name.is_empty() {
            let e = out.entry(name).or_default();
            if assign && e.0.is_none() {
                e.0 = words.first().map(|w| unquote(w).to_string());
            }
            e.1.extend(words.iter().filter_map(|w| flag_of(w)));
        }
        i = j;
    }
    out
}

#[test]
fn deploy_files_use_only_real_flags_and_keys() {
    let root = root();
    let keys = config_keys();
    let subs = subcommands();
    assert!(subs.contains("node") && subs.contains("coordinator"), "{subs:?}");
    let mut help: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut flags_of = |sub: &str| help.entry(sub.to_string()).or_insert_with(|| help_flags(sub)).clone();
    let mut problems = Vec::new();
    let rel = |p: &Path| p.strip_prefix(&root).unwrap_or(p).display().to_string();

    // Flags. (file, subcommand, flags)
    let mut uses: Vec<(String, String, Vec<String>)> = Vec::new();
    let mut yaml = Vec::new();
    files(
        &root.join("deploy/k8s"),
        &|n| n.ends_with(".yaml") || n.ends_with(".yml"),
        &mut yaml,
    );
    let mut dockerfiles = Vec::new();
    files(
        &root.join("deploy/docker"),
        &|n| n.starts_with("Dockerfile"),
        &mut dockerfiles,
    );
    assert!(dockerfiles.len() >= 2, "{dockerfiles:?}");
    // A list invokes rrt when it starts with a subcommand, after the binary's path if given.
    let invocation = |list: &[String]| -> Option<(String, Vec<String>)> {
        let mut it = list.iter().map(|s| s.as_str()).peekable();
        if it.peek().is_some_and(|w| *w == "rrt" || w.ends_with("/rrt")) {
            it.next();
        }
        let sub = it.next()?;
        subs.contains(sub)
            .then(|| (sub.to_string(), it.filter_map(flag_of).collect()))
    };
    for f in &yaml {
        let t = std::fs::read_to_string(f).unwrap();
        for list in yaml_arg_lists(&t) {
            if let Some((sub, flags)) = invocation(&list) {
                uses.push((rel(f), sub, flags));
            }
        }
    }
    for f in &dockerfiles {
        let t = std::fs::read_to_string(f).unwrap();
        let (sub, flags) = invocation(&dockerfile_command(&t))
            .unwrap_or_else(|| panic!("{}: ENTRYPOINT + CMD start no rrt subcommand", rel(f)));
        uses.push((rel(f), sub, flags));
    }
    let script = root.join("deploy/local/cluster.sh");
    let script_text = std::fs::read_to_string(&script).unwrap();
    let arrays = bash_arrays(&script_text);
    let started: BTreeSet<String> = arrays
        .values()
        .filter_map(|(s, _)| s.clone())
        .filter(|s| subs.contains(s))
        .collect();
    assert!(
        started.contains("node") && started.contains("coordinator"),
        "cluster.sh: no `node_args=(node ...)` / `coord_args=(coordinator ...)` arrays found: {arrays:?}"
    );
    for (name, (first, flags)) in &arrays {
        match first.as_deref().filter(|s| subs.contains(*s)) {
            Some(sub) => uses.push((format!("{} ({name})", rel(&script)), sub.to_string(), flags.clone())),
            // Flags of a shared array (appended to several commands) must suit all of them.
            None => {
                for sub in &started {
                    uses.push((format!("{} ({name})", rel(&script)), sub.clone(), flags.clone()));
                }
            }
        }
    }
    for sub in ["node", "coordinator"] {
        assert!(
            uses.iter().any(|(f, s, _)| s == sub && f.starts_with("deploy/k8s")),
            "no `rrt {sub}` container found in deploy/k8s (the scanner is broken?): {uses:?}"
        );
    }
    let mut checked_flags = 0;
    for (file, sub, flags) in &uses {
        let known = flags_of(sub);
        for f in flags {
            checked_flags += 1;
            if !known.contains(f) {
                problems.push(format!("{file}: `rrt {sub} {f}`: no such flag in `rrt {sub} --help`"));
            }
        }
    }

    // RRT_* variables.
    let binary = std::fs::read(rrt_bin()).unwrap();
    let in_binary = |s: &str| binary.windows(s.len()).any(|w| w == s.as_bytes());
    // Read by rrt outside the configuration (checked in the binary below), or the launcher's own.
    let read_by_rrt = ["RRT_LOG", "RRT_MODEL_CACHE"];
    let launcher_vars = [
        "RRT_BIN",
        "RRT_CLUSTER_DIR",
        "RRT_CLUSTER_HTTP",
        "RRT_CLUSTER_GRPC",
        "RRT_CLUSTER_NODES",
    ];
    for v in read_by_rrt {
        if !in_binary(v) {
            problems.push(format!("{v}: the rrt binary never names it"));
        }
    }
    let mut vars: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in yaml.iter().chain(&dockerfiles).chain([&script]) {
        let t = std::fs::read_to_string(f).unwrap();
        let b = t.as_bytes();
        let mut from = 0;
        while let Some(p) = t[from..].find("RRT_") {
            let s = from + p;
            from = s + 4;
            if s > 0 && (b[s - 1].is_ascii_alphanumeric() || b[s - 1] == b'_') {
                continue;
            }
            let end = t[s..]
                .find(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
                .map_or(t.len(), |e| s + e);
            let name = &t[s..end];
            if name.len() > 4 && !name.ends_with('_') {
                vars.entry(name.to_string()).or_default().insert(rel(f));
            }
        }
    }
    for (v, where_) in &vars {
        let at = where_.iter().cloned().collect::<Vec<_>>().join(", ");
        if read_by_rrt.contains(&v.as_str()) {
            continue;
        }
        if launcher_vars.contains(&v.as_str()) {
            if where_.iter().any(|w| !w.starts_with("deploy/local/")) {
                problems.push(format!("{v} ({at}): only deploy/local/cluster.sh reads it"));
            }
            continue;
        }
        let path: Vec<String> = v["RRT_".len()..].split("__").map(str::to_lowercase).collect();
        match path.as_slice() {
            [k] => {
                if !keys.scalars.contains(k) {
                    problems.push(format!("{v} ({at}): no top-level key `{k}` (keys: {:?})", keys.scalars));
                }
            }
            [section, k] => match keys.sections.get(section) {
                None => problems.push(format!(
                    "{v} ({at}): no section `{section}` in `rrt config` (sections: {:?})",
                    keys.sections.keys().collect::<Vec<_>>()
                )),
                Some(fields) => {
                    if !fields.contains(k) {
                        problems.push(format!("{v} ({at}): no key `{section}.{k}` (its keys: {fields:?})"));
                    }
                    if !keys.env_sections.contains(section) {
                        problems.push(format!(
                            "{v} ({at}): rrt does not read RRT_{}__* from the environment (the env filter in rrt/src/config.rs drops it)",
                            section.to_uppercase()
                        ));
                    }
                }
            },
            _ => problems.push(format!("{v} ({at}): not a `RRT_KEY` or `RRT_SECTION__KEY` name")),
        }
    }
    for v in ["RRT_MODEL", "RRT_NODE__ID", "RRT_NODE__KV_MIB"] {
        assert!(
            vars.contains_key(v),
            "{v} not found in deploy/ (the scanner is broken?): {vars:?}"
        );
    }

    // rrt.toml files: every key exists, and rrt accepts the whole file.
    let mut tomls = Vec::new();
    files(&root.join("deploy"), &|n| n.ends_with(".toml"), &mut tomls);
    assert!(!tomls.is_empty(), "no rrt.toml under deploy/");
    let mut checked_keys = 0;
    for f in &tomls {
        let t = std::fs::read_to_string(f).unwrap();
        let mut section: Option<String> = None;
        for l in t.lines() {
            let l = l.split('#').next().unwrap().trim();
            if l.is_empty() {
                continue;
            }
            if let Some(s) = l.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
                section = Some(s.trim().to_string());
                if !keys.sections.contains_key(s.trim()) {
                    problems.push(format!("{}: no section [{}] in `rrt config`", rel(f), s.trim()));
                }
                continue;
            }
            let Some((k, _)) = l.split_once('=') else { continue };
            let k = k.trim().to_string();
            checked_keys += 1;
            let ok = match &section {
                None => keys.scalars.contains(&k),
                Some(s) => keys.sections.get(s).is_some_and(|fs| fs.contains(&k)),
            };
            if !ok {
                problems.push(format!(
                    "{}: no key `{}{k}`",
                    rel(f),
                    section.as_ref().map_or(String::new(), |s| format!("{s}."))
                ));
            }
        }
        let o = rrt(&["config", "--config", f.to_str().unwrap()], &[]);
        if !o.status.success() {
            problems.push(format!(
                "{}: `rrt config --config` refuses it: {}",
                rel(f),
                String::from_utf8_lossy(&o.stderr).trim()
            ));
        }
    }

    assert!(
        problems.is_empty(),
        "the deployment files use flags or keys that rrt does not have:\n  {}",
        problems.join("\n  ")
    );
    eprintln!(
        "checked {checked_flags} flags in {} rrt invocations, {} RRT_* variables, {checked_keys} rrt.toml keys",
        uses.len(),
        vars.len()
    );
}
