//! Element-wise and row-wise kernels: RMSNorm, SwiGLU, softmax, dot products.
//!
//! Reductions keep 16 independent partial sums so the compiler can vectorise them (floating
//! point addition is not associative, so a single accumulator would force scalar code).

use rayon::prelude::*;

/// Rows per rayon task for row-wise kernels; below this, a single thread is faster.
const ROWS_PER_TASK: usize = 8;

/// Dot product of two equally long slices, vectorised with 16 partial sums.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0f32; 16];
    let ca = a.chunks_exact(16);
    let cb = b.chunks_exact(16);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] = x[i].mul_add(y[i], acc[i]);
        }
    }
    let mut tail = 0f32;
    for (x, y) in ra.iter().zip(rb) {
        tail = x.mul_add(*y, tail);
    }
    sum16(acc) + tail
}

#[inline]
fn sum16(acc: [f32; 16]) -> f32 {
    let mut s8 = [0f32; 8];
    for i in 0..8 {
        s8[i] = acc[i] + acc[i + 8];
    }
    let s4 = [s8[0] + s8[4], s8[1] + s8[5], s8[2] + s8[6], s8[3] + s8[7]];
    (s4[0] + s4[2]) + (s4[1] + s4[3])
}

/// `y += a * x` over equally long slices.
#[inline]
pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    debug_assert_eq!(x.len(), y.len());
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi = a.mul_add(*xi, *yi);
    }
}

/// RMSNorm of each `dim`-wide row of `x` into `out`: `out = x / sqrt(mean(x^2) + eps) * weight`.
pub fn rmsnorm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let dim = weight.len();
    debug_assert_eq!(x.len(), out.len());
    debug_assert_eq!(x.len() % dim, 0);
    let one = |(xr, or): (&[f32], &mut [f32])| {
        let ms = dot(xr, xr) / dim as f32;
        let scale = 1.0 / (ms + eps).sqrt();
        for ((o, xi), w) in or.iter_mut().zip(xr).zip(weight) {
            *o = (xi * scale) * w;
        }
    };
    if x.len() / dim >= 2 * ROWS_PER_TASK {
        x.par_chunks(dim)
            .zip(out.par_chunks_mut(dim))
            .with_min_len(ROWS_PER_TASK)
            .for_each(one);
    } else {
        x.chunks(dim).zip(out.chunks_mut(dim)).for_each(one);
    }
}

/// `silu(g) * u` per element, by libm's `expf`.
fn silu_mul_scalar(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((oi, gi), ui) in out.iter_mut().zip(gate).zip(up) {
        *oi = gi / (1.0 + (-gi).exp()) * ui;
    }
}

/// SwiGLU on fused `[gate | up]` rows: for each row of `gu` (width `2 * inter`),
/// `out[i] = silu(gate[i]) * up[i]`. With AVX-512, 16 lanes at a time by the Cephes-style
/// `expf` of [`sum_exp`] (within about 2 ulp of f32, as llama.cpp's own vector `expf`; the
/// scalar `expf` was 3-4 % of an engine profile); the tail and other CPUs by libm.
pub fn silu_mul(gu: &[f32], inter: usize, out: &mut [f32]) {
    debug_assert_eq!(gu.len(), 2 * out.len());
    #[cfg(target_arch = "x86_64")]
    let simd = std::arch::is_x86_feature_detected!("avx512f");
    #[cfg(not(target_arch = "x86_64"))]
    let simd = false;
    let one = |(g, o): (&[f32], &mut [f32])| {
        let (gate, up) = g.split_at(inter);
        let body = if simd { inter / 16 * 16 } else { 0 };
        #[cfg(target_arch = "x86_64")]
        if body > 0 {
            // SAFETY: AVX-512F is present; the kernel reads and writes whole chunks of 16.
            unsafe { avx512_silu_mul(&gate[..body], &up[..body], &mut o[..body]) };
        }
        silu_mul_scalar(&gate[body..], &up[body..], &mut o[body..]);
    };
    if out.len() / inter >= 2 * ROWS_PER_TASK {
        gu.par_chunks(2 * inter)
            .zip(out.par_chunks_mut(inter))
            .with_min_len(ROWS_PER_TASK)
            .for_each(one);
    } else {
        gu.chunks(2 * inter).zip(out.chunks_mut(inter)).for_each(one);
    }
}

/// `y += x` element-wise.
pub fn add_inplace(y: &mut [f32], x: &[f32]) {
    debug_assert_eq!(x.len(), y.len());
    for (a, b) in y.iter_mut().zip(x) {
        *a += b;
    }
}

/// Numerically stable softmax of one row, in place. Returns the log of the normaliser
/// (`max + ln(sum(exp(x - max)))`), which callers use for log-probabilities.
pub fn softmax_inplace(x: &mut [f32]) -> f32 {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        // All entries masked: define the result as uniform zeros rather than NaN.
        x.iter_mut().for_each(|v| *v = 0.0);
        return f32::NEG_INFINITY;
    }
    let mut sum = 0f64;
    let mut body = 0;
    #[cfg(target_arch = "x86_64")]
    if x.len() >= 16 && std::arch::is_x86_feature_detected!("avx512f") {
        // Attention's softmax (one per query head and row): its scalar `expf` was most of the
        // attention kernel's time at decode lengths.
        body = x.len() / 16 * 16;
        // SAFETY: AVX-512F is present; the kernel reads and writes whole chunks of 16.
        sum = unsafe { avx512_exp_inplace(&mut x[..body], max) };
    }
    for v in x[body..].iter_mut() {
        *v = (*v - max).exp();
        sum += *v as f64;
    }
    let inv = (1.0 / sum) as f32;
    x.iter_mut().for_each(|v| *v *= inv);
    max + (sum as f32).ln()
}

/// Log-sum-exp of a row (the log of softmax's normaliser), accumulated in f64.
pub fn logsumexp(x: &[f32]) -> f32 {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return f32::NEG_INFINITY;
    }
    max + sum_exp(x, max, false).ln() as f32
}

/// `sum(exp(x - max))` over a row (`max` its maximum), in f64; with `skip_nan`, NaN entries
/// count as -inf (add nothing), else a NaN makes the sum NaN. Taken once per output token over
/// the whole vocabulary: with AVX-512, 16 lanes at a time by a Cephes-style `expf` (within
/// about 2 ulp of f32, tested against f64) summed in f64; the tail and other CPUs in f64.
pub fn sum_exp(x: &[f32], max: f32, skip_nan: bool) -> f64 {
    let scalar = |v: &[f32]| -> f64 {
        v.iter()
            .filter(|v| !(skip_nan && v.is_nan()))
            .map(|v| ((v - max) as f64).exp())
            .sum()
    };
    #[cfg(target_arch = "x86_64")]
    if x.len() >= 16 && std::arch::is_x86_feature_detected!("avx512f") {
        let body = x.len() / 16 * 16;
        // SAFETY: AVX-512F is present; the kernel reads whole chunks of 16 of `x[..body]`.
        let s = unsafe { avx512_sum_exp(&x[..body], max, skip_nan) };
        return s + scalar(&x[body..]);
    }
    scalar(x)
}

/// The AVX-512 body of [`sum_exp`] (`x.len()` a multiple of 16).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn avx512_sum_exp(x: &[f32], max: f32, skip_nan: bool) -> f64 {
    use std::arch::x86_64::*;
    debug_assert_eq!(x.len() % 16, 0);
    // SAFETY: every load reads 16 floats of a whole chunk of x.
    unsafe {
        let m = _mm512_set1_ps(max);
        let mut acc = [_mm512_setzero_pd(); 2];
        for c in x.chunks_exact(16) {
            add_f64(&mut acc, exp_shifted(_mm512_loadu_ps(c.as_ptr()), m, skip_nan));
        }
        _mm512_reduce_add_pd(_mm512_add_pd(acc[0], acc[1]))
    }
}

/// `exp(t)` on 16 lanes (Cephes' `expf`: t = n ln 2 + r, a degree-6 polynomial in r, scaled
/// by 2^n); NaN lanes give 0, -inf 0, large t +inf.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
#[inline]
fn exp512(t: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    // exp(-104) is 0 in f32; the clamp also takes -inf (and NaN: max returns its second
    // operand) to 0.
    let t = _mm512_max_ps(t, _mm512_set1_ps(-104.0));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
        t,
        _mm512_set1_ps(std::f32::consts::LOG2_E),
    ));
    // r = t - n ln 2, ln 2 in two parts (Cephes' C1, C2).
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), t);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm512_set1_ps(1.987_569_2e-4);
    for k in [1.398_2e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(k));
    }
    let y = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0));
    _mm512_scalef_ps(y, n)
}

/// `exp(v - m)` per lane; a NaN lane gives 0 with `skip_nan`, else NaN.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
#[inline]
fn exp_shifted(
    v: std::arch::x86_64::__m512,
    m: std::arch::x86_64::__m512,
    skip_nan: bool,
) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
    let e = exp512(_mm512_sub_ps(v, m));
    if skip_nan {
        _mm512_maskz_mov_ps(!nan, e)
    } else {
        _mm512_mask_mov_ps(e, nan, v)
    }
}

/// Adds the 16 lanes of `e`, widened to f64, to the two accumulators.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
#[inline]
fn add_f64(acc: &mut [std::arch::x86_64::__m512d; 2], e: std::arch::x86_64::__m512) {
    use std::arch::x86_64::*;
    acc[0] = _mm512_add_pd(acc[0], _mm512_cvtps_pd(_mm512_castps512_ps256(e)));
    acc[1] = _mm512_add_pd(
        acc[1],
        _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(e)))),
    );
}

/// `x[i] = exp(x[i] - max)` (NaN stays NaN) and the sum of the results in f64: the AVX-512
/// body of [`softmax_inplace`] (`x.len()` a multiple of 16).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn avx512_exp_inplace(x: &mut [f32], max: f32) -> f64 {
    use std::arch::x86_64::*;
    debug_assert_eq!(x.len() % 16, 0);
    let m = _mm512_set1_ps(max);
    let mut acc = [_mm512_setzero_pd(); 2];
    for c in x.chunks_exact_mut(16) {
        // SAFETY: each pointer addresses a whole chunk of 16 floats.
        unsafe {
            let e = exp_shifted(_mm512_loadu_ps(c.as_ptr()), m, false);
            _mm512_storeu_ps(c.as_mut_ptr(), e);
            add_f64(&mut acc, e);
        }
    }
    _mm512_reduce_add_pd(_mm512_add_pd(acc[0], acc[1]))
}

/// The AVX-512 body of [`silu_mul`] (lengths a multiple of 16).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn avx512_silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    use std::arch::x86_64::*;
    debug_assert!(gate.len().is_multiple_of(16) && up.len() == gate.len() && out.len() == gate.len());
    let one = _mm512_set1_ps(1.0);
    for ((g, u), o) in gate
        .chunks_exact(16)
        .zip(up.chunks_exact(16))
        .zip(out.chunks_exact_mut(16))
    {
        // SAFETY: each pointer addresses a whole chunk of 16 floats.
        unsafe {
            let gv = _mm512_loadu_ps(g.as_ptr());
            let e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), gv));
            let r = _mm512_mul_ps(_mm512_div_ps(gv, _mm512_add_ps(one, e)), _mm512_loadu_ps(u.as_ptr()));
            _mm512_storeu_ps(o.as_mut_ptr(), r);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn sum_exp_is_close_to_f64() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        for len in [16, 17, 100, 49152] {
            let mut x: Vec<f32> = (0..len).map(|_| rng.random_range(-40.0..12.0)).collect();
            x[3] = f32::NEG_INFINITY;
            x[5] = -200.0;
            x[len - 1] = -0.001;
            let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let want: f64 = x.iter().map(|v| ((v - max) as f64).exp()).sum();
            let got = super::sum_exp(&x, max, false);
            assert!((got - want).abs() <= 4e-7 * want, "{len}: {got} vs {want}");
            // Each term (normal f32 range): within about 2 ulp of exp.
            for v in [0.0f32, -0.3, -0.35, -1.0, -10.5, -60.0, -87.0] {
                let row = [v; 16];
                let e = super::sum_exp(&row, 0.0, false) / 16.0;
                assert!(
                    (e - (v as f64).exp()).abs() <= 2.5e-7 * (v as f64).exp(),
                    "exp({v}): {e}"
                );
            }
            x[7] = f32::NAN;
            assert!(super::sum_exp(&x, max, false).is_nan());
            let want: f64 = x.iter().filter(|v| !v.is_nan()).map(|v| ((v - max) as f64).exp()).sum();
            let got = super::sum_exp(&x, max, true);
            assert!((got - want).abs() <= 4e-7 * want, "{len} skipping NaN: {got} vs {want}");
        }
    }

    use super::*;

    fn naive_dot(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
    }

    #[test]
    fn dot_matches_f64_reference_for_odd_lengths() {
        for n in [0usize, 1, 7, 15, 16, 17, 64, 100, 577] {
            let a: Vec<f32> = (0..n).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.1).collect();
            let b: Vec<f32> = (0..n).map(|i| ((i * 13 % 7) as f32 - 3.0) * 0.3).collect();
            let got = dot(&a, &b) as f64;
            let want = naive_dot(&a, &b);
            assert!(
                (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                "n={n}: {got} vs {want}"
            );
        }
    }

    #[test]
    fn rmsnorm_matches_definition() {
        let x = [1.0f32, -2.0, 3.0, 0.5, 4.0, 0.0, -1.0, 2.0];
        let w = [0.5f32, 1.0, 2.0, -1.0];
        let mut out = [0f32; 8];
        rmsnorm(&x, &w, 1e-5, &mut out);
        for r in 0..2 {
            let row = &x[r * 4..r * 4 + 4];
            let ms: f64 = row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / 4.0;
            let s = 1.0 / (ms + 1e-5).sqrt();
            for i in 0..4 {
                let want = row[i] as f64 * s * w[i] as f64;
                assert!((out[r * 4 + i] as f64 - want).abs() < 1e-6, "{r},{i}");
            }
        }
    }

    #[test]
    fn silu_mul_matches_definition() {
        let gu = [1.0f32, -1.0, 2.0, 3.0];
        let mut out = [0f32; 2];
        silu_mul(&gu, 2, &mut out);
        let silu = |x: f64| x / (1.0 + (-x).exp());
        assert!((out[0] as f64 - silu(1.0) * 2.0).abs() < 1e-6);
        assert!((out[1] as f64 - silu(-1.0) * 3.0).abs() < 1e-6);
    }

    /// The vector SiLU (rows of 1536 + a tail) against f64 within 4 f32 ulp of the largest
    /// term, over the range activations take and beyond (overflow, -inf, NaN).
    #[test]
    fn silu_mul_is_close_to_f64() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let silu = |x: f64| x / (1.0 + (-x).exp());
        for inter in [16, 37, 1536] {
            let mut gu: Vec<f32> = (0..3 * 2 * inter).map(|_| rng.random_range(-30.0..30.0)).collect();
            gu[0] = -200.0;
            gu[1] = 200.0;
            gu[2] = f32::NEG_INFINITY;
            gu[3] = 1e-30;
            gu[4] = f32::NAN;
            let mut out = vec![0f32; 3 * inter];
            silu_mul(&gu, inter, &mut out);
            for (r, (row, o)) in gu.chunks(2 * inter).zip(out.chunks(inter)).enumerate() {
                for i in 0..inter {
                    let (g, u) = (row[i] as f64, row[inter + i] as f64);
                    let want = silu(g) * u;
                    let got = o[i] as f64;
                    if g.is_nan() || (g.is_infinite() && g < 0.0) {
                        // -inf * e^inf: NaN by both.
                        assert!(got.is_nan() || got == 0.0, "{r},{i}: {got}");
                        continue;
                    }
                    let tol = 4.0 * f32::EPSILON as f64 * (g * u).abs().max(1e-30);
                    assert!((got - want).abs() <= tol, "{r},{i}: g {g} u {u} got {got} want {want}");
                }
            }
        }
    }

    /// The vector softmax against f64 (lengths with and without a tail, masked entries, a NaN).
    #[test]
    fn softmax_is_close_to_f64() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(13);
        for len in [16, 31, 160, 2048] {
            let mut x: Vec<f32> = (0..len).map(|_| rng.random_range(-20.0..20.0)).collect();
            x[3] = f32::NEG_INFINITY;
            let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let z: f64 = x.iter().map(|&v| (v as f64 - max).exp()).sum();
            let mut y = x.clone();
            let lse = softmax_inplace(&mut y);
            assert!((lse as f64 - (max + z.ln())).abs() < 1e-5, "{len}");
            for (a, b) in x.iter().zip(&y) {
                if a.is_infinite() {
                    assert_eq!(*b, 0.0, "{len}: a masked entry");
                    continue;
                }
                let want = (*a as f64 - max).exp() / z;
                // The f32 difference a - max is rounded (relative error eps |a - max| in exp).
                let tol = 4.0 * f32::EPSILON as f64 * want * (1.0 + (*a as f64 - max).abs());
                assert!((*b as f64 - want).abs() <= tol + 1e-30, "{len}: {b} vs {want}");
            }
            x[5] = f32::NAN;
            softmax_inplace(&mut x);
            assert!(x.iter().all(|v| v.is_nan()), "{len}: a NaN score makes the row NaN");
        }
    }

    #[test]
    fn softmax_sums_to_one_and_returns_lse() {
        let mut x = [1.0f32, 2.0, 3.0, -1000.0];
        let lse_ref = logsumexp(&x);
        let lse = softmax_inplace(&mut x);
        assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!((lse - lse_ref).abs() < 1e-6);
        assert!((lse - (1f64.exp() + 2f64.exp() + 3f64.exp()).ln() as f32).abs() < 1e-5);
    }
}
