//! The compute backend interface of the serving engine, and its CPU implementation.
//!
//! One engine step runs one pass of the shared block over a batch of rows at mixed loop depths.
//! Everything that pass needs is an operation of [`Backend`]: the engine (node crate) drives
//! the step, the backend owns the memory (activations, resident weights, the paged KV cache).
//! [`CpuBackend`] is the embedded default and the oracle of the CUDA backend, which
//! implements the same trait with device buffers.
//!
//! Row metadata (token ids, positions, block tables, loop-depth groups) is passed as host
//! slices, or, inside a pass, prepared once ([`HostRows`] -> [`Backend::prepare_rows`]) and
//! shared by every layer's operations; activations and weights stay in the backend's own
//! types.
//!
//! **Batch invariance:** every CPU operation computes a row's result without looking at the
//! other rows of the batch, in the same arithmetic order whatever the batch size. A request's
//! output therefore never depends on which requests share its steps.

use crate::attention::{AttnRow, AttnShape, KvLayout, attention_paged};
use crate::elementwise::{rmsnorm, silu_mul};
use crate::matmul::{MatmulMode, matmul_nt};
use crate::qdot::{CpuProducts, Packed};
use crate::qmatmul::{QFormat, dequantize_rows};
use crate::rope::RopeTable;
use rayon::prelude::*;
use std::sync::OnceLock;

/// A weight matrix in host memory, `out x in` row-major: f32, or GGML blocks of whole rows
/// dequantized exactly inside the product.
#[derive(Clone, Debug)]
pub enum MatrixData {
    F32(Vec<f32>),
    Quant(QFormat, Vec<u8>),
}

impl MatrixData {
    /// A copy of output rows `rows` of this `_ x in_dim` matrix (a row is whole blocks, so the
    /// quantized bytes are copied as they are: the same values).
    pub fn rows(&self, in_dim: usize, rows: std::ops::Range<usize>) -> MatrixData {
        match self {
            MatrixData::F32(v) => MatrixData::F32(v[rows.start * in_dim..rows.end * in_dim].to_vec()),
            MatrixData::Quant(f, b) => {
                let rb = f.row_bytes(in_dim);
                MatrixData::Quant(*f, b[rows.start * rb..rows.end * rb].to_vec())
            }
        }
    }
}

/// One low-rank adapter of a linear map: `delta(x) = (x A^T) B^T`.
#[derive(Clone, Debug)]
pub struct LoraMats<M> {
    pub rank: usize,
    /// `rank x in`.
    pub a: M,
    /// `out x rank`.
    pub b: M,
}

/// Adapters applied to the columns `col0 .. col0 + out` of a product: `per_adapter[d]` is the
/// adapter of loop depth `d` (`None`: none at that depth).
#[derive(Clone, Copy, Debug)]
pub struct LoraColumns<'a, M> {
    pub col0: usize,
    pub per_adapter: &'a [Option<LoraMats<M>>],
}

/// Rows `start .. start + len` of a batch use adapter `adapter` (their loop depth).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowGroup {
    pub start: usize,
    pub len: usize,
    pub adapter: usize,
}

/// Where one row's key and value go: unrolled layer, block, slot within the block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvSlot {
    pub layer: usize,
    pub block: u32,
    pub slot: usize,
}

/// One row of a pass: its position, loop depth and its sequence's block table.
#[derive(Clone, Copy, Debug)]
pub struct PassRow<'a> {
    pub pos: usize,
    pub depth: usize,
    pub blocks: &'a [u32],
}

/// A pass's rows as every layer of the pass uses them, built once per pass: positions (RoPE),
/// loop-depth groups (LoRA), and each row's sequence block table (KV writes, attention).
/// [`Backend::prepare_rows`] turns it into the backend's own form (one upload on a GPU);
/// the `*_rows` operations then take that instead of host slices per layer.
///
/// Unrolled layer of shared layer `k` for a row at depth `d`: `d * shared + k`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostRows {
    pub positions: Vec<u32>,
    pub depths: Vec<u32>,
    /// Maximal runs of consecutive rows at one depth.
    pub groups: Vec<RowGroup>,
    /// Per row, the offset of its block table in `tables` (tables shared by several rows of a
    /// sequence are stored once) and its length.
    pub table_of: Vec<(u32, u32)>,
    pub tables: Vec<u32>,
    /// K: shared layers per loop.
    pub shared: usize,
    pub block_size: usize,
}

impl HostRows {
    /// `rows` of a pass over a model of `shared` layers per loop, KV blocks of `block_size`.
    pub fn new(rows: &[PassRow<'_>], shared: usize, block_size: usize) -> Self {
        let mut h = HostRows {
            positions: Vec::with_capacity(rows.len()),
            depths: Vec::with_capacity(rows.len()),
            groups: Vec::new(),
            table_of: Vec::with_capacity(rows.len()),
            tables: Vec::new(),
            shared,
            block_size,
        };
        let mut seen: Vec<(usize, usize, u32)> = Vec::new();
        for (i, r) in rows.iter().enumerate() {
            h.positions.push(r.pos as u32);
            h.depths.push(r.depth as u32);
            match h.groups.last_mut() {
                Some(g) if g.adapter == r.depth => g.len += 1,
                _ => h.groups.push(RowGroup {
                    start: i,
                    len: 1,
                    adapter: r.depth,
                }),
            }
            let key = (r.blocks.as_ptr() as usize, r.blocks.len());
            let off = match seen.iter().find(|s| (s.0, s.1) == key) {
                Some(s) => s.2,
                None => {
                    let o = h.tables.len() as u32;
                    h.tables.extend_from_slice(r.blocks);
                    seen.push((key.0, key.1, o));
                    o
                }
            };
            h.table_of.push((off, r.blocks.len() as u32));
        }
        h
    }

    pub fn len(&self) -> usize {
        self.positions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }

    /// Row `i`'s block table.
    pub fn blocks(&self, i: usize) -> &[u32] {
        let (o, l) = self.table_of[i];
        &self.tables[o as usize..(o + l) as usize]
    }

    /// The unrolled layer of row `i` at shared layer `k`.
    pub fn layer(&self, i: usize, k: usize) -> usize {
        self.depths[i] as usize * self.shared + k
    }

    /// Where each row's key and value go at shared layer `k`.
    pub fn slots(&self, k: usize) -> Vec<KvSlot> {
        (0..self.len())
            .map(|i| {
                let pos = self.positions[i] as usize;
                KvSlot {
                    layer: self.layer(i, k),
                    block: self.blocks(i)[pos / self.block_size],
                    slot: pos % self.block_size,
                }
            })
            .collect()
    }

    /// The attention rows at shared layer `k`.
    pub fn attn_rows(&self, k: usize) -> Vec<AttnRow<'_>> {
        (0..self.len())
            .map(|i| AttnRow {
                blocks: self.blocks(i),
                pos: self.positions[i] as usize,
                layer: self.layer(i, k),
            })
            .collect()
    }
}

impl AsRef<HostRows> for HostRows {
    fn as_ref(&self) -> &HostRows {
        self
    }
}

/// One row of LM-head logits reduced to what greedy decoding, its log-probability and the
/// max-prob / margin exit tests need (so the logits need not leave a GPU).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HeadTop {
    /// The argmax (lowest id among equal maxima).
    pub id: u32,
    /// The largest and second-largest logits.
    pub top: f32,
    pub second: f32,
    /// `sum_i exp(logit_i - top)`, accumulated in f64.
    pub sum_exp: f64,
}

impl HeadTop {
    /// From one row of host logits: the argmax as `rrt_model::sampling::argmax` picks it
    /// (`rrt_model::exit::prob_scores` is this reduction).
    pub fn from_logits(row: &[f32]) -> Self {
        let mut id = 0usize;
        let (mut a, mut b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
        for (i, &v) in row.iter().enumerate() {
            if v > a {
                b = a;
                a = v;
                id = i;
            } else if v > b {
                b = v;
            }
        }
        // NaN counts as -inf everywhere (argmax, top two, the sum), as on the GPU.
        let sum_exp = crate::elementwise::sum_exp(row, a, true);
        Self {
            id: id as u32,
            top: a,
            second: b,
            sum_exp,
        }
    }

    /// Softmax probability of the argmax; NaN when the row has no finite maximum (all NaN,
    /// or an infinity), so no exit threshold is ever met by a broken row.
    pub fn max_prob(&self) -> f32 {
        if self.top.is_finite() && self.sum_exp.is_finite() && self.sum_exp >= 1.0 {
            (1.0 / self.sum_exp) as f32
        } else {
            f32::NAN
        }
    }

    /// Top-1 minus top-2 probability (NaN as [`HeadTop::max_prob`]).
    pub fn margin(&self) -> f32 {
        self.max_prob() - (((self.second - self.top) as f64).exp() / self.sum_exp) as f32
    }

    /// Log-probability of the argmax.
    pub fn logprob(&self) -> f32 {
        -(self.sum_exp.ln() as f32)
    }
}

/// Why a backend operation failed: device memory that could not be allocated, or a launch or
/// copy the device refused. The CPU backend never fails (its sizes are validated by the
/// caller); a GPU backend returns these instead of panicking, so an engine can fail the step,
/// end its requests with an error and report the node unhealthy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackendError {
    /// Device memory for `what` could not be allocated (or uploaded into).
    Alloc { what: String, detail: String },
    /// Operation `op` failed on the device (a launch, a copy, an asynchronous fault).
    Device { op: &'static str, detail: String },
    /// A shape or parameter this backend does not support.
    Unsupported(String),
}

impl std::fmt::Display for BackendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BackendError::Alloc { what, detail } => write!(f, "cannot allocate {what}: {detail}"),
            BackendError::Device { op, detail } => write!(f, "{op} failed on the device: {detail}"),
            BackendError::Unsupported(m) => write!(f, "unsupported by the backend: {m}"),
        }
    }
}

impl std::error::Error for BackendError {}

/// The operations of one engine step. All sizes are validated by the caller (the engine
/// builds them from a model whose shapes were checked at load time). Every operation that
/// allocates or runs on a device returns `Result` ([`BackendError`]).
pub trait Backend: Send + Sync + 'static {
    /// Activations (`rows x width`, row-major f32).
    type Buf: Send;
    /// A resident weight matrix (with its `out x in` shape).
    type Mat: Send + Sync;
    /// The paged KV cache storage.
    type Kv: Send;
    /// A pass's rows prepared for this backend ([`Backend::prepare_rows`]).
    type Rows: Send + Sync + AsRef<HostRows>;

    fn name(&self) -> &'static str;

    /// Runs one pass's operations (`f`) from the thread that issues them most cheaply. A
    /// device backend issues from the caller's thread (the default); the CPU backend from a
    /// worker of its thread pool ([`crate::on_compute_pool`]), so that its parallel regions do
    /// not each pay a hand-off between threads.
    fn issue<R: Send>(f: impl FnOnce() -> R + Send) -> R {
        f()
    }

    /// The block format this backend wants LoRA matrices in, or `None` to keep them f32. The
    /// loader quantizes each LoRA matrix whose input width is whole blocks to it.
    fn lora_format(&self) -> Option<QFormat> {
        None
    }

    /// Makes a host matrix resident.
    fn matrix(&self, out_dim: usize, in_dim: usize, data: MatrixData) -> Result<Self::Mat, BackendError>;
    /// A resident vector or activation buffer with these values.
    fn buffer(&self, values: Vec<f32>) -> Result<Self::Buf, BackendError>;
    /// A zeroed buffer of `len` floats.
    fn zeros(&self, len: usize) -> Result<Self::Buf, BackendError>;
    /// Copies the whole buffer to the host.
    fn to_host(&self, buf: &Self::Buf) -> Result<Vec<f32>, BackendError>;
    /// A KV pool of `n_blocks` blocks of `layout`.
    fn kv_pool(&self, layout: KvLayout, n_blocks: usize) -> Result<Self::Kv, BackendError>;
    /// Bytes of one stored key or value element in the pools this backend makes now (what
    /// a KV byte budget is divided by).
    fn kv_value_bytes(&self) -> usize {
        4
    }
    /// Bytes of resident memory one matrix takes.
    fn matrix_bytes(&self, m: &Self::Mat) -> usize;

    /// `out[i] = table[tokens[i]]` (rows of an embedding matrix `vocab x width`).
    fn embed(&self, table: &Self::Mat, tokens: &[u32], out: &mut Self::Buf) -> Result<(), BackendError>;
    /// `dst[dst_row0 + i] = src[src_rows[i]]` for rows of `width` floats.
    fn copy_rows(
        &self,
        src: &Self::Buf,
        src_rows: &[u32],
        dst: &mut Self::Buf,
        dst_row0: usize,
        width: usize,
    ) -> Result<(), BackendError>;
    /// Row-wise RMSNorm of `x` (`n x w.len()`) scaled by `w`.
    fn rmsnorm(&self, x: &Self::Buf, w: &Self::Buf, eps: f32, out: &mut Self::Buf) -> Result<(), BackendError>;
    /// The fused shared + per-depth LoRA product over `n` rows of `x`:
    /// `y (+)= x W^T + bias`, then for every group `g` and every entry of `loras`,
    /// `y[g rows, col0..] += (x_g A_{g.adapter}^T) B_{g.adapter}^T`. The shared product
    /// runs once over all rows.
    #[allow(clippy::too_many_arguments)]
    fn linear_lora(
        &self,
        x: &Self::Buf,
        n: usize,
        w: &Self::Mat,
        bias: Option<&Self::Buf>,
        loras: &[LoraColumns<'_, Self::Mat>],
        groups: &[RowGroup],
        y: &mut Self::Buf,
        mode: MatmulMode,
    ) -> Result<(), BackendError>;
    /// Rotates the query heads (`q_cols` floats from column 0) and key heads (`k_cols` floats
    /// from column `k_col0`) of every row of `qkv` (row stride `ld`) at `positions[i]`.
    #[allow(clippy::too_many_arguments)]
    fn rope(
        &self,
        rope: &RopeTable,
        qkv: &mut Self::Buf,
        ld: usize,
        positions: &[u32],
        q_cols: usize,
        k_col0: usize,
        k_cols: usize,
    ) -> Result<(), BackendError>;
    /// Writes row `i`'s key (`kv_dim` floats at column `k_col0`) and value (at `v_col0`) of
    /// `src` (row stride `ld`) into `slots[i]`.
    #[allow(clippy::too_many_arguments)]
    fn kv_write(
        &self,
        kv: &mut Self::Kv,
        layout: &KvLayout,
        src: &Self::Buf,
        ld: usize,
        k_col0: usize,
        v_col0: usize,
        slots: &[KvSlot],
    ) -> Result<(), BackendError>;
    /// The keys/values of `positions` positions held in `blocks` (in order) on the host,
    /// position-major: for each position, for each layer, the key then the value vector
    /// (what moves a sequence to another node, whatever its block size).
    fn kv_export(
        &self,
        kv: &Self::Kv,
        layout: &KvLayout,
        blocks: &[u32],
        positions: usize,
    ) -> Result<Vec<f32>, BackendError>;
    /// The inverse of [`Backend::kv_export`]: writes `data` into `blocks`.
    fn kv_import(&self, kv: &mut Self::Kv, layout: &KvLayout, blocks: &[u32], data: &[f32])
    -> Result<(), BackendError>;
    /// Causal attention of each row's query (the first `n_heads * head_dim` columns of `qkv`,
    /// row stride `ld`) over its sequence's cached keys/values; `out` is `rows x q_dim`.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        qkv: &Self::Buf,
        ld: usize,
        rows: &[AttnRow<'_>],
        kv: &Self::Kv,
        layout: &KvLayout,
        shape: AttnShape,
        out: &mut Self::Buf,
    ) -> Result<(), BackendError>;
    /// `out = silu(gate) * up` for `n` rows, each row of `gu` being `gate | up` (`inter` each).
    fn silu_mul(&self, gu: &Self::Buf, n: usize, inter: usize, out: &mut Self::Buf) -> Result<(), BackendError>;
    /// Final norm (when `norm` is given; a model whose loop output is already normed has none
    /// here) and LM head of the rows `select` of `x`: `select.len() x vocab` logits on the
    /// host (sampling and exit tests run there).
    fn logits(
        &self,
        x: &Self::Buf,
        width: usize,
        select: &[u32],
        norm: Option<&Self::Buf>,
        eps: f32,
        head: &Self::Mat,
    ) -> Result<Vec<f32>, BackendError>;
    /// `x[i] += rmsnorm(t[i]) * w` for every row of `t` (`w.len()` wide): a residual branch
    /// normed before it is added (the second norms of sandwich-norm layers).
    fn add_normed_branch(&self, t: &Self::Buf, w: &Self::Buf, eps: f32, x: &mut Self::Buf) -> Result<(), BackendError>;
    /// `x[rows[i]] . w` per row (`width` wide, f64 accumulation): a linear exit gate with one
    /// output, no LM head.
    fn dot_rows(&self, x: &Self::Buf, width: usize, rows: &[u32], w: &Self::Buf) -> Result<Vec<f32>, BackendError>;
    /// Cosine similarity of row `rows[i]` of `a` and of `b` (width `width`), per row: the
    /// hidden-state saturation exit criterion, which needs no LM head.
    fn cosine_rows(&self, a: &Self::Buf, b: &Self::Buf, width: usize, rows: &[u32]) -> Result<Vec<f32>, BackendError>;
    /// Prepares the row sets of one pass (the pass's rows and its KV-fill rows) for the
    /// `*_rows` operations: a backend with its own memory uploads all of them at once.
    fn prepare_rows(&self, sets: Vec<HostRows>) -> Result<Vec<Self::Rows>, BackendError>;

    /// [`Backend::linear_lora`] over the prepared rows (their depth groups pick the LoRAs).
    #[allow(clippy::too_many_arguments)]
    fn linear_lora_rows(
        &self,
        x: &Self::Buf,
        rows: &Self::Rows,
        w: &Self::Mat,
        bias: Option<&Self::Buf>,
        loras: &[LoraColumns<'_, Self::Mat>],
        y: &mut Self::Buf,
        mode: MatmulMode,
    ) -> Result<(), BackendError> {
        let h = rows.as_ref();
        self.linear_lora(x, h.len(), w, bias, loras, &h.groups, y, mode)
    }

    /// [`Backend::rope`] at the prepared rows' positions.
    #[allow(clippy::too_many_arguments)]
    fn rope_rows(
        &self,
        rope: &RopeTable,
        qkv: &mut Self::Buf,
        ld: usize,
        rows: &Self::Rows,
        q_cols: usize,
        k_col0: usize,
        k_cols: usize,
    ) -> Result<(), BackendError> {
        self.rope(rope, qkv, ld, &rows.as_ref().positions, q_cols, k_col0, k_cols)
    }

    /// [`Backend::kv_write`] of the prepared rows at shared layer `k`.
    #[allow(clippy::too_many_arguments)]
    fn kv_write_rows(
        &self,
        kv: &mut Self::Kv,
        layout: &KvLayout,
        src: &Self::Buf,
        ld: usize,
        k_col0: usize,
        v_col0: usize,
        rows: &Self::Rows,
        k: usize,
    ) -> Result<(), BackendError> {
        self.kv_write(kv, layout, src, ld, k_col0, v_col0, &rows.as_ref().slots(k))
    }

    /// [`Backend::attention`] of the prepared rows at shared layer `k`.
    #[allow(clippy::too_many_arguments)]
    fn attention_rows(
        &self,
        qkv: &Self::Buf,
        ld: usize,
        rows: &Self::Rows,
        k: usize,
        kv: &Self::Kv,
        layout: &KvLayout,
        shape: AttnShape,
        out: &mut Self::Buf,
    ) -> Result<(), BackendError> {
        self.attention(qkv, ld, &rows.as_ref().attn_rows(k), kv, layout, shape, out)
    }

    /// Whether the engine should reduce LM-head rows here ([`Backend::head_top`]) when a step
    /// needs no full logits (greedy rows, no penalties, no top logprobs): true where moving
    /// logits to the host costs (a GPU: then only ids and four numbers per row cross).
    fn prefers_head_top(&self) -> bool {
        false
    }

    /// [`Backend::logits`] of the rows `select`, each reduced to a [`HeadTop`]. The default
    /// reduces host logits.
    fn head_top(
        &self,
        x: &Self::Buf,
        width: usize,
        select: &[u32],
        norm: Option<&Self::Buf>,
        eps: f32,
        head: &Self::Mat,
    ) -> Result<Vec<HeadTop>, BackendError> {
        if select.is_empty() {
            return Ok(Vec::new());
        }
        let logits = self.logits(x, width, select, norm, eps, head)?;
        let vocab = logits.len() / select.len();
        Ok(logits.chunks_exact(vocab).map(HeadTop::from_logits).collect())
    }

    /// The first fault the backend hit since it started, if any: an error an operation
    /// returned, or one a device reports later (a GPU runs launches asynchronously, so a
    /// fault can surface after the call that caused it returned `Ok`). The engine checks it
    /// once per step and fails the step rather than emit tokens computed from garbage. The
    /// CPU backend never faults.
    fn fault(&self) -> Option<BackendError> {
        None
    }
}

/// A resident matrix of the CPU backend. Quantized matrices also keep the layout of the int8
/// kernels ([`Packed`], the same number of bytes again), made when the matrix is created under
/// int8 products, or on its first int8 product.
#[derive(Clone, Debug)]
pub struct CpuMatrix {
    pub out_dim: usize,
    pub in_dim: usize,
    pub data: MatrixData,
    packed: OnceLock<Packed>,
}

impl CpuMatrix {
    pub fn new(out_dim: usize, in_dim: usize, data: MatrixData) -> CpuMatrix {
        let m = CpuMatrix {
            out_dim,
            in_dim,
            data,
            packed: OnceLock::new(),
        };
        if crate::qdot::cpu_products() == CpuProducts::Int8 {
            m.packed();
        }
        m
    }

    /// The int8 kernels' layout of a quantized matrix (`None` for f32).
    pub fn packed(&self) -> Option<&Packed> {
        match &self.data {
            MatrixData::F32(_) => None,
            MatrixData::Quant(f, b) => Some(
                self.packed
                    .get_or_init(|| Packed::new(*f, b, self.out_dim, self.in_dim)),
            ),
        }
    }

    /// `y (+)= x W^T` for `n` rows.
    pub fn matmul(&self, x: &[f32], y: &mut [f32], n: usize, mode: MatmulMode) {
        match &self.data {
            MatrixData::F32(v) => matmul_nt(x, v, y, n, self.in_dim, self.out_dim, mode),
            MatrixData::Quant(..) if crate::qdot::cpu_products() == CpuProducts::Int8 => {
                self.packed().expect("quantized").matmul(x, y, n, mode)
            }
            MatrixData::Quant(f, b) => crate::qmatmul::matmul_q(x, *f, b, y, n, self.in_dim, self.out_dim, mode),
        }
    }

    /// Row `r` into `out`.
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        let k = self.in_dim;
        match &self.data {
            MatrixData::F32(v) => out.copy_from_slice(&v[r * k..(r + 1) * k]),
            MatrixData::Quant(f, b) => {
                let rb = f.row_bytes(k);
                dequantize_rows(*f, &b[r * rb..(r + 1) * rb], out);
            }
        }
    }
}

/// The CPU backend: rayon-parallel kernels of this crate on host memory.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuBackend;

/// `y[rows, col0..col0 + out] += (x_rows A^T) B^T` for the `n` rows of `x` (`y` row stride
/// `ld`).
pub fn lora_add(a: &CpuMatrix, b: &CpuMatrix, x: &[f32], n: usize, y: &mut [f32], ld: usize, col0: usize) {
    let rank = a.out_dim;
    let mut t = vec![0f32; n * rank];
    a.matmul(x, &mut t, n, MatmulMode::Overwrite);
    let mut d = vec![0f32; n * b.out_dim];
    b.matmul(&t, &mut d, n, MatmulMode::Overwrite);
    for (i, drow) in d.chunks_exact(b.out_dim).enumerate() {
        let yrow = &mut y[i * ld + col0..i * ld + col0 + b.out_dim];
        yrow.iter_mut().zip(drow).for_each(|(p, q)| *p += q);
    }
}

/// Every (row group, adapter) pair of a product over `n` rows: the group, the adapter's first
/// column and the adapter of the group's depth (groups that are empty or past `n`, and depths
/// without an adapter, have none).
pub(crate) fn lora_pairs<'a>(
    n: usize,
    loras: &[LoraColumns<'a, CpuMatrix>],
    groups: &[RowGroup],
) -> Vec<(RowGroup, usize, &'a LoraMats<CpuMatrix>)> {
    groups
        .iter()
        .filter(|g| g.len > 0 && g.start + g.len <= n)
        .flat_map(|g| {
            loras.iter().filter_map(move |lc| match lc.per_adapter.get(g.adapter) {
                Some(Some(l)) => Some((*g, lc.col0, l)),
                _ => None,
            })
        })
        .collect()
}

/// The LoRA part of [`Backend::linear_lora`] on the CPU: for every row group, every entry's
/// adapter of the group's depth added onto its columns of `y` (`n x m`, inputs `n x k`).
pub fn lora_groups(
    x: &[f32],
    n: usize,
    k: usize,
    m: usize,
    loras: &[LoraColumns<'_, CpuMatrix>],
    groups: &[RowGroup],
    y: &mut [f32],
) {
    // Every (group, entry) pair's delta is computed as its own task: each is a product too
    // small to split (a few rank x width products), so the pairs are what fills the cores.
    let tasks = lora_pairs(n, loras, groups);
    let delta = |&(g, _, l): &(RowGroup, usize, &LoraMats<CpuMatrix>)| -> Vec<f32> {
        let xg = &x[g.start * k..(g.start + g.len) * k];
        let mut t = vec![0f32; g.len * l.rank];
        l.a.matmul(xg, &mut t, g.len, MatmulMode::Overwrite);
        let mut d = vec![0f32; g.len * l.b.out_dim];
        l.b.matmul(&t, &mut d, g.len, MatmulMode::Overwrite);
        d
    };
    // Tasks run in parallel only when their own products are too small to run in parallel
    // inside (`by_column_blocks` splits products of 2^17 multiply-adds and more).
    let work: usize = tasks.iter().map(|(g, _, l)| g.len * l.rank * (k + l.b.out_dim)).sum();
    let largest = tasks
        .iter()
        .map(|(g, _, l)| g.len * l.rank * k.max(l.b.out_dim))
        .max()
        .unwrap_or(0);
    let deltas: Vec<Vec<f32>> = if tasks.len() > 1 && work >= 1 << 16 && largest < 1 << 17 {
        tasks.par_iter().map(delta).collect()
    } else {
        tasks.iter().map(delta).collect()
    };
    for ((g, col0, l), d) in tasks.iter().zip(deltas) {
        let out = l.b.out_dim;
        for (i, drow) in d.chunks_exact(out).enumerate() {
            let row = (g.start + i) * m + col0;
            y[row..row + out].iter_mut().zip(drow).for_each(|(p, q)| *p += q);
        }
    }
}

/// The CPU backend's KV pool: f32 values, or f16 ([`crate::set_cpu_kv_dtype`]).
#[derive(Clone, Debug, PartialEq)]
pub enum CpuKv {
    F32(Vec<f32>),
    F16(Vec<half::f16>),
}

impl CpuKv {
    /// A pool of `n` zeros of type `dtype`.
    pub fn zeros(dtype: crate::KvDtype, n: usize) -> Self {
        match dtype {
            crate::KvDtype::F32 => CpuKv::F32(vec![0f32; n]),
            crate::KvDtype::F16 => CpuKv::F16(vec![half::f16::ZERO; n]),
        }
    }

    /// Writes `v` (f32) at `off`, rounded to the pool's type.
    #[inline]
    fn put(&mut self, off: usize, v: &[f32]) {
        match self {
            CpuKv::F32(p) => p[off..off + v.len()].copy_from_slice(v),
            CpuKv::F16(p) => {
                use half::slice::HalfFloatSliceExt;
                p[off..off + v.len()].convert_from_f32_slice(v)
            }
        }
    }

    /// Appends `len` values from `off` to `out`, as f32.
    #[inline]
    fn get(&self, off: usize, len: usize, out: &mut Vec<f32>) {
        match self {
            CpuKv::F32(p) => out.extend_from_slice(&p[off..off + len]),
            CpuKv::F16(p) => out.extend(p[off..off + len].iter().map(|v| v.to_f32())),
        }
    }
}

impl Backend for CpuBackend {
    type Buf = Vec<f32>;
    type Mat = CpuMatrix;
    type Kv = CpuKv;
    type Rows = HostRows;

    fn prepare_rows(&self, sets: Vec<HostRows>) -> Result<Vec<HostRows>, BackendError> {
        Ok(sets)
    }

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn issue<R: Send>(f: impl FnOnce() -> R + Send) -> R {
        crate::on_compute_pool(f)
    }

    /// With int8 products, LoRAs are Q8_0 blocks multiplied in integers like the shared
    /// weights (3.8x fewer bytes per step than f32); the exact path keeps them f32 (the oracle).
    fn lora_format(&self) -> Option<QFormat> {
        (crate::qdot::cpu_products() == crate::qdot::CpuProducts::Int8).then_some(QFormat::Q8_0)
    }

    fn matrix(&self, out_dim: usize, in_dim: usize, data: MatrixData) -> Result<CpuMatrix, BackendError> {
        Ok(CpuMatrix::new(out_dim, in_dim, data))
    }

    fn buffer(&self, values: Vec<f32>) -> Result<Vec<f32>, BackendError> {
        Ok(values)
    }

    fn zeros(&self, len: usize) -> Result<Vec<f32>, BackendError> {
        Ok(vec![0f32; len])
    }

    fn to_host(&self, buf: &Vec<f32>) -> Result<Vec<f32>, BackendError> {
        Ok(buf.clone())
    }

    fn kv_pool(&self, layout: KvLayout, n_blocks: usize) -> Result<CpuKv, BackendError> {
        Ok(CpuKv::zeros(crate::cpu_kv_dtype(), n_blocks * layout.block_floats()))
    }

    fn kv_value_bytes(&self) -> usize {
        match crate::cpu_kv_dtype() {
            crate::KvDtype::F32 => 4,
            crate::KvDtype::F16 => 2,
        }
    }

    fn matrix_bytes(&self, m: &CpuMatrix) -> usize {
        match &m.data {
            MatrixData::F32(v) => v.len() * 4,
            MatrixData::Quant(_, b) => b.len(),
        }
    }

    fn embed(&self, table: &CpuMatrix, tokens: &[u32], out: &mut Vec<f32>) -> Result<(), BackendError> {
        let w = table.in_dim;
        for (i, &t) in tokens.iter().enumerate() {
            table.row_into(t as usize, &mut out[i * w..(i + 1) * w]);
        }
        Ok(())
    }

    fn copy_rows(
        &self,
        src: &Vec<f32>,
        src_rows: &[u32],
        dst: &mut Vec<f32>,
        dst_row0: usize,
        width: usize,
    ) -> Result<(), BackendError> {
        for (i, &r) in src_rows.iter().enumerate() {
            let r = r as usize;
            let d = (dst_row0 + i) * width;
            dst[d..d + width].copy_from_slice(&src[r * width..(r + 1) * width]);
        }
        Ok(())
    }

    fn rmsnorm(&self, x: &Vec<f32>, w: &Vec<f32>, eps: f32, out: &mut Vec<f32>) -> Result<(), BackendError> {
        rmsnorm(x, w, eps, out);
        Ok(())
    }

    fn linear_lora(
        &self,
        x: &Vec<f32>,
        n: usize,
        w: &CpuMatrix,
        bias: Option<&Vec<f32>>,
        loras: &[LoraColumns<'_, CpuMatrix>],
        groups: &[RowGroup],
        y: &mut Vec<f32>,
        mode: MatmulMode,
    ) -> Result<(), BackendError> {
        if crate::lora::fused_lora_enabled() {
            crate::lora::linear_lora(x, n, w, bias.map(|b| b.as_slice()), loras, groups, y, mode);
            return Ok(());
        }
        let (k, m) = (w.in_dim, w.out_dim);
        w.matmul(&x[..n * k], &mut y[..n * m], n, mode);
        if let Some(b) = bias {
            for row in y[..n * m].chunks_exact_mut(m) {
                row.iter_mut().zip(b).for_each(|(v, bi)| *v += bi);
            }
        }
        lora_groups(x, n, k, m, loras, groups, y);
        Ok(())
    }

    fn rope(
        &self,
        rope: &RopeTable,
        qkv: &mut Vec<f32>,
        ld: usize,
        positions: &[u32],
        q_cols: usize,
        k_col0: usize,
        k_cols: usize,
    ) -> Result<(), BackendError> {
        let half = rope.half();
        qkv[..positions.len() * ld]
            .par_chunks_mut(ld)
            .zip(positions.par_iter())
            .with_min_len(16)
            .for_each(|(row, &p)| {
                let (mut cos, mut sin) = (vec![0f32; half], vec![0f32; half]);
                rope.cos_sin(p as usize, &mut cos, &mut sin);
                rope.apply(&mut row[..q_cols], &cos, &sin);
                rope.apply(&mut row[k_col0..k_col0 + k_cols], &cos, &sin);
            });
        Ok(())
    }

    fn kv_write(
        &self,
        kv: &mut CpuKv,
        layout: &KvLayout,
        src: &Vec<f32>,
        ld: usize,
        k_col0: usize,
        v_col0: usize,
        slots: &[KvSlot],
    ) -> Result<(), BackendError> {
        let kd = layout.kv_dim();
        for (i, s) in slots.iter().enumerate() {
            let row = &src[i * ld..(i + 1) * ld];
            kv.put(layout.offset(s.block, s.layer, 0, s.slot), &row[k_col0..k_col0 + kd]);
            kv.put(layout.offset(s.block, s.layer, 1, s.slot), &row[v_col0..v_col0 + kd]);
        }
        Ok(())
    }

    fn kv_export(
        &self,
        kv: &CpuKv,
        layout: &KvLayout,
        blocks: &[u32],
        positions: usize,
    ) -> Result<Vec<f32>, BackendError> {
        let kd = layout.kv_dim();
        let mut out = Vec::with_capacity(positions * layout.n_layers * 2 * kd);
        for p in 0..positions {
            let (block, slot) = (blocks[p / layout.block_size], p % layout.block_size);
            for l in 0..layout.n_layers {
                for kind in 0..2 {
                    kv.get(layout.offset(block, l, kind, slot), kd, &mut out);
                }
            }
        }
        Ok(out)
    }

    fn kv_import(&self, kv: &mut CpuKv, layout: &KvLayout, blocks: &[u32], data: &[f32]) -> Result<(), BackendError> {
        let kd = layout.kv_dim();
        for (i, v) in data.chunks_exact(kd).enumerate() {
            let kind = i % 2;
            let l = (i / 2) % layout.n_layers;
            let p = i / (2 * layout.n_layers);
            kv.put(
                layout.offset(blocks[p / layout.block_size], l, kind, p % layout.block_size),
                v,
            );
        }
        Ok(())
    }

    fn attention(
        &self,
        qkv: &Vec<f32>,
        ld: usize,
        rows: &[AttnRow<'_>],
        kv: &CpuKv,
        layout: &KvLayout,
        shape: AttnShape,
        out: &mut Vec<f32>,
    ) -> Result<(), BackendError> {
        let qd = shape.n_heads * layout.head_dim;
        let mut q = vec![0f32; rows.len() * qd];
        for (i, qr) in q.chunks_exact_mut(qd).enumerate() {
            qr.copy_from_slice(&qkv[i * ld..i * ld + qd]);
        }
        let out = &mut out[..rows.len() * qd];
        match kv {
            CpuKv::F32(p) => attention_paged(&q, rows, p, layout, shape, out),
            CpuKv::F16(p) => attention_paged(&q, rows, p, layout, shape, out),
        }
        Ok(())
    }

    fn silu_mul(&self, gu: &Vec<f32>, n: usize, inter: usize, out: &mut Vec<f32>) -> Result<(), BackendError> {
        silu_mul(&gu[..n * 2 * inter], inter, &mut out[..n * inter]);
        Ok(())
    }

    fn logits(
        &self,
        x: &Vec<f32>,
        width: usize,
        select: &[u32],
        norm: Option<&Vec<f32>>,
        eps: f32,
        head: &CpuMatrix,
    ) -> Result<Vec<f32>, BackendError> {
        let mut picked = vec![0f32; select.len() * width];
        for (i, &r) in select.iter().enumerate() {
            let r = r as usize;
            picked[i * width..(i + 1) * width].copy_from_slice(&x[r * width..(r + 1) * width]);
        }
        let normed = match norm {
            Some(norm) => {
                let mut normed = vec![0f32; picked.len()];
                rmsnorm(&picked, norm, eps, &mut normed);
                normed
            }
            None => picked,
        };
        let mut out = vec![0f32; select.len() * head.out_dim];
        head.matmul(&normed, &mut out, select.len(), MatmulMode::Overwrite);
        Ok(out)
    }

    fn add_normed_branch(&self, t: &Vec<f32>, w: &Vec<f32>, eps: f32, x: &mut Vec<f32>) -> Result<(), BackendError> {
        let mut normed = vec![0f32; t.len()];
        rmsnorm(t, w, eps, &mut normed);
        x[..t.len()].iter_mut().zip(&normed).for_each(|(a, b)| *a += b);
        Ok(())
    }

    fn dot_rows(&self, x: &Vec<f32>, width: usize, rows: &[u32], w: &Vec<f32>) -> Result<Vec<f32>, BackendError> {
        Ok(rows
            .iter()
            .map(|&r| {
                let r = r as usize;
                dot_f64(&x[r * width..(r + 1) * width], &w[..width]) as f32
            })
            .collect())
    }

    fn cosine_rows(&self, a: &Vec<f32>, b: &Vec<f32>, width: usize, rows: &[u32]) -> Result<Vec<f32>, BackendError> {
        Ok(rows
            .iter()
            .map(|&r| {
                let r = r as usize;
                cosine(&a[r * width..(r + 1) * width], &b[r * width..(r + 1) * width])
            })
            .collect())
    }
}

/// Dot product accumulated in f64.
pub fn dot_f64(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
}

/// Cosine similarity in f64 (0 for a zero vector).
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        ab += (*x as f64) * (*y as f64);
        aa += (*x as f64) * (*x as f64);
        bb += (*y as f64) * (*y as f64);
    }
    (ab / (aa.sqrt() * bb.sqrt()).max(1e-30)) as f32
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn rand_vec(n: usize, rng: &mut impl Rng) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
    }

    /// An f16 pool: written keys/values come back rounded to f16 (export), an import of
    /// those comes back unchanged, and attention over it equals attention over an f32 pool
    /// holding the same rounded values, bit for bit.
    #[test]
    fn an_f16_pool_rounds_once_and_attends_like_f32_of_its_values() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let be = CpuBackend;
        let layout = KvLayout {
            n_layers: 2,
            block_size: 4,
            n_kv_heads: 2,
            head_dim: 16,
        };
        let kd = layout.kv_dim();
        let (n_heads, ld) = (4, 4 * 16 + 2 * kd);
        let blocks = [3u32, 1];
        let positions = 6;
        let mut f16 = CpuKv::zeros(crate::KvDtype::F16, 4 * layout.block_floats());
        let mut f32p = CpuKv::zeros(crate::KvDtype::F32, 4 * layout.block_floats());
        let src = rand_vec(positions * ld, &mut rng);
        for layer in 0..layout.n_layers {
            let slots: Vec<KvSlot> = (0..positions)
                .map(|p| KvSlot {
                    layer,
                    block: blocks[p / 4],
                    slot: p % 4,
                })
                .collect();
            be.kv_write(&mut f16, &layout, &src, ld, 4 * 16, 4 * 16 + kd, &slots)
                .unwrap();
        }
        let out = be.kv_export(&f16, &layout, &blocks, positions).unwrap();
        assert_eq!(out.len(), positions * layout.n_layers * 2 * kd);
        // Position-major export: position 2, layer 1, values = src's value columns, rounded.
        let at = ((2 * layout.n_layers + 1) * 2 + 1) * kd;
        let want: Vec<f32> = src[2 * ld + 4 * 16 + kd..2 * ld + 4 * 16 + 2 * kd]
            .iter()
            .map(|&v| half::f16::from_f32(v).to_f32())
            .collect();
        assert_eq!(&out[at..at + kd], &want[..]);
        be.kv_import(&mut f32p, &layout, &blocks, &out).unwrap();
        let mut again = CpuKv::zeros(crate::KvDtype::F16, 4 * layout.block_floats());
        be.kv_import(&mut again, &layout, &blocks, &out).unwrap();
        assert_eq!(be.kv_export(&again, &layout, &blocks, positions).unwrap(), out);
        let q = rand_vec(3 * ld, &mut rng);
        let rows: Vec<AttnRow<'_>> = (3..6)
            .map(|pos| AttnRow {
                blocks: &blocks,
                pos,
                layer: 1,
            })
            .collect();
        let shape = AttnShape {
            n_heads,
            window: None,
            scale: 0.25,
        };
        let (mut a, mut b) = (vec![0f32; 3 * n_heads * 16], vec![0f32; 3 * n_heads * 16]);
        be.attention(&q, ld, &rows, &f16, &layout, shape, &mut a).unwrap();
        be.attention(&q, ld, &rows, &f32p, &layout, shape, &mut b).unwrap();
        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
        assert!(a.iter().any(|v| *v != 0.0));
    }

    /// The fused product against a float64 reference that applies each row's own adapter
    /// separately, with groups in any order and a depth without adapter.
    #[test]
    fn fused_lora_product_matches_per_row_reference() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let (n, k, m, r) = (11, 40, 24, 5);
        let be = CpuBackend;
        let w = rand_vec(m * k, &mut rng);
        let mat = be.matrix(m, k, MatrixData::F32(w.clone())).unwrap();
        let bias = rand_vec(m, &mut rng);
        // Adapters on columns 8..20 (out 12): depth 0 and 2 have one, depth 1 has none.
        let mk = |rng: &mut rand_chacha::ChaCha8Rng| {
            let a = rand_vec(r * k, rng);
            let b = rand_vec(12 * r, rng);
            (a, b)
        };
        let (a0, b0) = mk(&mut rng);
        let (a2, b2) = mk(&mut rng);
        let per: Vec<Option<LoraMats<CpuMatrix>>> = vec![
            Some(LoraMats {
                rank: r,
                a: be.matrix(r, k, MatrixData::F32(a0.clone())).unwrap(),
                b: be.matrix(12, r, MatrixData::F32(b0.clone())).unwrap(),
            }),
            None,
            Some(LoraMats {
                rank: r,
                a: be.matrix(r, k, MatrixData::F32(a2.clone())).unwrap(),
                b: be.matrix(12, r, MatrixData::F32(b2.clone())).unwrap(),
            }),
        ];
        let x = rand_vec(n * k, &mut rng);
        let groups = [
            RowGroup {
                start: 0,
                len: 3,
                adapter: 2,
            },
            RowGroup {
                start: 3,
                len: 4,
                adapter: 0,
            },
            RowGroup {
                start: 7,
                len: 4,
                adapter: 1,
            },
        ];
        let mut y = vec![0f32; n * m];
        let cols = [LoraColumns {
            col0: 8,
            per_adapter: &per,
        }];
        be.linear_lora(&x, n, &mat, Some(&bias), &cols, &groups, &mut y, MatmulMode::Overwrite)
            .unwrap();
        for i in 0..n {
            let depth = groups
                .iter()
                .find(|g| i >= g.start && i < g.start + g.len)
                .unwrap()
                .adapter;
            let xi = &x[i * k..(i + 1) * k];
            for j in 0..m {
                let mut want: f64 = (0..k).map(|p| xi[p] as f64 * w[j * k + p] as f64).sum::<f64>() + bias[j] as f64;
                let ab = match depth {
                    0 => Some((&a0, &b0)),
                    2 => Some((&a2, &b2)),
                    _ => None,
                };
                if let (Some((a, b)), true) = (ab, (8..20).contains(&j)) {
                    for q in 0..r {
                        let t: f64 = (0..k).map(|p| xi[p] as f64 * a[q * k + p] as f64).sum();
                        want += t * b[(j - 8) * r + q] as f64;
                    }
                }
                assert!(
                    (y[i * m + j] as f64 - want).abs() < 1e-4,
                    "row {i} col {j}: {} vs {want}",
                    y[i * m + j]
                );
            }
        }
    }

    /// NaN logits count as -inf (argmax, top two and the softmax sum: the GPU's rule), and a
    /// row without a finite maximum has no max-prob or margin, so it can never exit.
    #[test]
    fn head_top_over_nan_logits() {
        let t = HeadTop::from_logits(&[1.0, f32::NAN, 3.0, 2.0, f32::NAN]);
        assert_eq!((t.id, t.top, t.second), (2, 3.0, 2.0));
        let want = 1.0 + (-1f64).exp() + (-2f64).exp();
        assert!((t.sum_exp - want).abs() < 1e-12, "{}", t.sum_exp);
        assert!((t.max_prob() - (1.0 / want) as f32).abs() < 1e-7);
        for row in [vec![f32::NAN; 4], vec![f32::NEG_INFINITY; 3], vec![0.0, f32::INFINITY]] {
            let t = HeadTop::from_logits(&row);
            assert!(t.max_prob().is_nan() && t.margin().is_nan(), "{row:?}: {t:?}");
            let passes = t.max_prob() >= 0.5;
            assert!(!passes, "a broken row must not pass a threshold");
        }
        // All NaN: argmax 0 (the lowest index among equal -inf), as argmax_rows on the GPU.
        assert_eq!(HeadTop::from_logits(&[f32::NAN; 4]).id, 0);
    }

    /// A row's product does not depend on the batch around it (bit for bit).
    #[test]
    fn products_are_batch_invariant() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
        let (k, m) = (96, 70);
        let w = rand_vec(m * k, &mut rng);
        let x = rand_vec(130 * k, &mut rng);
        let mut full = vec![0f32; 130 * m];
        matmul_nt(&x, &w, &mut full, 130, k, m, MatmulMode::Overwrite);
        for (start, len) in [(0, 1), (5, 3), (17, 48), (100, 30), (129, 1)] {
            let mut part = vec![0f32; len * m];
            matmul_nt(
                &x[start * k..(start + len) * k],
                &w,
                &mut part,
                len,
                k,
                m,
                MatmulMode::Overwrite,
            );
            assert!(
                part.iter()
                    .zip(&full[start * m..])
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "rows {start}..+{len}"
            );
        }
    }
}
