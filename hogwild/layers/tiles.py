"""What a CUDA device runs: its limits, the triton attention kernel's tiles, the model's dtype.

One place decides the tile sizes of ``_partial_kernel`` (``triton_attention``): the launcher, the
planner (``block_m``: query rows per work item, which ``build_meta`` and the CUDA-graph buckets
size work items by) and ``scripts/compile_kernels.py`` all call it. The kernel's shared memory is
dominated by the K and V tiles of BLOCK_N keys, one copy per pipeline stage; ``shared_bytes``
bounds it from above (the compile check fails a variant whose compiled kernel uses more), and
``attention_tiles`` takes the first of ``CANDIDATES`` whose bound fits the device, so today's
64-key, 2-stage tiles stay wherever they fit. The other kernels (merge, fused norms, RoPE, SiLU)
use at most a few hundred bytes of shared memory and need no choice.

Units: bytes for shared memory, compute capability x 10 for ``arch`` (86: sm_86).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch

from ..errors import InputError

log = logging.getLogger(__name__)

#: Oldest architecture the kernels are compiled and checked for (T4, RTX 20xx).
MIN_ARCH = 75
#: (BLOCK_N keys, pipeline stages) in order of preference: fewer keys per tile before no pipelining.
CANDIDATES = ((64, 2), (32, 2), (16, 2), (32, 1), (16, 1))
#: Bytes the compiler may add past the tiles (barriers, reduction scratch).
SLACK = 1024
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


@dataclass(frozen=True)
class DeviceLimits:
    """What the kernels need to know of a CUDA device. name: e.g. "NVIDIA L4"; arch: compute
    capability x 10; shared_memory: bytes one block may use (CUDA's opt-in maximum); bf16: bfloat16
    tensor-core math (compute capability 8.0 and newer)."""

    name: str
    arch: int
    shared_memory: int
    bf16: bool

    @classmethod
    def of(cls, props) -> DeviceLimits:
        """From ``torch.cuda.get_device_properties`` (or any object with its fields)."""
        arch = 10 * props.major + props.minor
        return cls(props.name, arch, props.shared_memory_per_block_optin, arch >= 80)

    @classmethod
    def for_arch(cls, arch: int) -> DeviceLimits:
        """The limits of a listed architecture (``ARCH_LIMITS``), for the compile check and tests."""
        if arch not in ARCH_LIMITS:
            raise ValueError(f"no limits listed for sm_{arch}; listed: {', '.join(f'sm_{a}' for a in ARCH_LIMITS)}")
        name, shared = ARCH_LIMITS[arch]
        return cls(name, arch, shared, arch >= 80)

    def __str__(self) -> str:
        return f"{self.name} (sm_{self.arch}, {self.shared_memory // 1024} KB shared memory per block)"

    def dtypes(self) -> tuple[torch.dtype, ...]:
        """The model dtypes this device runs, the default first."""
        return (torch.bfloat16, torch.float16, torch.float32) if self.bf16 else (torch.float16, torch.float32)


#: Architectures the compile check covers: (GPUs, opt-in shared memory per block in bytes).
ARCH_LIMITS = {
    75: ("T4, RTX 20xx", 65536),
    80: ("A100, A30", 166912),
    86: ("RTX 30xx, A10, A40", 101376),
    89: ("RTX 40xx, L4, L40", 101376),
    90: ("H100, H200", 232448),
    100: ("B200, GB200", 232448),
    120: ("RTX 50xx, RTX PRO 6000", 101376),
}

#: Attention shapes of the supported families: (query heads, K/V heads, head_dim, rotary dims).
FAMILY_SHAPES = {
    "SmolLM2-135M": (9, 3, 64, 64),
    "Qwen2.5-7B": (28, 4, 128, 128),
    "Llama-3-8B": (32, 8, 128, 128),
    "gpt-oss-20b": (64, 8, 64, 64),
    "Gemma-3-270M": (4, 1, 256, 256),
    "Phi-4-mini (partial rotary)": (24, 8, 128, 96),
}


@functools.cache
def _device_limits(index: int) -> DeviceLimits:
    return DeviceLimits.of(torch.cuda.get_device_properties(index))


def device_limits(device: torch.device | str) -> DeviceLimits | None:
    """The limits of a CUDA device (read once per device), None for other devices (the CPU's
    interpreter has no shared-memory limit) or when CUDA is not available."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return _device_limits(torch.cuda.current_device() if device.index is None else device.index)


def block_m(groups: int) -> int:
    """Query rows per work item: 64, or the next power of two that holds one GQA group."""
    return max(64, 1 << (groups - 1).bit_length())


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@dataclass(frozen=True)
class AttentionTiles:
    """The tiles of one ``_partial_kernel`` variant: block_m query rows x block_n keys, the K/V
    loads pipelined over stages; shared: the bound on its shared memory (bytes)."""

    block_m: int
    block_n: int
    stages: int
    shared: int


def shared_bytes(element: int, head_dim: int, rotary: int, rows: int, block_n: int, stages: int, arch: int) -> int:
    """Upper bound on ``_partial_kernel``'s shared memory: per stage a K tile (two rotary halves of
    HALF_P dims, the REST_P pass-through dims) and a V tile (D_P dims) of block_n keys in the K/V
    dtype (element bytes), plus float32 staging for the [rows, block_n] probabilities and, for
    float32 (dots on FMA units) or before sm_80 (no asynchronous copies), for the [rows, 2 HALF_P +
    REST_P] queries, which the compiler then keeps in shared memory; and ``SLACK``. Conservative;
    ``scripts/compile_kernels.py`` checks it against the compiler for every variant it chooses (e.g.
    sm_75, float16, head_dim 128, 16 keys x 2 stages: 49152 B compiled; sm_86, float32, head_dim
    256, 16 x 2: 102656 B; sm_86, bfloat16, head_dim 128, 32 x 2: 28672 B)."""
    half_p = max(16, _pow2(rotary // 2))
    rest_p = max(16, _pow2(head_dim - rotary)) if head_dim > rotary else 0
    kv = block_n * (2 * half_p + rest_p + _pow2(head_dim)) * element
    queries = 2 * half_p + rest_p if element == 4 or arch < 80 else 0
    return stages * kv + rows * (queries + block_n) * 4 + SLACK


def attention_tiles(limits: DeviceLimits | None, dtype: torch.dtype, head_dim: int, groups: int,
                    rotary: int | None = None, chunk: int = 256, rows: int | None = None) -> AttentionTiles | None:
    """The preferred tiles whose shared memory fits the device, or None if none does.

    limits: the device's (None: no limit, the interpreter); dtype: of the K/V pool; groups: query
    heads per K/V head; rotary: rotary dims (default head_dim); chunk: keys per work item (tiles
    are no longer than its largest power of two); rows: query rows per work item (default
    ``block_m(groups)``, what the planner uses).
    """
    rotary = rotary or head_dim
    rows = rows or block_m(groups)
    element = torch.empty(0, dtype=dtype).element_size()
    longest = max(16, min(64, 1 << (chunk.bit_length() - 1)))
    for block_n, stages in CANDIDATES:
        if block_n > longest:
            continue
        shared = shared_bytes(element, head_dim, rotary, rows, block_n, stages, limits.arch if limits else 90)
        if limits is None or shared <= limits.shared_memory:
            return AttentionTiles(rows, block_n, stages, shared)
    return None


def triton_refusal(limits: DeviceLimits, dtype: torch.dtype, head_dim: int, groups: int,
                   rotary: int | None = None) -> str | None:
    """Why the triton attention kernel cannot run this shape on this device, or None if it can."""
    if limits.arch < MIN_ARCH:
        return f"the triton kernels are built for compute capability 7.5 and newer, not {limits}"
    if dtype not in limits.dtypes():
        return f"{limits} has no {DTYPE_NAMES.get(dtype, dtype)}"
    if attention_tiles(limits, dtype, head_dim, groups, rotary) is None:
        smallest = shared_bytes(torch.empty(0, dtype=dtype).element_size(), head_dim, rotary or head_dim,
                                block_m(groups), *CANDIDATES[-1], limits.arch)
        return (f"its smallest {DTYPE_NAMES.get(dtype, dtype)} attention tile at head_dim {head_dim} needs "
                f"{smallest} B of shared memory, more than the {limits.shared_memory} B of {limits}")
    return None


def fast_path(asked: str, limits: DeviceLimits | None, dtype: torch.dtype, head_dim: int, groups: int,
              rotary: int | None = None) -> str:
    """The backend of a model whose attention resolved to triton: "triton" where its kernel runs on
    the device (limits None: the CPU's interpreter, no limit); elsewhere "torch" with one logged line
    saying why if asked is "auto", or an InputError (at start) if it is "triton"."""
    refusal = None if limits is None else triton_refusal(limits, dtype, head_dim, groups, rotary)
    if refusal is None:
        return "triton"
    if asked != "auto":
        raise InputError(f"--attention triton cannot run here: {refusal}; use --attention torch")
    log.warning("attention: torch backend, the triton kernel cannot run here: %s", refusal)
    return "torch"


def model_dtype(asked: torch.dtype | str | None, limits: DeviceLimits | None) -> torch.dtype:
    """The model's dtype: asked (a dtype or its name; None or "auto": bfloat16 on a CUDA device that
    has it, float16 on one that does not, float32 elsewhere). limits: the CUDA device's, None on
    other devices. Raises InputError, before any weight loads, for a dtype the device lacks."""
    if asked is None or asked == "auto":
        return torch.float32 if limits is None else limits.dtypes()[0]
    names = {name: dtype for dtype, name in DTYPE_NAMES.items()}
    if isinstance(asked, str) and asked not in names:
        raise InputError(f"unknown dtype {asked!r}; choose auto, {', '.join(names)}")
    dtype = names[asked] if isinstance(asked, str) else asked
    if limits is not None and dtype not in limits.dtypes():
        raise InputError(f"{limits} has no {DTYPE_NAMES.get(dtype, dtype)} support; "
                         f"use --dtype {DTYPE_NAMES[limits.dtypes()[0]]}")
    return dtype
