//! Compiles `kernels/moe.cu` with nvcc into one fatbin (sm_90a, sm_80, and compute_80 PTX so
//! newer GPUs JIT it) that the library embeds and loads through the CUDA driver at run time.
//!
//! nvcc is looked for in `$NVCC`, `$CUDA_HOME/bin`, `$CUDA_PATH/bin`, `PATH`, then in the
//! `nvidia-cuda-nvcc` pip package of the Python that builds us (`$PYO3_PYTHON`, the active
//! virtualenv, `python3`). Without nvcc the crate still builds, without kernels: creating an
//! all-to-all then fails with a clear error. `STOLON_REQUIRE_KERNELS=1` turns that into a build
//! failure (CI sets it, so a missing compiler cannot pass unnoticed).

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const SOURCE: &str = "kernels/moe.cu";

fn main() {
    println!("cargo:rerun-if-changed={SOURCE}");
    for var in [
        "NVCC",
        "CUDA_HOME",
        "CUDA_PATH",
        "PATH",
        "PYO3_PYTHON",
        "VIRTUAL_ENV",
        "STOLON_REQUIRE_KERNELS",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    println!("cargo::rustc-check-cfg=cfg(stolon_no_kernels)");
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    let fatbin = out.join("moe.fatbin");
    let required = env::var("STOLON_REQUIRE_KERNELS").is_ok_and(|v| v == "1");

    let (nvcc, tried) = find_nvcc();
    let Some(nvcc) = nvcc else {
        let msg = format!(
            "nvcc not found (tried: {}); building without MoE kernels",
            tried.join(", ")
        );
        if required {
            panic!("{msg}, but STOLON_REQUIRE_KERNELS=1");
        }
        println!("cargo:warning={msg}");
        std::fs::write(&fatbin, b"").expect("write empty fatbin");
        println!("cargo:rustc-cfg=stolon_no_kernels");
        return;
    };
    let status = Command::new(&nvcc)
        .args([
            "-fatbin",
            "-O3",
            "-std=c++17",
            "-gencode=arch=compute_90a,code=sm_90a",
            "-gencode=arch=compute_80,code=sm_80",
            "-gencode=arch=compute_80,code=compute_80",
            "-o",
        ])
        .arg(&fatbin)
        .arg(SOURCE)
        .status()
        .unwrap_or_else(|e| panic!("running {}: {e}", nvcc.display()));
    if !status.success() {
        panic!("{} failed to compile {SOURCE} ({status})", nvcc.display());
    }
    println!("cargo:rustc-env=STOLON_NVCC_USED={}", nvcc.display());
}

fn find_nvcc() -> (Option<PathBuf>, Vec<String>) {
    let mut tried = Vec::new();
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Ok(p) = env::var("NVCC") {
        candidates.push(PathBuf::from(p));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Ok(p) = env::var(var) {
            candidates.push(Path::new(&p).join("bin/nvcc"));
        }
    }
    if let Ok(path) = env::var("PATH") {
        candidates.extend(env::split_paths(&path).map(|d| d.join("nvcc")));
    }
    let mut pythons: Vec<PathBuf> = Vec::new();
    if let Ok(p) = env::var("PYO3_PYTHON") {
        pythons.push(PathBuf::from(p));
    }
    if let Ok(v) = env::var("VIRTUAL_ENV") {
        pythons.push(Path::new(&v).join("bin/python"));
    }
    pythons.push(PathBuf::from("python3"));
    for c in candidates {
        if c.is_file() {
            return (Some(c), tried);
        }
        tried.push(c.display().to_string());
    }
    // The pip package puts nvcc under site-packages/nvidia/cu13/bin (cu12 for CUDA 12).
    let script = "import nvidia, os\nfor p in nvidia.__path__:\n  for v in ('cu13', 'cu12', 'cuda_nvcc'):\n    print(os.path.join(p, v, 'bin', 'nvcc'))";
    for py in pythons {
        let Ok(out) = Command::new(&py).args(["-c", script]).output() else {
            tried.push(format!("{} (not runnable)", py.display()));
            continue;
        };
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let c = PathBuf::from(line.trim());
            if c.is_file() {
                return (Some(c), tried);
            }
        }
        tried.push(format!("pip nvidia-cuda-nvcc of {}", py.display()));
    }
    (None, tried)
}
