"""A GGUF file's model configuration from its header alone, in milliseconds.

``gguf.GGUFReader`` parses every field and tensor description (6-9 s for a 50k-token vocabulary);
deciding whether hogwild can run a file needs only a few scalars. This reads the key/value header
sequentially, keeps scalars and skips arrays (strings by their lengths), then maps the keys to a
transformers config the way transformers' GGUF loader does (``GGUF_CONFIG_MAPPING``).
"""

from __future__ import annotations

import struct
from pathlib import Path

# value type -> struct format of a scalar (8: string, 9: array)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


class _Reader:
    def __init__(self, data):
        self.data, self.pos = data, 0

    def take(self, fmt: str):
        value = struct.unpack_from(fmt, self.data, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.take("<Q")
        self.pos += n
        return self.data[self.pos - n : self.pos].decode("utf-8", "replace")

    def value(self, kind: int):
        if kind in _SCALARS:
            return self.take(_SCALARS[kind])
        if kind == 8:
            return self.string()
        if kind == 9:  # arrays are skipped: a list is never needed for the decision
            item, n = self.take("<I"), self.take("<Q")
            if item == 8:
                for _ in range(n):
                    length = self.take("<Q")
                    self.pos += length
            elif item in _SCALARS:
                self.pos += n * struct.calcsize(_SCALARS[item])
            else:
                for _ in range(n):
                    self.value(item)
            return None
        raise ValueError(f"unknown GGUF value type {kind}")


def read_metadata(path: Path) -> dict:
    """The scalar key/value pairs of a GGUF file's header (arrays left out)."""
    import mmap

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        r = _Reader(mm)
        if mm[:4] != b"GGUF":
            raise ValueError("not a GGUF file (bad magic)")
        r.pos = 4
        r.take("<I")  # version
        r.take("<Q")  # tensor count
        fields = {}
        for _ in range(r.take("<Q")):
            key = r.string()
            value = r.value(r.take("<I"))
            if value is not None:
                fields[key] = value
        return fields


def config_dict(path: Path) -> dict:
    """A transformers config dict (``model_type`` and what the header gives) for a GGUF file."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    fields = read_metadata(path)
    arch = fields.get("general.architecture", "")
    name = str(fields.get("general.name", "")).lower()
    model_type = {"qwen2moe": "qwen2_moe", "gpt-oss": "gpt_oss", "qwen3moe": "qwen3_moe", "gemma3": "gemma3_text",
                  "deepseek2": "deepseek_v2"}.get(arch, arch)
    if arch == "llama" and "mistral" in name:
        model_type = "mistral"
    config = {"model_type": model_type}
    mapping = GGUF_CONFIG_MAPPING.get(model_type, GGUF_CONFIG_MAPPING.get(arch, {}))
    for key, value in fields.items():
        prefix, _, rest = key.partition(".")
        if prefix == arch and mapping.get(rest) not in (None, -1):
            config[mapping[rest]] = value
    if arch == "gpt-oss" and "gpt-oss.rope.scaling.type" in fields:
        config["rope_scaling"] = {"rope_type": fields["gpt-oss.rope.scaling.type"],
                                  "factor": fields.get("gpt-oss.rope.scaling.factor", 1.0)}
    return config
