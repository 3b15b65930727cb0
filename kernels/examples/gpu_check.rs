//! The prepared GPU check of the CUDA backend (issue G), run by `scripts/gpu-check.sh` on a
//! machine with a GPU and no Rust: (1) every Backend operation of `CudaBackend` against
//! `CpuBackend` on fresh random inputs at SmolLM2 and 2B-class shapes, several row counts and
//! mixed loop depths, outputs poisoned with NaN first, relative error ||out - ref|| / ||ref||
//! in one table; (2) CUDA-event timings (warm-up, median of many runs, weights rotated beyond
//! the L2) of the fused product against cuBLAS bf16 GEMM + separate gathered shrink and expand
//! GEMMs per loop depth, as bandwidth against a device-to-device copy measured in the same run,
//! and prefill-sized products against cuBLAS TFLOP/s.
//!
//! Weights are rounded to bf16 before both backends see them, so the errors measure the
//! kernels (activation rounding and summation order), not the weight format.
//!
//! Build: `cargo build -p rrt-kernels --release --features cuda --example gpu_check`.
//! Exit status 0 when every error is under its threshold, 1 otherwise, 2 when no GPU.

use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::cublas::{CudaBlas, result as blas};
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use rand::{Rng, SeedableRng};
use rrt_kernels::backend::{KvSlot, LoraColumns, LoraMats, RowGroup};
use rrt_kernels::cuda::{CudaBackend, CudaBuf, cuda_available, probe_cublas, probe_nvrtc};
use rrt_kernels::{AttnRow, AttnShape, Backend, CpuBackend, KvLayout, MatmulMode, MatrixData, RopeScaling, RopeTable};
use std::sync::Arc;
use std::time::Instant;

type Rng64 = rand_chacha::ChaCha8Rng;
/// Per depth: a LoRA's A and B host data, or none.
type HostLoras = Vec<Option<(Vec<f32>, Vec<f32>)>>;
/// Per entry: its first column and per depth its resident LoRA.
type EntryLoras<M> = Vec<(usize, Vec<Option<LoraMats<M>>>)>;

/// Wall-clock budget: sections after this are skipped with a line saying so.
const BUDGET_S: f64 = 240.0;

fn bf16_round(v: f32) -> f32 {
    half::bf16::from_f32(v).to_f32()
}

fn rand_vec(rng: &mut Rng64, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0) * scale).collect()
}

fn rand_w(rng: &mut Rng64, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| bf16_round(rng.random_range(-1.0f32..1.0) * scale))
        .collect()
}

fn rel_err(out: &[f32], want: &[f32]) -> f64 {
    if out.len() != want.len() {
        return f64::INFINITY;
    }
    let (mut d, mut r) = (0f64, 0f64);
    for (o, w) in out.iter().zip(want) {
        let (o, w) = (*o as f64, *w as f64);
        if !o.is_finite() {
            return f64::INFINITY;
        }
        d += (o - w) * (o - w);
        r += w * w;
    }
    if r == 0.0 { d.sqrt() } else { (d / r).sqrt() }
}

struct Report {
    rows: Vec<(String, String, usize, f64, f64)>,
    failed: usize,
}

impl Report {
    fn add(&mut self, op: &str, shape: &str, n: usize, err: f64, tol: f64) {
        let ok = err <= tol;
        if !ok {
            self.failed += 1;
        }
        println!(
            "| {op:<22} | {shape:<26} | {n:>5} | {err:>10.3e} | {tol:>8.1e} | {} |",
            if ok { "ok" } else { "FAIL" }
        );
        self.rows.push((op.into(), shape.into(), n, err, tol));
    }
}

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

const LOOPS: usize = 3;

/// Mixed-depth groups over `n` rows: runs of depths 0, 2, 1, 0 (a repeated depth, and depth 1
/// has no LoRA on some entries).
fn groups_for(n: usize) -> Vec<RowGroup> {
    if n == 1 {
        return vec![RowGroup {
            start: 0,
            len: 1,
            adapter: 2,
        }];
    }
    let depths = [0usize, 2, 1, 0];
    let parts = depths.len().min(n);
    let mut out = Vec::new();
    let mut start = 0;
    for (i, &d) in depths.iter().take(parts).enumerate() {
        let len = if i + 1 == parts { n - start } else { n / parts };
        out.push(RowGroup { start, len, adapter: d });
        start += len;
    }
    out
}

/// A linear map with per-depth LoRAs on its column entries, resident on both backends.
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
    fn new(rng: &mut Rng64, name: &'static str, k: usize, cols: &[usize], rank: usize, bias: bool) -> Self {
        let m: usize = cols.iter().sum();
        let w = rand_w(rng, m * k, 1.0 / (k as f32).sqrt());
        let mut entries = Vec::new();
        let mut col0 = 0;
        for (e, &c) in cols.iter().enumerate() {
            let per = (0..LOOPS)
                .map(|d| {
                    // Depth 1 has no LoRA on odd entries.
                    (d != 1 || e % 2 == 0).then(|| {
                        (
                            rand_w(rng, rank * k, 1.0 / (k as f32).sqrt()),
                            rand_w(rng, c * rank, 0.5 / (rank as f32).sqrt()),
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
        let w = be.matrix(self.m, self.k, MatrixData::F32(self.w.clone()));
        let bias = self.bias.as_ref().map(|b| be.buffer(b.clone()));
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
                                a: be.matrix(self.rank, self.k, MatrixData::F32(a.clone())),
                                b: be.matrix(*c, self.rank, MatrixData::F32(b.clone())),
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
    fn bytes(&self, n: usize, groups: &[RowGroup], accumulate: bool) -> f64 {
        let mut b = (self.m * self.k * 2) as f64;
        let mut seen = Vec::new();
        for g in groups {
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

fn modules(rng: &mut Rng64, s: &Shapes) -> Vec<(Module, MatmulMode)> {
    let (h, qd, kd) = (s.hidden, s.heads * s.head_dim, s.kv_heads * s.head_dim);
    vec![
        (
            Module::new(rng, "qkv", h, &[qd, kd, kd], s.rank, true),
            MatmulMode::Overwrite,
        ),
        (Module::new(rng, "o", qd, &[h], s.rank, false), MatmulMode::Accumulate),
        (
            Module::new(rng, "gate_up", h, &[s.inter, s.inter], s.rank, false),
            MatmulMode::Overwrite,
        ),
        (
            Module::new(rng, "down", s.inter, &[h], s.rank, false),
            MatmulMode::Accumulate,
        ),
    ]
}

fn check_products(gpu: &CudaBackend, rep: &mut Report, rng: &mut Rng64, s: &Shapes, start: Instant) {
    let cpu = CpuBackend;
    for (module, mode) in modules(rng, s) {
        let rc = module.upload(&cpu);
        let rg = module.upload(gpu);
        for n in [1usize, 8, 64, 256, 2048] {
            if n == 2048 && module.m * module.k > 8 << 20 {
                continue; // the CPU oracle of the largest products would dominate the budget
            }
            if start.elapsed().as_secs_f64() > BUDGET_S * 0.6 {
                println!(
                    "| {:<22} | {:<26} | {n:>5} | skipped (time budget) |",
                    module.name, s.name
                );
                continue;
            }
            let groups = groups_for(n);
            let x = rand_vec(rng, n * module.k, 1.0);
            let init: Vec<f32> = if mode == MatmulMode::Accumulate {
                rand_vec(rng, n * module.m, 1.0)
            } else {
                vec![f32::NAN; n * module.m]
            };
            let mut yc = init.clone();
            cpu.linear_lora(&x, n, &rc.w, rc.bias.as_ref(), &rc.cols(), &groups, &mut yc, mode);
            let xg = gpu.buffer(x);
            let mut yg = gpu.buffer(init);
            gpu.linear_lora(&xg, n, &rg.w, rg.bias.as_ref(), &rg.cols(), &groups, &mut yg, mode);
            let out = gpu.to_host(&yg);
            let shape = format!("{} {}x{}->{}", s.name, module.name, module.k, module.m);
            rep.add("linear_lora", &shape, n, rel_err(&out, &yc), 1e-2);
        }
    }
}

#[allow(clippy::too_many_lines)]
fn check_ops(gpu: &CudaBackend, rep: &mut Report, rng: &mut Rng64, s: &Shapes) {
    let cpu = CpuBackend;
    let (h, qd, kd) = (s.hidden, s.heads * s.head_dim, s.kv_heads * s.head_dim);
    let qkvd = qd + 2 * kd;
    let eps = 1e-5f32;
    // Embedding / tied head, bf16-rounded.
    let table = rand_w(rng, s.vocab * h, 1.0);
    let emb_c = cpu.matrix(s.vocab, h, MatrixData::F32(table.clone()));
    let emb_g = gpu.matrix(s.vocab, h, MatrixData::F32(table));
    let norm_w: Vec<f32> = rand_vec(rng, h, 0.5).iter().map(|v| 1.0 + v).collect();
    let (nw_c, nw_g) = (norm_w.clone(), gpu.buffer(norm_w));
    let rope = RopeTable::new(s.head_dim, s.head_dim, 10000.0, &RopeScaling::None);
    let layout = KvLayout {
        n_layers: 2 * LOOPS,
        block_size: 16,
        n_kv_heads: s.kv_heads,
        head_dim: s.head_dim,
    };
    for n in [1usize, 64, 2048] {
        let tag = s.name;
        // embed
        let tokens: Vec<u32> = (0..n).map(|_| rng.random_range(0..s.vocab as u32)).collect();
        let mut ec = vec![0f32; n * h];
        cpu.embed(&emb_c, &tokens, &mut ec);
        let mut eg = gpu.buffer(vec![f32::NAN; n * h]);
        gpu.embed(&emb_g, &tokens, &mut eg);
        rep.add("embed", tag, n, rel_err(&gpu.to_host(&eg), &ec), 0.0);
        // copy_rows (reversed order into an offset)
        let src = rand_vec(rng, n * h, 1.0);
        let rows: Vec<u32> = (0..n as u32).rev().collect();
        let mut dc = vec![f32::NAN; (n + 3) * h];
        dc[..3 * h].fill(0.0);
        let mut dg_init = vec![f32::NAN; (n + 3) * h];
        dg_init[..3 * h].fill(0.0);
        cpu.copy_rows(&src, &rows, &mut dc, 3, h);
        let sg = gpu.buffer(src.clone());
        let mut dg = gpu.buffer(dg_init);
        gpu.copy_rows(&sg, &rows, &mut dg, 3, h);
        rep.add("copy_rows", tag, n, rel_err(&gpu.to_host(&dg), &dc), 0.0);
        // rmsnorm
        let mut rc = vec![0f32; n * h];
        cpu.rmsnorm(&src, &nw_c, eps, &mut rc);
        let mut rgb = gpu.buffer(vec![f32::NAN; n * h]);
        gpu.rmsnorm(&sg, &nw_g, eps, &mut rgb);
        rep.add("rmsnorm", tag, n, rel_err(&gpu.to_host(&rgb), &rc), 1e-5);
        // add_rmsnorm: x += r; out = norm(x)
        let r = rand_vec(rng, n * h, 1.0);
        let mut xc = src.clone();
        xc.iter_mut().zip(&r).for_each(|(a, b)| *a += b);
        let mut oc = vec![0f32; n * h];
        cpu.rmsnorm(&xc, &nw_c, eps, &mut oc);
        let mut xg = gpu.buffer(src.clone());
        let rgpu = gpu.buffer(r);
        let mut og = gpu.buffer(vec![f32::NAN; n * h]);
        let res = gpu.add_rmsnorm(&mut xg, &rgpu, &nw_g, eps, &mut og);
        let e = if res.is_ok() {
            rel_err(&gpu.to_host(&og), &oc).max(rel_err(&gpu.to_host(&xg), &xc))
        } else {
            f64::INFINITY
        };
        rep.add("add_rmsnorm", tag, n, e, 1e-5);
        // silu_mul
        let gu = rand_vec(rng, n * 2 * s.inter, 3.0);
        let mut sc = vec![0f32; n * s.inter];
        cpu.silu_mul(&gu, n, s.inter, &mut sc);
        let gug = gpu.buffer(gu);
        let mut sgo = gpu.buffer(vec![f32::NAN; n * s.inter]);
        gpu.silu_mul(&gug, n, s.inter, &mut sgo);
        rep.add("silu_mul", tag, n, rel_err(&gpu.to_host(&sgo), &sc), 1e-6);
        // rope: positions spread up to 100k
        let qkv = rand_vec(rng, n * qkvd, 1.0);
        let positions: Vec<u32> = (0..n).map(|_| rng.random_range(0..100_000u32)).collect();
        let mut qc = qkv.clone();
        cpu.rope(&rope, &mut qc, qkvd, &positions, qd, qd, kd);
        let mut qg = gpu.buffer(qkv.clone());
        gpu.rope(&rope, &mut qg, qkvd, &positions, qd, qd, kd);
        rep.add("rope", tag, n, rel_err(&gpu.to_host(&qg), &qc), 1e-5);
        // KV: a pool with random contents, sequences of random lengths; this batch's rows
        // are the last positions of their sequences (decode) or a whole chunk (prefill).
        let seqs = if n == 1 { 1 } else { 4 };
        let per_seq = n.div_ceil(seqs);
        let ctx_len: Vec<usize> = (0..seqs).map(|_| per_seq + rng.random_range(0..1500usize)).collect();
        let blocks_per: Vec<usize> = ctx_len.iter().map(|c| c.div_ceil(layout.block_size)).collect();
        let n_blocks: usize = blocks_per.iter().sum::<usize>() + 3;
        let mut ids: Vec<u32> = (0..n_blocks as u32).collect();
        // Shuffle so tables are not contiguous.
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
        let mut pc = pool.clone();
        let mut pg = gpu.kv_pool(layout, n_blocks);
        gpu.kv_import(
            &mut pg,
            &layout,
            &ids,
            &cpu.kv_export(&pool, &layout, &ids, n_blocks * layout.block_size),
        );
        // Rows: sequence i % seqs, the last positions of that sequence, at a layer by depth.
        let mut slots = Vec::new();
        let mut arows_meta = Vec::new();
        for i in 0..n {
            let sq = i % seqs;
            let j = i / seqs;
            let pos = ctx_len[sq] - per_seq + j;
            let layer = (i % LOOPS) * 2 + 1;
            slots.push(KvSlot {
                layer,
                block: tables[sq][pos / layout.block_size],
                slot: pos % layout.block_size,
            });
            arows_meta.push((sq, pos, layer));
        }
        cpu.kv_write(&mut pc, &layout, &qkv, qkvd, qd, qd + kd, &slots);
        let qkvg = gpu.buffer(qkv.clone());
        gpu.kv_write(&mut pg, &layout, &qkvg, qkvd, qd, qd + kd, &slots);
        let exp_c = cpu.kv_export(&pc, &layout, &ids, n_blocks * layout.block_size);
        let exp_g = gpu.kv_export(&pg, &layout, &ids, n_blocks * layout.block_size);
        rep.add("kv_write+kv_export", tag, n, rel_err(&exp_g, &exp_c), 0.0);
        for window in [None, Some(100)] {
            let arows: Vec<AttnRow<'_>> = arows_meta
                .iter()
                .map(|&(sq, pos, layer)| AttnRow {
                    blocks: &tables[sq],
                    pos,
                    layer,
                })
                .collect();
            let shape = AttnShape {
                n_heads: s.heads,
                window,
                scale: 1.0 / (s.head_dim as f32).sqrt(),
            };
            let mut ac = vec![0f32; n * qd];
            cpu.attention(&qkv, qkvd, &arows, &pc, &layout, shape, &mut ac);
            let mut ag = gpu.buffer(vec![f32::NAN; n * qd]);
            gpu.attention(&qkvg, qkvd, &arows, &pg, &layout, shape, &mut ag);
            let op = if window.is_some() {
                "attention (window 100)"
            } else {
                "attention"
            };
            rep.add(op, tag, n, rel_err(&gpu.to_host(&ag), &ac), 1e-5);
        }
        // logits + selection + cosine on up to 64 selected rows
        let sel: Vec<u32> = (0..n.min(64) as u32).map(|i| (i * 7) % n as u32).collect();
        let lc = cpu.logits(&src, h, &sel, &nw_c, eps, &emb_c);
        let lg = gpu.logits(&sg, h, &sel, &nw_g, eps, &emb_g);
        rep.add("logits", tag, sel.len(), rel_err(&lg, &lc), 1e-2);
        match gpu.logits_device(&sg, h, &sel, &nw_g, eps, &emb_g) {
            Ok(dev) => {
                let host = gpu.to_host(&dev);
                let ids = gpu.argmax_rows(&dev, sel.len(), s.vocab).unwrap_or_default();
                let want: Vec<u32> = host
                    .chunks_exact(s.vocab)
                    .map(|r| {
                        let mut b = 0;
                        for (j, v) in r.iter().enumerate() {
                            if *v > r[b] {
                                b = j;
                            }
                        }
                        b as u32
                    })
                    .collect();
                let bad = ids.len() != want.len() || ids != want;
                rep.add("argmax_rows", tag, sel.len(), if bad { 1.0 } else { 0.0 }, 0.0);
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
                rep.add("topk_rows (k=40)", tag, sel.len(), if bad { 1.0 } else { 0.0 }, 0.0);
                // The engine's greedy path: the device reduction of each row against the host
                // reduction of the same (device) logits.
                let tops = gpu.head_top(&sg, h, &sel, &nw_g, eps, &emb_g);
                let want: Vec<rrt_kernels::HeadTop> = host
                    .chunks_exact(s.vocab)
                    .map(rrt_kernels::HeadTop::from_logits)
                    .collect();
                let mut err = 0f64;
                for (t, w) in tops.iter().zip(&want) {
                    if t.id != w.id || t.top != w.top || t.second != w.second {
                        err = f64::INFINITY;
                    }
                    err = err.max((t.sum_exp - w.sum_exp).abs() / w.sum_exp);
                }
                if tops.len() != want.len() {
                    err = f64::INFINITY;
                }
                rep.add("head_top (argmax, top 2, softmax sum)", tag, sel.len(), err, 1e-9);
            }
            Err(e) => {
                println!("logits_device failed: {e}");
                rep.add("argmax_rows", tag, sel.len(), f64::INFINITY, 0.0);
            }
        }
        let b2 = rand_vec(rng, n * h, 1.0);
        let cc = cpu.cosine_rows(&src, &b2, h, &sel);
        let cg = gpu.cosine_rows(&sg, &gpu.buffer(b2), h, &sel);
        rep.add("cosine_rows", tag, sel.len(), rel_err(&cg, &cc), 1e-5);
    }
}

// ---------------------------------------------------------------------------------------------
// Timing.

struct Timer {
    stream: Arc<CudaStream>,
}

impl Timer {
    /// Median, min and max milliseconds of `runs` timed runs of `f(i)` after `warm` warm-ups.
    fn time(&self, warm: usize, runs: usize, mut f: impl FnMut(usize)) -> (f64, f64, f64) {
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
        (t[t.len() / 2], t[0], t[t.len() - 1])
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

fn copy_bandwidth(gpu: &CudaBackend, timer: &Timer) -> f64 {
    let bytes = 1usize << 30;
    let stream = gpu.stream();
    let a = stream.alloc_zeros::<u8>(bytes).expect("alloc");
    let mut b = stream.alloc_zeros::<u8>(bytes).expect("alloc");
    let (med, _, _) = timer.time(3, 20, |_| stream.memcpy_dtod(&a, &mut b).expect("dtod"));
    let bw = 2.0 * bytes as f64 / (med * 1e-3);
    println!(
        "device-to-device copy: {:.3} ms for 1 GiB -> {:.0} GB/s (read + write)",
        med,
        bw / 1e9
    );
    bw
}

/// Fused vs unfused for one module at `n` rows.
#[allow(clippy::too_many_arguments)]
fn time_module(
    gpu: &CudaBackend,
    blas: &CudaBlas,
    timer: &Timer,
    rng: &mut Rng64,
    s: &Shapes,
    module: &Module,
    mode: MatmulMode,
    rows: &[usize],
    copy_bw: f64,
) {
    let weight_bytes = (module.m * module.k * 2) as f64;
    let l2 = gpu.info().l2_bytes.max(1) as f64;
    let copies = ((3.0 * l2 / weight_bytes).ceil() as usize).clamp(2, 256);
    let res: Vec<Resident<CudaBackend>> = (0..copies).map(|_| module.upload(gpu)).collect();
    let stream = gpu.stream();
    for &n in rows {
        let groups = groups_for(n);
        let xs: Vec<CudaBuf> = (0..4).map(|_| gpu.buffer(rand_vec(rng, n * module.k, 1.0))).collect();
        let xh: Vec<Vec<u16>> = (0..4)
            .map(|_| {
                (0..n * module.k)
                    .map(|_| half::bf16::from_f32(rng.random_range(-1.0f32..1.0)).to_bits())
                    .collect()
            })
            .collect();
        let xb: Vec<CudaSlice<u16>> = xh.iter().map(|v| stream.clone_htod(v).expect("upload")).collect();
        let mut y = gpu.buffer(rand_vec(rng, n * module.m, 1.0));
        let tb = stream.alloc_zeros::<u16>(n * module.rank).expect("alloc");
        let (fused, _, _) = timer.time(5, 30, |i| {
            let r = &res[i % copies];
            gpu.linear_lora(&xs[i % 4], n, &r.w, r.bias.as_ref(), &r.cols(), &groups, &mut y, mode);
        });
        let mut bare = 0.0;
        if n >= 256 {
            bare = timer
                .time(3, 20, |i| {
                    let r = &res[i % copies];
                    gpu.linear_lora(&xs[i % 4], n, &r.w, r.bias.as_ref(), &[], &[], &mut y, mode);
                })
                .0;
        }
        let yp = y.device_ptr();
        let beta = if mode == MatmulMode::Accumulate { 1.0 } else { 0.0 };
        let (gemm_only, _, _) = timer.time(5, 30, |i| {
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
        let (unfused, _, _) = timer.time(5, 30, |i| {
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
            for g in &groups {
                for (col0, per) in &r.loras {
                    if let Some(Some(l)) = per.get(g.adapter) {
                        let xg = x + (g.start * module.k * 2) as u64;
                        // shrink: T (rank x len) = A x_g^T, bf16 out
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
                        // expand: y_g[:, col0..] += B T
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
        let bytes = module.bytes(n, &groups, mode == MatmulMode::Accumulate);
        let bw = bytes / (fused * 1e-3);
        let flops = 2.0 * (n * module.m * module.k) as f64;
        println!(
            "| {:<9} {:<8} | {:>5} | {:>9.1} | {:>9.1} | {:>9.1} | {:>6.2}x | {:>8.1} | {:>6.0} | {:>5.1}% | {:>7.1} | {:>7.1} | {} |",
            s.name,
            module.name,
            n,
            fused * 1e3,
            unfused * 1e3,
            gemm_only * 1e3,
            unfused / fused,
            bytes / 1e6,
            bw / 1e9,
            100.0 * bw / copy_bw,
            flops / (fused * 1e-3) / 1e12,
            flops / (gemm_only * 1e-3) / 1e12,
            if bare > 0.0 {
                format!(
                    "{:+.1}% LoRA, {:.0}% of cuBLAS",
                    100.0 * (fused / bare - 1.0),
                    100.0 * gemm_only / bare
                )
            } else {
                String::new()
            }
        );
    }
}

fn main() {
    let start = Instant::now();
    println!("== rrt-kernels CUDA backend check (issue G) ==");
    let lib_path = std::env::var("LD_LIBRARY_PATH").unwrap_or_default();
    println!("LD_LIBRARY_PATH={lib_path}");
    let info = match cuda_available(0) {
        Ok(i) => i,
        Err(e) => {
            println!("no usable GPU: {e}");
            std::process::exit(2);
        }
    };
    println!("device: {info}");
    for (what, r) in [("NVRTC", probe_nvrtc()), ("cuBLAS", probe_cublas())] {
        match r {
            Ok(()) => println!("{what}: found"),
            Err(e) => {
                println!("{what}: {e}");
                std::process::exit(2);
            }
        }
    }
    let gpu = match CudaBackend::new(0) {
        Ok(g) => g,
        Err(e) => {
            println!("CudaBackend::new failed: {e}");
            std::process::exit(2);
        }
    };
    println!(
        "backend ready in {:.1} s (NVRTC compile of every family)",
        start.elapsed().as_secs_f64()
    );
    let mut rng = Rng64::seed_from_u64(
        std::env::var("RRT_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(20_250_601),
    );

    println!("\n## Correctness against CpuBackend (relative error ||out - ref|| / ||ref||)\n");
    println!("| op                     | shape                      |  rows |    rel err |      tol | ok |");
    println!("|---|---|---:|---:|---:|---|");
    let mut rep = Report {
        rows: Vec::new(),
        failed: 0,
    };
    for s in [SMOL, TWO_B] {
        check_products(&gpu, &mut rep, &mut rng, &s, start);
        if start.elapsed().as_secs_f64() < BUDGET_S * 0.7 {
            check_ops(&gpu, &mut rep, &mut rng, &s);
        } else {
            println!("| other ops | {} | skipped (time budget) |", s.name);
        }
    }
    if let Err(e) = gpu.check() {
        println!("backend error during the checks: {e}");
        rep.failed += 1;
    }
    println!(
        "\n{} checks, {} failed ({:.0} s)",
        rep.rows.len(),
        rep.failed,
        start.elapsed().as_secs_f64()
    );

    println!("\n## Timings (CUDA events, median of 30 after 5 warm-ups, weights rotated beyond L2)\n");
    let timer = Timer {
        stream: gpu.stream().clone(),
    };
    let blas = CudaBlas::new(gpu.stream().clone()).expect("cuBLAS handle");
    let copy_bw = copy_bandwidth(&gpu, &timer);
    println!(
        "\n| module             |  rows | fused us | unfused us | cuBLAS us | speedup | MB moved | GB/s | % copy | fused TF/s | cuBLAS TF/s | prefill |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    for s in [SMOL, TWO_B] {
        for (module, mode) in modules(&mut rng, &s) {
            if start.elapsed().as_secs_f64() > BUDGET_S {
                println!("| {} {} | skipped (time budget) |", s.name, module.name);
                continue;
            }
            time_module(
                &gpu,
                &blas,
                &timer,
                &mut rng,
                &s,
                &module,
                mode,
                &[1, 8, 16, 64, 256, 2048, 4096],
                copy_bw,
            );
        }
    }
    if let Err(e) = gpu.check() {
        println!("backend error during the timings: {e}");
        rep.failed += 1;
    }
    println!(
        "\ntotal {:.0} s; {} correctness failures",
        start.elapsed().as_secs_f64(),
        rep.failed
    );
    std::process::exit(i32::from(rep.failed > 0));
}
