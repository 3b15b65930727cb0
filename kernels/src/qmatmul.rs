//! Matrix products with weights kept in GGML's quantized blocks (Q4_1, Q8_0) and dequantized
//! on the fly, exactly: every weight is computed with the same operations, in the same order,
//! as the reference dequantization (`rrt_model::quant`), so the product equals the f32 product
//! on the dequantized matrix bit for bit, while reading 6.4x (Q4_1) or 3.8x (Q8_0) fewer bytes.
//!
//! For decode-sized batches each group of 4 weight rows is dequantized into an L1-resident
//! scratch and fed to the skinny f32 kernel; for prefill-sized batches the matrix is
//! dequantized once per call and multiplied with `gemm` (the dequantization is ~1 % of that).

use crate::matmul::MatmulMode;
use crate::skinny::{block_at, by_column_blocks};
use half::f16;

/// A quantized block format of weights kept in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QFormat {
    /// 32 weights: f16 scale d, f16 min m, 16 bytes of 4-bit values; w = q * d + m.
    Q4_1,
    /// 32 weights: f16 scale d, 32 signed bytes; w = q * d.
    Q8_0,
}

impl QFormat {
    pub fn block_bytes(self) -> usize {
        match self {
            QFormat::Q4_1 => 20,
            QFormat::Q8_0 => 34,
        }
    }

    /// Bytes of one row of `k` weights (`k` a multiple of 32).
    pub fn row_bytes(self, k: usize) -> usize {
        k / 32 * self.block_bytes()
    }
}

/// Dequantizes whole rows: `data` holds `out.len() / k` rows of `k` weights.
pub fn dequantize_rows(fmt: QFormat, data: &[u8], out: &mut [f32]) {
    let bb = fmt.block_bytes();
    debug_assert_eq!(data.len() / bb * 32, out.len());
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F is present; `data` holds out.len() / 32 whole blocks.
            unsafe { avx512::dequantize(fmt, data, out) };
            return;
        }
    }
    for (b, y) in data.chunks_exact(bb).zip(out.chunks_exact_mut(32)) {
        let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
        match fmt {
            QFormat::Q4_1 => {
                let m = f16::from_le_bytes([b[2], b[3]]).to_f32();
                for j in 0..16 {
                    y[j] = (b[4 + j] & 0x0F) as f32 * d + m;
                    y[j + 16] = (b[4 + j] >> 4) as f32 * d + m;
                }
            }
            QFormat::Q8_0 => {
                for j in 0..32 {
                    y[j] = (b[2 + j] as i8) as f32 * d;
                }
            }
        }
    }
}

/// Rows of x up to which `matmul_q` dequantizes 4 weight rows at a time.
const FEW_ROWS: usize = 48;

/// `y (n x m) (+)= x (n x k) W^T` with `W` (`m x k`) in quantized blocks.
#[allow(clippy::too_many_arguments)]
pub fn matmul_q(x: &[f32], fmt: QFormat, w: &[u8], y: &mut [f32], n: usize, k: usize, m: usize, mode: MatmulMode) {
    assert_eq!(x.len(), n * k, "matmul_q: x is not n x k");
    assert_eq!(k % 32, 0, "matmul_q: k is not a multiple of 32");
    assert_eq!(w.len(), m * fmt.row_bytes(k), "matmul_q: w is not m x k");
    assert_eq!(y.len(), n * m, "matmul_q: y is not n x m");
    if n == 0 || m == 0 {
        return;
    }
    // Each task dequantizes its weight rows exactly and runs the skinny kernel on them: for a
    // few rows of x, 4 weight rows at a time (the f32 copy stays in L1); for more, the task's
    // whole block at once (the dequantization is amortised over more rows). Both compute every
    // output element with the same tile, so the result is bit-identical to the f32 product
    // and a row's result does not depend on the other rows.
    by_column_blocks(y, n, m, n * k * m, mode == MatmulMode::Accumulate, |j0, j1, out| {
        columns(x, fmt, w, n, k, j0, j1, out)
    });
}

/// One column block of [`matmul_q`]: `out (n x (j1 - j0)) = x W[j0 .. j1]^T`, `w` the whole
/// matrix.
#[allow(clippy::too_many_arguments)]
pub(crate) fn columns(x: &[f32], fmt: QFormat, w: &[u8], n: usize, k: usize, j0: usize, j1: usize, out: &mut [f32]) {
    let rb = fmt.row_bytes(k);
    let mb = j1 - j0;
    if n <= FEW_ROWS {
        let mut scratch = vec![0f32; 4 * k];
        let mut j = 0;
        while j < mb {
            let r = (mb - j).min(4);
            let rows = &w[(j0 + j) * rb..(j0 + j + r) * rb];
            dequantize_rows(fmt, rows, &mut scratch[..r * k]);
            block_at(x, &scratch[..r * k], out, n, k, r, mb, j);
            j += r;
        }
    } else {
        let mut scratch = vec![0f32; mb * k];
        dequantize_rows(fmt, &w[j0 * rb..j1 * rb], &mut scratch);
        block_at(x, &scratch, out, n, k, mb, mb, 0);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::QFormat;
    use std::arch::x86_64::*;

    /// SIMD dequantization with the reference's operation order (multiply, then add the min).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn dequantize(fmt: QFormat, data: &[u8], out: &mut [f32]) {
        let bb = fmt.block_bytes();
        for (b, y) in data.chunks_exact(bb).zip(out.chunks_exact_mut(32)) {
            let d = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
            // SAFETY: each block has bb bytes (the loads below stay inside it) and y has 32 floats.
            unsafe {
                let dv = _mm512_set1_ps(d);
                match fmt {
                    QFormat::Q4_1 => {
                        let mv = _mm512_set1_ps(half::f16::from_le_bytes([b[2], b[3]]).to_f32());
                        let q = _mm512_cvtepu8_epi32(_mm_loadu_si128(b.as_ptr().add(4) as *const __m128i));
                        let lo = _mm512_cvtepi32_ps(_mm512_and_si512(q, _mm512_set1_epi32(0x0F)));
                        let hi = _mm512_cvtepi32_ps(_mm512_srli_epi32::<4>(q));
                        _mm512_storeu_ps(y.as_mut_ptr(), _mm512_add_ps(_mm512_mul_ps(lo, dv), mv));
                        _mm512_storeu_ps(y.as_mut_ptr().add(16), _mm512_add_ps(_mm512_mul_ps(hi, dv), mv));
                    }
                    QFormat::Q8_0 => {
                        let q0 = _mm512_cvtepi8_epi32(_mm_loadu_si128(b.as_ptr().add(2) as *const __m128i));
                        let q1 = _mm512_cvtepi8_epi32(_mm_loadu_si128(b.as_ptr().add(18) as *const __m128i));
                        _mm512_storeu_ps(y.as_mut_ptr(), _mm512_mul_ps(_mm512_cvtepi32_ps(q0), dv));
                        _mm512_storeu_ps(y.as_mut_ptr().add(16), _mm512_mul_ps(_mm512_cvtepi32_ps(q1), dv));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matmul_nt;
    use rand::{Rng, SeedableRng};

    fn random_blocks(fmt: QFormat, rows: usize, k: usize, rng: &mut impl Rng) -> Vec<u8> {
        let mut w: Vec<u8> = (0..rows * fmt.row_bytes(k)).map(|_| rng.random()).collect();
        for b in w.chunks_exact_mut(fmt.block_bytes()) {
            b[..2].copy_from_slice(&f16::from_f32(rng.random_range(-0.05..0.05)).to_le_bytes());
            if fmt == QFormat::Q4_1 {
                b[2..4].copy_from_slice(&f16::from_f32(rng.random_range(-0.1..0.1)).to_le_bytes());
            }
        }
        w
    }

    #[test]
    fn equals_f32_product_on_dequantized_weights_bit_for_bit() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        for fmt in [QFormat::Q4_1, QFormat::Q8_0] {
            for (n, k, m) in [
                (1, 64, 7),
                (4, 576, 70),
                (9, 96, 131),
                (49, 576, 70),
                (48, 64, 5),
                (60, 128, 33),
            ] {
                let w = random_blocks(fmt, m, k, &mut rng);
                let mut wf = vec![0f32; m * k];
                dequantize_rows(fmt, &w, &mut wf);
                let x: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0..1.0)).collect();
                let (mut a, mut b) = (vec![0.5f32; n * m], vec![0.5f32; n * m]);
                matmul_q(&x, fmt, &w, &mut a, n, k, m, MatmulMode::Accumulate);
                matmul_nt(&x, &wf, &mut b, n, k, m, MatmulMode::Accumulate);
                assert!(
                    a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()),
                    "{fmt:?} {n}x{k}x{m}"
                );
            }
        }
    }

    #[test]
    fn simd_dequantization_equals_scalar_formula() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(10);
        for fmt in [QFormat::Q4_1, QFormat::Q8_0] {
            let w = random_blocks(fmt, 3, 64, &mut rng);
            let mut got = vec![0f32; 192];
            dequantize_rows(fmt, &w, &mut got);
            for (bi, b) in w.chunks_exact(fmt.block_bytes()).enumerate() {
                let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
                for j in 0..32 {
                    let want = match fmt {
                        QFormat::Q4_1 => {
                            let q = if j < 16 { b[4 + j] & 0x0F } else { b[4 + j - 16] >> 4 };
                            q as f32 * d + f16::from_le_bytes([b[2], b[3]]).to_f32()
                        }
                        QFormat::Q8_0 => (b[2 + j] as i8) as f32 * d,
                    };
                    assert_eq!(got[bi * 32 + j].to_bits(), want.to_bits());
                }
            }
        }
    }
}
