//! Matrix products of quantized weights (Q4_1, Q8_0) with activations quantized to 8 bits,
//! in integer arithmetic, as llama.cpp computes them on CPUs.
//!
//! The exact path ([`crate::qmatmul::matmul_q`]) dequantizes every weight to f32 and multiplies
//! in f32: bit-identical to the f32 product on the dequantized matrix, and the oracle. This
//! path instead quantizes each row of `x` once per product, per block of 32 values, to
//! `x ~ q * d` (q in -127..=127, `d = max|x| / 127`, rounding to nearest even), and computes
//! each block's dot product in integers: one `vpmaddubsw` multiplies 32 byte pairs, against
//! 4 fused multiply-adds per 32 products in f32 after an 8-instruction dequantization. Per
//! block `b` of weight row `j` and row `i` of `x`:
//!
//! - Q8_0: `y += dw * dx * sum(qw * qx)`;
//! - Q4_1 (`w = qw * dw + mw`): `y += dw * dx * sum(qw * qx) + mw * (dx * sum(qx))`, the last
//!   factor computed once per block of `x` (`s`).
//!
//! The error against the exact product is that of rounding `x` to 8 bits per block (relative
//! error about 2^-9 of the block's largest value per element); the tests bound it.
//!
//! A row's result does not depend on the other rows of the batch (batch invariance), and the
//! AVX2 kernel and the portable version compute the same floating-point operations in the
//! same order, so they agree bit for bit (tested).

use crate::matmul::MatmulMode;
use crate::qmatmul::QFormat;
use crate::skinny::by_column_blocks;
use half::f16;
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

/// `y (+)= x W^T` with quantized `W`, by the process's [`CpuProducts`].
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
}

/// Quantizes `n` rows of `k` values (`k` a multiple of 32).
pub fn quantize_rows(x: &[f32], n: usize, k: usize) -> Q8Rows {
    debug_assert_eq!(x.len(), n * k);
    debug_assert_eq!(k % 32, 0);
    let nb = n * k / 32;
    let mut out = Q8Rows {
        k,
        q: vec![0i8; n * k],
        d: vec![0f32; nb],
        s: vec![0f32; nb],
    };
    for (b, (xb, qb)) in x.chunks_exact(32).zip(out.q.chunks_exact_mut(32)).enumerate() {
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
        out.d[b] = d;
        out.s[b] = d * sum as f32;
    }
    out
}

/// Rows of `x` per tile (each tile reuses its unpacked weight blocks for this many rows).
const XROWS: usize = 2;
/// Weight rows per tile.
const WROWS: usize = 4;

/// `y (n x m) (+)= x (n x k) W^T` with `W` (`m x k`) in quantized blocks and `x` quantized to
/// 8 bits per block inside the call (see the module doc for the error).
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
        block(&xq, 0, fmt, &w[j0 * rb..j1 * rb], out, n, j1 - j0, isa)
    });
}

/// One column block of [`matmul_q8`] on rows already quantized: `out (n x (j1 - j0)) =
/// xq[x0 .. x0 + n] W[j0 .. j1]^T`, with `w` the whole matrix (`k = xq.k`). The same tiles as
/// `matmul_q8`, so a row's values are the same bits.
#[allow(clippy::too_many_arguments)]
pub(crate) fn columns(xq: &Q8Rows, x0: usize, n: usize, fmt: QFormat, w: &[u8], j0: usize, j1: usize, out: &mut [f32]) {
    let rb = fmt.row_bytes(xq.k);
    debug_assert!(xq.q.len() >= (x0 + n) * xq.k && w.len() >= j1 * rb);
    block(xq, x0, fmt, &w[j0 * rb..j1 * rb], out, n, j1 - j0, Isa::detect());
}

/// The instruction sets the integer tiles use, best first. Every kernel computes the same
/// integer block sums and the same floating-point operations in the same order, so all give
/// the same bits (tested).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    /// AVX-512 VNNI (`vpdpbusd`) on 512-bit vectors, each holding two (weight row, x row)
    /// pairs of a tile; needs AVX-512 F/BW/VL/VNNI and F16C.
    Avx512Vnni,
    /// AVX2 `vpmaddubsw` + `vpmaddwd`; needs AVX2, FMA and F16C.
    Avx2,
    Portable,
}

impl Isa {
    /// This machine's best kernel, detected once per process.
    pub(crate) fn detect() -> Isa {
        static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *ISA.get_or_init(Isa::probe)
    }

    fn probe() -> Isa {
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

    /// The kernels this machine can run (for tests comparing them).
    #[cfg(test)]
    fn available() -> Vec<Isa> {
        match Isa::detect() {
            Isa::Avx512Vnni => vec![Isa::Avx512Vnni, Isa::Avx2, Isa::Portable],
            Isa::Avx2 => vec![Isa::Avx2, Isa::Portable],
            Isa::Portable => vec![Isa::Portable],
        }
    }
}

/// `out (n x mb) = xq[x0 .. x0 + n] wb^T` for one block of `mb` weight rows, tile by tile.
#[allow(clippy::too_many_arguments)]
fn block(xq: &Q8Rows, x0: usize, fmt: QFormat, wb: &[u8], out: &mut [f32], n: usize, mb: usize, isa: Isa) {
    let mut j = 0;
    while j < mb {
        let r = (mb - j).min(WROWS);
        let mut i = 0;
        while i < n {
            let c = (n - i).min(XROWS);
            tile_any(xq, x0, fmt, wb, j, r, i, c, out, mb, isa);
            i += c;
        }
        j += r;
    }
}

/// One tile of `r <= WROWS` weight rows from `j` and `c <= XROWS` rows from `i` (rows
/// `x0 + i ..` of `xq`, rows `i ..` of `out`).
#[allow(clippy::too_many_arguments)]
fn tile_any(
    xq: &Q8Rows,
    x0: usize,
    fmt: QFormat,
    wb: &[u8],
    j: usize,
    r: usize,
    i: usize,
    c: usize,
    out: &mut [f32],
    ld: usize,
    isa: Isa,
) {
    macro_rules! go {
        ($r:literal, $c:literal) => {{
            let mut acc = [[0f32; $c]; $r];
            match isa {
                // SAFETY (both): the instruction sets are present (`Isa::detect`); the tile's
                // weight rows and x rows are inside `wb` and `xq` (the loops above stay in
                // range, and the kernels assert it).
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512Vnni => unsafe { avx512::tile::<$r, $c>(xq, fmt, wb, j, x0 + i, &mut acc) },
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => unsafe { avx2::tile::<$r, $c>(xq, fmt, wb, j, x0 + i, &mut acc) },
                _ => portable::tile::<$r, $c>(xq, fmt, wb, j, x0 + i, &mut acc),
            }
            for (jr, row) in acc.iter().enumerate() {
                for (ic, v) in row.iter().enumerate() {
                    out[(i + ic) * ld + j + jr] = *v;
                }
            }
        }};
    }
    match (r, c) {
        (4, 2) => go!(4, 2),
        (4, 1) => go!(4, 1),
        (3, 2) => go!(3, 2),
        (3, 1) => go!(3, 1),
        (2, 2) => go!(2, 2),
        (2, 1) => go!(2, 1),
        (1, 2) => go!(1, 2),
        _ => go!(1, 1),
    }
}

/// Scale and minimum of a weight block.
#[inline(always)]
fn block_scales(fmt: QFormat, b: &[u8]) -> (f32, f32) {
    let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
    match fmt {
        QFormat::Q4_1 => (d, f16::from_le_bytes([b[2], b[3]]).to_f32()),
        QFormat::Q8_0 => (d, 0.0),
    }
}

/// The sum of 8 lanes in the order of the AVX2 reduction: halves, then pairs, then the two.
#[inline(always)]
fn hsum8(l: &[f32; 8]) -> f32 {
    let h = [l[0] + l[4], l[1] + l[5], l[2] + l[6], l[3] + l[7]];
    let p = [h[0] + h[2], h[1] + h[3]];
    p[0] + p[1]
}

/// The portable kernel: the AVX2 kernel's operations written lane by lane.
mod portable {
    use super::*;

    /// Signed weight values of one block, in element order.
    fn unpack(fmt: QFormat, b: &[u8], out: &mut [i32; 32]) {
        match fmt {
            QFormat::Q4_1 => {
                for t in 0..16 {
                    out[t] = (b[4 + t] & 0x0F) as i32;
                    out[t + 16] = (b[4 + t] >> 4) as i32;
                }
            }
            QFormat::Q8_0 => {
                for t in 0..32 {
                    out[t] = b[2 + t] as i8 as i32;
                }
            }
        }
    }

    pub(super) fn tile<const R: usize, const C: usize>(
        xq: &Q8Rows,
        fmt: QFormat,
        wb: &[u8],
        j: usize,
        i: usize,
        acc: &mut [[f32; C]; R],
    ) {
        let (bb, nb) = (fmt.block_bytes(), xq.k / 32);
        let rb = nb * bb;
        let mut lanes = [[[0f32; 8]; C]; R];
        let mut mins = [[0f32; C]; R];
        let mut wv = [[0i32; 32]; R];
        let mut ws = [(0f32, 0f32); R];
        for b in 0..nb {
            for r in 0..R {
                let blk = &wb[(j + r) * rb + b * bb..(j + r) * rb + (b + 1) * bb];
                unpack(fmt, blk, &mut wv[r]);
                ws[r] = block_scales(fmt, blk);
            }
            for c in 0..C {
                let xb = (i + c) * nb + b;
                let xv = &xq.q[xb * 32..xb * 32 + 32];
                let dx = xq.d[xb];
                for r in 0..R {
                    let scale = ws[r].0 * dx;
                    for (l, lane) in lanes[r][c].iter_mut().enumerate() {
                        let p: i32 = (4 * l..4 * l + 4).map(|t| wv[r][t] * xv[t] as i32).sum();
                        *lane = (p as f32).mul_add(scale, *lane);
                    }
                    if fmt == QFormat::Q4_1 {
                        mins[r][c] = ws[r].1.mul_add(xq.s[xb], mins[r][c]);
                    }
                }
            }
        }
        for r in 0..R {
            for c in 0..C {
                acc[r][c] = hsum8(&lanes[r][c]) + mins[r][c];
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    /// 32 weights of a block as bytes: unsigned 0..15 (Q4_1) or signed (Q8_0).
    #[inline(always)]
    pub(super) unsafe fn load_block(fmt: QFormat, p: *const u8) -> __m256i {
        // SAFETY (callers): `p` points at a whole block of `fmt`.
        unsafe {
            match fmt {
                QFormat::Q4_1 => {
                    let raw = _mm_loadu_si128(p.add(4) as *const __m128i);
                    let lo = _mm_and_si128(raw, _mm_set1_epi8(0x0F));
                    let hi = _mm_and_si128(_mm_srli_epi16::<4>(raw), _mm_set1_epi8(0x0F));
                    _mm256_set_m128i(hi, lo)
                }
                QFormat::Q8_0 => _mm256_loadu_si256(p.add(2) as *const __m256i),
            }
        }
    }

    /// f16 bits at `p` as f32 (F16C).
    #[inline(always)]
    pub(super) unsafe fn f16_at(p: *const u8) -> f32 {
        // SAFETY (callers): two readable bytes at p.
        unsafe {
            _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(
                std::ptr::read_unaligned(p as *const u16) as i32,
            )))
        }
    }

    /// Block `b` of weight rows `j .. j + R` (`rb` bytes a row): the 32 values as bytes, the
    /// scales and (Q4_1) the minimums.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn weight_blocks<const R: usize>(
        fmt: QFormat,
        wb: &[u8],
        rb: usize,
        j: usize,
        b: usize,
        wv: &mut [__m256i; R],
        dw: &mut [f32; R],
        mw: &mut [f32; R],
    ) {
        for r in 0..R {
            // SAFETY (callers): block b of weight row j + r lies inside wb.
            unsafe {
                let p = wb.as_ptr().add((j + r) * rb + b * fmt.block_bytes());
                wv[r] = load_block(fmt, p);
                dw[r] = f16_at(p);
                if fmt == QFormat::Q4_1 {
                    mw[r] = f16_at(p.add(2));
                }
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn tile<const R: usize, const C: usize>(
        xq: &Q8Rows,
        fmt: QFormat,
        wb: &[u8],
        j: usize,
        i: usize,
        acc: &mut [[f32; C]; R],
    ) {
        let (bb, nb) = (fmt.block_bytes(), xq.k / 32);
        let rb = nb * bb;
        assert!(
            wb.len() >= (j + R) * rb && xq.q.len() >= (i + C) * xq.k,
            "qdot tile out of range"
        );
        let ones = _mm256_set1_epi16(1);
        let mut lanes = [[_mm256_setzero_ps(); C]; R];
        let mut mins = [[0f32; C]; R];
        let mut wv = [_mm256_setzero_si256(); R];
        let mut dw = [0f32; R];
        let mut mw = [0f32; R];
        let (xp, dp, sp) = (xq.q.as_ptr(), xq.d.as_ptr(), xq.s.as_ptr());
        for b in 0..nb {
            // SAFETY: block b of weight rows j .. j + R lies inside wb (asserted above).
            unsafe { weight_blocks(fmt, wb, rb, j, b, &mut wv, &mut dw, &mut mw) };
            for c in 0..C {
                let xb = (i + c) * nb + b;
                // SAFETY: block xb of x lies inside xq (asserted above; d and s have a value
                // per block).
                let (xv, dx, sx) = unsafe {
                    (
                        _mm256_loadu_si256(xp.add(xb * 32) as *const __m256i),
                        *dp.add(xb),
                        *sp.add(xb),
                    )
                };
                for r in 0..R {
                    let prod = match fmt {
                        // Unsigned weights times signed activations, pairs summed to i16
                        // (at most 2 * 15 * 127: no saturation).
                        QFormat::Q4_1 => _mm256_maddubs_epi16(wv[r], xv),
                        // Signed times signed: |w| times x with w's sign (at most
                        // 2 * 128 * 127 < 32767).
                        QFormat::Q8_0 => {
                            _mm256_maddubs_epi16(_mm256_sign_epi8(wv[r], wv[r]), _mm256_sign_epi8(xv, wv[r]))
                        }
                    };
                    let p = _mm256_cvtepi32_ps(_mm256_madd_epi16(prod, ones));
                    lanes[r][c] = _mm256_fmadd_ps(p, _mm256_set1_ps(dw[r] * dx), lanes[r][c]);
                    if fmt == QFormat::Q4_1 {
                        mins[r][c] = mw[r].mul_add(sx, mins[r][c]);
                    }
                }
            }
        }
        for r in 0..R {
            for c in 0..C {
                let mut l = [0f32; 8];
                // SAFETY: l has 8 floats.
                unsafe { _mm256_storeu_ps(l.as_mut_ptr(), lanes[r][c]) };
                acc[r][c] = hsum8(&l) + mins[r][c];
            }
        }
    }
}

/// The AVX-512 VNNI kernel: the AVX2 kernel's arithmetic with `vpdpbusd` (4 byte products
/// summed into each i32 lane: the lanes `vpmaddubsw` + `vpmaddwd` give, without the i16
/// step) on 512-bit vectors. Each vector holds two (weight row, x row) pairs of the tile, one
/// per 256-bit half, so every pair's 8 f32 lanes see the same fused multiply-adds in the same
/// order as in the AVX2 kernel, and the results are the same bits.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::*;
    use std::arch::x86_64::*;

    /// Two 256-bit halves as one vector (`lo` in lanes 0..8).
    #[inline(always)]
    unsafe fn join_i(lo: __m256i, hi: __m256i) -> __m512i {
        // SAFETY (callers): AVX-512F is present.
        unsafe { _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi) }
    }

    #[inline(always)]
    unsafe fn join_f(lo: f32, hi: f32) -> __m512 {
        // SAFETY (callers): AVX-512F is present.
        unsafe {
            _mm512_castsi512_ps(_mm512_inserti64x4::<1>(
                _mm512_castsi256_si512(_mm256_castps_si256(_mm256_set1_ps(lo))),
                _mm256_castps_si256(_mm256_set1_ps(hi)),
            ))
        }
    }

    /// The (weight row, x row) pair in slot `p` of an `R x C` tile (pairs in row-major order;
    /// the last slot repeats the last pair when `R * C` is odd).
    #[inline(always)]
    const fn pair<const R: usize, const C: usize>(p: usize) -> (usize, usize) {
        let p = if p < R * C { p } else { R * C - 1 };
        (p / C, p % C)
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub(super) unsafe fn tile<const R: usize, const C: usize>(
        xq: &Q8Rows,
        fmt: QFormat,
        wb: &[u8],
        j: usize,
        i: usize,
        acc: &mut [[f32; C]; R],
    ) {
        let (bb, nb) = (fmt.block_bytes(), xq.k / 32);
        let rb = nb * bb;
        assert!(
            wb.len() >= (j + R) * rb && xq.q.len() >= (i + C) * xq.k,
            "qdot tile out of range"
        );
        // Vectors of pairs: slots 2v (low half) and 2v + 1 (high half). At most 4 (R, C <=
        // WROWS, XROWS); unused ones are not touched.
        let nv = (R * C).div_ceil(2);
        let mut lanes = [_mm512_setzero_ps(); 4];
        let mut mins = [[0f32; C]; R];
        let mut wv = [_mm256_setzero_si256(); R];
        let mut dw = [0f32; R];
        let mut mw = [0f32; R];
        let mut xv = [_mm256_setzero_si256(); C];
        let mut dx = [0f32; C];
        let mut sx = [0f32; C];
        let (xp, dp, sp) = (xq.q.as_ptr(), xq.d.as_ptr(), xq.s.as_ptr());
        for b in 0..nb {
            // SAFETY: block b of weight rows j .. j + R lies inside wb (asserted above).
            unsafe { super::avx2::weight_blocks(fmt, wb, rb, j, b, &mut wv, &mut dw, &mut mw) };
            for c in 0..C {
                let xb = (i + c) * nb + b;
                // SAFETY: block xb of x lies inside xq (asserted above; d and s have a value
                // per block).
                unsafe {
                    xv[c] = _mm256_loadu_si256(xp.add(xb * 32) as *const __m256i);
                    dx[c] = *dp.add(xb);
                    sx[c] = *sp.add(xb);
                }
            }
            for (v, lane) in lanes.iter_mut().enumerate().take(nv) {
                let ((r0, c0), (r1, c1)) = (pair::<R, C>(2 * v), pair::<R, C>(2 * v + 1));
                // SAFETY: AVX-512 F/BW/VL/VNNI are enabled on this function.
                unsafe {
                    let w = join_i(wv[r0], wv[r1]);
                    let x = join_i(xv[c0], xv[c1]);
                    let sum = match fmt {
                        // Unsigned weights times signed activations.
                        QFormat::Q4_1 => _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, x),
                        // Signed times signed: |w| times x with w's sign (x is never -128).
                        QFormat::Q8_0 => {
                            let neg = _mm512_movepi8_mask(w);
                            let xs = _mm512_mask_sub_epi8(x, neg, _mm512_setzero_si512(), x);
                            _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_abs_epi8(w), xs)
                        }
                    };
                    let scale = join_f(dw[r0] * dx[c0], dw[r1] * dx[c1]);
                    *lane = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), scale, *lane);
                }
            }
            if fmt == QFormat::Q4_1 {
                for r in 0..R {
                    for c in 0..C {
                        mins[r][c] = mw[r].mul_add(sx[c], mins[r][c]);
                    }
                }
            }
        }
        for (v, lane) in lanes.iter().enumerate().take(nv) {
            let mut l = [0f32; 16];
            // SAFETY: l has 16 floats.
            unsafe { _mm512_storeu_ps(l.as_mut_ptr(), *lane) };
            for (half, p) in [2 * v, 2 * v + 1].into_iter().enumerate() {
                if p < R * C {
                    let (r, c) = pair::<R, C>(p);
                    let h: &[f32; 8] = l[half * 8..half * 8 + 8].try_into().expect("8 lanes");
                    acc[r][c] = hsum8(h) + mins[r][c];
                }
            }
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
            // The largest magnitude maps to +-127 exactly.
            assert!(q.q[b * 32..b * 32 + 32].iter().any(|v| v.unsigned_abs() == 127));
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
    fn simd_and_portable_kernels_agree_bit_for_bit_and_rows_are_batch_invariant() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(6);
        // Every tile shape: 4 / 3 / 2 / 1 weight rows, 2 / 1 rows of x.
        for (fmt, (n, k, m)) in [QFormat::Q4_1, QFormat::Q8_0]
            .into_iter()
            .flat_map(|f| [(7, 192, 23), (5, 64, 22), (3, 96, 21)].map(|s| (f, s)))
        {
            let w = random_blocks(fmt, m, k, &mut rng);
            let x: Vec<f32> = (0..n * k).map(|_| rng.random_range(-2.0..2.0)).collect();
            let xq = quantize_rows(&x, n, k);
            let mut a = vec![0f32; n * m];
            block(&xq, 0, fmt, &w, &mut a, n, m, Isa::Portable);
            for isa in Isa::available() {
                let mut b = vec![0f32; n * m];
                block(&xq, 0, fmt, &w, &mut b, n, m, isa);
                assert!(
                    a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()),
                    "{fmt:?} {isa:?}"
                );
            }
            // Each row alone gives the same bits as inside the batch.
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
            matmul_q8(&x, fmt, &w, &mut acc, n, k, m, MatmulMode::Accumulate);
            assert!(acc.iter().zip(&a).all(|(p, q)| *p == 1.0 + q));
        }
    }
}
