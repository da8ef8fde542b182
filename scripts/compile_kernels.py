"""Compile every Triton kernel variant hogwild launches for GPU architectures, on a machine
without a GPU: Triton's interpreter accepts code that the GPU compiler rejects (``tl.dot`` shapes,
layouts), so this catches it before device time is spent.

The launchers (``triton_attention``, ``rms_norm``, ``rope_store``, ``silu_mul``) run on meta
tensors (shapes, strides and dtypes, no data) with each kernel's ``run`` replaced by a capture and
the attention tiles chosen for the target's limits (``hogwild/layers/tiles.py``: ``ARCH_LIMITS``);
each captured launch is compiled with ``triton.compile`` down to a cubin for the target. A variant
fails if it does not compile, if its shared memory passes the architecture's limit, or if it passes
the bound the tile choice assumed. A family whose attention no tile fits runs the torch backend
there (reported, not a failure).

    .venv/bin/python scripts/compile_kernels.py --arch 90                  # H100/H200, its dtypes
    .venv/bin/python scripts/compile_kernels.py --arch all --dtypes default --table

Prints one line per kernel variant (and with ``--table`` a Markdown table of what runs on each
architecture) and exits 1 if any variant fails.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ["TRITON_INTERPRET"] = "0"  # before triton's first import (``import hogwild`` would set it to 1)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default, stated (3.9 warns while it is unset)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from hogwild.layers.fused import rms_norm, rope_store, silu_mul  # noqa: E402
from hogwild.layers.tiles import (  # noqa: E402
    ARCH_LIMITS,
    DTYPE_NAMES,
    FAMILY_SHAPES,
    DeviceLimits,
    attention_tiles,
    block_m,
    shared_bytes,
)
from hogwild.layers.triton_attention import DeviceMeta, triton_attention  # noqa: E402
from hogwild.layers.triton_backend import CHUNK as TRITON_CHUNK  # noqa: E402

META = torch.device("meta")
POINTER_TYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.int32: "*i32",
                 torch.int64: "*i64"}
def capture_launches() -> list[tuple[JITFunction, dict, dict]]:
    """Replace ``JITFunction.run`` by a capture: (kernel, arguments by name, launch options)."""
    launches = []

    def run(self, *args, grid, warmup, **kwargs):
        options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
        bound = dict(zip(self.arg_names, args, strict=False))
        bound.update(kwargs)
        launches.append((self, bound, options))

    JITFunction.run = run
    return launches


def signature(kernel: JITFunction, bound: dict) -> tuple[dict, dict]:
    """Triton's signature (type of each argument) and constexpr values for one captured launch."""
    types, constants = {}, {}
    for param in kernel.params:
        value = bound[param.name]
        if param.is_constexpr:
            types[param.name] = "constexpr"
            constants[param.name] = value
        elif isinstance(value, torch.Tensor):
            types[param.name] = POINTER_TYPES[value.dtype]
        elif isinstance(value, bool):
            types[param.name] = "i1"
        elif isinstance(value, int):
            types[param.name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        elif isinstance(value, float):
            types[param.name] = "fp32"
        else:
            raise TypeError(f"{kernel.__name__}: cannot type argument {param.name}={value!r}")
    return types, constants


def attention_launches(dtype: torch.dtype, limits: DeviceLimits) -> dict[str, str]:
    """Every flag combination the families use, for decode (T = 1) and prefill chunks (T = 16), with
    the tiles chosen for ``limits``. Returns what runs each family's attention: "triton N x S" (keys
    per tile x pipeline stages) or "torch" (no tile fits: nothing launched)."""
    backends = {}
    for name, (hq, hkv, d, rotary) in FAMILY_SHAPES.items():
        groups = hq // hkv
        tiles = attention_tiles(limits, dtype, d, groups, rotary, TRITON_CHUNK)
        backends[name] = "torch" if tiles is None else f"triton {tiles.block_n}x{tiles.stages}"
        if tiles is None:
            continue
        for T in (1, 16):
            meta = DeviceMeta.allocate(rows=4, items=64, pairs=16, pcs=64, pages=64, T=T, q_heads=hq, groups=groups,
                                       head_dim=d, page_size=32, device=META, chunk=TRITON_CHUNK,
                                       block_m=block_m(groups), rotary=rotary, tables=2)
            query = torch.empty(4, T, hq, d, dtype=dtype, device=META).transpose(1, 2)
            pool = torch.empty(hkv, 64 * 32, d, dtype=dtype, device=META)
            shares = (torch.empty(64, dtype=torch.int32, device=META), torch.empty(16, device=META))
            triton_attention(query, pool, pool, meta, 0.125, limits=limits)
            if name in ("gpt-oss-20b", "Gemma-3-270M"):  # windows, sinks, soft-cap, a second RoPE table
                triton_attention(query, pool, pool, meta, 0.125, shares, window=128,
                                 sinks=torch.empty(hq, device=META), softcap=50.0, table=1, limits=limits)
            if name == "Qwen2.5-7B":  # collaboration statistics
                triton_attention(query, pool, pool, meta, 0.125, shares, limits=limits)
    return backends


def lean_launches(dtype: torch.dtype) -> None:
    """The lean decoder's fused kernels at decode and prefill sizes (Qwen2.5-7B, SmolLM2 and
    Phi-4-mini shapes: partial rotary, fused gate/up halves)."""
    for tokens, hidden, inter, hq, hkv, d, rotary in [(4, 3584, 18944, 28, 4, 128, 128), (512, 576, 1536, 9, 3, 64, 64),
                                                      (4, 3072, 8192, 24, 8, 128, 96)]:
        x = torch.empty(tokens, hidden, dtype=dtype, device=META)
        weight = torch.empty(hidden, dtype=dtype, device=META)
        rms_norm(x, weight, 1e-6)
        rms_norm(x, weight, 1e-6, torch.empty_like(x))
        heads = torch.empty(tokens * hq, d, dtype=dtype, device=META)  # Qwen3's per-head norms
        rms_norm(heads, torch.empty(d, dtype=dtype, device=META), 1e-6)
        qkv = torch.empty(tokens, (hq + 2 * hkv) * d, dtype=dtype, device=META)
        q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=1)
        trig = torch.empty(tokens, rotary, dtype=dtype, device=META)
        pool = torch.empty(hkv, 1 << 20, d, dtype=dtype, device=META)
        rope_store(q, k, v, trig, trig, torch.empty(tokens, dtype=torch.long, device=META), pool, pool)
        gate = torch.empty(tokens, inter, dtype=dtype, device=META)
        silu_mul(gate, torch.empty_like(gate))
        silu_mul(*torch.empty(tokens, 2 * inter, dtype=dtype, device=META).chunk(2, dim=-1))


def bound(kernel: JITFunction, bound: dict, options: dict, arch: int) -> int | None:
    """The shared memory the tile choice assumed for an attention variant (None for other kernels)."""
    if kernel.__name__ != "_partial_kernel":
        return None
    return shared_bytes(bound["k_ptr"].element_size(), bound["HEAD_DIM"], 2 * bound["HALF"], bound["BLOCK_M"],
                        bound["BLOCK_N"], options["num_stages"], arch)


def compile_all(launches, limits: DeviceLimits) -> tuple[int, int]:
    """Compile the captured launches (each variant once) for ``limits.arch``, one line per variant.
    Returns (variants, failures)."""
    arch, seen, failed = limits.arch, set(), 0
    target = GPUTarget("cuda", arch, 32)
    for kernel, args, options in launches:
        types, constants = signature(kernel, args)
        key = (kernel.__name__, tuple(sorted(types.items())), tuple(sorted((k, str(v)) for k, v in constants.items())),
               tuple(sorted(options.items())))
        if key in seen:
            continue
        seen.add(key)
        flags = ", ".join(f"{k}={v}" for k, v in constants.items())
        start = time.perf_counter()
        assumed = bound(kernel, args, options, arch)
        try:
            compiled = triton.compile(ASTSource(kernel, types, constants), target=target, options=options)
            shared = compiled.metadata.shared
            status = (f"ok ({len(compiled.asm['cubin'])} B cubin, {shared} B shared memory"
                      f"{'' if assumed is None else f' of {assumed} B assumed'}, {time.perf_counter() - start:.1f} s)")
            if shared > limits.shared_memory:
                failed += 1
                status = f"FAILED: {shared} B of shared memory, more than sm_{arch}'s {limits.shared_memory} B"
            elif assumed is not None and shared > assumed:
                failed += 1
                status = f"FAILED: {shared} B of shared memory, more than the {assumed} B the tile choice assumed"
        except Exception as exc:  # noqa: BLE001 - report every failing variant, then exit 1
            failed += 1
            status = f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        print(f"sm_{arch} {kernel.__name__}[{flags}, num_stages={options.get('num_stages')}]: {status}", flush=True)
    return len(seen), failed


def table(rows: list[tuple[DeviceLimits, torch.dtype, dict[str, str], str]]) -> str:
    """Markdown: per architecture and dtype, what runs each family's attention, and the check's result."""
    families = list(FAMILY_SHAPES)
    lines = ["| GPUs | arch | shared memory | dtype | " + " | ".join(families) + " | compile check |",
             "|" + "---|" * (len(families) + 5)]
    for limits, dtype, backends, result in rows:
        default = " (default)" if dtype == limits.dtypes()[0] else ""
        lines.append(f"| {limits.name} | sm_{limits.arch} | {limits.shared_memory // 1024} KB | "
                     f"{DTYPE_NAMES[dtype]}{default} | " + " | ".join(backends[f] for f in families) + f" | {result} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="90",
                        help=f"compute capabilities x 10, comma-separated, or all ({', '.join(map(str, ARCH_LIMITS))})")
    parser.add_argument("--dtypes", default="all",
                        help="comma-separated dtypes, 'default' (each architecture's default) or 'all' (all it runs)")
    parser.add_argument("--table", action="store_true", help="print a Markdown table of what runs where at the end")
    args = parser.parse_args()
    archs = list(ARCH_LIMITS) if args.arch == "all" else [int(a) for a in args.arch.split(",")]
    rows, failed = [], 0
    for arch in archs:
        limits = DeviceLimits.for_arch(arch)
        if args.dtypes in ("all", "default"):
            dtypes = limits.dtypes()[: 1 if args.dtypes == "default" else None]
        else:
            dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]
        for dtype in dtypes:
            if dtype not in limits.dtypes():
                print(f"sm_{arch} runs no {DTYPE_NAMES[dtype]} (skipped)")
                continue
            start = time.perf_counter()
            launches = capture_launches()
            backends = attention_launches(dtype, limits)
            lean_launches(dtype)
            variants, failures = compile_all(launches, limits)
            failed += failures
            result = f"{variants - failures} of {variants} compiled" if failures else f"all {variants} compiled"
            print(f"{variants - failures} of {variants} {DTYPE_NAMES[dtype]} kernel variants compiled for sm_{arch} "
                  f"({time.perf_counter() - start:.0f} s)")
            rows.append((limits, dtype, backends, result))
    if args.table:
        print(table(rows))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
