//! [`CudaBackend`]: the [`Backend`] trait on one GPU.
//!
//! Memory: weights are 16-bit (bf16 by default, f16 with [`WeightType::F16`]) with rows padded
//! to 8 elements, uploaded once by [`Backend::matrix`] (quantized GGML blocks are dequantized
//! on the host first). Activations, norms' weights, biases and the paged KV cache are f32
//! (the trait's buffers are f32 and export/import move f32; the KV cache in f32 keeps
//! export/import exact, at twice the bytes of a bf16 cache: see NOTES.md). Accumulation is f32
//! everywhere.
//!
//! Every operation is queued on one stream the backend owns (non-blocking: it never
//! serialises with the legacy default stream; cudarc's per-allocation event tracking is off, as
//! everything runs on that one stream); the host waits only where the trait returns host data
//! (`to_host`, `logits`, `head_top`, `kv_export`, `cosine_rows`) and in
//! [`CudaBackend::argmax_rows`] and [`CudaBackend::topk_rows`], which return token ids only.
//!
//! Metadata: a pass's rows (positions, depth groups, shrink work, block tables) are uploaded
//! once per pass by [`Backend::prepare_rows`] and read by every layer's kernels (unrolled
//! layers and KV slots are computed on the device from depth and shared layer); LoRA descriptor
//! tables depend only on the resident weights and are uploaded once, then cached; every upload
//! goes through a ring of pinned staging buffers (asynchronous copies, no pageable staging).
//!
//! Errors: the constructor and the extra methods return [`CudaError`]. The trait methods cannot,
//! so a failed launch or copy is logged once and kept: [`CudaBackend::check`] returns it, every
//! later operation is skipped (the context is unusable after most CUDA errors), and methods
//! that return host data return NaN of the right length. Allocation failures in `zeros`,
//! `buffer`, `matrix` and `kv_pool` panic with the request size: they have no value to return
//! and mean the engine was configured for more memory than the device has.

use super::compile::compile_all;
use super::ffi::{Arena, HeadTopDev, LoraArgs, LoraDesc, RowDev, ShrinkItem, SplitArgs};
use super::plan::{
    EntryShape, MAX_WORKSPACE_FLOATS, ProductKernel, RowPlan, SPLIT_COUNTERS, attention_dims_per_lane,
    attention_smem_bytes, kv_export_offsets, kv_write_offsets, padded_ld, plan_call, plan_product, plan_rows,
    plan_shrink_splits, row_offsets,
};
use super::{CudaError, DeviceInfo};
use crate::attention::{AttnRow, AttnShape, KvLayout};
use crate::backend::{Backend, BackendError, HeadTop, HostRows, KvSlot, LoraColumns, MatrixData, RowGroup};
use crate::matmul::MatmulMode;
use crate::qmatmul::dequantize_rows;
use crate::rope::RopeTable;
use cudarc::driver::sys::{CUdevice_attribute, CUevent_flags};
use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaSlice, CudaStream, DevicePtr, DriverError, LaunchConfig, PinnedHostSlice,
    PushKernelArg,
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
/// block of each tile resets its counter), and the LoRA shrink results `t`. Reused by every
/// call: the stream orders a call's use after the previous call's.
struct Scratch {
    ws: Option<CudaSlice<f32>>,
    counters: CudaSlice<i32>,
    t: Option<CudaSlice<f32>>,
}

/// Pinned staging buffers for uploads, used round-robin; a slot is rewritten only after the
/// copy that last read it has run (its event).
struct Staging {
    slots: Vec<StageSlot>,
    next: usize,
}

struct StageSlot {
    buf: Option<PinnedHostSlice<u8>>,
    done: CudaEvent,
}

/// Staging slots: uploads in flight before the host waits for the oldest one.
const STAGE_SLOTS: usize = 8;
/// Smallest staging buffer.
const STAGE_MIN_BYTES: usize = 64 << 10;

/// A pass's row set on the device ([`Backend::prepare_rows`]): the host description, its
/// LoRA row plan, and the device addresses of its arrays inside the pass's single upload.
pub struct CudaRows {
    host: HostRows,
    plan: RowPlan,
    /// Keeps the upload alive while the pass's launches are queued (frees are stream-ordered).
    _meta: Option<Arc<CudaSlice<u8>>>,
    dev: RowsDev,
}

impl AsRef<HostRows> for CudaRows {
    fn as_ref(&self) -> &HostRows {
        &self.host
    }
}

/// Device addresses of a row set's arrays (0 where empty).
#[derive(Clone, Copy, Debug, Default)]
struct RowsDev {
    positions: u64,
    row_adapter: u64,
    small: u64,
    tiles: u64,
    rows: u64,
    tables: u64,
}

/// The CUDA backend on one device. See the module documentation for memory and errors.
pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    info: DeviceInfo,
    wt: WeightType,
    funcs: Arc<HashMap<&'static str, CudaFunction>>,
    scratch: Mutex<Scratch>,
    staging: Mutex<Staging>,
    /// LoRA descriptor tables by content (they hold only resident weights' addresses and
    /// shapes, so a table is uploaded once and reused by every later call).
    descs: Mutex<HashMap<Vec<u8>, CudaSlice<u8>>>,
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

/// A CUDA error as the [`Backend`] trait reports it, naming the operation that hit it.
fn backend_error(op: &'static str, e: CudaError) -> BackendError {
    match e {
        CudaError::Unsupported(m) => BackendError::Unsupported(format!("{op}: {m}")),
        other => BackendError::Device {
            op,
            detail: other.to_string(),
        },
    }
}

fn alloc_error(what: String) -> impl Fn(DriverError) -> BackendError {
    move |e| BackendError::Alloc {
        what: what.clone(),
        detail: format!("{e:?}"),
    }
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
    /// cudarc call, creates the context and the backend's own stream, and loads every kernel
    /// family as machine code for the device ([`compile_all`]: compiled in parallel, or read
    /// from the kernel cache).
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
        // SAFETY: every allocation and launch of this backend goes to its one stream (created
        // next), so no buffer needs cudarc's cross-stream events; callers that add streams of
        // their own (a baseline, a test) synchronise themselves.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(drv("cuStreamCreate"))?;
        let t0 = std::time::Instant::now();
        let images = compile_all(info.compute_capability)?;
        let mut funcs = HashMap::new();
        for img in &images {
            if !img.log.is_empty() {
                tracing::warn!(family = img.family.name, log = %img.log, "NVRTC warnings");
            }
            let module = ctx
                .load_module(cudarc::nvrtc::Ptx::from_binary(img.cubin.clone()))
                .map_err(drv("cuModuleLoadData"))?;
            for &k in img.family.kernels {
                funcs.insert(k, module.load_function(k).map_err(drv("cuModuleGetFunction"))?);
            }
        }
        let cached = images.iter().filter(|i| i.from_cache).count();
        tracing::info!(
            seconds = t0.elapsed().as_secs_f64(),
            families = images.len(),
            from_cache = cached,
            "CUDA kernels loaded"
        );
        Self::assemble(ctx, stream, info, wt, Arc::new(funcs))
    }

    /// A second backend on the same device, stream and loaded kernels with another weight
    /// type (nothing is compiled or loaded again).
    pub fn sibling(&self, wt: WeightType) -> Result<Self, CudaError> {
        Self::assemble(
            self.ctx.clone(),
            self.stream.clone(),
            self.info.clone(),
            wt,
            self.funcs.clone(),
        )
    }

    fn assemble(
        ctx: Arc<CudaContext>,
        stream: Arc<CudaStream>,
        info: DeviceInfo,
        wt: WeightType,
        funcs: Arc<HashMap<&'static str, CudaFunction>>,
    ) -> Result<Self, CudaError> {
        let counters = stream
            .alloc_zeros::<i32>(SPLIT_COUNTERS)
            .map_err(drv("split-K counters"))?;
        let mut slots = Vec::with_capacity(STAGE_SLOTS);
        for _ in 0..STAGE_SLOTS {
            slots.push(StageSlot {
                buf: None,
                done: ctx
                    .new_event(Some(CUevent_flags::CU_EVENT_DISABLE_TIMING))
                    .map_err(drv("cuEventCreate"))?,
            });
        }
        let sync_each = std::env::var("RRT_CUDA_SYNC").is_ok_and(|v| v == "1");
        Ok(Self {
            ctx,
            stream,
            info,
            wt,
            funcs,
            scratch: Mutex::new(Scratch {
                ws: None,
                counters,
                t: None,
            }),
            staging: Mutex::new(Staging { slots, next: 0 }),
            descs: Mutex::new(HashMap::new()),
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

    fn record(&self, op: &'static str, r: Result<(), CudaError>) {
        if let Err(e) = r {
            let mut g = lock(&self.error);
            if g.is_none() {
                tracing::error!(op, error = %e, "CUDA backend operation failed; later operations are skipped");
                *g = Some(e);
            }
        }
    }

    /// Runs one trait operation: refused once an earlier one failed (the device state is
    /// unknown after a fault), its error recorded (sticky, [`Backend::fault`]) and returned.
    fn run<T>(&self, op: &'static str, f: impl FnOnce() -> Result<T, CudaError>) -> Result<T, BackendError> {
        if let Some(e) = lock(&self.error).clone() {
            return Err(backend_error(op, e));
        }
        f().map_err(|e| {
            self.record(op, Err(e.clone()));
            backend_error(op, e)
        })
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
        self.upload_bytes(&a.bytes).map(Some)
    }

    /// Copies `bytes` to a new device buffer through the pinned staging ring: the copy is
    /// asynchronous; the host waits only when it comes back to a slot whose last copy has not
    /// run yet (`STAGE_SLOTS` uploads later).
    fn upload_bytes(&self, bytes: &[u8]) -> Result<CudaSlice<u8>, CudaError> {
        let mut st = lock(&self.staging);
        let i = st.next;
        st.next = (i + 1) % STAGE_SLOTS;
        let slot = &mut st.slots[i];
        slot.done.synchronize().map_err(drv("staging event"))?;
        if slot.buf.as_ref().is_none_or(|b| b.len() < bytes.len()) {
            slot.buf = None;
            let size = bytes.len().max(STAGE_MIN_BYTES).next_power_of_two();
            // SAFETY: the contents are written below before any copy reads them.
            let b = unsafe { self.ctx.alloc_pinned::<u8>(size) }.map_err(drv("cuMemHostAlloc"))?;
            slot.buf = Some(b);
        }
        let host = slot
            .buf
            .as_mut()
            .expect("allocated above")
            .as_mut_slice()
            .map_err(drv("staging buffer"))?;
        host[..bytes.len()].copy_from_slice(bytes);
        // SAFETY: filled completely by the copy queued next, before any kernel reads it.
        let dst = unsafe { self.stream.alloc::<u8>(bytes.len()) }.map_err(drv("cuMemAlloc"))?;
        let dp = self.ptr(&dst);
        // SAFETY: `host[..len]` is pinned memory that stays untouched until `done` (recorded
        // right after the copy on the same stream) has passed; `dst` holds `len` bytes.
        unsafe { cudarc::driver::result::memcpy_htod_async(dp, &host[..bytes.len()], self.stream.cu_stream()) }
            .map_err(drv("metadata upload"))?;
        slot.done.record(&self.stream).map_err(drv("staging event"))?;
        Ok(dst)
    }

    /// The device address of this LoRA descriptor table, uploaded on first use.
    fn desc_table(&self, descs: &[LoraDesc]) -> Result<u64, CudaError> {
        let key = super::ffi::bytes_of(descs).to_vec();
        let mut cache = lock(&self.descs);
        if let Some(s) = cache.get(&key) {
            return Ok(self.ptr(s));
        }
        if cache.len() >= 4096 {
            // Another model's tables (a reload): start over rather than grow without bound.
            cache.clear();
        }
        let s = self.upload_bytes(&key)?;
        let p = self.ptr(&s);
        cache.insert(key, s);
        Ok(p)
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

    /// The row plan's arrays for one call outside a pass, uploaded together.
    fn upload_plan(&self, plan: &RowPlan) -> Result<(Option<CudaSlice<u8>>, RowsDev), CudaError> {
        let mut arena = Arena::default();
        let (oa, os, ot) = push_plan(&mut arena, plan);
        let meta = self.upload_arena(&arena)?;
        let base = meta.as_ref().map_or(0, |m| self.ptr(m));
        let at = |o: Option<usize>| o.map_or(0, |o| base + o as u64);
        Ok((
            meta,
            RowsDev {
                row_adapter: at(oa),
                small: at(os),
                tiles: at(ot),
                ..Default::default()
            },
        ))
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
        if n == 0 {
            return Ok(());
        }
        let plan = plan_rows(n, groups).map_err(|e| unsupported(e.to_string()))?;
        let (_meta, dev) = if loras.is_empty() {
            (None, RowsDev::default())
        } else {
            self.upload_plan(&plan)?
        };
        self.linear_core(x, n, &plan, &dev, w, bias, loras, y, mode)
    }

    /// The fused product over `n` rows whose LoRA side is `plan` (on the device at `dev`):
    /// at most one shrink launch (every group and entry) and one product launch.
    #[allow(clippy::too_many_arguments)]
    fn linear_core(
        &self,
        x: &CudaBuf,
        n: usize,
        plan: &RowPlan,
        dev: &RowsDev,
        w: &CudaMat,
        bias: Option<&CudaBuf>,
        loras: &[LoraColumns<'_, CudaMat>],
        y: &mut CudaBuf,
        mode: MatmulMode,
    ) -> Result<(), CudaError> {
        let (k, m) = (w.in_dim, w.out_dim);
        if n == 0 {
            return Ok(());
        }
        if x.len() < n * k || y.len() < n * m || bias.is_some_and(|b| b.len() < m) || plan.row_adapter.len() != n {
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
        let xp = self.ptr(&x.data);
        let yp = self.ptr(&y.data);
        let bp = bias.map_or(0, |b| self.ptr(&b.data));
        let mut la = LoraArgs::default();
        if let Some(call) = plan_call(plan, &entries).map_err(|e| unsupported(e.to_string()))? {
            let na = call.n_adapters;
            let mut descs = vec![LoraDesc::default(); entries.len() * na];
            for (e, lc) in loras.iter().enumerate() {
                for (a, l) in lc.per_adapter.iter().enumerate() {
                    if let Some(l) = l.as_ref().filter(|l| l.rank > 0) {
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
            let descs_p = self.desc_table(&descs)?;
            let blocks = plan.small.len() + plan.tiles.len();
            let per_entry = call.rank_blocks.max(call.col_tiles);
            let (splits, k_chunk) =
                plan_shrink_splits(blocks * entries.len() * per_entry, k, self.info.multiprocessors);
            let t = {
                let mut scratch = lock(&self.scratch);
                let need = splits * n * call.ldt;
                if scratch.t.as_ref().is_none_or(|t| t.len() < need) {
                    scratch.t = None;
                    scratch.t = Some(self.alloc_f32(need.next_power_of_two())?);
                }
                self.ptr(scratch.t.as_ref().expect("allocated above"))
            };
            la = LoraArgs {
                descs: descs_p,
                row_adapter: dev.row_adapter,
                t,
                ldt: i32_of(call.ldt, "ldt")?,
                rmax: i32_of(call.rmax, "rank")?,
                n_entries: entries.len() as i32,
                n_adapters: na as i32,
                col0: [0; 4],
                cols: [0; 4],
                t_splits: splits as i32,
                t_stride: i32_of(n * call.ldt, "t stride")?,
            };
            for (i, e) in entries.iter().enumerate() {
                la.col0[i] = i32_of(e.col0, "col0")?;
                la.cols[i] = i32_of(e.cols, "cols")?;
            }
            if blocks > 0 {
                let name = match self.wt {
                    WeightType::Bf16 => "lora_shrink_bf16",
                    WeightType::F16 => "lora_shrink_f16",
                };
                let cfg = LaunchConfig {
                    grid_dim: (blocks as u32, (entries.len() * per_entry) as u32, splits as u32),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                };
                let (ldx, k_) = (i32_of(k, "in_dim")?, i32_of(k, "in_dim")?);
                let n_small = plan.small.len() as i32;
                let (rb, ct) = (call.rank_blocks as i32, call.col_tiles as i32);
                let kc = i32_of(k_chunk, "k chunk")?;
                let mut b = self.stream.launch_builder(self.func(name)?);
                b.arg(&xp)
                    .arg(&ldx)
                    .arg(&k_)
                    .arg(&kc)
                    .arg(&dev.small)
                    .arg(&n_small)
                    .arg(&dev.tiles)
                    .arg(&rb)
                    .arg(&ct)
                    .arg(&la);
                // SAFETY: x holds n x k floats; the items and tiles (uploaded with the rows)
                // cover rows below n; `t` holds n x ldt floats; the descriptors point at
                // resident matrices of the shapes checked above; arguments match
                // SHRINK_PARAMS in linear.cu.
                unsafe { b.launch(cfg) }.map_err(drv(name))?;
                self.after_launch(name)?;
            }
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

    /// Final norm (if given) + LM head of rows `select` of `x`, left on the device
    /// (`select.len() x vocab`), for [`CudaBackend::argmax_rows`] / [`CudaBackend::topk_rows`].
    pub fn logits_device(
        &self,
        x: &CudaBuf,
        width: usize,
        select: &[u32],
        norm: Option<&CudaBuf>,
        eps: f32,
        head: &CudaMat,
    ) -> Result<CudaBuf, CudaError> {
        self.check()?;
        let s = select.len();
        let out = self.alloc_f32(s * head.out_dim)?;
        if s == 0 {
            return Ok(CudaBuf { data: out });
        }
        if head.in_dim != width
            || norm.is_some_and(|n| n.len() < width)
            || select.iter().any(|&r| (r as usize + 1) * width > x.len())
        {
            return Err(unsupported("logits: rows or widths outside the buffers"));
        }
        let normed = self.alloc_f32(s * width)?;
        match norm {
            Some(norm) => {
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
            }
            None => {
                let so = row_offsets(select.iter().map(|&r| r as usize), width);
                let d = row_offsets(0..s, width);
                self.copy_vecs(self.ptr(&normed), &d, self.ptr(&x.data), &so, width)?;
            }
        }
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
        norm: Option<&CudaBuf>,
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
        // SAFETY: every element is written by the kernel before the copy back reads it.
        let out = unsafe { self.stream.alloc::<HeadTopDev>(rows) }.map_err(drv("cuMemAlloc"))?;
        let (lp, op) = (self.ptr(&logits.data), self.ptr(&out));
        let v = i32_of(vocab, "vocab")?;
        let cfg = per_row(rows);
        let mut b = self.stream.launch_builder(self.func("head_top_rows_f32")?);
        b.arg(&lp).arg(&v).arg(&op);
        // SAFETY: logits hold rows x vocab floats; `out` holds one HeadTopDev per row.
        unsafe { b.launch(cfg) }.map_err(drv("head_top_rows_f32"))?;
        // One copy back for all rows.
        let host = self.stream.clone_dtoh(&out).map_err(drv("head top to host"))?;
        self.synchronize()?;
        Ok(host
            .iter()
            .map(|h| HeadTop {
                id: h.id,
                top: h.top,
                second: h.second,
                sum_exp: h.sum_exp,
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
        // Outside a pass, a row's layer is its "depth" with one shared layer (layer = depth).
        let mut tables: Vec<u32> = Vec::new();
        let mut seen: HashMap<(usize, usize), usize> = HashMap::new();
        let mut dev_rows = Vec::with_capacity(n);
        for r in rows {
            if r.blocks.len() < r.pos / layout.block_size + 1 || r.layer >= layout.n_layers {
                return Err(unsupported("attention: block table shorter than the position"));
            }
            let key = (r.blocks.as_ptr() as usize, r.blocks.len());
            let off = *seen.entry(key).or_insert_with(|| {
                let o = tables.len();
                tables.extend_from_slice(r.blocks);
                o
            });
            dev_rows.push(RowDev {
                pos: i32_of(r.pos, "position")?,
                depth: i32_of(r.layer, "layer")?,
                table: i32_of(off, "block table offset")?,
                pad: 0,
            });
        }
        let mut arena = Arena::default();
        let or = arena.push(&dev_rows);
        let ot = arena.push(&tables);
        let meta = self.upload_arena(&arena)?.expect("rows are not empty");
        let base = self.ptr(&meta);
        self.attention_core(
            qkv,
            ld,
            n,
            base + or as u64,
            base + ot as u64,
            1,
            0,
            kv,
            layout,
            shape,
            out,
        )
    }

    /// Attention of `n` rows described on the device (`rows`: [`RowDev`], `tables`), each at
    /// unrolled layer `depth * shared + k`.
    #[allow(clippy::too_many_arguments)]
    fn attention_core(
        &self,
        qkv: &CudaBuf,
        ld: usize,
        n: usize,
        rows: u64,
        tables: u64,
        shared: usize,
        k: usize,
        kv: &CudaKv,
        layout: &KvLayout,
        shape: AttnShape,
        out: &mut CudaBuf,
    ) -> Result<(), CudaError> {
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
        let name = match dpl {
            2 => "attention_f32_d2",
            4 => "attention_f32_d4",
            _ => "attention_f32_d8",
        };
        let (qp, pp, op) = (self.ptr(&qkv.data), self.ptr(&kv.data), self.ptr(&out.data));
        let window: i32 = match shape.window {
            None => -1,
            Some(w) => i32::try_from(w).unwrap_or(i32::MAX),
        };
        let (ld_, sh, k_, nl, bs, nkv_, hd_, g_) = (
            i32_of(ld, "ld")?,
            i32_of(shared, "shared layers")?,
            i32_of(k, "shared layer")?,
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
            .arg(&rows)
            .arg(&tables)
            .arg(&sh)
            .arg(&k_)
            .arg(&window)
            .arg(&pp)
            .arg(&nl)
            .arg(&bs)
            .arg(&nkv_)
            .arg(&hd_)
            .arg(&g_)
            .arg(&shape.scale)
            .arg(&op);
        // SAFETY: the rows' positions are inside their block tables and their layers below
        // n_layers (checked where the rows were built); the argument list matches ATTN_PARAMS.
        unsafe { b.launch(cfg) }.map_err(drv(name))?;
        self.after_launch(name)
    }

    /// RoPE of `n` rows at the positions on the device at `positions`.
    #[allow(clippy::too_many_arguments)]
    fn rope_core(
        &self,
        rope: &RopeTable,
        qkv: &mut CudaBuf,
        ld: usize,
        n: usize,
        positions: u64,
        q_cols: usize,
        k_col0: usize,
        k_cols: usize,
    ) -> Result<(), CudaError> {
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
        let qp = self.ptr(&qkv.data);
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
            .arg(&positions)
            .arg(&inv)
            .arg(&half)
            .arg(&hd_)
            .arg(&qc)
            .arg(&k0)
            .arg(&kc);
        // SAFETY: every rotated column lies inside its row (checked); `positions` holds n words
        // and the frequency table `half` doubles.
        unsafe { b.launch(cfg) }.map_err(drv("rope_f32"))?;
        self.after_launch("rope_f32")
    }

    /// Checks a pass's row set against the KV layout before kernels index with it.
    fn check_rows(&self, h: &HostRows, layout: &KvLayout) -> Result<(), CudaError> {
        if h.block_size != layout.block_size {
            return Err(unsupported("rows prepared for another KV block size"));
        }
        for i in 0..h.len() {
            let pos = h.positions[i] as usize;
            if h.blocks(i).len() <= pos / layout.block_size
                || (h.depths[i] as usize + 1) * h.shared.max(1) > layout.n_layers
            {
                return Err(unsupported("a row's block table or depth is outside the KV layout"));
            }
        }
        Ok(())
    }
}

/// Pushes a row plan's arrays (row adapters, warp items, tensor-core tiles) to `arena`; the
/// offsets of the non-empty ones.
fn push_plan(arena: &mut Arena, plan: &RowPlan) -> (Option<usize>, Option<usize>, Option<usize>) {
    let items = |v: &[super::plan::ShrinkItem]| -> Vec<ShrinkItem> {
        v.iter()
            .map(|t| ShrinkItem {
                row0: t.row0 as i32,
                rows: t.rows as i32,
                adapter: t.adapter as i32,
                pad: 0,
            })
            .collect()
    };
    let oa = (!plan.row_adapter.is_empty()).then(|| arena.push(&plan.row_adapter));
    let os = (!plan.small.is_empty()).then(|| arena.push(&items(&plan.small)));
    let ot = (!plan.tiles.is_empty()).then(|| arena.push(&items(&plan.tiles)));
    (oa, os, ot)
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
    type Rows = CudaRows;

    /// One upload for every set: positions, row adapters, shrink items and tiles, rows and
    /// block tables, all in one arena.
    fn prepare_rows(&self, sets: Vec<HostRows>) -> Result<Vec<CudaRows>, BackendError> {
        let mut arena = Arena::default();
        let mut planned = Vec::with_capacity(sets.len());
        let mut bad = None;
        for h in sets {
            let plan = match plan_rows(h.len(), &h.groups) {
                Ok(p) => p,
                Err(e) => {
                    bad.get_or_insert(unsupported(e.to_string()));
                    RowPlan::default()
                }
            };
            let offs = if h.is_empty() {
                None
            } else {
                let op = arena.push(&h.positions);
                let (oa, os, ot) = push_plan(&mut arena, &plan);
                let rows: Vec<RowDev> = (0..h.len())
                    .map(|i| RowDev {
                        pos: h.positions[i] as i32,
                        depth: h.depths[i] as i32,
                        table: h.table_of[i].0 as i32,
                        pad: 0,
                    })
                    .collect();
                let or = arena.push(&rows);
                let ot2 = (!h.tables.is_empty()).then(|| arena.push(&h.tables));
                Some((op, oa, os, ot, or, ot2))
            };
            planned.push((h, plan, offs));
        }
        if let Some(e) = bad {
            self.record("prepare_rows", Err(e.clone()));
            return Err(backend_error("prepare_rows", e));
        }
        let meta = self.run("prepare_rows", || Ok(self.upload_arena(&arena)?.map(Arc::new)))?;
        let base = meta.as_ref().map_or(0, |m| self.ptr(m));
        let at = |o: Option<usize>| o.map_or(0, |o| if base == 0 { 0 } else { base + o as u64 });
        Ok(planned
            .into_iter()
            .map(|(host, plan, offs)| {
                let dev = match offs {
                    Some((op, oa, os, ot, or, otab)) => RowsDev {
                        positions: at(Some(op)),
                        row_adapter: at(oa),
                        small: at(os),
                        tiles: at(ot),
                        rows: at(Some(or)),
                        tables: at(otab),
                    },
                    None => RowsDev::default(),
                };
                CudaRows {
                    host,
                    plan,
                    _meta: meta.clone(),
                    dev,
                }
            })
            .collect())
    }

    fn linear_lora_rows(
        &self,
        x: &CudaBuf,
        rows: &CudaRows,
        w: &CudaMat,
        bias: Option<&CudaBuf>,
        loras: &[LoraColumns<'_, CudaMat>],
        y: &mut CudaBuf,
        mode: MatmulMode,
    ) -> Result<(), BackendError> {
        self.run("linear_lora", || {
            self.linear_core(x, rows.host.len(), &rows.plan, &rows.dev, w, bias, loras, y, mode)
        })
    }

    fn rope_rows(
        &self,
        rope: &RopeTable,
        qkv: &mut CudaBuf,
        ld: usize,
        rows: &CudaRows,
        q_cols: usize,
        k_col0: usize,
        k_cols: usize,
    ) -> Result<(), BackendError> {
        self.run("rope", || {
            self.rope_core(
                rope,
                qkv,
                ld,
                rows.host.len(),
                rows.dev.positions,
                q_cols,
                k_col0,
                k_cols,
            )
        })
    }

    fn kv_write_rows(
        &self,
        kv: &mut CudaKv,
        layout: &KvLayout,
        src: &CudaBuf,
        ld: usize,
        k_col0: usize,
        v_col0: usize,
        rows: &CudaRows,
        k: usize,
    ) -> Result<(), BackendError> {
        self.run("kv_write", || {
            let h = &rows.host;
            let n = h.len();
            if n == 0 {
                return Ok(());
            }
            let kd = layout.kv_dim();
            self.check_rows(h, layout)?;
            if k >= h.shared || src.len() < (n - 1) * ld + k_col0.max(v_col0) + kd {
                return Err(unsupported("kv_write: shared layer or columns outside the rows"));
            }
            let (pp, rp, tp, sp) = (self.ptr(&kv.data), rows.dev.rows, rows.dev.tables, self.ptr(&src.data));
            let (sh, k_, nl, bs, kd_, ld_, kc, vc) = (
                i32_of(h.shared, "shared layers")?,
                i32_of(k, "shared layer")?,
                i32_of(layout.n_layers, "layers")?,
                i32_of(layout.block_size, "block size")?,
                i32_of(kd, "kv dim")?,
                i32_of(ld, "ld")?,
                i32_of(k_col0, "k_col0")?,
                i32_of(v_col0, "v_col0")?,
            );
            let cfg = LaunchConfig {
                grid_dim: (n as u32, 1, 1),
                block_dim: (kd.next_power_of_two().clamp(32, 256) as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut b = self.stream.launch_builder(self.func("kv_write_rows_f32")?);
            b.arg(&pp)
                .arg(&rp)
                .arg(&tp)
                .arg(&sh)
                .arg(&k_)
                .arg(&nl)
                .arg(&bs)
                .arg(&kd_)
                .arg(&sp)
                .arg(&ld_)
                .arg(&kc)
                .arg(&vc);
            // SAFETY: every row's block and layer lie inside the pool (check_rows), its source
            // columns inside `src`; arguments match kv_write_rows_f32.
            unsafe { b.launch(cfg) }.map_err(drv("kv_write_rows_f32"))?;
            self.after_launch("kv_write_rows_f32")
        })
    }

    fn attention_rows(
        &self,
        qkv: &CudaBuf,
        ld: usize,
        rows: &CudaRows,
        k: usize,
        kv: &CudaKv,
        layout: &KvLayout,
        shape: AttnShape,
        out: &mut CudaBuf,
    ) -> Result<(), BackendError> {
        self.run("attention", || {
            let h = &rows.host;
            self.check_rows(h, layout)?;
            if k >= h.shared.max(1) {
                return Err(unsupported("attention: shared layer outside the loop"));
            }
            self.attention_core(
                qkv,
                ld,
                h.len(),
                rows.dev.rows,
                rows.dev.tables,
                h.shared,
                k,
                kv,
                layout,
                shape,
                out,
            )
        })
    }

    fn fault(&self) -> Option<BackendError> {
        self.check().err().map(|e| backend_error("an earlier operation", e))
    }

    fn prefers_head_top(&self) -> bool {
        true
    }

    fn head_top(
        &self,
        x: &CudaBuf,
        width: usize,
        select: &[u32],
        norm: Option<&CudaBuf>,
        eps: f32,
        head: &CudaMat,
    ) -> Result<Vec<HeadTop>, BackendError> {
        self.run("head_top", || self.head_top_device(x, width, select, norm, eps, head))
    }

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn matrix(&self, out_dim: usize, in_dim: usize, data: MatrixData) -> Result<CudaMat, BackendError> {
        let host = encode_rows(self.wt, out_dim, in_dim, &data);
        drop(data);
        let data = self
            .stream
            .clone_htod(&host)
            .map_err(alloc_error(format!("a {out_dim} x {in_dim} matrix")))?;
        Ok(CudaMat {
            out_dim,
            in_dim,
            ld: padded_ld(in_dim),
            wt: self.wt,
            data,
        })
    }

    fn buffer(&self, values: Vec<f32>) -> Result<CudaBuf, BackendError> {
        let data = if values.is_empty() {
            self.alloc_f32(0)
        } else {
            self.stream.clone_htod(&values).map_err(drv("upload"))
        }
        .map_err(|e| BackendError::Alloc {
            what: format!("{} floats", values.len()),
            detail: e.to_string(),
        })?;
        Ok(CudaBuf { data })
    }

    fn zeros(&self, len: usize) -> Result<CudaBuf, BackendError> {
        let data = self
            .stream
            .alloc_zeros::<f32>(len.max(1))
            .map_err(alloc_error(format!("{len} floats")))?;
        Ok(CudaBuf { data })
    }

    fn to_host(&self, buf: &CudaBuf) -> Result<Vec<f32>, BackendError> {
        self.run("to_host", || self.download(&buf.data, buf.len()))
    }

    fn kv_pool(&self, layout: KvLayout, n_blocks: usize) -> Result<CudaKv, BackendError> {
        let len = n_blocks * layout.block_floats();
        let data = self
            .stream
            .alloc_zeros::<f32>(len.max(1))
            .map_err(alloc_error(format!("a KV pool of {len} floats")))?;
        Ok(CudaKv { data })
    }

    fn matrix_bytes(&self, m: &CudaMat) -> usize {
        m.out_dim * m.ld * 2
    }

    fn embed(&self, table: &CudaMat, tokens: &[u32], out: &mut CudaBuf) -> Result<(), BackendError> {
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
        })
    }

    fn copy_rows(
        &self,
        src: &CudaBuf,
        src_rows: &[u32],
        dst: &mut CudaBuf,
        dst_row0: usize,
        width: usize,
    ) -> Result<(), BackendError> {
        self.run("copy_rows", || {
            if src_rows.iter().any(|&r| (r as usize + 1) * width > src.len())
                || (dst_row0 + src_rows.len()) * width > dst.len()
            {
                return Err(unsupported("copy_rows: rows outside the buffers"));
            }
            let so = row_offsets(src_rows.iter().map(|&r| r as usize), width);
            let d = row_offsets(dst_row0..dst_row0 + src_rows.len(), width);
            self.copy_vecs(self.ptr(&dst.data), &d, self.ptr(&src.data), &so, width)
        })
    }

    fn rmsnorm(&self, x: &CudaBuf, w: &CudaBuf, eps: f32, out: &mut CudaBuf) -> Result<(), BackendError> {
        self.run("rmsnorm", || {
            let dim = w.len();
            let rows = x.len() / dim.max(1);
            if out.len() < rows * dim {
                return Err(unsupported("rmsnorm: output smaller than input"));
            }
            self.launch_rmsnorm(self.ptr(&x.data), 0, &w.data, eps, self.ptr(&out.data), rows, dim)
        })
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
    ) -> Result<(), BackendError> {
        self.run("linear_lora", || {
            self.try_linear_lora(x, n, w, bias, loras, groups, y, mode)
        })
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
    ) -> Result<(), BackendError> {
        self.run("rope", || {
            if positions.is_empty() {
                return Ok(());
            }
            let mut arena = Arena::default();
            arena.push(positions);
            let meta = self.upload_arena(&arena)?.expect("positions are not empty");
            self.rope_core(rope, qkv, ld, positions.len(), self.ptr(&meta), q_cols, k_col0, k_cols)
        })
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
    ) -> Result<(), BackendError> {
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
        })
    }

    fn kv_export(
        &self,
        kv: &CudaKv,
        layout: &KvLayout,
        blocks: &[u32],
        positions: usize,
    ) -> Result<Vec<f32>, BackendError> {
        let kd = layout.kv_dim();
        let len = positions * layout.n_layers * 2 * kd;
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
            self.download(&buf, len)
        })
    }

    fn kv_import(&self, kv: &mut CudaKv, layout: &KvLayout, blocks: &[u32], data: &[f32]) -> Result<(), BackendError> {
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
        })
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
    ) -> Result<(), BackendError> {
        self.run("attention", || {
            self.try_attention(qkv, ld, rows, kv, layout, shape, out)
        })
    }

    fn silu_mul(&self, gu: &CudaBuf, n: usize, inter: usize, out: &mut CudaBuf) -> Result<(), BackendError> {
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
        })
    }

    fn add_normed_branch(&self, t: &CudaBuf, w: &CudaBuf, eps: f32, x: &mut CudaBuf) -> Result<(), BackendError> {
        self.run("add_normed_branch", || {
            let dim = w.len();
            let rows = t.len() / dim.max(1);
            if dim == 0 || rows == 0 {
                return Ok(());
            }
            if x.len() < rows * dim {
                return Err(unsupported("add_normed_branch: x smaller than the branch"));
            }
            let (xp, tp, wp) = (self.ptr(&x.data), self.ptr(&t.data), self.ptr(&w.data));
            let dim_ = i32_of(dim, "width")?;
            let mut b = self.stream.launch_builder(self.func("add_normed_branch_f32")?);
            b.arg(&xp).arg(&tp).arg(&wp).arg(&eps).arg(&dim_);
            // SAFETY: x and t hold rows x dim floats, w dim.
            unsafe { b.launch(per_row(rows)) }.map_err(drv("add_normed_branch_f32"))?;
            self.after_launch("add_normed_branch_f32")
        })
    }

    fn dot_rows(&self, x: &CudaBuf, width: usize, rows: &[u32], w: &CudaBuf) -> Result<Vec<f32>, BackendError> {
        self.run("dot_rows", || {
            if rows.is_empty() || width == 0 {
                return Ok(vec![f32::NAN; rows.len()]);
            }
            if w.len() < width || rows.iter().any(|&r| (r as usize + 1) * width > x.len()) {
                return Err(unsupported("dot_rows: rows outside the buffers"));
            }
            let mut arena = Arena::default();
            arena.push(rows);
            let meta = self.upload_arena(&arena)?.expect("rows are not empty");
            let res = self.alloc_f32(rows.len())?;
            let (xp, rp, wp, op) = (self.ptr(&x.data), self.ptr(&meta), self.ptr(&w.data), self.ptr(&res));
            let w_ = i32_of(width, "width")?;
            let mut b = self.stream.launch_builder(self.func("dot_rows_f32")?);
            b.arg(&xp).arg(&rp).arg(&wp).arg(&w_).arg(&op);
            // SAFETY: every row lies inside x (checked), w holds width floats.
            unsafe { b.launch(per_row(rows.len())) }.map_err(drv("dot_rows_f32"))?;
            self.download(&res, rows.len())
        })
    }

    fn logits(
        &self,
        x: &CudaBuf,
        width: usize,
        select: &[u32],
        norm: Option<&CudaBuf>,
        eps: f32,
        head: &CudaMat,
    ) -> Result<Vec<f32>, BackendError> {
        self.run("logits", || {
            let dev = self.logits_device(x, width, select, norm, eps, head)?;
            self.download(&dev.data, select.len() * head.out_dim)
        })
    }

    fn cosine_rows(&self, a: &CudaBuf, b: &CudaBuf, width: usize, rows: &[u32]) -> Result<Vec<f32>, BackendError> {
        self.run("cosine_rows", || {
            if rows.is_empty() || width == 0 {
                return Ok(vec![f32::NAN; rows.len()]);
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
            self.download(&res, rows.len())
        })
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
                    assert!(crate::cuda::FAMILIES[0].kernels.contains(&name), "{name}");
                }
            }
        }
    }
}
