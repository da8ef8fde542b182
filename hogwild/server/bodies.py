"""Reading a JSON request body at a cost bounded by its size, whatever it holds.

A body is judged from its bytes before it is parsed (``count_items``: a few passes over the bytes
in C, no Python object per item), so that a list bomb (``{"messages": [1, 1, ...]}`` with millions
of items, or an object with 300,000 keys) is refused in milliseconds and never becomes millions of
objects or validation errors. A body that passes is parsed and its every list and object is
checked against ``JsonLimits`` (at most ``max_items`` values visited), stopping at the first one
over its limit. Only then do the request models validate it, with lists that stop at their first
bad item (``FailFast``): the cost of an invalid request never grows with its number of errors.

``BoundedJsonRoute`` plugs this into FastAPI: its requests parse their JSON this way.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import HTTPException, Request, Response
from fastapi.routing import APIRoute

STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+"')  # a JSON string, escapes included (possessive: no backtracking)
MAX_PATH_CHARS = 32


@dataclass(frozen=True)
class JsonLimits:
    """``max_items``: list items and object keys in a body, all levels together; ``max_list``:
    items of one list; ``max_keys``: keys of one object."""

    max_items: int = 16_384
    max_list: int = 2048
    max_keys: int = 64


LIMITS = JsonLimits()


class BodyShapeError(HTTPException):
    """A body over one of the limits (HTTP 400)."""

    def __init__(self, message: str):
        super().__init__(400, message)


def count_items(body: bytes, limit: int) -> int:
    """The number of list items and object keys in the JSON text ``body`` (its commas, ``[`` and
    ``{`` outside strings), or some number above ``limit`` as soon as it is clearly more.

    Each pass is C code over the bytes (``bytes.count``, one regular expression): the cost
    follows the body's size, never its number of items."""
    structural = body.count(b",") + body.count(b"[") + body.count(b"{")
    if structural <= limit:  # commas inside strings only add to it: nothing more to do
        return structural
    quotes = body.count(b'"') - body.count(b'\\"')  # the quotes that delimit strings (about)
    if quotes > 4 * limit:  # each item holds at most two strings (a key and its value)
        return quotes // 4
    bare = STRING.sub(b'""', body)  # at most 2 * limit strings: a handful of milliseconds
    return bare.count(b",") + bare.count(b"[") + bare.count(b"{")


def where(path: tuple) -> str:
    return ".".join(str(p)[:MAX_PATH_CHARS] for p in path) or "body"


def check_shape(data: Any, limits: JsonLimits = LIMITS) -> None:
    """Refuse the first list or object of ``data`` over ``limits`` (BodyShapeError); visits at
    most ``limits.max_items`` values."""
    stack: list[tuple[Any, tuple]] = [(data, ())]
    seen = 0
    while stack:
        value, path = stack.pop()
        if isinstance(value, dict):
            if len(value) > limits.max_keys:
                raise BodyShapeError(f"{where(path)}: an object of {len(value)} keys; at most {limits.max_keys}")
            children = [(v, (*path, k)) for k, v in value.items()]
        elif isinstance(value, list):
            if len(value) > limits.max_list:
                raise BodyShapeError(f"{where(path)}: a list of {len(value)} items; at most {limits.max_list}")
            children = [(v, (*path, i)) for i, v in enumerate(value)]
        else:
            continue
        seen += len(children)
        if seen > limits.max_items:
            raise BodyShapeError(f"the body holds more than {limits.max_items} list items and object keys")
        stack.extend(children)


def parse(body: bytes, limits: JsonLimits = LIMITS) -> Any:
    """The JSON of ``body``, refused (BodyShapeError) before parsing when it holds too many items,
    after parsing when one of its lists or objects is too long. Malformed JSON raises
    ``json.JSONDecodeError``."""
    if count_items(body, limits.max_items) > limits.max_items:
        raise BodyShapeError(f"the body holds more than {limits.max_items} list items and object keys")
    data = json.loads(body)
    check_shape(data, limits)
    return data


class BoundedJsonRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse(await self.body())
        return self._json


class BoundedJsonRoute(APIRoute):
    """A route whose request body is read by ``parse`` (FastAPI then validates what it returns)."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def bounded(request: Request) -> Response:
            return await handler(BoundedJsonRequest(request.scope, request.receive))

        return bounded
