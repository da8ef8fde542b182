"""Command-line arguments shared by several sub-commands, and loading a model from them.

Kept apart from ``cli.py`` so that front ends (``evaluate``, ``server``, ``bench``) can use them
without importing the command dispatcher (no import circle).
"""

from __future__ import annotations

import argparse


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="HF id, local folder or .gguf (default: embedded SmolLM2)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])


def load_from_args(args):
    """The LoadedModel that ``--model``, ``--device`` and ``--dtype`` name."""
    import torch

    from .model import load_model

    return load_model(args.model, device=args.device, dtype=getattr(torch, args.dtype))
