"""Export a checkpoint to ONNX with the GenAI/Optimum decoder convention and write the bundle.

Inputs: input_ids [batch, seq], attention_mask [batch, past+seq], position_ids [batch, seq],
past_key_values.{i}.key / .value [batch, heads, past, head_dim]. Outputs: logits [batch, seq, vocab],
present.{i}.key / .value [batch, heads, past+seq, head_dim]. Batch, sequence and past are dynamic;
a zero-length past is a prefill.

The bundle may also carry model.kvinplace.onnx, the same decoder with an in-place KV cache
(model/export_inplace.py), declared in config.json's ``onnx_kv_inplace`` section, and
model.attention.onnx, the forward pass with attention probabilities as outputs for the service's
/v1/inspect (model/export_attention.py), declared in its ``onnx_attention`` section.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from bundle.format import (
    ATTENTION_SECTION,
    CONFIG_FILE,
    DEFAULT_IO_NAMES,
    FORMAT_VERSION,
    KV_INPLACE_SECTION,
    sha256_file,
)
from model.export_attention import ATTENTION_FILE, attention_config
from model.export_decoder import OPSET, DecoderDims, export_decoder
from model.export_inplace import KV_INPLACE_FILE, kv_inplace_config
from model.gpt import GPT


def export_onnx(model: GPT, out_path: Path, fp16: bool = False) -> Path:
    """Write ``model`` in the concat KV layout to ``out_path`` (model/export_decoder.py: torch's dynamo
    exporter, batch, sequence and past dynamic); ``fp16`` first converts ``model`` to float16 in place."""
    cfg = model.cfg
    model = model.eval().to("cpu")
    if fp16:
        model = model.half()
    dims = DecoderDims(cfg.n_layer, cfg.n_head, cfg.head_dim, cfg.vocab_size, cfg.context_length)
    return export_decoder(model, dims, out_path, "concat", torch.float16 if fp16 else torch.float32)


def quantize_int8(src: Path, dst: Path) -> Path:
    """ONNX Runtime dynamic quantization: int8 weights of MatMul/Gemm, activations quantized on the fly.

    ``quant_pre_process`` first (ONNX shape inference and ORT's basic, hardware-independent graph
    optimizations): constant folding turns the tied output head, a Transpose of the embedding in the
    exported graph, into a constant, so it is quantized too (one more int8 copy of the embedding).
    Measured by ``python -m bench.engine_int8``: decode step at batch 1 1.45-1.7x faster than fp32,
    against 1.3-1.45x without the head; bits/char unchanged (+0.0001 on the small preset).
    """
    import tempfile

    from onnx import TensorProto
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "preprocessed.onnx"
        # Symbolic shape inference gives up on this graph; ONNX shape inference is enough here.
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize_dynamic(
            str(pre),
            str(dst),
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul", "Gemm"],
            # fp32 where shape inference cannot see through an operator (contrib ops such as GroupQueryAttention)
            extra_options={"DefaultTensorType": TensorProto.FLOAT},
        )
    return dst


def write_bundle(
    out_dir: Path,
    name: str,
    model: GPT,
    onnx_file: Path,
    tokenizer_file: Path,
    training: dict[str, Any],
    dtype: str,
    tokenizer_ids: dict[str, int],
    kv_inplace_file: Path | None = None,
    attention_file: Path | None = None,
    kv_inplace_dtype: str = "float32",
) -> Path:
    """Put model.onnx, tokenizer.model, config.json and optionally model.kvinplace.onnx in out_dir; return it.

    Args:
        kv_inplace_file: the in-place decoder (model.export_inplace.build_kv_inplace), or None for a
            bundle without one (a stale copy left in out_dir by an earlier export is removed).
        attention_file: the inspection graph (model.export_attention.export_attention), or None
            for a bundle without one (likewise, a stale copy is removed).
        kv_inplace_dtype: the in-place decoder's cache type, "float32" or "float16" (``--fp16``:
            model.export_inplace_fp16, for CUDA).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    files = ["model.onnx", "tokenizer.model"]
    optional = ((kv_inplace_file, KV_INPLACE_FILE), (attention_file, ATTENTION_FILE))
    for src, file in ((onnx_file, "model.onnx"), (tokenizer_file, "tokenizer.model"), *optional):
        if src is not None and src.resolve() != (out_dir / file).resolve():
            shutil.copyfile(src, out_dir / file)
    for src, file in optional:
        if src is not None:
            files.append(file)
        else:
            (out_dir / file).unlink(missing_ok=True)
    cfg = model.cfg
    config = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "model_type": "gpt",
        "architecture": {
            **cfg.to_dict(),
            "head_dim": cfg.head_dim,
            "n_kv_head": cfg.n_head,
            "positional_encoding": "sinusoidal",
            "norm": "pre-layernorm",
            "tied_output_head": True,
        },
        "num_parameters": model.num_parameters(),
        "dtype": dtype,
        "tokenizer": {"type": "sentencepiece", "file": "tokenizer.model", "vocab_size": cfg.vocab_size,
                      "add_bos": True, **tokenizer_ids},
        "onnx": {"file": "model.onnx", "opset": OPSET, "io_names": DEFAULT_IO_NAMES, "kv_dtype": dtype},
        **({KV_INPLACE_SECTION: kv_inplace_config(model, dtype=kv_inplace_dtype)} if kv_inplace_file is not None else {}),
        **({ATTENTION_SECTION: attention_config(model)} if attention_file is not None else {}),
        "training": training,
        "files": {f: {"sha256": sha256_file(out_dir / f), "bytes": (out_dir / f).stat().st_size} for f in files},
    }
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    sizes = ", ".join(f"{(out_dir / f).stat().st_size / 1e6:.1f} MB {f}" for f in files if f.endswith(".onnx"))
    print(f"wrote bundle {out_dir} ({sizes})", file=sys.stderr)
    return out_dir
