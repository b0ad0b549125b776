"""Builds the MoE kernels' fatbin with NVRTC + nvFatbin (for toolkits without an nvcc on PyPI).

PyPI's CUDA 12 packages have no nvcc driver (``nvidia-cuda-nvcc-cu12`` holds only ptxas and
libnvvm), but ``nvidia-cuda-nvrtc-cu12`` compiles CUDA C++ to cubins and PTX, and
``nvidia-nvfatbin-cu12`` bundles them into a fatbin: the same kind of file ``nvcc -fatbin``
writes. ``build.rs`` runs this script; it is not part of the Python package.

    python nvrtc_fatbin.py --nvrtc libnvrtc.so.12 --nvfatbin libnvfatbin.so.12 \
        --include DIR [--include DIR ...] --arch 80 --arch 90a --arch 100a --ptx 80 \
        -o moe.fatbin kernels/moe.cu

Prints the NVRTC version (``12.8``) on stdout; exits non-zero with the compiler log on error.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
import tempfile


def _check(lib: ctypes.CDLL, what: str, rc: int, prog=None) -> None:
    if rc == 0:
        return
    msg = ""
    if lib is not None and hasattr(lib, "nvrtcGetErrorString"):
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        msg = lib.nvrtcGetErrorString(rc).decode()
    elif lib is not None and hasattr(lib, "nvFatbinGetErrorString"):
        lib.nvFatbinGetErrorString.restype = ctypes.c_char_p
        msg = (lib.nvFatbinGetErrorString(rc) or b"").decode()
    log = ""
    if prog is not None:
        n = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
        buf = ctypes.create_string_buffer(n.value)
        lib.nvrtcGetProgramLog(prog, buf)
        log = buf.value.decode(errors="replace")
    sys.exit(f"{what} failed ({rc}: {msg})\n{log}")


def _compile(nvrtc, src: bytes, name: bytes, arch: str, includes, cubin: bool) -> bytes:
    prog = ctypes.c_void_p()
    _check(
        nvrtc,
        "nvrtcCreateProgram",
        nvrtc.nvrtcCreateProgram(ctypes.byref(prog), src, name, 0, None, None),
    )
    target = f"sm_{arch}" if cubin else f"compute_{arch}"
    opts = [f"--gpu-architecture={target}", "-std=c++17"]
    opts += [f"--include-path={d}" for d in includes]
    c_opts = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
    rc = nvrtc.nvrtcCompileProgram(prog, len(opts), c_opts)
    _check(nvrtc, f"NVRTC compile for {target}", rc, prog)
    size = ctypes.c_size_t()
    if cubin:
        _check(nvrtc, "nvrtcGetCUBINSize", nvrtc.nvrtcGetCUBINSize(prog, ctypes.byref(size)))
        buf = ctypes.create_string_buffer(size.value)
        _check(nvrtc, "nvrtcGetCUBIN", nvrtc.nvrtcGetCUBIN(prog, buf))
    else:
        _check(nvrtc, "nvrtcGetPTXSize", nvrtc.nvrtcGetPTXSize(prog, ctypes.byref(size)))
        buf = ctypes.create_string_buffer(size.value)
        _check(nvrtc, "nvrtcGetPTX", nvrtc.nvrtcGetPTX(prog, buf))
    nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))
    return buf.raw[: size.value]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nvrtc", required=True)
    ap.add_argument("--nvfatbin", required=True)
    ap.add_argument("--include", action="append", default=[])
    ap.add_argument("--arch", action="append", default=[], help="cubin for sm_ARCH")
    ap.add_argument("--ptx", action="append", default=[], help="PTX for compute_ARCH")
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("source")
    a = ap.parse_args()

    nvrtc = ctypes.CDLL(a.nvrtc)
    fb = ctypes.CDLL(a.nvfatbin)
    major, minor = ctypes.c_int(), ctypes.c_int()
    _check(nvrtc, "nvrtcVersion", nvrtc.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)))

    with open(a.source, "rb") as f:
        src = f.read() + b"\0"
    # NVRTC has no C++ standard library headers; <cstdint> comes from libcu++ (CCCL) instead.
    with tempfile.TemporaryDirectory() as shim:
        with open(os.path.join(shim, "cstdint"), "w") as f:
            f.write(
                "#pragma once\n#include <cuda/std/cstdint>\n"
                "using cuda::std::int8_t; using cuda::std::int16_t; using cuda::std::int32_t;\n"
                "using cuda::std::int64_t; using cuda::std::uint8_t; using cuda::std::uint16_t;\n"
                "using cuda::std::uint32_t; using cuda::std::uint64_t;\n"
                "using cuda::std::uintptr_t; using cuda::std::intptr_t;\n"
                "namespace std { using namespace cuda::std; }\n"
            )
        # The source's folder: its `#include "..."` headers (NVRTC has only the source text).
        includes = [shim, os.path.dirname(os.path.abspath(a.source))] + a.include
        name = os.path.basename(a.source).encode()
        handle = ctypes.c_void_p()
        _check(fb, "nvFatbinCreate", fb.nvFatbinCreate(ctypes.byref(handle), None, 0))
        for arch in a.arch:
            cubin = _compile(nvrtc, src, name, arch, includes, cubin=True)
            _check(
                fb,
                f"nvFatbinAddCubin sm_{arch}",
                fb.nvFatbinAddCubin(handle, cubin, len(cubin), arch.encode(), name),
            )
        for arch in a.ptx:
            ptx = _compile(nvrtc, src, name, arch, includes, cubin=False)
            _check(
                fb,
                f"nvFatbinAddPTX compute_{arch}",
                fb.nvFatbinAddPTX(handle, ptx, len(ptx), arch.encode(), name, b""),
            )
        size = ctypes.c_size_t()
        _check(fb, "nvFatbinSize", fb.nvFatbinSize(handle, ctypes.byref(size)))
        out = ctypes.create_string_buffer(size.value)
        _check(fb, "nvFatbinGet", fb.nvFatbinGet(handle, out))
        fb.nvFatbinDestroy(ctypes.byref(handle))
    with open(a.output, "wb") as f:
        f.write(out.raw[: size.value])
    print(f"{major.value}.{minor.value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
