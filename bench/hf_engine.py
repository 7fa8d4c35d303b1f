"""An imported Hugging Face checkpoint, side by side: this engine, transformers and ONNX Runtime GenAI.

One Llama-architecture checkpoint with random weights (hidden 768, 12 layers, 12 heads, 4 KV
heads, vocabulary 32,000, context 2048: 124.7M parameters, the shape of docs/BENCHMARKS.md's CPU
anchors), made here with a byte-level BPE tokenizer trained on bench/workload.py's passage (no
download). Runners, all greedy, EOS ignored, the same prompts:

- ``engine`` / ``engine-int8`` / ``engine-int4``: service.engine.engine.Engine on the bundle that
  ``python -m model import --hf`` writes (fp32), and on its int8 / int4 MatMulNBits variants
  (model/hf/quantize.py ``quantize_bundle``: the same quantization as ``--int8`` / ``--int4``);
- ``hf``: ``transformers`` ``generate()`` on the checkpoint folder (static batches, left padded);
- ``genai`` / ``genai-int4``: onnxruntime-genai 0.18 on what its own model builder exports from
  the same folder (``python -m onnxruntime_genai.models.builder -p fp32|int4 -e cpu``), run in
  ``.venv-genai`` (``make bench-env``) by bench/genai_runner.py.

Workloads (bench/engine.py's): batch 1, 8, 32 of 32-token prompts and 128 new tokens, and the
mixed workload (prompts 16-128, outputs 16-256 tokens, 32 in flight). Tokens/s = output tokens /
wall time, prefill included.

    python -m bench.hf_engine --work artifacts/hf-bench --mixed 64 --out docs/BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.engine import (
    EngineRunner,
    GenAIRunner,
    HFRunner,
    Workload,
    fixed_workload,
    measure,
    mixed_workload,
)

ROOT = Path(__file__).resolve().parents[1]
LLAMA_124M = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                  num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)


def make_checkpoint(out: Path, seed: int = 0) -> Path:
    """The random-weight Llama checkpoint and its locally trained tokenizer, saved with save_pretrained."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from bench.workload import PASSAGE

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(PASSAGE.split())] * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    torch.manual_seed(seed)
    cfg = LlamaConfig(**LLAMA_124M, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return out


class HFFolderRunner(HFRunner):
    """transformers generate() on the checkpoint folder itself."""

    def __init__(self, folder: Path, pad_id: int, threads: int):
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        self.model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
        self.pad_id = pad_id
        self.num_parameters = sum(p.numel() for p in self.model.parameters())


class GenAIBuilderRunner(GenAIRunner):
    """onnxruntime-genai on a folder its model builder wrote (genai_config.json and model.onnx)."""

    def __init__(self, folder: Path, pad_id: int, python: Path, name: str):
        self.name, self.dir, self.python, self.repeat = name, folder, python, 1
        self.bundle: Any = type("PadOnly", (), {"pad_id": pad_id})()
        self.versions: dict[str, str] = {}

    def close(self) -> None:  # the builder's folder is kept (it is the benchmark's input)
        pass


def genai_build(python: Path, hf: Path, out: Path, precision: str, threads: int) -> Path:
    if not (out / "genai_config.json").is_file():
        cmd = [str(python), "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out),
               "-p", precision, "-e", "cpu", "-c", str(out.parent / "genai-cache")]
        subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    cfg = json.loads((out / "genai_config.json").read_text())
    cfg["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads
    (out / "genai_config.json").write_text(json.dumps(cfg, indent=2))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("artifacts/hf-bench"))
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--mixed", type=int, default=64, help="requests of the mixed workload (0: none)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=1, help="timed runs per runner and workload, in rounds (best kept)")
    p.add_argument("--runners", default="engine,engine-int8,engine-int4,hf,genai,genai-int4")
    p.add_argument("--genai-python", type=Path, default=ROOT / ".venv-genai" / "bin" / "python")
    p.add_argument("--json", type=Path, default=None, help="write the measurements here")
    a = p.parse_args(argv)
    wanted = a.runners.split(",")
    ckpt, fp32 = a.work / "checkpoint", a.work / "bundle-fp32"
    if not (ckpt / "config.json").is_file():
        make_checkpoint(ckpt)
    if not (fp32 / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "model", "import", "--hf", str(ckpt), "--out", str(fp32)], check=True)
    from bundle.format import load_bundle
    from model.hf.quantize import quantize_bundle

    bundles = {"engine": fp32}
    for bits in (8, 4):
        q = a.work / f"bundle-int{bits}"
        if f"engine-int{bits}" in wanted:
            if not (q / "config.json").is_file():
                quantize_bundle(fp32, q, bits)
            bundles[f"engine-int{bits}"] = q
    b = load_bundle(fp32)
    tok = b.config["tokenizer"]
    pad = tok["pad_id"] if tok["pad_id"] is not None else tok["eos_id"]
    runners: list[Any] = [EngineRunner(path, a.threads, 4096, name=name) for name, path in bundles.items()
                          if name in wanted]
    if "hf" in wanted:
        runners.append(HFFolderRunner(ckpt, pad, a.threads))
    for name, precision in (("genai", "fp32"), ("genai-int4", "int4")):
        if name in wanted:
            folder = genai_build(a.genai_python, ckpt, a.work / f"genai-{precision}", precision, a.threads)
            runners.append(GenAIBuilderRunner(folder, pad, a.genai_python, name))
    from tokenizers import Tokenizer

    from bench.workload import PASSAGE

    stream = Tokenizer.from_file(str(fp32 / "tokenizer.json")).encode(" ".join(PASSAGE.split()),
                                                                       add_special_tokens=False).ids
    bos = tok["bos_id"]
    workloads: list[Workload] = [fixed_workload(stream, bos, int(n), 32, a.new_tokens) for n in a.batches.split(",")]
    if a.mixed:
        workloads.append(mixed_workload(stream, bos, a.mixed))
    results: dict[str, dict[str, float]] = {}
    for wl in workloads:
        for m, outs in measure(runners, wl, repeat=a.repeat, min_time=0.0):
            results.setdefault(wl.name, {})[m.runner] = round(m.tokens_per_s, 1)
            print(f"{wl.name:9s} {m.runner:12s} {m.tokens_per_s:8.1f} tokens/s  (first row {outs[0][:6]}; "
                  f"load {os.getloadavg()[0]:.1f})",
                  file=sys.stderr, flush=True)
    print(json.dumps(results, indent=2))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"results": results, "load_after": os.getloadavg()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
