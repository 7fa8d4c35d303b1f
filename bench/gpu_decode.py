"""Step 3 of the GPU benchmark: greedy decoding at fixed batch sizes, this engine and the alternatives.

Every runner decodes the same B prompts of ``prompt_len`` tokens for ``new_tokens`` tokens (EOS
ignored), on the same device:

- ``engine-*``: service.engine.engine.Engine end to end (add_request, step; sampler and detokenizer
  included) on the fp32 or fp16 bundle, on model.onnx (``concat``) or the static path
  (``static``, with or without CUDA graphs);
- ``torch-*``: PyTorch eager with the model's KV cache (model/gpt.py), fp32 or fp16;
- ``hf-*``: transformers ``GPT2LMHeadModel.generate()`` of the same width, depth, heads,
  vocabulary and context with random weights (built from a GPT2Config: nothing downloaded).

Reported per (runner, batch): tokens/s (new tokens over the wall time, prefill included) and the
median decode step (the engine: step() calls with no prefill in them; PyTorch: each timed step;
transformers: (wall - prefill-only wall) / (new tokens - 1)).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.gpu_device import sync


@dataclass(frozen=True)
class Batch:
    prompts: list[list[int]]
    new_tokens: int

    @property
    def size(self) -> int:
        return len(self.prompts)


def make_batch(bundle_dir: Path, batch: int, prompt_len: int, new_tokens: int) -> Batch:
    from bench.engine import fixed_workload, text_tokens
    from bundle.format import load_bundle

    b = load_bundle(bundle_dir, verify_hashes=False)
    wl = fixed_workload(text_tokens(b.tokenizer_path), b.bos_id, batch, prompt_len, new_tokens)
    return Batch([r.prompt for r in wl.requests], new_tokens)


class EngineDecode:
    """The engine on one bundle and path; one engine for every batch size (max_running = the largest)."""

    def __init__(self, name: str, bundle_dir: Path, device: str, max_running: int, **options: Any):
        from bundle.format import load_bundle
        from service.engine.config import EngineConfig
        from service.engine.engine import Engine

        self.name = name
        self.engine = Engine(load_bundle(bundle_dir, verify_hashes=False), EngineConfig(provider=device, max_running=max_running,
                             max_waiting=4096, max_prefill_tokens=1 << 20, speculative_tokens=0, **options))
        self.layout = self.engine.kv_layout
        self.cuda_graph = getattr(self.engine.runner, "cuda_graph", False)
        self.graph_fallback = getattr(self.engine.runner, "graph_fallback", None)
        self._n = 0

    def run(self, batch: Batch) -> dict[str, Any]:
        from service.engine.types import SamplingParams

        self._n += 1
        e = self.engine
        for i, p in enumerate(batch.prompts):
            e.add_request(f"{self._n}-{i}", p, SamplingParams(max_tokens=batch.new_tokens, temperature=0.0,
                                                                ignore_eos=True))
        steps: list[float] = []
        tokens = 0
        t0 = time.perf_counter()
        while e.has_unfinished():
            t = time.perf_counter()
            outs = e.step()
            dt = time.perf_counter() - t
            tokens += sum(len(o.new_token_ids) for o in outs)
            stats = e.last_step_stats
            if stats is not None and stats.num_prefill_tokens == 0 and stats.batch_size == batch.size:
                steps.append(dt)
        wall = time.perf_counter() - t0
        if tokens != batch.size * batch.new_tokens:  # the engine fails a batch whose run raised: say so
            raise RuntimeError(f"{self.name}: {tokens} tokens of {batch.size * batch.new_tokens} (a failed model run?)")
        return {"wall_s": wall, "tokens": tokens, "step_s": float(np.median(steps)) if steps else None}


class TorchDecode:
    """PyTorch eager with the model's KV cache: one left-padded prefill, then one step per token."""

    def __init__(self, name: str, model: Any, pad_id: int, device: str, dtype: str):
        import torch

        self.name, self.device, self.pad_id = name, device, pad_id
        dt = {"float32": torch.float32, "float16": torch.float16}[dtype]
        if device == "cpu":
            dt = torch.float32  # CPUs have no fast fp16 kernels; the dry run only exercises the code
        self.model = model.to(device=device, dtype=dt).eval()

    def run(self, batch: Batch) -> dict[str, Any]:
        import torch

        from model.gpt import left_pad_batch

        dev = self.device
        steps: list[float] = []
        with torch.inference_mode():
            ids, mask, pos = (t.to(dev) for t in left_pad_batch(batch.prompts, self.pad_id))
            sync(dev)
            t0 = time.perf_counter()
            logits, past = self.model(ids, mask, pos)
            nxt = logits[:, -1].argmax(-1)
            new = [nxt]
            pos = pos[:, -1:]
            ones = torch.ones(batch.size, 1, dtype=mask.dtype, device=dev)
            for _ in range(batch.new_tokens - 1):
                t = time.perf_counter()
                mask, pos = torch.cat([mask, ones], dim=1), pos + 1
                logits, past = self.model(nxt[:, None], mask, pos, past)
                nxt = logits[:, -1].argmax(-1)
                new.append(nxt)
                nxt.cpu()  # the host needs each token to go on (a sampler, stop checks): wait for it
                steps.append(time.perf_counter() - t)
            torch.stack(new, dim=1).cpu()
            wall = time.perf_counter() - t0
        return {"wall_s": wall, "tokens": batch.size * batch.new_tokens,
                "step_s": float(np.median(steps)) if steps else None}


class HFDecode:
    """transformers generate() of a same-size GPT-2 (random weights), greedy, min_new_tokens = max_new_tokens."""

    def __init__(self, name: str, arch: dict[str, Any], bos: int, eos: int, pad: int, device: str, dtype: str):
        import torch

        from bench.engine import hf_model

        self.name, self.device, self.pad = name, device, pad
        dt = {"float32": torch.float32, "float16": torch.float16}[dtype]
        if device == "cpu":
            dt = torch.float32
        self.model = hf_model(arch, bos, eos, pad).to(device=device, dtype=dt)

    def _generate(self, batch: Batch, n: int) -> float:
        import torch

        from model.gpt import left_pad_batch

        ids, mask, _ = left_pad_batch(batch.prompts, self.pad)
        sync(self.device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                      max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=self.pad)
        out.cpu()
        return time.perf_counter() - t0

    def run(self, batch: Batch) -> dict[str, Any]:
        prefill = self._generate(batch, 1)
        wall = self._generate(batch, batch.new_tokens)
        step = (wall - prefill) / max(batch.new_tokens - 1, 1)
        return {"wall_s": wall, "tokens": batch.size * batch.new_tokens, "step_s": step}


def measure(runner: Any, batch: Batch, repeats: int, deadline: float) -> dict[str, Any]:
    """A short warm-up (captures, allocations), then the best of up to ``repeats`` timed runs before ``deadline``."""
    runner.run(Batch(batch.prompts, min(4, batch.new_tokens)))
    best: dict[str, Any] | None = None
    for _ in range(repeats):
        r = runner.run(batch)
        if best is None or r["wall_s"] < best["wall_s"]:
            best = r
        if time.monotonic() > deadline:
            break
    assert best is not None
    return {"runner": runner.name, "batch": batch.size, "tokens_per_s": best["tokens"] / best["wall_s"],
            "step_ms": None if best["step_s"] is None else best["step_s"] * 1e3, "wall_s": best["wall_s"],
            "tokens": best["tokens"]}
