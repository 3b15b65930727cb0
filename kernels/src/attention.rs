//! Causal grouped-query attention over a paged KV cache.
//!
//! The cache is one flat pool of fixed-size blocks, of `f32` or `f16` values ([`KvValue`]:
//! f16 halves the bytes every attention call reads, as llama.cpp's default cache type does;
//! values are widened to f32 exactly on load, and all arithmetic stays f32). A block holds `block_size`
//! consecutive positions of one sequence for *every* layer of the (unrolled) model, keys and
//! values separately: `[layer][k|v][slot][kv_heads * head_dim]`. A sequence owns a block table
//! (block ids in position order), so position `p` lives in block `table[p / block_size]`,
//! slot `p % block_size`.

use crate::elementwise::{axpy, dot, softmax_inplace};
use half::f16;
use rayon::prelude::*;

/// The value type a CPU KV pool stores (`node.kv_dtype`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvDtype {
    /// Exact: what the layer computed (the default, and the reference).
    #[default]
    F32,
    /// Half the bytes per position (more sequences per byte, half the bytes attention reads);
    /// values rounded to f16 once when written.
    F16,
}

impl std::str::FromStr for KvDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(Self::F32),
            "f16" => Ok(Self::F16),
            other => Err(format!("`{other}` is not a KV cache type (f32, f16)")),
        }
    }
}

impl std::fmt::Display for KvDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
        })
    }
}

static KV_DTYPE: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Sets the value type of the CPU KV pools this process creates from now on (a process-wide
/// setting like [`crate::set_cpu_products`]; pools already made keep theirs). The library
/// default is [`KvDtype::F32`].
pub fn set_cpu_kv_dtype(d: KvDtype) {
    KV_DTYPE.store(d as u8, std::sync::atomic::Ordering::Relaxed);
}

/// The current process-wide [`KvDtype`] for new CPU KV pools.
pub fn cpu_kv_dtype() -> KvDtype {
    match KV_DTYPE.load(std::sync::atomic::Ordering::Relaxed) {
        1 => KvDtype::F16,
        _ => KvDtype::F32,
    }
}

/// A value type of the KV pool.
pub trait KvValue: Copy + Send + Sync + 'static {
    fn from_f32(v: f32) -> Self;
    /// `s` as f32: itself for f32, widened into `buf` (exactly) for f16.
    fn as_f32<'a>(s: &'a [Self], buf: &'a mut [f32]) -> &'a [f32];
    /// 16 values from `p`, widened to f32.
    ///
    /// # Safety
    /// AVX-512F is enabled and `p` points to 16 readable values.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
}

impl KvValue for f32 {
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }

    #[inline(always)]
    fn as_f32<'a>(s: &'a [f32], _buf: &'a mut [f32]) -> &'a [f32] {
        s
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const f32) -> std::arch::x86_64::__m512 {
        // SAFETY: the caller's contract.
        unsafe { std::arch::x86_64::_mm512_loadu_ps(p) }
    }
}

impl KvValue for f16 {
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }

    #[inline(always)]
    fn as_f32<'a>(s: &'a [f16], buf: &'a mut [f32]) -> &'a [f32] {
        let buf = &mut buf[..s.len()];
        for (b, v) in buf.iter_mut().zip(s) {
            *b = v.to_f32();
        }
        buf
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const f16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's contract (f16 is 16 bits, `repr(transparent)`).
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)) }
    }
}

/// Geometry of the paged KV pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvLayout {
    /// Layers that keep keys/values (unrolled layers for a recursive model).
    pub n_layers: usize,
    /// Positions per block.
    pub block_size: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl KvLayout {
    /// Floats of one position of one layer, keys or values.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Floats in one block.
    pub fn block_floats(&self) -> usize {
        self.n_layers * 2 * self.block_size * self.kv_dim()
    }

    /// Offset in the pool of the key (`kind = 0`) or value (`kind = 1`) vector of
    /// `(block, layer, slot)`.
    #[inline]
    pub fn offset(&self, block: u32, layer: usize, kind: usize, slot: usize) -> usize {
        (((block as usize * self.n_layers + layer) * 2 + kind) * self.block_size + slot) * self.kv_dim()
    }
}

/// One query row: which sequence's blocks it reads and up to which position.
#[derive(Clone, Copy, Debug)]
pub struct AttnRow<'a> {
    /// The sequence's block table.
    pub blocks: &'a [u32],
    /// The row's own position; it attends to positions `0..=pos` (or the last `window` of them).
    pub pos: usize,
    /// Unrolled layer whose keys and values the row reads.
    pub layer: usize,
}

/// Shape parameters shared by all rows of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub n_heads: usize,
    /// Sliding-window size (Mistral); `None` attends to the whole prefix.
    pub window: Option<usize>,
    /// Usually `1 / sqrt(head_dim)`.
    pub scale: f32,
}

/// Computes `out[row] = softmax(q K^T * scale) V` per head for every row.
///
/// `q` and `out` are `rows.len() x (n_heads * head_dim)`. Rows are independent: each reads the
/// keys and values that are already in `pool` (write the batch's own keys first).
pub fn attention_paged<T: KvValue>(
    q: &[f32],
    rows: &[AttnRow<'_>],
    pool: &[T],
    layout: &KvLayout,
    shape: AttnShape,
    out: &mut [f32],
) {
    let hd = layout.head_dim;
    let group = shape.n_heads / layout.n_kv_heads;
    debug_assert_eq!(q.len(), rows.len() * shape.n_heads * hd);
    debug_assert_eq!(out.len(), q.len());
    // One task per (row, KV head): the `group` query heads that share a KV head are computed
    // together, so each key and value vector is read once for all of them.
    let simd = group_kernel::<T>(group, hd);
    let work = |(idx, o): (usize, &mut [f32])| {
        let (r, kvh) = (idx / layout.n_kv_heads, idx % layout.n_kv_heads);
        let task = GroupTask::new(q, &rows[r], r, kvh, group, layout, shape);
        match simd {
            // SAFETY: `group_kernel` found the instruction set; the kernel checks the slices.
            #[cfg(target_arch = "x86_64")]
            Some(k) => unsafe { k(&task, pool, o) },
            _ => task.run_scalar(pool, o),
        }
    };
    let total_ctx: usize = rows.iter().map(|r| r.pos + 1).sum::<usize>() * shape.n_heads;
    if total_ctx * hd >= 1 << 15 {
        out.par_chunks_mut(group * hd).enumerate().for_each(work);
    } else {
        out.chunks_mut(group * hd).enumerate().for_each(work);
    }
}

/// One (row, KV head) task of [`attention_paged`]: the `group` query heads sharing the KV head.
struct GroupTask<'a> {
    /// `group x head_dim` queries.
    qg: &'a [f32],
    row: &'a AttnRow<'a>,
    kvh: usize,
    group: usize,
    layout: &'a KvLayout,
    /// First attended position.
    start: usize,
    scale: f32,
}

impl<'a> GroupTask<'a> {
    fn new(
        q: &'a [f32],
        row: &'a AttnRow<'a>,
        r: usize,
        kvh: usize,
        group: usize,
        layout: &'a KvLayout,
        shape: AttnShape,
    ) -> Self {
        let hd = layout.head_dim;
        let q0 = (r * shape.n_heads + kvh * group) * hd;
        let start = match shape.window {
            Some(w) if row.pos + 1 > w => row.pos + 1 - w,
            _ => 0,
        };
        GroupTask {
            qg: &q[q0..q0 + group * hd],
            row,
            kvh,
            group,
            layout,
            start,
            scale: shape.scale,
        }
    }

    /// Attended positions.
    fn len(&self) -> usize {
        self.row.pos + 1 - self.start
    }

    /// The key (`kind` 0) or value (1) vector of this KV head at position `p`.
    fn kv<'p, T>(&self, pool: &'p [T], kind: usize, p: usize) -> &'p [T] {
        let l = self.layout;
        let b = self.row.blocks[p / l.block_size];
        let off = l.offset(b, self.row.layer, kind, p % l.block_size) + self.kvh * l.head_dim;
        &pool[off..off + l.head_dim]
    }

    /// The portable version: [`dot`] per (query head, key), softmax, [`axpy`] per (query
    /// head, value).
    fn run_scalar<T: KvValue>(&self, pool: &[T], o: &mut [f32]) {
        let (hd, group, len) = (self.layout.head_dim, self.group, self.len());
        let mut buf = vec![0f32; hd];
        // scores[g * len + i]: query head g of the group, position start + i.
        let mut scores = vec![0f32; group * len];
        for (i, p) in (self.start..=self.row.pos).enumerate() {
            let key = T::as_f32(self.kv(pool, 0, p), &mut buf);
            for g in 0..group {
                scores[g * len + i] = dot(&self.qg[g * hd..(g + 1) * hd], key) * self.scale;
            }
        }
        for g in 0..group {
            softmax_inplace(&mut scores[g * len..(g + 1) * len]);
        }
        o.fill(0.0);
        for (i, p) in (self.start..=self.row.pos).enumerate() {
            let val = T::as_f32(self.kv(pool, 1, p), &mut buf);
            for g in 0..group {
                axpy(scores[g * len + i], val, &mut o[g * hd..(g + 1) * hd]);
            }
        }
    }
}

/// A SIMD version of [`GroupTask::run_scalar`] for one (group, head_dim) shape.
type GroupKernel<T> = unsafe fn(&GroupTask<'_>, &[T], &mut [f32]);

/// The AVX-512 kernel for this shape (groups of 1-4 query heads, head_dim 32, 64 or 128), if
/// the CPU has AVX-512F; `None` runs the portable version.
fn group_kernel<T: KvValue>(group: usize, head_dim: usize) -> Option<GroupKernel<T>> {
    #[cfg(target_arch = "x86_64")]
    {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return None;
        }
        macro_rules! pick {
            ($(($g:literal, $v:literal)),*) => {
                match (group, head_dim) {
                    $(($g, hd) if hd == $v * 16 => Some(avx512::group::<T, $g, $v> as GroupKernel<T>),)*
                    _ => None,
                }
            };
        }
        #[rustfmt::skip]
        let k = pick!((1, 2), (1, 4), (1, 8), (2, 2), (2, 4), (2, 8), (3, 2), (3, 4), (3, 8), (4, 2), (4, 4), (4, 8));
        k
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (group, head_dim);
        None
    }
}

/// The AVX-512 kernel: the group's queries and outputs stay in registers (`G` query heads x
/// `V` vectors of 16), each key and value is loaded once. The same operations in the same
/// order as the portable version ([`dot`]'s 16 lanes and its `sum16` reduction, [`axpy`]'s
/// fused multiply-adds in position order), so the same bits (tested).
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::*;
    use std::arch::x86_64::*;

    /// [`crate::elementwise::dot`]'s reduction of its 16 lanes: halves, quarters, then
    /// `(l0 + l2) + (l1 + l3)`; plus its (empty) tail.
    #[inline(always)]
    unsafe fn sum16(acc: __m512) -> f32 {
        // SAFETY (callers): AVX-512F is enabled.
        unsafe {
            let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(acc)));
            let s8 = _mm256_add_ps(_mm512_castps512_ps256(acc), hi);
            let s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps::<1>(s8));
            let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
            (_mm_cvtss_f32(s2) + _mm_cvtss_f32(_mm_shuffle_ps::<1>(s2, s2))) + 0.0
        }
    }

    /// [`sum16`] of 16 vectors at once: lane `j` of the result is `sum16(a[j])`, the same
    /// additions pairing the same lanes (halves, quarters, then `(l0 + l2) + (l1 + l3)`), done
    /// on 16 vectors by shuffling them together level by level (45 shuffles and additions for
    /// 16 sums instead of about 9 dependent operations each).
    #[inline(always)]
    unsafe fn sum16x16(a: &[__m512; 16]) -> __m512 {
        // SAFETY (callers): AVX-512F is enabled.
        unsafe {
            // Lane j + 8 onto lane j: b[i] holds, per 128-bit lane, s8(a[2i]) then s8(a[2i + 1]).
            let b: [__m512; 8] = std::array::from_fn(|i| {
                let (x, y) = (a[2 * i], a[2 * i + 1]);
                _mm512_add_ps(_mm512_shuffle_f32x4::<0x44>(x, y), _mm512_shuffle_f32x4::<0xEE>(x, y))
            });
            // Upper quarter onto the lower: 128-bit lane m of c[i] is s4(a[4i + m]).
            let c: [__m512; 4] = std::array::from_fn(|i| {
                let (x, y) = (b[2 * i], b[2 * i + 1]);
                _mm512_add_ps(_mm512_shuffle_f32x4::<0x88>(x, y), _mm512_shuffle_f32x4::<0xDD>(x, y))
            });
            // (l0 + l2, l1 + l3): lane m of d[i] is s2(a[8i + m]) then s2(a[8i + 4 + m]).
            let d: [__m512; 2] = std::array::from_fn(|i| {
                let (x, y) = (c[2 * i], c[2 * i + 1]);
                _mm512_add_ps(_mm512_shuffle_ps::<0x44>(x, y), _mm512_shuffle_ps::<0xEE>(x, y))
            });
            // The two halves: lane 4m + t of e is the sum of a[4t + m]; plus sum16's empty tail.
            let e = _mm512_add_ps(
                _mm512_shuffle_ps::<0x88>(d[0], d[1]),
                _mm512_shuffle_ps::<0xDD>(d[0], d[1]),
            );
            let e = _mm512_add_ps(e, _mm512_setzero_ps());
            // Lane j from lane 4 (j % 4) + j / 4.
            let idx = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
            _mm512_permutexvar_ps(idx, e)
        }
    }

    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn group<T: KvValue, const G: usize, const V: usize>(
        t: &GroupTask<'_>,
        pool: &[T],
        o: &mut [f32],
    ) {
        let hd = V * 16;
        assert!(
            t.layout.head_dim == hd && t.group == G && t.qg.len() == G * hd && o.len() == G * hd,
            "attention kernel shape"
        );
        let len = t.len();
        // SAFETY (all loads and stores below): every slice is G * hd or hd floats long (asserted
        // above, and `GroupTask::kv` returns hd floats), read in V vectors of 16.
        unsafe {
            let q: [[__m512; V]; G] =
                std::array::from_fn(|g| std::array::from_fn(|v| _mm512_loadu_ps(t.qg.as_ptr().add(g * hd + 16 * v))));
            let mut scores = vec![0f32; G * len];
            // Whole runs of 16 positions: 16 independent dot products per query head, reduced
            // together (`sum16x16`), then one vector of 16 scores.
            let whole = len / 16 * 16;
            let scale = _mm512_set1_ps(t.scale);
            for i0 in (0..whole).step_by(16) {
                let keys: [*const T; 16] = std::array::from_fn(|j| t.kv(pool, 0, t.start + i0 + j).as_ptr());
                for (g, qh) in q.iter().enumerate() {
                    let acc: [__m512; 16] = std::array::from_fn(|j| {
                        let mut a = _mm512_setzero_ps();
                        for (v, qv) in qh.iter().enumerate() {
                            a = _mm512_fmadd_ps(*qv, T::load16(keys[j].add(16 * v)), a);
                        }
                        a
                    });
                    let s = _mm512_mul_ps(sum16x16(&acc), scale);
                    _mm512_storeu_ps(scores.as_mut_ptr().add(g * len + i0), s);
                }
            }
            for (i, p) in (t.start..=t.row.pos).enumerate().skip(whole) {
                let key = t.kv(pool, 0, p);
                let k: [__m512; V] = std::array::from_fn(|v| T::load16(key.as_ptr().add(16 * v)));
                for (g, qh) in q.iter().enumerate() {
                    let mut acc = _mm512_setzero_ps();
                    for v in 0..V {
                        acc = _mm512_fmadd_ps(qh[v], k[v], acc);
                    }
                    scores[g * len + i] = sum16(acc) * t.scale;
                }
            }
            for g in 0..G {
                softmax_inplace(&mut scores[g * len..(g + 1) * len]);
            }
            let mut acc = [[_mm512_setzero_ps(); V]; G];
            for (i, p) in (t.start..=t.row.pos).enumerate() {
                let val = t.kv(pool, 1, p);
                let x: [__m512; V] = std::array::from_fn(|v| T::load16(val.as_ptr().add(16 * v)));
                for (g, ag) in acc.iter_mut().enumerate() {
                    let w = _mm512_set1_ps(scores[g * len + i]);
                    for v in 0..V {
                        ag[v] = _mm512_fmadd_ps(w, x[v], ag[v]);
                    }
                }
            }
            for (g, ag) in acc.iter().enumerate() {
                for (v, a) in ag.iter().enumerate() {
                    _mm512_storeu_ps(o.as_mut_ptr().add(g * hd + 16 * v), *a);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Dense reference: per head, keys and values of positions 0..=pos given contiguously.
    fn reference(
        q: &[f32],
        keys: &[Vec<f32>],
        vals: &[Vec<f32>],
        n_heads: usize,
        n_kv: usize,
        hd: usize,
        scale: f32,
    ) -> Vec<f64> {
        let mut out = vec![0f64; n_heads * hd];
        for h in 0..n_heads {
            let g = h / (n_heads / n_kv);
            let s: Vec<f64> = keys
                .iter()
                .map(|k| {
                    (0..hd)
                        .map(|i| q[h * hd + i] as f64 * k[g * hd + i] as f64)
                        .sum::<f64>()
                        * scale as f64
                })
                .collect();
            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = s.iter().map(|v| (v - m).exp()).sum();
            for (p, v) in vals.iter().enumerate() {
                let w = (s[p] - m).exp() / z;
                for i in 0..hd {
                    out[h * hd + i] += w * v[g * hd + i] as f64;
                }
            }
        }
        out
    }

    /// An f16 cache gives exactly what an f32 cache holding the same (f16-rounded) values
    /// gives, through the AVX-512 kernel and the portable version alike: values are widened
    /// exactly and every operation after that is the f32 one.
    #[test]
    fn an_f16_cache_equals_an_f32_cache_of_its_values() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        for (group, hd) in [(3, 64), (1, 128), (3, 16)] {
            let layout = KvLayout {
                n_layers: 2,
                block_size: 16,
                n_kv_heads: 2,
                head_dim: hd,
            };
            let n_heads = group * 2;
            let pool16: Vec<f16> = (0..4 * layout.block_floats())
                .map(|_| f16::from_f32(rng.random_range(-1.0..1.0)))
                .collect();
            let pool32: Vec<f32> = pool16.iter().map(|v| v.to_f32()).collect();
            let table = [2u32, 0, 3, 1];
            let rows: Vec<AttnRow<'_>> = [0usize, 15, 37, 63]
                .iter()
                .map(|&pos| AttnRow {
                    blocks: &table,
                    pos,
                    layer: 1,
                })
                .collect();
            let q: Vec<f32> = (0..rows.len() * n_heads * hd)
                .map(|_| rng.random_range(-2.0..2.0))
                .collect();
            let shape = AttnShape {
                n_heads,
                window: None,
                scale: 0.125,
            };
            let (mut a, mut b) = (vec![f32::NAN; q.len()], vec![f32::NAN; q.len()]);
            attention_paged(&q, &rows, &pool16, &layout, shape, &mut a);
            attention_paged(&q, &rows, &pool32, &layout, shape, &mut b);
            assert!(
                a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "group {group} head_dim {hd}"
            );
            for kvh in 0..2 {
                let t = GroupTask::new(&q, &rows[3], 3, kvh, group, &layout, shape);
                let mut scalar = vec![f32::NAN; group * hd];
                t.run_scalar(&pool16, &mut scalar);
                let o = (3 * n_heads + kvh * group) * hd;
                assert!(
                    scalar
                        .iter()
                        .zip(&b[o..o + group * hd])
                        .all(|(x, y)| x.to_bits() == y.to_bits()),
                    "portable f16, group {group} head_dim {hd}"
                );
            }
        }
    }

    #[test]
    fn simd_kernel_gives_the_portable_bits() {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            assert!(group_kernel::<f32>(3, 64).is_some(), "SmolLM2's shape has a kernel");
            assert!(group_kernel::<f16>(3, 64).is_some(), "also over an f16 cache");
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
        for (group, hd) in [(3, 64), (1, 128), (2, 32), (4, 64), (3, 16)] {
            let layout = KvLayout {
                n_layers: 2,
                block_size: 16,
                n_kv_heads: 2,
                head_dim: hd,
            };
            let n_heads = group * 2;
            let mut pool: Vec<f32> = (0..4 * layout.block_floats())
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            pool[7] = -0.0;
            let table = [2u32, 0, 3, 1];
            for (pos, window) in [
                (0, None),
                (15, None),
                (37, None),
                (63, Some(5)),
                (20, Some(0)),
                (61, Some(33)),
            ] {
                let row = AttnRow {
                    blocks: &table,
                    pos,
                    layer: 1,
                };
                let q: Vec<f32> = (0..n_heads * hd).map(|_| rng.random_range(-2.0..2.0)).collect();
                let shape = AttnShape {
                    n_heads,
                    window,
                    scale: 0.125,
                };
                for kvh in 0..2 {
                    let t = GroupTask::new(&q, &row, 0, kvh, group, &layout, shape);
                    let mut a = vec![f32::NAN; group * hd];
                    t.run_scalar(&pool, &mut a);
                    let Some(k) = group_kernel::<f32>(group, hd) else {
                        // No AVX-512 here, or a shape without a kernel: nothing to compare.
                        continue;
                    };
                    let mut b = vec![f32::NAN; group * hd];
                    // SAFETY: `group_kernel` found the instruction set.
                    unsafe { k(&t, &pool, &mut b) };
                    assert!(
                        a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                        "group {group} head_dim {hd} pos {pos} window {window:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn paged_attention_matches_dense_reference() {
        let layout = KvLayout {
            n_layers: 2,
            block_size: 4,
            n_kv_heads: 2,
            head_dim: 8,
        };
        let n_heads = 4;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let n_blocks = 5u32;
        let mut pool = vec![0f32; n_blocks as usize * layout.block_floats()];
        // Sequence uses blocks 3, 0, 4 (non-contiguous on purpose), 10 positions, layer 1.
        let table = [3u32, 0, 4];
        let ctx = 10;
        let mut keys = Vec::new();
        let mut vals = Vec::new();
        for p in 0..ctx {
            let k: Vec<f32> = (0..layout.kv_dim()).map(|_| rng.random_range(-1.0..1.0)).collect();
            let v: Vec<f32> = (0..layout.kv_dim()).map(|_| rng.random_range(-1.0..1.0)).collect();
            let b = table[p / 4];
            let ko = layout.offset(b, 1, 0, p % 4);
            pool[ko..ko + layout.kv_dim()].copy_from_slice(&k);
            let vo = layout.offset(b, 1, 1, p % 4);
            pool[vo..vo + layout.kv_dim()].copy_from_slice(&v);
            keys.push(k);
            vals.push(v);
        }
        let q: Vec<f32> = (0..2 * n_heads * 8).map(|_| rng.random_range(-1.0..1.0)).collect();
        let rows = [
            AttnRow {
                blocks: &table,
                pos: 9,
                layer: 1,
            },
            AttnRow {
                blocks: &table,
                pos: 4,
                layer: 1,
            },
        ];
        let mut out = vec![f32::NAN; q.len()];
        let shape = AttnShape {
            n_heads,
            window: None,
            scale: 0.35,
        };
        attention_paged(&q, &rows, &pool, &layout, shape, &mut out);
        let r0 = reference(&q[..32], &keys, &vals, n_heads, 2, 8, 0.35);
        let r1 = reference(&q[32..], &keys[..5], &vals[..5], n_heads, 2, 8, 0.35);
        for (g, w) in out.iter().zip(r0.iter().chain(&r1)) {
            assert!((*g as f64 - w).abs() < 1e-5, "{g} vs {w}");
        }
        // Sliding window of 3 at pos 9 sees positions 7..=9 only.
        let shape = AttnShape {
            n_heads,
            window: Some(3),
            scale: 0.35,
        };
        attention_paged(&q[..32], &rows[..1], &pool, &layout, shape, &mut out[..32]);
        let rw = reference(&q[..32], &keys[7..], &vals[7..], n_heads, 2, 8, 0.35);
        for (g, w) in out[..32].iter().zip(&rw) {
            assert!((*g as f64 - w).abs() < 1e-5);
        }
        // A window of 0 leaves nothing to attend to: the output is 0, not NaN (the CUDA
        // kernel follows the same rule; the GPU check compares them).
        let shape = AttnShape {
            n_heads,
            window: Some(0),
            scale: 0.35,
        };
        out.fill(f32::NAN);
        attention_paged(&q, &rows, &pool, &layout, shape, &mut out);
        assert!(out.iter().all(|&v| v == 0.0), "{out:?}");
    }
}
