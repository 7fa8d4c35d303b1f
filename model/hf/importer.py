"""``python -m model import --hf DIR --out BUNDLE``: a local Hugging Face checkpoint to a served bundle.

Steps: check the folder (model/hf/checkpoint.py) -> load it with ``transformers`` offline ->
copy its weights into the family's decoder (model/hf/decoder.py) -> export model.onnx and
model.kvinplace.onnx (model/hf/export.py) -> check both against ``transformers`` (a padded batch,
prefill + 16 greedy steps; float32: max |logit diff| <= 1e-4 and the same tokens) -> optionally
quantize both (model/hf/quantize.py) -> write the bundle: the graphs, tokenizer.json and
tokenizer_config.json, chat_template.jinja, and config.json with the tokenizer, generation
defaults and the source checkpoint's file hashes (docs/model-bundle.md).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from bundle.format import CONFIG_FILE, DEFAULT_IO_NAMES, FORMAT_VERSION, KV_INPLACE_SECTION, sha256_file
from model.export_inplace import GQA_OP
from model.hf.checkpoint import Checkpoint, inspect_checkpoint
from model.hf.spec import DecoderSpec
from model.hf.tokenizer_files import chat_template, generation_defaults, tokenizer_section

FP32_TOLERANCE = 1e-4
FP16_TOLERANCE = 5e-2
CHAT_TEMPLATE_FILE = "chat_template.jinja"


def _offline() -> None:
    """No hub access from here on: transformers and huggingface_hub read only local files."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@dataclass
class ImportOptions:
    out: Path
    name: str | None = None
    dtype: Literal["fp32", "fp16"] = "fp32"
    bits: int | None = None  # 4 or 8: MatMulNBits weight-only quantization
    max_bytes: int | None = None
    max_context: int | None = None
    kv_inplace: bool = True
    verify: bool = True


def load_hf(ckpt: Checkpoint) -> tuple[Any, Any]:
    """(transformers config, float32 model with eager attention), from local files only."""
    _offline()
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(ckpt.path, local_files_only=True, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(ckpt.path, local_files_only=True, trust_remote_code=False,
                                                 dtype=torch.float32, attn_implementation="eager")
    return cfg, model.eval()


def build_decoder(spec: DecoderSpec, hf_model: Any):
    """Our decoder with the checkpoint's weights (and its RoPE frequencies, computed by transformers)."""
    from model.hf.decoder import Decoder, load_hf_weights

    rotary = getattr(getattr(hf_model, "model", None), "rotary_emb", None)
    inv_freq = None if rotary is None else rotary.inv_freq.detach().clone()
    decoder = Decoder(spec, inv_freq, 1.0 if rotary is None else float(rotary.attention_scaling))
    load_hf_weights(decoder, hf_model.state_dict())
    return decoder.eval()


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _check(label: str, report: Any, tol: float | None) -> None:
    line = (f"{label}: max |logit diff| vs transformers {report.max_abs_diff:.2e} over prefill + "
            f"{report.steps} steps, greedy identical: {report.greedy_identical}")
    if tol is not None and not report.ok(tol):
        raise RuntimeError(f"export verification failed, {line} (limit {tol:g})")
    _say(("verified " if tol is not None else "") + line)


def import_checkpoint(hf_dir: str | Path, opts: ImportOptions) -> Path:
    """Import ``hf_dir`` into the bundle folder ``opts.out``; return it. Raises CheckpointError,
    UnsupportedModel (both ValueError) or RuntimeError (failed verification) with the reason."""
    from tokenizers import Tokenizer

    from model.hf.export import export_generic, export_inplace
    from model.hf.spec import decoder_spec
    from model.hf.verify import HFReference, parity_prompts
    from model.verify import check_parity, check_parity_kv_inplace

    ckpt = inspect_checkpoint(hf_dir, opts.max_bytes)
    tok = Tokenizer.from_file(str(ckpt.path / "tokenizer.json"))
    tok_cfg, gen_cfg = ckpt.read_json("tokenizer_config.json"), ckpt.read_json("generation_config.json")
    tok_section = tokenizer_section(tok, tok_cfg, gen_cfg)
    template_file = ckpt.file(CHAT_TEMPLATE_FILE)
    template = chat_template(tok_cfg, template_file.read_text(encoding="utf-8") if template_file else None)
    _say(f"loading {ckpt.path} ({ckpt.model_type}, {ckpt.weight_bytes / 1e6:.1f} MB of safetensors) ...")
    hf_cfg, hf_model = load_hf(ckpt)
    spec = decoder_spec(hf_cfg, opts.max_context)
    decoder = build_decoder(spec, hf_model)
    fp16 = opts.dtype == "fp16"
    out = opts.out
    with tempfile.TemporaryDirectory(prefix="textgen-import-") as tmp:
        work = Path(tmp)
        _say(f"exporting model.onnx ({opts.dtype}, {spec.n_layer} layers, context {spec.context_length}) ...")
        generic = export_generic(decoder, work / "model.onnx", fp16=fp16)
        inplace = None
        if opts.kv_inplace and not fp16:
            _say("exporting model.kvinplace.onnx (GroupQueryAttention over a shared KV buffer) ...")
            inplace = export_inplace(decoder, work / "model.kvinplace.onnx")
        elif opts.kv_inplace:
            _say("no in-place decoder for --dtype fp16 (its buffers are float32, for the CPU)")
        ref = HFReference(hf_model, spec)
        prompts = parity_prompts(tok, tok_section["bos_id"], tok_section["add_bos"])
        pad = tok_section["pad_id"] if tok_section["pad_id"] is not None else tok_section["eos_id"]
        graphs = [(generic, check_parity)] + ([(inplace, check_parity_kv_inplace)] if inplace else [])
        if opts.verify:
            for path, check in graphs:
                _check(path.name, check(ref, path, prompts, pad, steps=16), FP16_TOLERANCE if fp16 else FP32_TOLERANCE)
        quantization = None
        if opts.bits:
            from model.hf.quantize import quantize_nbits

            for path, check in graphs:
                _say(f"quantizing {path.name} to int{opts.bits} (MatMulNBits) ...")
                quantization = quantize_nbits(path, path, opts.bits)
                if opts.verify:  # quantized weights change logits by design: report, don't require parity
                    _check(f"int{opts.bits} {path.name}", check(ref, path, prompts, pad, steps=16), None)
        write_bundle(out, opts.name or out.name, ckpt, spec, decoder.num_parameters(), generic, inplace,
                     tok_section, template, generation_defaults(gen_cfg), "float16" if fp16 else "float32",
                     quantization, hf_version())
    return out


def hf_version() -> str:
    import transformers

    return transformers.__version__


def write_bundle(out: Path, name: str, ckpt: Checkpoint, spec: DecoderSpec, num_parameters: int, generic: Path,
                 inplace: Path | None, tok_section: dict[str, Any], template: str | None,
                 gen_defaults: dict[str, Any], dtype: str, quantization: dict[str, Any] | None,
                 transformers_version: str) -> Path:
    """Write the bundle folder (the graphs are copied from ``generic`` / ``inplace``)."""
    out.mkdir(parents=True, exist_ok=True)
    # A stale file of an earlier export into the same folder must not pass for part of this one.
    for stale in ("model.kvinplace.onnx", "model.attention.onnx", "tokenizer.model", CHAT_TEMPLATE_FILE):
        (out / stale).unlink(missing_ok=True)
    shutil.copyfile(generic, out / "model.onnx")
    files = ["model.onnx"]
    if inplace is not None:
        shutil.copyfile(inplace, out / "model.kvinplace.onnx")
        files.append("model.kvinplace.onnx")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(ckpt.path / f, out / f)
        files.append(f)
    if template is not None:
        (out / CHAT_TEMPLATE_FILE).write_text(template, encoding="utf-8")
        files.append(CHAT_TEMPLATE_FILE)
    arch = {**spec.to_dict(), "n_embd": spec.hidden_size}
    config: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "model_type": spec.model_type,
        "architecture": arch,
        "num_parameters": num_parameters,
        "dtype": dtype,
        "tokenizer": tok_section,
        **({"chat_template": {"file": CHAT_TEMPLATE_FILE}} if template is not None else {}),
        **({"generation": {"defaults": gen_defaults}} if gen_defaults else {}),
        "onnx": {"file": "model.onnx", "opset": 18, "io_names": DEFAULT_IO_NAMES, "kv_dtype": dtype},
        **({KV_INPLACE_SECTION: {
            "file": "model.kvinplace.onnx", "opset": 18, "op": GQA_OP, "kv_dtype": "float32",
            "past_present_share_buffer": True, "padding": "right", "max_len": spec.context_length,
            "io_names": dict(DEFAULT_IO_NAMES)}} if inplace is not None else {}),
        **({"quantization": quantization} if quantization else {}),
        "source": {
            "kind": "huggingface", "model_type": spec.model_type, "path": str(ckpt.path),
            "files": {f.name: sha256_file(f) for f in ckpt.source_files},
            "transformers_version": transformers_version,
        },
        "files": {f: {"sha256": sha256_file(out / f), "bytes": (out / f).stat().st_size} for f in files},
    }
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    sizes = ", ".join(f"{(out / f).stat().st_size / 1e6:.1f} MB {f}" for f in files if f.endswith(".onnx"))
    _say(f"wrote bundle {out} ({sizes})")
    return out
