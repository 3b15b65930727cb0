//! The kernel sources (grouped by op family, each prefixed with `prelude.cuh`) and their
//! compilation by NVRTC to PTX for one architecture. Used by the backend at start and by the
//! CI test that compiles every family for sm_90 without a GPU.

use super::CudaError;
use cudarc::nvrtc::{result, sys};
use std::ffi::{CStr, CString};

/// One `.cu` file and the entry points it defines.
#[derive(Clone, Copy, Debug)]
pub struct KernelFamily {
    pub name: &'static str,
    pub source: &'static str,
    pub kernels: &'static [&'static str],
}

const PRELUDE: &str = include_str!("kernels/prelude.cuh");

/// Every kernel family of the backend.
pub const FAMILIES: &[KernelFamily] = &[
    KernelFamily {
        name: "linear",
        source: include_str!("kernels/linear.cu"),
        kernels: &[
            "linear_gemv_bf16_r1",
            "linear_gemv_bf16_r2",
            "linear_gemv_bf16_r4",
            "linear_gemv_bf16_r8",
            "linear_gemv_bf16_r16",
            "linear_gemv_f16_r1",
            "linear_gemv_f16_r2",
            "linear_gemv_f16_r4",
            "linear_gemv_f16_r8",
            "linear_gemv_f16_r16",
            "linear_mma_bf16",
            "linear_mma_f16",
            "lora_shrink_bf16",
            "lora_shrink_f16",
        ],
    },
    KernelFamily {
        name: "norm",
        source: include_str!("kernels/norm.cu"),
        kernels: &["rmsnorm_f32", "add_rmsnorm_f32", "cosine_rows_f32"],
    },
    KernelFamily {
        name: "elementwise",
        source: include_str!("kernels/elementwise.cu"),
        kernels: &["silu_mul_f32", "embed_bf16", "embed_f16", "copy_vecs_f32"],
    },
    KernelFamily {
        name: "rope",
        source: include_str!("kernels/rope.cu"),
        kernels: &["rope_f32"],
    },
    KernelFamily {
        name: "attention",
        source: include_str!("kernels/attention.cu"),
        kernels: &["attention_f32_d2", "attention_f32_d4", "attention_f32_d8"],
    },
    KernelFamily {
        name: "select",
        source: include_str!("kernels/select.cu"),
        kernels: &["argmax_rows_f32", "topk_rows_f32", "head_top_rows_f32"],
    },
];

/// The NVRTC virtual architecture for a compute capability: PTX for `compute_XY`, which the
/// driver turns into machine code for the device when the module loads.
pub fn nvrtc_arch(major: i32, minor: i32) -> String {
    format!("compute_{major}{minor}")
}

/// A compiled family: its PTX and NVRTC's log (warnings; empty when clean).
#[derive(Clone, Debug)]
pub struct CompiledFamily {
    pub family: &'static str,
    pub ptx: String,
    pub log: String,
}

fn nvrtc_err(family: &str, what: &str, e: result::NvrtcError) -> CudaError {
    CudaError::Compile {
        family: family.to_string(),
        log: format!("{what}: {e:?}"),
    }
}

fn c_log(raw: Vec<std::ffi::c_char>) -> String {
    if raw.is_empty() {
        return String::new();
    }
    // SAFETY: NVRTC returns a NUL-terminated log.
    unsafe { CStr::from_ptr(raw.as_ptr()) }
        .to_string_lossy()
        .trim()
        .to_string()
}

/// Compiles one family for `arch` (e.g. `compute_90`). NVRTC must be loadable
/// ([`super::probe_nvrtc`]); this checks it again so it never reaches cudarc's panic.
pub fn compile_family(family: &KernelFamily, arch: &str) -> Result<CompiledFamily, CudaError> {
    super::probe_nvrtc()?;
    let src = format!("{PRELUDE}\n#line 1 \"{}.cu\"\n{}", family.name, family.source);
    let src = CString::new(src).map_err(|_| CudaError::Unsupported("NUL in a kernel source".into()))?;
    let name = CString::new(format!("{}.cu", family.name)).expect("family names have no NUL");
    let prog = result::create_program(&src, Some(&name)).map_err(|e| nvrtc_err(family.name, "create", e))?;
    struct Guard(sys::nvrtcProgram);
    impl Drop for Guard {
        fn drop(&mut self) {
            // SAFETY: the program was created above and is destroyed once.
            let _ = unsafe { result::destroy_program(self.0) };
        }
    }
    let guard = Guard(prog);
    let options = [
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_string(),
        "--fmad=true".to_string(),
        "-lineinfo".to_string(),
    ];
    // SAFETY: `prog` is a live program; the options are plain strings.
    let compiled = unsafe { result::compile_program(guard.0, &options) };
    // SAFETY: as above.
    let log = unsafe { result::get_program_log(guard.0) }
        .map(c_log)
        .unwrap_or_default();
    if let Err(e) = compiled {
        return Err(CudaError::Compile {
            family: family.name.to_string(),
            log: format!("{e:?}\n{log}"),
        });
    }
    // SAFETY: compilation succeeded, so the program holds PTX.
    let ptx = unsafe { result::get_ptx(guard.0) }.map_err(|e| nvrtc_err(family.name, "get_ptx", e))?;
    Ok(CompiledFamily {
        family: family.name,
        ptx: c_log(ptx),
        log,
    })
}
