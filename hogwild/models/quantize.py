"""Quantized weights: the schemes hogwild applies at load, the checks that refuse what cannot load
(decided from the config, before any weight is read), transformers' quantization configs, and the
bytes the weights take.

Two ways a model's linear layers end up quantized, both through transformers' own quantizers:

- a checkpoint that is already quantized (its ``config.json`` has a ``quantization_config``):
  GPTQ and AWQ (through ``gptqmodel``; GPTQ also needs ``optimum``), FP8 blocks (dequantized to
  bf16 by transformers on a CPU or a GPU older than sm_89), bitsandbytes and torchao checkpoints;
- ``--quantize SCHEME`` on a dense model (``SCHEMES``): torchao int8 weight-only, bitsandbytes NF4.

The quantized modules stay callables on ``[tokens, in_features] -> [tokens, out_features]``;
their ``.weight`` is a tensor subclass (torchao), packed uint8 (bitsandbytes) or absent
(GPTQ/AWQ), so nothing in hogwild reads it as a matrix. Embeddings and the LM head stay dense.
"""

from __future__ import annotations

import importlib.util
import logging

import torch

from ..errors import InputError, ModelLoadError

log = logging.getLogger(__name__)

#: The schemes of ``--quantize``: what each stores.
SCHEMES = {
    "int8": "torchao int8 weight-only: one int8 per weight and a scale per output channel (about half of bf16)",
    "nf4": "bitsandbytes NF4: 4-bit normal-float codes and a float32 scale per 64 weights (about 0.28 of bf16)",
}
#: Device types each scheme runs on, and the package that runs it.
SCHEME_DEVICES = {"int8": ("cpu", "cuda"), "nf4": ("cpu", "cuda")}
SCHEME_PACKAGES = {"int8": "torchao", "nf4": "bitsandbytes"}
#: Python packages transformers needs to load a pre-quantized checkpoint, by its ``quant_method``.
CHECKPOINT_PACKAGES = {
    "gptq": ("gptqmodel", "optimum"), "awq": ("gptqmodel",), "fp8": (), "bitsandbytes": ("bitsandbytes",),
    "torchao": ("torchao",), "compressed-tensors": ("compressed_tensors",),
}
INSTALL = 'pip install "hogwild[quant]"'


def checkpoint_method(config) -> str | None:
    """The ``quant_method`` of a pre-quantized checkpoint's config, or None for dense weights."""
    entry = getattr(config, "quantization_config", None)
    if entry is None:
        return None
    method = entry.get("quant_method") if isinstance(entry, dict) else getattr(entry, "quant_method", None)
    return str(getattr(method, "value", method)).lower()  # an enum in transformers' config objects


def drop_gguf_leftover(config) -> bool:
    """A GGUF file converted to safetensors is dense, but transformers writes ``quant_method: gguf``
    into the converted folder's config, which then blocks any quantization ("The model is quantized
    with GgufConfig"). Remove that entry from ``config`` in place; True if there was one."""
    if checkpoint_method(config) != "gguf":
        return False
    del config.quantization_config
    return True


def _missing(packages) -> list[str]:
    return [p for p in packages if importlib.util.find_spec(p) is None]


def check_quantization(config, scheme: str | None, device: str | torch.device, tp: int | None = None) -> str | None:
    """Refuse, from the config alone, what cannot load: an unknown scheme, quantizing a checkpoint
    that is already quantized, a scheme the device cannot run, a missing package, quantized weights
    under tensor parallelism. Returns how the weights will be stored: the scheme, the checkpoint's
    ``quant_method``, or None (dense)."""
    method = checkpoint_method(config)
    where = torch.device(device).type
    if scheme is not None:
        if scheme not in SCHEMES:
            raise InputError(f"unknown --quantize {scheme!r}; choose one of {', '.join(SCHEMES)}")
        if method is not None:
            raise InputError(
                f"--quantize {scheme}: this checkpoint is already quantized ({method}); load it without --quantize"
            )
        if where not in SCHEME_DEVICES[scheme]:
            raise InputError(
                f"--quantize {scheme} ({SCHEME_PACKAGES[scheme]}) does not run on {where}; it runs on "
                f"{', '.join(SCHEME_DEVICES[scheme])}"
            )
    quantization = scheme or method
    if quantization is not None and tp is not None and tp > 1:
        raise InputError(f"--tp does not shard quantized weights ({quantization}) yet; run on one device")
    packages = [SCHEME_PACKAGES[scheme]] if scheme else list(CHECKPOINT_PACKAGES.get(method, ()))
    missing = _missing(packages)
    if missing:
        what = f"--quantize {scheme}" if scheme else f"this {method} checkpoint"
        raise ModelLoadError(f"{what} needs {', '.join(missing)}, which is not installed: {INSTALL}")
    return quantization


def default_dtype(quantization: str | None) -> torch.dtype:
    """The compute dtype when none is asked for: bf16 for quantized weights (their point is memory),
    float32 for dense ones (hogwild's default, exact against float64 references)."""
    return torch.float32 if quantization is None else torch.bfloat16


def quantization_config(scheme: str, dtype: torch.dtype):
    """transformers' quantization config that quantizes a dense checkpoint by ``scheme`` at load."""
    if scheme == "int8":
        from torchao.quantization import Int8WeightOnlyConfig
        from transformers import TorchAoConfig

        return TorchAoConfig(Int8WeightOnlyConfig())
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a weight takes in memory: a tensor subclass (torchao) by its inner tensors, a
    bitsandbytes 4-bit weight with the scales kept beside it (its ``quant_state``), a
    tensor-parallel shard (DTensor) by this rank's part."""
    if hasattr(tensor, "to_local"):
        tensor = tensor.to_local()
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is not None:
        names, _ = flatten()
        parts = [getattr(tensor, name) for name in names]
        return sum(tensor_bytes(p) for p in parts if isinstance(p, torch.Tensor))
    total = tensor.numel() * tensor.element_size()
    state = getattr(tensor, "quant_state", None)
    while state is not None:  # bitsandbytes: absmax (and the nested state of double quantization)
        total += sum(v.numel() * v.element_size() for v in vars(state).values() if isinstance(v, torch.Tensor))
        state = getattr(state, "state2", None)
    return total


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's weights as stored: parameters (tied ones once) and persistent buffers
    (GPTQ/AWQ keep their packed weights, zeros and scales as buffers)."""
    total = sum(tensor_bytes(p) for p in model.parameters())
    for module in model.modules():
        skip = module._non_persistent_buffers_set
        total += sum(tensor_bytes(b) for name, b in module._buffers.items() if b is not None and name not in skip)
    return total
