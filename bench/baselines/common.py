"""What the baselines share with each other and with the service: engine options, prompt
encoding, and the minimal OpenAI completion stream chunks that ``bench.serve`` reads."""

from __future__ import annotations

import importlib
import json
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

from bundle.format import Bundle, load_bundle
from bundle.tokenizer import Tokenizer
from service.engine.config import EngineConfig
from service.settings import Settings

DONE = "data: [DONE]\n\n"


def engine_config(bundle_dir: str | Path, **overrides: Any) -> EngineConfig:
    """The engine options the service would use (its defaults and any ``TEXTGEN_*`` variables).

    ``overrides`` with a value of None are ignored.
    """
    config = Settings.from_env(model_dir=str(bundle_dir)).engine_config()
    return replace(config, **{k: v for k, v in overrides.items() if v is not None})


def build_engine(bundle_dir: str | Path, **overrides: Any):
    """The engine the service would build: ``TEXTGEN_ENGINE_CLASS`` (default ``service.engine.engine:Engine``)
    on the bundle, with ``engine_config(dir, **overrides)``."""
    module, _, name = Settings.from_env(model_dir=str(bundle_dir)).engine_class.partition(":")
    engine_class = getattr(importlib.import_module(module), name)
    return engine_class(load_bundle(bundle_dir, verify_hashes=False), engine_config(bundle_dir, **overrides))


class PromptEncoder:
    """Text to prompt ids exactly as the service's ``/tokenize`` and completions do (bos first
    when the bundle says ``tokenizer.add_bos``)."""

    def __init__(self, bundle: Bundle):
        self.tokenizer = Tokenizer.from_bundle(bundle)
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
