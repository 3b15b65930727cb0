//! A matrix product specialised for few rows ("skinny" `x`): `y = x W^T` with `x` of 1..=64
//! rows, `W` in its natural `out x in` layout, read straight from memory without packing.
//!
//! This is the shape of every decode step. General GEMM libraries pack `W` on every call, which
//! doubles the memory traffic that dominates small batches; here each weight tile (4 rows of
//! `W`) is loaded once per step from memory and reused from L1 for all rows of `x`.
//!
//! The AVX-512 path keeps a 4 x 4 tile of accumulators (4 weight rows x 4 rows of `x`) in
//! registers and reduces them at the end. Other CPUs use a portable version of the same loop
//! that the compiler vectorises for the build's target (AVX2 here).

use rayon::prelude::*;

/// Rows of `x` up to which the skinny kernel beats packed GEMM (measured: BENCHMARKS.md).
pub const MAX_ROWS: usize = 48;

/// Weight rows per rayon task.
pub(crate) const ROWS_PER_TASK: usize = 64;

/// `y (n x m) (+)= x (n x k) W^T`, `w` is `m x k` row-major.
pub fn matmul_skinny(x: &[f32], w: &[f32], y: &mut [f32], n: usize, k: usize, m: usize, accumulate: bool) {
    debug_assert_eq!(x.len(), n * k);
    debug_assert_eq!(w.len(), m * k);
    by_column_blocks(y, n, m, n * k * m, accumulate, |j0, j1, out| {
        block(x, &w[j0 * k..j1 * k], out, n, k, j1 - j0)
    });
}

/// Splits the output columns into blocks of [`ROWS_PER_TASK`] weight rows, computes each block
/// with `f(j0, j1, out)` (`out` is `n x (j1 - j0)`), in parallel when `work` (multiply-adds)
/// pays for it, and writes (or adds) the blocks into `y`. Tasks never share memory.
pub(crate) fn by_column_blocks(
    y: &mut [f32],
    n: usize,
    m: usize,
    work: usize,
    accumulate: bool,
    f: impl Fn(usize, usize, &mut [f32]) + Sync,
) {
    debug_assert_eq!(y.len(), n * m);
    let parallel = work >= 1 << 17;
    // Narrow products (LoRA shrinks: m = rank) still get one task per thread.
    let threads = rayon::current_num_threads().max(1);
    let per = if parallel && m < threads * ROWS_PER_TASK {
        m.div_ceil(threads).next_multiple_of(16).clamp(16, ROWS_PER_TASK)
    } else {
        ROWS_PER_TASK
    };
    let run = |t: usize| -> (usize, Vec<f32>) {
        let j0 = t * per;
        let j1 = (j0 + per).min(m);
        let mut out = vec![0f32; n * (j1 - j0)];
        f(j0, j1, &mut out);
        (j0, out)
    };
    let tasks = m.div_ceil(per);
    let parts: Vec<(usize, Vec<f32>)> = if parallel {
        (0..tasks).into_par_iter().map(run).collect()
    } else {
        (0..tasks).map(run).collect()
    };
    for (j0, out) in parts {
        let width = out.len() / n.max(1);
        for i in 0..n {
            let dst = &mut y[i * m + j0..i * m + j0 + width];
            let src = &out[i * width..(i + 1) * width];
            if accumulate {
                dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
            } else {
                dst.copy_from_slice(src);
            }
        }
    }
}

/// `out (n x mb) = x (n x k) wb^T` for one block of weight rows.
pub(crate) fn block(x: &[f32], wb: &[f32], out: &mut [f32], n: usize, k: usize, mb: usize) {
    block_at(x, wb, out, n, k, mb, mb, 0);
}

/// Like [`block`], but writes column `j` of the result to `out[i * ld + col0 + j]`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn block_at(x: &[f32], wb: &[f32], out: &mut [f32], n: usize, k: usize, mb: usize, ld: usize, col0: usize) {
    debug_assert!(n == 0 || out.len() >= (n - 1) * ld + col0 + mb);
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F (checked just above); x holds n*k values, wb
            // mb*k, and out has room for every (i, col0 + j) at stride ld (asserted above).
            unsafe { avx512::block(x, wb, out, n, k, mb, ld, col0) };
            return;
        }
    }
    block_portable(x, wb, out, n, k, mb, ld, col0);
}

/// Portable version: the compiler vectorises the 16-wide inner loops.
#[allow(clippy::too_many_arguments)]
fn block_portable(x: &[f32], wb: &[f32], out: &mut [f32], n: usize, k: usize, mb: usize, ld: usize, col0: usize) {
    for j in 0..mb {
        let wr = &wb[j * k..(j + 1) * k];
        for i in 0..n {
            out[i * ld + col0 + j] = crate::elementwise::dot(&x[i * k..(i + 1) * k], wr);
        }
    }
}

/// `y (n x m) = x (n x k) W^T` with `W` stored as bf16 (`m x k` raw bf16 bits), converted to
/// f32 in registers. Used to measure the bf16 weight format against f32 (BENCHMARKS.md); the
/// model keeps f32 weights.
pub fn matmul_skinny_bf16(x: &[f32], w: &[u16], y: &mut [f32], n: usize, k: usize, m: usize) {
    debug_assert_eq!(w.len(), m * k);
    by_column_blocks(y, n, m, n * k * m, false, |j0, j1, out| {
        let wb = &w[j0 * k..j1 * k];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512bw") && std::arch::is_x86_feature_detected!("avx512vl") {
                // SAFETY: AVX-512F/BW/VL are present (BW implies F); sizes are x: n*k,
                // wb: (j1-j0)*k, out: n*(j1-j0).
                unsafe { avx512::block_bf16(x, wb, out, n, k, j1 - j0) };
                return;
            }
        }
        let mb = j1 - j0;
        for j in 0..mb {
            let wr: Vec<f32> = wb[j * k..(j + 1) * k]
                .iter()
                .map(|&b| f32::from_bits((b as u32) << 16))
                .collect();
            for i in 0..n {
                out[i * mb + j] = crate::elementwise::dot(&x[i * k..(i + 1) * k], &wr);
            }
        }
    });
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// Rows of x per outer chunk of `block_generic`.
    const X_CHUNK: usize = 32;

    /// Weight rows in some storage format, loaded 16 at a time as f32.
    pub(super) trait Rows: Copy {
        /// The same rows starting `rows` rows further.
        unsafe fn skip(self, rows: usize) -> Self;
        /// Weights `p..p + 16` of row `r`.
        unsafe fn load(self, r: usize, p: usize) -> __m512;
        /// Weights `p..` of row `r` where `mask` selects the ones that exist.
        unsafe fn load_tail(self, mask: __mmask16, r: usize, p: usize) -> __m512;
    }

    #[derive(Clone, Copy)]
    pub(super) struct F32Rows(pub *const f32, pub usize);

    #[derive(Clone, Copy)]
    pub(super) struct Bf16Rows(pub *const u16, pub usize);

    impl Rows for F32Rows {
        #[inline(always)]
        unsafe fn skip(self, rows: usize) -> Self {
            // SAFETY: the caller stays within the matrix.
            F32Rows(unsafe { self.0.add(rows * self.1) }, self.1)
        }
        #[inline(always)]
        unsafe fn load(self, r: usize, p: usize) -> __m512 {
            // SAFETY: the caller guarantees row r has weights p..p + 16.
            unsafe { _mm512_loadu_ps(self.0.add(r * self.1 + p)) }
        }
        #[inline(always)]
        unsafe fn load_tail(self, mask: __mmask16, r: usize, p: usize) -> __m512 {
            // SAFETY: masked-off lanes are not read.
            unsafe { _mm512_maskz_loadu_ps(mask, self.0.add(r * self.1 + p)) }
        }
    }

    impl Rows for Bf16Rows {
        #[inline(always)]
        unsafe fn skip(self, rows: usize) -> Self {
            // SAFETY: the caller stays within the matrix.
            Bf16Rows(unsafe { self.0.add(rows * self.1) }, self.1)
        }
        #[inline(always)]
        unsafe fn load(self, r: usize, p: usize) -> __m512 {
            // SAFETY: the caller guarantees row r has weights p..p + 16; bf16 -> f32 is a shift.
            unsafe {
                let raw = _mm256_loadu_si256(self.0.add(r * self.1 + p) as *const __m256i);
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(raw)))
            }
        }
        #[inline(always)]
        unsafe fn load_tail(self, mask: __mmask16, r: usize, p: usize) -> __m512 {
            // SAFETY: masked-off lanes are not read (AVX-512BW/VL, enabled by the caller).
            unsafe {
                let raw = _mm256_maskz_loadu_epi16(mask, self.0.add(r * self.1 + p) as *const i16);
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(raw)))
            }
        }
    }

    /// Accumulates a `R x C` tile: weight rows `0..R` of `w`, x rows `0..C` from `x`.
    #[inline(always)]
    unsafe fn tile<const R: usize, const C: usize, W: Rows>(x: *const f32, w: W, k: usize, out: &mut [[f32; C]; R]) {
        // SAFETY (whole body): callers guarantee R rows of w and C rows of x, each k long, and
        // the masked loads never touch memory past k.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); C]; R];
            let full = k / 16 * 16;
            let mut p = 0;
            while p < full {
                let mut wv = [_mm512_setzero_ps(); R];
                for (r, v) in wv.iter_mut().enumerate() {
                    *v = w.load(r, p);
                }
                #[allow(clippy::needless_range_loop)] // the register tile, indexed on purpose
                for c in 0..C {
                    let xv = _mm512_loadu_ps(x.add(c * k + p));
                    for r in 0..R {
                        acc[r][c] = _mm512_fmadd_ps(wv[r], xv, acc[r][c]);
                    }
                }
                p += 16;
            }
            if p < k {
                let mask: __mmask16 = (1u32 << (k - p)) as u16 - 1;
                let mut wv = [_mm512_setzero_ps(); R];
                for (r, v) in wv.iter_mut().enumerate() {
                    *v = w.load_tail(mask, r, p);
                }
                #[allow(clippy::needless_range_loop)] // the register tile, indexed on purpose
                for c in 0..C {
                    let xv = _mm512_maskz_loadu_ps(mask, x.add(c * k + p));
                    for r in 0..R {
                        acc[r][c] = _mm512_fmadd_ps(wv[r], xv, acc[r][c]);
                    }
                }
            }
            for r in 0..R {
                for c in 0..C {
                    out[r][c] = _mm512_reduce_add_ps(acc[r][c]);
                }
            }
        }
    }

    /// `out[(i) * ld + col0 + j] = x_i . w_j` for `n` rows of x and `mb` weight rows.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn block_generic<W: Rows>(
        x: &[f32],
        w: W,
        out: &mut [f32],
        n: usize,
        k: usize,
        mb: usize,
        ld: usize,
        col0: usize,
    ) {
        // x rows in chunks of X_CHUNK (outer) so that a chunk of x and the weight block both
        // stay in L2 for large n; every output element is still one `tile` accumulation in
        // the same order, so a row's result never depends on n (batch invariance).
        let mut i0 = 0;
        while i0 < n {
            let i1 = (i0 + X_CHUNK).min(n);
            let mut j = 0;
            while j < mb {
                let r = (mb - j).min(4);
                let mut i = i0;
                while i < i1 {
                    let c = (i1 - i).min(4);
                    // SAFETY: j + r <= mb rows of w and i + c <= n rows of x, each k long.
                    unsafe {
                        let wp = w.skip(j);
                        let xp = x.as_ptr().add(i * k);
                        macro_rules! go {
                            ($R:literal, $C:literal) => {{
                                let mut t = [[0f32; $C]; $R];
                                tile::<$R, $C, W>(xp, wp, k, &mut t);
                                for rr in 0..$R {
                                    for cc in 0..$C {
                                        out[(i + cc) * ld + col0 + j + rr] = t[rr][cc];
                                    }
                                }
                            }};
                        }
                        match (r, c) {
                            (4, 4) => go!(4, 4),
                            (4, 3) => go!(4, 3),
                            (4, 2) => go!(4, 2),
                            (4, 1) => go!(4, 1),
                            (3, _) | (2, _) | (1, _) => {
                                for rr in 0..r {
                                    for cc in 0..c {
                                        let mut t = [[0f32; 1]; 1];
                                        tile::<1, 1, W>(xp.add(cc * k), wp.skip(rr), k, &mut t);
                                        out[(i + cc) * ld + col0 + j + rr] = t[0][0];
                                    }
                                }
                            }
                            _ => unreachable!("r and c are in 1..=4"),
                        }
                    }
                    i += c;
                }
                j += r;
            }
            i0 = i1;
        }
    }

    /// See `super::block_at`. Requires AVX-512F.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn block(
        x: &[f32],
        wb: &[f32],
        out: &mut [f32],
        n: usize,
        k: usize,
        mb: usize,
        ld: usize,
        col0: usize,
    ) {
        // SAFETY: forwarded contract of `super::block_at`.
        unsafe { block_generic(x, F32Rows(wb.as_ptr(), k), out, n, k, mb, ld, col0) }
    }

    /// bf16-weight version of `block`. Requires AVX-512F/BW/VL.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn block_bf16(x: &[f32], wb: &[u16], out: &mut [f32], n: usize, k: usize, mb: usize) {
        // SAFETY: x holds n*k values, wb mb*k, out n*mb.
        unsafe { block_generic(x, Bf16Rows(wb.as_ptr(), k), out, n, k, mb, mb, 0) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn bf16_variant_matches_f32_on_bf16_representable_weights() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        for (n, k, m) in [(1, 64, 7), (5, 576, 70), (32, 128, 9), (3, 40, 5)] {
            let x: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0..1.0)).collect();
            let wb: Vec<u16> = (0..m * k)
                .map(|_| half::bf16::from_f32(rng.random_range(-1.0..1.0)).to_bits())
                .collect();
            let wf: Vec<f32> = wb.iter().map(|&b| f32::from_bits((b as u32) << 16)).collect();
            let (mut a, mut b) = (vec![0f32; n * m], vec![0f32; n * m]);
            matmul_skinny_bf16(&x, &wb, &mut a, n, k, m);
            matmul_skinny(&x, &wf, &mut b, n, k, m, false);
            for (p, q) in a.iter().zip(&b) {
                assert!((p - q).abs() < 1e-4, "{p} vs {q}");
            }
        }
    }

    #[test]
    fn matches_portable_and_f64_reference_for_all_tail_shapes() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for (n, k, m) in [
            (1, 576, 192),
            (3, 17, 7),
            (5, 64, 70),
            (8, 100, 131),
            (13, 33, 4),
            (48, 576, 67),
        ] {
            let x: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0..1.0)).collect();
            let w: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
            let mut y = vec![2.0f32; n * m];
            matmul_skinny(&x, &w, &mut y, n, k, m, true);
            let mut p = vec![0f32; n * m];
            block_portable(&x, &w, &mut p, n, k, m, m, 0);
            for i in 0..n {
                for j in 0..m {
                    let r: f64 = (0..k).map(|q| x[i * k + q] as f64 * w[j * k + q] as f64).sum();
                    let got = y[i * m + j] as f64 - 2.0;
                    assert!(
                        (got - r).abs() < 1e-4 * (k as f64).sqrt(),
                        "{n}x{k}x{m} ({i},{j}): {got} vs {r}"
                    );
                    assert!((p[i * m + j] as f64 - r).abs() < 1e-4 * (k as f64).sqrt());
                }
            }
        }
    }
}
