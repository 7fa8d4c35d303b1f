"""Model bundle: the folder the service loads and nothing else.

A bundle holds ``model.onnx``, ``tokenizer.model`` and ``config.json``, and optionally
``model.kvinplace.onnx`` (the decoder with an in-place KV cache, section ``onnx_kv_inplace``) and
``model.attention.onnx`` (the forward pass with attention probabilities, section ``onnx_attention``,
read by /v1/inspect only). The format is
documented in docs/model-bundle.md; this module is its reader and validator. Loaders
rebuild everything from ``config.json``, never from command-line defaults.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
KV_INPLACE_SECTION = "onnx_kv_inplace"  # optional: the in-place decoder (model/export_gqa.py)
ATTENTION_SECTION = "onnx_attention"  # optional: the inspection graph (model/export_attention.py)

# Names of the decoder convention used by ONNX Runtime GenAI and Hugging Face Optimum.
DEFAULT_IO_NAMES: dict[str, str] = {
    "input_ids": "input_ids",
    "attention_mask": "attention_mask",
    "position_ids": "position_ids",
    "past_key": "past_key_values.{i}.key",
    "past_value": "past_key_values.{i}.value",
    "logits": "logits",
    "present_key": "present.{i}.key",
    "present_value": "present.{i}.value",
}


class BundleError(ValueError):
    """A bundle that cannot be served: missing, malformed or corrupted files."""


@dataclass(frozen=True)
class Bundle:
    path: Path
    config: dict[str, Any]

    @property
    def name(self) -> str:
        return self.config["name"]

    @property
    def arch(self) -> dict[str, Any]:
        return self.config["architecture"]

    @property
    def context_length(self) -> int:
        return int(self.arch["context_length"])

    @property
    def vocab_size(self) -> int:
        return int(self.arch["vocab_size"])

    @property
    def num_layers(self) -> int:
        return int(self.arch["n_layer"])

    @property
    def num_kv_heads(self) -> int:
        return int(self.arch.get("n_kv_head", self.arch["n_head"]))

    @property
    def head_dim(self) -> int:
        return int(self.arch["head_dim"])

    @property
    def num_parameters(self) -> int:
        return int(self.config.get("num_parameters", 0))

    @property
    def dtype(self) -> str:
        return self.config.get("dtype", "float32")

    @property
    def int8(self) -> bool:
        """Weights quantized by ``--int8``: activations get one int8 scale per run, so logits depend on
        what else shares the run (other rows, speculative positions)."""
        return "int8" in str(self.config.get("training", {}).get("weights", ""))

    @property
    def io_names(self) -> dict[str, str]:
        return {**DEFAULT_IO_NAMES, **self.config.get("onnx", {}).get("io_names", {})}

    @property
    def onnx_path(self) -> Path:
        return self.path / self.config.get("onnx", {}).get("file", "model.onnx")

    @property
    def kv_inplace(self) -> dict[str, Any] | None:
        """The ``onnx_kv_inplace`` section, or None for a bundle without the in-place decoder."""
        return self.config.get(KV_INPLACE_SECTION)

    @property
    def kv_inplace_path(self) -> Path | None:
        return self._file_of(self.kv_inplace)

    @property
    def kv_inplace_io_names(self) -> dict[str, str]:
        return {**DEFAULT_IO_NAMES, **(self.kv_inplace or {}).get("io_names", {})}

    @property
    def attention(self) -> dict[str, Any] | None:
        """The ``onnx_attention`` section, or None for a bundle without the inspection graph."""
        return self.config.get(ATTENTION_SECTION)

    @property
    def attention_path(self) -> Path | None:
        return self._file_of(self.attention)

    def _file_of(self, section: dict[str, Any] | None) -> Path | None:
        """The file an optional graph section names, or None without the section."""
        return None if section is None else self.path / section["file"]

    @property
    def tokenizer_path(self) -> Path:
        return self.path / self.config["tokenizer"].get("file", "tokenizer.model")

    @property
    def bos_id(self) -> int:
        return int(self.config["tokenizer"]["bos_id"])

    @property
    def eos_id(self) -> int:
        return int(self.config["tokenizer"]["eos_id"])

    @property
    def pad_id(self) -> int:
        return int(self.config["tokenizer"]["pad_id"])


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_REQUIRED_ARCH = ("vocab_size", "context_length", "n_layer", "n_head", "head_dim")
_REQUIRED_TOKENIZER = ("bos_id", "eos_id", "pad_id")


def load_bundle(path: str | Path, *, verify_hashes: bool = True) -> Bundle:
    """Read and validate a bundle folder; raise BundleError saying exactly what is wrong."""
    path = Path(path)
    if not path.exists():
        raise BundleError(f"model bundle {path} does not exist (build one with `python -m model build`)")
    if not path.is_dir():
        raise BundleError(f"model bundle {path} is not a directory")
    cfg_path = path / CONFIG_FILE
    if not cfg_path.is_file():
        raise BundleError(f"model bundle {path} has no {CONFIG_FILE}")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{cfg_path} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise BundleError(f"{cfg_path} must hold a JSON object")
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(f"{cfg_path}: format_version is {version!r}, this service reads {FORMAT_VERSION}")
    for section, keys in (("architecture", _REQUIRED_ARCH), ("tokenizer", _REQUIRED_TOKENIZER)):
        sec = config.get(section)
        if not isinstance(sec, dict):
            raise BundleError(f"{cfg_path}: missing object '{section}'")
        missing = [k for k in keys if k not in sec]
        if missing:
            raise BundleError(f"{cfg_path}: '{section}' lacks {', '.join(missing)}")
    for name in (KV_INPLACE_SECTION, ATTENTION_SECTION):
        section = config.get(name)
        if section is not None and not (isinstance(section, dict) and isinstance(section.get("file"), str)):
            raise BundleError(f"{cfg_path}: '{name}' must be an object with a 'file' name")
    config.setdefault("name", path.name)
    bundle = Bundle(path=path, config=config)
    for f in (bundle.onnx_path, bundle.tokenizer_path, bundle.kv_inplace_path, bundle.attention_path):
        if f is not None and not f.is_file():
            raise BundleError(f"model bundle {path} is missing {f.name}")
    if verify_hashes:
        for name, meta in config.get("files", {}).items():
            f = path / name
            if not f.is_file():
                raise BundleError(f"model bundle {path} is missing {name} (listed in {CONFIG_FILE})")
            expected = meta.get("sha256") if isinstance(meta, dict) else meta
            if expected and sha256_file(f) != expected:
                raise BundleError(
                    f"{f} does not match the sha256 recorded in {CONFIG_FILE}: the file is corrupted"
                )
    return bundle
