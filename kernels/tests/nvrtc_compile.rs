//! CI check of the CUDA kernels without a GPU: every kernel family compiles with NVRTC for
//! sm_90 (`compute_90` PTX) with an empty log (warnings are errors), every entry point named
//! in `FAMILIES` is in the PTX, and ptxas (`-arch=sm_90 -v`) reports registers, shared
//! memory and spills per kernel. The product kernels (`linear_*`, `lora_shrink_*`) must not
//! spill: they are the memory-bound hot path, and a spill there is local-memory traffic on
//! every K step.
//!
//! Needs `libnvrtc.so.13` on `LD_LIBRARY_PATH` and `ptxas` on `PATH` (or `RRT_PTXAS`):
//! `scripts/check-kernels.sh` installs both from PyPI. Without them the test skips with a
//! message, unless `RRT_REQUIRE_NVRTC=1`, where it fails. `RRT_PTXAS_REPORT=path` writes the
//! ptxas table as Markdown.
#![cfg(feature = "cuda")]

use rrt_kernels::cuda::{FAMILIES, cache_key, compile_all, compile_family, nvrtc_version, probe_nvrtc};
use std::path::{Path, PathBuf};
use std::process::Command;

fn required() -> bool {
    std::env::var("RRT_REQUIRE_NVRTC").is_ok_and(|v| v == "1")
}

/// Skips (or fails when required) with `why`.
fn unavailable(why: &str) {
    if required() {
        panic!("RRT_REQUIRE_NVRTC=1 but {why}");
    }
    eprintln!("SKIPPED: {why} (run scripts/check-kernels.sh, or set RRT_REQUIRE_NVRTC=1 to fail here)");
}

/// What ptxas says about one entry point.
#[derive(Debug, Default, Clone)]
struct Usage {
    name: String,
    registers: u32,
    smem: u32,
    stack: u32,
    spill_stores: u32,
    spill_loads: u32,
}

fn num_before(line: &str, unit: &str) -> Option<u32> {
    let i = line.find(unit)?;
    line[..i].split_whitespace().last()?.parse().ok()
}

/// Parses `ptxas -v` output into one row per entry function.
fn parse_ptxas(out: &str) -> Vec<Usage> {
    let mut all: Vec<Usage> = Vec::new();
    for line in out.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or_default().to_string();
            all.push(Usage {
                name,
                ..Default::default()
            });
        } else if let Some(u) = all.last_mut() {
            if line.contains("bytes stack frame") {
                u.stack = num_before(line, "bytes stack frame").unwrap_or(0);
                u.spill_stores = num_before(line, "bytes spill stores").unwrap_or(0);
                u.spill_loads = num_before(line, "bytes spill loads").unwrap_or(0);
            } else if line.contains("Used") && line.contains("registers") {
                u.registers = num_before(line, "registers").unwrap_or(0);
                u.smem = num_before(line, "bytes smem").unwrap_or(0);
            }
        }
    }
    all
}

fn find_ptxas() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("RRT_PTXAS") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("ptxas"))
        .find(|p| p.is_file())
}

fn must_not_spill(name: &str) -> bool {
    name.starts_with("linear_") || name.starts_with("lora_shrink_")
}

#[test]
fn every_kernel_compiles_for_sm90_and_the_products_do_not_spill() {
    if probe_nvrtc().is_err() {
        unavailable("libnvrtc.so is not on the library path");
        return;
    }
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ptx");
    std::fs::create_dir_all(&dir).unwrap();
    let mut ptx_files = Vec::new();
    for fam in FAMILIES {
        let c = compile_family(fam, "compute_90").unwrap_or_else(|e| panic!("{e}"));
        assert!(c.log.is_empty(), "NVRTC warnings in {}.cu:\n{}", fam.name, c.log);
        for k in fam.kernels {
            assert!(
                c.ptx.contains(&format!(".entry {k}(")),
                "{k} is not an entry point of {}.cu",
                fam.name
            );
        }
        let path = dir.join(format!("{}.ptx", fam.name));
        std::fs::write(&path, &c.ptx).unwrap();
        ptx_files.push((fam, path));
    }
    eprintln!("PTX of {} families in {}", ptx_files.len(), dir.display());

    let Some(ptxas) = find_ptxas() else {
        unavailable("ptxas is not on PATH (nor RRT_PTXAS)");
        return;
    };
    let mut rows: Vec<Usage> = Vec::new();
    for (fam, path) in &ptx_files {
        let out = Command::new(&ptxas)
            .args(["-arch=sm_90", "-v", "-o", "/dev/null"])
            .arg(path)
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", ptxas.display()));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "ptxas failed on {}.ptx:\n{text}", fam.name);
        assert!(!text.contains("warning"), "ptxas warnings on {}.ptx:\n{text}", fam.name);
        let usage = parse_ptxas(&text);
        for k in fam.kernels {
            assert!(usage.iter().any(|u| u.name == *k), "ptxas did not report {k}:\n{text}");
        }
        rows.extend(usage);
    }
    let mut table = String::from(
        "| kernel | registers | static smem (B) | stack (B) | spill stores (B) | spill loads (B) |\n|---|---:|---:|---:|---:|---:|\n",
    );
    for u in &rows {
        table.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            u.name, u.registers, u.smem, u.stack, u.spill_stores, u.spill_loads
        ));
    }
    eprintln!("ptxas -arch=sm_90 -v ({}):\n{table}", ptxas.display());
    if let Ok(report) = std::env::var("RRT_PTXAS_REPORT") {
        let version = Command::new(&ptxas)
            .arg("--version")
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .last()
                    .unwrap_or("")
                    .to_string()
            })
            .unwrap_or_default();
        let md = format!(
            "# ptxas report of the CUDA kernels\n\nGenerated by `scripts/check-kernels.sh` (test \
             `kernels/tests/nvrtc_compile.rs`): NVRTC 13.0 PTX for `compute_90`, then `ptxas \
             -arch=sm_90 -v` ({version}). Dynamic shared memory (attention) is not included. \
             The product kernels (`linear_*`, `lora_shrink_*`) must show 0 spill bytes.\n\n{table}"
        );
        std::fs::write(&report, md).unwrap();
        eprintln!("wrote {report}");
    }
    let spills: Vec<&Usage> = rows
        .iter()
        .filter(|u| must_not_spill(&u.name) && u.spill_stores + u.spill_loads > 0)
        .collect();
    assert!(spills.is_empty(), "product kernels spill: {spills:?}");
}

#[test]
fn ptxas_output_is_parsed() {
    let out = "ptxas info    : 0 bytes gmem\n\
ptxas info    : Compiling entry function 'linear_mma_bf16' for 'sm_90'\n\
ptxas info    : Function properties for linear_mma_bf16\n\
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n\
ptxas info    : Used 128 registers, used 1 barriers, 30736 bytes smem, 472 bytes cmem[0]\n\
ptxas info    : Compiling entry function 'rope_f32' for 'sm_90'\n\
ptxas info    : Function properties for rope_f32\n\
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
ptxas info    : Used 30 registers, used 0 barriers, 400 bytes cmem[0]\n";
    let u = parse_ptxas(out);
    assert_eq!(u.len(), 2);
    assert_eq!(
        (
            &u[0].name[..],
            u[0].registers,
            u[0].smem,
            u[0].stack,
            u[0].spill_stores,
            u[0].spill_loads
        ),
        ("linear_mma_bf16", 128, 30736, 8, 4, 12)
    );
    assert_eq!((&u[1].name[..], u[1].registers, u[1].smem), ("rope_f32", 30, 0));
    assert!(must_not_spill("linear_gemv_bf16_r16") && !must_not_spill("attention_f32_d8"));
}

/// What the backend loads: every family as sm_90 machine code (CUBIN, an ELF image) in one
/// parallel compile, stored in the kernel cache and read back from it on the next start.
#[test]
fn every_family_compiles_to_cubin_and_the_cache_serves_the_second_start() {
    if probe_nvrtc().is_err() {
        unavailable("libnvrtc.so is not on the library path");
        return;
    }
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("kernel-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    // SAFETY: set before any thread of this test reads the environment; the other tests of
    // this binary do not read RRT_KERNEL_CACHE.
    unsafe { std::env::set_var("RRT_KERNEL_CACHE", &dir) };
    let first = compile_all((9, 0)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(first.len(), FAMILIES.len());
    for img in &first {
        assert!(!img.from_cache, "{} came from an empty cache", img.family.name);
        assert!(img.cubin.starts_with(b"\x7fELF"), "{} is not a CUBIN", img.family.name);
        assert!(
            img.log.is_empty(),
            "NVRTC warnings in {}.cu:\n{}",
            img.family.name,
            img.log
        );
        let key = cache_key(img.family, "sm_90", nvrtc_version().unwrap());
        assert!(dir.join(&key).is_file(), "{key} not cached");
    }
    let second = compile_all((9, 0)).unwrap();
    for (a, b) in first.iter().zip(&second) {
        assert!(b.from_cache, "{} compiled again", b.family.name);
        assert_eq!(a.cubin, b.cubin);
    }
    // A changed key (another architecture) misses the cache.
    assert_ne!(
        cache_key(&FAMILIES[0], "sm_90", (13, 0)),
        cache_key(&FAMILIES[0], "sm_80", (13, 0))
    );
    let _ = std::fs::remove_dir_all(&dir);
}
