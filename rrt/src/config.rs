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
//! | `node.kv_mib` | 1024 | KV cache budget, MiB |
//! | `node.block_size` | 16 | positions per KV block |
//! | `node.max_step_rows` | 256 | most rows (tokens x loops) per pass |
//! | `node.max_running` | 64 | most sequences holding KV at once |
//! | `node.early_exit` | true | exit at the checkpoint's calibrated thresholds |
//! | `node.kv_fill` | `propagate` | `propagate` or `recompute`: K/V of skipped loops |
//! | `node.drain_seconds` | 30 | time to finish in-flight requests after SIGTERM |

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
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    pub listen: SocketAddr,
    pub id: Option<String>,
    pub kv_mib: usize,
    pub block_size: usize,
    pub max_step_rows: usize,
    pub max_running: usize,
    pub early_exit: bool,
    pub kv_fill: rrt_node::KvFill,
    pub drain_seconds: u64,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:7301".parse().expect("valid default address"),
            id: None,
            kv_mib: 1024,
            block_size: 16,
            max_step_rows: 256,
            max_running: 64,
            early_exit: true,
            kv_fill: rrt_node::KvFill::Propagate,
            drain_seconds: 30,
        }
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
                    k == "model" || k.starts_with("node__")
                })
                .split("__"),
        )
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
            Ok(())
        });
    }
}
