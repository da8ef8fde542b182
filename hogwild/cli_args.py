"""Command-line arguments shared by several sub-commands, and loading a model from them.

Kept apart from ``cli.py`` so that front ends (``evaluate``, ``server``, ``bench``) can use them
without importing the command dispatcher (no import circle).
"""

from __future__ import annotations

import argparse


def add_model_source_arguments(parser: argparse.ArgumentParser) -> None:
    """--model or --random-config, --device, --dtype and --quantize: what ``load_from_args`` reads."""
    from .models import RANDOM_CONFIGS
    from .models.quantize import SCHEMES

    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", default=None, help="HF id, local folder or .gguf (default: embedded SmolLM2)")
    source.add_argument(
        "--random-config", default=None, choices=list(RANDOM_CONFIGS), metavar="PRESET",
        help=f"random weights and a noise tokenizer of a built-in shape instead of --model "
        f"({', '.join(RANDOM_CONFIGS)}; nothing is downloaded)",
    )
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
        help="auto: bfloat16 on a CUDA device that has it, float16 on one that does not; on the CPU float32, "
        "or bfloat16 for quantized weights",
    )
    parser.add_argument("--quantize", default=None, choices=list(SCHEMES),
                        help="quantize the weights at load: int8 (torchao weight-only) or nf4 (bitsandbytes); "
                        "GPTQ, AWQ and FP8 checkpoints load quantized without it (docs/quantization.md)")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    from .layers.backends import CHOICES

    add_model_source_arguments(parser)
    parser.add_argument(
        "--attention", default="auto", choices=CHOICES,
        help="attention backend: auto = triton with CUDA graphs on CUDA, torch on the CPU",
    )
    parser.add_argument(
        "--kv-memory", type=float, default=None, metavar="GIB",
        help="size of the K/V pool in GiB (default: 90%% of free GPU memory less 2 GiB; 4 GiB on the CPU)",
    )
    parser.add_argument(
        "--tp", type=int, default=None, metavar="K",
        help="tensor parallel over K ranks by transformers' TP plan; start with torchrun --nproc-per-node K "
        "(rank 0 does all input and output)",
    )


def load_from_args(args):
    """The LoadedModel that ``--model`` or ``--random-config``, ``--device`` and ``--dtype`` name."""
    import torch

    from .errors import InputError
    from .models import load_model, random_model

    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)  # load_model checks it against the device
    preset = getattr(args, "random_config", None)
    quantize = getattr(args, "quantize", None)
    if quantize is not None and preset is not None:
        raise InputError("--quantize loads saved weights (--model or the embedded model); "
                         "--random-config is not quantized")
    tp = getattr(args, "tp", None)
    if tp is not None and tp < 1:
        raise InputError(f"--tp must be at least 1, got {tp}")
    if tp is not None and tp > 1:
        if preset is not None:
            raise InputError("--tp loads a saved model (--model); --random-config is not sharded")
        model = load_model(args.model, device=args.device, dtype=dtype, tp=tp, quantize=quantize)
        if not model.tp.leader:  # a follower rank mirrors rank 0's passes until the run ends, then exits
            from .engine.follow import follow

            raise SystemExit(follow(model))
        return model
    if preset is None:
        return load_model(args.model, device=args.device, dtype=dtype, quantize=quantize)
    if args.model is not None:  # argparse refuses both; this guards programmatic callers
        raise InputError("give either --model or --random-config, not both")
    return random_model(preset, device=args.device, dtype=dtype)


def runner_options(args) -> dict:
    """Keyword arguments of ``Runner.for_model`` / ``Engine`` from ``--attention`` and ``--kv-memory``."""
    from .errors import InputError

    if args.kv_memory is not None and not args.kv_memory > 0:
        raise InputError(f"--kv-memory must be a positive number of GiB, got {args.kv_memory}")
    kv_memory = None if args.kv_memory is None else int(args.kv_memory * (1 << 30))
    return {"attention": args.attention, "kv_memory": kv_memory}
