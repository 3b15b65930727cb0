//! Throughput of `matmul_nt` at SmolLM2's shapes (a quick measurement tool; `rrt bench` is the
//! product's benchmark).
use rrt_kernels::{MatmulMode, matmul_nt};
use std::time::Instant;
fn main() {
    for &(k, m) in &[(576usize, 960usize), (576, 3072), (1536, 576), (576, 49152)] {
        let w: Vec<f32> = (0..k * m).map(|i| ((i * 7) % 13) as f32 * 0.01).collect();
        for &n in &[1usize, 8, 32, 128] {
            let x: Vec<f32> = (0..n * k).map(|i| ((i * 3) % 11) as f32 * 0.01).collect();
            let mut y = vec![0f32; n * m];
            matmul_nt(&x, &w, &mut y, n, k, m, MatmulMode::Overwrite);
            let reps = (2_000_000_000 / (2 * n * k * m)).clamp(3, 2000);
            let t = Instant::now();
            for _ in 0..reps {
                matmul_nt(&x, &w, &mut y, n, k, m, MatmulMode::Overwrite);
            }
            let s = t.elapsed().as_secs_f64() / reps as f64;
            println!(
                "k={k:5} m={m:6} n={n:4}: {:8.3} ms  {:6.1} GFLOP/s  {:6.1} GB/s(w)",
                s * 1e3,
                2.0 * (n * k * m) as f64 / s / 1e9,
                (k * m * 4) as f64 / s / 1e9
            );
        }
    }
}
