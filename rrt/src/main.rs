//! `rrt`: the command-line entry point (serve, coordinator, node, generate, convert, eval, bench...).

mod cmd;
mod config;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "rrt",
    version,
    about = "Serve and tool Relaxed Recursive Transformers",
    propagate_version = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt (streams to stdout) or a chat message.
    Generate(cmd::generate::Args),
    /// Convert a pretrained model into a relaxed recursive checkpoint.
    Convert(cmd::convert::Args),
    /// Rewrite a recursive checkpoint with its matrices in another format (f32, q8_0, q4_1).
    Quantize(cmd::quantize::Args),
    /// Calibrate the early-exit thresholds of a recursive checkpoint.
    Calibrate(cmd::calibrate::Args),
    /// Build the uptraining corpus: text the original model samples itself plus a text file,
    /// tokenized, with a held-out split (for the trainer in `train/`).
    DistillData(cmd::distill_data::Args),
    /// Print the token ids of a text as a JSON array.
    Tokenize(cmd::tokenize::Args),
    /// Perplexity over non-overlapping windows of a text file.
    Eval(cmd::eval::Args),
    /// Perplexity and agreement of early exit through the engine, propagate vs recompute KV fill.
    EvalExit(cmd::eval_exit::Args),
    /// Run a node: the engine behind the internal Node gRPC service.
    Node(cmd::node::Args),
    /// Run a coordinator: client gRPC and OpenAI HTTP in front of nodes.
    Coordinator(cmd::coordinator::Args),
    /// The embedded cluster: a coordinator and in-process nodes on the default model.
    Serve(cmd::serve::Args),
    /// Print the effective configuration (defaults < rrt.toml < RRT_* < these flags).
    Config(cmd::serve::Args),
    /// Benchmarks (not tests): `rrt bench forward`.
    Bench(cmd::bench::Args),
    /// Capacity planning from traces: fit a node's step costs, simulate, size the cluster.
    Capacity(cmd::capacity::Args),
    /// Write a random-weight model shaped like a published one (`--like ouro-1.4b`).
    RandomModel(cmd::random_model::Args),
    /// Tabulate and plot an exit checkpoint's speed/quality frontier (scripts/exit-frontier.sh).
    PlotFrontier(cmd::plot_frontier::Args),
    /// Plot an uptraining run's log (per-loop KL and held-out perplexity) as SVG.
    PlotUptrain(cmd::plot_uptrain::Args),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // The serving commands set up logging with span export from their configuration.
    if !matches!(
        cli.command,
        Command::Node(_) | Command::Coordinator(_) | Command::Serve(_)
    ) {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("RRT_LOG").unwrap_or_else(|_| "warn".into()))
            .with_writer(std::io::stderr)
            .init();
    }
    // The offline tools multiply like the nodes (`node.cpu_products` from rrt.toml or
    // RRT_NODE__CPU_PRODUCTS); conversion always computes exactly; the serving commands apply
    // their own configuration.
    if !matches!(
        cli.command,
        Command::Node(_) | Command::Coordinator(_) | Command::Serve(_) | Command::Config(_) | Command::Convert(_)
    ) {
        match config::figment(None).extract_inner::<config::CpuProducts>("node.cpu_products") {
            Ok(p) => config::apply_cpu_products(p),
            Err(e) => {
                eprintln!("error: node.cpu_products: {e}");
                return std::process::ExitCode::FAILURE;
            }
        }
        match config::figment(None).extract_inner::<config::KvDtype>("node.kv_dtype") {
            Ok(d) => config::apply_kv_dtype(d),
            Err(e) if e.missing() => {}
            Err(e) => {
                eprintln!("error: node.kv_dtype: {e}");
                return std::process::ExitCode::FAILURE;
            }
        }
    }
    let result: Result<()> = match cli.command {
        Command::Generate(a) => cmd::generate::run(a),
        Command::Convert(a) => cmd::convert::run(a),
        Command::Quantize(a) => cmd::quantize::run(a),
        Command::Calibrate(a) => cmd::calibrate::run(a),
        Command::Tokenize(a) => cmd::tokenize::run(a),
        Command::DistillData(a) => cmd::distill_data::run(a),
        Command::Eval(a) => cmd::eval::run(a),
        Command::EvalExit(a) => cmd::eval_exit::run(a),
        Command::Node(a) => cmd::node::run(a),
        Command::Coordinator(a) => cmd::coordinator::run(a),
        Command::Serve(a) => cmd::serve::run(a),
        Command::Config(a) => config::extract(&a.figment()).and_then(|c| {
            print!("{}", toml::to_string_pretty(&c.redacted())?);
            Ok(())
        }),
        Command::Bench(a) => cmd::bench::run(a),
        Command::Capacity(a) => cmd::capacity::run(a),
        Command::RandomModel(a) => cmd::random_model::run(a),
        Command::PlotFrontier(a) => cmd::plot_frontier::run(a),
        Command::PlotUptrain(a) => cmd::plot_uptrain::run(a),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
