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
