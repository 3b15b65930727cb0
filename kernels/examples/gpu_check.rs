//! The prepared GPU check of the CUDA backend, run by `scripts/gpu-check.sh` on a machine with
//! a GPU and no Rust. In this order, so a broken environment costs seconds and the correctness
//! table is written before anything slow:
//!
//! 1. **Smoke** (seconds): driver, device, one NVRTC compile of a tiny kernel, one allocation,
//!    one launch, its result read back.
//! 2. **Backend**: every kernel family compiled once (in parallel, or read from the kernel
//!    cache), shared by the bf16 and the f16 backend ([`CudaBackend::sibling`]).
//! 3. **Correctness** against `CpuBackend` on fresh random inputs: every operation at row counts
//!    that reach every GEMV instance and every tensor-core row guard (1, 2, 3, 4, 8, 13, 16, 17,
//!    64, 100, 256, 2048), bf16 and f16 weights, mixed loop depths with an empty group, the
//!    per-call and the per-pass (prepared rows) paths, attention at head_dim 64 and 128 with
//!    block sizes 16 and 7, windows (none, 100, 0: nothing to attend to), and NaN handling of
//!    the LM-head reduction. Each row of the table has a norm-wise error, a per-element error
//!    (max |out - ref| over the reference's RMS: one wrong column fails it), a guard check
//!    (NaN cells after every output must be untouched; outputs are NaN-poisoned first) and a
//!    bit-for-bit repeat of the same call.
//! 4. **Timings** (CUDA events; weights rotated beyond the L2): per product and row count,
//!    single calls (median of 30) and 100 back-to-back calls, with and without LoRA (its
//!    overhead at decode sizes too), bandwidth against the device-to-device copy measured in
//!    the same run and against the H200's 4.8 TB/s, and cuBLAS baselines when cuBLAS is
//!    present (it is optional: only the baselines need it).
//!
//! Every check skipped for lack of time counts as a failure. Exit status 0 when every check
//! passed, 1 otherwise, 2 when the GPU or a required library is missing.
//!
//! Build: `cargo build -p rrt-kernels --release --features cuda --example gpu_check`.
//! Env: `RRT_SEED` (inputs), `RRT_CHECK_BUDGET_S` (default 300), `RRT_CHECK_OUT` (a folder:
//! the correctness table and timings are also written there as Markdown).

use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::cublas::{CudaBlas, result as blas};
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg};
use rand::{Rng, SeedableRng};
use rrt_kernels::backend::{BackendError, HostRows, KvSlot, LoraColumns, LoraMats, PassRow, RowGroup};
use rrt_kernels::cuda::{CudaBackend, CudaBuf, WeightType, cuda_available, probe_cublas, probe_nvrtc};
use rrt_kernels::{
    AttnRow, AttnShape, Backend, CpuBackend, HeadTop, KvLayout, MatmulMode, MatrixData, RopeScaling, RopeTable,
};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Instant;

type Rng64 = rand_chacha::ChaCha8Rng;
/// Per depth: a LoRA's A and B host data, or none.
type HostLoras = Vec<Option<(Vec<f32>, Vec<f32>)>>;
/// Per entry: its first column and per depth its resident LoRA.
type EntryLoras<M> = Vec<(usize, Vec<Option<LoraMats<M>>>)>;

/// NaN cells after every output buffer; they must come back untouched.
const GUARD: usize = 67;
/// The H200's datasheet bandwidth (HBM3e), bytes per second.
const H200_BW: f64 = 4.8e12;
/// Loop depths of the checked LoRAs.
const LOOPS: usize = 3;

/// The check keeps going after a device error: the error is sticky on the backend (every later
/// operation fails too; `check()` reports it at the end) and the outputs left as they were
/// fail their comparisons.
trait Keep {
    fn keep(self);
}

impl Keep for Result<(), BackendError> {
    fn keep(self) {}
}

/// A value the check cannot go on without (an allocation, a download): a device error ends it
/// with the error's message.
trait Must<T> {
    fn must(self) -> T;
}

impl<T> Must<T> for Result<T, BackendError> {
    fn must(self) -> T {
        self.unwrap_or_else(|e| panic!("device operation failed: {e}"))
    }
}

fn budget_s() -> f64 {
    std::env::var("RRT_CHECK_BUDGET_S")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300.0)
}

// ---------------------------------------------------------------------------------------------
// Inputs and error metrics.

fn round_to(wt: WeightType, v: f32) -> f32 {
    wt.decode(wt.encode(v))
}

fn rand_vec(rng: &mut Rng64, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0) * scale).collect()
}

/// Random weights already in the storage type, so both backends multiply the same numbers.
fn rand_w(rng: &mut Rng64, wt: WeightType, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| round_to(wt, rng.random_range(-1.0f32..1.0) * scale))
        .collect()
}

/// `values` followed by the NaN guard.
fn guarded(mut values: Vec<f32>) -> Vec<f32> {
    values.extend(std::iter::repeat_n(f32::NAN, GUARD));
    values
}

/// Norm-wise relative error ||out - ref|| / ||ref|| (infinite on a non-finite output where
/// the reference is finite, or on a length mismatch).
fn rel_err(out: &[f32], want: &[f32]) -> f64 {
    if out.len() != want.len() {
        return f64::INFINITY;
    }
    let (mut d, mut r) = (0f64, 0f64);
    for (o, w) in out.iter().zip(want) {
        let (o, w) = (*o as f64, *w as f64);
        if !o.is_finite() && w.is_finite() {
            return f64::INFINITY;
        }
        if w.is_finite() {
            d += (o - w) * (o - w);
            r += w * w;
        }
    }
    if r == 0.0 { d.sqrt() } else { (d / r).sqrt() }
}

/// Per-element error: max |out - ref| over the RMS of the reference (a single wrong element
/// of typical size scores about 1). Non-finite reference elements must be matched exactly
/// (same class: NaN, +inf, -inf).
fn elem_err(out: &[f32], want: &[f32]) -> f64 {
    if out.len() != want.len() {
        return f64::INFINITY;
    }
    let fin: Vec<f64> = want.iter().filter(|w| w.is_finite()).map(|&w| w as f64).collect();
    let rms = (fin.iter().map(|w| w * w).sum::<f64>() / fin.len().max(1) as f64).sqrt();
    let scale = if rms > 0.0 { rms } else { 1.0 };
    let mut e = 0f64;
    for (o, w) in out.iter().zip(want) {
        if w.is_finite() {
            if !o.is_finite() {
                return f64::INFINITY;
            }
            e = e.max((*o as f64 - *w as f64).abs() / scale);
        } else if !(w.is_nan() && o.is_nan() || *o == *w) {
            return f64::INFINITY;
        }
    }
    e
}

/// Whether the guard after `n` values is still all NaN.
fn guard_ok(buf: &[f32], n: usize) -> bool {
    buf.len() == n + GUARD && buf[n..].iter().all(|v| v.is_nan())
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

// ---------------------------------------------------------------------------------------------
// The report.

#[derive(Default)]
struct Report {
    md: String,
    checks: usize,
    failed: usize,
    skipped: usize,
}

/// One row of the correctness table.
struct Row<'a> {
    op: &'a str,
    shape: &'a str,
    rows: usize,
    rel: f64,
    elem: f64,
    tol: f64,
    guard: Option<bool>,
    repeat: Option<bool>,
}

impl Report {
    fn line(&mut self, s: String) {
        println!("{s}");
        self.md.push_str(&s);
        self.md.push('\n');
    }

    fn add(&mut self, r: Row<'_>) {
        let ok = r.elem <= r.tol && r.guard != Some(false) && r.repeat != Some(false);
        self.checks += 1;
        if !ok {
            self.failed += 1;
        }
        let yn = |v: Option<bool>| match v {
            None => "-",
            Some(true) => "ok",
            Some(false) => "FAIL",
        };
        self.line(format!(
            "| {:<30} | {:<30} | {:>5} | {:>9.2e} | {:>9.2e} | {:>7.0e} | {:>5} | {:>6} | {} |",
            r.op,
            r.shape,
            r.rows,
            r.rel,
            r.elem,
            r.tol,
            yn(r.guard),
            yn(r.repeat),
            if ok { "ok" } else { "FAIL" }
        ));
    }

    fn skip(&mut self, what: &str) {
        self.checks += 1;
        self.failed += 1;
        self.skipped += 1;
        self.line(format!("| {what} | skipped: time budget spent (counts as a failure) |"));
    }
}

// ---------------------------------------------------------------------------------------------
// Shapes and modules.

/// One model's shapes.
#[derive(Clone, Copy)]
struct Shapes {
    name: &'static str,
    hidden: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    inter: usize,
    vocab: usize,
    rank: usize,
}

const SMOL: Shapes = Shapes {
    name: "smollm2-135m",
    hidden: 576,
    heads: 9,
    kv_heads: 3,
    head_dim: 64,
    inter: 1536,
    vocab: 49152,
    rank: 32,
};

const TWO_B: Shapes = Shapes {
    name: "2b-class",
    hidden: 2048,
    heads: 32,
    kv_heads: 8,
    head_dim: 64,
    inter: 16384,
    vocab: 49152,
    rank: 64,
};

/// Ouro-1.4B's attention: 16 heads = 16 KV heads of 128.
const OURO: Shapes = Shapes {
    name: "ouro-1.4b",
    hidden: 2048,
    heads: 16,
    kv_heads: 16,
    head_dim: 128,
    inter: 5632,
    vocab: 49152,
    rank: 0,
};

/// Mixed-depth groups over `n` rows: runs of depths 0, 2, an empty group of depth 1, 1, 0 (a
/// repeated depth; depth 1 has no LoRA on some entries).
fn groups_for(n: usize) -> Vec<RowGroup> {
    if n == 1 {
        return vec![
            RowGroup {
                start: 0,
                len: 0,
                adapter: 1,
            },
            RowGroup {
                start: 0,
                len: 1,
                adapter: 2,
            },
        ];
    }
    let depths = [0usize, 2, 1, 0];
    let parts = depths.len().min(n);
    let mut out = Vec::new();
    let mut start = 0;
    for (i, &d) in depths.iter().take(parts).enumerate() {
        let len = if i + 1 == parts { n - start } else { n / parts };
        if i == 2 {
            out.push(RowGroup {
                start,
                len: 0,
                adapter: 1,
            });
        }
        out.push(RowGroup { start, len, adapter: d });
        start += len;
    }
    out
}

/// Prepared-rows description of `groups` over `n` rows (the linear products read only the
/// groups).
fn rows_for_groups(n: usize, groups: &[RowGroup]) -> HostRows {
    let mut depths = vec![0u32; n];
    for g in groups {
        depths[g.start..g.start + g.len].fill(g.adapter as u32);
    }
    HostRows {
        positions: (0..n as u32).collect(),
        depths,
        groups: groups.to_vec(),
        table_of: vec![(0, 0); n],
        tables: Vec::new(),
        shared: 1,
        block_size: 16,
    }
}

/// A linear map with per-depth LoRAs on its column entries.
struct Module {
    name: &'static str,
    k: usize,
    m: usize,
    w: Vec<f32>,
    bias: Option<Vec<f32>>,
    /// (col0, cols) per entry; per entry per depth (A, B) host data or None.
    entries: Vec<(usize, usize, HostLoras)>,
    rank: usize,
}

impl Module {
    #[allow(clippy::too_many_arguments)]
    fn new(
        rng: &mut Rng64,
        wt: WeightType,
        name: &'static str,
        k: usize,
        cols: &[usize],
        rank: usize,
        bias: bool,
    ) -> Self {
        let m: usize = cols.iter().sum();
        let w = rand_w(rng, wt, m * k, 1.0 / (k as f32).sqrt());
        let mut entries = Vec::new();
        let mut col0 = 0;
        for (e, &c) in cols.iter().enumerate() {
            let per = (0..LOOPS)
                .map(|d| {
                    // Depth 1 has no LoRA on odd entries.
                    (rank > 0 && (d != 1 || e % 2 == 0)).then(|| {
                        (
                            rand_w(rng, wt, rank * k, 1.0 / (k as f32).sqrt()),
                            rand_w(rng, wt, c * rank, 0.5 / (rank as f32).sqrt()),
                        )
                    })
                })
                .collect();
            entries.push((col0, c, per));
            col0 += c;
        }
        let bias = bias.then(|| rand_vec(rng, m, 0.1));
        Self {
            name,
            k,
            m,
            w,
            bias,
            entries,
            rank,
        }
    }

    fn upload<B: Backend>(&self, be: &B) -> Resident<B> {
        let w = be.matrix(self.m, self.k, MatrixData::F32(self.w.clone())).must();
        let bias = self.bias.as_ref().map(|b| be.buffer(b.clone()).must());
        let loras = self
            .entries
            .iter()
            .map(|(col0, c, per)| {
                (
                    *col0,
                    per.iter()
                        .map(|ab| {
                            ab.as_ref().map(|(a, b)| LoraMats {
                                rank: self.rank,
                                a: be.matrix(self.rank, self.k, MatrixData::F32(a.clone())).must(),
                                b: be.matrix(*c, self.rank, MatrixData::F32(b.clone())).must(),
                            })
                        })
                        .collect::<Vec<_>>(),
                )
            })
            .collect();
        Resident { w, bias, loras }
    }

    /// Bytes a fused product over `groups` must move: W, the LoRAs of the depths present,
    /// x read, y written (and read when accumulating).
    fn bytes(&self, n: usize, groups: &[RowGroup], accumulate: bool, lora: bool) -> f64 {
        let mut b = (self.m * self.k * 2) as f64;
        let mut seen = Vec::new();
        for g in groups.iter().filter(|g| lora && g.len > 0) {
            if !seen.contains(&g.adapter) {
                seen.push(g.adapter);
                for (_, c, per) in &self.entries {
                    if per[g.adapter].is_some() {
                        b += (self.rank * (self.k + c) * 2) as f64;
                    }
                }
            }
        }
        b + (n * self.k * 4) as f64 + (n * self.m * 4 * if accumulate { 2 } else { 1 }) as f64
    }
}

struct Resident<B: Backend> {
    w: B::Mat,
    bias: Option<B::Buf>,
    loras: EntryLoras<B::Mat>,
}

impl<B: Backend> Resident<B> {
    fn cols(&self) -> Vec<LoraColumns<'_, B::Mat>> {
        self.loras
            .iter()
            .map(|(c, per)| LoraColumns {
                col0: *c,
                per_adapter: per,
            })
            .collect()
    }
}

fn modules(rng: &mut Rng64, wt: WeightType, s: &Shapes) -> Vec<(Module, MatmulMode)> {
    let (h, qd, kd) = (s.hidden, s.heads * s.head_dim, s.kv_heads * s.head_dim);
    vec![
        (
            Module::new(rng, wt, "qkv", h, &[qd, kd, kd], s.rank, true),
            MatmulMode::Overwrite,
        ),
        (
            Module::new(rng, wt, "o", qd, &[h], s.rank, false),
            MatmulMode::Accumulate,
        ),
        (
            Module::new(rng, wt, "gate_up", h, &[s.inter, s.inter], s.rank, false),
            MatmulMode::Overwrite,
        ),
        (
            Module::new(rng, wt, "down", s.inter, &[h], s.rank, false),
            MatmulMode::Accumulate,
        ),
    ]
}

// ---------------------------------------------------------------------------------------------
// Correctness.

struct Ctx<'a> {
    gpu: &'a CudaBackend,
    rep: &'a mut Report,
    rng: &'a mut Rng64,
    start: Instant,
}

impl Ctx<'_> {
    fn out_of_time(&self, frac: f64) -> bool {
        self.start.elapsed().as_secs_f64() > budget_s() * frac
    }
}

const PRODUCT_ROWS: [usize; 12] = [1, 2, 3, 4, 8, 13, 16, 17, 64, 100, 256, 2048];

fn check_products(cx: &mut Ctx<'_>, gpu: &CudaBackend, wt: WeightType, s: &Shapes, rows: &[usize]) {
    let cpu = CpuBackend;
    let tag = wt.suffix();
    for (module, mode) in modules(cx.rng, wt, s) {
        let rc = module.upload(&cpu);
        let rg = module.upload(gpu);
        let shape = format!("{} {} {}x{}->{}", s.name, tag, module.name, module.k, module.m);
        for &n in rows {
            if n == 2048 && module.m * module.k > 8 << 20 {
                continue; // the CPU oracle of the largest products would dominate the budget
            }
            if cx.out_of_time(0.5) {
                cx.rep.skip(&format!("linear_lora {shape} rows {n}"));
                continue;
            }
            let groups = groups_for(n);
            let x = rand_vec(cx.rng, n * module.k, 1.0);
            let init: Vec<f32> = if mode == MatmulMode::Accumulate {
                rand_vec(cx.rng, n * module.m, 1.0)
            } else {
                vec![f32::NAN; n * module.m]
            };
            let mut yc = init.clone();
            cpu.linear_lora(&x, n, &rc.w, rc.bias.as_ref(), &rc.cols(), &groups, &mut yc, mode)
                .keep();
            // bf16 x on the tensor cores above 16 rows; f32 x (exact weights) below.
            let tol = match (n > 16, wt) {
                (false, _) => 1e-4,
                (true, WeightType::Bf16) => 3e-2,
                (true, WeightType::F16) => 1e-2,
            };
            let xg = gpu.buffer(x).must();
            // The per-call path.
            let mut yg = gpu.buffer(guarded(init.clone())).must();
            gpu.linear_lora(&xg, n, &rg.w, rg.bias.as_ref(), &rg.cols(), &groups, &mut yg, mode)
                .keep();
            let out = gpu.to_host(&yg).must();
            let mut yg2 = gpu.buffer(guarded(init.clone())).must();
            gpu.linear_lora(&xg, n, &rg.w, rg.bias.as_ref(), &rg.cols(), &groups, &mut yg2, mode)
                .keep();
            let out2 = gpu.to_host(&yg2).must();
            cx.rep.add(Row {
                op: "linear_lora",
                shape: &shape,
                rows: n,
                rel: rel_err(&out[..n * module.m], &yc),
                elem: elem_err(&out[..n * module.m], &yc),
                tol,
                guard: Some(guard_ok(&out, n * module.m)),
                repeat: Some(same_bits(&out, &out2)),
            });
            // The per-pass path (prepared rows), as the engine runs it.
            let prepared = gpu.prepare_rows(vec![rows_for_groups(n, &groups)]).must();
            let mut yr = gpu.buffer(guarded(init.clone())).must();
            gpu.linear_lora_rows(&xg, &prepared[0], &rg.w, rg.bias.as_ref(), &rg.cols(), &mut yr, mode)
                .keep();
            let outr = gpu.to_host(&yr).must();
            cx.rep.add(Row {
                op: "linear_lora_rows",
                shape: &shape,
                rows: n,
                rel: rel_err(&outr[..n * module.m], &yc),
                elem: elem_err(&outr[..n * module.m], &yc),
                tol,
                guard: Some(guard_ok(&outr, n * module.m)),
                // The same kernels as the per-call path: bit-identical.
                repeat: Some(same_bits(&outr, &out)),
            });
        }
    }
}

/// A KV pool with random contents and `seqs` sequences of random lengths over shuffled
/// blocks; returns (tables, context lengths, pool contents).
fn random_pool(
    rng: &mut Rng64,
    layout: &KvLayout,
    seqs: usize,
    per_seq: usize,
) -> (Vec<Vec<u32>>, Vec<usize>, Vec<f32>) {
    let ctx_len: Vec<usize> = (0..seqs).map(|_| per_seq + rng.random_range(0..1500usize)).collect();
    let blocks_per: Vec<usize> = ctx_len.iter().map(|c| c.div_ceil(layout.block_size)).collect();
    let n_blocks: usize = blocks_per.iter().sum::<usize>() + 3;
    let mut ids: Vec<u32> = (0..n_blocks as u32).collect();
    for i in (1..ids.len()).rev() {
        let j = rng.random_range(0..=i);
        ids.swap(i, j);
    }
    let mut tables = Vec::new();
    let mut o = 0;
    for b in &blocks_per {
        tables.push(ids[o..o + b].to_vec());
        o += b;
    }
    let pool = rand_vec(rng, n_blocks * layout.block_floats(), 1.0);
    (tables, ctx_len, pool)
}

/// KV writes and attention, per call and per pass, for one attention shape and block size.
#[allow(clippy::too_many_arguments)]
fn check_attention(cx: &mut Ctx<'_>, s: &Shapes, block_size: usize, n: usize) {
    let cpu = CpuBackend;
    let gpu = cx.gpu;
    let (qd, kd) = (s.heads * s.head_dim, s.kv_heads * s.head_dim);
    let qkvd = qd + 2 * kd;
    let shared = 2;
    let layout = KvLayout {
        n_layers: shared * LOOPS,
        block_size,
        n_kv_heads: s.kv_heads,
        head_dim: s.head_dim,
    };
    let tag = format!("{} hd{} bs{}", s.name, s.head_dim, block_size);
    let seqs = if n == 1 { 1 } else { 4 };
    let per_seq = n.div_ceil(seqs);
    let (tables, ctx_len, pool) = random_pool(cx.rng, &layout, seqs, per_seq);
    let n_blocks = pool.len() / layout.block_floats();
    let all: Vec<u32> = (0..n_blocks as u32).collect();
    let mut pc = rrt_kernels::CpuKv::F32(pool.clone());
    let mut pg = gpu.kv_pool(layout, n_blocks).must();
    gpu.kv_import(
        &mut pg,
        &layout,
        &all,
        &cpu.kv_export(&pc, &layout, &all, n_blocks * block_size).must(),
    )
    .keep();
    // Rows: sequence i % seqs at its last positions, loop depth i % LOOPS.
    let prow: Vec<PassRow<'_>> = (0..n)
        .map(|i| {
            let sq = i % seqs;
            PassRow {
                pos: ctx_len[sq] - per_seq + i / seqs,
                depth: i % LOOPS,
                blocks: &tables[sq],
            }
        })
        .collect();
    let host = HostRows::new(&prow, shared, block_size);
    let qkv = rand_vec(cx.rng, n * qkvd, 1.0);
    let qkvg = gpu.buffer(qkv.clone()).must();
    // Per call: the slots and rows of shared layer 1.
    let k = 1;
    let slots: Vec<KvSlot> = host.slots(k);
    cpu.kv_write(&mut pc, &layout, &qkv, qkvd, qd, qd + kd, &slots).keep();
    gpu.kv_write(&mut pg, &layout, &qkvg, qkvd, qd, qd + kd, &slots).keep();
    let exp_c = cpu.kv_export(&pc, &layout, &all, n_blocks * block_size).must();
    let exp_g = gpu.kv_export(&pg, &layout, &all, n_blocks * block_size).must();
    cx.rep.add(Row {
        op: "kv_write+kv_export",
        shape: &tag,
        rows: n,
        rel: rel_err(&exp_g, &exp_c),
        elem: elem_err(&exp_g, &exp_c),
        tol: 0.0,
        guard: None,
        repeat: None,
    });
    // Per pass: shared layer 0 through the prepared rows (slots computed on the device).
    let prepared_c = cpu.prepare_rows(vec![host.clone()]).must();
    let prepared_g = gpu.prepare_rows(vec![host.clone()]).must();
    cpu.kv_write_rows(&mut pc, &layout, &qkv, qkvd, qd, qd + kd, &prepared_c[0], 0)
        .keep();
    gpu.kv_write_rows(&mut pg, &layout, &qkvg, qkvd, qd, qd + kd, &prepared_g[0], 0)
        .keep();
    let exp_c = cpu.kv_export(&pc, &layout, &all, n_blocks * block_size).must();
    let exp_g = gpu.kv_export(&pg, &layout, &all, n_blocks * block_size).must();
    cx.rep.add(Row {
        op: "kv_write_rows+kv_export",
        shape: &tag,
        rows: n,
        rel: rel_err(&exp_g, &exp_c),
        elem: elem_err(&exp_g, &exp_c),
        tol: 0.0,
        guard: None,
        repeat: None,
    });
    for window in [None, Some(100), Some(0)] {
        let shape = AttnShape {
            n_heads: s.heads,
            window,
            scale: 1.0 / (s.head_dim as f32).sqrt(),
        };
        let wname = match window {
            None => String::new(),
            Some(w) => format!(" (window {w})"),
        };
        for (k, per_pass) in [(1usize, false), (0, true)] {
            let mut ac = vec![0f32; n * qd];
            let arows: Vec<AttnRow<'_>> = host.attn_rows(k);
            cpu.attention(&qkv, qkvd, &arows, &pc, &layout, shape, &mut ac).keep();
            let mut ag = gpu.buffer(guarded(vec![f32::NAN; n * qd])).must();
            let mut ag2 = gpu.buffer(guarded(vec![f32::NAN; n * qd])).must();
            if per_pass {
                gpu.attention_rows(&qkvg, qkvd, &prepared_g[0], k, &pg, &layout, shape, &mut ag)
                    .keep();
                gpu.attention_rows(&qkvg, qkvd, &prepared_g[0], k, &pg, &layout, shape, &mut ag2)
                    .keep();
            } else {
                gpu.attention(&qkvg, qkvd, &arows, &pg, &layout, shape, &mut ag).keep();
                gpu.attention(&qkvg, qkvd, &arows, &pg, &layout, shape, &mut ag2).keep();
            }
            let (o1, o2) = (gpu.to_host(&ag).must(), gpu.to_host(&ag2).must());
            let op = format!("{}{wname}", if per_pass { "attention_rows" } else { "attention" });
            cx.rep.add(Row {
                op: &op,
                shape: &tag,
                rows: n,
                rel: rel_err(&o1[..n * qd], &ac),
                elem: elem_err(&o1[..n * qd], &ac),
                tol: 1e-4,
                guard: Some(guard_ok(&o1, n * qd)),
                repeat: Some(same_bits(&o1, &o2)),
            });
        }
    }
}

#[allow(clippy::too_many_lines)]
fn check_ops(cx: &mut Ctx<'_>, s: &Shapes, rows: &[usize]) {
    let cpu = CpuBackend;
    let gpu = cx.gpu;
    let wt = gpu.weight_type();
    let (h, qd, kd) = (s.hidden, s.heads * s.head_dim, s.kv_heads * s.head_dim);
    let qkvd = qd + 2 * kd;
    let eps = 1e-5f32;
    // Embedding / tied head in the storage type; row 5 of the head is NaN (a NaN logit in
    // every row: the LM-head reduction must treat it as -inf on both backends).
    let mut table = rand_w(cx.rng, wt, s.vocab * h, 1.0);
    let emb_c = cpu.matrix(s.vocab, h, MatrixData::F32(table.clone())).must();
    let emb_g = gpu.matrix(s.vocab, h, MatrixData::F32(table.clone())).must();
    table[5 * h..6 * h].fill(f32::NAN);
    let head_g = gpu.matrix(s.vocab, h, MatrixData::F32(table)).must();
    let norm_w: Vec<f32> = rand_vec(cx.rng, h, 0.5).iter().map(|v| 1.0 + v).collect();
    let (nw_c, nw_g) = (norm_w.clone(), gpu.buffer(norm_w).must());
    let rope = RopeTable::new(s.head_dim, s.head_dim, 10000.0, &RopeScaling::None);
    let tag = s.name;
    for &n in rows {
        if cx.out_of_time(0.7) {
            cx.rep.skip(&format!("other ops {tag} rows {n}"));
            continue;
        }
        // embed
        let tokens: Vec<u32> = (0..n).map(|_| cx.rng.random_range(0..s.vocab as u32)).collect();
        let mut ec = vec![0f32; n * h];
        cpu.embed(&emb_c, &tokens, &mut ec).keep();
        let mut eg = gpu.buffer(guarded(vec![f32::NAN; n * h])).must();
        gpu.embed(&emb_g, &tokens, &mut eg).keep();
        let e = gpu.to_host(&eg).must();
        cx.rep.add(Row {
            op: "embed",
            shape: tag,
            rows: n,
            rel: rel_err(&e[..n * h], &ec),
            elem: elem_err(&e[..n * h], &ec),
            tol: 0.0,
            guard: Some(guard_ok(&e, n * h)),
            repeat: None,
        });
        // copy_rows (reversed order into an offset)
        let src = rand_vec(cx.rng, n * h, 1.0);
        let rws: Vec<u32> = (0..n as u32).rev().collect();
        let mut dc = vec![0f32; (n + 3) * h];
        cpu.copy_rows(&src, &rws, &mut dc, 3, h).keep();
        let sg = gpu.buffer(src.clone()).must();
        let mut dg = gpu.buffer(guarded(vec![0f32; (n + 3) * h])).must();
        gpu.copy_rows(&sg, &rws, &mut dg, 3, h).keep();
        let d = gpu.to_host(&dg).must();
        cx.rep.add(Row {
            op: "copy_rows",
            shape: tag,
            rows: n,
            rel: rel_err(&d[..(n + 3) * h], &dc),
            elem: elem_err(&d[..(n + 3) * h], &dc),
            tol: 0.0,
            guard: Some(guard_ok(&d, (n + 3) * h)),
            repeat: None,
        });
        // rmsnorm (the output is exactly n x h: the guard is checked through add_rmsnorm's
        // separate output below, rmsnorm derives its rows from x)
        let mut rc = vec![0f32; n * h];
        cpu.rmsnorm(&src, &nw_c, eps, &mut rc).keep();
        let mut rgb = gpu.buffer(vec![f32::NAN; n * h]).must();
        gpu.rmsnorm(&sg, &nw_g, eps, &mut rgb).keep();
        let r = gpu.to_host(&rgb).must();
        cx.rep.add(Row {
            op: "rmsnorm",
            shape: tag,
            rows: n,
            rel: rel_err(&r, &rc),
            elem: elem_err(&r, &rc),
            tol: 1e-5,
            guard: None,
            repeat: None,
        });
        // add_rmsnorm: x += r; out = norm(x)
        let rr = rand_vec(cx.rng, n * h, 1.0);
        let mut xc = src.clone();
        xc.iter_mut().zip(&rr).for_each(|(a, b)| *a += b);
        let mut oc = vec![0f32; n * h];
        cpu.rmsnorm(&xc, &nw_c, eps, &mut oc).keep();
        let mut xg = gpu.buffer(src.clone()).must();
        let rgpu = gpu.buffer(rr).must();
        let mut og = gpu.buffer(guarded(vec![f32::NAN; n * h])).must();
        let res = gpu.add_rmsnorm(&mut xg, &rgpu, &nw_g, eps, &mut og);
        let (o, xo) = (gpu.to_host(&og).must(), gpu.to_host(&xg).must());
        let ok = res.is_ok();
        cx.rep.add(Row {
            op: "add_rmsnorm",
            shape: tag,
            rows: n,
            rel: if ok {
                rel_err(&o[..n * h], &oc).max(rel_err(&xo, &xc))
            } else {
                f64::INFINITY
            },
            elem: if ok {
                elem_err(&o[..n * h], &oc).max(elem_err(&xo, &xc))
            } else {
                f64::INFINITY
            },
            tol: 1e-5,
            guard: Some(guard_ok(&o, n * h)),
            repeat: None,
        });
        // silu_mul
        let gu = rand_vec(cx.rng, n * 2 * s.inter, 3.0);
        let mut sc = vec![0f32; n * s.inter];
        cpu.silu_mul(&gu, n, s.inter, &mut sc).keep();
        let gug = gpu.buffer(gu).must();
        let mut sgo = gpu.buffer(guarded(vec![f32::NAN; n * s.inter])).must();
        gpu.silu_mul(&gug, n, s.inter, &mut sgo).keep();
        let so = gpu.to_host(&sgo).must();
        cx.rep.add(Row {
            op: "silu_mul",
            shape: tag,
            rows: n,
            rel: rel_err(&so[..n * s.inter], &sc),
            elem: elem_err(&so[..n * s.inter], &sc),
            tol: 1e-6,
            guard: Some(guard_ok(&so, n * s.inter)),
            repeat: None,
        });
        // rope: positions spread up to 100k, per call and through prepared rows
        let qkv = rand_vec(cx.rng, n * qkvd, 1.0);
        let positions: Vec<u32> = (0..n).map(|_| cx.rng.random_range(0..100_000u32)).collect();
        let mut qc = qkv.clone();
        cpu.rope(&rope, &mut qc, qkvd, &positions, qd, qd, kd).keep();
        let mut qg = gpu.buffer(guarded(qkv.clone())).must();
        gpu.rope(&rope, &mut qg, qkvd, &positions, qd, qd, kd).keep();
        let q1 = gpu.to_host(&qg).must();
        let mut hr = rows_for_groups(n, &[]);
        hr.positions = positions.clone();
        let prepared = gpu.prepare_rows(vec![hr]).must();
        let mut qg2 = gpu.buffer(guarded(qkv.clone())).must();
        gpu.rope_rows(&rope, &mut qg2, qkvd, &prepared[0], qd, qd, kd).keep();
        let q2 = gpu.to_host(&qg2).must();
        cx.rep.add(Row {
            op: "rope (+ rope_rows bits)",
            shape: tag,
            rows: n,
            rel: rel_err(&q1[..n * qkvd], &qc),
            elem: elem_err(&q1[..n * qkvd], &qc),
            tol: 1e-5,
            guard: Some(guard_ok(&q1, n * qkvd)),
            repeat: Some(same_bits(&q1, &q2)),
        });
        // logits + selection + head_top + cosine on up to 64 selected rows; the last selected
        // row is NaN (an all-NaN logit row).
        let sel: Vec<u32> = (0..n.min(64) as u32).map(|i| (i * 7) % n as u32).collect();
        let lc = cpu.logits(&src, h, &sel, Some(&nw_c), eps, &emb_c).must();
        let lg = gpu.logits(&sg, h, &sel, Some(&nw_g), eps, &emb_g).must();
        cx.rep.add(Row {
            op: "logits",
            shape: tag,
            rows: sel.len(),
            rel: rel_err(&lg, &lc),
            elem: elem_err(&lg, &lc),
            tol: if wt == WeightType::Bf16 { 3e-2 } else { 1e-2 },
            guard: None,
            repeat: None,
        });
        // Without the final norm (a model whose loop output is already normed).
        let lc0 = cpu.logits(&src, h, &sel, None, eps, &emb_c).must();
        let lg0 = gpu.logits(&sg, h, &sel, None, eps, &emb_g).must();
        cx.rep.add(Row {
            op: "logits (no final norm)",
            shape: tag,
            rows: sel.len(),
            rel: rel_err(&lg0, &lc0),
            elem: elem_err(&lg0, &lc0),
            tol: if wt == WeightType::Bf16 { 3e-2 } else { 1e-2 },
            guard: None,
            repeat: None,
        });
        // The sandwich norm's residual branch: x += rmsnorm(t) * w.
        let t = rand_vec(cx.rng, n * h, 2.0);
        let mut xb_c = src.clone();
        cpu.add_normed_branch(&t, &nw_c, eps, &mut xb_c).keep();
        let mut xb_g = gpu.buffer(guarded(src.clone())).must();
        gpu.add_normed_branch(&gpu.buffer(t).must(), &nw_g, eps, &mut xb_g)
            .keep();
        let xb = gpu.to_host(&xb_g).must();
        cx.rep.add(Row {
            op: "add_normed_branch",
            shape: tag,
            rows: n,
            rel: rel_err(&xb[..n * h], &xb_c),
            elem: elem_err(&xb[..n * h], &xb_c),
            tol: 1e-5,
            guard: Some(guard_ok(&xb, n * h)),
            repeat: None,
        });
        // The exit gate's dot product.
        let dc = cpu.dot_rows(&src, h, &sel, &nw_c).must();
        let dg = gpu.dot_rows(&sg, h, &sel, &nw_g).must();
        cx.rep.add(Row {
            op: "dot_rows (exit gate)",
            shape: tag,
            rows: sel.len(),
            rel: rel_err(&dg, &dc),
            elem: elem_err(&dg, &dc),
            tol: 1e-5,
            guard: None,
            repeat: None,
        });
        match gpu.logits_device(&sg, h, &sel, Some(&nw_g), eps, &emb_g) {
            Ok(dev) => {
                let host = gpu.to_host(&dev).must();
                let ids = gpu.argmax_rows(&dev, sel.len(), s.vocab).unwrap_or_default();
                let want: Vec<u32> = host.chunks_exact(s.vocab).map(|r| HeadTop::from_logits(r).id).collect();
                let bad = ids != want;
                cx.rep.add(Row {
                    op: "argmax_rows",
                    shape: tag,
                    rows: sel.len(),
                    rel: f64::from(u8::from(bad)),
                    elem: f64::from(u8::from(bad)),
                    tol: 0.0,
                    guard: None,
                    repeat: None,
                });
                let k = 40;
                let (tid, tval) = gpu.topk_rows(&dev, sel.len(), s.vocab, k).unwrap_or_default();
                let mut bad = tid.len() != sel.len() * k;
                if !bad {
                    for (ri, r) in host.chunks_exact(s.vocab).enumerate() {
                        let mut idx: Vec<u32> = (0..s.vocab as u32).collect();
                        idx.sort_by(|a, b| r[*b as usize].total_cmp(&r[*a as usize]).then(a.cmp(b)));
                        bad |= tid[ri * k..(ri + 1) * k] != idx[..k];
                        bad |= tval[ri * k] != r[idx[0] as usize];
                    }
                }
                cx.rep.add(Row {
                    op: "topk_rows (k=40)",
                    shape: tag,
                    rows: sel.len(),
                    rel: f64::from(u8::from(bad)),
                    elem: f64::from(u8::from(bad)),
                    tol: 0.0,
                    guard: None,
                    repeat: None,
                });
            }
            Err(e) => {
                println!("logits_device failed: {e}");
                cx.rep.add(Row {
                    op: "argmax_rows",
                    shape: tag,
                    rows: sel.len(),
                    rel: f64::INFINITY,
                    elem: f64::INFINITY,
                    tol: 0.0,
                    guard: None,
                    repeat: None,
                });
            }
        }
        head_top_check(cx, s, &src, &sel, &nw_g, eps, &head_g);
        let b2 = rand_vec(cx.rng, n * h, 1.0);
        let cc = cpu.cosine_rows(&src, &b2, h, &sel).must();
        let cg = gpu.cosine_rows(&sg, &gpu.buffer(b2).must(), h, &sel).must();
        cx.rep.add(Row {
            op: "cosine_rows",
            shape: tag,
            rows: sel.len(),
            rel: rel_err(&cg, &cc),
            elem: elem_err(&cg, &cc),
            tol: 1e-5,
            guard: None,
            repeat: None,
        });
    }
}

/// The engine's greedy path: the GPU's reduction of each row (argmax, top two, softmax sum)
/// against the CPU rule (`HeadTop::from_logits`, what the CPU backend's head_top computes) on
/// the same logits, with a NaN logit column and the last selected row all NaN. Exit decisions
/// read max-prob from these numbers, so NaN handling must be the same on both backends (NaN
/// counts as -inf; a row without a finite maximum has no max-prob).
#[allow(clippy::too_many_arguments)]
fn head_top_check(
    cx: &mut Ctx<'_>,
    s: &Shapes,
    src: &[f32],
    sel: &[u32],
    norm: &CudaBuf,
    eps: f32,
    head: &rrt_kernels::cuda::CudaMat,
) {
    let gpu = cx.gpu;
    let h = s.hidden;
    let mut x = src.to_vec();
    let last = *sel.last().expect("rows selected") as usize;
    x[last * h..(last + 1) * h].fill(f32::NAN);
    let xg = gpu.buffer(x).must();
    let logits = match gpu.logits_device(&xg, h, sel, Some(norm), eps, head) {
        Ok(l) => gpu.to_host(&l).must(),
        Err(_) => Vec::new(),
    };
    let want: Vec<HeadTop> = logits.chunks_exact(s.vocab).map(HeadTop::from_logits).collect();
    let got = gpu.head_top(&xg, h, sel, Some(norm), eps, head).must();
    let same = |a: f32, b: f32| a.to_bits() == b.to_bits() || a.is_nan() && b.is_nan();
    let mut err = 0f64;
    let mut bad = got.len() != want.len() || want.len() != sel.len();
    for (t, w) in got.iter().zip(&want) {
        bad |= t.id != w.id || !same(t.top, w.top) || !same(t.second, w.second);
        bad |= t.max_prob().is_nan() != w.max_prob().is_nan();
        if w.sum_exp.is_finite() && w.sum_exp > 0.0 {
            err = err.max((t.sum_exp - w.sum_exp).abs() / w.sum_exp);
        } else {
            bad |= !(t.sum_exp == w.sum_exp || t.sum_exp.is_nan() && w.sum_exp.is_nan());
        }
    }
    // The all-NaN row has no max-prob on either rule.
    bad |= got.last().is_none_or(|t| !t.max_prob().is_nan());
    cx.rep.add(Row {
        op: "head_top (NaN column + NaN row)",
        shape: s.name,
        rows: sel.len(),
        rel: err,
        elem: if bad { f64::INFINITY } else { err },
        tol: 1e-9,
        guard: None,
        repeat: None,
    });
}

// ---------------------------------------------------------------------------------------------
// Smoke test.

const SMOKE_SRC: &str = r#"
extern "C" __global__ void smoke_fill(float* out, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = 2.0f * (float)i + 1.0f;
}
"#;

/// Device, one compile, one allocation, one launch, one read back: seconds, not minutes.
fn smoke() -> Result<String, String> {
    let t0 = Instant::now();
    let info = cuda_available(0).map_err(|e| format!("no usable GPU: {e}"))?;
    probe_nvrtc().map_err(|e| format!("NVRTC: {e}"))?;
    let ctx = CudaContext::new(0).map_err(|e| format!("context: {e:?}"))?;
    let stream = ctx.new_stream().map_err(|e| format!("stream: {e:?}"))?;
    let ptx = cudarc::nvrtc::compile_ptx(SMOKE_SRC).map_err(|e| format!("NVRTC compile: {e:?}"))?;
    let module = ctx.load_module(ptx).map_err(|e| format!("module load: {e:?}"))?;
    let f = module
        .load_function("smoke_fill")
        .map_err(|e| format!("function: {e:?}"))?;
    let n = 1 << 20;
    let mut out = stream.alloc_zeros::<f32>(n).map_err(|e| format!("allocation: {e:?}"))?;
    let n_ = n as i32;
    let mut b = stream.launch_builder(&f);
    b.arg(&mut out).arg(&n_);
    // SAFETY: `out` holds n floats; the kernel writes indices below n.
    unsafe { b.launch(LaunchConfig::for_num_elems(n as u32)) }.map_err(|e| format!("launch: {e:?}"))?;
    let host = stream.clone_dtoh(&out).map_err(|e| format!("read back: {e:?}"))?;
    let bad = host
        .iter()
        .enumerate()
        .filter(|(i, v)| **v != 2.0 * *i as f32 + 1.0)
        .count();
    if bad > 0 {
        return Err(format!("smoke kernel: {bad} wrong values"));
    }
    Ok(format!("{info}; smoke ok in {:.2} s", t0.elapsed().as_secs_f64()))
}

// ---------------------------------------------------------------------------------------------
// Timing.

struct Timer {
    stream: Arc<CudaStream>,
}

impl Timer {
    /// Median milliseconds of `runs` single calls `f(i)` after `warm` warm-ups.
    fn single(&self, warm: usize, runs: usize, mut f: impl FnMut(usize)) -> f64 {
        let ctx = self.stream.context();
        for i in 0..warm {
            f(i);
        }
        let mut t = Vec::with_capacity(runs);
        for i in 0..runs {
            let a = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).expect("event");
            let b = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).expect("event");
            a.record(&self.stream).expect("record");
            f(warm + i);
            b.record(&self.stream).expect("record");
            b.synchronize().expect("sync");
            t.push(a.elapsed_ms(&b).expect("elapsed") as f64);
        }
        t.sort_by(f64::total_cmp);
        t[t.len() / 2]
    }

    /// Milliseconds per call of `calls` back-to-back calls (the median of 3 such runs).
    fn back_to_back(&self, calls: usize, mut f: impl FnMut(usize)) -> f64 {
        let ctx = self.stream.context();
        for i in 0..3 {
            f(i);
        }
        let mut t = Vec::new();
        for _ in 0..3 {
            let a = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).expect("event");
            let b = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).expect("event");
            a.record(&self.stream).expect("record");
            for i in 0..calls {
                f(i);
            }
            b.record(&self.stream).expect("record");
            b.synchronize().expect("sync");
            t.push(a.elapsed_ms(&b).expect("elapsed") as f64 / calls as f64);
        }
        t.sort_by(f64::total_cmp);
        t[1]
    }
}

#[allow(clippy::too_many_arguments)]
fn gemm_ex(
    h: &CudaBlas,
    m: usize,
    n: usize,
    k: usize,
    a: u64,
    lda: usize,
    b: u64,
    ldb: usize,
    c: u64,
    c_type: cudaDataType,
    ldc: usize,
    beta: f32,
) {
    let alpha = 1f32;
    // SAFETY: column-major C (m x n) = op_T(A) (A stored k x m, lda) * B (k x n, ldb); every
    // pointer is a live device allocation of those sizes (the callers' buffers).
    unsafe {
        blas::gemm_ex(
            *h.handle(),
            cublasOperation_t::CUBLAS_OP_T,
            cublasOperation_t::CUBLAS_OP_N,
            m as i32,
            n as i32,
            k as i32,
            (&alpha as *const f32).cast(),
            a as *const _,
            cudaDataType::CUDA_R_16BF,
            lda as i32,
            b as *const _,
            cudaDataType::CUDA_R_16BF,
            ldb as i32,
            (&beta as *const f32).cast(),
            c as *mut _,
            c_type,
            ldc as i32,
            cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .expect("cublasGemmEx");
}

fn dptr<T>(s: &CudaSlice<T>) -> u64 {
    s.device_ptr(s.stream()).0
}

fn copy_bandwidth(gpu: &CudaBackend, timer: &Timer, rep: &mut Report) -> f64 {
    let bytes = 1usize << 30;
    let stream = gpu.stream();
    let a = stream.alloc_zeros::<u8>(bytes).expect("alloc");
    let mut b = stream.alloc_zeros::<u8>(bytes).expect("alloc");
    let med = timer.single(3, 20, |_| stream.memcpy_dtod(&a, &mut b).expect("dtod"));
    let bw = 2.0 * bytes as f64 / (med * 1e-3);
    rep.line(format!(
        "device-to-device copy: {:.3} ms for 1 GiB -> {:.0} GB/s read + write ({:.0} % of the H200's 4.8 TB/s)",
        med,
        bw / 1e9,
        100.0 * bw / H200_BW
    ));
    bw
}

const TIMED_ROWS: [usize; 10] = [1, 2, 4, 8, 16, 32, 64, 256, 2048, 4096];

/// Fused (prepared rows, as the engine calls it) vs bare vs cuBLAS for one module.
#[allow(clippy::too_many_arguments)]
fn time_module(
    gpu: &CudaBackend,
    blas: Option<&CudaBlas>,
    timer: &Timer,
    rng: &mut Rng64,
    s: &Shapes,
    module: &Module,
    mode: MatmulMode,
    copy_bw: f64,
    rep: &mut Report,
) {
    let weight_bytes = (module.m * module.k * 2) as f64;
    let l2 = gpu.info().l2_bytes.max(1) as f64;
    let copies = ((3.0 * l2 / weight_bytes).ceil() as usize).clamp(2, 256);
    let res: Vec<Resident<CudaBackend>> = (0..copies).map(|_| module.upload(gpu)).collect();
    let stream = gpu.stream();
    for n in TIMED_ROWS {
        let groups = groups_for(n);
        let prepared = gpu.prepare_rows(vec![rows_for_groups(n, &groups)]).must();
        let xs: Vec<CudaBuf> = (0..4)
            .map(|_| gpu.buffer(rand_vec(rng, n * module.k, 1.0)).must())
            .collect();
        let mut y = gpu.buffer(rand_vec(rng, n * module.m, 1.0)).must();
        let call = |i: usize, y: &mut CudaBuf, lora: bool| {
            let r = &res[i % copies];
            let cols = if lora { r.cols() } else { Vec::new() };
            gpu.linear_lora_rows(&xs[i % 4], &prepared[0], &r.w, r.bias.as_ref(), &cols, y, mode)
                .keep();
        };
        let fused = timer.single(5, 30, |i| call(i, &mut y, true));
        let fused_b2b = timer.back_to_back(100, |i| call(i, &mut y, true));
        let bare_b2b = timer.back_to_back(100, |i| call(i, &mut y, false));
        let (mut gemm_only, mut unfused) = (f64::NAN, f64::NAN);
        if let Some(blas) = blas {
            let xh: Vec<Vec<u16>> = (0..4)
                .map(|_| {
                    (0..n * module.k)
                        .map(|_| half::bf16::from_f32(rng.random_range(-1.0f32..1.0)).to_bits())
                        .collect()
                })
                .collect();
            let xb: Vec<CudaSlice<u16>> = xh.iter().map(|v| stream.clone_htod(v).expect("upload")).collect();
            let tb = stream.alloc_zeros::<u16>(n * module.rank.max(1)).expect("alloc");
            let yp = y.device_ptr();
            let beta = if mode == MatmulMode::Accumulate { 1.0 } else { 0.0 };
            gemm_only = timer.single(5, 30, |i| {
                let r = &res[i % copies];
                gemm_ex(
                    blas,
                    module.m,
                    n,
                    module.k,
                    r.w.device_ptr(),
                    r.w.ld(),
                    dptr(&xb[i % 4]),
                    module.k,
                    yp,
                    cudaDataType::CUDA_R_32F,
                    module.m,
                    beta,
                );
            });
            unfused = timer.single(5, 30, |i| {
                let r = &res[i % copies];
                let x = dptr(&xb[i % 4]);
                gemm_ex(
                    blas,
                    module.m,
                    n,
                    module.k,
                    r.w.device_ptr(),
                    r.w.ld(),
                    x,
                    module.k,
                    yp,
                    cudaDataType::CUDA_R_32F,
                    module.m,
                    beta,
                );
                for g in groups.iter().filter(|g| g.len > 0) {
                    for (col0, per) in &r.loras {
                        if let Some(Some(l)) = per.get(g.adapter) {
                            let xg = x + (g.start * module.k * 2) as u64;
                            gemm_ex(
                                blas,
                                l.rank,
                                g.len,
                                module.k,
                                l.a.device_ptr(),
                                l.a.ld(),
                                xg,
                                module.k,
                                dptr(&tb),
                                cudaDataType::CUDA_R_16BF,
                                l.rank,
                                0.0,
                            );
                            let yg = yp + ((g.start * module.m + col0) * 4) as u64;
                            gemm_ex(
                                blas,
                                l.b.out_dim(),
                                g.len,
                                l.rank,
                                l.b.device_ptr(),
                                l.b.ld(),
                                dptr(&tb),
                                l.rank,
                                yg,
                                cudaDataType::CUDA_R_32F,
                                module.m,
                                1.0,
                            );
                        }
                    }
                }
            });
        }
        let bytes = module.bytes(n, &groups, mode == MatmulMode::Accumulate, true);
        let bw = bytes / (fused_b2b * 1e-3);
        let flops = 2.0 * (n * module.m * module.k) as f64;
        rep.line(format!(
            "| {:<9} {:<8} | {:>5} | {:>8.1} | {:>8.1} | {:>8.1} | {:>+6.1}% | {:>8.1} | {:>8.1} | {:>6.2}x | {:>7.1} | {:>6.0} | {:>5.1}% | {:>5.1}% | {:>6.1} | {:>6.1} |",
            s.name,
            module.name,
            n,
            fused * 1e3,
            fused_b2b * 1e3,
            bare_b2b * 1e3,
            100.0 * (fused_b2b / bare_b2b - 1.0),
            gemm_only * 1e3,
            unfused * 1e3,
            unfused / fused,
            bytes / 1e6,
            bw / 1e9,
            100.0 * bw / copy_bw,
            100.0 * bw / H200_BW,
            flops / (fused_b2b * 1e-3) / 1e12,
            flops / (gemm_only * 1e-3) / 1e12,
        ));
    }
}

fn write_out(name: &str, text: &str) {
    if let Ok(dir) = std::env::var("RRT_CHECK_OUT") {
        let p = std::path::Path::new(&dir).join(name);
        if let Err(e) = std::fs::write(&p, text) {
            println!("cannot write {}: {e}", p.display());
        }
    }
}

/// `gpu_check --precompile MAJOR.MINOR`: compiles every family for that compute capability
/// into the kernel cache (`RRT_KERNEL_CACHE`) and exits; needs NVRTC, no GPU. The build
/// machine fills the cache it ships with the check, so the GPU machine compiles nothing.
fn precompile(cc: &str) -> ! {
    let parsed = cc
        .split_once('.')
        .and_then(|(a, b)| Some((a.parse::<i32>().ok()?, b.parse::<i32>().ok()?)));
    let Some(cc) = parsed else {
        eprintln!("--precompile takes a compute capability such as 9.0");
        std::process::exit(2);
    };
    let t = Instant::now();
    match rrt_kernels::cuda::compile_all(cc) {
        Ok(imgs) => {
            let fresh = imgs.iter().filter(|i| !i.from_cache).count();
            println!(
                "precompiled {} families for sm_{}{} ({} compiled, {} already cached) in {:.1} s into {}",
                imgs.len(),
                cc.0,
                cc.1,
                fresh,
                imgs.len() - fresh,
                t.elapsed().as_secs_f64(),
                rrt_kernels::cuda::cache_dir().map_or("(no cache)".into(), |d| d.display().to_string())
            );
            std::process::exit(0)
        }
        Err(e) => {
            eprintln!("precompile failed: {e}");
            std::process::exit(1)
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).is_some_and(|a| a == "--precompile") {
        precompile(args.get(2).map_or("9.0", String::as_str));
    }
    let start = Instant::now();
    println!("== rrt-kernels CUDA backend check ==");
    println!(
        "LD_LIBRARY_PATH={}",
        std::env::var("LD_LIBRARY_PATH").unwrap_or_default()
    );
    match smoke() {
        Ok(s) => println!("smoke: {s}"),
        Err(e) => {
            println!("smoke FAILED: {e}");
            std::process::exit(2);
        }
    }
    let have_blas = match probe_cublas() {
        Ok(()) => true,
        Err(e) => {
            println!("cuBLAS: {e} (only the timing baselines need it: they are left out)");
            false
        }
    };
    let t = Instant::now();
    let gpu = match CudaBackend::new(0) {
        Ok(g) => g,
        Err(e) => {
            println!("CudaBackend::new failed: {e}");
            std::process::exit(2);
        }
    };
    println!(
        "backend ready in {:.1} s (kernel cache: {})",
        t.elapsed().as_secs_f64(),
        rrt_kernels::cuda::cache_dir().map_or("off".into(), |d| d.display().to_string())
    );
    let gpu16 = gpu.sibling(WeightType::F16).expect("f16 sibling");
    let mut rng = Rng64::seed_from_u64(
        std::env::var("RRT_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(20_261_204),
    );
    let mut rep = Report::default();
    rep.line("\n## Correctness against CpuBackend\n".into());
    rep.line(
        "rel = ||out - ref|| / ||ref||; elem = max |out - ref| / rms(ref) (the pass criterion); guard = NaN cells after the output untouched; repeat = the same call again, bit for bit (for the `_rows` variants: bit-equal to the per-call path)\n".into(),
    );
    rep.line(
        "| op                             | shape                          |  rows |       rel |      elem |     tol | guard | repeat | ok |"
            .into(),
    );
    rep.line("|---|---|---:|---:|---:|---:|---|---|---|".into());
    {
        let mut cx = Ctx {
            gpu: &gpu,
            rep: &mut rep,
            rng: &mut rng,
            start,
        };
        check_products(&mut cx, &gpu, WeightType::Bf16, &SMOL, &PRODUCT_ROWS);
        check_products(&mut cx, &gpu16, WeightType::F16, &SMOL, &[1, 3, 13, 16, 17, 100]);
        check_products(&mut cx, &gpu, WeightType::Bf16, &TWO_B, &[1, 4, 16, 17, 64, 256, 2048]);
        for (s, bs, n) in [
            (SMOL, 16, 1),
            (SMOL, 16, 13),
            (SMOL, 7, 64),
            (OURO, 16, 17),
            (OURO, 7, 100),
            (TWO_B, 32, 2048),
        ] {
            if cx.out_of_time(0.6) {
                cx.rep.skip(&format!("attention {} bs{bs} rows {n}", s.name));
                continue;
            }
            check_attention(&mut cx, &s, bs, n);
        }
        check_ops(&mut cx, &SMOL, &[1, 13, 64, 2048]);
        check_ops(&mut cx, &TWO_B, &[1, 64]);
    }
    for (name, g) in [("bf16", &gpu), ("f16", &gpu16)] {
        if let Err(e) = g.check() {
            rep.line(format!("backend ({name}) error during the checks: {e}"));
            rep.failed += 1;
        }
    }
    rep.line(format!(
        "\n{} checks, {} failed ({} of them skipped for time); {:.0} s",
        rep.checks,
        rep.failed,
        rep.skipped,
        start.elapsed().as_secs_f64()
    ));
    write_out("correctness.md", &rep.md);
    let correctness_md = std::mem::take(&mut rep.md);

    rep.line("\n## Timings (CUDA events; weights rotated beyond the L2)\n".into());
    let timer = Timer {
        stream: gpu.stream().clone(),
    };
    let blas = have_blas.then(|| CudaBlas::new(gpu.stream().clone()).expect("cuBLAS handle"));
    let copy_bw = copy_bandwidth(&gpu, &timer, &mut rep);
    let mut note = String::new();
    let _ = write!(
        note,
        "\nsingle = median of 30 single calls; b2b = per call over 100 back-to-back calls (no host gaps between launches); bare = the same product without LoRA; LoRA = b2b / bare - 1; GB/s from b2b over the bytes that must move (W, the LoRAs of the depths present, x, y)\n"
    );
    rep.line(note);
    rep.line(
        "| module             |  rows | single us | b2b us | bare b2b us | LoRA | cuBLAS us | unfused us | unfused/single | MB moved | GB/s | % copy | % 4.8 TB/s | TF/s | cuBLAS TF/s |"
            .into(),
    );
    rep.line("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|".into());
    for s in [SMOL, TWO_B] {
        for (module, mode) in modules(&mut rng, WeightType::Bf16, &s) {
            if start.elapsed().as_secs_f64() > budget_s() {
                rep.skip(&format!("timing {} {}", s.name, module.name));
                continue;
            }
            time_module(
                &gpu,
                blas.as_ref(),
                &timer,
                &mut rng,
                &s,
                &module,
                mode,
                copy_bw,
                &mut rep,
            );
        }
    }
    if let Err(e) = gpu.check() {
        rep.line(format!("backend error during the timings: {e}"));
        rep.failed += 1;
    }
    rep.line(format!(
        "\ntotal {:.0} s; {} failures ({} skipped for time)",
        start.elapsed().as_secs_f64(),
        rep.failed,
        rep.skipped
    ));
    write_out("timings.md", &rep.md);
    let _ = correctness_md;
    std::process::exit(i32::from(rep.failed > 0));
}
