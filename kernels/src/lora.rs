//! The shared product and the per-depth LoRAs in two parallel regions on the CPU: the
//! counterpart of the fused CUDA kernel (`cuda/kernels`), used with int8 products.
//!
//! The separate path ([`crate::backend::lora_groups`], the exact oracle's) runs the shared
//! product, then for every (row group, module) pair a shrink `t = x_g A^T` and an expand
//! `t B^T`, each a product of its own with its own dispatch, quantization of its input and
//! output buffer. Here:
//!
//! 1. **Shrink**: the input rows are quantized once; the shrinks of every pair (all depth
//!    groups, all modules stacked in the product) are one parallel region whose tasks are
//!    blocks of [`SHRINK_ROWS`] rows of the `A` matrices.
//! 2. **Shared product + expand + bias**: one parallel region over blocks of output columns.
//!    When every matrix multiplies in integers and every adapter's columns start on a packed
//!    group of 16 (all real models), the expand is fused into the shared product's tiles
//!    ([`crate::qdot::Packed::columns_plus`]): a tile of 16 columns and up to 8 rows computes
//!    `x W^T`, then continues accumulating `t_g B_g^T` (Q8_0 blocks of the rank dimension) in
//!    the same registers, and is stored once; tiles are cut where a depth group's rows begin
//!    or end. Otherwise each task computes its tile of `x W^T` and then adds `t_g B_g^T` for
//!    the rows of each group on the same columns (rows `j0 .. j1` of `B`), while the tile is
//!    in L1. Either way the expand is split the way the shared product is, so even one row
//!    keeps every core busy.
//!
//! Every block sum is the separate path's (the same kernels, the same quantized `x` and `t`);
//! only the order of the floating-point additions differs (shared, LoRA and bias summed in
//! the tile before `y`), within a few ulps of the values (tested against the separate path).
//! Pass-level callers issue this from a pool worker ([`crate::on_compute_pool`]): its two
//! regions are then `join`s, not hand-offs between threads.

use crate::backend::{CpuMatrix, LoraColumns, LoraMats, MatrixData, RowGroup, lora_pairs};
use crate::matmul::MatmulMode;
use crate::qdot::{Addend, CpuProducts, GROUP, Q8Rows, cpu_products, quantize_rows};
use crate::skinny::by_column_blocks;
use rayon::prelude::*;

/// Rows of an `A` matrix per shrink task.
const SHRINK_ROWS: usize = 16;

/// Rows of a product's input as its kernels read them: f32, and their 8-bit quantization
/// where a matrix multiplies in integers.
#[derive(Clone, Copy)]
struct Input<'a> {
    /// `n x k`.
    f: &'a [f32],
    /// The quantized rows and the index of this input's first row in them.
    q: Option<(&'a Q8Rows, usize)>,
    n: usize,
}

impl<'a> Input<'a> {
    /// Rows `start .. start + len`.
    fn rows(self, start: usize, len: usize, k: usize) -> Input<'a> {
        Input {
            f: &self.f[start * k..(start + len) * k],
            q: self.q.map(|(q, r0)| (q, r0 + start)),
            n: len,
        }
    }
}

impl CpuMatrix {
    /// Whether products with this matrix read 8-bit activations (blocks under int8 products).
    fn reads_q8(&self) -> bool {
        matches!(self.data, MatrixData::Quant(..)) && cpu_products() == CpuProducts::Int8
    }

    /// `out (x.n x (j1 - j0)) = x W[j0 .. j1]^T`: one column block, with the kernel and tiles
    /// [`CpuMatrix::matmul`] uses for it.
    fn columns(&self, x: Input<'_>, j0: usize, j1: usize, out: &mut [f32]) {
        let k = self.in_dim;
        match (&self.data, x.q) {
            (MatrixData::F32(v), _) => crate::skinny::block(x.f, &v[j0 * k..j1 * k], out, x.n, k, j1 - j0),
            (MatrixData::Quant(..), Some((q, r0))) if self.reads_q8() => {
                self.packed().expect("quantized").columns(q, r0, x.n, j0, j1, out)
            }
            (MatrixData::Quant(f, b), _) => crate::qmatmul::columns(x.f, *f, b, x.n, k, j0, j1, out),
        }
    }

    /// The input of products with this matrix: `x`, quantized when it reads 8 bits.
    fn quantize_for(&self, x: &[f32], n: usize) -> Option<Q8Rows> {
        self.reads_q8().then(|| quantize_rows(x, n, self.in_dim))
    }
}

/// One group of rows and one adapter on the columns `col0 ..` of the product.
struct Pair<'a> {
    g: RowGroup,
    col0: usize,
    l: &'a LoraMats<CpuMatrix>,
}

/// Whether [`linear_lora`] replaces the separate path: with int8 products (the exact path
/// stays the oracle, computed as the reference forward pass computes it).
pub fn fused_lora_enabled() -> bool {
    cpu_products() == CpuProducts::Int8
}

/// `y (+)= x W^T + bias`, then for every group `g` of rows and every entry of `loras`, the
/// adapter of the group's depth: `y[g, col0 ..] += (x_g A^T) B^T`; `x` is `n x k`, `y`
/// `n x m`.
#[allow(clippy::too_many_arguments)]
pub fn linear_lora(
    x: &[f32],
    n: usize,
    w: &CpuMatrix,
    bias: Option<&[f32]>,
    loras: &[LoraColumns<'_, CpuMatrix>],
    groups: &[RowGroup],
    y: &mut [f32],
    mode: MatmulMode,
) {
    let (k, m) = (w.in_dim, w.out_dim);
    let (x, y) = (&x[..n * k], &mut y[..n * m]);
    if n == 0 || m == 0 {
        return;
    }
    let pairs: Vec<Pair<'_>> = lora_pairs(n, loras, groups)
        .into_iter()
        .map(|(g, col0, l)| Pair { g, col0, l })
        .collect();
    let xq = if w.reads_q8() || pairs.iter().any(|p| p.l.a.reads_q8()) {
        Some(quantize_rows(x, n, k))
    } else {
        None
    };
    let input = Input {
        f: x,
        q: xq.as_ref().map(|q| (q, 0)),
        n,
    };
    let ts = shrink(input, k, &pairs);
    let tq: Vec<Option<Q8Rows>> = pairs
        .iter()
        .zip(&ts)
        .map(|(p, t)| p.l.b.quantize_for(t, p.g.len))
        .collect();
    let shared_work = if w.reads_q8() { n * k * m / 4 } else { n * k * m };
    let work = shared_work + pairs.iter().map(|p| p.g.len * p.l.rank * p.l.b.out_dim).sum::<usize>();
    let add_bias = |j0: usize, j1: usize, out: &mut [f32]| {
        if let Some(b) = bias {
            for row in out.chunks_exact_mut(j1 - j0) {
                row.iter_mut().zip(&b[j0..j1]).for_each(|(v, bi)| *v += bi);
            }
        }
    };
    // In-tile expands: every matrix multiplies in integers and every adapter's columns start
    // on a packed group, so each tile of the shared product takes its rows' expand before it
    // is stored.
    let in_tile = w
        .packed()
        .filter(|_| w.reads_q8())
        .zip(xq.as_ref())
        .and_then(|(wp, xq)| {
            let addends = pairs
                .iter()
                .zip(&tq)
                .map(|(p, tq)| {
                    let b = p.l.b.packed().filter(|_| p.l.b.reads_q8() && p.col0 % GROUP == 0)?;
                    Some(Addend {
                        rows: p.g.start..p.g.start + p.g.len,
                        col0: p.col0,
                        b,
                        tq: tq.as_ref()?,
                    })
                })
                .collect::<Option<Vec<_>>>()?;
            Some((wp, xq, addends))
        });
    if let Some((wp, xq, addends)) = in_tile {
        by_column_blocks(y, n, m, work, mode == MatmulMode::Accumulate, |j0, j1, out| {
            wp.columns_plus(xq, 0, n, j0, j1, out, &addends);
            add_bias(j0, j1, out);
        });
        return;
    }
    by_column_blocks(y, n, m, work, mode == MatmulMode::Accumulate, |j0, j1, out| {
        let mb = j1 - j0;
        w.columns(input, j0, j1, out);
        add_bias(j0, j1, out);
        for (p, (t, tq)) in pairs.iter().zip(ts.iter().zip(&tq)) {
            let (c0, c1) = (j0.max(p.col0), j1.min(p.col0 + p.l.b.out_dim));
            if c0 >= c1 {
                continue;
            }
            let wd = c1 - c0;
            let mut d = vec![0f32; p.g.len * wd];
            let tin = Input {
                f: t,
                q: tq.as_ref().map(|q| (q, 0)),
                n: p.g.len,
            };
            p.l.b.columns(tin, c0 - p.col0, c1 - p.col0, &mut d);
            for (i, drow) in d.chunks_exact(wd).enumerate() {
                let o = (p.g.start + i) * mb + (c0 - j0);
                out[o..o + wd].iter_mut().zip(drow).for_each(|(v, q)| *v += q);
            }
        }
    });
}

/// Every pair's `t = x_g A^T` (`g.len x rank`), in one region of tasks of [`SHRINK_ROWS`]
/// rows of `A`.
fn shrink(input: Input<'_>, k: usize, pairs: &[Pair<'_>]) -> Vec<Vec<f32>> {
    let tasks: Vec<(usize, usize, usize)> = pairs
        .iter()
        .enumerate()
        .flat_map(|(pi, p)| {
            let rank = p.l.rank;
            (0..rank)
                .step_by(SHRINK_ROWS)
                .map(move |r0| (pi, r0, (r0 + SHRINK_ROWS).min(rank)))
        })
        .collect();
    let run = |&(pi, r0, r1): &(usize, usize, usize)| -> Vec<f32> {
        let p = &pairs[pi];
        let mut out = vec![0f32; p.g.len * (r1 - r0)];
        p.l.a.columns(input.rows(p.g.start, p.g.len, k), r0, r1, &mut out);
        out
    };
    // Always a parallel region, even for one row: issued from a pool worker (passes run on
    // one, `crate::on_compute_pool`) it is a cheap `join`, and a serial shrink leaves the
    // other workers idle long enough to fall asleep before the shared product wakes them
    // (`rrt bench matmul`, one row: +35 % rank-64 overhead parallel, +75 % serial).
    let parts: Vec<Vec<f32>> = if tasks.len() > 1 {
        tasks.par_iter().map(run).collect()
    } else {
        tasks.iter().map(run).collect()
    };
    let mut ts: Vec<Vec<f32>> = pairs.iter().map(|p| vec![0f32; p.g.len * p.l.rank]).collect();
    for (&(pi, r0, r1), part) in tasks.iter().zip(parts) {
        let rank = pairs[pi].l.rank;
        for (i, row) in part.chunks_exact(r1 - r0).enumerate() {
            ts[pi][i * rank + r0..i * rank + r1].copy_from_slice(row);
        }
    }
    ts
}
