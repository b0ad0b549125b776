//! Compiles `kernels/moe.cu` (which includes `common.cuh`, `dispatch.cuh` and `combine.cuh` from
//! the same folder) into one fatbin per CUDA toolkit, each with cubins for sm_80, sm_90a and
//! (toolkits >= 12.8) sm_100a, plus compute_80 PTX so newer GPUs JIT it. The library embeds them
//! all (`src/kernels.rs`) and loads the newest one the installed driver supports.
//!
//! Toolkits:
//! - nvcc, looked for in `$NVCC`, `$CUDA_HOME/bin`, `$CUDA_PATH/bin`, `PATH`, then in the
//!   `nvidia-cuda-nvcc` pip package of the Python that builds us (`$PYO3_PYTHON`, the active
//!   virtualenv, `python3`); its version comes from `nvcc --version`.
//! - `$STOLON_NVRTC_ROOTS`: `:`-separated roots of `pip install --target` trees holding a CUDA
//!   release's `nvidia-cuda-nvrtc`, `nvidia-nvfatbin`, `nvidia-cuda-runtime` and
//!   `nvidia-cuda-cccl` (PyPI has no nvcc driver for CUDA 12); `nvrtc_fatbin.py` compiles with
//!   them, run by `$STOLON_BUILD_PYTHON` (default `python3`).
//!
//! Without any toolkit the crate still builds, without kernels: creating an all-to-all then
//! fails with a clear error. `STOLON_REQUIRE_KERNELS=1` turns that into a build failure (CI sets
//! it, so a missing compiler cannot pass unnoticed); `STOLON_REQUIRE_KERNELS=cuda12,cuda13`
//! also requires a build of each of those toolkits (the wheels need both).

use std::env;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

const SOURCE: &str = "kernels/moe.cu";
/// The folder of `SOURCE` and the headers it includes (`common.cuh`, `dispatch.cuh`,
/// `combine.cuh`): a change to any file in it rebuilds the kernels.
const KERNELS_DIR: &str = "kernels";
const NVRTC_SCRIPT: &str = "nvrtc_fatbin.py";

struct Build {
    name: String,
    toolkit: (u32, u32),
    compiler: String,
    cubins: Vec<&'static str>,
    ptx: Vec<&'static str>,
    fatbin: PathBuf,
}

/// GPU architectures (cubins) a toolkit gets: sm_100a needs 12.8, sm_90a 12.0.
fn archs(toolkit: (u32, u32)) -> Vec<&'static str> {
    let mut a = vec!["80"];
    if toolkit >= (12, 0) {
        a.push("90a");
    }
    if toolkit >= (12, 8) {
        a.push("100a");
    }
    a
}

const PTX: &[&str] = &["80"];

/// Prints the version of the NVRTC library given as argv[1], e.g. `12.8`.
const NVRTC_VERSION: &str = "import ctypes, sys\nl = ctypes.CDLL(sys.argv[1])\n\
a, b = ctypes.c_int(), ctypes.c_int()\nl.nvrtcVersion(ctypes.byref(a), ctypes.byref(b))\n\
print(f'{a.value}.{b.value}')";

fn main() {
    // A folder makes cargo watch every file in it, so a new header needs no line here.
    println!("cargo:rerun-if-changed={KERNELS_DIR}");
    println!("cargo:rerun-if-changed={NVRTC_SCRIPT}");
    for var in [
        "NVCC",
        "CUDA_HOME",
        "CUDA_PATH",
        "PATH",
        "PYO3_PYTHON",
        "VIRTUAL_ENV",
        "STOLON_REQUIRE_KERNELS",
        "STOLON_NVRTC_ROOTS",
        "STOLON_BUILD_PYTHON",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    println!("cargo::rustc-check-cfg=cfg(stolon_no_kernels)");
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    let require = env::var("STOLON_REQUIRE_KERNELS").unwrap_or_default();
    let required: Vec<String> = match require.trim() {
        "" | "0" => Vec::new(),
        "1" => vec![String::new()],
        list => list.split(',').map(|s| s.trim().to_string()).collect(),
    };

    let mut builds: Vec<Build> = Vec::new();
    let (nvcc, tried) = find_nvcc();
    match nvcc {
        Some(nvcc) => builds.push(build_with_nvcc(&nvcc, &out)),
        None => println!(
            "cargo:warning=nvcc not found (tried: {}); no nvcc build of the MoE kernels",
            tried.join(", ")
        ),
    }
    if let Ok(roots) = env::var("STOLON_NVRTC_ROOTS") {
        for root in env::split_paths(&roots).filter(|r| !r.as_os_str().is_empty()) {
            builds.push(build_with_nvrtc(&root, &out));
        }
    }
    builds.sort_by_key(|b| b.toolkit);
    for w in builds.windows(2) {
        if w[0].name == w[1].name {
            panic!(
                "two MoE kernel builds for {} ({} and {}): give one toolkit per CUDA major version",
                w[0].name, w[0].compiler, w[1].compiler
            );
        }
    }
    for r in &required {
        let ok = if r.is_empty() {
            !builds.is_empty()
        } else {
            builds.iter().any(|b| &b.name == r)
        };
        if !ok {
            panic!(
                "STOLON_REQUIRE_KERNELS={require} but the MoE kernel builds are [{}] (nvcc tried: \
                 {}; STOLON_NVRTC_ROOTS={:?})",
                builds
                    .iter()
                    .map(|b| b.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                tried.join(", "),
                env::var("STOLON_NVRTC_ROOTS").unwrap_or_default()
            );
        }
    }
    if builds.is_empty() {
        println!("cargo:warning=building without MoE kernels");
        println!("cargo:rustc-cfg=stolon_no_kernels");
    }
    let mut src = String::from("&[\n");
    for b in &builds {
        let strs = |v: &[&str], pre: &str| {
            v.iter()
                .map(|a| format!("\"{pre}{a}\""))
                .collect::<Vec<_>>()
                .join(", ")
        };
        writeln!(
            src,
            "    KernelBuild {{ name: {:?}, toolkit: ({}, {}), compiler: {:?}, cubins: &[{}], \
             ptx: &[{}], fatbin: include_bytes!({:?}) }},",
            b.name,
            b.toolkit.0,
            b.toolkit.1,
            b.compiler,
            strs(&b.cubins, "sm_"),
            strs(&b.ptx, "compute_"),
            b.fatbin.display().to_string(),
        )
        .unwrap();
    }
    src.push(']');
    std::fs::write(out.join("moe_builds.rs"), src).expect("write moe_builds.rs");
}

fn build_with_nvcc(nvcc: &Path, out: &Path) -> Build {
    let vout = Command::new(nvcc)
        .arg("--version")
        .output()
        .unwrap_or_else(|e| panic!("running {} --version: {e}", nvcc.display()));
    let text = String::from_utf8_lossy(&vout.stdout);
    // "Cuda compilation tools, release 13.0, V13.0.88"
    let full = text
        .split_whitespace()
        .find_map(|w| {
            w.strip_prefix('V')
                .filter(|v| v.starts_with(|c: char| c.is_ascii_digit()))
        })
        .unwrap_or_else(|| panic!("no version in `{} --version`: {text}", nvcc.display()))
        .to_string();
    let toolkit = parse_version(&full)
        .unwrap_or_else(|| panic!("bad nvcc version {full:?} from {}", nvcc.display()));
    let cubins = archs(toolkit);
    let fatbin = out.join(format!("moe-cuda{}.fatbin", toolkit.0));
    let mut cmd = Command::new(nvcc);
    cmd.args(["-fatbin", "-O3", "-std=c++17"]);
    for a in &cubins {
        cmd.arg(format!("-gencode=arch=compute_{a},code=sm_{a}"));
    }
    for p in PTX {
        cmd.arg(format!("-gencode=arch=compute_{p},code=compute_{p}"));
    }
    let status = cmd
        .arg("-o")
        .arg(&fatbin)
        .arg(SOURCE)
        .status()
        .unwrap_or_else(|e| panic!("running {}: {e}", nvcc.display()));
    if !status.success() {
        panic!("{} failed to compile {SOURCE} ({status})", nvcc.display());
    }
    Build {
        name: format!("cuda{}", toolkit.0),
        toolkit,
        compiler: format!("nvcc {full}"),
        cubins: cubins.to_vec(),
        ptx: PTX.to_vec(),
        fatbin,
    }
}

fn build_with_nvrtc(root: &Path, out: &Path) -> Build {
    let nv = root.join("nvidia");
    let lib = |dir: &str, stem: &str| -> PathBuf {
        let d = nv.join(dir).join("lib");
        std::fs::read_dir(&d)
            .ok()
            .and_then(|it| {
                it.filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| {
                        p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                            n.starts_with(&format!("{stem}.so")) && !n.contains(".alt.")
                        })
                    })
                    .min()
            })
            .unwrap_or_else(|| panic!("STOLON_NVRTC_ROOTS: no {stem}.so* in {}", d.display()))
    };
    let nvrtc = lib("cuda_nvrtc", "libnvrtc");
    let nvfatbin = lib("nvfatbin", "libnvfatbin");
    let python = env::var("STOLON_BUILD_PYTHON").unwrap_or_else(|_| "python3".into());
    let tmp = out.join("moe-nvrtc.fatbin");
    let mut cmd = Command::new(&python);
    cmd.arg(NVRTC_SCRIPT)
        .arg("--nvrtc")
        .arg(&nvrtc)
        .arg("--nvfatbin")
        .arg(&nvfatbin);
    for inc in ["cuda_runtime/include", "cuda_cccl/include"] {
        cmd.arg("--include").arg(nv.join(inc));
    }
    // The architectures depend on the version, which NVRTC reports; ask it first.
    let probe = Command::new(&python)
        .args(["-c", NVRTC_VERSION])
        .arg(&nvrtc)
        .output()
        .unwrap_or_else(|e| panic!("running {python}: {e}"));
    let ver = String::from_utf8_lossy(&probe.stdout).trim().to_string();
    let toolkit = parse_version(&ver)
        .unwrap_or_else(|| panic!("NVRTC {} reported no version ({ver:?})", nvrtc.display()));
    let cubins = archs(toolkit);
    for a in &cubins {
        cmd.arg("--arch").arg(a);
    }
    for p in PTX {
        cmd.arg("--ptx").arg(p);
    }
    let status = cmd
        .arg("-o")
        .arg(&tmp)
        .arg(SOURCE)
        .status()
        .unwrap_or_else(|e| panic!("running {python} {NVRTC_SCRIPT}: {e}"));
    if !status.success() {
        panic!(
            "NVRTC ({}) failed to compile {SOURCE} ({status})",
            nvrtc.display()
        );
    }
    let fatbin = out.join(format!("moe-cuda{}.fatbin", toolkit.0));
    std::fs::rename(&tmp, &fatbin).expect("rename fatbin");
    Build {
        name: format!("cuda{}", toolkit.0),
        toolkit,
        compiler: format!("nvrtc {ver} + nvfatbin"),
        cubins: cubins.to_vec(),
        ptx: PTX.to_vec(),
        fatbin,
    }
}

/// "13.0.88" or "12.8" -> (13, 0).
fn parse_version(v: &str) -> Option<(u32, u32)> {
    let mut it = v.split('.');
    let major = it.next()?.trim().parse().ok()?;
    let minor = it.next()?.trim().parse().ok()?;
    Some((major, minor))
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
