//! Matrix products `y = x W^T` for linear layers, through the `gemm` crate.
//!
//! `x` is `n x k` (one row per token), `W` is `m x k` (the `out x in` layout of a linear map),
//! `y` is `n x m`. `gemm` picks AVX-512 or AVX2 micro-kernels at run time and parallelises over
//! rayon's pool when the product is large enough to pay for it.

use gemm::Parallelism;

/// Whether the product overwrites `y` or is added to it (used to fuse the residual add).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatmulMode {
    /// `y = x W^T`
    Overwrite,
    /// `y += x W^T`
    Accumulate,
}

/// Below this many multiply-adds a product runs on the calling thread.
const PARALLEL_THRESHOLD: usize = 1 << 16;

/// `y (n x m) = x (n x k) * w^T` where `w` is `m x k` row-major; see [`MatmulMode`].
pub fn matmul_nt(x: &[f32], w: &[f32], y: &mut [f32], n: usize, k: usize, m: usize, mode: MatmulMode) {
    assert_eq!(x.len(), n * k, "matmul_nt: x is not n x k");
    assert_eq!(w.len(), m * k, "matmul_nt: w is not m x k");
    assert_eq!(y.len(), n * m, "matmul_nt: y is not n x m");
    if n == 0 || m == 0 {
        return;
    }
    if k == 0 {
        if mode == MatmulMode::Overwrite {
            y.fill(0.0);
        }
        return;
    }
    // Always the skinny kernel: it reads W unpacked and computes every output element with
    // the same accumulation order whatever n is, so a row's result never depends on which
    // rows share its batch (the engine's determinism rests on this; ARCHITECTURE.md).
    crate::skinny::matmul_skinny(x, w, y, n, k, m, mode == MatmulMode::Accumulate);
}

/// [`matmul_nt`] always through the `gemm` crate (packed GEMM), whatever the row count.
pub fn matmul_gemm(x: &[f32], w: &[f32], y: &mut [f32], n: usize, k: usize, m: usize, mode: MatmulMode) {
    assert_eq!(x.len(), n * k, "matmul_gemm: x is not n x k");
    assert_eq!(w.len(), m * k, "matmul_gemm: w is not m x k");
    assert_eq!(y.len(), n * m, "matmul_gemm: y is not n x m");
    if n == 0 || m == 0 || k == 0 {
        if mode == MatmulMode::Overwrite {
            y.fill(0.0);
        }
        return;
    }
    let par = if n * m * k >= PARALLEL_THRESHOLD {
        Parallelism::Rayon(rayon::current_num_threads())
    } else {
        Parallelism::None
    };
    let read_dst = mode == MatmulMode::Accumulate;
    // SAFETY: the three buffers have exactly the sizes checked above, the strides describe
    // row-major `x` (n x k), `w^T` viewed as k x m (element (p, j) at w[j * k + p]) and row-major
    // `y` (n x m); `y` does not alias `x` or `w` because it is a unique `&mut` borrow.
    unsafe {
        gemm::gemm(
            n,
            m,
            k,
            y.as_mut_ptr(),
            1,
            m as isize,
            read_dst,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn reference(x: &[f32], w: &[f32], n: usize, k: usize, m: usize) -> Vec<f64> {
        let mut y = vec![0f64; n * m];
        for i in 0..n {
            for j in 0..m {
                y[i * m + j] = (0..k).map(|p| x[i * k + p] as f64 * w[j * k + p] as f64).sum();
            }
        }
        y
    }

    #[test]
    fn matches_f64_reference_in_both_modes() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for (n, k, m) in [
            (1, 1, 1),
            (1, 576, 192),
            (3, 64, 70),
            (17, 576, 1536),
            (64, 130, 33),
            (100, 576, 200),
        ] {
            let x: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0..1.0)).collect();
            let w: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
            let want = reference(&x, &w, n, k, m);
            let mut y = vec![f32::NAN; n * m];
            matmul_nt(&x, &w, &mut y, n, k, m, MatmulMode::Overwrite);
            for (g, r) in y.iter().zip(&want) {
                assert!(
                    (*g as f64 - r).abs() < 1e-4 * (k as f64).sqrt(),
                    "{n}x{k}x{m}: {g} vs {r}"
                );
            }
            let mut acc = vec![1.0f32; n * m];
            matmul_nt(&x, &w, &mut acc, n, k, m, MatmulMode::Accumulate);
            for (g, r) in acc.iter().zip(&want) {
                assert!((*g as f64 - (r + 1.0)).abs() < 1e-4 * (k as f64).sqrt());
            }
        }
    }
}
