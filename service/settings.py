"""Every setting of the service, in one validated object.

Each field is read from an environment variable (``TEXTGEN_`` + the field name in upper case;
``PROMETHEUS_MULTIPROC_DIR`` keeps its standard name), and ``python -m service`` flags override
a few of them. Values are validated once, at start-up, with messages that name the variable.
The port variable is ``TEXTGEN_HTTP_PORT``, never ``TEXTGEN_PORT``: Kubernetes injects
``<SERVICE>_PORT=tcp://...`` for a Service named ``textgen``. docs/api.md lists every setting.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from service.engine.config import EngineConfig, GraphOptLevel, KVInplace, Provider, StaticDecode

ENV_PREFIX = "TEXTGEN_"
LOG_FORMAT = "%(asctime)s %(levelname)s %(processName)s[%(process)d] %(name)s: %(message)s"
# LitServe's own restriction on the bind address (litserve.server.LitServer.run).
Host = Literal["127.0.0.1", "0.0.0.0", "::"]
_ENGINE = EngineConfig()  # the engine options' defaults, defined once (service/engine/config.py)


class SettingsError(ValueError):
    """Invalid configuration; the message names the environment variable and the limit."""


class Settings(BaseModel):
    """The service's configuration. Build it with ``Settings.from_env()``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_dir: Path = Field(Path("artifacts/small"), description="Model bundle folder.")
    host: Host = Field("127.0.0.1", description="Bind address: 127.0.0.1, 0.0.0.0 or ::.")
    http_port: int = Field(8000, ge=1024, le=65535, description="HTTP port (LitServe refuses < 1024).")
    api_key: SecretStr | None = Field(
        None, description="Bearer key for the API routes (not /health, /ready, /metrics)."
    )
    provider: Provider = Field(_ENGINE.provider, description="ONNX Runtime execution provider.")
    intra_op_threads: int = Field(
        _ENGINE.intra_op_threads, ge=0, le=1024,
        description="ONNX Runtime intra-op threads; 0 = auto: the usable cores minus one, at least 1.",
    )
    graph_opt_level: GraphOptLevel = Field(
        _ENGINE.graph_opt_level, description="ONNX Runtime graph optimizations."
    )
    kv_inplace: KVInplace = Field(
        _ENGINE.kv_inplace,
        description="In-place KV cache (the bundle's model.kvinplace.onnx) on CPU: auto = when present; "
        "off = always the generic concat path.",
    )
    static_decode: StaticDecode = Field(
        _ENGINE.static_decode,
        description="Static-shape decode path (the in-place decoder at fixed batch sizes, captured as CUDA "
        "graphs): auto = on CUDA when the bundle's in-place decoder is float16 (--fp16 export); on = "
        "whenever the bundle has an in-place decoder (on the CPU: without graphs); off = never.",
    )
    cuda_graph: bool = Field(
        _ENGINE.cuda_graph, description="Static decode path on CUDA: capture decode steps as CUDA graphs (off: plain runs)."
    )
    speculative_tokens: int = Field(
        _ENGINE.speculative_tokens, ge=0, le=16,
        description="Draft tokens an engine step checks when one greedy request runs alone (n-gram "
        "speculation on the in-place KV cache; the output does not change); 0 = off.",
    )
    speculative_ngram: int = Field(
        _ENGINE.speculative_ngram, ge=1, le=8, description="Longest suffix n-gram that speculative drafts are looked up by."
    )
    prefix_caching: bool = Field(
        _ENGINE.prefix_caching,
        description="Keep the KV cache of prompts' full blocks (within the KV budget, least recently used "
        "evicted first) and skip recomputing them for prompts that start the same; off = every prompt is "
        "prefilled whole. A request opts out with cache_prompt: false.",
    )
    prefix_block_size: int = Field(
        _ENGINE.prefix_block_size, ge=1, le=1024, description="Tokens per prefix-cache block: prompts share whole blocks only."
    )
    max_running: int = Field(_ENGINE.max_running, ge=1, le=4096, description="Sequences in the running batch.")
    max_waiting: int = Field(_ENGINE.max_waiting, ge=1, le=1_000_000, description="Bounded waiting queue; beyond: 429.")
    kv_budget_tokens: int = Field(
        _ENGINE.kv_budget_tokens, ge=0, description="Cached-token budget; 0 = sized from kv_cache_mb at the model's bytes per token."
    )
    kv_cache_mb: int = Field(
        _ENGINE.kv_cache_mb, ge=1,
        description="Memory for the KV cache in MiB: the token budget is this over the model's bytes per token "
        "(layers x 2 x KV heads x head dim x dtype bytes), at most max_running x context length.",
    )
    max_prefill_tokens: int = Field(_ENGINE.max_prefill_tokens, ge=1, description="Prompt tokens prefilled per engine step.")
    request_timeout_s: float = Field(300.0, gt=0, description="Generation time limit per request.")
    max_body_bytes: int = Field(1_048_576, ge=1024, description="Request body limit (413 beyond).")
    drain_timeout_s: float = Field(30.0, ge=0, description="Grace period for running requests at shutdown.")
    http_workers: int = Field(1, ge=1, le=64, description="uvicorn processes.")
    keep_alive_s: int = Field(
        75, ge=1, le=3600,
        description="Seconds an idle keep-alive connection stays open; longer than the idle timeout of the "
        "load balancer or client pool in front (60 s is common), so that the server never closes a "
        "connection just as a request is sent on it.",
    )
    max_tokens_per_event: int = Field(
        16,
        ge=1,
        le=1024,
        description="Streaming: most tokens one SSE event carries when outputs queued up; 1 = one each.",
    )
    cors_allow_origins: str = Field(
        "",
        description="CORS: comma-separated origins allowed to call the API from a browser "
        "(e.g. https://app.example.com; * for any); empty = CORS off.",
    )
    cors_allow_methods: str = Field("GET,POST,OPTIONS", description="CORS: comma-separated allowed methods.")
    cors_allow_headers: str = Field(
        "Authorization,Content-Type,X-Request-Id", description="CORS: comma-separated allowed request headers."
    )
    inspect_max_tokens: int = Field(
        128, ge=1, le=4096,
        description="POST /v1/inspect: the longest prompt in tokens (its answer grows with the square).",
    )
    inspect_rate_per_s: float = Field(
        2.0, gt=0, le=1000,
        description="POST /v1/inspect: requests per second each HTTP process runs (a burst of up to "
        "max(1, this)); beyond: 429.",
    )
    playground: bool = Field(True, description="Serve the browser playground at GET / (off: 404).")
    grammar_compile_timeout_s: float = Field(
        5.0, gt=0, le=600,
        description="Structured output: a schema or grammar that takes longer to compile is refused (400).",
    )
    log_prompts: bool = Field(False, description="Log prompt and output text (off: counts only).")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="Log level."
    )
    model_name: str | None = Field(
        None, min_length=1, max_length=256, description="Served model name; default: the bundle's."
    )
    prometheus_multiproc_dir: str | None = Field(
        None, description="Shared metrics folder; default: a temp dir."
    )
    engine_class: str = Field(
        "service.engine.engine:Engine",
        pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
        description="module:Class of the engine; tests substitute a fake engine.",
    )

    @staticmethod
    def env_name(field: str) -> str:
        return (
            "PROMETHEUS_MULTIPROC_DIR" if field == "prometheus_multiproc_dir" else ENV_PREFIX + field.upper()
        )

    @property
    def onnx_threads(self) -> int:
        """``intra_op_threads`` resolved: 0 means one core fewer than this process may use, at least 1.

        The HTTP process (and LitServe's queue manager) need a core too. With as many ONNX Runtime
        threads as cores, a parallel operator waits for whichever of its threads the OS gave away
        to them: on 2 cores, 16 streaming clients saw a TTFT p99 of 190-290 ms with 2 threads and
        33-66 ms with 1, at the same output tokens/s (docs/BENCHMARKS.md).
        """
        return self.intra_op_threads or max(1, len(os.sched_getaffinity(0)) - 1)

    def engine_config(self) -> EngineConfig:
        """The engine's options from these settings: every field of EngineConfig that is a setting
        (``seed`` is not: the engine's default), with ``intra_op_threads`` resolved (onnx_threads)."""
        names = [f.name for f in fields(EngineConfig) if f.name in type(self).model_fields]
        return EngineConfig(**{**{n: getattr(self, n) for n in names}, "intra_op_threads": self.onnx_threads})

    @staticmethod
    def split(value: str) -> list[str]:
        """A comma-separated setting as a list (blank items dropped)."""
        return [v.strip() for v in value.split(",") if v.strip()]

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read every field from ``environ`` (default ``os.environ``); ``overrides`` (CLI flags,
        ``None`` meaning "not given") win. Raises SettingsError naming the variable."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name in cls.model_fields:
            raw = environ.get(cls.env_name(name))
            if raw is not None and raw != "":
                values[name] = raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls.model_validate(values)
        except ValidationError as e:
            raise SettingsError(_describe(e, set(overrides))) from None

    def describe(self) -> dict[str, Any]:
        """The settings as loggable data; the API key is never shown."""
        data = self.model_dump(mode="json")
        data["api_key"] = "set" if self.api_key is not None else None
        return data


_FLAGS = {"model_dir": "--model", "host": "--host", "http_port": "--port"}


def _describe(error: ValidationError, from_flags: set[str]) -> str:
    lines = []
    for err in error.errors():
        field = str(err["loc"][0]) if err["loc"] else "?"
        where = _FLAGS.get(field, field) if field in from_flags else Settings.env_name(field)
        value = "<hidden>" if field == "api_key" else repr(err.get("input"))
        lines.append(f"{where}: {err['msg']} (got {value})")
    return "invalid configuration:\n  " + "\n  ".join(lines)
