//! [`CudaBackend`]: the [`Backend`] trait on one GPU.
//!
//! Memory: weights are 16-bit (bf16 by default, f16 with [`WeightType::F16`]) with rows padded
//! to 8 elements, uploaded once by [`Backend::matrix`] (quantized GGML blocks are dequantized
//! on the host first). Activations, norms' weights, biases and the paged KV cache are f32
//! (the trait's buffers are f32 and export/import move f32; the KV cache in f32 keeps
//! export/import exact, at twice the bytes of a bf16 cache: see NOTES.md). Accumulation is f32
//! everywhere.
//!
//! Every operation is queued on one stream; the host waits only where the trait returns host
//! data (`to_host`, `logits`, `kv_export`, `cosine_rows`) and in [`CudaBackend::argmax_rows`]
//! and [`CudaBackend::topk_rows`], which return token ids only.
//!
//! Errors: the constructor and the extra methods return [`CudaError`]. The trait methods cannot,
//! so a failed launch or copy is logged once and kept: [`CudaBackend::check`] returns it, every
//! later operation is skipped (the context is unusable after most CUDA errors), and methods
//! that return host data return NaN of the right length. Allocation failures in `zeros`,
//! `buffer`, `matrix` and `kv_pool` panic with the request size: they have no value to return
//! and mean the engine was configured for more memory than the device has.

use super::ffi::{Arena, AttnRowDev, LoraArgs, LoraDesc, ShrinkTask, SplitArgs};
use super::plan::{
    EntryShape, MAX_WORKSPACE_FLOATS, ProductKernel, SHRINK_WARPS, SPLIT_COUNTERS, attention_dims_per_lane,
    attention_smem_bytes, kv_export_offsets, kv_write_offsets, padded_ld, plan_lora, plan_product, row_offsets,
    window_start,
};
use super::{CudaError, DeviceInfo, FAMILIES, compile_family, nvrtc_arch};
use crate::attention::{AttnRow, AttnShape, KvLayout};
use crate::backend::{Backend, HeadTop, KvSlot, LoraColumns, MatrixData, RowGroup};
use crate::matmul::MatmulMode;
use crate::qmatmul::dequantize_rows;
use crate::rope::RopeTable;
use cudarc::driver::sys::CUdevice_attribute;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DriverError, LaunchConfig, PushKernelArg,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// Storage type of resident weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum WeightType {
    #[default]
    Bf16,
    F16,
}

impl WeightType {
    /// The kernel name suffix.
    pub fn suffix(self) -> &'static str {
        match self {
            WeightType::Bf16 => "bf16",
            WeightType::F16 => "f16",
        }
    }

    /// One f32 to the storage word (round to nearest even).
    pub fn encode(self, v: f32) -> u16 {
        match self {
            WeightType::Bf16 => half::bf16::from_f32(v).to_bits(),
            WeightType::F16 => half::f16::from_f32(v).to_bits(),
        }
    }

    /// The storage word back to f32.
    pub fn decode(self, h: u16) -> f32 {
        match self {
            WeightType::Bf16 => half::bf16::from_bits(h).to_f32(),
            WeightType::F16 => half::f16::from_bits(h).to_f32(),
        }
    }
}

/// A resident weight matrix: `out_dim` rows of `in_dim` 16-bit weights, row stride `ld`.
pub struct CudaMat {
    out_dim: usize,
    in_dim: usize,
    ld: usize,
    wt: WeightType,
    data: CudaSlice<u16>,
}

impl CudaMat {
    pub fn out_dim(&self) -> usize {
        self.out_dim
    }
    pub fn in_dim(&self) -> usize {
        self.in_dim
    }
    /// Row stride in elements (`in_dim` rounded up to 8).
    pub fn ld(&self) -> usize {
        self.ld
    }
    pub fn weight_type(&self) -> WeightType {
        self.wt
    }
    /// The device address of row 0 (for baselines that call cuBLAS on the same weights).
    pub fn device_ptr(&self) -> u64 {
        self.data.device_ptr(self.data.stream()).0
    }
}

/// An f32 activation buffer on the device.
pub struct CudaBuf {
    data: CudaSlice<f32>,
}

impl CudaBuf {
    pub fn len(&self) -> usize {
        self.data.len()
    }
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
    pub fn device_ptr(&self) -> u64 {
        self.data.device_ptr(self.data.stream()).0
    }
}

/// The paged KV pool (f32, layout of [`KvLayout`]).
pub struct CudaKv {
    data: CudaSlice<f32>,
}

impl CudaKv {
    pub fn device_ptr(&self) -> u64 {
        self.data.device_ptr(self.data.stream()).0
    }
}

/// Split-K workspace and its per-tile arrival counters (zero between launches: the last
/// block of each tile resets its counter).
struct Scratch {
    ws: Option<CudaSlice<f32>>,
    counters: CudaSlice<i32>,
}

/// The CUDA backend on one device. See the module documentation for memory and errors.
pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    info: DeviceInfo,
    wt: WeightType,
    funcs: HashMap<&'static str, CudaFunction>,
    scratch: Mutex<Scratch>,
    /// Uploaded RoPE frequency tables, keyed by their bits (a model has one).
    rope: Mutex<Vec<(Vec<u64>, CudaSlice<f64>)>>,
    /// The first error of a trait method (sticky).
    error: Mutex<Option<CudaError>>,
    /// `RRT_CUDA_SYNC=1`: synchronise after every launch so an asynchronous fault is reported
    /// by the operation that caused it (checks and debugging; slow).
    sync_each: bool,
}

fn drv(what: &'static str) -> impl Fn(DriverError) -> CudaError {
    move |e| CudaError::Driver(format!("{what}: {e:?}"))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn i32_of(v: usize, what: &str) -> Result<i32, CudaError> {
    i32::try_from(v).map_err(|_| CudaError::Unsupported(format!("{what} = {v} exceeds i32")))
}

fn unsupported(msg: impl Into<String>) -> CudaError {
    CudaError::Unsupported(msg.into())
}

/// Device properties of `ordinal` (initialises the driver; the driver library must have been
/// probed first).
pub(super) fn device_info(ordinal: usize) -> Result<DeviceInfo, CudaError> {
    let count = CudaContext::device_count().map_err(drv("cuInit / cuDeviceGetCount"))?;
    if ordinal >= count.max(0) as usize {
        return Err(CudaError::NoDevice {
            ordinal,
            count: count.max(0) as usize,
        });
    }
    let ctx = CudaContext::new(ordinal).map_err(drv("cuDevicePrimaryCtxRetain"))?;
    info_of(&ctx, ordinal)
}

fn info_of(ctx: &Arc<CudaContext>, ordinal: usize) -> Result<DeviceInfo, CudaError> {
    let attr = |a| ctx.attribute(a).map_err(drv("cuDeviceGetAttribute"));
    Ok(DeviceInfo {
        ordinal,
        name: ctx.name().map_err(drv("cuDeviceGetName"))?,
        compute_capability: ctx.compute_capability().map_err(drv("compute capability"))?,
        total_memory: ctx.total_mem().map_err(drv("cuDeviceTotalMem"))?,
        multiprocessors: attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?.max(1) as usize,
        l2_bytes: attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)?.max(0) as usize,
    })
}

impl CudaBackend {
    /// The backend on device `ordinal` with bf16 weights.
    pub fn new(ordinal: usize) -> Result<Self, CudaError> {
        Self::with_weight_type(ordinal, WeightType::Bf16)
    }

    /// The backend on device `ordinal`: checks the driver and NVRTC libraries before any
    /// cudarc call, creates the context, compiles every kernel family for the device's
    /// architecture and loads it.
    pub fn with_weight_type(ordinal: usize, wt: WeightType) -> Result<Self, CudaError> {
        super::probe_driver()?;
        super::probe_nvrtc()?;
        let info = device_info(ordinal)?;
        if info.compute_capability.0 < 8 {
            return Err(unsupported(format!(
                "compute capability {}.{} (bf16 tensor cores need 8.0 or newer)",
                info.compute_capability.0, info.compute_capability.1
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(drv("cuDevicePrimaryCtxRetain"))?;
        let stream = ctx.default_stream();
        let arch = nvrtc_arch(info.compute_capability.0, info.compute_capability.1);
        let mut funcs = HashMap::new();
        for fam in FAMILIES {
            let compiled = compile_family(fam, &arch)?;
            if !compiled.log.is_empty() {
                tracing::warn!(family = fam.name, log = %compiled.log, "NVRTC warnings");
            }
            let module = ctx
                .load_module(cudarc::nvrtc::Ptx::from_src(compiled.ptx))
                .map_err(drv("cuModuleLoadData"))?;
            for &k in fam.kernels {
                funcs.insert(k, module.load_function(k).map_err(drv("cuModuleGetFunction"))?);
            }
        }
        let counters = stream
            .alloc_zeros::<i32>(SPLIT_COUNTERS)
            .map_err(drv("split-K counters"))?;
        let sync_each = std::env::var("RRT_CUDA_SYNC").is_ok_and(|v| v == "1");
        Ok(Self {
            ctx,
            stream,
            info,
            wt,
            funcs,
            scratch: Mutex::new(Scratch { ws: None, counters }),
            rope: Mutex::new(Vec::new()),
            error: Mutex::new(None),
            sync_each,
        })
    }

    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    pub fn weight_type(&self) -> WeightType {
        self.wt
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The first error a trait method hit, if any (the node checks this once per step).
    pub fn check(&self) -> Result<(), CudaError> {
        match lock(&self.error).clone() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Waits for everything queued so far; reports asynchronous faults.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        self.stream.synchronize().map_err(drv("cuStreamSynchronize"))
    }

    fn failed(&self) -> bool {
        lock(&self.error).is_some()
    }

    fn record(&self, op: &'static str, r: Result<(), CudaError>) {
        if let Err(e) = r {
            let mut g = lock(&self.error);
            if g.is_none() {
                tracing::error!(op, error = %e, "CUDA backend operation failed; later operations are skipped");
                *g = Some(e);
            }
        }
    }

    /// Runs `f` unless an earlier operation failed; records its error.
    fn run(&self, op: &'static str, f: impl FnOnce() -> Result<(), CudaError>) {
        if !self.failed() {
            let r = f();
            self.record(op, r);
        }
    }

    fn func(&self, name: &str) -> Result<&CudaFunction, CudaError> {
        self.funcs
            .get(name)
            .ok_or_else(|| unsupported(format!("kernel {name} not loaded")))
    }

    fn ptr<T>(&self, s: &CudaSlice<T>) -> u64 {
        s.device_ptr(&self.stream).0
    }

    fn after_launch(&self, name: &'static str) -> Result<(), CudaError> {
        if self.sync_each {
            self.stream
                .synchronize()
                .map_err(|e| CudaError::Driver(format!("{name}: {e:?}")))?;
        }
        Ok(())
    }

    fn upload_arena(&self, a: &Arena) -> Result<Option<CudaSlice<u8>>, CudaError> {
        if a.bytes.is_empty() {
            return Ok(None);
        }
        self.stream
            .clone_htod(&a.bytes)
            .map(Some)
            .map_err(drv("metadata upload"))
    }

    fn alloc_f32(&self, len: usize) -> Result<CudaSlice<f32>, CudaError> {
        self.stream.alloc_zeros::<f32>(len.max(1)).map_err(drv("cuMemAlloc"))
    }

    fn download(&self, s: &CudaSlice<f32>, len: usize) -> Result<Vec<f32>, CudaError> {
        let mut v = self.stream.clone_dtoh(s).map_err(drv("device to host copy"))?;
        self.synchronize()?;
        v.truncate(len);
        Ok(v)
    }

    // -----------------------------------------------------------------------------------------
    // Products.

    /// `y[i * ldy + j] (+)= x[i * ldx ..] . W[j] + bias[j] + LoRA` for `n` rows, through the
    /// kernel and split chosen by [`plan_product`].
    #[allow(clippy::too_many_arguments)]
    fn product(
        &self,
        x: u64,
        ldx: usize,
        n: usize,
        w: &CudaMat,
        bias: u64,
        y: u64,
        ldy: usize,
        accumulate: bool,
        la: LoraArgs,
    ) -> Result<(), CudaError> {
        let (k, m) = (w.in_dim, w.out_dim);
        if n == 0 || m == 0 {
            return Ok(());
        }
        let p = plan_product(n, m, k, self.info.multiprocessors, MAX_WORKSPACE_FLOATS);
        let mut scratch = lock(&self.scratch);
        let mut sp = SplitArgs {
            k_chunk: i32_of(p.k_chunk, "k chunk")?,
            ..Default::default()
        };
        if p.splits > 1 {
            let need = p.splits * n * m;
            if scratch.ws.as_ref().is_none_or(|ws| ws.len() < need) {
                scratch.ws = None;
                scratch.ws = Some(self.alloc_f32(need)?);
            }
            sp.ws = self.ptr(scratch.ws.as_ref().expect("allocated above"));
            sp.counters = self.ptr(&scratch.counters);
        }
        let (name, cfg) = match p.kernel {
            ProductKernel::Gemv { rows } => (
                gemv_name(self.wt, rows)?,
                LaunchConfig {
                    grid_dim: (p.tiles_x as u32, p.splits as u32, 1),
                    block_dim: (128, 1, 1),
                    shared_mem_bytes: 0,
                },
            ),
            ProductKernel::Mma => (
                match self.wt {
                    WeightType::Bf16 => "linear_mma_bf16",
                    WeightType::F16 => "linear_mma_f16",
                },
                LaunchConfig {
                    grid_dim: (p.tiles_x as u32, p.tiles_y as u32, p.splits as u32),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                },
            ),
        };
        let wp = w.device_ptr();
        let (ldx, n_, ldw, k_, m_, ldy) = (
            i32_of(ldx, "ldx")?,
            i32_of(n, "rows")?,
            i32_of(w.ld, "ldw")?,
            i32_of(k, "in_dim")?,
            i32_of(m, "out_dim")?,
            i32_of(ldy, "ldy")?,
        );
        let acc = i32::from(accumulate);
        let f = self.func(name)?;
        let mut b = self.stream.launch_builder(f);
        b.arg(&x)
            .arg(&ldx)
            .arg(&n_)
            .arg(&wp)
            .arg(&ldw)
            .arg(&k_)
            .arg(&m_)
            .arg(&bias)
            .arg(&y)
            .arg(&ldy)
            .arg(&acc)
            .arg(&la)
            .arg(&sp);
        // SAFETY: the pointers are live device allocations of at least the sizes the kernel
        // reads (checked by the callers), the argument list matches LINEAR_PARAMS in
        // linear.cu, and the workspace stays allocated while the scratch lock is held.
        unsafe { b.launch(cfg) }.map_err(drv(name))?;
        drop(scratch);
        self.after_launch(name)
    }

    #[allow(clippy::too_many_arguments)]
    fn try_linear_lora(
        &self,
        x: &CudaBuf,
        n: usize,
        w: &CudaMat,
        bias: Option<&CudaBuf>,
        loras: &[LoraColumns<'_, CudaMat>],
        groups: &[RowGroup],
        y: &mut CudaBuf,
        mode: MatmulMode,
    ) -> Result<(), CudaError> {
        let (k, m) = (w.in_dim, w.out_dim);
        if n == 0 {
            return Ok(());
        }
        if x.len() < n * k || y.len() < n * m || bias.is_some_and(|b| b.len() < m) {
            return Err(unsupported(format!(
                "linear_lora shapes: x {} y {} for {n} x {k} -> {m}",
                x.len(),
                y.len()
            )));
        }
        let entries: Vec<EntryShape> = loras
            .iter()
            .map(|lc| EntryShape {
                col0: lc.col0,
                cols: lc.per_adapter.iter().flatten().map(|l| l.b.out_dim).next().unwrap_or(0),
                ranks: lc.per_adapter.iter().map(|l| l.as_ref().map(|l| l.rank)).collect(),
            })
            .collect();
        for (lc, e) in loras.iter().zip(&entries) {
            for l in lc.per_adapter.iter().flatten() {
                if l.a.out_dim != l.rank || l.b.in_dim != l.rank || l.a.in_dim != k || l.b.out_dim != e.cols {
                    return Err(unsupported("LoRA shapes disagree with the product"));
                }
            }
            if e.col0 + e.cols > m {
                return Err(unsupported("LoRA columns outside the product"));
            }
        }
        let lp = plan_lora(n, groups, &entries).map_err(|e| unsupported(e.to_string()))?;
        let xp = self.ptr(&x.data);
        let yp = self.ptr(&y.data);
        let bp = bias.map_or(0, |b| self.ptr(&b.data));
        let mut la = LoraArgs::default();
        // Kept alive until the launches below are queued (frees are stream-ordered).
        let mut _meta = None;
        let mut _t = None;
        if let Some(lp) = lp {
            let na = lp.n_adapters;
            let mut descs = vec![LoraDesc::default(); entries.len() * na];
            for (e, lc) in loras.iter().enumerate() {
                for (a, l) in lc.per_adapter.iter().enumerate().take(na - 1) {
                    if let Some(l) = l {
                        descs[e * na + a] = LoraDesc {
                            a: l.a.device_ptr(),
                            b: l.b.device_ptr(),
                            rank: i32_of(l.rank, "rank")?,
                            lda: i32_of(l.a.ld, "lda")?,
                            ldb: i32_of(l.b.ld, "ldb")?,
                            pad: 0,
                        };
                    }
                }
            }
            let tasks: Vec<ShrinkTask> = lp
                .tasks
                .iter()
                .map(|t| ShrinkTask {
                    row0: t.row0 as i32,
                    rows: t.rows as i32,
                    entry: t.entry as i32,
                    adapter: t.adapter as i32,
                })
                .collect();
            let mut arena = Arena::default();
            let o_desc = arena.push(&descs);
            let o_rows = arena.push(&lp.row_adapter);
            let o_tasks = arena.push(&tasks);
            let meta = self.upload_arena(&arena)?.expect("descriptors are never empty");
            let base = self.ptr(&meta);
            let t = self.alloc_f32(n * lp.ldt)?;
            la = LoraArgs {
                descs: base + o_desc as u64,
                row_adapter: base + o_rows as u64,
                t: self.ptr(&t),
                ldt: i32_of(lp.ldt, "ldt")?,
                rmax: i32_of(lp.rmax, "rank")?,
                n_entries: entries.len() as i32,
                n_adapters: na as i32,
                col0: [0; 4],
                cols: [0; 4],
            };
            for (i, e) in entries.iter().enumerate() {
                la.col0[i] = i32_of(e.col0, "col0")?;
                la.cols[i] = i32_of(e.cols, "cols")?;
            }
            if !tasks.is_empty() {
                let name = match self.wt {
                    WeightType::Bf16 => "lora_shrink_bf16",
                    WeightType::F16 => "lora_shrink_f16",
                };
                let cfg = LaunchConfig {
                    grid_dim: (tasks.len() as u32, lp.rmax.div_ceil(SHRINK_WARPS) as u32, 1),
                    block_dim: (32 * SHRINK_WARPS as u32, 1, 1),
                    shared_mem_bytes: 0,
                };
                let (ldx, k_) = (i32_of(k, "in_dim")?, i32_of(k, "in_dim")?);
                let tp = base + o_tasks as u64;
                let mut b = self.stream.launch_builder(self.func(name)?);
                b.arg(&xp).arg(&ldx).arg(&k_).arg(&tp).arg(&la);
                // SAFETY: x holds n x k floats, the tasks and descriptors were uploaded above,
                // `t` holds n x ldt floats; arguments match lora_shrink_* in linear.cu.
                unsafe { b.launch(cfg) }.map_err(drv(name))?;
                self.after_launch(name)?;
            }
            for bs in &lp.big {
                let l = loras[bs.entry].per_adapter[bs.adapter]
                    .as_ref()
                    .expect("planned shrinks have an adapter");
                let xo = xp + (bs.row0 * k * 4) as u64;
                let yo = la.t + ((bs.row0 * lp.ldt + bs.entry * lp.rmax) * 4) as u64;
                self.product(xo, k, bs.rows, &l.a, 0, yo, lp.ldt, false, LoraArgs::default())?;
            }
            _meta = Some(meta);
            _t = Some(t);
        }
        self.product(xp, k, n, w, bp, yp, m, mode == MatmulMode::Accumulate, la)
    }

    // -----------------------------------------------------------------------------------------
    // Vector copies.

    /// `dst[dst_off[v]..+len] = src[src_off[v]..+len]` for every `v`.
    fn copy_vecs(&self, dst: u64, dst_off: &[i64], src: u64, src_off: &[i64], len: usize) -> Result<(), CudaError> {
        if dst_off.is_empty() || len == 0 {
            return Ok(());
        }
        let mut arena = Arena::default();
        let od = arena.push(dst_off);
        let os = arena.push(src_off);
        let meta = self.upload_arena(&arena)?.expect("offsets are not empty");
        let base = self.ptr(&meta);
        let (dp, sp) = (base + od as u64, base + os as u64);
        let len_ = i32_of(len, "vector length")?;
        let cfg = LaunchConfig {
            grid_dim: (dst_off.len() as u32, 1, 1),
            block_dim: (len.next_power_of_two().clamp(32, 256) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream.launch_builder(self.func("copy_vecs_f32")?);
        b.arg(&dst).arg(&dp).arg(&src).arg(&sp).arg(&len_);
        // SAFETY: every offset plus `len` lies inside `dst` / `src` (computed from the layout
        // or the buffers' row counts by the callers); argument list of copy_vecs_f32.
        unsafe { b.launch(cfg) }.map_err(drv("copy_vecs_f32"))?;
        self.after_launch("copy_vecs_f32")
    }

    // -----------------------------------------------------------------------------------------
    // Extra operations (not in the trait).

    /// Final norm + LM head of rows `select` of `x`, left on the device (`select.len() x
    /// vocab`), for [`CudaBackend::argmax_rows`] / [`CudaBackend::topk_rows`].
    pub fn logits_device(
        &self,
        x: &CudaBuf,
        width: usize,
        select: &[u32],
        norm: &CudaBuf,
        eps: f32,
        head: &CudaMat,
    ) -> Result<CudaBuf, CudaError> {
        self.check()?;
        let s = select.len();
        let out = self.alloc_f32(s * head.out_dim)?;
        if s == 0 {
            return Ok(CudaBuf { data: out });
        }
        if head.in_dim != width || norm.len() < width || select.iter().any(|&r| (r as usize + 1) * width > x.len()) {
            return Err(unsupported("logits: rows or widths outside the buffers"));
        }
        let normed = self.alloc_f32(s * width)?;
        let mut arena = Arena::default();
        arena.push(select);
        let meta = self.upload_arena(&arena)?.expect("select is not empty");
        self.launch_rmsnorm(
            self.ptr(&x.data),
            self.ptr(&meta),
            &norm.data,
            eps,
            self.ptr(&normed),
            s,
            width,
        )?;
        self.product(
            self.ptr(&normed),
            width,
            s,
            head,
            0,
            self.ptr(&out),
            head.out_dim,
            false,
            LoraArgs::default(),
        )?;
        Ok(CudaBuf { data: out })
    }

    /// Greedy selection: the index of the largest logit of each of `rows` rows (`vocab` wide;
    /// ties to the lower index, NaN as -inf). Only the ids cross to the host.
    pub fn argmax_rows(&self, logits: &CudaBuf, rows: usize, vocab: usize) -> Result<Vec<u32>, CudaError> {
        self.check()?;
        if rows == 0 {
            return Ok(Vec::new());
        }
        if logits.len() < rows * vocab {
            return Err(unsupported("argmax_rows: buffer smaller than rows x vocab"));
        }
        let ids = self.stream.alloc_zeros::<u32>(rows).map_err(drv("cuMemAlloc"))?;
        let (lp, ip, v) = (self.ptr(&logits.data), self.ptr(&ids), i32_of(vocab, "vocab")?);
        let cfg = per_row(rows);
        let mut b = self.stream.launch_builder(self.func("argmax_rows_f32")?);
        b.arg(&lp).arg(&v).arg(&ip);
        // SAFETY: logits hold rows x vocab floats, ids holds rows words.
        unsafe { b.launch(cfg) }.map_err(drv("argmax_rows_f32"))?;
        let out = self.stream.clone_dtoh(&ids).map_err(drv("ids to host"))?;
        self.synchronize()?;
        Ok(out)
    }

    /// The `k` largest logits of each row with their ids, best first (same order as
    /// [`CudaBackend::argmax_rows`]): `(ids, values)`, each `rows x k`.
    pub fn topk_rows(
        &self,
        logits: &CudaBuf,
        rows: usize,
        vocab: usize,
        k: usize,
    ) -> Result<(Vec<u32>, Vec<f32>), CudaError> {
        self.check()?;
        if rows == 0 || k == 0 {
            return Ok((Vec::new(), Vec::new()));
        }
        if logits.len() < rows * vocab || k > vocab {
            return Err(unsupported("topk_rows: k or rows outside the buffer"));
        }
        let ids = self.stream.alloc_zeros::<u32>(rows * k).map_err(drv("cuMemAlloc"))?;
        let vals = self.alloc_f32(rows * k)?;
        let (lp, ip, vp) = (self.ptr(&logits.data), self.ptr(&ids), self.ptr(&vals));
        let (v, k_) = (i32_of(vocab, "vocab")?, i32_of(k, "k")?);
        let cfg = per_row(rows);
        let mut b = self.stream.launch_builder(self.func("topk_rows_f32")?);
        b.arg(&lp).arg(&v).arg(&k_).arg(&ip).arg(&vp);
        // SAFETY: logits hold rows x vocab floats, ids and vals rows x k.
        unsafe { b.launch(cfg) }.map_err(drv("topk_rows_f32"))?;
        let out_ids = self.stream.clone_dtoh(&ids).map_err(drv("ids to host"))?;
        let out_vals = self.download(&vals, rows * k)?;
        Ok((out_ids, out_vals))
    }

    /// Final norm + LM head of the rows `select`, each reduced on the device to its
    /// [`HeadTop`] (argmax, top two logits, softmax normaliser): per row 20 bytes cross to the
    /// host instead of `vocab` floats.
    pub fn head_top_device(
        &self,
        x: &CudaBuf,
        width: usize,
        select: &[u32],
        norm: &CudaBuf,
        eps: f32,
        head: &CudaMat,
    ) -> Result<Vec<HeadTop>, CudaError> {
        self.check()?;
        let rows = select.len();
        if rows == 0 {
            return Ok(Vec::new());
        }
        let logits = self.logits_device(x, width, select, norm, eps, head)?;
        let vocab = head.out_dim;
        let ids = self.stream.alloc_zeros::<u32>(rows).map_err(drv("cuMemAlloc"))?;
        let top2 = self.alloc_f32(2 * rows)?;
        let sums = self.stream.alloc_zeros::<f64>(rows).map_err(drv("cuMemAlloc"))?;
        let (lp, ip, tp, sp) = (self.ptr(&logits.data), self.ptr(&ids), self.ptr(&top2), self.ptr(&sums));
        let v = i32_of(vocab, "vocab")?;
        let cfg = per_row(rows);
        let mut b = self.stream.launch_builder(self.func("head_top_rows_f32")?);
        b.arg(&lp).arg(&v).arg(&ip).arg(&tp).arg(&sp);
        // SAFETY: logits hold rows x vocab floats; ids and sums rows entries, top2 2 x rows.
        unsafe { b.launch(cfg) }.map_err(drv("head_top_rows_f32"))?;
        let ids = self.stream.clone_dtoh(&ids).map_err(drv("ids to host"))?;
        let sums = self.stream.clone_dtoh(&sums).map_err(drv("sums to host"))?;
        let top2 = self.download(&top2, 2 * rows)?;
        Ok((0..rows)
            .map(|r| HeadTop {
                id: ids[r],
                top: top2[2 * r],
                second: top2[2 * r + 1],
                sum_exp: sums[r],
            })
            .collect())
    }

    /// `x += r`, then `out = rmsnorm(x) * w`: the residual add fused with the next norm.
    pub fn add_rmsnorm(
        &self,
        x: &mut CudaBuf,
        r: &CudaBuf,
        w: &CudaBuf,
        eps: f32,
        out: &mut CudaBuf,
    ) -> Result<(), CudaError> {
        self.check()?;
        let dim = w.len();
        let rows = x.len() / dim.max(1);
        if dim == 0 || rows == 0 {
            return Ok(());
        }
        if r.len() < rows * dim || out.len() < rows * dim {
            return Err(unsupported("add_rmsnorm: buffers of different sizes"));
        }
        let (xp, rp, wp, op) = (
            self.ptr(&x.data),
            self.ptr(&r.data),
            self.ptr(&w.data),
            self.ptr(&out.data),
        );
        let dim_ = i32_of(dim, "width")?;
        let cfg = per_row(rows);
        let mut b = self.stream.launch_builder(self.func("add_rmsnorm_f32")?);
        b.arg(&xp).arg(&rp).arg(&wp).arg(&eps).arg(&op).arg(&dim_);
        // SAFETY: x, r and out hold rows x dim floats, w holds dim.
        unsafe { b.launch(cfg) }.map_err(drv("add_rmsnorm_f32"))?;
        self.after_launch("add_rmsnorm_f32")
    }

    #[allow(clippy::too_many_arguments)]
    fn launch_rmsnorm(
        &self,
        x: u64,
        rows_ptr: u64,
        w: &CudaSlice<f32>,
        eps: f32,
        out: u64,
        rows: usize,
        dim: usize,
    ) -> Result<(), CudaError> {
        if rows == 0 || dim == 0 {
            return Ok(());
        }
        let wp = self.ptr(w);
        let dim_ = i32_of(dim, "width")?;
        let cfg = per_row(rows);
        let mut b = self.stream.launch_builder(self.func("rmsnorm_f32")?);
        b.arg(&x).arg(&rows_ptr).arg(&wp).arg(&eps).arg(&out).arg(&dim_);
        // SAFETY: x holds every selected row, out rows x dim floats, w dim floats; the row
        // list (or null) holds `rows` indices.
        unsafe { b.launch(cfg) }.map_err(drv("rmsnorm_f32"))?;
        self.after_launch("rmsnorm_f32")
    }

    fn rope_table(&self, rope: &RopeTable) -> Result<u64, CudaError> {
        let inv = rope.scaled_inv_freq();
        let key: Vec<u64> = inv.iter().map(|f| f.to_bits()).collect();
        let mut cache = lock(&self.rope);
        if let Some((_, s)) = cache.iter().find(|(k, _)| *k == key) {
            return Ok(self.ptr(s));
        }
        let s = self.stream.clone_htod(&inv).map_err(drv("RoPE table upload"))?;
        let p = self.ptr(&s);
        cache.push((key, s));
        Ok(p)
    }

    #[allow(clippy::too_many_arguments)]
    fn try_attention(
        &self,
        qkv: &CudaBuf,
        ld: usize,
        rows: &[AttnRow<'_>],
        kv: &CudaKv,
        layout: &KvLayout,
        shape: AttnShape,
        out: &mut CudaBuf,
    ) -> Result<(), CudaError> {
        let n = rows.len();
        if n == 0 {
            return Ok(());
        }
        let hd = layout.head_dim;
        let nkv = layout.n_kv_heads;
        if nkv == 0 || !shape.n_heads.is_multiple_of(nkv) {
            return Err(unsupported("attention: query heads not a multiple of KV heads"));
        }
        let group = shape.n_heads / nkv;
        if group > 8 {
            return Err(unsupported(format!(
                "attention: {group} query heads per KV head (at most 8)"
            )));
        }
        let dpl = attention_dims_per_lane(hd).ok_or_else(|| unsupported(format!("attention: head_dim {hd}")))?;
        let qd = shape.n_heads * hd;
        if qkv.len() < (n - 1) * ld + qd || out.len() < n * qd {
            return Err(unsupported("attention: buffers smaller than the rows"));
        }
        let mut tables: Vec<u32> = Vec::new();
        let mut seen: HashMap<(usize, usize), usize> = HashMap::new();
        let mut dev_rows = Vec::with_capacity(n);
        for r in rows {
            let need = r.pos / layout.block_size + 1;
            if r.blocks.len() < need || r.layer >= layout.n_layers {
                return Err(unsupported("attention: block table shorter than the position"));
            }
            let key = (r.blocks.as_ptr() as usize, r.blocks.len());
            let off = *seen.entry(key).or_insert_with(|| {
                let o = tables.len();
                tables.extend_from_slice(r.blocks);
                o
            });
            dev_rows.push(AttnRowDev {
                pos: i32_of(r.pos, "position")?,
                start: window_start(r.pos, shape.window) as i32,
                layer: r.layer as i32,
                table: i32_of(off, "block table offset")?,
            });
        }
        let mut arena = Arena::default();
        let or = arena.push(&dev_rows);
        let ot = arena.push(&tables);
        let meta = self.upload_arena(&arena)?.expect("rows are not empty");
        let base = self.ptr(&meta);
        let name = match dpl {
            2 => "attention_f32_d2",
            4 => "attention_f32_d4",
            _ => "attention_f32_d8",
        };
        let (qp, rp, tp, pp, op) = (
            self.ptr(&qkv.data),
            base + or as u64,
            base + ot as u64,
            self.ptr(&kv.data),
            self.ptr(&out.data),
        );
        let (ld_, nl, bs, nkv_, hd_, g_) = (
            i32_of(ld, "ld")?,
            i32_of(layout.n_layers, "layers")?,
            i32_of(layout.block_size, "block size")?,
            nkv as i32,
            hd as i32,
            group as i32,
        );
        let cfg = LaunchConfig {
            grid_dim: (n as u32, nkv as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: attention_smem_bytes(group, hd) as u32,
        };
        let mut b = self.stream.launch_builder(self.func(name)?);
        b.arg(&qp)
            .arg(&ld_)
            .arg(&rp)
            .arg(&tp)
            .arg(&pp)
            .arg(&nl)
            .arg(&bs)
            .arg(&nkv_)
            .arg(&hd_)
            .arg(&g_)
            .arg(&shape.scale)
            .arg(&op);
        // SAFETY: see the checks above: rows, block tables and positions are inside the
        // uploaded metadata and the pool; the argument list matches ATTN_PARAMS.
        unsafe { b.launch(cfg) }.map_err(drv(name))?;
        self.after_launch(name)
    }
}

fn gemv_name(wt: WeightType, rows: usize) -> Result<&'static str, CudaError> {
    Ok(match (wt, rows) {
        (WeightType::Bf16, 1) => "linear_gemv_bf16_r1",
        (WeightType::Bf16, 2) => "linear_gemv_bf16_r2",
        (WeightType::Bf16, 4) => "linear_gemv_bf16_r4",
        (WeightType::Bf16, 8) => "linear_gemv_bf16_r8",
        (WeightType::Bf16, 16) => "linear_gemv_bf16_r16",
        (WeightType::F16, 1) => "linear_gemv_f16_r1",
        (WeightType::F16, 2) => "linear_gemv_f16_r2",
        (WeightType::F16, 4) => "linear_gemv_f16_r4",
        (WeightType::F16, 8) => "linear_gemv_f16_r8",
        (WeightType::F16, 16) => "linear_gemv_f16_r16",
        _ => return Err(unsupported(format!("no GEMV instance for {rows} rows"))),
    })
}

/// Host f32 rows (`out x in`) to padded 16-bit rows of stride `padded_ld(in)`.
pub(super) fn encode_rows(wt: WeightType, out_dim: usize, in_dim: usize, data: &MatrixData) -> Vec<u16> {
    let ld = padded_ld(in_dim);
    let mut v = vec![0u16; out_dim * ld];
    let mut row = vec![0f32; in_dim];
    for r in 0..out_dim {
        let src: &[f32] = match data {
            MatrixData::F32(w) => &w[r * in_dim..(r + 1) * in_dim],
            MatrixData::Quant(f, b) => {
                let rb = f.row_bytes(in_dim);
                dequantize_rows(*f, &b[r * rb..(r + 1) * rb], &mut row);
                &row
            }
        };
        for (d, s) in v[r * ld..r * ld + in_dim].iter_mut().zip(src) {
            *d = wt.encode(*s);
        }
    }
    v
}

/// One block of 256 threads per row, no dynamic shared memory (the norm and selection kernels).
fn per_row(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl Backend for CudaBackend {
    type Buf = CudaBuf;
    type Mat = CudaMat;
    type Kv = CudaKv;

    fn fault(&self) -> Option<String> {
        self.check().err().map(|e| e.to_string())
    }

    fn prefers_head_top(&self) -> bool {
        true
    }

    fn head_top(
        &self,
        x: &CudaBuf,
        width: usize,
        select: &[u32],
        norm: &CudaBuf,
        eps: f32,
        head: &CudaMat,
    ) -> Vec<HeadTop> {
        let nan = HeadTop {
            id: 0,
            top: f32::NAN,
            second: f32::NAN,
            sum_exp: f64::NAN,
        };
        let mut out = vec![nan; select.len()];
        self.run("head_top", || {
            out = self.head_top_device(x, width, select, norm, eps, head)?;
            Ok(())
        });
        out
    }

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn matrix(&self, out_dim: usize, in_dim: usize, data: MatrixData) -> CudaMat {
        let host = encode_rows(self.wt, out_dim, in_dim, &data);
        drop(data);
        let data = self
            .stream
            .clone_htod(&host)
            .unwrap_or_else(|e| panic!("CUDA: cannot upload a {out_dim} x {in_dim} matrix: {e:?}"));
        CudaMat {
            out_dim,
            in_dim,
            ld: padded_ld(in_dim),
            wt: self.wt,
            data,
        }
    }

    fn buffer(&self, values: Vec<f32>) -> CudaBuf {
        let data = if values.is_empty() {
            self.alloc_f32(0)
        } else {
            self.stream.clone_htod(&values).map_err(drv("upload"))
        }
        .unwrap_or_else(|e| panic!("CUDA: cannot upload {} floats: {e}", values.len()));
        CudaBuf { data }
    }

    fn zeros(&self, len: usize) -> CudaBuf {
        let data = self
            .stream
            .alloc_zeros::<f32>(len.max(1))
            .unwrap_or_else(|e| panic!("CUDA: cannot allocate {len} floats: {e:?}"));
        CudaBuf { data }
    }

    fn to_host(&self, buf: &CudaBuf) -> Vec<f32> {
        let len = buf.len();
        if self.failed() {
            return vec![f32::NAN; len];
        }
        match self.download(&buf.data, len) {
            Ok(v) => v,
            Err(e) => {
                self.record("to_host", Err(e));
                vec![f32::NAN; len]
            }
        }
    }

    fn kv_pool(&self, layout: KvLayout, n_blocks: usize) -> CudaKv {
        let len = n_blocks * layout.block_floats();
        let data = self
            .stream
            .alloc_zeros::<f32>(len.max(1))
            .unwrap_or_else(|e| panic!("CUDA: cannot allocate a KV pool of {len} floats: {e:?}"));
        CudaKv { data }
    }

    fn matrix_bytes(&self, m: &CudaMat) -> usize {
        m.out_dim * m.ld * 2
    }

    fn embed(&self, table: &CudaMat, tokens: &[u32], out: &mut CudaBuf) {
        self.run("embed", || {
            if tokens.is_empty() {
                return Ok(());
            }
            let w = table.in_dim;
            if out.len() < tokens.len() * w || tokens.iter().any(|&t| t as usize >= table.out_dim) {
                return Err(unsupported("embed: token id or output outside the table"));
            }
            let mut arena = Arena::default();
            arena.push(tokens);
            let meta = self.upload_arena(&arena)?.expect("tokens are not empty");
            let name = match self.wt {
                WeightType::Bf16 => "embed_bf16",
                WeightType::F16 => "embed_f16",
            };
            let (tp, kp, op) = (table.device_ptr(), self.ptr(&meta), self.ptr(&out.data));
            let (ld, w_) = (i32_of(table.ld, "ld")?, i32_of(w, "width")?);
            let cfg = LaunchConfig {
                grid_dim: (tokens.len() as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut b = self.stream.launch_builder(self.func(name)?);
            b.arg(&tp).arg(&ld).arg(&kp).arg(&op).arg(&w_);
            // SAFETY: token ids are below out_dim (checked), out holds tokens x width floats.
            unsafe { b.launch(cfg) }.map_err(drv(name))?;
            self.after_launch(name)
        });
    }

    fn copy_rows(&self, src: &CudaBuf, src_rows: &[u32], dst: &mut CudaBuf, dst_row0: usize, width: usize) {
        self.run("copy_rows", || {
            if src_rows.iter().any(|&r| (r as usize + 1) * width > src.len())
                || (dst_row0 + src_rows.len()) * width > dst.len()
            {
                return Err(unsupported("copy_rows: rows outside the buffers"));
            }
            let so = row_offsets(src_rows.iter().map(|&r| r as usize), width);
            let d = row_offsets(dst_row0..dst_row0 + src_rows.len(), width);
            self.copy_vecs(self.ptr(&dst.data), &d, self.ptr(&src.data), &so, width)
        });
    }

    fn rmsnorm(&self, x: &CudaBuf, w: &CudaBuf, eps: f32, out: &mut CudaBuf) {
        self.run("rmsnorm", || {
            let dim = w.len();
            let rows = x.len() / dim.max(1);
            if out.len() < rows * dim {
                return Err(unsupported("rmsnorm: output smaller than input"));
            }
            self.launch_rmsnorm(self.ptr(&x.data), 0, &w.data, eps, self.ptr(&out.data), rows, dim)
        });
    }

    fn linear_lora(
        &self,
        x: &CudaBuf,
        n: usize,
        w: &CudaMat,
        bias: Option<&CudaBuf>,
        loras: &[LoraColumns<'_, CudaMat>],
        groups: &[RowGroup],
        y: &mut CudaBuf,
        mode: MatmulMode,
    ) {
        self.run("linear_lora", || {
            self.try_linear_lora(x, n, w, bias, loras, groups, y, mode)
        });
    }

    fn rope(
        &self,
        rope: &RopeTable,
        qkv: &mut CudaBuf,
        ld: usize,
        positions: &[u32],
        q_cols: usize,
        k_col0: usize,
        k_cols: usize,
    ) {
        self.run("rope", || {
            let n = positions.len();
            let hd = rope.head_dim();
            if n == 0 || rope.half() == 0 {
                return Ok(());
            }
            if qkv.len() < (n - 1) * ld + q_cols.max(k_col0 + k_cols)
                || !q_cols.is_multiple_of(hd)
                || !k_cols.is_multiple_of(hd)
            {
                return Err(unsupported("rope: columns outside the rows"));
            }
            let inv = self.rope_table(rope)?;
            let mut arena = Arena::default();
            arena.push(positions);
            let meta = self.upload_arena(&arena)?.expect("positions are not empty");
            let (qp, pp) = (self.ptr(&qkv.data), self.ptr(&meta));
            let (ld_, half, hd_, qc, k0, kc) = (
                i32_of(ld, "ld")?,
                rope.half() as i32,
                hd as i32,
                i32_of(q_cols, "q_cols")?,
                i32_of(k_col0, "k_col0")?,
                i32_of(k_cols, "k_cols")?,
            );
            let cfg = LaunchConfig {
                grid_dim: (n as u32, 1, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut b = self.stream.launch_builder(self.func("rope_f32")?);
            b.arg(&qp)
                .arg(&ld_)
                .arg(&pp)
                .arg(&inv)
                .arg(&half)
                .arg(&hd_)
                .arg(&qc)
                .arg(&k0)
                .arg(&kc);
            // SAFETY: every rotated column lies inside its row (checked); the frequency table
            // holds `half` doubles.
            unsafe { b.launch(cfg) }.map_err(drv("rope_f32"))?;
            self.after_launch("rope_f32")
        });
    }

    fn kv_write(
        &self,
        kv: &mut CudaKv,
        layout: &KvLayout,
        src: &CudaBuf,
        ld: usize,
        k_col0: usize,
        v_col0: usize,
        slots: &[KvSlot],
    ) {
        self.run("kv_write", || {
            let kd = layout.kv_dim();
            let (dst, so) = kv_write_offsets(layout, slots, ld, k_col0, v_col0);
            let pool = kv.data.len() as i64;
            if dst.iter().any(|&o| o + kd as i64 > pool) || so.iter().any(|&o| o as usize + kd > src.len()) {
                return Err(unsupported(
                    "kv_write: slot outside the pool or column outside the rows",
                ));
            }
            self.copy_vecs(self.ptr(&kv.data), &dst, self.ptr(&src.data), &so, kd)
        });
    }

    fn kv_export(&self, kv: &CudaKv, layout: &KvLayout, blocks: &[u32], positions: usize) -> Vec<f32> {
        let kd = layout.kv_dim();
        let len = positions * layout.n_layers * 2 * kd;
        let mut out = vec![f32::NAN; len];
        self.run("kv_export", || {
            if positions.div_ceil(layout.block_size.max(1)) > blocks.len() {
                return Err(unsupported("kv_export: fewer blocks than positions"));
            }
            let offs = kv_export_offsets(layout, blocks, positions);
            if offs.iter().any(|&o| o + kd as i64 > kv.data.len() as i64) {
                return Err(unsupported("kv_export: block outside the pool"));
            }
            let buf = self.alloc_f32(len)?;
            let d = row_offsets(0..offs.len(), kd);
            self.copy_vecs(self.ptr(&buf), &d, self.ptr(&kv.data), &offs, kd)?;
            out = self.download(&buf, len)?;
            Ok(())
        });
        out
    }

    fn kv_import(&self, kv: &mut CudaKv, layout: &KvLayout, blocks: &[u32], data: &[f32]) {
        self.run("kv_import", || {
            let kd = layout.kv_dim();
            if kd == 0 || data.is_empty() {
                return Ok(());
            }
            let per_pos = layout.n_layers * 2 * kd;
            let positions = data.len() / per_pos;
            if !data.len().is_multiple_of(per_pos) || positions.div_ceil(layout.block_size.max(1)) > blocks.len() {
                return Err(unsupported("kv_import: data does not match the blocks"));
            }
            let offs = kv_export_offsets(layout, blocks, positions);
            if offs.iter().any(|&o| o + kd as i64 > kv.data.len() as i64) {
                return Err(unsupported("kv_import: block outside the pool"));
            }
            let src = self.stream.clone_htod(data).map_err(drv("KV upload"))?;
            let s = row_offsets(0..offs.len(), kd);
            self.copy_vecs(self.ptr(&kv.data), &offs, self.ptr(&src), &s, kd)
        });
    }

    fn attention(
        &self,
        qkv: &CudaBuf,
        ld: usize,
        rows: &[AttnRow<'_>],
        kv: &CudaKv,
        layout: &KvLayout,
        shape: AttnShape,
        out: &mut CudaBuf,
    ) {
        self.run("attention", || {
            self.try_attention(qkv, ld, rows, kv, layout, shape, out)
        });
    }

    fn silu_mul(&self, gu: &CudaBuf, n: usize, inter: usize, out: &mut CudaBuf) {
        self.run("silu_mul", || {
            let total = n * inter;
            if total == 0 {
                return Ok(());
            }
            if gu.len() < 2 * total || out.len() < total {
                return Err(unsupported("silu_mul: buffers smaller than the rows"));
            }
            let (gp, op) = (self.ptr(&gu.data), self.ptr(&out.data));
            let (n_, i_) = (i32_of(n, "rows")?, i32_of(inter, "inter")?);
            let cfg = LaunchConfig {
                grid_dim: (total.div_ceil(256).min(8192) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut b = self.stream.launch_builder(self.func("silu_mul_f32")?);
            b.arg(&gp).arg(&n_).arg(&i_).arg(&op);
            // SAFETY: gu holds n x 2 inter floats, out n x inter (checked).
            unsafe { b.launch(cfg) }.map_err(drv("silu_mul_f32"))?;
            self.after_launch("silu_mul_f32")
        });
    }

    fn logits(&self, x: &CudaBuf, width: usize, select: &[u32], norm: &CudaBuf, eps: f32, head: &CudaMat) -> Vec<f32> {
        let len = select.len() * head.out_dim;
        let mut out = vec![f32::NAN; len];
        self.run("logits", || {
            let dev = self.logits_device(x, width, select, norm, eps, head)?;
            out = self.download(&dev.data, len)?;
            Ok(())
        });
        out
    }

    fn cosine_rows(&self, a: &CudaBuf, b: &CudaBuf, width: usize, rows: &[u32]) -> Vec<f32> {
        let mut out = vec![f32::NAN; rows.len()];
        self.run("cosine_rows", || {
            if rows.is_empty() || width == 0 {
                return Ok(());
            }
            if rows.iter().any(|&r| (r as usize + 1) * width > a.len().min(b.len())) {
                return Err(unsupported("cosine_rows: rows outside the buffers"));
            }
            let mut arena = Arena::default();
            arena.push(rows);
            let meta = self.upload_arena(&arena)?.expect("rows are not empty");
            let res = self.alloc_f32(rows.len())?;
            let (ap, bp, rp, op) = (self.ptr(&a.data), self.ptr(&b.data), self.ptr(&meta), self.ptr(&res));
            let w_ = i32_of(width, "width")?;
            let cfg = LaunchConfig {
                grid_dim: (rows.len() as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut bl = self.stream.launch_builder(self.func("cosine_rows_f32")?);
            bl.arg(&ap).arg(&bp).arg(&rp).arg(&w_).arg(&op);
            // SAFETY: every row lies inside both buffers (checked).
            unsafe { bl.launch(cfg) }.map_err(drv("cosine_rows_f32"))?;
            out = self.download(&res, rows.len())?;
            Ok(())
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qmatmul::QFormat;

    #[test]
    fn encode_rows_pads_with_zeros_and_rounds() {
        let data = MatrixData::F32(vec![1.0, -2.5, 3.0e-3, 65504.0, 0.1, 7.0]);
        let v = encode_rows(WeightType::Bf16, 2, 3, &data);
        assert_eq!(v.len(), 2 * 8);
        assert!(v[3..8].iter().all(|&h| h == 0) && v[11..].iter().all(|&h| h == 0));
        let back: Vec<f32> = [0, 1, 2, 8, 9, 10]
            .iter()
            .map(|&i| WeightType::Bf16.decode(v[i]))
            .collect();
        for (b, w) in back.iter().zip([1.0f32, -2.5, 3.0e-3, 65504.0, 0.1, 7.0]) {
            assert!((b - w).abs() <= w.abs() * (1.0 / 256.0), "{b} vs {w}");
        }
        let v = encode_rows(WeightType::F16, 2, 3, &data);
        assert_eq!(WeightType::F16.decode(v[8]), 65504.0);
    }

    #[test]
    fn encode_rows_dequantizes_blocks() {
        // One Q8_0 row of 32: scale 0.5, values -16..16.
        let mut b = half::f16::from_f32(0.5).to_le_bytes().to_vec();
        b.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let v = encode_rows(WeightType::Bf16, 1, 32, &MatrixData::Quant(QFormat::Q8_0, b));
        for (i, h) in v.iter().enumerate() {
            assert_eq!(WeightType::Bf16.decode(*h), (i as f32 - 16.0) * 0.5);
        }
    }

    #[test]
    fn every_gemv_instance_has_a_name() {
        for wt in [WeightType::Bf16, WeightType::F16] {
            for rows in 1..=crate::cuda::plan::GEMV_MAX_ROWS {
                if let ProductKernel::Gemv { rows: r } = crate::cuda::plan::product_kernel(rows) {
                    let name = gemv_name(wt, r).unwrap();
                    assert!(FAMILIES[0].kernels.contains(&name), "{name}");
                }
            }
        }
    }
}
