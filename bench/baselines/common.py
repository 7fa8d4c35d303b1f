"""What the baselines share with each other and with the service: engine settings, prompt
encoding, and the minimal OpenAI completion stream chunks that ``bench.serve`` reads."""

from __future__ import annotations

import importlib
import json
import time
import uuid
from pathlib import Path
from typing import Any

from service.bundle import Bundle, load_bundle
from service.settings import Settings
from service.tokenizer import Tokenizer

ENGINE_SETTINGS = (
    "provider",
    "intra_op_threads",
    "graph_opt_level",
    "kv_inplace",
    "speculative_tokens",
    "speculative_ngram",
    "prefix_caching",
    "prefix_block_size",
    "max_running",
    "max_waiting",
    "kv_budget_tokens",
    "max_prefill_tokens",
)
DONE = "data: [DONE]\n\n"


def engine_kwargs(bundle_dir: str | Path, **overrides: Any) -> dict[str, Any]:
    """The Engine arguments the service would use (its defaults and any ``TEXTGEN_*`` variables).

    ``overrides`` with a value of None are ignored.
    """
    settings = Settings.from_env(model_dir=str(bundle_dir))
    kwargs = {name: getattr(settings, name) for name in ENGINE_SETTINGS}
    kwargs["intra_op_threads"] = settings.onnx_threads  # 0 resolved as the service resolves it
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    return kwargs


def build_engine(bundle_dir: str | Path, **overrides: Any):
    """The engine the service would build: ``TEXTGEN_ENGINE_CLASS`` (default ``service.engine:Engine``)
    on the bundle, with ``engine_kwargs(dir, **overrides)``."""
    module, _, name = Settings.from_env(model_dir=str(bundle_dir)).engine_class.partition(":")
    engine_class = getattr(importlib.import_module(module), name)
    return engine_class(
        load_bundle(bundle_dir, verify_hashes=False), **engine_kwargs(bundle_dir, **overrides)
    )


class PromptEncoder:
    """Text to prompt ids exactly as the service's ``/tokenize`` and completions do (bos first
    when the bundle says ``tokenizer.add_bos``)."""

    def __init__(self, bundle: Bundle):
        self.tokenizer = Tokenizer.load(bundle.tokenizer_path)
        self.add_bos = bool(bundle.config.get("tokenizer", {}).get("add_bos", False))
        self.model_name = bundle.name
        self.context_length = bundle.context_length

    @classmethod
    def load(cls, bundle_dir: str | Path) -> PromptEncoder:
        return cls(load_bundle(bundle_dir, verify_hashes=False))

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text)
        if self.add_bos and self.tokenizer.bos_id >= 0:
            return [self.tokenizer.bos_id, *ids]
        return ids


def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def text_chunk(cid: str, model: str, text: str, finish_reason: str | None) -> str:
    """One SSE event of a streamed ``/v1/completions`` response."""
    body = {
        "id": cid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
    }
    return f"data: {json.dumps(body)}\n\n"


def usage_chunk(cid: str, model: str, prompt_tokens: int, completion_tokens: int) -> str:
    """The final usage event (``stream_options.include_usage``)."""
    body = {
        "id": cid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }
    return f"data: {json.dumps(body)}\n\n"
