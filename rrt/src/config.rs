//! Configuration of the serving commands, by figment: built-in defaults < `rrt.toml` (or
//! `--config FILE`) < `RRT_*` environment variables < command-line flags. Nested keys use `__`
//! in the environment: `RRT_NODE__KV_MIB=2048` sets `node.kv_mib`. Values are validated after
//! extraction and errors name the key. `rrt config` prints the effective configuration.
//!
//! Keys (all optional):
//!
//! | key | default | meaning |
//! |---|---|---|
//! | `model` | the cached SmolLM2 | GGUF file, Hugging Face directory or recursive checkpoint |
//! | `node.listen` | `127.0.0.1:7301` | address of the node's gRPC service (port 0: any) |
//! | `node.id` | the listen address | the node's id in load reports |
//! | `node.model_name` | the model's file or directory name | the name clients put in `model` to reach this node's model |
//! | `node.kv_mib` | 1024 | KV cache budget, MiB |
//! | `node.block_size` | 16 | positions per KV block |
//! | `node.max_step_rows` | 256 | most rows (tokens x loops) per pass |
//! | `node.max_running` | 64 | most sequences holding KV at once |
//! | `node.early_exit` | true | exit at the checkpoint's calibrated thresholds |
//! | `node.kv_fill` | `propagate` | `propagate` or `recompute`: K/V of skipped loops |
//! | `node.prompt_exits` | false | prompt tokens take the gate's exit test too (gate criterion, `propagate`): cheaper prefill, a quality trade (`rrt eval-exit --prompt-exits`); a request's `prompt_exits` overrides it |
//! | `node.drain_seconds` | 30 | time to finish in-flight requests after SIGTERM |
//! | `node.tls_cert`, `node.tls_key` | none | PEM certificate and key: the node serves TLS only |
//! | `node.tls_client_ca` | none | PEM CA: callers need a client certificate it signed (mutual TLS) |
//! | `node.metrics_listen` | none | HTTP address of the node's Prometheus `/metrics` and `/health` (port 0: any) |
//! | `node.device` | `cpu` | `cpu`, `cuda` or `cuda:N`: the engine's backend (CUDA needs a `--features cuda` build; unusable: CPU with a warning) |
//! | `node.gpu_weights` | `bf16` | `bf16` or `f16`: weight precision on a GPU (f32 accumulation) |
//! | `node.cpu_products` | `exact` | `exact` or `int8`: products with Q4_1 / Q8_0 weights on the CPU (exact f32, or 8-bit activations and integer dot products as llama.cpp: faster, perplexity +1 %, greedy near-ties can flip) |
//! | `node.kv_dtype` | `f32` | `f32` or `f16`: the CPU KV cache's value type (`f16`: half the bytes per position, twice the positions per `kv_mib`, attention reads half; values rounded once as llama.cpp's default cache does) |
//! | `node.prefix_cache_mib` | 256 | host memory for the prefix cache (keys/values of prompt blocks reused by later prompts with the same prefix; 0: off) |
//! | `coordinator.grpc_listen` | `127.0.0.1:7300` | client gRPC (`rrt.v1.Generation`) address |
//! | `coordinator.http_listen` | `127.0.0.1:8080` | OpenAI-compatible HTTP address |
//! | `coordinator.nodes` | `[]` | static node addresses (`host:port`) |
//! | `coordinator.dns` | `[]` | DNS names (`name:port`, e.g. a headless service) re-resolved for nodes |
//! | `coordinator.poll_ms` | 1000 | load-poll and DNS re-resolution interval |
//! | `coordinator.node_timeout_ms` | 5000 | deadline of polls and small calls to nodes |
//! | `coordinator.served_model_name` | none | extra name clients may send for the default model |
//! | `coordinator.default_model` | the first served, by name | the model answering requests that name none |
//! | `coordinator.shutdown_seconds` | 30 | time open streams get after SIGTERM |
//! | `coordinator.max_migrations` | 3 | times a request may move after its node fails |
//! | `coordinator.max_in_flight` | 256 | admission limit: requests running or queued at once (429 past it) |
//! | `coordinator.api_keys` | `[]` | API keys (e.g. `RRT_COORDINATOR__API_KEYS='[k1,k2]'`); none: no authentication |
//! | `coordinator.api_keys_file` | none | file of API keys, one per line (`#` comments), added to `api_keys` |
//! | `coordinator.max_body_bytes` | 4194304 | largest HTTP body / gRPC message accepted |
//! | `coordinator.tls_cert`, `coordinator.tls_key` | none | PEM certificate and key: clients (gRPC and HTTP) use TLS |
//! | `coordinator.node_ca` | none | PEM CA of the nodes' certificates: nodes are reached over TLS (`https://`) |
//! | `coordinator.node_client_cert`, `coordinator.node_client_key` | none | the coordinator's client certificate for mutual TLS |
//! | `coordinator.prefix_affinity` | unset: on when every node keeps a prefix cache | send requests sharing their first 32 prompt tokens to one node (`true` / `false` force it) |
//! | `coordinator.node_tls_domain` | none | name the nodes' certificates must carry (instead of the address dialled, e.g. pod IPs from DNS) |
//! | `telemetry.otlp_endpoint` | none | OTLP/gRPC collector for spans, e.g. `http://otel-collector:4317` |
//! | `telemetry.file` | none | JSON-lines span file (what `rrt capacity` reads) |
//! | `telemetry.sample_ratio` | 1.0 | fraction of new traces recorded (callers' sampled traces are always followed) |
//! | `telemetry.queue` | 8192 | spans waiting for export; past it spans are dropped and counted, serving never waits |
//! | `telemetry.service_name` | the command | `service.name` of exported spans |
//! | `serve.models` | `[]` | models `rrt serve` serves side by side, each `NAME=PATH` or `PATH` (name: the file name); the first is the default; empty: `model`, or the default pair below |
//! | `serve.nodes` | 1 | in-process nodes of `rrt serve`, per model |
//! | `serve.loops` | 2 | B of the default model's conversion (first run, cached) |
//! | `serve.init` | `average` | `stepwise`, `average` or `lower` |
//! | `serve.lora_rank` | 256 | LoRA rank of every module |
//! | `serve.svd` | `activation` | `plain` or `activation` |
//! | `serve.calibration` | `data/calibration.txt` | text for the activation SVD and exit calibration |
//! | `serve.cache` | the model cache | where converted checkpoints are kept |
//!
//! `rrt serve` serves `serve.models` (or `model`) as given when set; otherwise it serves the
//! default SmolLM2 as is (`smollm2-135m`) beside its conversion by the `serve.*` recipe
//! (`smollm2-135m-rrt-b2-r256`), converted on first run (minutes) and reused after.

use anyhow::{Result, bail};
use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub model: Option<PathBuf>,
    pub node: NodeConfig,
    pub coordinator: CoordinatorConfig,
    pub serve: ServeConfig,
    pub telemetry: rrt_telemetry::TelemetryConfig,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CoordinatorConfig {
    pub grpc_listen: SocketAddr,
    pub http_listen: SocketAddr,
    pub nodes: Vec<String>,
    pub dns: Vec<String>,
    pub poll_ms: u64,
    pub node_timeout_ms: u64,
    pub served_model_name: Option<String>,
    pub default_model: Option<String>,
    pub shutdown_seconds: u64,
    pub max_migrations: u32,
    pub max_in_flight: usize,
    pub api_keys: Vec<String>,
    pub api_keys_file: Option<PathBuf>,
    pub max_body_bytes: usize,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub node_ca: Option<PathBuf>,
    pub node_client_cert: Option<PathBuf>,
    pub node_client_key: Option<PathBuf>,
    pub node_tls_domain: Option<String>,
    pub prefix_affinity: Option<bool>,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            grpc_listen: "127.0.0.1:7300".parse().expect("valid default address"),
            http_listen: "127.0.0.1:8080".parse().expect("valid default address"),
            nodes: Vec::new(),
            dns: Vec::new(),
            poll_ms: 1000,
            node_timeout_ms: 5000,
            served_model_name: None,
            default_model: None,
            shutdown_seconds: 30,
            max_migrations: 3,
            max_in_flight: 256,
            api_keys: Vec::new(),
            api_keys_file: None,
            max_body_bytes: 4 << 20,
            tls_cert: None,
            tls_key: None,
            node_ca: None,
            node_client_cert: None,
            node_client_key: None,
            node_tls_domain: None,
            prefix_affinity: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServeConfig {
    pub models: Vec<String>,
    pub nodes: usize,
    pub loops: usize,
    pub init: String,
    pub lora_rank: usize,
    pub svd: String,
    pub calibration: Option<PathBuf>,
    pub cache: Option<PathBuf>,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            models: Vec::new(),
            nodes: 1,
            loops: 2,
            init: "average".into(),
            lora_rank: 256,
            svd: "activation".into(),
            calibration: None,
            cache: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    pub listen: SocketAddr,
    pub id: Option<String>,
    pub model_name: Option<String>,
    pub kv_mib: usize,
    pub block_size: usize,
    pub max_step_rows: usize,
    pub max_running: usize,
    pub early_exit: bool,
    pub kv_fill: rrt_node::KvFill,
    pub prompt_exits: bool,
    pub drain_seconds: u64,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_client_ca: Option<PathBuf>,
    pub metrics_listen: Option<SocketAddr>,
    pub device: rrt_node::Device,
    pub gpu_weights: rrt_node::GpuWeights,
    pub cpu_products: CpuProducts,
    pub kv_dtype: KvDtype,
    pub prefix_cache_mib: usize,
}

/// The value type of the CPU KV cache (`node.kv_dtype`; one setting per process).
///
/// `f32` keeps what each layer computed (the reference); `f16` halves the cache's bytes, so
/// the same `node.kv_mib` holds twice the positions and attention reads half the bytes, at
/// the rounding llama.cpp's default cache type also makes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvDtype {
    #[default]
    F32,
    F16,
}

/// Sets the process's CPU KV cache type from `node.kv_dtype`.
pub fn apply_kv_dtype(d: KvDtype) {
    rrt_kernels::set_cpu_kv_dtype(match d {
        KvDtype::F32 => rrt_kernels::KvDtype::F32,
        KvDtype::F16 => rrt_kernels::KvDtype::F16,
    });
}

/// How the CPU multiplies activations with quantized (Q4_1 / Q8_0) weights
/// (`node.cpu_products`; one setting per process).
///
/// The default is `exact`: `int8` matches llama.cpp's arithmetic (perplexity within 0.02 % of
/// llama.cpp's on the same file, 1 % above exact) but flips greedy near-ties, e.g. the first
/// token of SmolLM2's answer to "What is the capital of France?" (exact margin 0.08), after
/// which the small model answers something else entirely.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CpuProducts {
    /// Weights dequantized exactly, f32 products: the oracle, bit-identical to f32 weights.
    #[default]
    Exact,
    /// Activations quantized to 8 bits per block, integer products (as llama.cpp): faster.
    /// LoRAs become Q8_0 blocks and run fused with the shared product.
    Int8,
}

impl From<CpuProducts> for rrt_kernels::CpuProducts {
    fn from(p: CpuProducts) -> Self {
        match p {
            CpuProducts::Exact => rrt_kernels::CpuProducts::Exact,
            CpuProducts::Int8 => rrt_kernels::CpuProducts::Int8,
        }
    }
}

/// Sets the process's CPU product mode from `node.cpu_products`.
pub fn apply_cpu_products(p: CpuProducts) {
    rrt_kernels::set_cpu_products(p.into());
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:7301".parse().expect("valid default address"),
            id: None,
            model_name: None,
            kv_mib: 1024,
            block_size: 16,
            max_step_rows: 256,
            max_running: 64,
            early_exit: true,
            kv_fill: rrt_node::KvFill::Propagate,
            prompt_exits: false,
            drain_seconds: 30,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            metrics_listen: None,
            device: rrt_node::Device::Cpu,
            gpu_weights: rrt_node::GpuWeights::Bf16,
            cpu_products: CpuProducts::Exact,
            kv_dtype: KvDtype::F32,
            prefix_cache_mib: 256,
        }
    }
}

impl NodeConfig {
    /// Where the engine computes.
    pub fn placement(&self) -> rrt_node::server::Placement {
        rrt_node::server::Placement {
            device: self.device,
            gpu_weights: self.gpu_weights,
        }
    }

    /// The engine settings these keys give (the exit rule comes from the checkpoint).
    pub fn engine_config(&self) -> rrt_node::EngineConfig {
        rrt_node::EngineConfig {
            block_size: self.block_size,
            kv_bytes: self.kv_mib << 20,
            max_step_rows: self.max_step_rows,
            max_running: self.max_running,
            kv_fill: self.kv_fill,
            prefix_cache_bytes: self.prefix_cache_mib << 20,
            prompt_exits: self.prompt_exits,
            ..Default::default()
        }
    }
}

/// Merges a command-line flag (when given) over `key`: flags beat everything else.
pub fn flag<T: Serialize>(f: Figment, key: &str, value: &Option<T>) -> Figment {
    match value {
        Some(v) => f.merge(Serialized::default(key, v)),
        None => f,
    }
}

/// Defaults, then the file, then the environment (flags are merged by the caller).
pub fn figment(file: Option<&Path>) -> Figment {
    let file = file.map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("rrt.toml"));
    Figment::from(Serialized::defaults(Config::default()))
        .merge(Toml::file(file))
        .merge(
            Env::prefixed("RRT_")
                .filter(|k| {
                    let k = k.as_str().to_ascii_lowercase();
                    k == "model"
                        || ["node__", "coordinator__", "serve__", "telemetry__"]
                            .iter()
                            .any(|p| k.starts_with(p))
                })
                .split("__"),
        )
}

impl Config {
    /// The configuration with secrets replaced, for printing.
    pub fn redacted(&self) -> Self {
        let mut c = self.clone();
        for k in &mut c.coordinator.api_keys {
            *k = "<redacted>".into();
        }
        c
    }
}

/// One entry of `serve.models`: `NAME=PATH`, or `PATH` (named by its file name).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServedSpec {
    pub name: String,
    pub path: PathBuf,
}

impl ServedSpec {
    pub fn parse(s: &str) -> Result<Self> {
        let (name, path) = match s.split_once('=') {
            Some((n, p)) => (n.trim().to_string(), PathBuf::from(p.trim())),
            None => {
                let p = PathBuf::from(s.trim());
                (rrt_node::server::default_name(&p), p)
            }
        };
        if name.is_empty() || path.as_os_str().is_empty() {
            bail!("configuration: `serve.models`: `{s}` is not NAME=PATH or PATH");
        }
        if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
            bail!("configuration: `serve.models`: the name `{name}` has spaces or control characters");
        }
        Ok(Self { name, path })
    }
}

/// Extracts and validates.
pub fn extract(f: &Figment) -> Result<Config> {
    let c: Config = f.extract().map_err(|e| anyhow::anyhow!("configuration: {e}"))?;
    let n = &c.node;
    for (key, v) in [
        ("node.kv_mib", n.kv_mib),
        ("node.block_size", n.block_size),
        ("node.max_step_rows", n.max_step_rows),
        ("node.max_running", n.max_running),
    ] {
        if v == 0 {
            bail!("configuration: `{key}` must be at least 1");
        }
    }
    c.telemetry.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut names = std::collections::HashSet::new();
    for m in &c.serve.models {
        let s = ServedSpec::parse(m)?;
        if !names.insert(s.name.clone()) {
            bail!("configuration: `serve.models`: the name `{}` is given twice", s.name);
        }
    }
    if c.node.model_name.as_deref().is_some_and(|n| n.trim().is_empty()) {
        bail!("configuration: `node.model_name` must not be empty");
    }
    let co = &c.coordinator;
    for (key, v) in [
        ("coordinator.poll_ms", co.poll_ms),
        ("coordinator.node_timeout_ms", co.node_timeout_ms),
        ("coordinator.max_in_flight", co.max_in_flight as u64),
        ("coordinator.max_body_bytes", co.max_body_bytes as u64),
    ] {
        if v == 0 {
            bail!("configuration: `{key}` must be at least 1");
        }
    }
    for (i, a) in co.nodes.iter().chain(&co.dns).enumerate() {
        let bare = a.trim_start_matches("http://").trim_start_matches("https://");
        if bare
            .rsplit_once(':')
            .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
        {
            let key = if i < co.nodes.len() {
                "coordinator.nodes"
            } else {
                "coordinator.dns"
            };
            bail!("configuration: `{key}`: `{a}` is not host:port");
        }
    }
    if let Some(p) = &co.api_keys_file
        && !p.is_file()
    {
        bail!(
            "configuration: `coordinator.api_keys_file`: {} is not a file",
            p.display()
        );
    }
    for (a, b, an, bn) in [
        (&n.tls_cert, &n.tls_key, "node.tls_cert", "node.tls_key"),
        (&co.tls_cert, &co.tls_key, "coordinator.tls_cert", "coordinator.tls_key"),
        (
            &co.node_client_cert,
            &co.node_client_key,
            "coordinator.node_client_cert",
            "coordinator.node_client_key",
        ),
    ] {
        if a.is_some() != b.is_some() {
            bail!("configuration: `{an}` and `{bn}` go together");
        }
    }
    if n.tls_client_ca.is_some() && n.tls_cert.is_none() {
        bail!("configuration: `node.tls_client_ca` needs `node.tls_cert` and `node.tls_key`");
    }
    if co.node_client_cert.is_some() && co.node_ca.is_none() {
        bail!("configuration: `coordinator.node_client_cert` needs `coordinator.node_ca`");
    }
    for (key, p) in [
        ("node.tls_cert", &n.tls_cert),
        ("node.tls_key", &n.tls_key),
        ("node.tls_client_ca", &n.tls_client_ca),
        ("coordinator.tls_cert", &co.tls_cert),
        ("coordinator.tls_key", &co.tls_key),
        ("coordinator.node_ca", &co.node_ca),
        ("coordinator.node_client_cert", &co.node_client_cert),
        ("coordinator.node_client_key", &co.node_client_key),
    ] {
        if let Some(p) = p
            && !p.is_file()
        {
            bail!("configuration: `{key}`: {} is not a file", p.display());
        }
    }
    let sv = &c.serve;
    if sv.nodes == 0 || sv.nodes > 64 {
        bail!("configuration: `serve.nodes` must be in 1..=64, got {}", sv.nodes);
    }
    if sv.loops < 1 {
        bail!("configuration: `serve.loops` must be at least 1");
    }
    if !["stepwise", "average", "lower"].contains(&sv.init.as_str()) {
        bail!(
            "configuration: `serve.init` must be stepwise, average or lower, got `{}`",
            sv.init
        );
    }
    if !["plain", "activation"].contains(&sv.svd.as_str()) {
        bail!(
            "configuration: `serve.svd` must be plain or activation, got `{}`",
            sv.svd
        );
    }
    Ok(c)
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error
mod tests {
    use super::*;

    #[test]
    fn precedence_is_defaults_file_env_flags() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "rrt.toml",
                "[node]\nkv_mib = 100\nmax_running = 7\nkv_fill = \"recompute\"\n",
            )?;
            jail.set_env("RRT_NODE__KV_MIB", "200");
            jail.set_env("RRT_LOG", "info");
            let f = figment(None).merge(Serialized::default("node.max_step_rows", 9usize));
            let c = extract(&f).map_err(|e| e.to_string())?;
            assert_eq!(c.node.kv_mib, 200, "env beats file");
            assert_eq!(c.node.max_running, 7, "file beats defaults");
            assert_eq!(c.node.kv_fill, rrt_node::KvFill::Recompute);
            assert_eq!(c.node.max_step_rows, 9, "flags beat everything");
            assert_eq!(c.node.block_size, 16, "defaults");
            Ok(())
        });
    }

    #[test]
    fn served_models_parse_and_names_must_differ() {
        let a = ServedSpec::parse("orig=models/x.gguf").unwrap();
        assert_eq!((a.name.as_str(), a.path.to_str().unwrap()), ("orig", "models/x.gguf"));
        let b = ServedSpec::parse("models/b2-r64").unwrap();
        assert_eq!(b.name, "b2-r64", "no name: the file name");
        for bad in ["=x", "name=", "two words=x"] {
            assert!(ServedSpec::parse(bad).is_err(), "{bad}");
        }
        figment::Jail::expect_with(|jail| {
            jail.create_file("rrt.toml", "[serve]\nmodels = [\"a=x.gguf\", \"b=y\"]\n")?;
            let c = extract(&figment(None)).map_err(|e| e.to_string())?;
            assert_eq!(c.serve.models, vec!["a=x.gguf".to_string(), "b=y".to_string()]);
            jail.create_file("rrt.toml", "[serve]\nmodels = [\"a=x.gguf\", \"a=y\"]\n")?;
            let e = extract(&figment(None)).unwrap_err().to_string();
            assert!(e.contains("serve.models") && e.contains("`a`"), "{e}");
            Ok(())
        });
    }

    #[test]
    fn errors_name_the_key() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("rrt.toml", "[node]\nkv_mb = 100\n")?;
            let e = extract(&figment(None)).unwrap_err().to_string();
            assert!(e.contains("kv_mb"), "{e}");
            jail.create_file("rrt.toml", "[node]\nmax_running = 0\n")?;
            let e = extract(&figment(None)).unwrap_err().to_string();
            assert!(e.contains("node.max_running"), "{e}");
            jail.create_file("rrt.toml", "")?;
            jail.set_env("RRT_NODE__KV_FILL", "sideways");
            let e = extract(&figment(None)).unwrap_err().to_string();
            assert!(e.contains("kv_fill") || e.contains("sideways"), "{e}");
            jail.set_env("RRT_NODE__KV_FILL", "recompute");
            jail.create_file("rrt.toml", "[coordinator]\nnodes = [\"10.0.0.1\"]\n")?;
            let e = extract(&figment(None)).unwrap_err().to_string();
            assert!(e.contains("coordinator.nodes") && e.contains("10.0.0.1"), "{e}");
            jail.create_file("rrt.toml", "[serve]\ninit = \"sideways\"\n")?;
            let e = extract(&figment(None)).unwrap_err().to_string();
            assert!(e.contains("serve.init"), "{e}");
            jail.create_file("rrt.toml", "")?;
            jail.set_env("RRT_COORDINATOR__HTTP_LISTEN", "not-an-address");
            let e = extract(&figment(None)).unwrap_err().to_string();
            assert!(e.to_lowercase().contains("coordinator.http_listen"), "{e}");
            Ok(())
        });
    }
}
