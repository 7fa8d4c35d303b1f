"""The same Engine behind LitServe's own loops, as a LitServe user would write it.

``StaticBatchingAPI(max_batch_size=N, batch_timeout=T)`` runs under LitServe's
``BatchedStreamingLoop``: it collects up to N requests for up to T seconds, then ``predict``
generates for the whole batch and yields one SSE chunk per request per engine step until the
longest request ends; requests that arrive meanwhile wait in LitServe's queue (static
batching). A request whose generation ended gets its ``[DONE]`` at once (the client can go),
but its slot stays taken until the batch ends. With ``max_batch_size=1`` LitServe picks its
``StreamingLoop``: one request at a time (no batching).

Route (``api_path``): ``POST /v1/completions`` with ``stream: true`` only, enough for
``bench.serve``: ``prompt`` (text or token ids), ``max_tokens`` (16), ``temperature`` (1.0),
``seed``, ``ignore_eos``, ``stream_options.include_usage``. ``add_routes`` adds ``POST
/tokenize`` (``{"text"}`` → ``{"tokens", "count"}``, counted as the service counts) and
``GET /v1/models``. Errors follow LitServe's streaming behaviour: HTTP 200 and a cut stream.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import litserve as ls
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse

from bench.baselines.common import (
    DONE,
    PromptEncoder,
    build_engine,
    completion_id,
    text_chunk,
    usage_chunk,
)
from service.engine.types import SamplingParams

API_PATH = "/v1/completions"


class CompletionsAPI(ls.LitAPI):
    """The engine in LitServe's inference worker; ``predict`` takes a list of decoded requests."""

    def __init__(self, bundle_dir: str | Path, max_batch_size: int = 1, batch_timeout: float = 0.0):
        super().__init__(
            max_batch_size=max_batch_size, batch_timeout=batch_timeout, stream=True, api_path=API_PATH
        )
        self.bundle_dir = str(bundle_dir)

    def setup(self, device: str) -> None:
        # The engine's own max_running must hold a whole batch.
        self.engine = build_engine(self.bundle_dir)
        if self.engine.scheduler.max_running < self.max_batch_size:
            self.engine = build_engine(self.bundle_dir, max_running=self.max_batch_size)
        self.encoder = PromptEncoder.load(self.bundle_dir)
        self._ids = itertools.count()

    def decode_request(self, request):  # no annotation: LitServe reads the body as JSON
        prompt = request.get("prompt")
        if isinstance(prompt, str):
            ids = self.encoder.encode(prompt)
        elif isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            ids = list(prompt)
        else:
            raise HTTPException(400, "prompt must be a string or a list of token ids")
        if not request.get("stream", False):
            raise HTTPException(400, "this baseline answers stream: true only")
        params = SamplingParams(
            max_tokens=int(request.get("max_tokens") or 16),
            temperature=float(request.get("temperature", 1.0)),
            seed=request.get("seed"),
            ignore_eos=bool(request.get("ignore_eos", False)),
        )
        options = request.get("stream_options") or {}
        return {
            "id": completion_id(),
            "prompt_ids": ids,
            "params": params,
            "include_usage": bool(options.get("include_usage", False)),
        }

    def predict(self, x: Any) -> Iterator[Any]:
        if self.max_batch_size == 1:  # StreamingLoop: one decoded request, one string per step
            for chunks in self._generate([x]):
                if chunks[0]:
                    yield chunks[0]
        else:  # BatchedStreamingLoop: a list of requests, a list of strings per step
            yield from self._generate(x)

    def encode_response(self, output):  # no annotation: LitServe would use it as the response type
        yield from output

    def _generate(self, batch: list[dict[str, Any]]) -> Iterator[list[str]]:
        """Generate for the whole batch; per engine step, the SSE text of each request ("" when
        it has nothing new, or ended already)."""
        engine, model = self.engine, self.encoder.model_name
        rows: dict[str, int] = {}
        for i, req in enumerate(batch):
            rid = f"r{next(self._ids)}"
            engine.add_request(rid, req["prompt_ids"], req["params"])
            rows[rid] = i
        while engine.has_unfinished():
            chunks = [""] * len(batch)
            for out in engine.step():
                i = rows[out.request_id]
                req = batch[i]
                text = ""
                if out.text_delta or out.finished:
                    reason = ("length" if out.finish_reason == "length" else "stop") if out.finished else None
                    text = text_chunk(req["id"], model, out.text_delta, reason)
                if out.finished:
                    if req["include_usage"]:
                        text += usage_chunk(req["id"], model, out.num_prompt_tokens, out.num_output_tokens)
                    text += DONE
                chunks[i] = text
            yield chunks


def add_routes(app: FastAPI, bundle_dir: str | Path) -> None:
    """``POST /tokenize`` and ``GET /v1/models`` on LitServe's app (run in its HTTP processes)."""
    encoders: list[PromptEncoder] = []  # loaded on first use, in each HTTP process

    def encoder() -> PromptEncoder:
        if not encoders:
            encoders.append(PromptEncoder.load(bundle_dir))
        return encoders[0]

    async def tokenize(request: Request) -> JSONResponse:
        body = await request.json()
        ids = encoder().encode(str(body.get("text", "")))
        return JSONResponse({"tokens": ids, "count": len(ids)})

    async def models(request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": encoder().model_name, "object": "model"}]})

    app.add_api_route("/tokenize", tokenize, methods=["POST"])
    app.add_api_route("/v1/models", models, methods=["GET"])


def build_server(bundle_dir: str | Path, max_batch_size: int, batch_timeout: float) -> ls.LitServer:
    api = CompletionsAPI(bundle_dir, max_batch_size=max_batch_size, batch_timeout=batch_timeout)
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=1, timeout=False)
    add_routes(server.app, bundle_dir)
    return server
