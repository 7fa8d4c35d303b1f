"""The decoder with an in-place KV cache: ``com.microsoft.GroupQueryAttention`` over a preallocated buffer.

``model.onnx`` (model/export.py) concatenates past and new keys into a new ``present`` every call,
so ONNX Runtime copies the whole cache each step. This graph instead takes, per layer, one key
and one value buffer of ``max_len`` positions per row and writes the new positions into it: bind
``past_key_values.{i}.*`` and ``present.{i}.*`` to the same memory (IO binding) and nothing is
copied. Rows are RIGHT padded: row b's tokens occupy buffer positions 0..len_b-1, and each row
attends over its own length only.

The interface is that of ONNX Runtime GenAI's model builder with ``past_present_share_buffer``:

    inputs   input_ids (B, T) int64; attention_mask (B, total_len) int64, 1 = a real token, rows
             right padded; position_ids (B, T) int64; past_key_values.{i}.key/value (B, H, M, D)
    outputs  logits (B, T, V) float32; present.{i}.key/value (B, H, M, D), the same buffer

and inside the graph, as GenAI's builder does: seqlens_k = ReduceSum(attention_mask, 1) - 1 as
int32 (B,), total_sequence_length = Shape(attention_mask)[1] as an int32 scalar.

What ONNX Runtime's CPU GroupQueryAttention (1.31) does with it (model.verify.check_parity_kv_inplace,
run by ``python -m model verify`` and tests/model): a first prompt (T = total_len, empty past) with
right-padded rows of different lengths is exact at every real position (a padding query attends
to padding keys: finite values nobody reads); a decode step (T = 1) with a different length per
row is exact. A prompt over a non-empty past (1 < T < total_len) is refused for batch > 1
("batch_size must be 1 when sequence_length > 1 and past context is given"): the service never
chunks prompts.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from bundle.format import DEFAULT_IO_NAMES
from model.gpt import GPT, sinusoidal_table

KV_INPLACE_FILE = "model.kvinplace.onnx"
GQA_OP = "com.microsoft.GroupQueryAttention"
OPSET = 18


def build_kv_inplace(model: GPT, out: Path) -> Path:
    """Write the GroupQueryAttention decoder of ``model`` (fp32 weights) to ``out``; return ``out``.

    Args:
        model: the trained GPT (pre-LN, sinusoidal positions, tied head), any device.
        out: the .onnx file to write (one file, no external data).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    cfg = model.cfg
    C, H, D, V, L = cfg.n_embd, cfg.n_head, cfg.head_dim, cfg.vocab_size, cfg.n_layer
    sd = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(value, name))
        return name

    inits: list[Any] = []
    nodes: list[Any] = []
    const("wte", sd["wte.weight"])  # (V, C)
    const("pe", sinusoidal_table(cfg.context_length, C).numpy())  # (context, C)
    const("emb_scale", np.array(math.sqrt(C), np.float32))
    const("qkv_split", np.array([C, C, C], np.int64))
    const("one", np.array(1, np.int64))
    const("axis1", np.array([1], np.int64))
    # GenAI's attention-mask subgraph: per-row lengths and the batch's total length for GQA.
    nodes += [
        helper.make_node("ReduceSum", ["attention_mask", "axis1"], ["mask_sum"], keepdims=0),  # (B,)
        helper.make_node("Sub", ["mask_sum", "one"], ["seqlens_k_i64"]),
        helper.make_node("Cast", ["seqlens_k_i64"], ["seqlens_k"], to=TensorProto.INT32),
        helper.make_node("Shape", ["attention_mask"], ["mask_shape"]),
        helper.make_node("Gather", ["mask_shape", "one"], ["total_len_i64"], axis=0),  # scalar
        helper.make_node("Cast", ["total_len_i64"], ["total_sequence_length"], to=TensorProto.INT32),
        # (C, V): the tied head, a Transpose that ONNX Runtime folds into a constant at load
        helper.make_node("Transpose", ["wte"], ["lm_head"], perm=[1, 0]),
        helper.make_node("Gather", ["wte", "input_ids"], ["tok"]),  # (B, T, C)
        helper.make_node("Mul", ["tok", "emb_scale"], ["tok_scaled"]),
        helper.make_node("Gather", ["pe", "position_ids"], ["pos"]),
        helper.make_node("Add", ["tok_scaled", "pos"], ["x0"]),
    ]

    def linear(x: str, prefix: str, y: str) -> None:  # y = x @ W^T (+ b), W (out, in)
        w = const(f"{prefix}.weight.T", np.ascontiguousarray(sd[f"{prefix}.weight"].T))
        if f"{prefix}.bias" not in sd:
            nodes.append(helper.make_node("MatMul", [x, w], [y]))
            return
        nodes.append(helper.make_node("MatMul", [x, w], [f"{y}.nobias"]))
        nodes.append(
            helper.make_node("Add", [f"{y}.nobias", const(f"{prefix}.bias", sd[f"{prefix}.bias"])], [y])
        )

    def layer_norm(x: str, prefix: str, y: str) -> None:
        w = const(f"{prefix}.weight", sd[f"{prefix}.weight"])
        b = const(f"{prefix}.bias", sd[f"{prefix}.bias"])
        nodes.append(helper.make_node("LayerNormalization", [x, w, b], [y], axis=-1, epsilon=1e-5))

    def activation(x: str, y: str) -> None:  # model.gpt.ACTIVATION_FNS
        if cfg.activation == "gelu":
            nodes.append(helper.make_node("Gelu", [x], [y], domain="com.microsoft"))  # exact (erf)
        elif cfg.activation == "relu":
            nodes.append(helper.make_node("Relu", [x], [y]))
        elif cfg.activation == "relu2":
            nodes.append(helper.make_node("Relu", [x], [y + "r"]))
            nodes.append(helper.make_node("Mul", [y + "r", y + "r"], [y]))
        else:
            raise ValueError(f"no ONNX form for activation {cfg.activation!r}")

    x = "x0"
    for i in range(L):
        p = f"blocks.{i}"
        layer_norm(x, f"{p}.ln1", f"h{i}")
        linear(f"h{i}", f"{p}.attn.qkv", f"qkv{i}")  # (B, T, 3C)
        nodes.append(helper.make_node("Split", [f"qkv{i}", "qkv_split"], [f"q{i}", f"k{i}", f"v{i}"], axis=2))
        nodes.append(
            helper.make_node(
                "GroupQueryAttention",
                [
                    f"q{i}",
                    f"k{i}",
                    f"v{i}",
                    f"past_key_values.{i}.key",
                    f"past_key_values.{i}.value",
                    "seqlens_k",
                    "total_sequence_length",
                ],
                [f"att{i}", f"present.{i}.key", f"present.{i}.value"],  # att (B, T, C); presents (B, H, M, D)
                domain="com.microsoft",
                num_heads=H,
                kv_num_heads=H,
                scale=1.0 / math.sqrt(D),
            )
        )
        linear(f"att{i}", f"{p}.attn.proj", f"ao{i}")
        nodes.append(helper.make_node("Add", [x, f"ao{i}"], [f"x{i}a"]))
        layer_norm(f"x{i}a", f"{p}.ln2", f"h{i}b")
        linear(f"h{i}b", f"{p}.ffn.fc", f"fc{i}")
        activation(f"fc{i}", f"g{i}")
        linear(f"g{i}", f"{p}.ffn.proj", f"fo{i}")
        nodes.append(helper.make_node("Add", [f"x{i}a", f"fo{i}"], [f"x{i + 1}"]))
        x = f"x{i + 1}"
    layer_norm(x, "ln_f", "hf")
    nodes.append(helper.make_node("MatMul", ["hf", "lm_head"], ["logits"]))  # (B, T, V)

    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    cache = ["batch", H, "max_len", D]
    inputs = [
        helper.make_tensor_value_info("input_ids", i64, ["batch", "seq"]),
        helper.make_tensor_value_info("attention_mask", i64, ["batch", "total_len"]),
        helper.make_tensor_value_info("position_ids", i64, ["batch", "seq"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", f32, ["batch", "seq", V])]
    for i in range(L):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", f32, cache))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", f32, cache))
    graph = helper.make_graph(nodes, "gpt_kv_inplace", inputs, outputs, inits)
    m = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)],
        producer_name="model.export_gqa",
    )
    m.ir_version = 9
    onnx.checker.check_model(m)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(m, str(out))
    return out


def kv_inplace_config(model: GPT, file: str = KV_INPLACE_FILE, dtype: str = "float32") -> dict[str, Any]:
    """The ``onnx_kv_inplace`` section of config.json (docs/model-bundle.md)."""
    return {
        "file": file,
        "opset": OPSET,
        "op": GQA_OP,
        "kv_dtype": dtype,
        "past_present_share_buffer": True,
        "padding": "right",
        "max_len": model.cfg.context_length,
        "io_names": dict(DEFAULT_IO_NAMES),
    }
