"""The registry of attention backends: ``--attention`` and the benchmark take their choices from it.

Adding a backend = one module with an ``AttentionBackend`` subclass (``layers/attention.py`` says
what it implements) plus one line here.
"""

from __future__ import annotations

import torch

from ..errors import InputError
from .attention import AttentionBackend
from .reference_attention import ReferenceBackend
from .torch_attention import TorchBackend
from .triton_backend import TritonBackend

#: Every backend by name; "reference" is the spec (tests, the benchmark's "materialize" column).
BACKENDS: dict[str, type[AttentionBackend]] = {b.name: b for b in (TorchBackend, TritonBackend, ReferenceBackend)}
#: What ``--attention`` offers: auto, then the backends meant for runs.
CHOICES = ("auto", "torch", "triton")


def get_backend(name: str) -> AttentionBackend:
    """A backend by name (InputError naming the choices otherwise)."""
    if name not in BACKENDS:
        raise InputError(f"unknown attention backend {name!r}; choose {', '.join(CHOICES)}")
    return BACKENDS[name]()


def resolve_backend(name: str, device: torch.device) -> AttentionBackend:
    """The backend that ``--attention auto|torch|triton`` names on ``device``: auto is triton (with
    CUDA graphs) on CUDA where triton is installed, torch elsewhere. triton on the CPU runs under
    Triton's interpreter (``TRITON_INTERPRET=1``, which ``import hogwild`` sets on a machine without
    CUDA: slow, for tests)."""
    if name == "auto":
        triton = TritonBackend()
        return triton if device.type == "cuda" and triton.unavailable(device) is None else TorchBackend()
    backend = get_backend(name)
    why = backend.unavailable(device)
    if why is not None:
        raise InputError(f"--attention {name}: {why}")
    return backend
