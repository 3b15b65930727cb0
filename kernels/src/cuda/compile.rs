//! The kernel sources (grouped by op family, each prefixed with `prelude.cuh`) and their
//! compilation by NVRTC for one architecture: PTX (the CI test compiles every family for
//! sm_90 without a GPU and hands it to ptxas) or machine code (CUBIN, what the backend loads:
//! no JIT by the driver at module load).
//!
//! [`compile_all`] is what the backend calls at start: every family compiled on its own thread
//! (NVRTC is thread-safe across programs), each CUBIN kept in a disk cache keyed by the source,
//! the options, the architecture and the NVRTC version, so only the first start of a build on a
//! machine pays the compilation (about 34 s on an H200 machine's CPU, GPU run 1).

use super::CudaError;
use cudarc::nvrtc::{result, sys};
use sha2::{Digest, Sha256};
use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};

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
        kernels: &[
            "rmsnorm_f32",
            "add_rmsnorm_f32",
            "add_normed_branch_f32",
            "cosine_rows_f32",
            "dot_rows_f32",
        ],
    },
    KernelFamily {
        name: "elementwise",
        source: include_str!("kernels/elementwise.cu"),
        kernels: &[
            "silu_mul_f32",
            "embed_bf16",
            "embed_f16",
            "copy_vecs_f32",
            "kv_write_rows_f32",
        ],
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

/// What NVRTC produces: PTX text for a virtual architecture (`compute_XY`), machine code for a
/// real one (`sm_XY`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    Ptx,
    Cubin,
}

const OPTIONS: [&str; 3] = ["--std=c++17", "--fmad=true", "-lineinfo"];

/// The full source NVRTC compiles for `family`.
fn full_source(family: &KernelFamily) -> String {
    format!("{PRELUDE}\n#line 1 \"{}.cu\"\n{}", family.name, family.source)
}

/// Compiles `family` for `arch` and returns NVRTC's output bytes and log.
fn compile_raw(family: &KernelFamily, arch: &str, output: Output) -> Result<(Vec<u8>, String), CudaError> {
    super::probe_nvrtc()?;
    let src = CString::new(full_source(family)).map_err(|_| CudaError::Unsupported("NUL in a kernel source".into()))?;
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
    let mut options = vec![format!("--gpu-architecture={arch}")];
    options.extend(OPTIONS.iter().map(|o| o.to_string()));
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
    let bytes = match output {
        Output::Ptx => {
            // SAFETY: compilation succeeded, so the program holds PTX.
            let ptx = unsafe { result::get_ptx(guard.0) }.map_err(|e| nvrtc_err(family.name, "get_ptx", e))?;
            c_log(ptx).into_bytes()
        }
        Output::Cubin => {
            let mut size = 0usize;
            // SAFETY: a compiled program for a real architecture holds a CUBIN; NVRTC writes its
            // size, then exactly that many bytes into the buffer.
            unsafe { sys::nvrtcGetCUBINSize(guard.0, &mut size) }
                .result()
                .map_err(|e| nvrtc_err(family.name, "get_cubin_size", e))?;
            if size == 0 {
                return Err(nvrtc_err(
                    family.name,
                    "get_cubin (empty: not a real architecture?)",
                    result::NvrtcError(sys::nvrtcResult::NVRTC_ERROR_INVALID_INPUT),
                ));
            }
            let mut buf = vec![0u8; size];
            // SAFETY: as above; `buf` holds `size` bytes.
            unsafe { sys::nvrtcGetCUBIN(guard.0, buf.as_mut_ptr().cast()) }
                .result()
                .map_err(|e| nvrtc_err(family.name, "get_cubin", e))?;
            buf
        }
    };
    Ok((bytes, log))
}

/// Compiles one family for `arch` (e.g. `compute_90`) to PTX. NVRTC must be loadable
/// ([`super::probe_nvrtc`]); this checks it again so it never reaches cudarc's panic.
pub fn compile_family(family: &KernelFamily, arch: &str) -> Result<CompiledFamily, CudaError> {
    let (ptx, log) = compile_raw(family, arch, Output::Ptx)?;
    Ok(CompiledFamily {
        family: family.name,
        ptx: String::from_utf8_lossy(&ptx).into_owned(),
        log,
    })
}

/// NVRTC's version, e.g. (13, 0).
pub fn nvrtc_version() -> Result<(i32, i32), CudaError> {
    super::probe_nvrtc()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: NVRTC writes two ints.
    unsafe { sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| nvrtc_err("-", "version", e))?;
    Ok((major, minor))
}

/// The real architecture (machine code) for a compute capability, e.g. `sm_90`.
pub fn sm_arch(major: i32, minor: i32) -> String {
    format!("sm_{major}{minor}")
}

/// Where compiled kernels are cached: `RRT_KERNEL_CACHE` (`off` or empty: no cache), else
/// `$XDG_CACHE_HOME/rrt/kernels`, else `$HOME/.cache/rrt/kernels`.
pub fn cache_dir() -> Option<PathBuf> {
    match std::env::var("RRT_KERNEL_CACHE") {
        Ok(v) if v.is_empty() || v == "off" => return None,
        Ok(v) => return Some(PathBuf::from(v)),
        Err(_) => {}
    }
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|x| !x.is_empty()) {
        return Some(PathBuf::from(x).join("rrt").join("kernels"));
    }
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|h| PathBuf::from(h).join(".cache").join("rrt").join("kernels"))
}

/// The cache file of `family` compiled for `arch` by NVRTC `version`: its name carries a
/// SHA-256 of everything that determines the output.
pub fn cache_key(family: &KernelFamily, arch: &str, version: (i32, i32)) -> String {
    let mut h = Sha256::new();
    h.update(format!("nvrtc {}.{}\narch {arch}\n", version.0, version.1));
    for o in OPTIONS {
        h.update(o);
        h.update("\n");
    }
    h.update(full_source(family));
    let d = h.finalize();
    let hex: String = d.iter().take(12).map(|b| format!("{b:02x}")).collect();
    format!("{}-{arch}-{hex}.cubin", family.name)
}

/// A compiled family ready to load: machine code, where it came from, how long it took.
#[derive(Clone, Debug)]
pub struct FamilyImage {
    pub family: &'static KernelFamily,
    pub cubin: Vec<u8>,
    pub log: String,
    pub from_cache: bool,
    pub seconds: f64,
}

fn read_cached(path: &Path) -> Option<Vec<u8>> {
    let b = std::fs::read(path).ok()?;
    // An ELF image, not a truncated write (writes go through a rename, but be safe).
    (b.len() > 64 && b.starts_with(b"\x7fELF")).then_some(b)
}

fn write_cached(dir: &Path, name: &str, bytes: &[u8]) {
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let ok = std::fs::create_dir_all(dir).is_ok()
        && std::fs::write(&tmp, bytes).is_ok()
        && std::fs::rename(&tmp, dir.join(name)).is_ok();
    if !ok {
        let _ = std::fs::remove_file(&tmp);
        tracing::warn!(dir = %dir.display(), "cannot write the kernel cache; kernels will be compiled again next start");
    }
}

/// Every family of [`FAMILIES`] as machine code for compute capability `cc`: from the disk
/// cache where present, else compiled (one thread per family) and stored there.
pub fn compile_all(cc: (i32, i32)) -> Result<Vec<FamilyImage>, CudaError> {
    let arch = sm_arch(cc.0, cc.1);
    let version = nvrtc_version()?;
    let dir = cache_dir();
    let results: Vec<Result<FamilyImage, CudaError>> = std::thread::scope(|s| {
        let handles: Vec<_> = FAMILIES
            .iter()
            .map(|fam| {
                let (arch, dir) = (&arch, &dir);
                s.spawn(move || {
                    let t0 = std::time::Instant::now();
                    let key = cache_key(fam, arch, version);
                    if let Some(b) = dir.as_ref().and_then(|d| read_cached(&d.join(&key))) {
                        return Ok(FamilyImage {
                            family: fam,
                            cubin: b,
                            log: String::new(),
                            from_cache: true,
                            seconds: t0.elapsed().as_secs_f64(),
                        });
                    }
                    let (cubin, log) = compile_raw(fam, arch, Output::Cubin)?;
                    if let Some(d) = dir {
                        write_cached(d, &key, &cubin);
                    }
                    Ok(FamilyImage {
                        family: fam,
                        cubin,
                        log,
                        from_cache: false,
                        seconds: t0.elapsed().as_secs_f64(),
                    })
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(CudaError::Unsupported("a kernel compile thread panicked".into())))
            })
            .collect()
    });
    results.into_iter().collect()
}
