"""Exceptions raised by hogwild. Front ends map them to exit code 2 (CLI) or HTTP 400 (server)."""


class HogwildError(Exception):
    """Base class of every error hogwild raises on purpose."""


class InputError(HogwildError, ValueError):
    """Bad user input: empty prompt or problem, a budget or worker count out of range, a bad layout."""


class ContextOverflowError(InputError):
    """The request needs more positions than the model's context window holds."""


class ModelLoadError(HogwildError):
    """The model could not be found or loaded (unknown id or path, missing embedded model)."""


class UnsupportedModelError(ModelLoadError):
    """The model loads but hogwild cannot run it exactly (architecture or RoPE type not supported)."""


class CacheFullError(HogwildError):
    """The KV cache pool has no free pages for a new or growing block (the server makes new sessions
    wait instead; a running session is never harmed: a pass needs its pages before it starts)."""
