"""Offline decoding benchmark: this engine against other ways to run the same model, side by side.

One command, one machine, one model; every runner decodes the same prompts greedily and must
produce exactly ``max_tokens`` tokens per request (EOS never ends a request early):

- ``engine``: service.engine.engine.Engine (continuous batching, ONNX Runtime, KV cache), end to end
  through add_request/step, detokenizer and all, on the file it picks: on CPU the bundle's
  ``model.kvinplace.onnx`` (in-place KV cache, GroupQueryAttention) when there is one, else
  ``model.onnx`` (``Engine.kv_layout``, reported in the notes);
- ``engine-nospec``: the same engine with ``speculative_tokens=0``: one token per step even when
  one greedy request runs alone (the engine's default checks n-gram drafts then, service/engine/ngram.py);
- ``engine-concat``: the same engine with ``kv_inplace="off"``: ``model.onnx``, whose cache grows
  by a Concat every step; what the in-place layout buys (only for a bundle with the in-place file);
- ``ortloop``: ``model.onnx`` with a KV cache in a bare loop over ``session.run``;
- ``ortloop-inplace``: ``model.kvinplace.onnx`` over the engine's in-place runner in a bare loop
  (static batches, argmax, nothing else): the floor of a Python loop over the file onnxruntime-genai runs;
- ``nocache``: ``model.onnx`` with a zero-length past: the whole sequence every step;
- ``torch``: PyTorch eager with a KV cache (model.gpt.GPT from the checkpoint, inference_mode);
- ``hf``: Hugging Face ``GPT2LMHeadModel`` of the same width, depth, heads, vocabulary and
  context with random weights (nothing downloaded), ``generate()`` greedy;
- ``genai``: onnxruntime-genai 0.18 on the file the engine runs (``"type": "decoder"``; for
  ``model.kvinplace.onnx`` with ``"past_present_share_buffer": true``), run by
  bench/genai_runner.py in ``.venv-genai`` (``make bench-env``);
- ``genai-concat``: onnxruntime-genai on ``model.onnx`` (only for a bundle with the in-place file);
- ``int8``: this engine on the int8 bundle (``python -m model export --int8``);
- ``int8-nospec``: the same with ``speculative_tokens=0`` (int8 against ``engine-nospec``).

Workloads: ``B`` requests of ``--prompt-len`` prompt tokens and ``--new-tokens`` new tokens for
each batch size ``B``, all submitted at once; and with ``--mixed N``, N requests with seeded
prompt lengths 16-128 and output lengths 16-256, at most ``--mixed-concurrency`` (32) in flight:
this engine admits a waiting request as soon as a sequence finishes (continuous batching); the
others run static batches of 32 in order, each padded to its longest prompt and decoded until its
longest output. Tokens/s = requested output tokens / wall time of the decoding (prefill
included; model loading excluded).

Compute ceiling: 2 x parameters FLOPs per token at the fp32 GEMM rate of numpy (1024^3
matmul, best of a few) measured in the same run.

    python -m bench.engine --bundle artifacts/small --mixed 64 \\
        --out docs/BENCHMARKS.md --plot docs/img/engine_bench.png
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from service.engine.config import EngineConfig

ROOT = Path(__file__).resolve().parents[1]
RUNNERS = ("engine", "engine-nospec", "engine-concat", "ortloop", "ortloop-inplace", "nocache", "torch", "hf", "genai", "genai-concat", "int8", "int8-nospec")
LABELS = {
    "engine": "this engine (ONNX Runtime + KV cache, continuous batching)",
    "engine-nospec": "this engine, one token per step (speculative_tokens=0)",
    "engine-concat": "this engine on model.onnx (concat KV cache, kv_inplace=off)",
    "ortloop": "model.onnx + KV cache, bare Python loop over session.run",
    "ortloop-inplace": "the engine's ONNX file, bare Python loop over run_with_iobinding",
    "nocache": "model.onnx, no KV cache (full recompute)",
    "torch": "PyTorch eager + KV cache",
    "hf": "HF transformers GPT2LMHeadModel.generate()",
    "genai": "onnxruntime-genai 0.18, the engine's ONNX file",
    "genai-concat": "onnxruntime-genai 0.18, model.onnx (concat KV cache)",
    "int8": "this engine, int8 bundle",
    "int8-nospec": "this engine, int8 bundle, one token per step",
}
GENAI_MAX_BATCH = 32  # onnxruntime-genai 0.18's Generator: "batch_size (64) must be in [1, 32]"
SHORT = {
    "engine": "this engine",
    "engine-nospec": "this engine, no speculation",
    "engine-concat": "this engine, concat KV cache",
    "ortloop": "bare session.run loop",
    "ortloop-inplace": "bare in-place loop",
    "nocache": "no KV cache",
    "torch": "PyTorch eager",
    "hf": "HF generate()",
    "genai": "onnxruntime-genai",
    "genai-concat": "onnxruntime-genai, model.onnx",
    "int8": "this engine, int8",
    "int8-nospec": "this engine, int8, no speculation",
}
SECTION = "## Engine (offline, CPU)"
BEGIN, END = "<!-- bench.engine results: begin -->", "<!-- bench.engine results: end -->"


# ---- workloads ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Request:
    prompt: list[int]
    max_tokens: int


@dataclass(frozen=True)
class Workload:
    """Requests and how many may be in flight (the static batch size of runners without continuous batching)."""

    name: str  # "batch 8", "mixed"
    requests: list[Request]
    concurrency: int
    batch: int | None = None  # the batch size of a fixed-shape workload

    @property
    def output_tokens(self) -> int:
        return sum(r.max_tokens for r in self.requests)

    def static_batches(self) -> list[list[Request]]:
        c = self.concurrency
        return [self.requests[i : i + c] for i in range(0, len(self.requests), c)]

    def shortened(self, max_tokens: int) -> Workload:
        """The same prompts with at most max_tokens new tokens each (warm-up)."""
        reqs = [Request(r.prompt, min(r.max_tokens, max_tokens)) for r in self.requests]
        return Workload(self.name, reqs, self.concurrency, self.batch)


def text_tokens(tokenizer_path: Path) -> list[int]:
    """Token ids of the public-domain passage the serving harness uses (bench/workload.py)."""
    from bench.workload import PASSAGE
    from bundle.tokenizer import Tokenizer

    return Tokenizer.load(tokenizer_path).encode(" ".join(PASSAGE.split()))


def make_prompt(stream: Sequence[int], offset: int, length: int, bos_id: int) -> list[int]:
    """bos + length - 1 tokens of the stream from offset, wrapping around."""
    return [bos_id, *(stream[(offset + i) % len(stream)] for i in range(length - 1))]


def fixed_workload(
    stream: Sequence[int], bos_id: int, batch: int, prompt_len: int, new_tokens: int, seed: int = 0
) -> Workload:
    offsets = np.random.default_rng([seed, batch]).integers(0, len(stream), size=batch)
    reqs = [Request(make_prompt(stream, int(o), prompt_len, bos_id), new_tokens) for o in offsets]
    return Workload(f"batch {batch}", reqs, concurrency=batch, batch=batch)


def mixed_workload(
    stream: Sequence[int],
    bos_id: int,
    n: int,
    concurrency: int = 32,
    prompt_range: tuple[int, int] = (16, 128),
    output_range: tuple[int, int] = (16, 256),
    seed: int = 0,
) -> Workload:
    """n requests with uniform prompt and output lengths (inclusive), seeded."""
    rng = np.random.default_rng([seed, 7])
    plen = rng.integers(prompt_range[0], prompt_range[1] + 1, size=n)
    olen = rng.integers(output_range[0], output_range[1] + 1, size=n)
    offsets = rng.integers(0, len(stream), size=n)
    reqs = [
        Request(make_prompt(stream, int(o), int(p), bos_id), int(m))
        for o, p, m in zip(offsets, plen, olen, strict=True)
    ]
    return Workload("mixed", reqs, concurrency=concurrency)


# ---- runners -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Timing:
    wall: float  # seconds
    cpu: float  # CPU seconds of the process, all its threads (with one thread: robust to other load)


class Stopwatch:
    """Wall and process CPU time from creation to stop()."""

    def __init__(self) -> None:
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()

    def stop(self) -> Timing:
        return Timing(time.perf_counter() - self.wall0, time.process_time() - self.cpu0)


class Runner(Protocol):
    name: str

    def run(self, wl: Workload) -> tuple[Timing, list[list[int]]]:
        """Decode every request greedily; return (time of decoding, new tokens per request)."""
        ...


class EngineRunner:
    """service.engine.engine.Engine: every request added at once, then step() until done.

    kv_inplace is the Engine's: "auto" (the in-place decoder when the bundle has it) or "off"
    (model.onnx); ``layouts`` collects the ``Engine.kv_layout`` of every engine it made.
    """

    def __init__(
        self,
        bundle_dir: Path,
        threads: int,
        max_prefill_tokens: int,
        name: str = "engine",
        kv_inplace: Literal["auto", "off"] = "auto",
        speculative_tokens: int | None = None,
    ):
        from bundle.format import load_bundle

        self.name = name
        self.bundle = load_bundle(bundle_dir)
        # Per concurrency, max_running is set on a copy; speculative_tokens None: the default.
        # No prefix cache: every round sends the same prompts, and the other runners compute them
        # all each time (bench/engine_prefix.py measures the cache).
        self.config = EngineConfig(provider="cpu", intra_op_threads=threads, max_waiting=4096,
                                   max_prefill_tokens=max_prefill_tokens, kv_inplace=kv_inplace,
                                   prefix_caching=False)
        if speculative_tokens is not None:
            self.config = replace(self.config, speculative_tokens=speculative_tokens)
        self._engines: dict[int, Any] = {}
        self._count = 0
        self.layouts: set[str] = set()

    def engine(self, max_running: int):
        """One engine per concurrency, reused across runs (it holds nothing between them)."""
        from service.engine.engine import Engine

        if max_running not in self._engines:
            self._engines[max_running] = Engine(self.bundle, replace(self.config, max_running=max_running))
            self.layouts.add(self._engines[max_running].kv_layout)
        return self._engines[max_running]

    def run(self, wl: Workload) -> tuple[Timing, list[list[int]]]:
        from service.engine.types import SamplingParams

        engine = self.engine(wl.concurrency)
        self._count += 1
        ids = [f"{self._count}-{i}" for i in range(len(wl.requests))]
        outputs: dict[str, list[int]] = {rid: [] for rid in ids}
        clock = Stopwatch()
        for rid, r in zip(ids, wl.requests, strict=True):
            engine.add_request(
                rid, r.prompt, SamplingParams(max_tokens=r.max_tokens, temperature=0.0, ignore_eos=True)
            )
        while engine.has_unfinished():
            for out in engine.step():
                outputs[out.request_id].extend(out.new_token_ids)
        return clock.stop(), [outputs[rid] for rid in ids]


class OrtLoopRunner:
    """The same ONNX file with a KV cache in a bare loop: no scheduler, sampler or detokenizer.

    The floor of what a Python engine over ``session.run`` costs; the engine's distance to it is
    its own overhead.
    """

    name = "ortloop"

    def __init__(self, bundle_dir: Path, threads: int):
        from bundle.format import load_bundle
        from service.engine.kv.concat_batch import Runner as OrtRunner

        self.bundle = load_bundle(bundle_dir)
        self.runner = OrtRunner(self.bundle, "cpu", threads)

    def run(self, wl: Workload) -> tuple[Timing, list[list[int]]]:
        from service.engine.kv.concat_cache import left_pad_prompts

        outputs: list[list[int]] = []
        clock = Stopwatch()
        for batch in wl.static_batches():
            B = len(batch)
            ids, mask, pos = left_pad_prompts([r.prompt for r in batch], self.bundle.pad_id)  # (B, T)
            out = self.runner.run(ids, mask, pos, self.runner.empty_past(B))
            nxt = out.logits.argmax(axis=1)  # (B,)
            new = [nxt]
            pos = pos[:, -1:]
            ones = np.ones((B, 1), np.int64)
            for _ in range(max(r.max_tokens for r in batch) - 1):
                mask, pos = np.concatenate([mask, ones], axis=1), pos + 1
                out = self.runner.run(nxt[:, None], mask, pos, out.presents)
                nxt = out.logits.argmax(axis=1)
                new.append(nxt)
            toks = np.stack(new, axis=1)  # (B, steps)
            outputs += [toks[b, : r.max_tokens].tolist() for b, r in enumerate(batch)]
        return clock.stop(), outputs


class InplaceLoopRunner:
    """The in-place file over the engine's own runner and slot bookkeeping, in a bare loop.

    No scheduler, sampler, detokenizer or outputs: what a Python loop over ``run_with_iobinding``
    costs on the file onnxruntime-genai runs, so the engine's distance to it is its own overhead.
    """

    name = "ortloop-inplace"

    def __init__(self, bundle_dir: Path, threads: int):
        from bundle.format import load_bundle

        self.bundle = load_bundle(bundle_dir)
        self.threads = threads
        self._batches: dict[int, Any] = {}

    def batch(self, size: int) -> Any:
        from service.engine.kv.inplace_batch import InplaceBatch, InplaceRunner

        if size not in self._batches:
            self._batches[size] = InplaceBatch(InplaceRunner(self.bundle, size, self.threads), self.bundle.pad_id)
        return self._batches[size]

    def run(self, wl: Workload) -> tuple[Timing, list[list[int]]]:
        outputs: list[list[int]] = []
        clock = Stopwatch()
        for reqs in wl.static_batches():
            batch = self.batch(wl.concurrency)
            ids = [str(i) for i in range(len(reqs))]
            nxt = batch.prefill(ids, [r.prompt for r in reqs]).argmax(axis=1)  # (B,)
            new = [nxt]
            for _ in range(max(r.max_tokens for r in reqs) - 1):
                nxt = batch.decode(nxt).argmax(axis=1)
                new.append(nxt)
            batch.clear()
            toks = np.stack(new, axis=1)  # (B, steps)
            outputs += [toks[b, : r.max_tokens].tolist() for b, r in enumerate(reqs)]
        return clock.stop(), outputs


class NoCacheRunner(OrtLoopRunner):
    """The same ONNX file, no KV cache: the whole (left padded) sequence with a zero-length past every step."""

    name = "nocache"

    def run(self, wl: Workload) -> tuple[Timing, list[list[int]]]:
        from service.engine.kv.concat_cache import left_pad_prompts

        outputs: list[list[int]] = []
        clock = Stopwatch()
        for batch in wl.static_batches():
            ids, mask, pos = left_pad_prompts([r.prompt for r in batch], self.bundle.pad_id)  # (B, T)
            new: list[np.ndarray] = []
            empty = self.runner.empty_past(len(batch))
            for _ in range(max(r.max_tokens for r in batch)):
                nxt = self.runner.run(ids, mask, pos, empty).logits.argmax(axis=1)  # (B,)
                new.append(nxt)
                ids = np.concatenate([ids, nxt[:, None]], axis=1)
                mask = np.concatenate([mask, np.ones((len(batch), 1), np.int64)], axis=1)
                pos = np.concatenate([pos, pos[:, -1:] + 1], axis=1)
            toks = np.stack(new, axis=1)  # (B, steps)
            outputs += [toks[b, : r.max_tokens].tolist() for b, r in enumerate(batch)]
        return clock.stop(), outputs


class TorchRunner:
    """PyTorch eager with the model's own KV cache, static batches, greedy."""

    name = "torch"

    def __init__(self, model: Any, pad_id: int, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.model, self.pad_id = model.eval(), pad_id

    def run(self, wl: Workload) -> tuple[Timing, list[list[int]]]:
        import torch

        from model.gpt import left_pad_batch

        outputs: list[list[int]] = []
        clock = Stopwatch()
        with torch.inference_mode():
            for batch in wl.static_batches():
                ids, mask, pos = left_pad_batch([r.prompt for r in batch], self.pad_id)  # (B, T)
                logits, past = self.model(ids, mask, pos)
                nxt = logits[:, -1].argmax(-1)  # (B,)
                new = [nxt]
                pos = pos[:, -1:]
                ones = torch.ones(len(batch), 1, dtype=mask.dtype)
                for _ in range(max(r.max_tokens for r in batch) - 1):
                    mask, pos = torch.cat([mask, ones], dim=1), pos + 1
                    logits, past = self.model(nxt[:, None], mask, pos, past)
                    nxt = logits[:, -1].argmax(-1)
                    new.append(nxt)
                toks = torch.stack(new, dim=1)  # (B, steps)
                outputs += [toks[b, : r.max_tokens].tolist() for b, r in enumerate(batch)]
        return clock.stop(), outputs


def hf_model(arch: dict[str, Any], bos_id: int, eos_id: int, pad_id: int, seed: int = 0):
    """GPT2LMHeadModel with the bundle's width, depth, heads, vocabulary and context; random weights."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=arch["vocab_size"],
        n_positions=arch["context_length"],
        n_embd=arch["n_embd"],
        n_layer=arch["n_layer"],
        n_head=arch["n_head"],
        n_inner=arch.get("ffn_mult", 4) * arch["n_embd"],
        activation_function="gelu",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(cfg).eval()


class HFRunner:
    """Hugging Face generate(): static batches, left padded, greedy, min_new_tokens = max_new_tokens."""

    name = "hf"

    def __init__(self, arch: dict[str, Any], bos_id: int, eos_id: int, pad_id: int, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.model = hf_model(arch, bos_id, eos_id, pad_id)
        self.pad_id = pad_id
        self.num_parameters = sum(p.numel() for p in self.model.parameters())

    def run(self, wl: Workload) -> tuple[Timing, list[list[int]]]:
        import torch

        from model.gpt import left_pad_batch

        outputs: list[list[int]] = []
        clock = Stopwatch()
        with torch.inference_mode():
            for batch in wl.static_batches():
                ids, mask, _ = left_pad_batch([r.prompt for r in batch], self.pad_id)
                n = max(r.max_tokens for r in batch)
                seqs = self.model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=False,
                    pad_token_id=self.pad_id,
                )
                new = seqs[:, ids.shape[1] :]
                outputs += [new[b, : r.max_tokens].tolist() for b, r in enumerate(batch)]
        return clock.stop(), outputs


def genai_config(bundle: Any, threads: int, inplace: bool = False) -> dict[str, Any]:
    """A genai_config.json of type "decoder" for a bundle (the Optimum/GenAI io names are the bundle's).

    Args:
        bundle: bundle.format.Bundle.
        threads: intra-op threads of GenAI's session.
        inplace: describe the bundle's in-place decoder (``model.kvinplace.onnx``: one buffer per
            layer bound as past and present, ``"past_present_share_buffer": true``) instead of
            ``model.onnx``.
    """
    if inplace and bundle.kv_inplace_path is None:
        raise ValueError(f"bundle {bundle.path} has no in-place decoder (config.json 'onnx_kv_inplace')")
    names = bundle.kv_inplace_io_names if inplace else bundle.io_names
    onnx_path = bundle.kv_inplace_path if inplace else bundle.onnx_path
    arch = bundle.arch
    return {
        "model": {
            "type": "decoder",
            "bos_token_id": bundle.bos_id,
            "eos_token_id": bundle.eos_id,
            "pad_token_id": bundle.pad_id,
            "context_length": bundle.context_length,
            "vocab_size": bundle.vocab_size,
            "decoder": {
                "filename": onnx_path.name,
                "session_options": {
                    "log_id": "onnxruntime-genai",
                    "intra_op_num_threads": threads,
                    "inter_op_num_threads": 1,
                    "provider_options": [],
                },
                "head_size": bundle.head_dim,
                "hidden_size": arch["n_embd"],
                "num_attention_heads": arch["n_head"],
                "num_hidden_layers": bundle.num_layers,
                "num_key_value_heads": bundle.num_kv_heads,
                "inputs": {
                    "input_ids": names["input_ids"],
                    "attention_mask": names["attention_mask"],
                    "position_ids": names["position_ids"],
                    "past_key_names": names["past_key"].replace("{i}", "%d"),
                    "past_value_names": names["past_value"].replace("{i}", "%d"),
                },
                "outputs": {
                    "logits": names["logits"],
                    "present_key_names": names["present_key"].replace("{i}", "%d"),
                    "present_value_names": names["present_value"].replace("{i}", "%d"),
                },
            },
        },
        "search": {
            "do_sample": False,
            "num_beams": 1,
            "num_return_sequences": 1,
            "max_length": bundle.context_length,
            "min_length": 0,
            "early_stopping": True,
            "length_penalty": 1.0,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
            "no_repeat_ngram_size": 0,
            "diversity_penalty": 0.0,
            # One buffer as past and present: the in-place file's GroupQueryAttention writes into it;
            # model.onnx returns a new, longer present (Concat) and needs separate buffers.
            "past_present_share_buffer": inplace,
        },
    }


def write_genai_model(bundle: Any, threads: int, inplace: bool, folder: Path) -> Path:
    """``folder`` as a model onnxruntime-genai loads: genai_config.json (see genai_config) and a
    copy of the ONNX file it names. Returns ``folder``."""
    config = genai_config(bundle, threads, inplace)
    folder.mkdir(parents=True, exist_ok=True)
    src = bundle.kv_inplace_path if inplace else bundle.onnx_path
    dst = folder / config["model"]["decoder"]["filename"]
    dst.unlink(missing_ok=True)  # a link left there would make copyfile write through it onto the bundle's file
    shutil.copyfile(src, dst)
    (folder / "genai_config.json").write_text(json.dumps(config, indent=2))
    return folder


class GenAIRunner:
    """onnxruntime-genai in its own environment: bench/genai_runner.py as a subprocess per workload.

    inplace: run the bundle's in-place decoder (model.kvinplace.onnx, a shared past/present
    buffer) instead of model.onnx; see genai_config.
    """

    def __init__(
        self,
        bundle_dir: Path,
        python: Path,
        threads: int,
        repeat: int = 1,
        inplace: bool = False,
        name: str = "genai",
    ):
        from bundle.format import load_bundle

        self.name = name
        self.bundle = load_bundle(bundle_dir)
        self.python, self.repeat = python, repeat
        self.dir = write_genai_model(self.bundle, threads, inplace, Path(tempfile.mkdtemp(prefix="genai-model-")))
        self.file = (self.bundle.kv_inplace_path if inplace else self.bundle.onnx_path).name  # the file genai runs
        self.versions: dict[str, str] = {}

    def run(self, wl: Workload) -> tuple[Timing, list[list[int]]]:
        job = {
            "model_dir": str(self.dir),
            "pad_id": self.bundle.pad_id,
            "repeat": self.repeat,
            "batches": [
                {"prompts": [r.prompt for r in b], "max_tokens": [r.max_tokens for r in b]}
                for b in wl.static_batches()
            ],
        }
        job_path, out_path = self.dir / "job.json", self.dir / "result.json"
        job_path.write_text(json.dumps(job))
        out_path.unlink(missing_ok=True)
        proc = subprocess.run(
            [str(self.python), str(ROOT / "bench" / "genai_runner.py"), str(job_path), str(out_path)],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"genai_runner failed ({proc.returncode}): {proc.stderr[-2000:]}")
        res = json.loads(out_path.read_text())
        self.versions = {k: res[k] for k in ("onnxruntime_genai", "onnxruntime")}
        return Timing(float(res["seconds"]), float(res["cpu_seconds"])), res["outputs"]

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


# ---- measurement -------------------------------------------------------------------------------


@dataclass
class Measurement:
    runner: str
    workload: str
    batch: int | None
    output_tokens: int
    wall: list[float] = field(default_factory=list)  # seconds of every timed run
    cpu: list[float] = field(default_factory=list)  # process CPU seconds of every timed run
    match_engine: float | None = None  # fraction of requests whose tokens equal the engine's (greedy)

    @property
    def tokens_per_s(self) -> float:
        """Output tokens per wall second of the fastest run."""
        return self.output_tokens / min(self.wall)

    @property
    def tokens_per_cpu_s(self) -> float:
        """Output tokens per CPU second of the run that used the least."""
        return self.output_tokens / min(self.cpu)

    @property
    def spread(self) -> float:
        """Slowest over fastest wall time."""
        return max(self.wall) / min(self.wall)


def check_lengths(name: str, wl: Workload, outs: list[list[int]]) -> None:
    bad = [i for i, (o, r) in enumerate(zip(outs, wl.requests, strict=True)) if len(o) != r.max_tokens]
    if bad:
        i = bad[0]
        raise RuntimeError(
            f"{name} on {wl.name}: request {i} has {len(outs[i])} tokens, "
            f"expected {wl.requests[i].max_tokens}"
        )


def measure(
    runners: Sequence[Runner],
    wl: Workload,
    repeat: int = 1,
    warmup_tokens: int = 4,
    min_time: float = 0.0,
    max_rounds: int = 30,
) -> list[tuple[Measurement, list[list[int]]]]:
    """Warm every runner up on the same prompts with a few tokens, then rounds of timed runs, runner
    after runner (so a burst of load elsewhere hits them alike).

    A runner gets at least ``repeat`` runs, and more (up to ``max_rounds``) until its runs add up to
    ``min_time`` seconds: a point that takes 0.1 s is the best of many runs, one that takes 10 s of
    ``repeat``.
    """
    for r in runners:
        if not isinstance(r, GenAIRunner):  # genai warms up inside its subprocess
            r.run(wl.shortened(warmup_tokens))
    ms = {r.name: Measurement(r.name, wl.name, wl.batch, wl.output_tokens) for r in runners}
    outputs: dict[str, list[list[int]]] = {}

    def wants_more(m: Measurement) -> bool:
        return len(m.wall) < repeat or (sum(m.wall) < min_time and len(m.wall) < max_rounds)

    while active := [r for r in runners if wants_more(ms[r.name])]:
        for r in active:
            timing, outs = r.run(wl)
            check_lengths(r.name, wl, outs)
            ms[r.name].wall.append(timing.wall)
            ms[r.name].cpu.append(timing.cpu)
            outputs.setdefault(r.name, outs)
    return [(ms[r.name], outputs[r.name]) for r in runners]


_GEMM = """
import json, sys, time
import numpy as np
n, repeats = int(sys.argv[1]), int(sys.argv[2])
a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
a @ b
wall = cpu = float("inf")
for _ in range(repeats):
    t0, c0 = time.perf_counter(), time.process_time()
    a @ b
    wall, cpu = min(wall, time.perf_counter() - t0), min(cpu, time.process_time() - c0)
print(json.dumps({"wall": 2 * n**3 / wall / 1e9, "cpu": 2 * n**3 / cpu / 1e9}))
"""


def gemm_gflops(threads: int, n: int = 1024, repeats: int = 5) -> tuple[float, float]:
    """fp32 GEMM rate of numpy's BLAS on ``threads`` threads: 2 n^3 / best time, in GFLOP/s.

    Returns (per wall second, per CPU second of all threads). Runs in a subprocess, since the BLAS
    reads its thread count (OPENBLAS_NUM_THREADS) when it loads.
    """
    env = {**os.environ, "OPENBLAS_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(
        [sys.executable, "-c", _GEMM, str(n), str(repeats)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    res = json.loads(proc.stdout)
    return res["wall"], res["cpu"]


# ---- the run -----------------------------------------------------------------------------------


@dataclass
class Report:
    model: dict[str, Any]
    settings: dict[str, Any]
    gemm_gflops: float  # per wall second, at the runners' thread count
    gemm_gflops_cpu: float  # per CPU second
    measurements: list[Measurement] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    bpc: dict[str, float] = field(default_factory=dict)

    @property
    def ceiling_tokens_per_s(self) -> float:
        """2 x parameters FLOPs per token at the GEMM rate."""
        return self.gemm_gflops * 1e9 / (2 * self.model["num_parameters"])

    @property
    def ceiling_tokens_per_cpu_s(self) -> float:
        return self.gemm_gflops_cpu * 1e9 / (2 * self.model["num_parameters"])

    def get(self, runner: str, workload: str) -> Measurement | None:
        return next((m for m in self.measurements if m.runner == runner and m.workload == workload), None)

    def ratio(self, a: str, b: str, workload: str, cpu: bool = False) -> float | None:
        ma, mb = self.get(a, workload), self.get(b, workload)
        if ma is None or mb is None:
            return None
        return ma.tokens_per_cpu_s / mb.tokens_per_cpu_s if cpu else ma.tokens_per_s / mb.tokens_per_s

    def ceiling_share(self, runner: str, workload: str, cpu: bool = False) -> float | None:
        m = self.get(runner, workload)
        if m is None:
            return None
        return (
            m.tokens_per_cpu_s / self.ceiling_tokens_per_cpu_s
            if cpu
            else m.tokens_per_s / self.ceiling_tokens_per_s
        )

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["ceiling_tokens_per_s"], d["ceiling_tokens_per_cpu_s"] = (
            self.ceiling_tokens_per_s,
            self.ceiling_tokens_per_cpu_s,
        )
        for m, md in zip(self.measurements, d["measurements"], strict=True):
            md["tokens_per_s"], md["tokens_per_cpu_s"] = m.tokens_per_s, m.tokens_per_cpu_s
        return d


Target = tuple[str, float | None, float | None, float | None, str]  # name, wall, CPU, threshold (None: context), unit


def targets(rep: Report) -> list[Target]:
    """The issue's targets, measured both ways (None when a runner is missing)."""

    def both(f: Callable[[bool], float | None]) -> tuple[float | None, float | None]:
        return f(False), f(True)

    rows: list[Target] = [
        (
            "KV cache vs full recompute, batch 1",
            *both(lambda c: rep.ratio("engine", "nocache", "batch 1", c)),
            6.0,
            "x",
        ),
        (
            "vs transformers generate(), batch 1",
            *both(lambda c: rep.ratio("engine", "hf", "batch 1", c)),
            3.0,
            "x",
        ),
        (
            "vs transformers generate(), batch 32",
            *both(lambda c: rep.ratio("engine", "hf", "batch 32", c)),
            2.0,
            "x",
        ),
        (
            "vs onnxruntime-genai (same ONNX file), batch 1",
            *both(lambda c: rep.ratio("engine", "genai", "batch 1", c)),
            1.0,
            "x",
        ),
        (
            "  without speculation (engine-nospec vs onnxruntime-genai), batch 1",
            *both(lambda c: rep.ratio("engine-nospec", "genai", "batch 1", c)),
            1.0,
            "x",
        ),
        *(
            (
                f"  without speculation, batch {b}",
                *both(lambda c, b=b: rep.ratio("engine-nospec", "genai", f"batch {b}", c)),
                1.0,
                "x",
            )
            for b in (8, 32)
        ),
        *(
            (
                f"  the floor: bare in-place loop (ortloop-inplace) vs onnxruntime-genai, batch {b}",
                *both(lambda c, b=b: rep.ratio("ortloop-inplace", "genai", f"batch {b}", c)),
                None,
                "x",
            )
            for b in (1, 8, 32)
        ),
        (
            f"vs onnxruntime-genai (same ONNX file), mixed workload ({rep.settings['mixed_concurrency']} "
            "concurrent)",
            *both(lambda c: rep.ratio("engine", "genai", "mixed", c)),
            1.1,
            "x",
        ),
        (
            "share of the compute ceiling, batch 64",
            *both(lambda c: rep.ceiling_share("engine", "batch 64", c)),
            0.5,
            "%",
        ),
        (
            "int8 vs fp32 (this engine), batch 1",
            *both(lambda c: rep.ratio("int8", "engine", "batch 1", c)),
            1.8,
            "x",
        ),
        (
            "  without speculation (int8-nospec vs engine-nospec), batch 1",
            *both(lambda c: rep.ratio("int8-nospec", "engine-nospec", "batch 1", c)),
            1.8,
            "x",
        ),
    ]
    # What the in-place KV cache buys inside the engine: it is the default, so it must not lose.
    workloads = [f"batch {b}" for b in rep.settings["batches"]] + ["mixed"] * bool(rep.settings.get("mixed"))
    for wl in workloads:
        rows.append(
            (
                f"in-place vs concat KV cache (this engine), {wl}",
                *both(lambda c, wl=wl: rep.ratio("engine", "engine-concat", wl, c)),
                1.0,
                "x",
            )
        )
    if "fp32" in rep.bpc and "int8" in rep.bpc:
        lost = rep.bpc["int8"] - rep.bpc["fp32"]
        rows.append(("int8 bits/char lost", lost, lost, 0.05, "bpc"))
    return rows


def _fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "n/a"
    return {"x": f"{v:.2f}x", "%": f"{100 * v:.0f}%", "bpc": f"{v:+.4f}"}[unit]


def _met(v: float | None, thr: float | None, unit: str) -> str:
    if v is None or thr is None:
        return "—"
    return "yes" if (v <= thr if unit == "bpc" else v >= thr) else "**no**"


def _table(
    rep: Report,
    workloads: list[str],
    runners: list[str],
    value: Callable[[Measurement], float],
    share: Callable[[str], float | None],
) -> list[str]:
    lines = ["| runner | " + " | ".join(workloads) + " |", "|---|" + "---:|" * len(workloads)]
    for r in runners:
        cells = ["—" if (x := rep.get(r, w)) is None else f"{value(x):,.0f}" for w in workloads]
        lines.append(f"| {LABELS.get(r, r)} | " + " | ".join(cells) + " |")
    cells = ["—" if (v := share(w)) is None else f"{100 * v:.1f}%" for w in workloads]
    lines.append("| this engine: share of the compute ceiling | " + " | ".join(cells) + " |")
    return lines


def markdown(rep: Report) -> str:
    workloads = list(dict.fromkeys(m.workload for m in rep.measurements))
    runners = list(dict.fromkeys(m.runner for m in rep.measurements))
    s, m = rep.settings, rep.model
    one = s["threads"] == 1
    lines = [
        f"Model `{m['name']}`: d_model {m['n_embd']}, {m['n_layer']} layers, {m['n_head']} heads, vocabulary "
        f"{m['vocab_size']}, context {m['context_length']}, {m['num_parameters'] / 1e6:.2f}M parameters, fp32. "
        f"{s['threads']} thread{'s' if s['threads'] > 1 else ''} for every runner, {s['cpu_count']} cores. "
        f"Greedy; batch B: B requests of {s['prompt_len']} prompt tokens and {s['new_tokens']} new tokens, "
        f"submitted together."
        + (
            f" Mixed: {s['mixed']} requests, prompts {s['mixed_prompt']} and outputs {s['mixed_output']} tokens "
            f"(seed {s['seed']}), at most {s['mixed_concurrency']} in flight."
            if s.get("mixed")
            else ""
        ),
        "",
        f"Output tokens per second of wall time, end to end (prefill included), fastest of at least {s['repeat']} "
        f"interleaved rounds (more, up to 30, until a runner's runs add up to {s['min_time']:g} s):",
        "",
        *_table(rep, workloads, runners, lambda x: x.tokens_per_s, lambda w: rep.ceiling_share("engine", w)),
        "",
        "Output tokens per CPU second (process CPU time, least of the same rounds)"
        + (
            ": with one thread, the measure least disturbed by other load on a shared machine:"
            if one
            else " (all threads, spinning included: not comparable to wall time):"
        ),
        "",
        *_table(
            rep,
            workloads,
            runners,
            lambda x: x.tokens_per_cpu_s,
            lambda w: rep.ceiling_share("engine", w, cpu=True),
        ),
        "",
        f"Compute ceiling: fp32 GEMM on {s['threads']} thread{'s' if s['threads'] > 1 else ''} (numpy 1024³, best "
        f"of 5) {rep.gemm_gflops:.0f} GFLOP/s of wall time ({rep.gemm_gflops_cpu:.0f} per CPU second) / "
        f"(2 × {m['num_parameters'] / 1e6:.2f}M FLOPs per token) = {rep.ceiling_tokens_per_s:,.0f} tokens/s "
        f"({rep.ceiling_tokens_per_cpu_s:,.0f} per CPU second).",
        "",
        "| target (ratios within this run) | wall time | CPU time | target | met (wall / CPU) |",
        "|---|---:|---:|---:|:---:|",
    ]
    for name, vw, vc, thr, unit in targets(rep):
        thr_s = "—" if thr is None else f"≤ {thr:.2f}" if unit == "bpc" else f"≥ {_fmt(thr, unit)}"
        lines.append(
            f"| {name} | {_fmt(vw, unit)} | {_fmt(vc, unit)} | {thr_s} | "
            f"{_met(vw, thr, unit)} / {_met(vc, thr, unit)} |"
        )
    spread = max((x.spread for x in rep.measurements), default=1.0)
    lines += ["", f"Slowest over fastest run of one point: up to {spread:.1f}x (other load on the machine)."]
    if rep.bpc:
        lines += [
            "",
            "Bits per character on the held-out works: "
            + ", ".join(f"{k} {v:.4f}" for k, v in rep.bpc.items())
            + ".",
        ]
    matches = [x for x in rep.measurements if x.match_engine is not None and x.workload == workloads[0]]
    if matches:
        lines += [
            "",
            f"Greedy tokens identical to this engine's ({workloads[0]}): "
            + ", ".join(f"{x.runner} {100 * x.match_engine:.0f}%" for x in matches)
            + ".",
        ]
    differ = [
        x for x in rep.measurements if x.match_engine is not None and x.match_engine < 1 and x not in matches
    ]
    if differ:
        why = {
            "genai": "onnxruntime-genai positions a left-padded row from its padding, bench/genai_runner.py",
            "int8": "int8 weights",
            "other": "rounding at near ties",
        }
        kinds = dict.fromkeys(
            "genai" if x.runner.startswith("genai") else "int8" if x.runner.startswith("int8") else "other"
            for x in differ
        )
        lines += [
            "",
            "Elsewhere, requests whose greedy tokens equal this engine's: "
            + ", ".join(f"{x.runner} {100 * x.match_engine:.0f}% ({x.workload})" for x in differ)
            + f" ({'; '.join(why[k] for k in kinds)}).",
        ]
    if rep.versions:
        lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in rep.versions.items()) + "."]
    lines += ["", *(f"- {note}" for note in rep.notes)] if rep.notes else []
    return "\n".join(lines) + "\n"


def write_docs(path: Path, block: str) -> None:
    """Replace the generated block of the engine section of path (appending the section if absent)."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    generated = f"{BEGIN}\n{block}{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + generated + rest.split(END, 1)[1]
    elif SECTION in text:
        head, rest = text.split(SECTION, 1)
        text = f"{head}{SECTION}\n\n{generated}\n{rest}"
    else:
        text = text.rstrip("\n") + f"\n\n{SECTION}\n\n{generated}\n"
    path.write_text(text, encoding="utf-8")


def plot(rep: Report, out: Path) -> None:
    """Tokens/s against batch size (wall and CPU time), and the mixed workload as bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fixed = [m for m in rep.measurements if m.batch is not None]
    mixed = [m for m in rep.measurements if m.workload == "mixed"]
    order = list(dict.fromkeys(m.runner for m in rep.measurements))
    color = {r: f"C{i}" for i, r in enumerate(order)}
    ncols = 3 if mixed else 2
    fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 5.4), squeeze=False)
    s, m = rep.settings, rep.model
    for ax, cpu in zip(axes[0][:2], (False, True), strict=True):
        for r in dict.fromkeys(x.runner for x in fixed):
            pts = sorted(
                (x.batch, x.tokens_per_cpu_s if cpu else x.tokens_per_s) for x in fixed if x.runner == r
            )
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                marker="o",
                color=color[r],
                label=SHORT.get(r, r),
                linewidth=2.5 if r == "engine" else 1.3,
            )
        ceiling = rep.ceiling_tokens_per_cpu_s if cpu else rep.ceiling_tokens_per_s
        ax.axhline(ceiling, color="k", linestyle="--", linewidth=1, label="compute ceiling (fp32 GEMM rate)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size (requests decoded together)")
        ax.set_ylabel("output tokens per CPU second" if cpu else "output tokens/s (wall)")
        ax.set_title("per CPU second" if cpu else "per wall second", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="lower right")
    if mixed:
        ax = axes[0][2]
        names = [SHORT.get(x.runner, x.runner) for x in mixed]
        y = np.arange(len(mixed))
        ax.barh(
            y - 0.2,
            [x.tokens_per_s for x in mixed],
            height=0.4,
            color=[color[x.runner] for x in mixed],
            label="per wall second",
        )
        ax.barh(
            y + 0.2,
            [x.tokens_per_cpu_s for x in mixed],
            height=0.4,
            color=[color[x.runner] for x in mixed],
            alpha=0.45,
            label="per CPU second",
        )
        ax.set_yticks(y, names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("output tokens/s")
        ax.set_title(f"mixed: {s['mixed']} requests, {s['mixed_concurrency']} in flight", fontsize=10)
        ax.grid(True, axis="x", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(
        f"{m['name']} ({m['num_parameters'] / 1e6:.1f}M parameters), prompt {s['prompt_len']} + "
        f"{s['new_tokens']} new tokens, {s['threads']} thread(s), greedy",
        fontsize=11,
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def _ints(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def add_workload_args(p: argparse.ArgumentParser, batches: list[int], bundle_help: str = "model bundle") -> None:
    """``--bundle``, ``--batches``, ``--prompt-len``, ``--new-tokens``: the fixed batches every
    offline engine benchmark here runs (``fixed_workload``)."""
    p.add_argument("--bundle", type=Path, default=Path("artifacts/small"), help=bundle_help)
    default = ",".join(map(str, batches))
    p.add_argument("--batches", type=_ints, default=batches, help=f"batch sizes (default {default})")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens per request (default 32)")
    p.add_argument("--new-tokens", type=int, default=128, help="new tokens per request (default 128)")


def _runners(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [n for n in names if n not in RUNNERS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown runner(s) {bad}; choose from {','.join(RUNNERS)}")
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.engine",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_workload_args(p, [1, 8, 32, 64], bundle_help="fp32 model bundle")
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="PyTorch checkpoint (default: artifacts/.work/<preset>/checkpoint.pt of the bundle's preset)",
    )
    p.add_argument("--int8-bundle", type=Path, default=None, help="default: <bundle>-int8")
    p.add_argument(
        "--mixed", type=int, default=0, metavar="N", help="also run N mixed-length requests (0: no)"
    )
    p.add_argument(
        "--mixed-concurrency", type=int, default=32, help="sequences in flight for --mixed (default 32)"
    )
    p.add_argument("--mixed-prompt", default="16:128", help="prompt length range MIN:MAX (default 16:128)")
    p.add_argument("--mixed-output", default="16:256", help="output length range MIN:MAX (default 16:256)")
    p.add_argument("--runners", type=_runners, default=list(RUNNERS), help=f"default {','.join(RUNNERS)}")
    p.add_argument(
        "--nocache-max-batch",
        type=int,
        default=8,
        help="skip the no-cache runner above this batch size (default 8) and on --mixed: it is quadratic",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="threads for every runner (default 1: on a shared machine, multi-threaded runtimes "
        "waiting on each other's preempted threads make comparisons meaningless; 0: all cores)",
    )
    p.add_argument(
        "--max-prefill-tokens",
        type=int,
        default=4096,
        help="engine: prompt tokens prefilled per step (default 4096: a whole batch at once)",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="rounds of timed runs (every runner once per round); the fastest counts (default 3)",
    )
    p.add_argument(
        "--min-time",
        type=float,
        default=2.0,
        help="keep adding rounds (up to 30) until a runner's runs add up to this many seconds (default 2)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--genai-python",
        type=Path,
        default=ROOT / ".venv-genai" / "bin" / "python",
        help="python of the onnxruntime-genai environment (default .venv-genai, `make bench-env`)",
    )
    p.add_argument("--bpc", action="store_true", help="also measure bits/char of the fp32 and int8 bundles")
    p.add_argument(
        "--out", type=Path, default=None, help="markdown file whose engine section gets the results"
    )
    p.add_argument("--plot", type=Path, default=None, help="PNG of tokens/s against batch size")
    p.add_argument("--json", type=Path, default=None, help="all measurements as JSON")
    a = p.parse_args(argv)
    for name in ("prompt_len", "new_tokens", "repeat", "mixed_concurrency"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    from bench.workload import parse_range

    try:
        a.mixed_prompt_range = parse_range(a.mixed_prompt, "--mixed-prompt")
        a.mixed_output_range = parse_range(a.mixed_output, "--mixed-output")
    except ValueError as e:
        p.error(str(e))
    a.threads = a.threads or os.cpu_count() or 1
    return a


def build_runners(
    a: argparse.Namespace, bundle: Any, notes: list[str], log: Callable[[str], None]
) -> list[Runner]:
    runners: list[Runner] = []
    inplace = bundle.kv_inplace_path is not None  # the engine runs it on CPU (Engine kv_inplace="auto")
    for name in a.runners:
        if name in ("engine-concat", "genai-concat") and not inplace:
            notes.append(f"{name}: skipped, the bundle has no in-place decoder: the engine runs model.onnx.")
            continue
        if name == "engine":
            runners.append(EngineRunner(a.bundle, a.threads, a.max_prefill_tokens))
        elif name == "engine-nospec":
            runners.append(EngineRunner(a.bundle, a.threads, a.max_prefill_tokens, name=name, speculative_tokens=0))
        elif name == "engine-concat":
            runners.append(
                EngineRunner(a.bundle, a.threads, a.max_prefill_tokens, name=name, kv_inplace="off")
            )
        elif name == "ortloop":
            runners.append(OrtLoopRunner(a.bundle, a.threads))
        elif name == "ortloop-inplace":
            if not inplace:
                notes.append(f"{name}: skipped, the bundle has no in-place decoder.")
                continue
            runners.append(InplaceLoopRunner(a.bundle, a.threads))
        elif name == "nocache":
            runners.append(NoCacheRunner(a.bundle, a.threads))
        elif name == "torch":
            preset = bundle.config.get("training", {}).get("preset", bundle.name)
            ckpt = a.checkpoint or Path("artifacts/.work") / preset / "checkpoint.pt"
            if not ckpt.is_file():
                notes.append(f"torch: skipped, checkpoint {ckpt} not found (--checkpoint).")
                continue
            from model.train import load_model

            runners.append(TorchRunner(load_model(ckpt)[0], bundle.pad_id, a.threads))
        elif name == "hf":
            try:
                import transformers
            except ImportError:
                notes.append("hf: skipped, transformers is not installed (`pip install -e '.[bench]'`).")
                continue
            r = HFRunner(bundle.arch, bundle.bos_id, bundle.eos_id, bundle.pad_id, a.threads)
            notes.append(
                f"hf: GPT2LMHeadModel of the same shape has {r.num_parameters / 1e6:.2f}M parameters "
                f"(learned positions and biases), attention `{r.model.config._attn_implementation}`."
            )
            runners.append(r)
            a.versions["transformers"] = transformers.__version__
        elif name in ("genai", "genai-concat"):
            if not a.genai_python.is_file():
                notes.append(f"{name}: skipped, {a.genai_python} not found (`make bench-env`).")
                continue
            on_inplace = inplace and name == "genai"
            g = GenAIRunner(a.bundle, a.genai_python, a.threads, inplace=on_inplace, name=name)
            share = str(on_inplace).lower()
            notes.append(f'{name}: {g.file}, genai_config `"past_present_share_buffer": {share}`.')
            runners.append(g)
        elif name in ("int8", "int8-nospec"):
            path = a.int8_bundle or a.bundle.with_name(a.bundle.name + "-int8")
            if not (path / "config.json").is_file():
                notes.append(
                    f"int8: skipped, no bundle at {path} "
                    f"(`python -m model export --preset small --int8 --out {path}`)."
                )
                continue
            a.int8_path = path
            spec = {"speculative_tokens": 0} if name == "int8-nospec" else {}
            runners.append(EngineRunner(path, a.threads, a.max_prefill_tokens, name=name, **spec))
        log(f"runner {name} ready")
    return runners


def run(
    a: argparse.Namespace, log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)
) -> Report:
    import onnxruntime

    from bundle.format import load_bundle

    bundle = load_bundle(a.bundle)
    a.versions = {"onnxruntime": onnxruntime.__version__, "numpy": np.__version__}
    a.int8_path = None
    notes: list[str] = []
    runners = build_runners(a, bundle, notes, log)
    gflops = gemm_gflops(a.threads)
    params = bundle.num_parameters
    model = {
        "name": bundle.name,
        **{k: bundle.arch[k] for k in ("n_embd", "n_layer", "n_head", "vocab_size", "context_length")},
        "num_parameters": params,
    }
    settings = {
        "threads": a.threads,
        "prompt_len": a.prompt_len,
        "new_tokens": a.new_tokens,
        "repeat": a.repeat,
        "min_time": a.min_time,
        "batches": a.batches,
        "mixed": a.mixed,
        "mixed_concurrency": a.mixed_concurrency,
        "mixed_prompt": a.mixed_prompt,
        "mixed_output": a.mixed_output,
        "seed": a.seed,
        "max_prefill_tokens": a.max_prefill_tokens,
        "cpu_count": os.cpu_count(),
    }
    rep = Report(model, settings, *gflops, notes=notes)
    stream = text_tokens(bundle.tokenizer_path)
    workloads = [
        fixed_workload(stream, bundle.bos_id, b, a.prompt_len, a.new_tokens, a.seed) for b in a.batches
    ]
    if a.mixed:
        workloads.append(
            mixed_workload(
                stream,
                bundle.bos_id,
                a.mixed,
                a.mixed_concurrency,
                a.mixed_prompt_range,
                a.mixed_output_range,
                a.seed,
            )
        )
    if any(r.name == "nocache" for r in runners):
        skipped = [w.name for w in workloads if w.batch is None or w.batch > a.nocache_max_batch]
        if skipped:
            notes.append(f"nocache: not run on {', '.join(skipped)} (quadratic; --nocache-max-batch).")
    genai = [r.name for r in runners if isinstance(r, GenAIRunner)]
    if genai:
        skipped = [w.name for w in workloads if w.concurrency > GENAI_MAX_BATCH]
        if skipped:
            notes.append(
                f"{', '.join(genai)}: not run on {', '.join(skipped)}: its Generator takes at most "
                f"{GENAI_MAX_BATCH} sequences (`batch_size (64) must be in [1, 32]`)."
            )

    def applies(r: Runner, wl: Workload) -> bool:
        if r.name == "nocache":
            return wl.batch is not None and wl.batch <= a.nocache_max_batch
        return not (isinstance(r, GenAIRunner) and wl.concurrency > GENAI_MAX_BATCH)

    for wl in workloads:
        active = [r for r in runners if applies(r, wl)]
        results = measure(active, wl, a.repeat, min_time=a.min_time)
        engine_out = next((outs for m, outs in results if m.runner == "engine"), None)
        for m, outs in results:
            if engine_out is not None and m.runner not in ("engine", "hf"):  # hf: random weights
                m.match_engine = float(np.mean([o == e for o, e in zip(outs, engine_out, strict=True)]))
            rep.measurements.append(m)
            log(
                f"{wl.name:>9} {m.runner:>13}: {m.tokens_per_s:9,.0f} tokens/s, {m.tokens_per_cpu_s:9,.0f} per "
                f"CPU second ({m.output_tokens} tokens in {min(m.wall):.2f} s; slowest run {m.spread:.2f}x)"
            )
    end = gemm_gflops(a.threads)  # best of the start and the end of the run
    rep.gemm_gflops, rep.gemm_gflops_cpu = max(gflops[0], end[0]), max(gflops[1], end[1])
    for r in runners:
        if isinstance(r, EngineRunner) and r.layouts:
            files = {"inplace": r.bundle.kv_inplace_path, "concat": r.bundle.onnx_path}
            used = ", ".join(f"{x} ({files[x].name if files[x] else '?'})" for x in sorted(r.layouts))
            notes.append(f"{r.name}: KV cache layout {used}.")
        if isinstance(r, GenAIRunner):
            rep.versions.update(r.versions)
            r.close()
    rep.versions.update(a.versions)
    if a.bpc:
        rep.bpc = measure_bpc(a.bundle, a.int8_path, log)
    return rep


def measure_bpc(fp32: Path, int8: Path | None, log: Callable[[str], None]) -> dict[str, float]:
    """Bits per character of the bundles on the held-out works (model.evaluate, prepared data in data/)."""
    from model.data import load_works, prepare
    from model.evaluate import evaluate_bundle

    val = load_works(prepare(None, Path("data")), "val")
    out = {}
    for name, path in (("fp32", fp32), ("int8", int8)):
        if path is not None:
            out[name] = evaluate_bundle(path, val)["val_bpc"]
            log(f"bits/char {name}: {out[name]:.4f}")
    return out


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    rep = run(a)
    table = markdown(rep)
    print(table)
    if a.out:
        write_docs(a.out, table)
        print(f"wrote the results into {a.out} ({SECTION})", file=sys.stderr)
    if a.plot:
        plot(rep, a.plot)
        print(f"wrote {a.plot}", file=sys.stderr)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(rep.to_json(), indent=2))


if __name__ == "__main__":
    main()
