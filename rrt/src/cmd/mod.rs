//! One module per subcommand, plus the model-path handling they share.

/// `println!` that ignores a closed stdout (a supervisor that stopped reading must not kill a
/// serving process).
macro_rules! say {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}

pub mod bench;
pub mod bench_coordinator;
pub mod bench_engine;
pub mod bench_load;
pub mod bench_sim;
pub mod calibrate;
pub mod capacity;
pub mod convert;
pub mod coordinator;
pub mod distill_data;
pub mod eval;
pub mod eval_exit;
pub mod generate;
pub mod node;
pub mod plot_frontier;
pub mod plot_uptrain;
pub mod quantize;
pub mod random_model;
pub mod serve;
pub mod tokenize;

use anyhow::{Context, Result};
use rrt_model::LoadedModel;
use std::path::PathBuf;

/// Span export flags of the serving commands (`telemetry.*` keys; `rrt config` shows all).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct TelemetryArgs {
    /// OTLP/gRPC collector for spans, e.g. http://localhost:4317 (`telemetry.otlp_endpoint`).
    #[arg(long)]
    pub otlp_endpoint: Option<String>,
    /// Append spans as JSON lines to this file, for `rrt capacity` (`telemetry.file`).
    #[arg(long)]
    pub trace_file: Option<PathBuf>,
}

impl TelemetryArgs {
    pub fn apply(&self, f: figment::Figment) -> figment::Figment {
        let f = crate::config::flag(f, "telemetry.otlp_endpoint", &self.otlp_endpoint);
        crate::config::flag(f, "telemetry.file", &self.trace_file)
    }
}

/// `--model`: a GGUF file or a Hugging Face directory; the fetched default model if absent.
#[derive(clap::Args, Clone, Debug)]
pub struct ModelArg {
    /// GGUF file or Hugging Face model directory (default: the cached SmolLM2-135M-Instruct).
    #[arg(long, env = "RRT_MODEL")]
    pub model: Option<PathBuf>,
}

impl ModelArg {
    pub fn path(&self) -> Result<PathBuf> {
        match &self.model {
            Some(p) => Ok(p.clone()),
            None => Ok(rrt_model::default_model_path()?),
        }
    }

    pub fn load(&self) -> Result<LoadedModel> {
        let path = self.path()?;
        let t = std::time::Instant::now();
        let lm = rrt_model::load(&path).with_context(|| format!("loading {}", path.display()))?;
        tracing::info!(path = %path.display(), secs = t.elapsed().as_secs_f64(), "model loaded");
        Ok(lm)
    }
}
