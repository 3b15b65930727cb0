//! Causal grouped-query attention over a paged KV cache.
//!
//! The cache is one flat `f32` pool of fixed-size blocks. A block holds `block_size`
//! consecutive positions of one sequence for *every* layer of the (unrolled) model, keys and
//! values separately: `[layer][k|v][slot][kv_heads * head_dim]`. A sequence owns a block table
//! (block ids in position order), so position `p` lives in block `table[p / block_size]`,
//! slot `p % block_size`.

use crate::elementwise::{axpy, dot, softmax_inplace};
use rayon::prelude::*;

/// Geometry of the paged KV pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvLayout {
    /// Layers that keep keys/values (unrolled layers for a recursive model).
    pub n_layers: usize,
    /// Positions per block.
    pub block_size: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl KvLayout {
    /// Floats of one position of one layer, keys or values.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Floats in one block.
    pub fn block_floats(&self) -> usize {
        self.n_layers * 2 * self.block_size * self.kv_dim()
    }

    /// Offset in the pool of the key (`kind = 0`) or value (`kind = 1`) vector of
    /// `(block, layer, slot)`.
    #[inline]
    pub fn offset(&self, block: u32, layer: usize, kind: usize, slot: usize) -> usize {
        (((block as usize * self.n_layers + layer) * 2 + kind) * self.block_size + slot) * self.kv_dim()
    }
}

/// One query row: which sequence's blocks it reads and up to which position.
#[derive(Clone, Copy, Debug)]
pub struct AttnRow<'a> {
    /// The sequence's block table.
    pub blocks: &'a [u32],
    /// The row's own position; it attends to positions `0..=pos` (or the last `window` of them).
    pub pos: usize,
    /// Unrolled layer whose keys and values the row reads.
    pub layer: usize,
}

/// Shape parameters shared by all rows of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub n_heads: usize,
    /// Sliding-window size (Mistral); `None` attends to the whole prefix.
    pub window: Option<usize>,
    /// Usually `1 / sqrt(head_dim)`.
    pub scale: f32,
}

/// Computes `out[row] = softmax(q K^T * scale) V` per head for every row.
///
/// `q` and `out` are `rows.len() x (n_heads * head_dim)`. Rows are independent: each reads the
/// keys and values that are already in `pool` (write the batch's own keys first).
pub fn attention_paged(
    q: &[f32],
    rows: &[AttnRow<'_>],
    pool: &[f32],
    layout: &KvLayout,
    shape: AttnShape,
    out: &mut [f32],
) {
    let hd = layout.head_dim;
    let group = shape.n_heads / layout.n_kv_heads;
    debug_assert_eq!(q.len(), rows.len() * shape.n_heads * hd);
    debug_assert_eq!(out.len(), q.len());
    // One task per (row, KV head): the `group` query heads that share a KV head are computed
    // together, so each key and value vector is read once for all of them.
    let work = |(idx, o): (usize, &mut [f32])| {
        let (r, kvh) = (idx / layout.n_kv_heads, idx % layout.n_kv_heads);
        let row = &rows[r];
        let q0 = (r * shape.n_heads + kvh * group) * hd;
        let qg = &q[q0..q0 + group * hd];
        let start = match shape.window {
            Some(w) if row.pos + 1 > w => row.pos + 1 - w,
            _ => 0,
        };
        let len = row.pos + 1 - start;
        // scores[g * len + i]: query head g of the group, position start + i.
        let mut scores = vec![0f32; group * len];
        for (i, p) in (start..=row.pos).enumerate() {
            let b = row.blocks[p / layout.block_size];
            let off = layout.offset(b, row.layer, 0, p % layout.block_size) + kvh * hd;
            let key = &pool[off..off + hd];
            for g in 0..group {
                scores[g * len + i] = dot(&qg[g * hd..(g + 1) * hd], key) * shape.scale;
            }
        }
        for g in 0..group {
            softmax_inplace(&mut scores[g * len..(g + 1) * len]);
        }
        o.fill(0.0);
        for (i, p) in (start..=row.pos).enumerate() {
            let b = row.blocks[p / layout.block_size];
            let off = layout.offset(b, row.layer, 1, p % layout.block_size) + kvh * hd;
            let val = &pool[off..off + hd];
            for g in 0..group {
                axpy(scores[g * len + i], val, &mut o[g * hd..(g + 1) * hd]);
            }
        }
    };
    let total_ctx: usize = rows.iter().map(|r| r.pos + 1).sum::<usize>() * shape.n_heads;
    if total_ctx * hd >= 1 << 15 {
        out.par_chunks_mut(group * hd).enumerate().for_each(work);
    } else {
        out.chunks_mut(group * hd).enumerate().for_each(work);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Dense reference: per head, keys and values of positions 0..=pos given contiguously.
    fn reference(
        q: &[f32],
        keys: &[Vec<f32>],
        vals: &[Vec<f32>],
        n_heads: usize,
        n_kv: usize,
        hd: usize,
        scale: f32,
    ) -> Vec<f64> {
        let mut out = vec![0f64; n_heads * hd];
        for h in 0..n_heads {
            let g = h / (n_heads / n_kv);
            let s: Vec<f64> = keys
                .iter()
                .map(|k| {
                    (0..hd)
                        .map(|i| q[h * hd + i] as f64 * k[g * hd + i] as f64)
                        .sum::<f64>()
                        * scale as f64
                })
                .collect();
            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = s.iter().map(|v| (v - m).exp()).sum();
            for (p, v) in vals.iter().enumerate() {
                let w = (s[p] - m).exp() / z;
                for i in 0..hd {
                    out[h * hd + i] += w * v[g * hd + i] as f64;
                }
            }
        }
        out
    }

    #[test]
    fn paged_attention_matches_dense_reference() {
        let layout = KvLayout {
            n_layers: 2,
            block_size: 4,
            n_kv_heads: 2,
            head_dim: 8,
        };
        let n_heads = 4;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let n_blocks = 5u32;
        let mut pool = vec![0f32; n_blocks as usize * layout.block_floats()];
        // Sequence uses blocks 3, 0, 4 (non-contiguous on purpose), 10 positions, layer 1.
        let table = [3u32, 0, 4];
        let ctx = 10;
        let mut keys = Vec::new();
        let mut vals = Vec::new();
        for p in 0..ctx {
            let k: Vec<f32> = (0..layout.kv_dim()).map(|_| rng.random_range(-1.0..1.0)).collect();
            let v: Vec<f32> = (0..layout.kv_dim()).map(|_| rng.random_range(-1.0..1.0)).collect();
            let b = table[p / 4];
            let ko = layout.offset(b, 1, 0, p % 4);
            pool[ko..ko + layout.kv_dim()].copy_from_slice(&k);
            let vo = layout.offset(b, 1, 1, p % 4);
            pool[vo..vo + layout.kv_dim()].copy_from_slice(&v);
            keys.push(k);
            vals.push(v);
        }
        let q: Vec<f32> = (0..2 * n_heads * 8).map(|_| rng.random_range(-1.0..1.0)).collect();
        let rows = [
            AttnRow {
                blocks: &table,
                pos: 9,
                layer: 1,
            },
            AttnRow {
                blocks: &table,
                pos: 4,
                layer: 1,
            },
        ];
        let mut out = vec![f32::NAN; q.len()];
        let shape = AttnShape {
            n_heads,
            window: None,
            scale: 0.35,
        };
        attention_paged(&q, &rows, &pool, &layout, shape, &mut out);
        let r0 = reference(&q[..32], &keys, &vals, n_heads, 2, 8, 0.35);
        let r1 = reference(&q[32..], &keys[..5], &vals[..5], n_heads, 2, 8, 0.35);
        for (g, w) in out.iter().zip(r0.iter().chain(&r1)) {
            assert!((*g as f64 - w).abs() < 1e-5, "{g} vs {w}");
        }
        // Sliding window of 3 at pos 9 sees positions 7..=9 only.
        let shape = AttnShape {
            n_heads,
            window: Some(3),
            scale: 0.35,
        };
        attention_paged(&q[..32], &rows[..1], &pool, &layout, shape, &mut out[..32]);
        let rw = reference(&q[..32], &keys[7..], &vals[7..], n_heads, 2, 8, 0.35);
        for (g, w) in out[..32].iter().zip(&rw) {
            assert!((*g as f64 - w).abs() < 1e-5);
        }
        // A window of 0 leaves nothing to attend to: the output is 0, not NaN (the CUDA
        // kernel follows the same rule; the GPU check compares them).
        let shape = AttnShape {
            n_heads,
            window: Some(0),
            scale: 0.35,
        };
        out.fill(f32::NAN);
        attention_paged(&q, &rows, &pool, &layout, shape, &mut out);
        assert!(out.iter().all(|&v| v == 0.0), "{out:?}");
    }
}
