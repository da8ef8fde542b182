"""Quantized weights (hogwild/models/quantize.py), on the CPU with nothing from a hub.

- ``--quantize int8|nf4`` at load, on a tiny random Llama and on the embedded SmolLM2: one worker
  equals transformers' greedy ``generate`` on the same quantized model, workers that share a prompt
  equal separate decoding, on the torch backend and on the triton backend with the lean decoder
  (Triton's interpreter; float32, which the interpreter computes exactly).
- GPTQ, AWQ (GEMM) and FP8 (block) checkpoints packed here from a tiny random model in the standard
  formats: they load as they are, match a dense model holding the exactly dequantized weights
  within bf16 rounding, and decode with hogwild.
- Every refusal: one line, exit 2, before any weight is read.
"""

import json
import time

import pytest
import torch
from safetensors.torch import save_file
from test_engine import PROMPT, TINY, byte_tokenizer, greedy_loop, greedy_reference
from transformers import AutoModelForCausalLM, LlamaConfig

from hogwild import InputError, ModelLoadError, Runner, WorkerStep, generate, load_model
from hogwild.cli import main
from hogwild.models.quantize import check_quantization, drop_gguf_leftover, tensor_bytes

PREFIXES = [" First,", " The robot", ""]
GROUP = 32  # GPTQ/AWQ group size and FP8 block edge: divides every width of TINY


def tiny_config() -> LlamaConfig:
    return LlamaConfig(**TINY)


def projections(model) -> list[torch.nn.Module]:
    """The linear layers a quantizer converts: every projection of every decoder layer."""
    return [m for layer in model.get_decoder().layers for m in (*layer.self_attn.children(), *layer.mlp.children())
            if hasattr(m, "in_features")]


@pytest.fixture(scope="module")
def dense_folder(tmp_path_factory):
    """A tiny random Llama (seeded) and its byte tokenizer, saved dense."""
    folder = tmp_path_factory.mktemp("dense")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config()).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def check_decoding(loaded, runner, n: int, n_shared: int, workers: int = 3) -> None:
    """One worker equals greedy generate; workers sharing a prompt equal separate greedy decoding
    (in float32: in bf16 a prompt and a prefix fed in two passes round differently from one pass)."""
    prompt = loaded.tokenizer(PROMPT, add_special_tokens=False).input_ids
    result = generate(runner, prompt, [[]], "independent", max_new_tokens=n)
    assert result.workers[0].token_ids == greedy_reference(loaded, prompt, n)
    prefixes = [loaded.tokenizer(p, add_special_tokens=False).input_ids for p in PREFIXES[:workers]]
    result = generate(runner, prompt, prefixes, "independent", max_new_tokens=n_shared)
    for prefix, worker in zip(prefixes, result.workers, strict=True):
        assert worker.token_ids == greedy_loop(loaded, prompt + prefix, n_shared)


# -- quantized at load ----------------------------------------------------------------------------
#: Bytes of a quantized projection per weight: int8 codes (+ a scale per row); NF4 codes at 4 bits
#: (+ a float32 scale per 64 weights), against 2 bytes in bf16.
BYTES_PER_WEIGHT = {"int8": (1.0, 1.2), "nf4": (0.5 + 4 / 64, 0.7)}


@pytest.mark.parametrize("scheme", ["int8", "nf4"])
def test_quantized_at_load_decodes_exactly_on_the_torch_backend(scheme, dense_folder):
    loaded = load_model(str(dense_folder), dtype=torch.float32, quantize=scheme)
    assert loaded.quantization == scheme and loaded.dtype == torch.float32
    layers = projections(loaded.model)
    assert len(layers) == 2 * 7
    lo, hi = BYTES_PER_WEIGHT[scheme]
    for module in layers:
        weights = module.in_features * module.out_features
        assert type(module.weight) is not torch.nn.Parameter  # a quantized tensor, not a plain matrix
        assert lo * weights <= tensor_bytes(module.weight) <= hi * weights
    check_decoding(loaded, Runner.for_model(loaded, "torch"), 24, 16)
    default = load_model(str(dense_folder), quantize=scheme)  # bf16 unless asked otherwise
    assert default.dtype == torch.bfloat16 and default.weight_bytes < load_model(str(dense_folder)).weight_bytes / 2


@pytest.mark.parametrize("scheme", ["int8", "nf4"])
def test_quantized_at_load_on_the_triton_backend_and_the_lean_decoder(scheme, dense_folder):
    """The lean decoder calls the quantized projections as modules (Triton's interpreter: few tokens)."""
    loaded = load_model(str(dense_folder), dtype=torch.float32, quantize=scheme)
    runner = Runner.for_model(loaded, "triton")
    assert runner.attention.name == "triton" and runner.lean is not None
    check_decoding(loaded, runner, 6, 3, workers=2)


def test_the_embedded_model_quantizes(model):
    """Its converted folder's config.json may still say ``quant_method: gguf`` (older conversions):
    that entry no longer blocks quantizing it. int8 takes a quarter of the float32 projections' bytes."""
    loaded = load_model(None, dtype=torch.float32, quantize="int8")
    assert loaded.quantization == "int8"
    embeddings = model.model.get_input_embeddings().weight.numel() * 4  # tied to the LM head: stays dense
    ratio = (loaded.weight_bytes - embeddings) / (model.weight_bytes - embeddings)
    assert 0.25 <= ratio < 0.26, ratio
    check_decoding(loaded, Runner.for_model(loaded, "torch"), 8, 4, workers=2)


def test_gguf_leftover_is_dense():
    config = LlamaConfig(**TINY)
    config.quantization_config = {"quant_method": "gguf", "gguf_file": "x.gguf", "dequantize": False}
    assert drop_gguf_leftover(config) and getattr(config, "quantization_config", None) is None
    assert check_quantization(config, "int8", "cpu") == "int8"
    assert not drop_gguf_leftover(config)


# -- pre-quantized checkpoints packed here ---------------------------------------------------------
def pack_int4(q: torch.Tensor, order: list[int]) -> torch.Tensor:
    """Pack 4-bit codes [rows, cols] (0..15) eight to an int32 along cols, code ``order[i]`` of each
    eight in bits 4i..4i+3 -> int32 [rows, cols / 8]."""
    q = q.to(torch.int64).reshape(q.shape[0], -1, 8)[:, :, order]
    packed = sum(q[:, :, i] << (4 * i) for i in range(8))
    return (packed - ((packed >> 31) << 32)).to(torch.int32)  # as two's complement int32


def gptq_pack(weight: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """GPTQ (4-bit, symmetric, no act-order, format "gptq": zeros stored minus one): codes packed
    along the input dim."""
    n, k = weight.shape
    grouped = weight.t().reshape(k // GROUP, GROUP, n)
    scales = (grouped.abs().amax(1) / 7).clamp(min=1e-8).half()
    q = torch.round(grouped / scales.float()[:, None] + 8).clamp(0, 15)
    dequantized = ((q - 8) * scales.float()[:, None]).reshape(k, n).t()
    tensors = {
        "qweight": pack_int4(q.reshape(k, n).t(), list(range(8))).t().contiguous(),  # [k / 8, n]
        "qzeros": pack_int4(torch.full((k // GROUP, n), 7), list(range(8))), "scales": scales,
        "g_idx": torch.arange(k, dtype=torch.int32) // GROUP,
    }
    return tensors, dequantized


def awq_pack(weight: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """AWQ GEMM (4-bit, asymmetric with zero points): codes packed along the output dim in AWQ's
    interleaved order."""
    n, k = weight.shape
    grouped = weight.t().reshape(k // GROUP, GROUP, n)
    low, high = grouped.amin(1), grouped.amax(1)
    scales = ((high - low) / 15).clamp(min=1e-8).half()
    zeros = torch.round(-low / scales.float()).clamp(0, 15)
    q = torch.round(grouped / scales.float()[:, None] + zeros[:, None]).clamp(0, 15)
    dequantized = ((q - zeros[:, None]) * scales.float()[:, None]).reshape(k, n).t()
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    return {"qweight": pack_int4(q.reshape(k, n), order), "qzeros": pack_int4(zeros, order), "scales": scales}, \
        dequantized


def fp8_pack(weight: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """FP8 e4m3 with a float32 scale per GROUP x GROUP block (``weight_scale_inv``, Qwen3-*-FP8)."""
    n, k = weight.shape
    blocks = weight.reshape(n // GROUP, GROUP, k // GROUP, GROUP)
    scales = blocks.abs().amax((1, 3)) / torch.finfo(torch.float8_e4m3fn).max
    q = (blocks / scales[:, None, :, None]).to(torch.float8_e4m3fn)
    dequantized = (q.float() * scales[:, None, :, None]).reshape(n, k)
    return {"weight": q.reshape(n, k), "weight_scale_inv": scales}, dequantized


FORMATS = {
    "gptq": (gptq_pack, {"quant_method": "gptq", "bits": 4, "group_size": GROUP, "sym": True, "desc_act": False,
                         "checkpoint_format": "gptq"}),
    "awq": (awq_pack, {"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True, "version": "gemm"}),
    "fp8": (fp8_pack, {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                       "weight_block_size": [GROUP, GROUP]}),
}


def write_checkpoint(method: str, folder):
    """Pack a tiny random Llama's projections in ``method``'s format into ``folder``; return the dense
    model (float32) holding the exactly dequantized weights."""
    pack, entry = FORMATS[method]
    torch.manual_seed(0)
    dense = AutoModelForCausalLM.from_config(tiny_config()).eval()
    tensors = {}
    with torch.no_grad():
        for name, module in dense.named_modules():
            if module in projections(dense):
                packed, dequantized = pack(module.weight.float())
                tensors.update({f"{name}.{key}": value for key, value in packed.items()})
                module.weight.copy_(dequantized)
        quantized = {f"{name}.weight" for name, m in dense.named_modules() if m in projections(dense)}
        tensors.update({k: v for k, v in dense.state_dict().items() if k not in quantized})
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "model.safetensors", metadata={"format": "pt"})
    config = tiny_config().to_dict() | {"architectures": ["LlamaForCausalLM"], "quantization_config": entry}
    (folder / "config.json").write_text(json.dumps(config))
    byte_tokenizer().save_pretrained(folder)
    return dense


@pytest.mark.parametrize("method", list(FORMATS))
def test_prequantized_checkpoint_matches_its_dequantized_weights_and_decodes(method, tmp_path):
    """Loaded in bf16 (the default) and float32 (exact decoding: see ``check_decoding``)."""
    dense = write_checkpoint(method, tmp_path)
    for dtype in (None, torch.float32):
        loaded = load_model(str(tmp_path), dtype=dtype)
        assert loaded.quantization == method and loaded.dtype == (dtype or torch.bfloat16)
        if method != "fp8":  # on the CPU transformers dequantizes FP8 to bf16 at load
            assert all(not hasattr(m, "weight") for m in projections(loaded.model))  # packed buffers only
        prompt = loaded.tokenizer(PROMPT, add_special_tokens=False).input_ids
        runner = Runner.for_model(loaded)
        block = runner.cache.new_block("prompt")
        logits = runner.forward([WorkerStep(prompt, [block])]).logits[0]
        runner.cache.free(block)
        with torch.no_grad():
            want = dense(torch.tensor([prompt])).logits[0, -1]
        error = float((logits - want).norm() / want.norm())
        assert error < 0.02, error  # bf16 rounding of activations, and of the weights in the kernels
    check_decoding(loaded, runner, 16, 8)


# -- refusals ---------------------------------------------------------------------------------------
def config_only(folder, quantization: dict | None = None):
    """A folder with a config.json and no weights: a refusal must come before any weight is read."""
    config = tiny_config().to_dict() | {"architectures": ["LlamaForCausalLM"]}
    if quantization:
        config["quantization_config"] = quantization
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


@pytest.mark.parametrize("extra, message", [
    (["--quantize", "int8", "--checkpoint", "awq"], "already quantized (awq); load it without --quantize"),
    (["--quantize", "nf4", "--checkpoint", "fp8"], "already quantized (fp8)"),
    (["--quantize", "nf4", "--device", "mps"], "--quantize nf4 (bitsandbytes) does not run on mps"),
    (["--quantize", "int8", "--tp", "2"], "--tp does not shard quantized weights (int8)"),
    (["--checkpoint", "gptq", "--tp", "2"], "--tp does not shard quantized weights (gptq)"),
])
def test_refusals_exit_2_before_weights(extra, message, tmp_path, capsys):
    checkpoint = None
    if "--checkpoint" in extra:
        at = extra.index("--checkpoint")
        checkpoint, extra = extra[at + 1], extra[:at] + extra[at + 2:]
    folder = config_only(tmp_path, FORMATS[checkpoint][1] if checkpoint else None)
    start = time.perf_counter()
    code = main(["generate", "--prompt", "hi", "--model", folder, *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert time.perf_counter() - start < 5  # from the config: nothing is loaded


def test_refused_with_random_config_and_unknown_scheme(capsys):
    code = main(["generate", "--prompt", "hi", "--random-config", "tiny-qwen2", "--quantize", "int8"])
    assert code == 2 and "--random-config is not quantized" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # argparse's choices
        main(["generate", "--prompt", "hi", "--quantize", "int4"])
    assert exit_info.value.code == 2 and "invalid choice: 'int4'" in capsys.readouterr().err
    with pytest.raises(InputError, match="unknown --quantize 'int4'; choose one of int8, nf4"):
        check_quantization(tiny_config(), "int4", "cpu")


def test_a_missing_package_is_named(monkeypatch, tmp_path):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gptqmodel" else find_spec(name))
    with pytest.raises(ModelLoadError, match=r'this awq checkpoint needs gptqmodel.*pip install "hogwild\[quant\]"'):
        load_model(config_only(tmp_path, FORMATS["awq"][1]))
