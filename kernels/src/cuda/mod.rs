//! The CUDA backend: [`CudaBackend`] implements [`crate::Backend`] on one GPU with
//! cudarc (libraries opened at run time) and kernels compiled by NVRTC for the device's
//! architecture. Design, predictions and measurements: `kernels/NOTES.md`.
//!
//! Without the `cuda` cargo feature only the host-side planning and [`cuda_available`] exist;
//! the latter then says the binary was built without CUDA, so callers fall back to the CPU
//! backend through the same code path as on a machine without a driver.
//!
//! **Invariant:** no cudarc call runs before [`probe_driver`] has opened `libcuda.so.1` (and,
//! for the backend, before NVRTC was found): cudarc panics on a missing library, this module
//! returns [`CudaError`] instead.

pub mod plan;

#[cfg(feature = "cuda")]
mod compile;
#[cfg(feature = "cuda")]
mod device;
#[cfg(feature = "cuda")]
mod ffi;

#[cfg(feature = "cuda")]
pub use compile::{
    CompiledFamily, FAMILIES, FamilyImage, KernelFamily, Output, cache_dir, cache_key, compile_all, compile_family,
    nvrtc_arch, nvrtc_version, sm_arch,
};
#[cfg(feature = "cuda")]
pub use device::{CudaBackend, CudaBuf, CudaKv, CudaMat, CudaRows, WeightType};

/// Why the CUDA backend is not available or an operation failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CudaError {
    /// Built without the `cuda` feature.
    NotCompiled,
    /// `libcuda.so.1` could not be opened (no NVIDIA driver on this machine).
    DriverMissing(String),
    /// `libnvrtc.so*` could not be opened (no CUDA toolkit or NVRTC wheel on the library path).
    NvrtcMissing,
    /// `libcublas.so*` could not be opened.
    CublasMissing,
    /// No device with this ordinal.
    NoDevice { ordinal: usize, count: usize },
    /// A driver call failed.
    Driver(String),
    /// NVRTC rejected a kernel source.
    Compile { family: String, log: String },
    /// A shape or parameter the kernels do not support.
    Unsupported(String),
}

impl CudaError {
    /// A stable short label (metrics, logs).
    pub fn kind(&self) -> &'static str {
        match self {
            CudaError::NotCompiled => "not_compiled",
            CudaError::DriverMissing(_) => "driver_missing",
            CudaError::NvrtcMissing => "nvrtc_missing",
            CudaError::CublasMissing => "cublas_missing",
            CudaError::NoDevice { .. } => "no_device",
            CudaError::Driver(_) => "driver",
            CudaError::Compile { .. } => "compile",
            CudaError::Unsupported(_) => "unsupported",
        }
    }
}

impl std::fmt::Display for CudaError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CudaError::NotCompiled => write!(f, "this binary was built without CUDA support (cargo feature `cuda`)"),
            CudaError::DriverMissing(e) => write!(f, "no CUDA driver: cannot open libcuda.so.1 ({e})"),
            CudaError::NvrtcMissing => write!(
                f,
                "no NVRTC: cannot open libnvrtc.so (put the CUDA toolkit's lib64 or the \
                 nvidia-cuda-nvrtc wheel's nvidia/cu13/lib on LD_LIBRARY_PATH)"
            ),
            CudaError::CublasMissing => write!(f, "no cuBLAS: cannot open libcublas.so"),
            CudaError::NoDevice { ordinal, count } => {
                write!(f, "no CUDA device {ordinal} ({count} device(s) present)")
            }
            CudaError::Driver(e) => write!(f, "CUDA driver error: {e}"),
            CudaError::Compile { family, log } => write!(f, "NVRTC failed on {family}.cu:\n{log}"),
            CudaError::Unsupported(e) => write!(f, "unsupported by the CUDA kernels: {e}"),
        }
    }
}

impl std::error::Error for CudaError {}

/// What the node logs when it picks the CUDA backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    /// (major, minor), e.g. (9, 0) for H100 / H200.
    pub compute_capability: (i32, i32),
    pub total_memory: usize,
    pub multiprocessors: usize,
    /// L2 cache bytes.
    pub l2_bytes: usize,
}

impl std::fmt::Display for DeviceInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cuda:{} {} (sm_{}{}, {} SMs, {:.1} GiB, L2 {} MiB)",
            self.ordinal,
            self.name,
            self.compute_capability.0,
            self.compute_capability.1,
            self.multiprocessors,
            self.total_memory as f64 / (1u64 << 30) as f64,
            self.l2_bytes >> 20
        )
    }
}

/// Opens the driver library the way the loader would (`dlopen("libcuda.so.1")`), without
/// touching cudarc, and closes it again. `Ok` means cudarc's own loading will succeed.
#[cfg(feature = "cuda")]
pub fn probe_driver() -> Result<(), CudaError> {
    probe_library(&["libcuda.so.1", "libcuda.so"]).map_err(CudaError::DriverMissing)
}

/// Whether NVRTC can be opened (the names cudarc tries).
#[cfg(feature = "cuda")]
pub fn probe_nvrtc() -> Result<(), CudaError> {
    // SAFETY: only dlopens candidate names and closes them; no symbol is called.
    if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(CudaError::NvrtcMissing)
    }
}

/// Whether cuBLAS can be opened (the names cudarc tries).
#[cfg(feature = "cuda")]
pub fn probe_cublas() -> Result<(), CudaError> {
    // SAFETY: as in `probe_nvrtc`.
    if unsafe { cudarc::cublas::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(CudaError::CublasMissing)
    }
}

#[cfg(feature = "cuda")]
fn probe_library(names: &[&str]) -> Result<(), String> {
    let mut errors = Vec::new();
    for name in names {
        // SAFETY: loading the driver library runs its initialisers, which is what any CUDA
        // program does first; nothing from it is called here and it is closed on drop.
        match unsafe { libloading::Library::new(*name) } {
            Ok(_lib) => return Ok(()),
            Err(e) => errors.push(format!("{name}: {e}")),
        }
    }
    Err(errors.join("; "))
}

/// Whether device `ordinal` can run the CUDA backend: the driver library opens, the driver
/// initialises and the device exists. The node calls this to pick its backend and falls back
/// to the CPU with one log line on `Err`.
pub fn cuda_available(ordinal: usize) -> Result<DeviceInfo, CudaError> {
    #[cfg(feature = "cuda")]
    {
        probe_driver()?;
        device::device_info(ordinal)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = ordinal;
        Err(CudaError::NotCompiled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a machine without the driver (CI, this build machine) the check returns an error
    /// and never reaches cudarc's panic; with the feature off it says so.
    #[test]
    fn cuda_available_is_an_error_not_a_panic_without_a_driver() {
        match cuda_available(0) {
            Ok(info) => eprintln!("a CUDA device is present: {info}"),
            Err(e) => {
                #[cfg(not(feature = "cuda"))]
                assert_eq!(e, CudaError::NotCompiled);
                #[cfg(feature = "cuda")]
                assert!(
                    matches!(
                        e,
                        CudaError::DriverMissing(_) | CudaError::Driver(_) | CudaError::NoDevice { .. }
                    ),
                    "{e}"
                );
                assert!(!e.to_string().is_empty());
                assert!(!e.kind().is_empty());
            }
        }
    }

    #[cfg(feature = "cuda")]
    #[test]
    fn backend_constructor_returns_an_error_without_a_driver() {
        if probe_driver().is_ok() {
            eprintln!("driver present: constructor test not applicable");
            return;
        }
        match CudaBackend::new(0) {
            Ok(_) => panic!("a backend without a driver"),
            Err(e) => assert_eq!(e.kind(), "driver_missing", "{e}"),
        }
    }

    #[cfg(feature = "cuda")]
    #[test]
    fn probe_of_a_missing_library_is_an_error() {
        let e = probe_library(&["libdefinitely-not-here-rrt.so.7"]).unwrap_err();
        assert!(e.contains("libdefinitely-not-here-rrt"), "{e}");
    }
}
