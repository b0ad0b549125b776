//! Checks stolon-cuda's hand-written driver ABI against `cuda.h` (CUDA 13):
//! - every symbol bound is the one the header maps the API name to (`cuMemAlloc` ->
//!   `cuMemAlloc_v2`), and its full prototype matches the Rust argument types; fallback symbols
//!   for older drivers match their old prototypes;
//! - struct sizes and member offsets;
//! - the value of every constant used.
//!
//! The header is found through `$STOLON_CUDA_INCLUDE` (the include directory, or `cuda.h`
//! itself; scripts/test.sh sets it to the venv's), else in the repository's `.venv`, else in
//! Python's site-packages (`nvidia/cu13/include/cuda.h`, from
//! `pip install nvidia-cuda-runtime==13.0.*`). Without a header or a C compiler the test prints
//! SKIP and passes, unless `$STOLON_CUDA_INCLUDE` is set: then a missing header or compiler
//! fails it. No GPU or driver is needed: the C program only prints compile-time facts.

use std::collections::HashMap;
use std::mem::{offset_of, size_of};
use std::path::{Path, PathBuf};
use std::process::Command;

use stolon_cuda::sys;

fn python_paths() -> Vec<PathBuf> {
    let script = "import site, sys\n\
                  paths = list(sys.path)\n\
                  try:\n    paths += site.getsitepackages()\n\
                  except Exception:\n    pass\n\
                  try:\n    paths.append(site.getusersitepackages())\n\
                  except Exception:\n    pass\n\
                  print('\\n'.join(p for p in paths if p))";
    let mut out = Vec::new();
    for py in ["python3", "python"] {
        if let Ok(o) = Command::new(py).args(["-c", script]).output() {
            if o.status.success() {
                out.extend(
                    String::from_utf8_lossy(&o.stdout)
                        .lines()
                        .map(PathBuf::from),
                );
            }
        }
    }
    // The active venv, and the repository's own (scripts/setup.sh installs the headers there).
    let repo_venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv");
    let venvs = std::env::var_os("VIRTUAL_ENV")
        .map(PathBuf::from)
        .into_iter()
        .chain([repo_venv]);
    for venv in venvs {
        if let Ok(rd) = std::fs::read_dir(venv.join("lib")) {
            out.extend(rd.flatten().map(|e| e.path().join("site-packages")));
        }
    }
    out
}

/// The directory holding `cuda.h`, or why there is none.
fn find_include_dir() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("STOLON_CUDA_INCLUDE") {
        let p = PathBuf::from(p);
        let dir = if p.is_file() {
            p.parent().unwrap().to_path_buf()
        } else {
            p.clone()
        };
        if dir.join("cuda.h").is_file() {
            return Ok(dir);
        }
        return Err(format!(
            "STOLON_CUDA_INCLUDE={} holds no cuda.h",
            p.display()
        ));
    }
    let paths = python_paths();
    for sp in &paths {
        let dir = sp.join("nvidia/cu13/include");
        if dir.join("cuda.h").is_file() {
            return Ok(dir);
        }
    }
    Err(format!(
        "no cuda.h: set STOLON_CUDA_INCLUDE, or pip install nvidia-cuda-runtime==13.0.* \
         (searched {} Python paths for nvidia/cu13/include/cuda.h)",
        paths.len()
    ))
}

/// The C spelling of a Rust argument type from the symbol table.
fn c_type(rust: &str) -> String {
    let t: String = rust.split_whitespace().collect::<Vec<_>>().join(" ");
    let t = t.trim();
    if let Some(rest) = t.strip_prefix("*mut") {
        return format!("{} *", c_type(rest));
    }
    if let Some(rest) = t.strip_prefix("*const") {
        return format!("const {} *", c_type(rest));
    }
    match t {
        "c_void" => "void",
        "c_char" => "char",
        "c_uchar" => "unsigned char",
        "c_int" => "int",
        "c_uint" => "unsigned int",
        "c_ulonglong" => "unsigned long long",
        "usize" => "size_t",
        "u64" => "cuuint64_t",
        "f32" => "float",
        // Everything else keeps its cuda.h typedef name in sys.rs.
        other => other,
    }
    .to_string()
}

/// (name, value) of every constant checked.
macro_rules! consts {
    ($($c:ident),* $(,)?) => {
        vec![$((stringify!($c), sys::$c as i64)),*]
    };
}

fn constants() -> Vec<(&'static str, i64)> {
    consts!(
        CUDA_SUCCESS,
        CUDA_ERROR_INVALID_VALUE,
        CUDA_ERROR_OUT_OF_MEMORY,
        CUDA_ERROR_NOT_INITIALIZED,
        CUDA_ERROR_DEINITIALIZED,
        CUDA_ERROR_STUB_LIBRARY,
        CUDA_ERROR_NO_DEVICE,
        CUDA_ERROR_INVALID_DEVICE,
        CUDA_ERROR_INVALID_CONTEXT,
        CUDA_ERROR_INVALID_HANDLE,
        CUDA_ERROR_NOT_FOUND,
        CUDA_ERROR_NOT_READY,
        CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED,
        CUDA_ERROR_NOT_PERMITTED,
        CUDA_ERROR_NOT_SUPPORTED,
        CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
        CU_DEVICE_ATTRIBUTE_CAN_MAP_HOST_MEMORY,
        CU_DEVICE_ATTRIBUTE_PCI_BUS_ID,
        CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID,
        CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING,
        CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID,
        CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
        CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
        CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED,
        CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED,
        CU_DEVICE_ATTRIBUTE_GPU_DIRECT_RDMA_SUPPORTED,
        CU_DEVICE_ATTRIBUTE_CAN_USE_64_BIT_STREAM_MEM_OPS,
        CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED,
        CU_DEVICE_ATTRIBUTE_IPC_EVENT_SUPPORTED,
        CU_POINTER_ATTRIBUTE_CONTEXT,
        CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
        CU_POINTER_ATTRIBUTE_DEVICE_POINTER,
        CU_POINTER_ATTRIBUTE_HOST_POINTER,
        CU_POINTER_ATTRIBUTE_BUFFER_ID,
        CU_POINTER_ATTRIBUTE_IS_MANAGED,
        CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
        CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE,
        CU_POINTER_ATTRIBUTE_RANGE_START_ADDR,
        CU_POINTER_ATTRIBUTE_RANGE_SIZE,
        CU_POINTER_ATTRIBUTE_MAPPED,
        CU_POINTER_ATTRIBUTE_ALLOWED_HANDLE_TYPES,
        CU_POINTER_ATTRIBUTE_IS_GPU_DIRECT_RDMA_CAPABLE,
        CU_POINTER_ATTRIBUTE_MAPPING_SIZE,
        CU_POINTER_ATTRIBUTE_MAPPING_BASE_ADDR,
        CU_MEMORYTYPE_HOST,
        CU_MEMORYTYPE_DEVICE,
        CU_MEMORYTYPE_ARRAY,
        CU_MEMORYTYPE_UNIFIED,
        CU_MEMHOSTALLOC_PORTABLE,
        CU_MEMHOSTALLOC_DEVICEMAP,
        CU_MEMHOSTALLOC_WRITECOMBINED,
        CU_MEMHOSTREGISTER_PORTABLE,
        CU_MEMHOSTREGISTER_DEVICEMAP,
        CU_MEMHOSTREGISTER_IOMEMORY,
        CU_MEMHOSTREGISTER_READ_ONLY,
        CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS,
        CU_IPC_HANDLE_SIZE,
        CU_STREAM_DEFAULT,
        CU_STREAM_NON_BLOCKING,
        CU_EVENT_DEFAULT,
        CU_EVENT_BLOCKING_SYNC,
        CU_EVENT_DISABLE_TIMING,
        CU_EVENT_WAIT_DEFAULT,
        CU_STREAM_WAIT_VALUE_GEQ,
        CU_STREAM_WAIT_VALUE_EQ,
        CU_STREAM_WAIT_VALUE_AND,
        CU_STREAM_WAIT_VALUE_NOR,
        CU_STREAM_WRITE_VALUE_DEFAULT,
        CU_MEM_HANDLE_TYPE_NONE,
        CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
        CU_MEM_HANDLE_TYPE_FABRIC,
        CU_MEM_ACCESS_FLAGS_PROT_NONE,
        CU_MEM_ACCESS_FLAGS_PROT_READ,
        CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
        CU_MEM_LOCATION_TYPE_INVALID,
        CU_MEM_LOCATION_TYPE_DEVICE,
        CU_MEM_ALLOCATION_TYPE_INVALID,
        CU_MEM_ALLOCATION_TYPE_PINNED,
        CU_MEM_ALLOC_GRANULARITY_MINIMUM,
        CU_MEM_ALLOC_GRANULARITY_RECOMMENDED,
        CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD,
        CU_MEM_RANGE_FLAG_DMA_BUF_MAPPING_TYPE_PCIE,
        CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
    )
}

/// Sizes and offsets on the Rust side, keyed as the C program prints them.
fn rust_layout() -> Vec<(String, usize)> {
    use sys::*;
    let prop_flags = offset_of!(CUmemAllocationProp, allocFlags);
    vec![
        ("sizeof CUipcMemHandle".into(), size_of::<CUipcMemHandle>()),
        ("sizeof CUmemLocation".into(), size_of::<CUmemLocation>()),
        (
            "offsetof CUmemLocation.type".into(),
            offset_of!(CUmemLocation, type_),
        ),
        (
            "offsetof CUmemLocation.id".into(),
            offset_of!(CUmemLocation, id),
        ),
        (
            "sizeof CUmemAllocationProp".into(),
            size_of::<CUmemAllocationProp>(),
        ),
        (
            "offsetof CUmemAllocationProp.type".into(),
            offset_of!(CUmemAllocationProp, type_),
        ),
        (
            "offsetof CUmemAllocationProp.requestedHandleTypes".into(),
            offset_of!(CUmemAllocationProp, requestedHandleTypes),
        ),
        (
            "offsetof CUmemAllocationProp.location".into(),
            offset_of!(CUmemAllocationProp, location),
        ),
        (
            "offsetof CUmemAllocationProp.win32HandleMetaData".into(),
            offset_of!(CUmemAllocationProp, win32HandleMetaData),
        ),
        ("offsetof CUmemAllocationProp.allocFlags".into(), prop_flags),
        (
            "offsetof CUmemAllocationProp.allocFlags.compressionType".into(),
            prop_flags + offset_of!(CUmemAllocationPropFlags, compressionType),
        ),
        (
            "offsetof CUmemAllocationProp.allocFlags.gpuDirectRDMACapable".into(),
            prop_flags + offset_of!(CUmemAllocationPropFlags, gpuDirectRDMACapable),
        ),
        (
            "offsetof CUmemAllocationProp.allocFlags.usage".into(),
            prop_flags + offset_of!(CUmemAllocationPropFlags, usage),
        ),
        (
            "offsetof CUmemAllocationProp.allocFlags.reserved".into(),
            prop_flags + offset_of!(CUmemAllocationPropFlags, reserved),
        ),
        (
            "sizeof CUmemAccessDesc".into(),
            size_of::<CUmemAccessDesc>(),
        ),
        (
            "offsetof CUmemAccessDesc.location".into(),
            offset_of!(CUmemAccessDesc, location),
        ),
        (
            "offsetof CUmemAccessDesc.flags".into(),
            offset_of!(CUmemAccessDesc, flags),
        ),
        ("sizeof CUresult".into(), size_of::<CUresult>()),
        ("sizeof CUdevice".into(), size_of::<CUdevice>()),
        ("sizeof CUdeviceptr".into(), size_of::<CUdeviceptr>()),
        (
            "sizeof CUmemGenericAllocationHandle".into(),
            size_of::<CUmemGenericAllocationHandle>(),
        ),
        (
            "sizeof CUdevice_attribute".into(),
            size_of::<CUdevice_attribute>(),
        ),
        (
            "sizeof CUpointer_attribute".into(),
            size_of::<CUpointer_attribute>(),
        ),
        ("sizeof CUmemorytype".into(), size_of::<CUmemorytype>()),
        (
            "sizeof CUmemAllocationHandleType".into(),
            size_of::<CUmemAllocationHandleType>(),
        ),
        (
            "sizeof CUmemAllocationType".into(),
            size_of::<CUmemAllocationType>(),
        ),
        (
            "sizeof CUmemLocationType".into(),
            size_of::<CUmemLocationType>(),
        ),
        (
            "sizeof CUmemAccess_flags".into(),
            size_of::<CUmemAccess_flags>(),
        ),
        (
            "sizeof CUmemAllocationGranularity_flags".into(),
            size_of::<CUmemAllocationGranularity_flags>(),
        ),
        ("sizeof CUcontext".into(), size_of::<CUcontext>()),
        ("sizeof CUstream".into(), size_of::<CUstream>()),
        (
            "sizeof CUlaunchAttributeID".into(),
            size_of::<CUlaunchAttributeID>(),
        ),
        (
            "sizeof CUlaunchAttributeValue".into(),
            size_of::<CUlaunchAttributeValue>(),
        ),
        (
            "sizeof CUlaunchAttribute".into(),
            size_of::<CUlaunchAttribute>(),
        ),
        (
            "offsetof CUlaunchAttribute.value".into(),
            offset_of!(CUlaunchAttribute, value),
        ),
        ("sizeof CUlaunchConfig".into(), size_of::<CUlaunchConfig>()),
        (
            "offsetof CUlaunchConfig.sharedMemBytes".into(),
            offset_of!(CUlaunchConfig, sharedMemBytes),
        ),
        (
            "offsetof CUlaunchConfig.hStream".into(),
            offset_of!(CUlaunchConfig, hStream),
        ),
        (
            "offsetof CUlaunchConfig.attrs".into(),
            offset_of!(CUlaunchConfig, attrs),
        ),
        (
            "offsetof CUlaunchConfig.numAttrs".into(),
            offset_of!(CUlaunchConfig, numAttrs),
        ),
    ]
}

fn c_program() -> String {
    let mut c = String::from(
        "#include <stddef.h>\n#include <stdio.h>\n#include <cuda.h>\n\
         #define STR2(x) #x\n#define STR(x) STR2(x)\n\
         #define S(t) printf(\"sizeof \" #t \" %zu\\n\", sizeof(t))\n\
         #define O(t, m) printf(\"offsetof \" #t \".\" #m \" %zu\\n\", offsetof(t, m))\n\
         #define V(c) printf(\"value \" #c \" %lld\\n\", (long long)(c))\n\
         int main(void) {\n",
    );
    for (key, _) in rust_layout() {
        let (kind, rest) = key.split_once(' ').unwrap();
        match kind {
            "sizeof" => c += &format!("  S({rest});\n"),
            _ => {
                let (t, m) = rest.split_once('.').unwrap();
                c += &format!("  O({t}, {m});\n");
            }
        }
    }
    for (name, _) in constants() {
        c += &format!("  V({name});\n");
    }
    // C enums with only non-negative values are unsigned int; sys.rs passes them as u32.
    c += "  printf(\"unsigned CUresult %d\\n\", (int)((CUresult)-1 > 0));\n";
    c += "  printf(\"unsigned CUdevice_attribute %d\\n\", (int)((CUdevice_attribute)-1 > 0));\n";
    for s in sys::SYMBOLS {
        let api = s.api;
        let args = if s.args.is_empty() {
            "void".to_string()
        } else {
            s.args
                .iter()
                .map(|a| c_type(a))
                .collect::<Vec<_>>()
                .join(", ")
        };
        c += &format!("  printf(\"symbol {api} %s\\n\", STR({api}));\n");
        c += &format!(
            "  printf(\"prototype {api} %d\\n\", \
             __builtin_types_compatible_p(__typeof__(&{api}), CUresult (*)({args})));\n"
        );
    }
    c += "  return 0;\n}\n";
    c
}

/// Checks the fallback symbols (older names for drivers that lack the versioned one) against
/// their old prototypes, which cuda.h declares only with `__CUDA_API_VERSION_INTERNAL`.
fn c_fallback_program() -> String {
    let mut c = String::from(
        "#define __CUDA_API_VERSION_INTERNAL 1\n#include <stdio.h>\n#include <cuda.h>\n\
         int main(void) {\n",
    );
    for s in sys::SYMBOLS {
        let args = if s.args.is_empty() {
            "void".to_string()
        } else {
            s.args
                .iter()
                .map(|a| c_type(a))
                .collect::<Vec<_>>()
                .join(", ")
        };
        for sym in &s.symbols[1..] {
            c += &format!(
                "  printf(\"fallback {sym} %d\\n\", \
                 __builtin_types_compatible_p(__typeof__(&{sym}), CUresult (*)({args})));\n"
            );
        }
    }
    c += "  return 0;\n}\n";
    c
}

fn run_c(include: &Path, name: &str, program: &str) -> Option<HashMap<String, String>> {
    let dir = std::env::temp_dir().join(format!("stolon-cuda-abi-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join(format!("{name}.c"));
    let exe = dir.join(name);
    std::fs::write(&src, program).unwrap();
    let out = match Command::new("cc")
        .arg("-I")
        .arg(include)
        .arg(&src)
        .arg("-o")
        .arg(&exe)
        .output()
    {
        Ok(o) => o,
        Err(e) => {
            eprintln!("SKIP: no C compiler (cc): {e}");
            return None;
        }
    };
    assert!(
        out.status.success(),
        "compiling the ABI check against {} failed (source kept at {}):\n{}",
        include.display(),
        src.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let run = Command::new(&exe).output().unwrap();
    assert!(run.status.success());
    let _ = std::fs::remove_file(&src);
    let _ = std::fs::remove_file(&exe);
    let _ = std::fs::remove_dir(&dir);
    Some(
        String::from_utf8(run.stdout)
            .unwrap()
            .lines()
            .map(|l| {
                let (k, v) = l.rsplit_once(' ').unwrap();
                (k.to_string(), v.to_string())
            })
            .collect(),
    )
}

#[test]
fn driver_abi_matches_cuda_h() {
    let required = std::env::var_os("STOLON_CUDA_INCLUDE").is_some();
    let include = match find_include_dir() {
        Ok(d) => d,
        Err(why) if required => panic!("{why}"),
        Err(why) => {
            eprintln!("SKIP: {why}");
            return;
        }
    };
    eprintln!("checking against {}", include.join("cuda.h").display());
    let Some(c) = run_c(&include, "abi_layout", &c_program()) else {
        assert!(
            !required,
            "STOLON_CUDA_INCLUDE is set but the C program could not run"
        );
        return;
    };
    let fallbacks = run_c(&include, "abi_fallbacks", &c_fallback_program()).unwrap();
    let mut errs = Vec::new();
    for (key, rust) in rust_layout() {
        let cv: usize = c[&key].parse().unwrap();
        if cv != rust {
            errs.push(format!("{key}: C {cv}, Rust {rust}"));
        }
    }
    for (name, rust) in constants() {
        let key = format!("value {name}");
        let cv: i64 = c[&key].parse().unwrap();
        if cv != rust {
            errs.push(format!("{name}: C {cv}, Rust {rust}"));
        }
    }
    for t in ["CUresult", "CUdevice_attribute"] {
        if c[&format!("unsigned {t}")] != "1" {
            errs.push(format!("{t} is signed in C; sys.rs passes it as u32"));
        }
    }
    for s in sys::SYMBOLS {
        let mapped = &c[&format!("symbol {}", s.api)];
        if mapped != s.symbols[0] {
            errs.push(format!(
                "{}: cuda.h maps it to {mapped}, the table binds {}",
                s.api, s.symbols[0]
            ));
        }
        for sym in &s.symbols[1..] {
            if fallbacks[&format!("fallback {sym}")] != "1" {
                errs.push(format!("{}: fallback {sym} has another prototype", s.api));
            }
        }
        if c[&format!("prototype {}", s.api)] != "1" {
            let args: Vec<String> = s.args.iter().map(|a| c_type(a)).collect();
            errs.push(format!(
                "{}: prototype in cuda.h differs from CUresult {}({})",
                s.api,
                s.symbols[0],
                args.join(", ")
            ));
        }
    }
    assert!(errs.is_empty(), "ABI mismatches:\n{}", errs.join("\n"));
    eprintln!(
        "ok: {} functions, {} constants, {} sizes/offsets",
        sys::SYMBOLS.len(),
        constants().len(),
        rust_layout().len()
    );
}

#[test]
fn rust_type_names_translate_to_c() {
    assert_eq!(c_type("*mut CUdeviceptr"), "CUdeviceptr *");
    assert_eq!(c_type("*mut *const c_char"), "const char * *");
    assert_eq!(
        c_type("*const CUmemAllocationProp"),
        "const CUmemAllocationProp *"
    );
    assert_eq!(c_type("*mut *mut c_void"), "void * *");
    assert_eq!(c_type("usize"), "size_t");
}
