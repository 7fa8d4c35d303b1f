"""Weight-only quantization of an exported graph with ONNX Runtime's MatMulNBits (int4 or int8).

Every MatMul whose weight is a constant (the projections and the output head) becomes a
``com.microsoft.MatMulNBits`` with ``bits``-bit weights in blocks of ``block_size`` along the
input dimension, one float scale (and zero point) per block; activations and the KV cache stay
float32. accuracy_level 4 lets the CPU kernel compute with int8 activations, quantized per row
and block (as ONNX Runtime GenAI's int4 CPU models do): a row's logits never depend on the other
rows of the batch.
"""

from __future__ import annotations

from pathlib import Path

BLOCK_SIZE = 32
ACCURACY_LEVEL = 4


def quantize_nbits(src: Path, dst: Path, bits: int, block_size: int = BLOCK_SIZE) -> dict:
    """Write ``src`` with MatMulNBits weights to ``dst``; return the bundle's ``quantization`` record."""
    import logging

    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)  # one line a node

    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    q = MatMulNBitsQuantizer(str(src), bits=bits, block_size=block_size, is_symmetric=True,
                             accuracy_level=ACCURACY_LEVEL, op_types_to_quantize=("MatMul",))
    q.process()
    model = q.model.model
    n = sum(1 for node in model.graph.node if node.op_type == "MatMulNBits")
    if n == 0:
        raise RuntimeError(f"no MatMul of {src.name} has a constant weight: nothing was quantized")
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))
    return {"method": "MatMulNBits", "bits": bits, "block_size": block_size, "symmetric": True,
            "accuracy_level": ACCURACY_LEVEL, "quantized_matmuls": n}


def quantize_bundle(src: Path, dst: Path, bits: int) -> Path:
    """A copy of the fp32 bundle ``src`` at ``dst`` with both graphs quantized (what ``import --int4/--int8``
    writes, without exporting again); config.json's hashes and ``quantization`` follow."""
    import json
    import shutil

    from bundle.format import CONFIG_FILE, KV_INPLACE_SECTION, sha256_file

    shutil.copytree(src, dst, dirs_exist_ok=True)
    config = json.loads((dst / CONFIG_FILE).read_text(encoding="utf-8"))
    graphs = [config["onnx"]["file"]] + ([config[KV_INPLACE_SECTION]["file"]] if KV_INPLACE_SECTION in config else [])
    for g in graphs:
        config["quantization"] = quantize_nbits(src / g, dst / g, bits)
    config["name"] = dst.name
    config["files"] = {f: {"sha256": sha256_file(dst / f), "bytes": (dst / f).stat().st_size} for f in config["files"]}
    (dst / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return dst
