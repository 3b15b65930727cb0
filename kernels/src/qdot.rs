//! Matrix products of quantized weights (Q4_1, Q8_0) with activations quantized to 8 bits,
//! in integer arithmetic.
//!
//! The exact path ([`crate::qmatmul::matmul_q`]) dequantizes every weight to f32 and multiplies
//! in f32: bit-identical to the f32 product on the dequantized matrix, and the oracle. This
//! path instead quantizes each row of `x` once per product, per block of 32 values, to
//! `x ~ q * d` (q in -127..=127, `d = max|x| / 127`, rounding to nearest even), and computes
//! each block's dot product exactly in integers. Per block `b` of weight row `j` and row `i`
//! of `x`, with `S = sum(qw * qx)` (an exact `i32`):
//!
//! - Q8_0: `y = fma(S, dw * dx, y)`;
//! - Q4_1 (`w = qw * dw + mw`): `y = fma(mw, sx, fma(S, dw * dx, y))`, `sx = dx * sum(qx)`
//!   computed once per block of `x`.
//!
//! **Packed layout** ([`Packed`]). The kernels read weights re-laid out once (at load, for a
//! [`crate::CpuMatrix`]) in groups of [`GROUP`] = 16 rows: per (group, block), the 32 values of
//! the 16 rows interleaved so that each 32-bit lane of a vector holds 4 consecutive values of
//! one row, then the 16 scales (and Q4_1 minimums) as f16. A block's dot products for 16 rows
//! and one row of `x` are then 8 `vpdpbusd` (AVX-512 VNNI: unsigned weight bytes times the
//! row's 4 activation bytes broadcast to every lane), one conversion and two fused
//! multiply-adds on 16 lanes; unpacking the weights and their scales is paid once per tile of
//! up to 8 rows of `x`, not once per (weight row, x row) pair. Q4_1 values are stored as
//! nibbles (4 bits), Q8_0 values offset by +128 as unsigned bytes (the kernel subtracts
//! `128 * sum(qx)` from the integer sum), so the packed matrix has the bytes of the original.
//!
//! The error against the exact product is that of rounding `x` to 8 bits per block (relative
//! error about 2^-9 of the block's largest value per element); the tests bound it.
//!
//! A row's result does not depend on the other rows of the batch (batch invariance), and the
//! AVX-512, AVX2 and portable kernels compute the same exact integer sums and the same
//! floating-point operations in the same order, so they agree bit for bit (tested).

use crate::matmul::MatmulMode;
use crate::qmatmul::QFormat;
use crate::skinny::by_column_blocks;
use half::f16;
use rayon::prelude::*;
use std::sync::atomic::{AtomicU8, Ordering};

/// How the CPU multiplies activations with quantized weights (Q4_1 / Q8_0 blocks); f32
/// weights are not affected.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CpuProducts {
    /// Weights dequantized exactly, products in f32 ([`crate::qmatmul::matmul_q`]): the oracle.
    #[default]
    Exact,
    /// Activations quantized to 8 bits per block, products in integers ([`matmul_q8`]).
    Int8,
}

impl std::str::FromStr for CpuProducts {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "exact" => Ok(Self::Exact),
            "int8" => Ok(Self::Int8),
            other => Err(format!("`{other}` is not a CPU product mode (exact, int8)")),
        }
    }
}

impl std::fmt::Display for CpuProducts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Exact => "exact",
            Self::Int8 => "int8",
        })
    }
}

static PRODUCTS: AtomicU8 = AtomicU8::new(0);

/// Sets how this process multiplies with quantized weights on the CPU. A process-wide setting
/// (like the size of rayon's thread pool): binaries set it once at start from their
/// configuration; the library default is [`CpuProducts::Exact`], so tests and the reference
/// forward pass stay exact unless they ask otherwise.
pub fn set_cpu_products(p: CpuProducts) {
    PRODUCTS.store(p as u8, Ordering::Relaxed);
}

/// The current process-wide [`CpuProducts`].
pub fn cpu_products() -> CpuProducts {
    match PRODUCTS.load(Ordering::Relaxed) {
        1 => CpuProducts::Int8,
        _ => CpuProducts::Exact,
    }
}

/// `y (+)= x W^T` with quantized `W`, by the process's [`CpuProducts`]. The int8 path packs
/// `W` inside the call (a [`crate::CpuMatrix`] packs once and keeps it).
#[allow(clippy::too_many_arguments)]
pub fn matmul_quant(x: &[f32], fmt: QFormat, w: &[u8], y: &mut [f32], n: usize, k: usize, m: usize, mode: MatmulMode) {
    match cpu_products() {
        CpuProducts::Exact => crate::qmatmul::matmul_q(x, fmt, w, y, n, k, m, mode),
        CpuProducts::Int8 => matmul_q8(x, fmt, w, y, n, k, m, mode),
    }
}

/// Rows of `x` quantized to 8 bits per block of 32 values.
#[derive(Clone, Debug, Default)]
pub struct Q8Rows {
    /// Values per row (a multiple of 32).
    pub k: usize,
    /// `n x k` quantized values.
    pub q: Vec<i8>,
    /// Per block (`n x k/32`): the scale `d`.
    pub d: Vec<f32>,
    /// Per block: `d * sum(q)` (the factor of a Q4_1 block's minimum).
    pub s: Vec<f32>,
    /// Per block: `sum(q)` (the correction of Q8_0 weights stored with an offset of 128).
    pub sum: Vec<i32>,
}

/// Quantizes `n` rows of `k` values (`k` a multiple of 32). The AVX-512 version gives the same
/// bits as the scalar one (tested), NaN inputs included (quantized to 0).
pub fn quantize_rows(x: &[f32], n: usize, k: usize) -> Q8Rows {
    debug_assert_eq!(x.len(), n * k);
    debug_assert_eq!(k % 32, 0);
    let nb = n * k / 32;
    let mut out = Q8Rows {
        k,
        q: vec![0i8; n * k],
        d: vec![0f32; nb],
        s: vec![0f32; nb],
        sum: vec![0i32; nb],
    };
    let blocks = x
        .chunks_exact(32)
        .zip(out.q.chunks_exact_mut(32))
        .zip(out.d.iter_mut().zip(out.s.iter_mut().zip(out.sum.iter_mut())));
    #[cfg(target_arch = "x86_64")]
    if Isa::detect() == Isa::Avx512Vnni {
        for ((xb, qb), (d, (s, sum))) in blocks {
            // SAFETY: AVX-512 F/BW/VL are present (`Isa::detect`); both blocks hold 32 values.
            let (bd, bsum) = unsafe { avx512::quantize_block(xb.try_into().expect("32"), qb.try_into().expect("32")) };
            (*d, *s, *sum) = (bd, bd * bsum as f32, bsum);
        }
        return out;
    }
    for ((xb, qb), (d, (s, sum))) in blocks {
        let (bd, bsum) = quantize_block(xb, qb);
        (*d, *s, *sum) = (bd, bd * bsum as f32, bsum);
    }
    out
}

/// One block of 32 values: `(d, sum(q))`, the values into `q`.
fn quantize_block(xb: &[f32], qb: &mut [i8]) -> (f32, i32) {
    let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut sum = 0i32;
    for (q, v) in qb.iter_mut().zip(xb) {
        // |v * id| <= 127 (up to rounding of id); the clamp keeps that exact.
        let r = (v * id).round_ties_even().clamp(-127.0, 127.0) as i32;
        *q = r as i8;
        sum += r;
    }
    (d, sum)
}

/// Weight rows per packed group: one i32 lane per row in a 512-bit vector.
pub const GROUP: usize = 16;

/// Bytes of one (group, block) of the packed layout: the 16 rows' 32 values (nibbles for
/// Q4_1, offset bytes for Q8_0), then 16 f16 scales, then (Q4_1) 16 f16 minimums. The same
/// bytes per row and block as the format itself.
const fn group_block_bytes(fmt: QFormat) -> usize {
    match fmt {
        QFormat::Q4_1 => 256 + 32 + 32,
        QFormat::Q8_0 => 512 + 32,
    }
}

/// Offset of the scales within a (group, block).
const fn scales_at(fmt: QFormat) -> usize {
    match fmt {
        QFormat::Q4_1 => 256,
        QFormat::Q8_0 => 512,
    }
}

/// Offset of the Q4_1 minimums within a (group, block).
const MINS_AT: usize = 288;

/// A quantized `m x k` matrix in the kernels' layout (module doc): group after group of
/// [`GROUP`] rows (the last one padded with zero rows), each group's blocks in order.
#[derive(Clone, Debug)]
pub struct Packed {
    fmt: QFormat,
    m: usize,
    k: usize,
    data: Vec<u8>,
}

impl Packed {
    /// Packs `w` (`m x k` in blocks of `fmt`, `k` a multiple of 32).
    pub fn new(fmt: QFormat, w: &[u8], m: usize, k: usize) -> Packed {
        assert_eq!(k % 32, 0, "Packed: k is not a multiple of 32");
        assert_eq!(w.len(), m * fmt.row_bytes(k), "Packed: w is not m x k");
        let gb = k / 32 * group_block_bytes(fmt);
        let mut data = vec![0u8; m.div_ceil(GROUP) * gb];
        let pack = |(g, dst): (usize, &mut [u8])| pack_group(fmt, w, m, k, g, dst);
        if m * k >= 1 << 18 {
            data.par_chunks_mut(gb).enumerate().for_each(pack);
        } else {
            data.chunks_mut(gb).enumerate().for_each(pack);
        }
        Packed { fmt, m, k, data }
    }

    pub fn fmt(&self) -> QFormat {
        self.fmt
    }

    /// Rows (output columns of a product).
    pub fn rows(&self) -> usize {
        self.m
    }

    /// Bytes of the packed data.
    pub fn bytes(&self) -> usize {
        self.data.len()
    }

    /// The bytes of group `g` (all its blocks).
    fn group(&self, g: usize) -> &[u8] {
        let gb = self.k / 32 * group_block_bytes(self.fmt);
        &self.data[g * gb..(g + 1) * gb]
    }

    /// `y (n x m) (+)= x (n x k) W^T`.
    pub fn matmul(&self, x: &[f32], y: &mut [f32], n: usize, mode: MatmulMode) {
        let (k, m) = (self.k, self.m);
        assert_eq!(x.len(), n * k, "Packed::matmul: x is not n x k");
        assert_eq!(y.len(), n * m, "Packed::matmul: y is not n x m");
        if n == 0 || m == 0 {
            return;
        }
        let xq = quantize_rows(x, n, k);
        let isa = Isa::detect();
        by_column_blocks(y, n, m, n * k * m / 4, mode == MatmulMode::Accumulate, |j0, j1, out| {
            self.columns_with(&xq, 0, n, j0, j1, out, isa)
        });
    }

    /// One column block on rows already quantized: `out (n x (j1 - j0)) = xq[x0 .. x0 + n]
    /// W[j0 .. j1]^T` (`xq.k` = this matrix's `k`). The same tiles as [`Packed::matmul`], so a
    /// row's values are the same bits.
    pub fn columns(&self, xq: &Q8Rows, x0: usize, n: usize, j0: usize, j1: usize, out: &mut [f32]) {
        self.columns_with(xq, x0, n, j0, j1, out, Isa::detect())
    }

    #[allow(clippy::too_many_arguments)]
    fn columns_with(&self, xq: &Q8Rows, x0: usize, n: usize, j0: usize, j1: usize, out: &mut [f32], isa: Isa) {
        self.columns_plus_with(xq, x0, n, j0, j1, out, &[], isa)
    }

    /// [`Packed::columns`] plus `addends` accumulated into the same tiles: for each, on its
    /// rows and columns, `t B^T` is added to the lanes of the shared product before they are
    /// stored (the expand of a LoRA fused into the shared product's output tile). Every
    /// addend's `col0` is a multiple of [`GROUP`], so a group of columns lies inside an
    /// addend's columns or outside them; addends on the same columns have disjoint rows (one
    /// per depth group), and each continues the lanes of its own rows of a tile.
    #[allow(clippy::too_many_arguments)]
    pub fn columns_plus(
        &self,
        xq: &Q8Rows,
        x0: usize,
        n: usize,
        j0: usize,
        j1: usize,
        out: &mut [f32],
        addends: &[Addend<'_>],
    ) {
        self.columns_plus_with(xq, x0, n, j0, j1, out, addends, Isa::detect())
    }

    #[allow(clippy::too_many_arguments)]
    fn columns_plus_with(
        &self,
        xq: &Q8Rows,
        x0: usize,
        n: usize,
        j0: usize,
        j1: usize,
        out: &mut [f32],
        addends: &[Addend<'_>],
        isa: Isa,
    ) {
        assert_eq!(xq.k, self.k, "Packed::columns: x rows are not k wide");
        assert!(
            j0 <= j1 && j1 <= self.m && xq.q.len() >= (x0 + n) * self.k,
            "Packed::columns: out of range"
        );
        for a in addends {
            assert!(
                a.col0 % GROUP == 0
                    && a.col0 + a.b.m <= self.m
                    && a.rows.end <= n
                    && a.tq.k == a.b.k
                    && a.tq.q.len() >= a.rows.len() * a.b.k,
                "Packed::columns_plus: addend out of range"
            );
        }
        let mb = j1 - j0;
        debug_assert_eq!(out.len(), n * mb);
        let xrows = isa.xrows();
        let mut tile = [[0f32; GROUP]; MAX_XROWS];
        let mut part = [[0f32; GROUP]; MAX_XROWS];
        // This group's addends (at most a few: one per row group on these columns).
        let mut here: Vec<&Addend<'_>> = Vec::with_capacity(addends.len());
        for g in j0 / GROUP..j1.div_ceil(GROUP) {
            let grp = self.group(g);
            // The columns of this group inside j0 .. j1, as lanes.
            let (c0, c1) = ((g * GROUP).max(j0), ((g + 1) * GROUP).min(j1));
            let (l0, l1) = (c0 - g * GROUP, c1 - g * GROUP);
            here.clear();
            here.extend(
                addends
                    .iter()
                    .filter(|a| !a.rows.is_empty() && (a.col0..a.col0 + a.b.m).contains(&(g * GROUP))),
            );
            let mut i = 0;
            while i < n {
                let c = (n - i).min(xrows);
                tile_any(self.fmt, grp, xq, x0 + i, c, &mut tile, false, isa);
                // Each addend on some of the tile's rows continues those rows' lanes (in a
                // scratch tile when it does not start at the tile's first row).
                for a in &here {
                    let (s, e) = (a.rows.start.max(i), a.rows.end.min(i + c));
                    if s >= e {
                        continue;
                    }
                    let bg = a.b.group((g * GROUP - a.col0) / GROUP);
                    if s == i {
                        tile_any(a.b.fmt, bg, a.tq, s - a.rows.start, e - s, &mut tile, true, isa);
                    } else {
                        part[..e - s].copy_from_slice(&tile[s - i..e - i]);
                        tile_any(a.b.fmt, bg, a.tq, s - a.rows.start, e - s, &mut part, true, isa);
                        tile[s - i..e - i].copy_from_slice(&part[..e - s]);
                    }
                }
                for (ic, t) in tile.iter().enumerate().take(c) {
                    let o = (i + ic) * mb + (c0 - j0);
                    if l1 - l0 == GROUP {
                        // A whole group: a fixed-size copy (vector moves, not a memmove call,
                        // which was 3 % of an engine profile).
                        let dst: &mut [f32; GROUP] = (&mut out[o..o + GROUP]).try_into().expect("GROUP floats");
                        *dst = *t;
                    } else {
                        out[o..o + (c1 - c0)].copy_from_slice(&t[l0..l1]);
                    }
                }
                i += c;
            }
        }
    }
}

/// A product added into the tiles of another ([`Packed::columns_plus`]): on the output rows
/// `rows` and the columns `col0 .. col0 + b.rows()`, `t B^T`, with `t`'s rows (the first of
/// them for `rows.start`) quantized in `tq`.
pub struct Addend<'a> {
    pub rows: std::ops::Range<usize>,
    pub col0: usize,
    pub b: &'a Packed,
    pub tq: &'a Q8Rows,
}

/// Writes group `g` of `w` (`m x k`) in the packed layout into `dst`.
fn pack_group(fmt: QFormat, w: &[u8], m: usize, k: usize, g: usize, dst: &mut [u8]) {
    let (bb, rb, gbb) = (fmt.block_bytes(), fmt.row_bytes(k), group_block_bytes(fmt));
    for (b, out) in dst.chunks_exact_mut(gbb).enumerate() {
        for lane in 0..GROUP {
            let row = g * GROUP + lane;
            if row >= m {
                break;
            }
            let blk = &w[row * rb + b * bb..row * rb + (b + 1) * bb];
            out[scales_at(fmt) + 2 * lane..scales_at(fmt) + 2 * lane + 2].copy_from_slice(&blk[..2]);
            match fmt {
                QFormat::Q4_1 => {
                    // Value t of the block: low nibble of byte t (t < 16), else high nibble
                    // of byte t - 16. Vector p holds quads 2p (low nibbles) and 2p + 1 (high).
                    let q = |t: usize| {
                        if t < 16 {
                            blk[4 + t] & 0x0F
                        } else {
                            blk[4 + t - 16] >> 4
                        }
                    };
                    for p in 0..4 {
                        for t in 0..4 {
                            out[p * 64 + lane * 4 + t] = q(8 * p + t) | (q(8 * p + 4 + t) << 4);
                        }
                    }
                    out[MINS_AT + 2 * lane..MINS_AT + 2 * lane + 2].copy_from_slice(&blk[2..4]);
                }
                QFormat::Q8_0 => {
                    for p in 0..8 {
                        for t in 0..4 {
                            out[p * 64 + lane * 4 + t] = (blk[2 + 4 * p + t] as i8 as i16 + 128) as u8;
                        }
                    }
                }
            }
        }
    }
}

/// `y (n x m) (+)= x (n x k) W^T` with `W` (`m x k`) in quantized blocks and `x` quantized to
/// 8 bits per block inside the call; every column block packs its rows of `W` first (the
/// same bits as a [`Packed`] matrix).
#[allow(clippy::too_many_arguments)]
pub fn matmul_q8(x: &[f32], fmt: QFormat, w: &[u8], y: &mut [f32], n: usize, k: usize, m: usize, mode: MatmulMode) {
    assert_eq!(x.len(), n * k, "matmul_q8: x is not n x k");
    assert_eq!(k % 32, 0, "matmul_q8: k is not a multiple of 32");
    assert_eq!(w.len(), m * fmt.row_bytes(k), "matmul_q8: w is not m x k");
    assert_eq!(y.len(), n * m, "matmul_q8: y is not n x m");
    if n == 0 || m == 0 {
        return;
    }
    let xq = quantize_rows(x, n, k);
    let rb = fmt.row_bytes(k);
    let isa = Isa::detect();
    by_column_blocks(y, n, m, n * k * m / 4, mode == MatmulMode::Accumulate, |j0, j1, out| {
        let local = Packed::new(fmt, &w[j0 * rb..j1 * rb], j1 - j0, k);
        local.columns_with(&xq, 0, n, 0, j1 - j0, out, isa)
    });
}

/// The instruction sets the integer tiles use, best first. Every kernel computes the same
/// exact integer block sums and the same floating-point operations in the same order, so all
/// give the same bits (tested).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    /// AVX-512 VNNI (`vpdpbusd`), one 512-bit vector per group; needs AVX-512 F/BW/VL/VNNI
    /// and F16C.
    Avx512Vnni,
    /// AVX2 `vpmaddubsw` + `vpmaddwd`, two 256-bit halves per group; needs AVX2, FMA, F16C.
    Avx2,
    Portable,
}

/// Most rows of `x` in one tile.
const MAX_XROWS: usize = 8;

impl Isa {
    /// This machine's best kernel, detected once per process.
    pub(crate) fn detect() -> Isa {
        static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *ISA.get_or_init(Isa::probe)
    }

    /// The best kernel this CPU runs, or a lower one named by `RRT_CPU_ISA` (`avx2`,
    /// `portable`: to measure the kernels other machines would use; never a higher one).
    fn probe() -> Isa {
        let best = Isa::best();
        let asked = match std::env::var("RRT_CPU_ISA").as_deref() {
            Ok("avx2") => Some(Isa::Avx2),
            Ok("portable") => Some(Isa::Portable),
            _ => None,
        };
        match asked {
            Some(a) if best.rank() >= a.rank() => a,
            _ => best,
        }
    }

    fn rank(self) -> u8 {
        match self {
            Isa::Avx512Vnni => 2,
            Isa::Avx2 => 1,
            Isa::Portable => 0,
        }
    }

    fn best() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            let avx2 = has!("avx2") && has!("fma") && has!("f16c");
            if avx2 && has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx512vnni") {
                return Isa::Avx512Vnni;
            }
            if avx2 {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    }

    /// Rows of `x` per tile: as many accumulators as the registers hold (32 vectors with
    /// AVX-512, 16 with AVX2). Rows are independent, so this does not change any value.
    fn xrows(self) -> usize {
        match self {
            Isa::Avx512Vnni => 8,
            Isa::Avx2 | Isa::Portable => 4,
        }
    }

    /// The kernels this machine can run (for tests comparing them).
    #[cfg(test)]
    fn available() -> Vec<Isa> {
        match Isa::best() {
            Isa::Avx512Vnni => vec![Isa::Avx512Vnni, Isa::Avx2, Isa::Portable],
            Isa::Avx2 => vec![Isa::Avx2, Isa::Portable],
            Isa::Portable => vec![Isa::Portable],
        }
    }
}

/// One tile: the 16 rows of group `grp` against `c <= MAX_XROWS` rows of `xq` from `i`, into
/// `out[0 .. c]`; with `cont`, the block sums are accumulated onto `out`'s values instead of
/// onto zero (the same operations in the same order on every instruction set).
#[allow(clippy::too_many_arguments)]
fn tile_any(
    fmt: QFormat,
    grp: &[u8],
    xq: &Q8Rows,
    i: usize,
    c: usize,
    out: &mut [[f32; GROUP]; MAX_XROWS],
    cont: bool,
    isa: Isa,
) {
    let nb = xq.k / 32;
    assert!(
        grp.len() >= nb * group_block_bytes(fmt) && xq.q.len() >= (i + c) * xq.k,
        "qdot tile out of range"
    );
    macro_rules! go {
        ($c:literal) => {{
            let acc: &mut [[f32; GROUP]; $c] = (&mut out[..$c]).try_into().expect("tile rows");
            let q4 = fmt == QFormat::Q4_1;
            match (isa, q4) {
                // SAFETY (all four): the instruction sets are present (`Isa::detect`), and the
                // group's blocks and the tile's rows of x are in range (asserted above).
                #[cfg(target_arch = "x86_64")]
                (Isa::Avx512Vnni, true) => unsafe { avx512::tile::<$c, true>(grp, nb, xq, i, acc, cont) },
                #[cfg(target_arch = "x86_64")]
                (Isa::Avx512Vnni, false) => unsafe { avx512::tile::<$c, false>(grp, nb, xq, i, acc, cont) },
                #[cfg(target_arch = "x86_64")]
                (Isa::Avx2, true) => unsafe { avx2::tile::<$c, true>(grp, nb, xq, i, acc, cont) },
                #[cfg(target_arch = "x86_64")]
                (Isa::Avx2, false) => unsafe { avx2::tile::<$c, false>(grp, nb, xq, i, acc, cont) },
                _ => portable::tile::<$c>(fmt, grp, nb, xq, i, acc, cont),
            }
        }};
    }
    match c {
        8 => go!(8),
        7 => go!(7),
        6 => go!(6),
        5 => go!(5),
        4 => go!(4),
        3 => go!(3),
        2 => go!(2),
        _ => go!(1),
    }
}

/// The portable kernel: the SIMD kernels' operations written lane by lane.
mod portable {
    use super::*;

    fn f16_at(b: &[u8], at: usize) -> f32 {
        f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
    }

    /// Value `t` (0..32) of lane `lane` of a (group, block), as the signed weight value.
    fn value(fmt: QFormat, gb: &[u8], lane: usize, t: usize) -> i32 {
        let (quad, byte) = (t / 4, t % 4);
        match fmt {
            QFormat::Q4_1 => {
                let v = gb[(quad / 2) * 64 + lane * 4 + byte];
                (if quad % 2 == 0 { v & 0x0F } else { v >> 4 }) as i32
            }
            QFormat::Q8_0 => gb[quad * 64 + lane * 4 + byte] as i32 - 128,
        }
    }

    pub(super) fn tile<const C: usize>(
        fmt: QFormat,
        grp: &[u8],
        nb: usize,
        xq: &Q8Rows,
        i: usize,
        acc: &mut [[f32; GROUP]; C],
        cont: bool,
    ) {
        let gbb = group_block_bytes(fmt);
        if !cont {
            *acc = [[0f32; GROUP]; C];
        }
        for b in 0..nb {
            let gb = &grp[b * gbb..(b + 1) * gbb];
            for lane in 0..GROUP {
                let w: [i32; 32] = std::array::from_fn(|t| value(fmt, gb, lane, t));
                let dw = f16_at(gb, scales_at(fmt) + 2 * lane);
                for (c, a) in acc.iter_mut().enumerate() {
                    let xb = (i + c) * nb + b;
                    let xv = &xq.q[xb * 32..xb * 32 + 32];
                    let s: i32 = w.iter().zip(xv).map(|(p, q)| p * *q as i32).sum();
                    let mut v = (s as f32).mul_add(dw * xq.d[xb], a[lane]);
                    if fmt == QFormat::Q4_1 {
                        v = f16_at(gb, MINS_AT + 2 * lane).mul_add(xq.s[xb], v);
                    }
                    a[lane] = v;
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    /// `Q4`: Q4_1 (else Q8_0). Each group is two halves of 8 rows (lanes 0..8 and 8..16 of the
    /// packed vectors).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn tile<const C: usize, const Q4: bool>(
        grp: &[u8],
        nb: usize,
        xq: &Q8Rows,
        i: usize,
        acc: &mut [[f32; GROUP]; C],
        cont: bool,
    ) {
        let fmt = if Q4 { QFormat::Q4_1 } else { QFormat::Q8_0 };
        let gbb = group_block_bytes(fmt);
        let k = xq.k;
        let ones = _mm256_set1_epi16(1);
        let low = _mm256_set1_epi8(0x0F);
        let flip = _mm256_set1_epi8(-128);
        for h in 0..2 {
            let mut lanes = [_mm256_setzero_ps(); C];
            if cont {
                for (lane, a) in lanes.iter_mut().zip(acc.iter()) {
                    // SAFETY: 8 floats from lane 8h of a 16-float row.
                    *lane = unsafe { _mm256_loadu_ps(a.as_ptr().add(8 * h)) };
                }
            }
            for b in 0..nb {
                // SAFETY: the callers assert that the group's nb blocks and rows i .. i + C of
                // x (k values each, k / 32 scales) are in range.
                unsafe {
                    let p = grp.as_ptr().add(b * gbb);
                    let mut w = [_mm256_setzero_si256(); 8];
                    if Q4 {
                        for v in 0..4 {
                            let raw = _mm256_loadu_si256(p.add(v * 64 + h * 32) as *const __m256i);
                            w[2 * v] = _mm256_and_si256(raw, low);
                            w[2 * v + 1] = _mm256_and_si256(_mm256_srli_epi16::<4>(raw), low);
                        }
                    } else {
                        for (v, wv) in w.iter_mut().enumerate() {
                            // Back to signed values.
                            *wv = _mm256_xor_si256(_mm256_loadu_si256(p.add(v * 64 + h * 32) as *const __m256i), flip);
                        }
                    }
                    let dw = _mm256_cvtph_ps(_mm_loadu_si128(p.add(scales_at(fmt) + h * 16) as *const __m128i));
                    let mw = if Q4 {
                        _mm256_cvtph_ps(_mm_loadu_si128(p.add(MINS_AT + h * 16) as *const __m128i))
                    } else {
                        _mm256_setzero_ps()
                    };
                    for (c, lane) in lanes.iter_mut().enumerate() {
                        let xb = (i + c) * nb + b;
                        let xp = xq.q.as_ptr().add((i + c) * k + b * 32) as *const i32;
                        let mut s = _mm256_setzero_si256();
                        for (v, wv) in w.iter().enumerate() {
                            let xv = _mm256_set1_epi32(std::ptr::read_unaligned(xp.add(v)));
                            let prod = if Q4 {
                                // Unsigned weights (<= 15) times signed x: pairs <= 2 * 15 * 127.
                                _mm256_maddubs_epi16(*wv, xv)
                            } else {
                                // |w| times x with w's sign: pairs <= 2 * 128 * 127 < 32767.
                                _mm256_maddubs_epi16(_mm256_sign_epi8(*wv, *wv), _mm256_sign_epi8(xv, *wv))
                            };
                            s = _mm256_add_epi32(s, _mm256_madd_epi16(prod, ones));
                        }
                        let scale = _mm256_mul_ps(dw, _mm256_set1_ps(*xq.d.as_ptr().add(xb)));
                        *lane = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scale, *lane);
                        if Q4 {
                            *lane = _mm256_fmadd_ps(mw, _mm256_set1_ps(*xq.s.as_ptr().add(xb)), *lane);
                        }
                    }
                }
            }
            for (c, lane) in lanes.iter().enumerate() {
                // SAFETY: 8 floats from lane 8h of a 16-float row.
                unsafe { _mm256_storeu_ps(acc[c].as_mut_ptr().add(8 * h), *lane) };
            }
        }
    }
}

/// The AVX-512 VNNI kernel: one 512-bit vector per group (16 lanes, one per weight row); per
/// block and row of `x`, 8 `vpdpbusd` of the unpacked weight bytes with the row's 4-byte quads
/// broadcast.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::*;
    use std::arch::x86_64::*;

    /// [`super::quantize_block`] on 32 values: the same maximum (NaN ignored, as `f32::max`
    /// does), the same products, rounding to nearest even (`vcvtps2dq` in the default mode),
    /// clamped to +-127 (before rounding: the same integers), NaN to 0.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    pub(super) unsafe fn quantize_block(xb: &[f32; 32], qb: &mut [i8; 32]) -> (f32, i32) {
        // SAFETY: 32 floats in, 32 bytes out; the features are enabled on this function.
        unsafe {
            let v = [_mm512_loadu_ps(xb.as_ptr()), _mm512_loadu_ps(xb.as_ptr().add(16))];
            // maxps returns its second operand when the first is NaN: NaN never enters.
            let m = _mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_setzero_ps());
            let m = _mm512_max_ps(_mm512_abs_ps(v[1]), m);
            let amax = _mm512_reduce_max_ps(m);
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let (lo, hi) = (_mm512_set1_ps(-127.0), _mm512_set1_ps(127.0));
            let mut sum = _mm512_setzero_si512();
            for (h, vh) in v.iter().enumerate() {
                let y = _mm512_mul_ps(*vh, _mm512_set1_ps(id));
                let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(y, y);
                let r = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(y, lo), hi));
                let r = _mm512_maskz_mov_epi32(!nan, r);
                sum = _mm512_add_epi32(sum, r);
                _mm_storeu_si128(qb.as_mut_ptr().add(16 * h) as *mut __m128i, _mm512_cvtepi32_epi8(r));
            }
            (d, _mm512_reduce_add_epi32(sum))
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub(super) unsafe fn tile<const C: usize, const Q4: bool>(
        grp: &[u8],
        nb: usize,
        xq: &Q8Rows,
        i: usize,
        acc: &mut [[f32; GROUP]; C],
        cont: bool,
    ) {
        let fmt = if Q4 { QFormat::Q4_1 } else { QFormat::Q8_0 };
        let gbb = group_block_bytes(fmt);
        let k = xq.k;
        let low = _mm512_set1_epi8(0x0F);
        let mut lanes = [_mm512_setzero_ps(); C];
        if cont {
            for (lane, a) in lanes.iter_mut().zip(acc.iter()) {
                // SAFETY: 16 floats.
                *lane = unsafe { _mm512_loadu_ps(a.as_ptr()) };
            }
        }
        for b in 0..nb {
            // SAFETY: the callers assert that the group's nb blocks and rows i .. i + C of x
            // (k values each, k / 32 scales and sums) are in range.
            unsafe {
                let p = grp.as_ptr().add(b * gbb);
                let mut w = [_mm512_setzero_si512(); 8];
                if Q4 {
                    for v in 0..4 {
                        let raw = _mm512_loadu_si512(p.add(v * 64) as *const __m512i);
                        w[2 * v] = _mm512_and_si512(raw, low);
                        w[2 * v + 1] = _mm512_and_si512(_mm512_srli_epi16::<4>(raw), low);
                    }
                } else {
                    for (v, wv) in w.iter_mut().enumerate() {
                        *wv = _mm512_loadu_si512(p.add(v * 64) as *const __m512i);
                    }
                }
                let dw = _mm512_cvtph_ps(_mm256_loadu_si256(p.add(scales_at(fmt)) as *const __m256i));
                let mw = if Q4 {
                    _mm512_cvtph_ps(_mm256_loadu_si256(p.add(MINS_AT) as *const __m256i))
                } else {
                    _mm512_setzero_ps()
                };
                for (c, lane) in lanes.iter_mut().enumerate() {
                    let xb = (i + c) * nb + b;
                    let xp = xq.q.as_ptr().add((i + c) * k + b * 32) as *const i32;
                    let mut s = _mm512_setzero_si512();
                    for (v, wv) in w.iter().enumerate() {
                        s = _mm512_dpbusd_epi32(s, *wv, _mm512_set1_epi32(std::ptr::read_unaligned(xp.add(v))));
                    }
                    if !Q4 {
                        // Weights were stored + 128: sum((w + 128) x) - 128 sum(x).
                        s = _mm512_sub_epi32(s, _mm512_set1_epi32(128 * *xq.sum.as_ptr().add(xb)));
                    }
                    let scale = _mm512_mul_ps(dw, _mm512_set1_ps(*xq.d.as_ptr().add(xb)));
                    *lane = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), scale, *lane);
                    if Q4 {
                        *lane = _mm512_fmadd_ps(mw, _mm512_set1_ps(*xq.s.as_ptr().add(xb)), *lane);
                    }
                }
            }
        }
        for (c, lane) in lanes.iter().enumerate() {
            // SAFETY: 16 floats.
            unsafe { _mm512_storeu_ps(acc[c].as_mut_ptr(), *lane) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qmatmul::{dequantize_rows, matmul_q};
    use rand::{Rng, SeedableRng};

    fn random_blocks(fmt: QFormat, rows: usize, k: usize, rng: &mut impl Rng) -> Vec<u8> {
        let mut w: Vec<u8> = (0..rows * fmt.row_bytes(k)).map(|_| rng.random()).collect();
        for b in w.chunks_exact_mut(fmt.block_bytes()) {
            b[..2].copy_from_slice(&f16::from_f32(rng.random_range(0.001..0.05)).to_le_bytes());
            if fmt == QFormat::Q4_1 {
                b[2..4].copy_from_slice(&f16::from_f32(rng.random_range(-0.4..0.0)).to_le_bytes());
            }
        }
        w
    }

    /// f64 product of the dequantized weights with the quantized x: what the integer kernel
    /// computes, up to f32 rounding of its accumulation.
    fn reference(xq: &Q8Rows, fmt: QFormat, w: &[u8], n: usize, k: usize, m: usize) -> Vec<f64> {
        let mut wf = vec![0f32; m * k];
        dequantize_rows(fmt, w, &mut wf);
        let mut y = vec![0f64; n * m];
        for i in 0..n {
            for jj in 0..m {
                y[i * m + jj] = (0..k)
                    .map(|t| wf[jj * k + t] as f64 * xq.q[i * k + t] as f64 * xq.d[(i * k + t) / 32] as f64)
                    .sum();
            }
        }
        y
    }

    #[test]
    fn quantized_rows_reconstruct_within_half_a_step() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let x: Vec<f32> = (0..3 * 64).map(|_| rng.random_range(-3.0..3.0)).collect();
        let q = quantize_rows(&x, 3, 64);
        for (t, v) in x.iter().enumerate() {
            let d = q.d[t / 32];
            assert!((q.q[t] as f32 * d - v).abs() <= d * 0.5 + 1e-6, "element {t}");
        }
        for b in 0..6 {
            let sum: i32 = q.q[b * 32..b * 32 + 32].iter().map(|v| *v as i32).sum();
            assert_eq!(q.s[b], q.d[b] * sum as f32);
            assert_eq!(q.sum[b], sum);
            // The largest magnitude maps to +-127 exactly.
            assert!(q.q[b * 32..b * 32 + 32].iter().any(|v| v.unsigned_abs() == 127));
        }
        // The SIMD quantizer (where this CPU has one) gives the scalar one's bits, also on
        // NaN, infinities, ties and values past 127 steps.
        let mut odd: Vec<f32> = (0..8 * 32).map(|_| rng.random_range(-3.0..3.0)).collect();
        odd[3] = f32::NAN;
        odd[40] = f32::INFINITY;
        odd[70] = 0.5;
        odd[71] = -127.0;
        odd[72] = 1.5 * 127.0 / 127.0;
        odd[96..128]
            .iter_mut()
            .enumerate()
            .for_each(|(i, v)| *v = i as f32 - 15.5);
        odd[128..160].fill(0.0);
        odd[160..192]
            .iter_mut()
            .enumerate()
            .for_each(|(i, v)| *v = (i as f32) * 1e-30);
        let got = quantize_rows(&odd, 8, 32);
        for (b, (xb, qb)) in odd.chunks_exact(32).zip(got.q.chunks_exact(32)).enumerate() {
            let mut want = [0i8; 32];
            let (d, sum) = quantize_block(xb, &mut want);
            assert_eq!(
                (qb, got.d[b].to_bits(), got.sum[b]),
                (&want[..], d.to_bits(), sum),
                "block {b}"
            );
            assert_eq!(got.s[b].to_bits(), (d * sum as f32).to_bits());
        }
        let zeros = quantize_rows(&[0f32; 32], 1, 32);
        assert_eq!((zeros.d[0], zeros.s[0]), (0.0, 0.0));
        assert!(zeros.q.iter().all(|v| *v == 0));
    }

    #[test]
    fn integer_product_matches_f64_reference_of_quantized_operands() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
        for fmt in [QFormat::Q4_1, QFormat::Q8_0] {
            for (n, k, m) in [(1, 64, 7), (2, 576, 70), (3, 96, 131), (9, 1536, 33), (33, 576, 64)] {
                let w = random_blocks(fmt, m, k, &mut rng);
                let x: Vec<f32> = (0..n * k).map(|_| rng.random_range(-2.0..2.0)).collect();
                let mut y = vec![0f32; n * m];
                matmul_q8(&x, fmt, &w, &mut y, n, k, m, MatmulMode::Overwrite);
                let want = reference(&quantize_rows(&x, n, k), fmt, &w, n, k, m);
                for (t, (a, b)) in y.iter().zip(&want).enumerate() {
                    let tol = 1e-5 * (1.0 + b.abs()) * (k as f64 / 32.0).sqrt();
                    assert!(
                        (*a as f64 - b).abs() <= tol,
                        "{fmt:?} {n}x{k}x{m} element {t}: {a} vs {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn integer_product_is_close_to_the_exact_product() {
        // The stated tolerance of the integer path against the exact (oracle) path: the error
        // of 8-bit activations, relative to the size of the terms of the dot product.
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        for fmt in [QFormat::Q4_1, QFormat::Q8_0] {
            let (n, k, m) = (5, 1536, 96);
            let w = random_blocks(fmt, m, k, &mut rng);
            let x: Vec<f32> = (0..n * k).map(|_| rng.random_range(-2.0..2.0)).collect();
            let (mut a, mut b) = (vec![0f32; n * m], vec![0f32; n * m]);
            matmul_q8(&x, fmt, &w, &mut a, n, k, m, MatmulMode::Overwrite);
            matmul_q(&x, fmt, &w, &mut b, n, k, m, MatmulMode::Overwrite);
            let mut wf = vec![0f32; m * k];
            dequantize_rows(fmt, &w, &mut wf);
            for i in 0..n {
                for jj in 0..m {
                    let scale: f32 = (0..k).map(|t| (wf[jj * k + t] * x[i * k + t]).abs()).sum();
                    let err = (a[i * m + jj] - b[i * m + jj]).abs();
                    assert!(err <= 0.01 * scale, "{fmt:?} ({i}, {jj}): error {err}, terms {scale}");
                }
            }
        }
    }

    #[test]
    fn in_tile_addends_match_the_reference_and_agree_across_kernels() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(8);
        // A Q4_1 shared matrix of 3 modules (48 + 32 + 20 columns) and rank-64 Q8_0 expands:
        // module 0 for rows 0..4 and 9..n (two depth groups), module 2 (padded last group)
        // for rows 2..7; module 1 has none. Addends begin and end inside tiles.
        let (n, k, m, r) = (13, 96, 100, 64);
        let w = random_blocks(QFormat::Q4_1, m, k, &mut rng);
        let pk = Packed::new(QFormat::Q4_1, &w, m, k);
        let x: Vec<f32> = (0..n * k).map(|_| rng.random_range(-2.0..2.0)).collect();
        let xq = quantize_rows(&x, n, k);
        let specs = [(0..4, 0, 48), (9..n, 0, 48), (2..7, 80, 20)];
        let parts: Vec<(Vec<u8>, Packed, Q8Rows)> = specs
            .iter()
            .map(|(rows, _, o)| {
                let b = random_blocks(QFormat::Q8_0, *o, r, &mut rng);
                let pb = Packed::new(QFormat::Q8_0, &b, *o, r);
                let t: Vec<f32> = (0..rows.len() * r).map(|_| rng.random_range(-1.0..1.0)).collect();
                (b, pb, quantize_rows(&t, rows.len(), r))
            })
            .collect();
        let addends: Vec<Addend<'_>> = specs
            .iter()
            .zip(&parts)
            .map(|((rows, col0, _), (_, b, tq))| Addend {
                rows: rows.clone(),
                col0: *col0,
                b,
                tq,
            })
            .collect();
        let mut want = reference(&xq, QFormat::Q4_1, &w, n, k, m);
        for ((rows, col0, o), (b, _, tq)) in specs.iter().zip(&parts) {
            let add = reference(tq, QFormat::Q8_0, b, rows.len(), r, *o);
            for (i, row) in rows.clone().enumerate() {
                for j in 0..*o {
                    want[row * m + col0 + j] += add[i * o + j];
                }
            }
        }
        let mut first: Option<Vec<f32>> = None;
        for isa in Isa::available() {
            let mut y = vec![0f32; n * m];
            pk.columns_plus_with(&xq, 0, n, 0, m, &mut y, &addends, isa);
            for (i, (a, b)) in y.iter().zip(&want).enumerate() {
                assert!(
                    (*a as f64 - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "{isa:?} value {i}: {a} vs {b}"
                );
            }
            // A column range cutting groups: the same bits as the whole product's columns.
            let (j0, j1) = (20, 90);
            let mut c = vec![0f32; n * (j1 - j0)];
            pk.columns_plus_with(&xq, 0, n, j0, j1, &mut c, &addends, isa);
            for i in 0..n {
                for j in j0..j1 {
                    assert_eq!(c[i * (j1 - j0) + j - j0].to_bits(), y[i * m + j].to_bits());
                }
            }
            match &first {
                None => first = Some(y),
                Some(f) => assert!(
                    f.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()),
                    "{isa:?} differs from the first kernel"
                ),
            }
        }
    }

    #[test]
    fn simd_and_portable_kernels_agree_bit_for_bit_and_rows_are_batch_invariant() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(6);
        // Tiles of 1 ..= 8 rows of x, full and padded groups, column ranges that cut groups.
        for (fmt, (n, k, m)) in [QFormat::Q4_1, QFormat::Q8_0]
            .into_iter()
            .flat_map(|f| [(17, 192, 23), (5, 64, 40), (3, 96, 16), (8, 32, 7)].map(|s| (f, s)))
        {
            let w = random_blocks(fmt, m, k, &mut rng);
            let pk = Packed::new(fmt, &w, m, k);
            let x: Vec<f32> = (0..n * k).map(|_| rng.random_range(-2.0..2.0)).collect();
            let xq = quantize_rows(&x, n, k);
            let mut a = vec![0f32; n * m];
            pk.columns_with(&xq, 0, n, 0, m, &mut a, Isa::Portable);
            for isa in Isa::available() {
                let mut b = vec![0f32; n * m];
                pk.columns_with(&xq, 0, n, 0, m, &mut b, isa);
                assert!(
                    a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()),
                    "{fmt:?} {isa:?}"
                );
                // A column range cutting groups, on rows from an offset.
                let (j0, j1, x0) = (m / 3, m - 1, 1);
                let mut c = vec![0f32; (n - x0) * (j1 - j0)];
                pk.columns_with(&xq, x0, n - x0, j0, j1, &mut c, isa);
                for i in 0..n - x0 {
                    for j in j0..j1 {
                        assert_eq!(c[i * (j1 - j0) + j - j0].to_bits(), a[(i + x0) * m + j].to_bits());
                    }
                }
            }
            // The packed matrix's product, the raw-blocks product and each row alone: the
            // same bits.
            let mut p = vec![0f32; n * m];
            pk.matmul(&x, &mut p, n, MatmulMode::Overwrite);
            let mut r = vec![0f32; n * m];
            matmul_q8(&x, fmt, &w, &mut r, n, k, m, MatmulMode::Overwrite);
            assert!(p.iter().zip(&a).all(|(u, v)| u.to_bits() == v.to_bits()));
            assert!(r.iter().zip(&a).all(|(u, v)| u.to_bits() == v.to_bits()));
            for i in 0..n {
                let mut one = vec![0f32; m];
                matmul_q8(
                    &x[i * k..(i + 1) * k],
                    fmt,
                    &w,
                    &mut one,
                    1,
                    k,
                    m,
                    MatmulMode::Overwrite,
                );
                assert!(
                    one.iter()
                        .zip(&a[i * m..(i + 1) * m])
                        .all(|(p, q)| p.to_bits() == q.to_bits())
                );
            }
            // Accumulate mode adds onto y.
            let mut acc = vec![1f32; n * m];
            pk.matmul(&x, &mut acc, n, MatmulMode::Accumulate);
            assert!(acc.iter().zip(&a).all(|(p, q)| *p == 1.0 + q));
        }
    }
}
