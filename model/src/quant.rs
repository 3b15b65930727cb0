//! GGML tensor types, their exact dequantization to `f32`, and quantization of `f32` rows to
//! the two block formats matrices are kept in (Q8_0, Q4_1).
//!
//! The block layouts and formulas follow ggml's reference (`dequantize_row_*` and
//! `quantize_row_q8_0_ref` / `quantize_row_q4_1_ref` in `ggml-quants.c`), including the order
//! of floating-point operations, so the values and blocks equal those of ggml and of the `gguf`
//! Python package bit for bit (checked by fixtures in `fixtures/gguf`:
//! `scripts/make_quant_fixtures.py`).

use half::{bf16, f16};
use rayon::prelude::*;
use rrt_kernels::qmatmul::QFormat;

/// The ggml tensor types this crate knows, with their on-disk ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
    BF16,
}

impl GgmlType {
    /// Maps a ggml type id to a supported type; `Err` carries a printable name of the id.
    pub fn from_id(id: u32) -> Result<Self, String> {
        Ok(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            12 => GgmlType::Q4K,
            13 => GgmlType::Q5K,
            14 => GgmlType::Q6K,
            30 => GgmlType::BF16,
            other => {
                let known = match other {
                    4 | 5 => "Q4_2/Q4_3 (removed from ggml)",
                    9 => "Q8_1",
                    10 => "Q2_K",
                    11 => "Q3_K",
                    15 => "Q8_K",
                    16..=23 => "IQ*",
                    24 => "I8",
                    25 => "I16",
                    26 => "I32",
                    27 => "I64",
                    28 => "F64",
                    29 => "IQ1_M",
                    _ => "unknown",
                };
                return Err(format!("{other} ({known})"));
            }
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q4K => "Q4_K",
            GgmlType::Q5K => "Q5_K",
            GgmlType::Q6K => "Q6_K",
            GgmlType::BF16 => "BF16",
        }
    }

    /// Elements per block.
    pub fn block_len(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => 32,
            GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K => 256,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => 18,
            GgmlType::Q4_1 => 20,
            GgmlType::Q5_0 => 22,
            GgmlType::Q5_1 => 24,
            GgmlType::Q8_0 => 34,
            GgmlType::Q4K => 144,
            GgmlType::Q5K => 176,
            GgmlType::Q6K => 210,
        }
    }

    /// Bytes taken by `n` elements, or `None` if `n` is not a whole number of blocks
    /// (or overflows).
    pub fn bytes_for(self, n: usize) -> Option<usize> {
        if !n.is_multiple_of(self.block_len()) {
            return None;
        }
        (n / self.block_len()).checked_mul(self.block_bytes())
    }
}

#[inline]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Dequantizes `out.len()` elements from `data` (which must hold exactly that many).
pub fn dequantize(ty: GgmlType, data: &[u8], out: &mut [f32]) {
    let bl = ty.block_len();
    let bb = ty.block_bytes();
    debug_assert_eq!(Some(data.len()), ty.bytes_for(out.len()));
    // Blocks per rayon task: enough work to amortise scheduling.
    let per_task = (16384 / bl).max(1);
    data.par_chunks(bb * per_task)
        .zip(out.par_chunks_mut(bl * per_task))
        .for_each(|(src, dst)| {
            for (b, y) in src.chunks_exact(bb).zip(dst.chunks_exact_mut(bl)) {
                dequantize_block(ty, b, y);
            }
        });
}

fn dequantize_block(ty: GgmlType, b: &[u8], y: &mut [f32]) {
    match ty {
        GgmlType::F32 => y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        GgmlType::F16 => y[0] = f16_at(b, 0),
        GgmlType::BF16 => y[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32(),
        GgmlType::Q4_0 => {
            let d = f16_at(b, 0);
            let qs = &b[2..18];
            for j in 0..16 {
                let x0 = (qs[j] & 0x0F) as i32 - 8;
                let x1 = (qs[j] >> 4) as i32 - 8;
                y[j] = x0 as f32 * d;
                y[j + 16] = x1 as f32 * d;
            }
        }
        GgmlType::Q4_1 => {
            let d = f16_at(b, 0);
            let m = f16_at(b, 2);
            let qs = &b[4..20];
            for j in 0..16 {
                let x0 = (qs[j] & 0x0F) as i32;
                let x1 = (qs[j] >> 4) as i32;
                y[j] = x0 as f32 * d + m;
                y[j + 16] = x1 as f32 * d + m;
            }
        }
        GgmlType::Q5_0 => {
            let d = f16_at(b, 0);
            let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
            let qs = &b[6..22];
            for j in 0..16 {
                let xh0 = ((qh >> j) << 4) & 0x10;
                let xh1 = (qh >> (j + 12)) & 0x10;
                let x0 = ((qs[j] as u32 & 0x0F) | xh0) as i32 - 16;
                let x1 = ((qs[j] as u32 >> 4) | xh1) as i32 - 16;
                y[j] = x0 as f32 * d;
                y[j + 16] = x1 as f32 * d;
            }
        }
        GgmlType::Q5_1 => {
            let d = f16_at(b, 0);
            let m = f16_at(b, 2);
            let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
            let qs = &b[8..24];
            for j in 0..16 {
                let xh0 = ((qh >> j) << 4) & 0x10;
                let xh1 = (qh >> (j + 12)) & 0x10;
                let x0 = (qs[j] as u32 & 0x0F) | xh0;
                let x1 = (qs[j] as u32 >> 4) | xh1;
                y[j] = x0 as f32 * d + m;
                y[j + 16] = x1 as f32 * d + m;
            }
        }
        GgmlType::Q8_0 => {
            let d = f16_at(b, 0);
            for j in 0..32 {
                y[j] = (b[2 + j] as i8) as f32 * d;
            }
        }
        GgmlType::Q4K => {
            let d = f16_at(b, 0);
            let dmin = f16_at(b, 2);
            let scales = &b[4..16];
            let qs = &b[16..144];
            for (chunk, j) in (0..256).step_by(64).enumerate() {
                let is = 2 * chunk;
                let (sc, m) = scale_min_k4(is, scales);
                let (d1, m1) = (d * sc as f32, dmin * m as f32);
                let (sc, m) = scale_min_k4(is + 1, scales);
                let (d2, m2) = (d * sc as f32, dmin * m as f32);
                let q = &qs[chunk * 32..chunk * 32 + 32];
                for l in 0..32 {
                    y[j + l] = d1 * (q[l] & 0x0F) as f32 - m1;
                    y[j + 32 + l] = d2 * (q[l] >> 4) as f32 - m2;
                }
            }
        }
        GgmlType::Q5K => {
            let d = f16_at(b, 0);
            let dmin = f16_at(b, 2);
            let scales = &b[4..16];
            let qh = &b[16..48];
            let qs = &b[48..176];
            let (mut u1, mut u2) = (1u8, 2u8);
            for (chunk, j) in (0..256).step_by(64).enumerate() {
                let is = 2 * chunk;
                let (sc, m) = scale_min_k4(is, scales);
                let (d1, m1) = (d * sc as f32, dmin * m as f32);
                let (sc, m) = scale_min_k4(is + 1, scales);
                let (d2, m2) = (d * sc as f32, dmin * m as f32);
                let ql = &qs[chunk * 32..chunk * 32 + 32];
                for l in 0..32 {
                    let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
                    let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
                    y[j + l] = d1 * ((ql[l] & 0x0F) + h1) as f32 - m1;
                    y[j + 32 + l] = d2 * ((ql[l] >> 4) + h2) as f32 - m2;
                }
                u1 <<= 2;
                u2 <<= 2;
            }
        }
        GgmlType::Q6K => {
            let ql_all = &b[0..128];
            let qh_all = &b[128..192];
            let sc_all = &b[192..208];
            let d = f16_at(b, 208);
            for n in 0..2 {
                let ql = &ql_all[n * 64..];
                let qh = &qh_all[n * 32..];
                let sc = &sc_all[n * 8..];
                let yb = &mut y[n * 128..];
                for l in 0..32 {
                    let is = l / 16;
                    let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
                    let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                    let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                    let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                    yb[l] = d * (sc[is] as i8) as f32 * q1 as f32;
                    yb[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
                    yb[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
                    yb[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
                }
            }
        }
    }
}

/// The 6-bit scale and min of sub-block `j` of a Q4_K/Q5_K super-block.
#[inline]
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Blocks per rayon task when quantizing.
const QUANT_BLOCKS_PER_TASK: usize = 512;

/// Quantizes `x` to Q8_0 blocks (34 bytes per 32 values: f16 scale `d`, 32 `i8` values `q`,
/// `x ~ q * d`) exactly as ggml's `quantize_row_q8_0_ref`: `d = amax / 127` over the block,
/// `q = roundf(x / d)` (halves away from zero), `d` rounded to f16 (to nearest, ties even).
///
/// # Panics
/// If `x.len()` is not a multiple of 32 (callers check their row width first).
pub fn quantize_q8_0(x: &[f32]) -> Vec<u8> {
    quantize(QFormat::Q8_0, x)
}

/// Quantizes `x` to Q4_1 blocks (20 bytes per 32 values: f16 scale `d`, f16 minimum `m`, 16
/// bytes whose low nibble `j` is value `j` and high nibble value `j + 16`, `x ~ q * d + m`)
/// exactly as ggml's `quantize_row_q4_1_ref`: `d = (max - min) / 15` over the block,
/// `q = min(15, trunc((x - min) / d + 0.5))`, `d` and `m` rounded to f16.
///
/// # Panics
/// If `x.len()` is not a multiple of 32 (callers check their row width first).
pub fn quantize_q4_1(x: &[f32]) -> Vec<u8> {
    quantize(QFormat::Q4_1, x)
}

/// Quantizes `x` (whole blocks of 32) to `fmt`; see [`quantize_q8_0`] and [`quantize_q4_1`].
///
/// # Panics
/// If `x.len()` is not a multiple of 32.
pub fn quantize(fmt: QFormat, x: &[f32]) -> Vec<u8> {
    assert!(
        x.len().is_multiple_of(32),
        "quantize: {} values are not whole blocks of 32",
        x.len()
    );
    let bb = fmt.block_bytes();
    let mut out = vec![0u8; x.len() / 32 * bb];
    out.par_chunks_mut(bb * QUANT_BLOCKS_PER_TASK)
        .zip(x.par_chunks(32 * QUANT_BLOCKS_PER_TASK))
        .for_each(|(dst, src)| {
            for (b, v) in dst.chunks_exact_mut(bb).zip(src.chunks_exact(32)) {
                match fmt {
                    QFormat::Q8_0 => quantize_block_q8_0(v, b),
                    QFormat::Q4_1 => quantize_block_q4_1(v, b),
                }
            }
        });
    out
}

fn quantize_block_q8_0(x: &[f32], b: &mut [u8]) {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    b[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
    for (q, v) in b[2..34].iter_mut().zip(x) {
        // `f32::round` rounds halves away from zero, like C's `roundf`.
        *q = ((v * id).round() as i8) as u8;
    }
}

fn quantize_block_q4_1(x: &[f32], b: &mut [u8]) {
    // The reference's loop: strict comparisons from +/- FLT_MAX keep the first extreme.
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    let d = (max - min) / 15.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    b[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
    b[2..4].copy_from_slice(&f16::from_f32(min).to_le_bytes());
    // `(int8_t)(x + 0.5f)` truncates toward zero; the values are >= 0 here.
    let q = |v: f32| (((v - min) * id + 0.5) as i8).min(15) as u8;
    for j in 0..16 {
        b[4 + j] = q(x[j]) | (q(x[j + 16]) << 4);
    }
}

/// The first block of `blocks` (whole blocks of `fmt`) whose f16 scale, or Q4_1 minimum, is
/// not finite: `(block index, value)`. Such a block would dequantize to NaN or infinity.
pub fn first_non_finite_block(fmt: QFormat, blocks: &[u8]) -> Option<(usize, f32)> {
    let fields: &[usize] = match fmt {
        QFormat::Q8_0 => &[0],
        QFormat::Q4_1 => &[0, 2],
    };
    blocks
        .par_chunks(fmt.block_bytes() * QUANT_BLOCKS_PER_TASK)
        .enumerate()
        .find_map_first(|(task, chunk)| {
            chunk.chunks_exact(fmt.block_bytes()).enumerate().find_map(|(i, b)| {
                fields
                    .iter()
                    .map(|&o| f16_at(b, o))
                    .find(|v| !v.is_finite())
                    .map(|v| (task * QUANT_BLOCKS_PER_TASK + i, v))
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_0_block_by_hand() {
        let mut b = vec![0u8; 34];
        b[..2].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
        for j in 0..32 {
            b[2 + j] = (j as i8 - 16) as u8;
        }
        let mut y = [0f32; 32];
        dequantize(GgmlType::Q8_0, &b, &mut y);
        for (j, v) in y.iter().enumerate() {
            assert_eq!(*v, (j as f32 - 16.0) * 0.5);
        }
    }

    #[test]
    fn q4_1_block_by_hand() {
        let mut b = vec![0u8; 20];
        b[..2].copy_from_slice(&f16::from_f32(2.0).to_le_bytes());
        b[2..4].copy_from_slice(&f16::from_f32(-1.0).to_le_bytes());
        for j in 0..16 {
            b[4 + j] = (j as u8) | ((15 - j as u8) << 4);
        }
        let mut y = [0f32; 32];
        dequantize(GgmlType::Q4_1, &b, &mut y);
        for j in 0..16 {
            assert_eq!(y[j], j as f32 * 2.0 - 1.0);
            assert_eq!(y[j + 16], (15 - j) as f32 * 2.0 - 1.0);
        }
    }

    #[test]
    fn sizes_reject_partial_blocks() {
        assert_eq!(GgmlType::Q4K.bytes_for(512), Some(288));
        assert_eq!(GgmlType::Q4K.bytes_for(100), None);
        assert_eq!(GgmlType::F32.bytes_for(3), Some(12));
        assert!(GgmlType::from_id(10).unwrap_err().contains("Q2_K"));
    }

    fn roundtrip(fmt: QFormat, x: &[f32]) -> Vec<f32> {
        let b = quantize(fmt, x);
        assert_eq!(b.len(), x.len() / 32 * fmt.block_bytes());
        let ty = match fmt {
            QFormat::Q8_0 => GgmlType::Q8_0,
            QFormat::Q4_1 => GgmlType::Q4_1,
        };
        let mut y = vec![0f32; x.len()];
        dequantize(ty, &b, &mut y);
        y
    }

    fn normals(n: usize, scale: f32, seed: u64) -> Vec<f32> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n)
            .map(|_| {
                // Sum of uniforms: bell-shaped, with the occasional larger value.
                (0..4).map(|_| rng.random_range(-1.0f32..1.0)).sum::<f32>() * scale
            })
            .collect()
    }

    #[test]
    fn q8_0_round_trip_error_is_within_half_a_step() {
        let x = normals(32 * 300, 0.05, 1);
        let y = roundtrip(QFormat::Q8_0, &x);
        for (bx, by) in x.chunks(32).zip(y.chunks(32)) {
            let d = bx.iter().fold(0f32, |a, v| a.max(v.abs())) / 127.0;
            for (a, b) in bx.iter().zip(by) {
                // Half a step, plus the f16 rounding of d times |q| <= 127 (2^-11 relative).
                assert!(
                    (a - b).abs() <= 0.5 * d + 127.0 * d / 2048.0 + 1e-12,
                    "{a} vs {b} (d {d})"
                );
            }
        }
        let rms = (x.iter().zip(&y).map(|(a, b)| (a - b).powi(2)).sum::<f32>() / x.len() as f32).sqrt();
        let scale = (x.iter().map(|a| a * a).sum::<f32>() / x.len() as f32).sqrt();
        assert!(rms < scale / 50.0 && rms > 0.0, "rms error {rms} of {scale}");
    }

    #[test]
    fn q4_1_round_trip_error_is_within_half_a_step() {
        let x = normals(32 * 300, 0.05, 2);
        let y = roundtrip(QFormat::Q4_1, &x);
        for (bx, by) in x.chunks(32).zip(y.chunks(32)) {
            let min = bx.iter().fold(f32::MAX, |a, &v| a.min(v));
            let max = bx.iter().fold(-f32::MAX, |a, &v| a.max(v));
            let d = (max - min) / 15.0;
            for (a, b) in bx.iter().zip(by) {
                // Half a step, plus the f16 rounding of d (times q <= 15) and of the minimum.
                let bound = 0.5 * d + 15.0 * d / 2048.0 + min.abs() / 2048.0 + 1e-12;
                assert!((a - b).abs() <= bound, "{a} vs {b} (d {d}, min {min})");
            }
        }
        let rms = (x.iter().zip(&y).map(|(a, b)| (a - b).powi(2)).sum::<f32>() / x.len() as f32).sqrt();
        let scale = (x.iter().map(|a| a * a).sum::<f32>() / x.len() as f32).sqrt();
        assert!(rms < scale / 5.0 && rms > scale / 200.0, "rms error {rms} of {scale}");
    }

    #[test]
    fn quantized_blocks_by_hand() {
        // Q8_0 with amax 127: d = 1, halves round away from zero (2.5 -> 3, -2.5 -> -3).
        let mut x = [0f32; 32];
        x[0] = 127.0;
        x[1] = 2.5;
        x[2] = -2.5;
        x[3] = 1.5;
        x[4] = -0.4;
        let b = quantize_q8_0(&x);
        assert_eq!(f16::from_le_bytes([b[0], b[1]]).to_f32(), 1.0);
        assert_eq!(
            &b[2..7].iter().map(|&q| q as i8).collect::<Vec<_>>(),
            &[127, 3, -3, 2, 0]
        );
        // All zeros: d = 0, q = 0.
        assert!(quantize_q8_0(&[0.0; 32]).iter().all(|&v| v == 0));
        // Q4_1 nibbles: low nibble of byte j is value j, high nibble value j + 16.
        let x: Vec<f32> = (0..32)
            .map(|j| if j < 16 { j as f32 } else { (31 - j) as f32 })
            .collect();
        let b = quantize_q4_1(&x);
        assert_eq!(f16::from_le_bytes([b[0], b[1]]).to_f32(), 1.0);
        assert_eq!(f16::from_le_bytes([b[2], b[3]]).to_f32(), 0.0);
        for j in 0..16 {
            assert_eq!(b[4 + j], j as u8 | ((15 - j as u8) << 4));
        }
        // A constant block: d = 0, every value is the minimum.
        let b = quantize_q4_1(&[-3.0; 32]);
        assert_eq!(f16::from_le_bytes([b[0], b[1]]).to_f32(), 0.0);
        assert_eq!(f16::from_le_bytes([b[2], b[3]]).to_f32(), -3.0);
        assert!(b[4..].iter().all(|&v| v == 0));
    }

    #[test]
    fn non_finite_scales_are_found() {
        let x = normals(32 * 1200, 1.0, 3);
        for fmt in [QFormat::Q8_0, QFormat::Q4_1] {
            let mut b = quantize(fmt, &x);
            assert_eq!(first_non_finite_block(fmt, &b), None);
            let bb = fmt.block_bytes();
            // The last field checked: Q4_1's minimum, Q8_0's scale; in a block of a later task.
            let off = 1100 * bb + if fmt == QFormat::Q4_1 { 2 } else { 0 };
            b[off..off + 2].copy_from_slice(&f16::INFINITY.to_le_bytes());
            b[1150 * bb..1150 * bb + 2].copy_from_slice(&f16::NAN.to_le_bytes());
            let (i, v) = first_non_finite_block(fmt, &b).unwrap();
            assert_eq!((i, v), (1100, f32::INFINITY), "{fmt:?}");
        }
    }

    #[test]
    #[should_panic(expected = "whole blocks")]
    fn partial_blocks_are_a_caller_bug() {
        quantize_q8_0(&[1.0; 40]);
    }
}
