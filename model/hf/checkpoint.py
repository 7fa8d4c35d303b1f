"""A local Hugging Face checkpoint folder: what it holds, checked before anything is loaded.

``inspect_checkpoint(dir, max_bytes)`` reads config.json, finds the ``*.safetensors`` weights and
the tokenizer files, and raises CheckpointError with a message that names the problem: a missing
folder or config, an unsupported family (naming its ``model_type`` and the supported list), no
safetensors weights, no tokenizer.json, weights larger than the limit. Nothing is fetched from a
hub: the folder is all there is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bundle.format import read_json_file
from model.hf.spec import SUPPORTED, unsupported_family

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
OPTIONAL_FILES = ("generation_config.json", "special_tokens_map.json", "chat_template.jinja")


class CheckpointError(ValueError):
    """A checkpoint folder the importer refuses, with the reason."""


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    config: dict[str, Any]  # config.json as written
    weights: list[Path]  # *.safetensors, sorted
    weight_bytes: int

    @property
    def model_type(self) -> str:
        return self.config["model_type"]

    def file(self, name: str) -> Path | None:
        f = self.path / name
        return f if f.is_file() else None

    def read_json(self, name: str) -> dict[str, Any]:
        f = self.file(name)
        return json.loads(f.read_text(encoding="utf-8")) if f is not None else {}

    @property
    def source_files(self) -> list[Path]:
        """Every file the import reads, for the bundle's ``source.files`` hashes."""
        names = ["config.json", *TOKENIZER_FILES, *OPTIONAL_FILES]
        return sorted({*(f for n in names if (f := self.file(n)) is not None), *self.weights})


def inspect_checkpoint(path: str | Path, max_bytes: int | None = None) -> Checkpoint:
    """Check a checkpoint folder without loading weights; raise CheckpointError naming what is wrong."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder {path} does not exist (download it first, e.g. "
                              "`huggingface-cli download ORG/NAME --local-dir DIR`)")
    config = read_json_file(path / "config.json", CheckpointError,
                            f"{path} has no config.json: not a Hugging Face model folder")
    if not isinstance(config, dict) or config.get("model_type") not in SUPPORTED:
        raise CheckpointError(unsupported_family(config.get("model_type") if isinstance(config, dict) else None))
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        others = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".gguf"))
        hint = f" (found {', '.join(others)}: pickled weights are not read; save with safe_serialization)" if others else ""
        raise CheckpointError(f"{path} has no *.safetensors weights{hint}")
    missing = [n for n in TOKENIZER_FILES if not (path / n).is_file()]
    if missing:
        raise CheckpointError(f"{path} has no {' or '.join(missing)}: the bundle needs the checkpoint's own "
                              "tokenizer (a fast tokenizer saved by save_pretrained)")
    size = sum(w.stat().st_size for w in weights)
    if max_bytes is not None and size > max_bytes:
        raise CheckpointError(f"weights of {path} are {size:,} bytes, over the limit of {max_bytes:,} (--max-bytes)")
    return Checkpoint(path=path, config=config, weights=weights, weight_bytes=size)
