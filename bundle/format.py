"""Model bundle: the folder the service loads and nothing else.

A bundle holds ``model.onnx``, a tokenizer (``tokenizer.model``, SentencePiece, or
``tokenizer.json``, Hugging Face ``tokenizers``) and ``config.json``, and optionally a Jinja chat
template (``chat_template.jinja``, section ``chat_template``), ``model.kvinplace.onnx`` (the decoder with an in-place KV cache, section ``onnx_kv_inplace``) and
``model.attention.onnx`` (the forward pass with attention probabilities, section ``onnx_attention``,
read by /v1/inspect only). The format is
documented in docs/model-bundle.md; this module is its reader and validator. Loaders
rebuild everything from ``config.json``, never from command-line defaults.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
KV_INPLACE_SECTION = "onnx_kv_inplace"  # optional: the in-place decoder (model/export_inplace.py)
ATTENTION_SECTION = "onnx_attention"  # optional: the inspection graph (model/export_attention.py)
TOKENIZER_TYPES = ("sentencepiece", "huggingface")
TOKENIZER_FILES = {"sentencepiece": "tokenizer.model", "huggingface": "tokenizer.json"}
# generation_config.json keys a bundle may carry as request defaults, with their checks.
GENERATION_DEFAULTS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "temperature": ("a number >= 0", lambda v: _number(v) and v >= 0),
    "top_p": ("a number in (0, 1]", lambda v: _number(v) and 0 < v <= 1),
    "top_k": ("an integer >= 0", lambda v: _number(v) and v == int(v) and v >= 0),
    "repetition_penalty": ("a number > 0", lambda v: _number(v) and v > 0),
    "max_new_tokens": ("an integer >= 1", lambda v: _number(v) and v == int(v) and v >= 1),
    "do_sample": ("true or false", lambda v: isinstance(v, bool)),
}


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


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


def _section(name: str, what: str) -> property:
    """A Bundle property: config.json's optional section ``name`` (a dict), None when absent."""
    return property(lambda self: self.config.get(name),
                    doc=f"The ``{name}`` section, or None for a bundle without {what}.")


def _section_file(name: str) -> property:
    """A Bundle property: the path of the file the optional section ``name`` names, None when absent."""
    return property(lambda self: self._file_of(self.config.get(name)),
                    doc=f"The file of the ``{name}`` section, or None.")


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
    def kv_dtype(self) -> str:
        return self.config.get("onnx", {}).get("kv_dtype", self.dtype)

    @property
    def kv_bytes_per_token(self) -> int:
        """KV cache bytes one cached token takes: layers x (key + value) x KV heads x head dim x dtype bytes."""
        itemsize = {"float32": 4, "float16": 2, "bfloat16": 2}.get(self.kv_dtype, 4)
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * itemsize

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

    kv_inplace = _section(KV_INPLACE_SECTION, "the in-place decoder")
    kv_inplace_path = _section_file(KV_INPLACE_SECTION)

    @property
    def kv_inplace_io_names(self) -> dict[str, str]:
        return {**DEFAULT_IO_NAMES, **(self.kv_inplace or {}).get("io_names", {})}

    attention = _section(ATTENTION_SECTION, "the inspection graph")
    attention_path = _section_file(ATTENTION_SECTION)

    def _file_of(self, section: dict[str, Any] | None) -> Path | None:
        """The file an optional graph section names, or None without the section."""
        return None if section is None else self.path / section["file"]

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type", "gpt"))

    @property
    def tokenizer_type(self) -> str:
        """"sentencepiece" (tokenizer.model) or "huggingface" (tokenizer.json)."""
        return self.config["tokenizer"].get("type", "sentencepiece")

    @property
    def tokenizer_path(self) -> Path:
        return self.path / self.config["tokenizer"].get("file", TOKENIZER_FILES[self.tokenizer_type])

    @property
    def bos_id(self) -> int:
        """-1 when the tokenizer has none."""
        return _id(self.config["tokenizer"].get("bos_id"))

    @property
    def eos_id(self) -> int:
        return int(self.config["tokenizer"]["eos_id"])

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Every id that ends a generation, ``eos_id`` first."""
        return tuple(dict.fromkeys([self.eos_id, *self.config["tokenizer"].get("eos_ids", ())]))

    @property
    def pad_id(self) -> int:
        """-1 when the tokenizer has none."""
        return _id(self.config["tokenizer"].get("pad_id"))

    @property
    def padding_id(self) -> int:
        """The id that fills padding positions: ``pad_id``, or ``eos_id`` for a tokenizer without one
        (as ``transformers`` pads); padded positions are masked, so any valid id would do."""
        return self.pad_id if self.pad_id >= 0 else self.eos_id

    @property
    def add_bos(self) -> bool:
        return bool(self.config["tokenizer"].get("add_bos", False))

    @property
    def chat_template_path(self) -> Path | None:
        """The Jinja chat template, or None: the built-in script template (service/http/chat_template.py)."""
        section = self.config.get("chat_template")
        return None if section is None else self.path / section["file"]

    @property
    def generation_defaults(self) -> dict[str, Any]:
        """Sampling defaults from the checkpoint's generation_config.json (empty: none)."""
        return dict(self.config.get("generation", {}).get("defaults", {}))

    @property
    def source(self) -> dict[str, Any] | None:
        """Where an imported bundle came from (``source`` section), or None."""
        return self.config.get("source")


def _id(value: Any) -> int:
    return -1 if value is None else int(value)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_json_file(file: Path, error: type[Exception], missing: str) -> Any:
    """The JSON value ``file`` holds; raise ``error(missing)`` when there is no such file, and
    ``error`` naming the file when it is not UTF-8 JSON (a bundle's or a checkpoint's config.json)."""
    if not file.is_file():
        raise error(missing)
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{file} is not valid JSON: {e}") from e


_REQUIRED_ARCH = ("vocab_size", "context_length", "n_layer", "n_head", "head_dim")
_REQUIRED_TOKENIZER = {"sentencepiece": ("bos_id", "eos_id", "pad_id"), "huggingface": ("eos_id",)}


def load_bundle(path: str | Path, *, verify_hashes: bool = True) -> Bundle:
    """Read and validate a bundle folder; raise BundleError saying exactly what is wrong."""
    path = Path(path)
    if not path.exists():
        raise BundleError(f"model bundle {path} does not exist (build one with `python -m model build`)")
    if not path.is_dir():
        raise BundleError(f"model bundle {path} is not a directory")
    cfg_path = path / CONFIG_FILE
    config = read_json_file(cfg_path, BundleError, f"model bundle {path} has no {CONFIG_FILE}")
    if not isinstance(config, dict):
        raise BundleError(f"{cfg_path} must hold a JSON object")
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(f"{cfg_path}: format_version is {version!r}, this service reads {FORMAT_VERSION}")
    tok_section = config.get("tokenizer")
    tok_type = tok_section.get("type", "sentencepiece") if isinstance(tok_section, dict) else "sentencepiece"
    if tok_type not in TOKENIZER_TYPES:
        raise BundleError(f"{cfg_path}: tokenizer.type is {tok_type!r}, expected one of {', '.join(TOKENIZER_TYPES)}")
    for section, keys in (("architecture", _REQUIRED_ARCH), ("tokenizer", _REQUIRED_TOKENIZER[tok_type])):
        sec = config.get(section)
        if not isinstance(sec, dict):
            raise BundleError(f"{cfg_path}: missing object '{section}'")
        missing = [k for k in keys if k not in sec]
        if missing:
            raise BundleError(f"{cfg_path}: '{section}' lacks {', '.join(missing)}")
    _check_tokenizer(cfg_path, config["tokenizer"], int(config["architecture"]["vocab_size"]))
    _check_generation(cfg_path, config.get("generation"))
    for name in ("source", "chat_template"):
        if name in config and not isinstance(config[name], dict):
            raise BundleError(f"{cfg_path}: '{name}' must be an object")
    if "model_type" in config and not isinstance(config["model_type"], str):
        raise BundleError(f"{cfg_path}: model_type must be a string, got {config['model_type']!r}")
    for name in (KV_INPLACE_SECTION, ATTENTION_SECTION, "chat_template"):
        section = config.get(name)
        if section is not None and not (isinstance(section, dict) and isinstance(section.get("file"), str)):
            raise BundleError(f"{cfg_path}: '{name}' must be an object with a 'file' name")
    config.setdefault("name", path.name)
    bundle = Bundle(path=path, config=config)
    for f in (bundle.onnx_path, bundle.tokenizer_path, bundle.kv_inplace_path, bundle.attention_path,
              bundle.chat_template_path):
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


def _check_tokenizer(cfg_path: Path, tok: dict[str, Any], vocab_size: int) -> None:
    """Token ids are ints inside the vocabulary (or null where the tokenizer may lack one)."""

    def check_id(key: str, value: Any, nullable: bool) -> None:
        if value is None and nullable:
            return
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab_size:
            raise BundleError(
                f"{cfg_path}: tokenizer.{key} must be a token id in [0, {vocab_size})"
                f"{' or null' if nullable else ''}, got {value!r}"
            )

    nullable = tok.get("type") == "huggingface"
    for key in ("bos_id", "pad_id", "unk_id"):
        if key in tok:
            check_id(key, tok[key], nullable=nullable or key == "unk_id")
    check_id("eos_id", tok["eos_id"], nullable=False)
    eos_ids = tok.get("eos_ids", [tok["eos_id"]])
    if not isinstance(eos_ids, list) or not eos_ids:
        raise BundleError(f"{cfg_path}: tokenizer.eos_ids must be a non-empty list of token ids, got {eos_ids!r}")
    for i, value in enumerate(eos_ids):
        check_id(f"eos_ids[{i}]", value, nullable=False)
    add_bos = tok.get("add_bos", False)
    if not isinstance(add_bos, bool):
        raise BundleError(f"{cfg_path}: tokenizer.add_bos must be true or false, got {add_bos!r}")
    if add_bos and tok.get("bos_id") is None:
        raise BundleError(f"{cfg_path}: tokenizer.add_bos is true but bos_id is null")
    for key in ("bos_token", "eos_token"):
        if tok.get(key) is not None and not isinstance(tok[key], str):
            raise BundleError(f"{cfg_path}: tokenizer.{key} must be a string or null, got {tok[key]!r}")


def _check_generation(cfg_path: Path, section: Any) -> None:
    """``generation.defaults``: only the known keys, each of the right type and range."""
    if section is None:
        return
    if not isinstance(section, dict) or not isinstance(section.get("defaults", {}), dict):
        raise BundleError(f"{cfg_path}: 'generation' must be an object with an object 'defaults'")
    for key, value in section.get("defaults", {}).items():
        if key not in GENERATION_DEFAULTS:
            raise BundleError(
                f"{cfg_path}: generation.defaults.{key} is not a known default "
                f"(known: {', '.join(GENERATION_DEFAULTS)})"
            )
        limit, ok = GENERATION_DEFAULTS[key]
        if not ok(value):
            raise BundleError(f"{cfg_path}: generation.defaults.{key} must be {limit}, got {value!r}")
