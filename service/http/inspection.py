"""POST /v1/inspect: what happens inside the model for one prompt (the playground's "Inside" tab).

The bundle's optional ``model.attention.onnx`` (model/export_attention.py) returns the logits and
every layer's attention probabilities for a whole prompt. It runs here, in the HTTP process, in
its own ONNX Runtime session (created on first use, one intra-op thread, one run at a time per
process, in a thread so the event loop keeps serving): never in the engine worker, so inspecting
never slows the decode batch. Limits: ``TEXTGEN_INSPECT_MAX_TOKENS`` prompt tokens and
``TEXTGEN_INSPECT_RATE_PER_S`` requests per second per HTTP process (429 beyond).

    GET  /v1/inspect    what the route offers (limits, layers, heads); 404 without the graph
    POST /v1/inspect    {"prompt": "..."} -> tokens, attentions[layer][head][query][key], next_tokens
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

import numpy as np
from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel, Field

from bundle.format import Bundle, load_bundle
from bundle.tokenizer import Tokenizer
from service.http import protocol as p
from service.http.errors import ApiError
from service.settings import Settings

MAX_TOP_N = 20
DECIMALS = 6  # probabilities in the answer are rounded to 1e-6 (attention: 6 significant digits)


class InspectRequest(p._Strict):
    prompt: p.Text = Field(description="Text to run through the model (tokenized as for /v1/completions).")
    add_special_tokens: bool = Field(True, description="Prepend bos when the bundle asks for it.")
    top_n: p.integer(ge=1, le=MAX_TOP_N) = Field(10, description="Next-token alternatives per position.")


class InspectToken(BaseModel):
    id: int
    text: str


class NextToken(BaseModel):
    id: int
    text: str
    prob: float


class InspectResponse(BaseModel):
    object: str = "inspect"
    model: str
    n_layer: int
    n_head: int
    tokens: list[InspectToken]
    attentions: list[list[list[list[float]]]] = Field(
        description="[layer][head][query][key]: softmax(Q Kᵀ / √d) over the causal mask; 0 above the diagonal"
    )
    next_tokens: list[list[NextToken]] = Field(
        description="[position]: the most likely next tokens, by probability"
    )


class InspectInfo(BaseModel):
    object: str = "inspect.info"
    model: str
    n_layer: int
    n_head: int
    max_prompt_tokens: int
    max_top_n: int
    rate_per_s: float


def token_text(tok: Tokenizer, token_id: int) -> str:
    """A readable label of one token: its piece, '▁' as a space, an ASCII byte piece as its character."""
    try:
        return tok.token_bytes(token_id).decode("utf-8") or tok.id_to_piece(token_id)
    except UnicodeDecodeError:  # part of a character: the vocabulary's own name for it
        return tok.id_to_piece(token_id)


class RateLimit:
    """A token bucket: ``rate`` per second, bursts of up to max(1, rate)."""

    def __init__(self, rate: float, clock=time.monotonic):
        self.rate, self.capacity, self.clock = rate, max(1.0, rate), clock
        self.tokens, self.stamp = self.capacity, clock()

    def take(self) -> bool:
        now = self.clock()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class Inspector:
    """The inspection graph of one bundle, run on demand (lazily loaded, one run at a time)."""

    def __init__(self, settings: Settings, model_name: str, tokenizer: Tokenizer, context_length: int):
        self.settings, self.model_name, self.tokenizer = settings, model_name, tokenizer
        self.max_tokens = min(settings.inspect_max_tokens, context_length)
        self.rate = RateLimit(settings.inspect_rate_per_s)
        self._bundle: Bundle | None = None
        self._session: Any = None
        self._lock = threading.Lock()

    @property
    def bundle(self) -> Bundle:
        if self._bundle is None:  # already validated (and hashed) by the main process at start-up
            self._bundle = load_bundle(self.settings.model_dir, verify_hashes=False)
        return self._bundle

    def section(self) -> dict[str, Any]:
        section = self.bundle.attention
        if section is None:
            raise ApiError(
                "not_found",
                "inspect: this model bundle has no model.attention.onnx (the graph with attention "
                "probabilities as outputs); export it again without --no-attention "
                "(`python -m model export`, docs/model-bundle.md)",
            )
        return section

    def info(self) -> InspectInfo:
        section = self.section()
        return InspectInfo(
            model=self.model_name,
            n_layer=int(section.get("n_layer", self.bundle.num_layers)),
            n_head=int(section.get("n_head", self.bundle.arch["n_head"])),
            max_prompt_tokens=self.max_tokens,
            max_top_n=MAX_TOP_N,
            rate_per_s=self.settings.inspect_rate_per_s,
        )

    def _get_session(self) -> Any:
        if self._session is None:
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.intra_op_num_threads = 1
            so.inter_op_num_threads = 1
            self._session = ort.InferenceSession(
                str(self.bundle.attention_path), so, providers=["CPUExecutionProvider"]
            )
        return self._session

    def run(self, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """ids -> logits (T, V) and attentions (L, H, T, T), float32. Thread-safe (serialised)."""
        names = {
            **{"input_ids": "input_ids", "logits": "logits", "attention": "attention.{i}"},
            **self.section().get("io_names", {}),
        }
        with self._lock:
            sess = self._get_session()
            n_layer = len(sess.get_outputs()) - 1
            outputs = [names["logits"]] + [names["attention"].format(i=i) for i in range(n_layer)]
            out = sess.run(outputs, {names["input_ids"]: np.asarray([ids], dtype=np.int64)})
        return out[0][0], np.stack([a[0] for a in out[1:]])

    def answer(self, ids: list[int], top_n: int) -> bytes:
        """The JSON body of a POST /v1/inspect answer."""
        logits, att = self.run(ids)
        z = logits.astype(np.float64)
        probs = np.exp(z - z.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        top = np.argsort(-probs, axis=-1, kind="stable")[:, :top_n]
        tok = self.tokenizer
        texts: dict[int, str] = {}

        def text(i: int) -> str:
            if i not in texts:
                texts[i] = token_text(tok, i)
            return texts[i]

        next_tokens = [
            [{"id": int(i), "text": text(int(i)), "prob": round(float(probs[t, i]), DECIMALS)} for i in row]
            for t, row in enumerate(top)
        ]
        body = {
            "object": "inspect",
            "model": self.model_name,
            "n_layer": int(att.shape[0]),
            "n_head": int(att.shape[1]),
            "tokens": [{"id": i, "text": text(i)} for i in ids],
            "attentions": "@attentions@",
            "next_tokens": next_tokens,
        }
        text = json.dumps(body, separators=(",", ":"))
        return text.replace('"@attentions@"', attention_json(att), 1).encode()


def attention_json(att: np.ndarray) -> str:
    """(L, H, T, T) weights as a JSON array, 6 significant digits (error < 1e-6 for weights in [0, 1]).

    Row by row with C formatting, faster than json.dumps of nested lists: for 4 x 4 x 128 x 128 causal
    weights 0.094 s against 0.135 s (medians of 5 on a busy 2-core machine). That is time the HTTP
    process holds the GIL, so time its event loop does not stream tokens to other clients.
    """
    fmt = ",".join(["%.6g"] * att.shape[-1])
    rows = att.astype(np.float64).tolist()  # Python floats format fastest
    heads = (",".join("[" + (fmt % tuple(row)) + "]" for row in m) for layer in rows for m in layer)
    H = att.shape[1]
    flat = ["[" + h + "]" for h in heads]
    layers = ("[" + ",".join(flat[i : i + H]) + "]" for i in range(0, len(flat), H))
    return "[" + ",".join(layers) + "]"


class InspectRoutes:
    """The two routes, with the HTTP API's body reading and prompt encoding."""

    def __init__(self, api: Any):
        m = api.model
        self.api = api
        self.inspector = Inspector(api.settings, m.name, m.tokenizer, m.context_length)

    async def get(self, request: Request) -> Response:
        return Response(self.inspector.info().model_dump_json(), media_type="application/json")

    async def post(self, request: Request) -> Response:
        insp = self.inspector
        req: InspectRequest = await self.api._read(request, InspectRequest)
        insp.section()  # 404 before anything else when the bundle has no graph
        ids = self.api.model.encode_prompt(req.prompt, req.add_special_tokens)
        if not ids:
            raise ApiError("validation", "prompt: the prompt has no tokens; give some text", "prompt")
        if len(ids) > insp.max_tokens:
            raise ApiError(
                "validation",
                f"prompt: {len(ids)} tokens, more than the limit of {insp.max_tokens} for inspection "
                "(TEXTGEN_INSPECT_MAX_TOKENS, at most the context length)",
                "prompt",
            )
        if not insp.rate.take():
            raise ApiError(
                "queue_full",
                f"inspect: more than {insp.settings.inspect_rate_per_s:g} requests per second "
                "(TEXTGEN_INSPECT_RATE_PER_S); retry in a moment",
                headers={"Retry-After": "1"},
            )
        body = await asyncio.to_thread(insp.answer, ids, req.top_n)
        return Response(body, media_type="application/json")


def responses(model: type[BaseModel], codes: tuple[int, ...]) -> dict:
    return {200: {"model": model}, **{c: {"model": p.ErrorResponse} for c in codes}}


def request_body() -> dict:
    schema = InspectRequest.model_json_schema()
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}
