"""The methods ``hogwild bench`` compares, and the decoders they start.

A method ``prepare``s a context once (prefills the shared prompt, returns seconds) and ``start``s a
decoder per cell (N workers over that prompt, their first token fed, untimed). A decoder's
``step`` runs one decode pass of all N workers and returns its wall time in seconds, the device
synchronised; it feeds back the greedy tokens.

- ``hogwild-triton`` / ``hogwild-torch``: ``Runner.forward`` with that attention backend (triton
  replays CUDA graphs on CUDA and runs the lean decoder where the model allows it); the prompt is
  one block, each worker writes its own block and sees ``[prompt, own]``;
- ``hogwild-triton-modules``: the triton backend inside transformers' own decoder modules (no lean
  decoder; graphs on CUDA): what the fused per-layer kernels save, side by side;
- ``materialize``: the same state on the torch runner, every pass ``reference=True`` (each view
  copied with its keys re-rotated, every layer);
- ``hogwild-triton+stats`` / ``hogwild-torch+stats`` (``--collab-stats``): the same runner as the
  method without the suffix, every pass ``collab_stats=True`` (attention shares per row and view
  entry, copied to the host after the pass; on CUDA graphs of their own);
- ``transformers``: batched decoding of N rows that each hold the prompt (``DynamicCache``, sdpa);
- ``transformers-compiled``: the same rows in a ``StaticCache``, the decode call compiled with
  ``torch.compile(mode="reduce-overhead", fullgraph=True)`` (CUDA graphs on CUDA): once with
  dynamic shapes, or per cell with static ones where that fails (see ``CompiledCall``).

The transformers methods prefill the prompt once, as one row, and copy its K/V into each cell's
N rows: N identical rows would compute the same K/V N times.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.fx.experimental._config  # noqa: F401 - backed_size_oblivious, see CompiledCall
from transformers import DynamicCache, StaticCache

from .. import Block, LoadedModel, Runner, WorkerStep, ordinary_attention

log = logging.getLogger(__name__)

#: Every method, in table order.
METHODS = ("hogwild-triton", "hogwild-triton+stats", "hogwild-triton-modules", "hogwild-torch", "hogwild-torch+stats",
           "transformers", "transformers-compiled", "materialize")
#: The runner of each hogwild method (materialize and the +stats methods share the runner of their
#: backend), and each runner's ``Runner.for_model`` options.
HOGWILD_RUNNERS = {"hogwild-triton": "triton", "hogwild-triton+stats": "triton",
                    "hogwild-triton-modules": "triton-modules", "hogwild-torch": "torch",
                    "hogwild-torch+stats": "torch", "materialize": "torch"}
RUNNER_OPTIONS = {"triton": dict(attention="triton"), "triton-modules": dict(attention="triton", lean=False),
                  "torch": dict(attention="torch")}
#: The collaboration-statistics variant of each method that has one (``--collab-stats``).
STATS_SUFFIX = "+stats"
STATS_VARIANTS = {"hogwild-triton": "hogwild-triton+stats", "hogwild-torch": "hogwild-torch+stats"}


def with_stats_variants(methods: tuple[str, ...]) -> tuple[str, ...]:
    """``methods`` with each one's ``+stats`` variant right after it (``--collab-stats``)."""
    out: list[str] = []
    for name in methods:
        out += [name] + ([STATS_VARIANTS[name]] if name in STATS_VARIANTS else [])
    return tuple(dict.fromkeys(out))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bytes_per_token(model: LoadedModel) -> int:
    """K and V bytes of one token over all layers."""
    element = torch.empty((), dtype=model.dtype).element_size()
    return 2 * model.num_layers * model.num_kv_heads * model.head_dim * element


class Decoder:
    """N workers decoding over one prefilled prompt.

    first_logits: [N, vocab] float32 of the pass that fed the first token (the same input for
    every method: the cross-method check); kv_bytes: K/V of the tokens held after that pass;
    kv_allocated_bytes: the memory holding them (spare room included).
    """

    first_logits: torch.Tensor
    kv_bytes: int
    kv_allocated_bytes: int

    def step(self) -> float:
        raise NotImplementedError

    def free(self) -> None:
        """Give the decoder's memory back (its blocks or cache)."""


class Prompt:
    """The prompt of the current context, prefilled once for the methods that share it.

    token: the greedy token after the prompt (every worker's first); prefill_s: seconds."""

    def __init__(self, device: torch.device, chunk: int):
        self.device = device
        self.chunk = chunk
        self.prompt_ids: list[int] | None = None
        self.token = 0
        self.prefill_s = 0.0

    def load(self, prompt_ids: list[int]) -> float:
        """Prefill ``prompt_ids`` (again only for another prompt); returns seconds."""
        if self.prompt_ids is not prompt_ids:
            self.release()
            start = time.perf_counter()
            logits = self.prefill(prompt_ids)
            synchronize(self.device)
            self.prefill_s = time.perf_counter() - start
            self.token = int(logits.argmax())
            self.prompt_ids = prompt_ids
        return self.prefill_s

    def prefill(self, prompt_ids: list[int]) -> torch.Tensor:
        """Fill the state; returns the logits after the last token: [vocab]."""
        raise NotImplementedError

    def release(self) -> None:
        self.prompt_ids = None


class Method:
    """One column of the table: ``prepare`` a context (returns prefill seconds), ``start`` a decoder
    for a cell, ``release`` the context. needs_bytes: memory a cell takes beyond what the method
    holds already (checked before starting it)."""

    def __init__(self, name: str, prompt: Prompt):
        self.name = name
        self.prompt = prompt

    def prepare(self, prompt_ids: list[int]) -> float:
        return self.prompt.load(prompt_ids)

    def start(self, workers: int, extra_tokens: int) -> Decoder:
        raise NotImplementedError

    def needs_bytes(self, workers: int, tokens: int) -> int:
        return 0

    def release(self) -> None:
        self.prompt.release()


# -- hogwild ------------------------------------------------------------------------------------
class HogwildPrompt(Prompt):
    """A runner and the prompt block of the current context, shared by the methods on that runner."""

    def __init__(self, runner: Runner, chunk: int):
        super().__init__(runner.model.device, chunk)
        self.runner = runner
        self.block: Block | None = None

    def prefill(self, prompt_ids: list[int]) -> torch.Tensor:
        self.block = self.runner.cache.new_block("prompt", capacity=len(prompt_ids))
        return self.runner.prefill([self.block], prompt_ids, chunk=self.chunk)

    def release(self) -> None:
        if self.block is not None:
            self.runner.cache.free(self.block)
        self.block, self.prompt_ids = None, None


class HogwildMethod(Method):
    def __init__(self, name: str, prompt: HogwildPrompt, reference: bool = False, collab_stats: bool = False):
        super().__init__(name, prompt)
        self.reference = reference
        self.collab_stats = collab_stats

    def start(self, workers: int, extra_tokens: int) -> HogwildDecoder:
        return HogwildDecoder(self.prompt, workers, self.name, self.reference, self.collab_stats)


class HogwildDecoder(Decoder):
    """Worker i sees ``[prompt, own_i]`` and writes one token per pass to ``own_i``.

    collab_stats: every pass also computes the attention shares (``PassOutput.shares``: per row
    [layers, 2], read on the host inside the timed pass); ``shares`` keeps the last pass's."""

    def __init__(self, prompt: HogwildPrompt, workers: int, name: str, reference: bool, collab_stats: bool = False):
        self.runner = prompt.runner
        self.reference = reference
        self.collab_stats = collab_stats
        self.shares: list[torch.Tensor] | None = None
        self.prompt = prompt.block
        cache = self.runner.cache
        self.own = [cache.new_block(f"{name}-worker{i}") for i in range(workers)]
        try:
            self.tokens = [prompt.token] * workers
            self.step()
        except BaseException:
            self.free()
            raise
        self.first_logits = self.logits.float().clone()  # a graph replay may overwrite the output
        blocks = [self.prompt, *self.own]
        self.kv_bytes = cache.bytes_per_token * sum(b.length for b in blocks)
        self.kv_allocated_bytes = cache.bytes_per_token * sum(b.capacity for b in blocks)

    def step(self) -> float:
        steps = [WorkerStep([t], [self.prompt, own]) for t, own in zip(self.tokens, self.own)]
        start = time.perf_counter()
        out = self.runner.forward(steps, reference=self.reference, collab_stats=self.collab_stats)
        synchronize(self.runner.model.device)
        elapsed = time.perf_counter() - start
        if self.collab_stats:
            if out.shares is None or len(out.shares) != len(steps):
                raise RuntimeError("a pass with collab_stats=True gave no attention shares")
            self.shares = out.shares
        logits = self.logits = out.logits  # [N, vocab]
        self.tokens = logits.argmax(-1).tolist()
        return elapsed

    def free(self) -> None:
        for block in self.own:
            self.runner.cache.free(block)
        self.own = []


# -- transformers -------------------------------------------------------------------------------
def cache_nbytes(cache) -> int:
    """Bytes of the K and V tensors a transformers cache holds (all layers, all rows)."""
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


class TransformersPrompt(Prompt):
    """The prompt prefilled once as one row into a ``DynamicCache`` (eager, sdpa, in chunks)."""

    def __init__(self, model: LoadedModel, chunk: int):
        super().__init__(model.device, chunk)
        self.model = model
        self.cache: DynamicCache | None = None

    @torch.no_grad()  # as transformers' generate
    def prefill(self, prompt_ids: list[int]) -> torch.Tensor:
        model = self.model
        decoder = model.model.get_decoder()
        cache = DynamicCache(config=model.model.config)
        row = torch.tensor([prompt_ids], device=model.device)  # [1, L]
        with ordinary_attention(model.model):
            for i in range(0, row.shape[1], self.chunk):
                hidden = decoder(input_ids=row[:, i : i + self.chunk], use_cache=True, **{model.cache_argument: cache})
        if cache.get_seq_length() != len(prompt_ids):
            raise RuntimeError("transformers' DynamicCache was not filled: the cache keyword was ignored")
        self.cache = cache
        return model.logits(hidden.last_hidden_state[:, -1])[0]

    def release(self) -> None:
        self.cache, self.prompt_ids = None, None

    def rows(self, workers: int):
        """(layer, keys, values) of the prompt repeated for ``workers`` rows: [N, kv_heads, L, head_dim]."""
        for i, layer in enumerate(self.cache.layers):
            yield i, layer.keys.repeat(workers, 1, 1, 1), layer.values.repeat(workers, 1, 1, 1)


class CompiledCall:
    """The model's forward compiled once per run, as transformers' ``generate`` compiles its decode
    step (``torch.compile(model.__call__, fullgraph=True)``). backend "inductor" uses mode
    "reduce-overhead" (CUDA graphs on CUDA); "eager" or "aot_eager" check the capture without
    generating code.

    Shapes are dynamic, so one graph serves every context and worker count: the batch size is
    traced size-obliviously (``backed_size_oblivious``, the new-token dimension static), else
    N = 1 would get a graph of its own (a second compilation of the whole model). Where that
    option is missing or its compilation fails (torch 2.11's inductor did, on an H200), the call
    falls back to static shapes (``static``): compiled afresh for each cell (``new_shapes``), the
    most common way users compile and the quickest compile; plain dynamic shapes did not finish
    compiling a 7B model in minutes."""

    def __init__(self, model: LoadedModel, backend: str = "inductor"):
        self.model = model
        self.backend = backend
        self.oblivious = hasattr(torch.fx.experimental._config, "backed_size_oblivious")
        self.static = not self.oblivious
        self.compiled_once = False
        self.fn = self.compile()

    def compile(self):
        options: dict = dict(fullgraph=True, dynamic=not self.static)
        if self.backend == "inductor":
            options["mode"] = "reduce-overhead"
        else:
            options["backend"] = self.backend
        return torch.compile(self.model.model.__call__, **options)

    def new_shapes(self) -> None:
        """A cell with other shapes starts. With static shapes, compile afresh: a recompile would
        otherwise count against dynamo's recompile limit (past it, the call runs eagerly)."""
        if self.static and self.compiled_once:
            torch._dynamo.reset()
            self.fn = self.compile()

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache) -> torch.Tensor:
        """input_ids, position_ids: [N, 1] -> logits [N, 1, vocab] (CUDA-graph memory: copy them)."""
        kwargs = dict(input_ids=input_ids, position_ids=position_ids, use_cache=True, logits_to_keep=1)
        kwargs[self.model.cache_argument] = cache
        if self.static:
            logits = self.fn(**kwargs).logits
            self.compiled_once = True
            return logits
        try:
            for t in (input_ids, position_ids):
                torch._dynamo.mark_static(t, 1)
            with torch.fx.experimental._config.patch(backed_size_oblivious=True):
                logits = self.fn(**kwargs).logits
        except Exception as exc:
            if self.compiled_once:
                raise
            log.warning("transformers-compiled: size-oblivious compilation failed (%s: %s); compiling with "
                        "static shapes, once per cell", type(exc).__name__, str(exc).split("\n")[0][:200])
            self.oblivious, self.static = False, True
            torch._dynamo.reset()
            self.fn = self.compile()
            return self(input_ids, position_ids, cache)
        self.compiled_once = True
        return logits


class TransformersMethod(Method):
    def __init__(self, name: str, prompt: TransformersPrompt, compiled: CompiledCall | None = None):
        super().__init__(name, prompt)
        self.compiled = compiled

    def start(self, workers: int, extra_tokens: int) -> Decoder:
        if self.compiled is None:
            return TransformersDecoder(self.prompt, workers)
        return CompiledDecoder(self.prompt, workers, self.compiled, extra_tokens)

    def needs_bytes(self, workers: int, tokens: int) -> int:
        """Memory a cell needs: N rows of ``tokens`` tokens of K/V, plus one layer's transient copy:
        the ``DynamicCache`` concatenation of every step, or, with a static cache (masked sdpa), K/V
        repeated for every query head of a group (``repeat_kv``)."""
        model = self.prompt.model
        kv = workers * tokens * bytes_per_token(model)
        return kv + kv // model.num_layers * (model.groups if self.compiled else 1)


class TransformersDecoder(Decoder):
    """N rows of the prompt in a ``DynamicCache``; a step is the decoder on [N, 1] and the LM head."""

    @torch.no_grad()  # as transformers' generate
    def __init__(self, prompt: TransformersPrompt, workers: int):
        self.model = prompt.model
        self.cache = DynamicCache(config=self.model.model.config)
        for layer, keys, values in prompt.rows(workers):
            self.cache.update(keys, values, layer)
        self.tokens = [prompt.token] * workers
        self.step()
        self.first_logits = self.logits.float().clone()  # a graph replay may overwrite the output
        self.kv_bytes = self.kv_allocated_bytes = cache_nbytes(self.cache)

    @torch.no_grad()  # as transformers' generate
    def step(self) -> float:
        model = self.model
        input_ids = torch.tensor(self.tokens, device=model.device)[:, None]  # [N, 1]
        with ordinary_attention(model.model):
            start = time.perf_counter()
            decoder = model.model.get_decoder()
            hidden = decoder(input_ids=input_ids, use_cache=True, **{model.cache_argument: self.cache})
            logits = model.logits(hidden.last_hidden_state[:, -1])  # [N, vocab]
            synchronize(model.device)
            elapsed = time.perf_counter() - start
        self.logits = logits
        self.tokens = logits.argmax(-1).tolist()
        return elapsed

    def free(self) -> None:
        self.cache = None


class CompiledDecoder(Decoder):
    """N rows of the prompt in a ``StaticCache`` of L + ``extra_tokens`` positions; a step is the
    compiled model call on [N, 1] (``logits_to_keep=1``). The first calls of a new shape compile
    or record CUDA graphs: the untimed warm-up steps take them."""

    @torch.no_grad()  # as transformers' generate
    def __init__(self, prompt: TransformersPrompt, workers: int, compiled: CompiledCall, extra_tokens: int):
        model = self.model = prompt.model
        self.compiled = compiled
        compiled.new_shapes()
        self.length = len(prompt.prompt_ids)
        self.cache = StaticCache(config=model.model.config, max_cache_len=self.length + extra_tokens)
        for layer, keys, values in prompt.rows(workers):  # the first update allocates the layer: [N, ...]
            self.cache.update(keys, values, layer)
        self.tokens = [prompt.token] * workers
        self.step()
        self.first_logits = self.logits.float().clone()  # a graph replay may overwrite the output
        self.kv_bytes = bytes_per_token(model) * workers * self.length  # the prompt and the first token
        self.kv_allocated_bytes = cache_nbytes(self.cache)

    @torch.no_grad()  # as transformers' generate
    def step(self) -> float:
        model = self.model
        device = model.device
        input_ids = torch.tensor(self.tokens, device=device)[:, None]  # [N, 1]
        position_ids = torch.full_like(input_ids, self.length)
        with ordinary_attention(model.model):
            start = time.perf_counter()
            logits = self.compiled(input_ids, position_ids, self.cache)[:, -1].float()  # [N, vocab]
            synchronize(device)
            elapsed = time.perf_counter() - start
        self.length += 1
        self.logits = logits
        self.tokens = logits.argmax(-1).tolist()
        return elapsed

    def free(self) -> None:
        self.cache = None
