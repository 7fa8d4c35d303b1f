"""The in-place decoder in float16, for CUDA: ONNX Runtime's CUDA GroupQueryAttention takes fp16 or bf16 only.

``to_fp16`` rewrites ``model.kvinplace.onnx`` (model/export_inplace.py, float32): every float
initializer becomes float16, so activations and the KV cache are float16 too; the cache inputs
and outputs are declared float16; the logits stay float32 (a Cast at the end), so the sampler
reads the same type from every bundle and the host copy per step is the logits alone.

The attention-mask subgraph keeps its integer types. Its shape branch (Shape -> Gather -> Cast,
GroupQueryAttention's ``total_sequence_length``, a CPU input) gets its own constants: ONNX Runtime
places it on the CPU, and a constant shared with a CUDA node would need a copy between devices,
which rules out CUDA graph capture (ONNX Runtime allows CPU nodes only for shapes, without copies).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

LOGITS = "logits"


def to_fp16(src: Path, dst: Path) -> Path:
    """Write the float16 version of the float32 in-place decoder ``src`` to ``dst``; return ``dst``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    m = onnx.load(str(src))
    g = m.graph
    for i, init in enumerate(g.initializer):
        if init.data_type == TensorProto.FLOAT:
            arr = numpy_helper.to_array(init).astype(np.float16)
            g.initializer[i].CopyFrom(numpy_helper.from_array(arr, init.name))
    for vi in [*g.input, *g.output]:
        if vi.name.startswith(("past_key_values.", "present.")):
            vi.type.tensor_type.elem_type = TensorProto.FLOAT16
    # The last node writes float16 logits now; a Cast gives the graph's output its float32 back.
    for node in g.node:
        for j, out in enumerate(node.output):
            if out == LOGITS:
                node.output[j] = "logits_fp16"
    g.node.append(helper.make_node("Cast", ["logits_fp16"], [LOGITS], to=TensorProto.FLOAT))
    # The exporter's type annotations of intermediate values say float32: drop them, ONNX Runtime infers.
    del g.value_info[:]
    _own_shape_constants(g)
    m.producer_name = "model.export_inplace_fp16"
    onnx.checker.check_model(m)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(m, str(dst))
    return dst


def _own_shape_constants(g) -> None:
    """Give the Gather of the mask's shape a constant of its own (see the module docstring)."""
    from onnx import numpy_helper

    for node in g.node:
        if node.op_type == "Gather" and node.input[0] == "mask_shape":
            name = "shape_index_one"
            g.initializer.append(numpy_helper.from_array(np.array(1, np.int64), name))
            node.input[1] = name
