"""``python -m stolon`` / ``stolon``: machine info and the two-process demo."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional


def _info(args: argparse.Namespace) -> int:
    from . import errors
    from ._native import libfabric_info, list_providers
    from .topology import discover

    out: dict = {}
    try:
        out["libfabric"] = libfabric_info()
    except errors.LibraryNotFoundError as e:
        out["libfabric"] = {"error": str(e)}
    providers = []
    if "error" not in out["libfabric"]:
        seen = set()
        for p in list_providers():
            key = (p["provider"], p["domain"], p["fabric"])
            if key in seen:
                continue
            seen.add(key)
            providers.append(p)
    out["providers"] = providers
    from ._native import cuda_info

    out["cuda"] = cuda_info()
    from .moe.kernels import kernel_report

    out["moe_kernels"] = kernel_report()
    topo = discover(args.sysfs)
    out["topology"] = topo.to_dict()
    if args.json:
        json.dump(out, sys.stdout, indent=2, default=str)
        print()
        return 0
    lf = out["libfabric"]
    if "error" in lf:
        print(f"libfabric: NOT FOUND\n  {lf['error']}")
    else:
        print(f"libfabric {lf['version']} from {lf['path']}")
    print("\nRDM providers with FI_MSG + FI_RMA + remote CQ data:")
    print(f"  {'provider':<16} {'domain':<10} {'fabric':<20} {'addressing':<10} max_msg")
    for p in providers:
        mode = "virtual" if p["virt_addr"] else "offset"
        print(
            f"  {p['provider']:<16} {p['domain']:<10} {p['fabric']:<20} {mode:<10} "
            f"{p['max_msg_size']}"
        )
    if not providers:
        print("  (none)")
    cu = out["cuda"]
    if cu.get("present"):
        print(f"\nCUDA driver {cu.get('driver_version')}: {len(cu['devices'])} GPU(s)")
        for i, d in enumerate(cu["devices"]):
            print(f"  GPU {i}: {d['name']} at {d['pci_bus_id']}")
        print(f"  GDRCopy (GpuFlag): {cu.get('gdrcopy')}")
    else:
        print(f"\nCUDA: not usable here ({cu.get('error', 'no GPU')})")
    mk = out["moe_kernels"]
    print(f"\nMoE kernels: {mk['summary']}")
    if mk.get("loads"):
        chosen = next(b for b in mk["builds"] if b["name"] == mk["loads"])
        print(f"  loads here: {mk['loads']} (CUDA {chosen['toolkit']}, {chosen['compiler']})")
    elif mk["builds"] and "libcuda" in str(mk.get("error")):
        print("  loads here: none (no CUDA driver)")
    elif mk["builds"]:
        print(f"  loads here: none ({mk.get('error')})")
    print("\nTopology:")
    print(topo.format_table())
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(provider=args.provider, domains=args.domains, size=args.size)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="stolon", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_info = sub.add_parser("info", help="libfabric, usable providers and interfaces, topology")
    p_info.add_argument("--json", action="store_true", help="machine-readable output")
    p_info.add_argument("--sysfs", default="/sys", help="sysfs root (for testing)")
    p_info.set_defaults(func=_info)
    p_demo = sub.add_parser("demo", help="two processes move a buffer, verify it, print GB/s")
    p_demo.add_argument("--provider", default="tcp")
    p_demo.add_argument("--domains", type=int, default=2)
    p_demo.add_argument("--size", type=int, default=64 << 20, help="bytes per write")
    p_demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except BrokenPipeError:
        # `stolon info | head`: the reader left; that is not an error.
        sys.stdout = open(os.devnull, "w")
        return 0


if __name__ == "__main__":
    sys.exit(main())
