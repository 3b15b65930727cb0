//! Host-side planning of the CUDA backend's launches, in plain Rust so it is tested without a
//! GPU (and without the `cuda` feature): which product kernel a row count gets, how K is split
//! so small products still fill the device, how the per-depth LoRAs of one `linear_lora` call
//! are laid out for the kernels (per pass: row adapters and shrink work; per call: the
//! descriptor table and `t`), and the
//! offsets of the vector copies behind `copy_rows`, `kv_write`, `kv_export` and `kv_import`.
//!
//! The constants mirror the `#define`s of `kernels/*.cu`; a test keeps them in sync.

use crate::attention::KvLayout;
use crate::backend::{KvSlot, RowGroup};

/// Rows up to which a product runs on the weight-streaming GEMV kernel.
pub const GEMV_MAX_ROWS: usize = 16;
/// Output columns one GEMV block computes (4 warps x 2 weight rows).
pub const GEMV_COLS: usize = 8;
/// K elements one GEMV warp iteration covers (32 lanes x 8).
pub const GEMV_K_UNIT: usize = 256;
/// Tensor-core tile: rows of x, columns of y, K step.
pub const MMA_BM: usize = 64;
pub const MMA_BN: usize = 128;
pub const MMA_BK: usize = 32;
/// Rows per decode shrink task, and rank rows (warps) per shrink block.
pub const SHRINK_ROWS: usize = 8;
pub const SHRINK_WARPS: usize = 8;
/// Groups at least this long get their shrink from the tensor-core kernel.
pub const SHRINK_MMA_MIN_ROWS: usize = 64;
/// K elements per shrink split: a multiple of the warp path's stride (32 lanes x 8) and of
/// the tensor-core K step; at least this many per split keep a split's work above its cost.
pub const SHRINK_K_UNIT: usize = 256;
pub const SHRINK_MIN_K_PER_SPLIT: usize = 1024;
/// Most splits of K in one shrink launch.
pub const MAX_SHRINK_SPLITS: usize = 16;
/// LoRA column entries one product can carry (q, k, v: 3; gate, up: 2).
pub const MAX_ENTRIES: usize = 4;
/// Adapters (loop depths) one product can distinguish (a 64-bit mask in the tensor-core tile).
pub const MAX_ADAPTERS: usize = 64;
/// Most splits of K.
pub const MAX_SPLITS: usize = 32;
/// Split-K arrival counters (one per output tile of a split product).
pub const SPLIT_COUNTERS: usize = 1 << 16;
/// Largest split-K workspace, in floats (64 MiB).
pub const MAX_WORKSPACE_FLOATS: usize = 16 << 20;

/// Which kernel computes a product of `n` rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProductKernel {
    /// `linear_gemv_*_r{rows}`: `rows` is the smallest instance with `rows >= n`.
    Gemv { rows: usize },
    /// `linear_mma_*`.
    Mma,
}

/// The kernel for `n` rows (`n >= 1`).
pub fn product_kernel(n: usize) -> ProductKernel {
    if n <= GEMV_MAX_ROWS {
        ProductKernel::Gemv {
            rows: n.max(1).next_power_of_two(),
        }
    } else {
        ProductKernel::Mma
    }
}

/// Launch geometry of one product: grid and the K range of each split.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProductLaunch {
    pub kernel: ProductKernel,
    /// Output tiles (blocks per split).
    pub tiles_x: usize,
    pub tiles_y: usize,
    pub splits: usize,
    /// K elements per split (the last may be shorter).
    pub k_chunk: usize,
}

/// Plans a product `y (n x m) = x (n x k) W^T` on a device with `sms` multiprocessors. K is
/// split when the output tiles alone would leave the device idle (small `m`, long `k`): the
/// weights then still stream from every SM. `workspace_cap` bounds `splits * n * m`.
pub fn plan_product(n: usize, m: usize, k: usize, sms: usize, workspace_cap: usize) -> ProductLaunch {
    let kernel = product_kernel(n);
    let (tiles_x, tiles_y, unit, target) = match kernel {
        // Small blocks (4 warps): aim at 8 per SM for enough loads in flight.
        ProductKernel::Gemv { .. } => (m.div_ceil(GEMV_COLS), 1, GEMV_K_UNIT, 8 * sms),
        // 8 warps and 30 KiB of shared memory: 2 per SM.
        ProductKernel::Mma => (m.div_ceil(MMA_BN), n.div_ceil(MMA_BM), 2 * MMA_BK, 2 * sms),
    };
    let tiles = (tiles_x * tiles_y).max(1);
    let mut splits = 1;
    if tiles < target && tiles <= SPLIT_COUNTERS {
        let by_target = target.div_ceil(tiles);
        let by_k = (k / unit).max(1);
        let by_ws = (workspace_cap / (n * m).max(1)).max(1);
        splits = by_target.min(by_k).min(by_ws).clamp(1, MAX_SPLITS);
    }
    let mut k_chunk = k.div_ceil(splits).div_ceil(unit) * unit;
    if k_chunk == 0 {
        k_chunk = unit;
    }
    let splits = k.div_ceil(k_chunk).max(1);
    ProductLaunch {
        kernel,
        tiles_x,
        tiles_y,
        splits,
        k_chunk,
    }
}

/// One LoRA column entry of a product as the planner sees it: its columns and, per adapter,
/// the rank of its LoRA (`None`: no LoRA at that depth).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryShape {
    pub col0: usize,
    pub cols: usize,
    pub ranks: Vec<Option<usize>>,
}

/// A shrink work item: `rows` rows from `row0`, all at loop depth `adapter`. One launch serves
/// every item of a product, for every entry (the kernel's grid covers items x entries).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShrinkItem {
    pub row0: usize,
    pub rows: usize,
    pub adapter: usize,
}

/// The LoRA side of a pass's rows, shared by every product of the pass (computed and uploaded
/// once per pass): each row's adapter (`-1`: in no group) and the shrink work, short groups in
/// items of at most [`SHRINK_ROWS`] rows (the warp kernel), long groups in tiles of at most
/// [`MMA_BM`] rows (the tensor cores). One launch runs both kinds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RowPlan {
    pub row_adapter: Vec<i32>,
    pub small: Vec<ShrinkItem>,
    pub tiles: Vec<ShrinkItem>,
    /// Loop depths present among the rows (ascending, each once).
    pub adapters: Vec<usize>,
}

/// The LoRA side of one product over planned rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoraCall {
    /// Columns of the descriptor table: descriptor `(entry, adapter)` is at `entry *
    /// n_adapters + adapter`.
    pub n_adapters: usize,
    /// Rank slots per entry in `t` (a multiple of 32), and the row stride of `t`.
    pub rmax: usize,
    pub ldt: usize,
    /// Blocks along the rank per entry: warp items (8 rank rows each), tensor-core tiles
    /// ([`MMA_BN`] rank columns each).
    pub rank_blocks: usize,
    pub col_tiles: usize,
}

/// Why a call cannot run on the CUDA kernels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PlanError {
    TooManyEntries(usize),
    TooManyAdapters(usize),
    GroupOutOfRange { start: usize, len: usize, n: usize },
}

impl std::fmt::Display for PlanError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PlanError::TooManyEntries(e) => write!(f, "{e} LoRA column entries (at most {MAX_ENTRIES})"),
            PlanError::TooManyAdapters(a) => write!(f, "{a} adapters (at most {MAX_ADAPTERS})"),
            PlanError::GroupOutOfRange { start, len, n } => {
                write!(f, "row group {start}..+{len} outside the {n} rows")
            }
        }
    }
}

/// Plans the rows of a pass (`n` rows in `groups`; empty groups allowed).
pub fn plan_rows(n: usize, groups: &[RowGroup]) -> Result<RowPlan, PlanError> {
    let mut p = RowPlan {
        row_adapter: vec![-1; n],
        ..Default::default()
    };
    for g in groups {
        if g.start + g.len > n {
            return Err(PlanError::GroupOutOfRange {
                start: g.start,
                len: g.len,
                n,
            });
        }
        if g.len == 0 {
            continue;
        }
        if g.adapter >= MAX_ADAPTERS {
            return Err(PlanError::TooManyAdapters(g.adapter + 1));
        }
        p.row_adapter[g.start..g.start + g.len].fill(g.adapter as i32);
        if !p.adapters.contains(&g.adapter) {
            p.adapters.push(g.adapter);
        }
        let (unit, out) = if g.len >= SHRINK_MMA_MIN_ROWS {
            (MMA_BM, &mut p.tiles)
        } else {
            (SHRINK_ROWS, &mut p.small)
        };
        let mut r0 = g.start;
        while r0 < g.start + g.len {
            let rows = unit.min(g.start + g.len - r0);
            out.push(ShrinkItem {
                row0: r0,
                rows,
                adapter: g.adapter,
            });
            r0 += rows;
        }
    }
    p.adapters.sort_unstable();
    Ok(p)
}

/// Plans the LoRAs of one product over planned rows. `None` when no row has a LoRA in any
/// entry (the product then runs without the LoRA machinery).
pub fn plan_call(rows: &RowPlan, entries: &[EntryShape]) -> Result<Option<LoraCall>, PlanError> {
    if entries.len() > MAX_ENTRIES {
        return Err(PlanError::TooManyEntries(entries.len()));
    }
    let rank = |e: &EntryShape, a: usize| e.ranks.get(a).copied().flatten().filter(|&r| r > 0);
    let n_adapters = entries.iter().map(|e| e.ranks.len()).max().unwrap_or(0);
    if n_adapters > MAX_ADAPTERS {
        return Err(PlanError::TooManyAdapters(n_adapters));
    }
    let max_rank = rows
        .adapters
        .iter()
        .flat_map(|&a| entries.iter().filter_map(move |e| rank(e, a)))
        .max();
    let Some(max_rank) = max_rank else {
        return Ok(None);
    };
    let rmax = max_rank.div_ceil(32) * 32;
    Ok(Some(LoraCall {
        n_adapters,
        rmax,
        ldt: entries.len() * rmax,
        rank_blocks: rmax / SHRINK_WARPS,
        col_tiles: rmax.div_ceil(MMA_BN),
    }))
}

/// Splits of K for a shrink launch of `blocks` blocks (per split) over `k` inputs on a device
/// with `sms` multiprocessors: `(splits, k_chunk)`. A long K with few blocks (a decode shrink of
/// a 16384-wide `down`: a handful of blocks each streaming 32 KiB rows) is split so the launch
/// fills the device; each split writes its own partial `t`, and the products sum the partials
/// in split order when they read `t` (deterministic, no atomics).
pub fn plan_shrink_splits(blocks: usize, k: usize, sms: usize) -> (usize, usize) {
    let by_k = (k / SHRINK_MIN_K_PER_SPLIT).max(1);
    let by_fill = (2 * sms).div_ceil(blocks.max(1));
    let splits = by_k.min(by_fill).clamp(1, MAX_SHRINK_SPLITS);
    let k_chunk = k.div_ceil(splits).div_ceil(SHRINK_K_UNIT) * SHRINK_K_UNIT;
    let k_chunk = k_chunk.max(SHRINK_K_UNIT);
    (k.div_ceil(k_chunk).max(1), k_chunk)
}

/// Row stride of a resident 16-bit matrix: rows padded to 8 elements (16 bytes) so every row
/// starts aligned for the kernels' vector loads; the padding holds zeros.
pub fn padded_ld(in_dim: usize) -> usize {
    in_dim.div_ceil(8) * 8
}

/// Destination and source offsets (in floats) of the key and value vectors of `kv_write`:
/// row `i`'s key (column `k_col0` of `src`, stride `ld`) and value (column `v_col0`).
pub fn kv_write_offsets(
    layout: &KvLayout,
    slots: &[KvSlot],
    ld: usize,
    k_col0: usize,
    v_col0: usize,
) -> (Vec<i64>, Vec<i64>) {
    let mut dst = Vec::with_capacity(2 * slots.len());
    let mut src = Vec::with_capacity(2 * slots.len());
    for (i, s) in slots.iter().enumerate() {
        dst.push(layout.offset(s.block, s.layer, 0, s.slot) as i64);
        src.push((i * ld + k_col0) as i64);
        dst.push(layout.offset(s.block, s.layer, 1, s.slot) as i64);
        src.push((i * ld + v_col0) as i64);
    }
    (dst, src)
}

/// Pool offsets of the vectors of `kv_export` in its order (position-major, then layer, then
/// key before value); vector `v` of the export is at `v * kv_dim` of the host buffer.
pub fn kv_export_offsets(layout: &KvLayout, blocks: &[u32], positions: usize) -> Vec<i64> {
    let mut out = Vec::with_capacity(positions * layout.n_layers * 2);
    for p in 0..positions {
        let (block, slot) = (blocks[p / layout.block_size], p % layout.block_size);
        for l in 0..layout.n_layers {
            for kind in 0..2 {
                out.push(layout.offset(block, l, kind, slot) as i64);
            }
        }
    }
    out
}

/// Offsets `i * width` for `count` consecutive rows from row `row0`.
pub fn row_offsets(rows: impl Iterator<Item = usize>, width: usize) -> Vec<i64> {
    rows.map(|r| (r * width) as i64).collect()
}

/// The attended range of a row at `pos` with an optional sliding window: `start..=pos`.
pub fn window_start(pos: usize, window: Option<usize>) -> usize {
    match window {
        Some(w) if pos + 1 > w => pos + 1 - w,
        _ => 0,
    }
}

/// Head dimensions per lane of the attention kernel instance for `head_dim` (2, 4 or 8),
/// `None` above 256.
pub fn attention_dims_per_lane(head_dim: usize) -> Option<usize> {
    match head_dim {
        0..=64 => Some(2),
        65..=128 => Some(4),
        129..=256 => Some(8),
        _ => None,
    }
}

/// Dynamic shared memory of the attention kernel, in bytes.
pub fn attention_smem_bytes(group: usize, head_dim: usize) -> usize {
    const WARPS: usize = 4;
    4 * (group * head_dim + 2 * WARPS * group + WARPS * group * head_dim)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Backend, CpuBackend};

    fn group(start: usize, len: usize, adapter: usize) -> RowGroup {
        RowGroup { start, len, adapter }
    }

    #[test]
    fn kernel_choice_by_rows() {
        let table = [
            (1, ProductKernel::Gemv { rows: 1 }),
            (2, ProductKernel::Gemv { rows: 2 }),
            (3, ProductKernel::Gemv { rows: 4 }),
            (8, ProductKernel::Gemv { rows: 8 }),
            (9, ProductKernel::Gemv { rows: 16 }),
            (16, ProductKernel::Gemv { rows: 16 }),
            (17, ProductKernel::Mma),
            (2048, ProductKernel::Mma),
        ];
        for (n, want) in table {
            assert_eq!(product_kernel(n), want, "n = {n}");
        }
    }

    /// Splits cover K exactly once, in unit multiples, and only when the tiles are few.
    #[test]
    fn split_k_covers_k_and_fills_the_device() {
        let sms = 132;
        for (n, m, k) in [
            (1, 2048, 16384),
            (1, 576, 1536),
            (8, 32768, 2048),
            (64, 2048, 16384),
            (64, 960, 576),
            (2048, 2048, 2048),
            (1, 8, 4),
            (300, 49152, 576),
            (17, 3, 5),
        ] {
            let p = plan_product(n, m, k, sms, MAX_WORKSPACE_FLOATS);
            let unit = match p.kernel {
                ProductKernel::Gemv { .. } => GEMV_K_UNIT,
                ProductKernel::Mma => 2 * MMA_BK,
            };
            assert_eq!(p.k_chunk % unit, 0, "{n}x{m}x{k}: {p:?}");
            assert!(p.splits >= 1 && p.splits <= MAX_SPLITS);
            // Every split non-empty, together exactly 0..k.
            assert!((p.splits - 1) * p.k_chunk < k.max(1), "{n}x{m}x{k}: empty split {p:?}");
            assert!(p.splits * p.k_chunk >= k, "{n}x{m}x{k}: {p:?}");
            assert!(p.splits * n * m <= MAX_WORKSPACE_FLOATS || p.splits == 1);
            if p.splits > 1 {
                assert!(p.tiles_x * p.tiles_y <= SPLIT_COUNTERS);
            }
        }
        // A decode product with few columns and a long K is split; a wide one is not.
        let down = plan_product(1, 2048, 16384, sms, MAX_WORKSPACE_FLOATS);
        assert!(down.splits > 1, "{down:?}");
        let wide = plan_product(1, 32768, 2048, sms, MAX_WORKSPACE_FLOATS);
        assert_eq!(wide.splits, 1, "{wide:?}");
        let prefill = plan_product(2048, 2048, 2048, sms, MAX_WORKSPACE_FLOATS);
        assert_eq!((prefill.kernel, prefill.splits), (ProductKernel::Mma, 1));
    }

    /// Every (row, entry) with a LoRA is shrunk by exactly one item or tile; short groups go
    /// to the warp kernel, long ones to the tensor cores; empty groups and rows outside every
    /// group get nothing.
    #[test]
    fn row_plan_covers_every_row_once_and_call_plan_sizes_t() {
        // q, k, v entries; depth 1 has no LoRA on k; depth 2 none at all.
        let entries = vec![
            EntryShape {
                col0: 0,
                cols: 576,
                ranks: vec![Some(64), Some(64), None],
            },
            EntryShape {
                col0: 576,
                cols: 192,
                ranks: vec![Some(16), None, None],
            },
            EntryShape {
                col0: 768,
                cols: 192,
                ranks: vec![Some(16), Some(40), None],
            },
        ];
        // Rows: 0..3 depth 0, 3..4 depth 2, an empty group, 4..14 depth 1, 14..100 depth 0,
        // 100..102 in no group.
        let groups = [
            group(0, 3, 0),
            group(3, 1, 2),
            group(4, 0, 1),
            group(4, 10, 1),
            group(14, 86, 0),
        ];
        let p = plan_rows(102, &groups).unwrap();
        let want_rows: Vec<i32> = (0..102)
            .map(|i| match i {
                0..3 => 0,
                3 => 2,
                4..14 => 1,
                14..100 => 0,
                _ => -1,
            })
            .collect();
        assert_eq!(p.row_adapter, want_rows);
        assert_eq!(p.adapters, vec![0, 1, 2]);
        let mut cover = [0u8; 102];
        for (t, max) in p
            .small
            .iter()
            .map(|t| (t, SHRINK_ROWS))
            .chain(p.tiles.iter().map(|t| (t, MMA_BM)))
        {
            assert!(t.rows >= 1 && t.rows <= max);
            let rows = t.row0..t.row0 + t.rows;
            assert!(p.row_adapter[rows.clone()].iter().all(|&a| a == t.adapter as i32));
            cover[rows].iter_mut().for_each(|c| *c += 1);
        }
        for (r, c) in cover.iter().enumerate() {
            assert_eq!(*c, u8::from(r < 100), "row {r}");
        }
        // The 86-row depth-0 group goes to the tensor cores in two tiles.
        assert_eq!(p.tiles.len(), 2);
        assert!(p.tiles.iter().all(|t| t.adapter == 0 && t.row0 >= 14));
        let c = plan_call(&p, &entries).unwrap().unwrap();
        assert_eq!(
            (c.n_adapters, c.rmax, c.ldt, c.rank_blocks, c.col_tiles),
            (3, 64, 192, 8, 1)
        );
    }

    /// Shrink splits cover K exactly once in unit multiples; short K or many blocks: no split.
    #[test]
    fn shrink_splits_cover_k_and_fill_the_device() {
        for (blocks, k) in [
            (1, 16384),
            (4, 16384),
            (8, 2048),
            (300, 16384),
            (2, 576),
            (1, 1536),
            (3, 5),
            (16, 5632),
        ] {
            let (s, kc) = plan_shrink_splits(blocks, k, 132);
            assert!((1..=MAX_SHRINK_SPLITS).contains(&s), "{blocks} {k}: {s}");
            assert_eq!(kc % SHRINK_K_UNIT, 0);
            assert!(s * kc >= k && (s - 1) * kc < k.max(1), "{blocks} {k}: {s} x {kc}");
        }
        assert_eq!(plan_shrink_splits(4, 16384, 132).0, 16);
        assert_eq!(plan_shrink_splits(300, 16384, 132).0, 1);
        assert_eq!(plan_shrink_splits(2, 576, 132).0, 1);
        assert_eq!(plan_shrink_splits(2, 2048, 132).0, 2);
    }

    #[test]
    fn call_plan_none_and_limits() {
        let entries = vec![EntryShape {
            col0: 0,
            cols: 8,
            ranks: vec![None, Some(0)],
        }];
        let rows = plan_rows(4, &[group(0, 4, 1)]).unwrap();
        assert_eq!(plan_call(&rows, &entries), Ok(None));
        assert_eq!(plan_call(&plan_rows(4, &[]).unwrap(), &entries), Ok(None));
        let five = vec![entries[0].clone(); 5];
        assert_eq!(plan_call(&rows, &five), Err(PlanError::TooManyEntries(5)));
        assert!(matches!(
            plan_rows(4, &[group(2, 3, 0)]),
            Err(PlanError::GroupOutOfRange { .. })
        ));
        assert_eq!(plan_rows(4, &[group(0, 4, 64)]), Err(PlanError::TooManyAdapters(65)));
        let many = vec![EntryShape {
            col0: 0,
            cols: 8,
            ranks: vec![Some(4); 65],
        }];
        assert_eq!(
            plan_call(&plan_rows(4, &[group(0, 4, 0)]).unwrap(), &many),
            Err(PlanError::TooManyAdapters(65))
        );
        // Rank 256: two tensor-core column tiles, 32 warp blocks.
        let big = vec![EntryShape {
            col0: 0,
            cols: 8,
            ranks: vec![Some(256)],
        }];
        let c = plan_call(&plan_rows(4, &[group(0, 4, 0)]).unwrap(), &big)
            .unwrap()
            .unwrap();
        assert_eq!((c.rmax, c.rank_blocks, c.col_tiles), (256, 32, 2));
    }

    fn layout() -> KvLayout {
        KvLayout {
            n_layers: 3,
            block_size: 4,
            n_kv_heads: 2,
            head_dim: 3,
        }
    }

    /// Applies `copy_vecs` on the host, as the kernel does on the device.
    fn copy_vecs(dst: &mut [f32], dst_off: &[i64], src: &[f32], src_off: &[i64], len: usize) {
        for (d, s) in dst_off.iter().zip(src_off) {
            let (d, s) = (*d as usize, *s as usize);
            dst[d..d + len].copy_from_slice(&src[s..s + len]);
        }
    }

    /// The offset lists reproduce the CPU backend's kv_write, kv_export and kv_import.
    #[test]
    fn kv_offsets_match_the_cpu_backend() {
        let l = layout();
        let be = CpuBackend;
        let n_blocks = 5;
        let kd = l.kv_dim();
        let ld = 4 * kd + 1;
        let src: Vec<f32> = (0..3 * ld).map(|i| i as f32 * 0.5 + 1.0).collect();
        let slots = [
            KvSlot {
                layer: 2,
                block: 3,
                slot: 1,
            },
            KvSlot {
                layer: 0,
                block: 0,
                slot: 3,
            },
            KvSlot {
                layer: 1,
                block: 4,
                slot: 0,
            },
        ];
        let mut want = be.kv_pool(l, n_blocks).unwrap();
        be.kv_write(&mut want, &l, &src, ld, kd + 1, 2 * kd + 1, &slots)
            .unwrap();
        let mut got = vec![0f32; n_blocks * l.block_floats()];
        let (d, s) = kv_write_offsets(&l, &slots, ld, kd + 1, 2 * kd + 1);
        copy_vecs(&mut got, &d, &src, &s, kd);
        assert_eq!(crate::CpuKv::F32(got), want);

        // Export of 6 positions over blocks [4, 1] from a pool of distinct values.
        let pool: Vec<f32> = (0..n_blocks * l.block_floats()).map(|i| i as f32).collect();
        let blocks = [4u32, 1];
        let want = be.kv_export(&crate::CpuKv::F32(pool.clone()), &l, &blocks, 6).unwrap();
        let offs = kv_export_offsets(&l, &blocks, 6);
        let mut got = vec![0f32; offs.len() * kd];
        let dst = row_offsets(0..offs.len(), kd);
        copy_vecs(&mut got, &dst, &pool, &offs, kd);
        assert_eq!(got, want);

        // Import is the same list the other way round.
        let mut want_pool = crate::CpuKv::F32(vec![0f32; pool.len()]);
        be.kv_import(&mut want_pool, &l, &[2, 0], &want).unwrap();
        let mut got_pool = vec![0f32; pool.len()];
        let offs = kv_export_offsets(&l, &[2, 0], 6);
        copy_vecs(&mut got_pool, &offs, &want, &dst, kd);
        assert_eq!(crate::CpuKv::F32(got_pool), want_pool);
    }

    #[test]
    fn small_helpers() {
        assert_eq!(padded_ld(576), 576);
        assert_eq!(padded_ld(5), 8);
        assert_eq!(padded_ld(0), 0);
        assert_eq!(window_start(9, Some(3)), 7);
        assert_eq!(window_start(2, Some(3)), 0);
        assert_eq!(window_start(9, None), 0);
        assert_eq!(attention_dims_per_lane(64), Some(2));
        assert_eq!(attention_dims_per_lane(128), Some(4));
        assert_eq!(attention_dims_per_lane(256), Some(8));
        assert_eq!(attention_dims_per_lane(257), None);
        // The largest supported case fits the default 48 KiB of shared memory.
        assert!(attention_smem_bytes(8, 256) <= 48 * 1024);
    }

    /// The Rust constants equal the CUDA `#define`s they mirror.
    #[test]
    fn constants_match_the_kernel_sources() {
        let lin = include_str!("kernels/linear.cu");
        for (name, v) in [
            ("MAX_ENTRIES", MAX_ENTRIES),
            ("SHRINK_ROWS", SHRINK_ROWS),
            ("SHRINK_WARPS", SHRINK_WARPS),
            ("SHRINK_K_UNIT", SHRINK_K_UNIT),
            ("MMA_BM", MMA_BM),
            ("MMA_BN", MMA_BN),
            ("MMA_BK", MMA_BK),
            ("GEMV_WARPS", GEMV_COLS / 2),
            ("GEMV_RPW", 2),
        ] {
            let line = format!("#define {name} {v}\n");
            assert!(lin.contains(&line), "linear.cu lacks `{}`", line.trim());
        }
        assert!(include_str!("kernels/attention.cu").contains("#define ATT_WARPS 4\n"));
    }
}
