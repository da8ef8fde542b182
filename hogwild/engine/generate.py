"""Raw parallel continuation: several workers over one shared prompt, no collaboration protocol.

Layouts (each worker's view, its own block last):
- ``independent``: [prompt, own]: each worker continues prompt + its prefix alone, exactly as
  ordinary decoding would;
- ``contiguous``: [prompt, every other worker's block, own]; every worker block opens with the
  separator, so a worker reads the others' work so far and then continues its own.

The last token of the preamble before a worker's own text (the prompt's last token for
``independent``, the separator for ``contiguous``) is stored in the worker's own block: then every
worker has a token to feed in the first pass, and a prefix may be empty.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..errors import ContextOverflowError, InputError
from ..sampling import Sampler, SamplingParams
from .runner import Runner, WorkerStep

GENERATE_LAYOUTS = ("independent", "contiguous")


@dataclass
class WorkerOutput:
    prefix_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""


@dataclass
class GenerateResult:
    model: str
    prompt_token_ids: list[int]
    workers: list[WorkerOutput]
    forward_passes: int
    elapsed_s: float


def generate(
    runner: Runner,
    prompt_token_ids: list[int],
    prefixes: list[list[int]],
    layout: str = "independent",
    max_new_tokens: int = 64,
    sampling: SamplingParams | None = None,
    seed: int | None = None,
    separator_token_ids: list[int] | None = None,
) -> GenerateResult:
    """Decode ``max_new_tokens`` per worker; one worker per prefix (a prefix may be empty)."""
    if not prompt_token_ids:
        raise InputError("the prompt is empty")
    if not prefixes:
        raise InputError("at least one worker is needed")
    if max_new_tokens < 1:
        raise InputError(f"max-new-tokens must be at least 1, got {max_new_tokens}")
    if layout not in GENERATE_LAYOUTS:
        raise InputError(f"unknown layout {layout!r}; choose one of {', '.join(GENERATE_LAYOUTS)}")
    tokenizer = runner.model.tokenizer
    separator = separator_token_ids or tokenizer("\n\n", add_special_tokens=False).input_ids
    if layout == "independent":
        shared, lead = prompt_token_ids[:-1], prompt_token_ids[-1:]
    else:
        shared, lead = prompt_token_ids, separator
    own_lengths = [len(lead) + len(p) + max_new_tokens for p in prefixes]
    longest = len(shared) + (sum(own_lengths) if layout == "contiguous" else max(own_lengths))
    if longest > runner.model.max_positions:
        raise ContextOverflowError(
            f"this request needs up to {longest} positions, more than the model's context of "
            f"{runner.model.max_positions}"
        )

    sampler = Sampler(sampling or SamplingParams(), seed)
    cache = runner.cache
    start, passes_before = time.perf_counter(), runner.forward_passes
    prompt = cache.new_block("prompt", capacity=len(shared))  # it never grows
    own = [cache.new_block(f"worker{i}") for i in range(len(prefixes))]
    try:
        if shared:
            runner.prefill([prompt], shared)
        views = []
        for i, block in enumerate(own):
            others = [b for j, b in enumerate(own) if j != i] if layout == "contiguous" else []
            views.append([prompt, *others, block])
        outputs = [WorkerOutput(list(p)) for p in prefixes]
        pending = [lead + list(p) for p in prefixes]
        for _ in range(max_new_tokens):
            logits = runner.forward([WorkerStep(tokens, view) for tokens, view in zip(pending, views)]).logits
            pending = [[t] for t in sampler(logits)]
            for out, (token,) in zip(outputs, pending):
                out.token_ids.append(token)
        for out in outputs:
            out.text = tokenizer.decode(out.token_ids)
    finally:
        for block in [prompt, *own]:
            cache.free(block)
    return GenerateResult(
        model=runner.model.name,
        prompt_token_ids=list(prompt_token_ids),
        workers=outputs,
        forward_passes=runner.forward_passes - passes_before,
        elapsed_s=time.perf_counter() - start,
    )
