//! `rrt bench forward`: prefill and decode throughput of the forward pass at several batch
//! sizes, measured the way llama.cpp's `llama-batched-bench` measures them (B sequences of P
//! prompt tokens prefilled together, then G decode steps of B rows), so the two compare.

use super::ModelArg;
use anyhow::{Result, bail};
use rrt_model::forward::Row;
use rrt_model::generate::PREFILL_CHUNK;
use rrt_model::kv::{DEFAULT_BLOCK_SIZE, KvPool, SeqKv};
use rrt_model::sampling::argmax;
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub what: What,
}

#[derive(clap::Subcommand)]
pub enum What {
    /// Prefill and decode tokens/s of the forward pass.
    Forward(ForwardArgs),
    /// Throughput of the node engine: vanilla vs recursive, sequence-wise vs depth-wise
    /// batching, calibrated and oracle early exit.
    Engine(super::bench_engine::EngineArgs),
    /// The coordinator's overhead against fake nodes: added latency per streamed token and
    /// tokens/s per coordinator core.
    Coordinator(super::bench_coordinator::CoordArgs),
    /// A load generator against a running coordinator (gRPC or HTTP): open loop at Poisson
    /// rates or closed loop at concurrencies; TTFT, TPOT, throughput, errors, exit loops
    /// .
    Load(super::bench_load::LoadArgs),
    /// A cluster of simulated nodes (the real engine on a compute-free backend, paced by the
    /// costs `rrt capacity` fitted) behind a real coordinator, for `rrt bench load`.
    SimCluster(super::bench_sim::SimArgs),
    /// The weight-format measurement: all matrix products of one SmolLM2 decode step with
    /// f32 weights (gemm, skinny kernel), bf16 weights and Q4_1 blocks (dequantized exactly
    /// on the fly, or multiplied in integers with 8-bit activations).
    Matmul(MatmulArgs),
}

#[derive(clap::Args)]
pub struct MatmulArgs {
    /// Rows (batch sizes), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    pub batch: Vec<usize>,
    /// Timed repetitions per case (the median is reported).
    #[arg(long, default_value_t = 5)]
    pub reps: usize,
    /// Rank of the per-loop LoRAs in the LoRA columns (every module: q, k, v, o, gate, up,
    /// down; f32 and Q8_0), added to the int8 products on the separate and the fused path.
    #[arg(long, default_value_t = 64)]
    pub lora_rank: usize,
}

#[derive(clap::Args)]
pub struct ForwardArgs {
    #[command(flatten)]
    pub model: ModelArg,
    /// Batch sizes (parallel sequences), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    pub batch: Vec<usize>,
    /// Prompt tokens per sequence.
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,
    /// Decode steps per sequence.
    #[arg(long, default_value_t = 64)]
    pub gen_tokens: usize,
    /// Repetitions per batch size (the best is reported).
    #[arg(long, default_value_t = 2)]
    pub reps: usize,
    /// Print JSON lines instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(serde::Serialize)]
struct Line {
    batch: usize,
    prompt_tokens: usize,
    gen_tokens: usize,
    prefill_s: f64,
    prefill_tok_s: f64,
    decode_s: f64,
    decode_tok_s: f64,
}

pub fn run(a: Args) -> Result<()> {
    match a.what {
        What::Forward(f) => forward(f),
        What::Matmul(m) => matmul(m),
        What::Engine(e) => super::bench_engine::run(e),
        What::Coordinator(c) => super::bench_coordinator::run(c),
        What::Load(l) => super::bench_load::run(l),
        What::SimCluster(s) => super::bench_sim::run(s),
    }
}

/// SmolLM2-135M's products per decode step: (out, in, count).
const SMOLLM2_PRODUCTS: [(usize, usize, usize); 5] = [
    (960, 576, 30),
    (576, 576, 30),
    (3072, 576, 30),
    (576, 1536, 30),
    (49152, 576, 1),
];

fn matmul(a: MatmulArgs) -> Result<()> {
    use rrt_kernels::skinny::{matmul_skinny, matmul_skinny_bf16};
    let mut seed = 1u64;
    let mut rnd = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1
            })
            .collect()
    };
    // Distinct weights per layer so that nothing stays in cache between layers, as in a real step.
    type Mat = (usize, usize, Vec<f32>, Vec<u16>, rrt_kernels::CpuMatrix);
    let mats: Vec<Mat> = SMOLLM2_PRODUCTS
        .iter()
        .flat_map(|&(m, k, count)| (0..count).map(move |_| (m, k)))
        .map(|(m, k)| {
            let w = rnd(m * k);
            let wb = w.iter().map(|v| (v.to_bits() >> 16) as u16).collect();
            // Q4_1 blocks with scale 0.01 and min -0.08 and pseudo-random nibbles.
            let wq: Vec<u8> = (0..m * k / 32)
                .flat_map(|b| {
                    let mut blk = vec![0u8; 20];
                    blk[..2].copy_from_slice(&half::f16::from_f32(0.01).to_le_bytes());
                    blk[2..4].copy_from_slice(&half::f16::from_f32(-0.08).to_le_bytes());
                    for (i, q) in blk[4..].iter_mut().enumerate() {
                        *q = ((b * 31 + i * 7) % 256) as u8;
                    }
                    blk
                })
                .collect();
            let wq = rrt_kernels::CpuMatrix::new(
                m,
                k,
                rrt_kernels::MatrixData::Quant(rrt_kernels::qmatmul::QFormat::Q4_1, wq),
            );
            (m, k, w, wb, wq)
        })
        .collect();
    let bytes_f32: usize = mats.iter().map(|(m, k, _, _, _)| m * k * 4).sum();
    // Per product but the head, per module stacked in it, one LoRA per depth (2 depths),
    // distinct per layer as in a real model; the same adapters again as Q8_0 blocks (what
    // the CPU backend keeps under int8 products).
    let loras: Vec<Option<Vec<LoraSet>>> = mats
        .iter()
        .map(|&(m, k, ..)| {
            let (_, outs) = SMOLLM2_MODULES
                .iter()
                .find(|p| p.0 == k && p.1.iter().sum::<usize>() == m)?;
            (a.lora_rank > 0).then(|| {
                outs.iter()
                    .map(|&o| {
                        (0..2)
                            .map(|_| {
                                let r = a.lora_rank;
                                Some(rrt_kernels::backend::LoraMats {
                                    rank: r,
                                    a: f32_matrix(r, k, rnd(r * k)),
                                    b: f32_matrix(o, r, rnd(o * r)),
                                })
                            })
                            .collect()
                    })
                    .collect()
            })
        })
        .collect();
    let loras_q8: Vec<Option<Vec<LoraSet>>> = loras
        .iter()
        .map(|l| {
            l.as_ref().map(|sets| {
                sets.iter()
                    .map(|set| set.iter().map(|m| m.as_ref().map(q8_lora)).collect())
                    .collect()
            })
        })
        .collect();
    println!(
        "one SmolLM2 decode step = {} products, {:.0} MB of f32 weights; threads {}",
        mats.len(),
        bytes_f32 as f64 / 1e6,
        rayon::current_num_threads()
    );
    rrt_kernels::set_cpu_products(rrt_kernels::CpuProducts::Int8);
    println!(
        "ms per step (median of {}, the cases interleaved); LoRA rank {} on every module but the \
         head, int8 products, overhead against q4_1 int8 in brackets (median of paired ratios)",
        a.reps, a.lora_rank
    );
    print!(
        "{:>6} | {:>9} {:>9} {:>9} {:>9} {:>9} |",
        "rows", "f32 gemm", "f32 skin", "bf16 skin", "q4_1 ex", "q4_1 int8"
    );
    for name in LORA_COLUMNS {
        print!(" {name:>18}");
    }
    println!();
    for &n in &a.batch {
        let x = rnd(n * 1536);
        let mut y = vec![0f32; n * 49152];
        // One step of every case per repetition (on a worker of the pool), the cases interleaved, so that a slow spell
        // of the (shared, noisy) host falls on all of them; each LoRA overhead is the median
        // of its per-repetition ratios to the int8 step measured next to it.
        type Step<'s> = Box<dyn FnMut(usize, &Mat, &mut [f32]) + Send + 's>;
        let x = &x;
        let mut cases: Vec<Step<'_>> = vec![
            // Force the general GEMM path (gemm crate) even for few rows.
            Box::new(move |_, (m, k, w, _, _), y| {
                rrt_kernels::matmul::matmul_gemm(&x[..n * k], w, y, n, *k, *m, rrt_kernels::MatmulMode::Overwrite)
            }),
            Box::new(move |_, (m, k, w, _, _), y| matmul_skinny(&x[..n * k], w, y, n, *k, *m, false)),
            Box::new(move |_, (m, k, _, wb, _), y| matmul_skinny_bf16(&x[..n * k], wb, y, n, *k, *m)),
            Box::new(move |_, (m, k, _, _, wq), y| {
                rrt_kernels::qmatmul::matmul_q(
                    &x[..n * k],
                    rrt_kernels::qmatmul::QFormat::Q4_1,
                    q4_bytes(wq),
                    y,
                    n,
                    *k,
                    *m,
                    rrt_kernels::MatmulMode::Overwrite,
                )
            }),
            // The engine's int8 path: the matrix's packed layout (made once, as at load).
            Box::new(move |_, (_, k, _, _, wq), y| {
                packed(wq).matmul(&x[..n * k], y, n, rrt_kernels::MatmulMode::Overwrite)
            }),
        ];
        const INT8: usize = 4;
        for (sets, fused) in [(&loras, false), (&loras_q8, false), (&loras_q8, true)] {
            for depths in [1, 2] {
                cases.push(Box::new(move |i, mat, y| {
                    with_lora(mat, sets[i].as_deref(), &x[..n * mat.1], y, n, depths, fused)
                }));
            }
        }
        let mut times: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
        for rep in 0..=a.reps.max(1) {
            for (c, case) in cases.iter_mut().enumerate() {
                let t = Instant::now();
                // On a pool worker, as the engine's passes run (`rrt_kernels::on_compute_pool`).
                rrt_kernels::on_compute_pool(|| {
                    for (i, mat) in mats.iter().enumerate() {
                        case(i, mat, &mut y[..n * mat.0]);
                    }
                });
                // The first repetition warms caches and packs the matrices: not timed.
                if rep > 0 {
                    times[c].push(t.elapsed().as_secs_f64() * 1e3);
                }
            }
        }
        let median = |v: &[f64]| {
            let mut v = v.to_vec();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        print!("{n:>6} |");
        for t in &times[..=INT8] {
            print!(" {:>9.2}", median(t));
        }
        print!(" |");
        for t in &times[INT8 + 1..] {
            let ratios: Vec<f64> = t.iter().zip(&times[INT8]).map(|(l, b)| l / b).collect();
            print!(" {:>9.2} ({:>+4.0} %)", median(t), (median(&ratios) - 1.0) * 100.0);
        }
        println!();
    }
    Ok(())
}

/// Per product shape of [`SMOLLM2_PRODUCTS`] but the head: its input width and the output
/// widths of the modules stacked in it (q|k|v, o, gate|up, down).
const SMOLLM2_MODULES: [(usize, &[usize]); 4] = [
    (576, &[576, 192, 192]),
    (576, &[576]),
    (576, &[1536, 1536]),
    (1536, &[576]),
];

/// The LoRA columns of `rrt bench matmul`: f32 adapters on the separate path, Q8_0 adapters
/// on the separate path, Q8_0 on the fused path; each with one depth, then two depth groups.
const LORA_COLUMNS: [&str; 6] = [
    "f32 sep 1 depth",
    "f32 sep 2 depths",
    "q8_0 sep 1 depth",
    "q8_0 sep 2 depths",
    "q8_0 fused 1 depth",
    "q8_0 fused 2 depths",
];

/// Per depth, the LoRA of one module.
type LoraSet = Vec<Option<rrt_kernels::backend::LoraMats<rrt_kernels::CpuMatrix>>>;

/// The int8 product of `mat` plus its modules' LoRAs (`sets[module]`, one adapter per depth;
/// `None` for the LM head) for `depths` groups of rows: the separate shrink and expand
/// products after the shared one, or the fused path (`rrt_kernels::lora`).
fn with_lora(
    mat: &(usize, usize, Vec<f32>, Vec<u16>, rrt_kernels::CpuMatrix),
    sets: Option<&[LoraSet]>,
    x: &[f32],
    y: &mut [f32],
    n: usize,
    depths: usize,
    fused: bool,
) {
    use rrt_kernels::backend::{LoraColumns, RowGroup};
    let (m, k) = (mat.0, mat.1);
    let Some(sets) = sets else {
        packed(&mat.4).matmul(x, y, n, rrt_kernels::MatmulMode::Overwrite);
        return;
    };

    let mut col0 = 0;
    let cols: Vec<LoraColumns<'_, rrt_kernels::CpuMatrix>> = sets
        .iter()
        .map(|per_adapter| {
            let c = LoraColumns { col0, per_adapter };
            col0 += per_adapter[0].as_ref().map_or(0, |l| l.b.out_dim);
            c
        })
        .collect();
    let groups: Vec<RowGroup> = (0..depths)
        .map(|d| {
            let start = n * d / depths;
            RowGroup {
                start,
                len: n * (d + 1) / depths - start,
                adapter: d,
            }
        })
        .collect();
    if fused {
        // The fused path reads the process's product mode: int8, set by the caller.
        rrt_kernels::lora::linear_lora(
            x,
            n,
            &mat.4,
            None,
            &cols,
            &groups,
            y,
            rrt_kernels::MatmulMode::Overwrite,
        );
    } else {
        packed(&mat.4).matmul(x, y, n, rrt_kernels::MatmulMode::Overwrite);
        rrt_kernels::backend::lora_groups(x, n, k, m, &cols, &groups, y);
    }
}

/// The int8 kernels' layout of a (quantized) bench matrix.
fn packed(m: &rrt_kernels::CpuMatrix) -> &rrt_kernels::qdot::Packed {
    m.packed().expect("bench matrices are Q4_1")
}

/// The Q4_1 blocks of a bench matrix.
fn q4_bytes(m: &rrt_kernels::CpuMatrix) -> &[u8] {
    match &m.data {
        rrt_kernels::MatrixData::Quant(_, b) => b,
        // Bench matrices are built as Q4_1; an f32 one has no blocks.
        rrt_kernels::MatrixData::F32(_) => &[],
    }
}

fn f32_matrix(out_dim: usize, in_dim: usize, v: Vec<f32>) -> rrt_kernels::CpuMatrix {
    rrt_kernels::CpuMatrix::new(out_dim, in_dim, rrt_kernels::MatrixData::F32(v))
}

/// `l` with both matrices as Q8_0 blocks (as `rrt_kernels::Backend::lora_format` asks).
fn q8_lora(
    l: &rrt_kernels::backend::LoraMats<rrt_kernels::CpuMatrix>,
) -> rrt_kernels::backend::LoraMats<rrt_kernels::CpuMatrix> {
    let q8 = |m: &rrt_kernels::CpuMatrix| {
        let rrt_kernels::MatrixData::F32(v) = &m.data else {
            return m.clone();
        };
        let f = rrt_kernels::qmatmul::QFormat::Q8_0;
        rrt_kernels::CpuMatrix::new(
            m.out_dim,
            m.in_dim,
            rrt_kernels::MatrixData::Quant(f, rrt_model::quant::quantize(f, v)),
        )
    };
    rrt_kernels::backend::LoraMats {
        rank: l.rank,
        a: q8(&l.a),
        b: q8(&l.b),
    }
}

fn forward(a: ForwardArgs) -> Result<()> {
    if a.prompt_tokens == 0 || a.gen_tokens == 0 || a.batch.contains(&0) {
        bail!("--prompt-tokens, --gen-tokens and every --batch must be positive");
    }
    let lm = a.model.load()?;
    let model = &lm.model;
    let vocab = model.config.vocab as u64;
    if !a.json {
        println!(
            "model: {}  threads: {}  quantized products: {}",
            lm.path.display(),
            rayon::current_num_threads(),
            rrt_kernels::cpu_products()
        );
        println!(
            "{:>6} {:>6} {:>6} | {:>10} {:>12} | {:>10} {:>12}",
            "batch", "P", "G", "prefill s", "prefill t/s", "decode s", "decode t/s"
        );
    }
    for &b in &a.batch {
        let mut best: Option<Line> = None;
        for rep in 0..a.reps.max(1) {
            let total = a.prompt_tokens + a.gen_tokens;
            let mut pool = KvPool::new(
                model.kv_layout(DEFAULT_BLOCK_SIZE),
                b * total.div_ceil(DEFAULT_BLOCK_SIZE),
            );
            let mut seqs = vec![SeqKv::default(); b];
            for s in seqs.iter_mut() {
                pool.reserve(s, total)?;
            }
            // Deterministic pseudo-random prompt tokens, different per sequence and repetition.
            let tok = |s: usize, i: usize| ((s as u64 * 7919 + i as u64 * 104729 + rep as u64 * 31) % vocab) as u32;
            let mut rows: Vec<(usize, usize)> = Vec::with_capacity(b * a.prompt_tokens);
            for s in 0..b {
                for i in 0..a.prompt_tokens {
                    rows.push((s, i));
                }
            }
            let t0 = Instant::now();
            let mut next = vec![0u32; b];
            for chunk in rows.chunks(PREFILL_CHUNK) {
                let r: Vec<Row<'_>> = chunk
                    .iter()
                    .map(|&(s, i)| Row {
                        token: tok(s, i),
                        pos: i,
                        blocks: &seqs[s].blocks,
                    })
                    .collect();
                // Logits only for rows that end a prompt, as in llama-batched-bench.
                let select: Vec<usize> = chunk
                    .iter()
                    .enumerate()
                    .filter(|(_, (_, i))| *i + 1 == a.prompt_tokens)
                    .map(|(j, _)| j)
                    .collect();
                let logits = model.forward(&r, &mut pool, &select)?;
                for (k, &j) in select.iter().enumerate() {
                    next[chunk[j].0] = argmax(&logits[k * model.config.vocab..(k + 1) * model.config.vocab]);
                }
            }
            let prefill_s = t0.elapsed().as_secs_f64();
            let t1 = Instant::now();
            for step in 0..a.gen_tokens {
                let r: Vec<Row<'_>> = (0..b)
                    .map(|s| Row {
                        token: next[s],
                        pos: a.prompt_tokens + step,
                        blocks: &seqs[s].blocks,
                    })
                    .collect();
                let select: Vec<usize> = (0..b).collect();
                let logits = model.forward(&r, &mut pool, &select)?;
                for s in 0..b {
                    next[s] = argmax(&logits[s * model.config.vocab..(s + 1) * model.config.vocab]);
                }
            }
            let decode_s = t1.elapsed().as_secs_f64();
            for s in seqs.iter_mut() {
                pool.release(s);
            }
            let line = Line {
                batch: b,
                prompt_tokens: a.prompt_tokens,
                gen_tokens: a.gen_tokens,
                prefill_s,
                prefill_tok_s: (b * a.prompt_tokens) as f64 / prefill_s,
                decode_s,
                decode_tok_s: (b * a.gen_tokens) as f64 / decode_s,
            };
            let better = match &best {
                None => true,
                Some(o) => line.decode_tok_s + line.prefill_tok_s > o.decode_tok_s + o.prefill_tok_s,
            };
            if better {
                best = Some(line);
            }
        }
        let l = best.expect("at least one repetition");
        if a.json {
            println!("{}", serde_json::to_string(&l)?);
        } else {
            println!(
                "{:>6} {:>6} {:>6} | {:>10.3} {:>12.1} | {:>10.3} {:>12.1}",
                l.batch, l.prompt_tokens, l.gen_tokens, l.prefill_s, l.prefill_tok_s, l.decode_s, l.decode_tok_s
            );
        }
    }
    Ok(())
}
