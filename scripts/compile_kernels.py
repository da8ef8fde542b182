"""Compile every Triton kernel variant hogwild launches for a GPU architecture, on a machine
without a GPU: Triton's interpreter accepts code that the GPU compiler rejects (``tl.dot`` shapes,
layouts), so this catches it before device time is spent.

The launchers (``triton_attention``, ``rms_norm``, ``rope_store``, ``silu_mul``) run on meta
tensors (shapes, strides and dtypes, no data) with each kernel's ``run`` replaced by a capture;
each captured launch is compiled with ``triton.compile`` down to a cubin for the target.

    TRITON_INTERPRET=0 .venv/bin/python scripts/compile_kernels.py --arch 90   # H100/H200

Prints one line per kernel variant and exits 1 if any fails to compile.
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

from hogwild.layers.attention import TRITON_CHUNK, triton_block_m  # noqa: E402
from hogwild.layers.fused import rms_norm, rope_store, silu_mul  # noqa: E402
from hogwild.layers.triton_attention import DeviceMeta, triton_attention  # noqa: E402

META = torch.device("meta")
POINTER_TYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.int32: "*i32",
                 torch.int64: "*i64"}
#: Shared memory a block may use, in bytes, by compute capability (CUDA's opt-in maximum); a kernel
#: over it compiles but fails at launch.
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
#: Attention shapes (query heads, K/V heads, head_dim, rotary dims) of the supported families.
ATTENTION_SHAPES = {
    "SmolLM2-135M": (9, 3, 64, 64),
    "Qwen2.5-7B": (28, 4, 128, 128),
    "Llama-3-8B": (32, 8, 128, 128),
    "gpt-oss-20b": (64, 8, 64, 64),
    "Gemma-3-270M": (4, 1, 256, 256),
    "Phi-4-mini (partial rotary)": (24, 8, 128, 96),
}


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


def attention_launches(dtype: torch.dtype) -> None:
    """Every flag combination the families use, for decode (T = 1) and prefill chunks (T = 16)."""
    for name, (hq, hkv, d, rotary) in ATTENTION_SHAPES.items():
        groups = hq // hkv
        for T in (1, 16):
            meta = DeviceMeta.allocate(rows=4, items=64, pairs=16, pcs=64, pages=64, T=T, q_heads=hq, groups=groups,
                                       head_dim=d, page_size=32, device=META, chunk=TRITON_CHUNK,
                                       block_m=triton_block_m(groups), rotary=rotary, tables=2)
            query = torch.empty(4, T, hq, d, dtype=dtype, device=META).transpose(1, 2)
            pool = torch.empty(hkv, 64 * 32, d, dtype=dtype, device=META)
            shares = (torch.empty(64, dtype=torch.int32, device=META), torch.empty(16, device=META))
            triton_attention(query, pool, pool, meta, 0.125)
            if name in ("gpt-oss-20b", "Gemma-3-270M"):  # windows, sinks, soft-cap, a second RoPE table
                triton_attention(query, pool, pool, meta, 0.125, shares, window=128,
                                 sinks=torch.empty(hq, device=META), softcap=50.0, table=1)
            if name == "Qwen2.5-7B":  # collaboration statistics
                triton_attention(query, pool, pool, meta, 0.125, shares)


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability x 10 (90: H100/H200, 80: A100)")
    parser.add_argument("--dtypes", default="bfloat16,float16,float32")
    args = parser.parse_args()
    target = GPUTarget("cuda", args.arch, 32)
    launches = capture_launches()
    for dtype in (getattr(torch, name) for name in args.dtypes.split(",")):
        attention_launches(dtype)
        lean_launches(dtype)
    seen, failed = set(), 0
    for kernel, bound, options in launches:
        types, constants = signature(kernel, bound)
        key = (kernel.__name__, tuple(sorted(types.items())), tuple(sorted((k, str(v)) for k, v in constants.items())),
               tuple(sorted(options.items())))
        if key in seen:
            continue
        seen.add(key)
        flags = ", ".join(f"{k}={v}" for k, v in constants.items())
        start = time.perf_counter()
        try:
            compiled = triton.compile(ASTSource(kernel, types, constants), target=target, options=options)
            shared = compiled.metadata.shared
            status = (f"ok ({len(compiled.asm['cubin'])} B cubin, {shared} B shared memory, "
                      f"{time.perf_counter() - start:.1f} s)")
            if shared > SHARED_LIMIT.get(args.arch, 101376):
                failed += 1
                status = f"FAILED: {shared} B of shared memory, more than sm_{args.arch} allows"
        except Exception as exc:  # noqa: BLE001 - report every failing variant, then exit 1
            failed += 1
            status = f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        print(f"sm_{args.arch} {kernel.__name__}[{flags}]: {status}", flush=True)
    print(f"{len(seen) - failed} of {len(seen)} kernel variants compiled for sm_{args.arch}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
