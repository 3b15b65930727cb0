//! The fused CPU LoRA product (`rrt_kernels::lora`) against the separate path: the same block
//! sums added in another order (the expand in the shared product's tiles), so within 1e-5
//! relative with `Overwrite` and `Accumulate`. Its own test binary: it sets the process-wide
//! int8 product mode.

use rand::{Rng, SeedableRng};
use rrt_kernels::backend::{LoraColumns, LoraMats, RowGroup, lora_groups};
use rrt_kernels::lora::linear_lora;
use rrt_kernels::qmatmul::QFormat;
use rrt_kernels::{CpuMatrix, CpuProducts, MatmulMode, MatrixData, set_cpu_products};

fn q8(rows: usize, cols: usize, v: &[f32]) -> CpuMatrix {
    // Q8_0 blocks by the activation quantizer's rule (|q| <= 127, d = amax / 127) with
    // the scale rounded to f16: a valid block matrix for the kernels.
    let mut bytes = Vec::with_capacity(rows * cols / 32 * 34);
    for b in v.chunks_exact(32) {
        let amax = b.iter().fold(0f32, |a, x| a.max(x.abs()));
        let d = half::f16::from_f32(amax / 127.0);
        let id = if d.to_f32() != 0.0 { 1.0 / d.to_f32() } else { 0.0 };
        bytes.extend_from_slice(&d.to_le_bytes());
        bytes.extend(b.iter().map(|x| (x * id).round().clamp(-127.0, 127.0) as i8 as u8));
    }
    CpuMatrix::new(rows, cols, MatrixData::Quant(QFormat::Q8_0, bytes))
}

fn f32m(rows: usize, cols: usize, v: Vec<f32>) -> CpuMatrix {
    CpuMatrix::new(rows, cols, MatrixData::F32(v))
}

/// The separate path: shared product, bias, then [`lora_groups`].
#[allow(clippy::too_many_arguments)]
fn separate(
    x: &[f32],
    n: usize,
    w: &CpuMatrix,
    bias: &[f32],
    cols: &[LoraColumns<'_, CpuMatrix>],
    groups: &[RowGroup],
    y: &mut [f32],
    mode: MatmulMode,
) {
    let (k, m) = (w.in_dim, w.out_dim);
    w.matmul(x, y, n, mode);
    for row in y.chunks_exact_mut(m) {
        row.iter_mut().zip(bias).for_each(|(v, b)| *v += b);
    }
    lora_groups(x, n, k, m, cols, groups, y);
}

#[test]
fn fused_equals_separate_path() {
    set_cpu_products(CpuProducts::Int8);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(21);
    let mut rnd = |len: usize, s: f32| -> Vec<f32> { (0..len).map(|_| rng.random_range(-s..s)).collect() };
    // A q|k|v-like product: 3 entries on 576 + 64 + 64 columns, three depths (one without
    // adapters), ranks 64 / 32 (Q8_0) and 8 (f32, not whole blocks).
    let (k, outs) = (96usize, [160usize, 64, 64]);
    let m: usize = outs.iter().sum();
    for (rank, quant_w) in [(64usize, true), (32, false), (8, true)] {
        let wv = rnd(m * k, 0.1);
        let w = if quant_w { q8(m, k, &wv) } else { f32m(m, k, wv) };
        let bias = rnd(m, 0.1);
        let per: Vec<Vec<Option<LoraMats<CpuMatrix>>>> = outs
            .iter()
            .map(|&o| {
                (0..3)
                    .map(|d| {
                        (d != 1).then(|| {
                            let (a, b) = (rnd(rank * k, 0.2), rnd(o * rank, 0.2));
                            if rank % 32 == 0 {
                                LoraMats {
                                    rank,
                                    a: q8(rank, k, &a),
                                    b: q8(o, rank, &b),
                                }
                            } else {
                                LoraMats {
                                    rank,
                                    a: f32m(rank, k, a),
                                    b: f32m(o, rank, b),
                                }
                            }
                        })
                    })
                    .collect()
            })
            .collect();
        let mut col0 = 0;
        let cols: Vec<LoraColumns<'_, CpuMatrix>> = per
            .iter()
            .zip(outs)
            .map(|(p, o)| {
                let c = LoraColumns { col0, per_adapter: p };
                col0 += o;
                c
            })
            .collect();
        for n in [1usize, 3, 8, 33, 70] {
            let x = rnd(n * k, 1.0);
            let cut = [0, n / 3, n / 2, n];
            let groups: Vec<RowGroup> = (0..3)
                .map(|d| RowGroup {
                    start: cut[d],
                    len: cut[d + 1] - cut[d],
                    adapter: d,
                })
                .collect();
            for mode in [MatmulMode::Overwrite, MatmulMode::Accumulate] {
                let y0 = rnd(n * m, 1.0);
                let (mut a, mut b) = (y0.clone(), y0.clone());
                linear_lora(&x, n, &w, Some(&bias), &cols, &groups, &mut a, mode);
                separate(&x, n, &w, &bias, &cols, &groups, &mut b, mode);
                for (i, (p, q)) in a.iter().zip(&b).enumerate() {
                    assert!(
                        (p - q).abs() <= 1e-5 * (1.0 + q.abs()),
                        "rank {rank} n {n} {mode:?} value {i}: {p} vs {q}"
                    );
                }
            }
        }
    }
    set_cpu_products(CpuProducts::Exact);
}
