"""Step 2 of the GPU benchmark: the bundles compute on the GPU what the PyTorch model computes there.

- fp32 ``model.onnx`` on ONNX Runtime against the PyTorch model (fp32, TF32 off) on the same device:
  max |logit diff| over a left-padded prefill and greedy decode steps;
- fp16 ``model.onnx`` against the same fp32 PyTorch model: relative error (max |diff| / max |logit|)
  and greedy identical on the prompt set;
- the engine's static path (fp16 in-place decoder, CUDA graphs where they apply) against the
  engine on fp16 ``model.onnx``: the same greedy tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

PROMPTS = [
    "ROMEO.\nBut soft, what light",
    "Thou",
    "To be, or not to be, that is the question:\nWhether",
    "KING LEAR.\nBlow, winds, and crack your cheeks!",
    "Now is the winter of our discontent",
    "HAMLET.\nAlas, poor Yorick!",
    "All the world's a stage,",
    "FIRST WITCH.\nWhen shall we three meet again",
]


def prompt_ids(bundle_dir: Path) -> list[list[int]]:
    from bundle.format import load_bundle
    from bundle.tokenizer import Tokenizer

    b = load_bundle(bundle_dir, verify_hashes=False)
    tok = Tokenizer.load(b.tokenizer_path)
    return [[b.bos_id, *tok.encode(p)] for p in PROMPTS]


def ort_session(path: Path, device: str) -> Any:
    """A session on ``device``; on CUDA with TF32 off, so fp32 means fp32 on both sides."""
    import onnxruntime as ort

    from bench.gpu_checks import PROVIDER_NAMES, check_provider

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if device == "cuda":
        try:
            sess = ort.InferenceSession(str(path), so, providers=[("CUDAExecutionProvider", {"use_tf32": "0"}),
                                                                  "CPUExecutionProvider"])
        except Exception:  # a build without the option: its default
            sess = ort.InferenceSession(str(path), so, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    else:
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    check_provider(sess, PROVIDER_NAMES[device], path.name)
    return sess


def torch_vs_onnx(model: Any, sess: Any, prompts: list[list[int]], pad_id: int, steps: int,
                  device: str) -> dict[str, Any]:
    """Prefill then ``steps`` greedy steps in PyTorch (on ``device``) and ONNX Runtime side by side,
    both fed PyTorch's tokens; logits compared while the greedy choices agree."""
    import torch

    from model.gpt import left_pad_batch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = model.eval().float().to(device)
    cfg = model.cfg
    ids, mask, pos = left_pad_batch(prompts, pad_id)
    B = ids.shape[0]
    kv_type = np.float16 if sess.get_inputs()[3].type == "tensor(float16)" else np.float32
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": pos.numpy()}
    for i in range(cfg.n_layer):
        for kind in ("key", "value"):
            feed[f"past_key_values.{i}.{kind}"] = np.zeros((B, cfg.n_head, 0, cfg.head_dim), kv_type)
    max_abs, max_ref, identical, past = 0.0, 0.0, True, None
    with torch.inference_mode():
        for step in range(steps + 1):
            t_logits, past = model(ids.to(device), mask.to(device), pos.to(device), past)
            t_last = t_logits[:, -1].float().cpu().numpy()
            outs = sess.run(None, feed)
            o_last = outs[0][:, -1].astype(np.float32)
            t_next, o_next = t_last.argmax(-1), o_last.argmax(-1)
            if identical:
                max_abs = max(max_abs, float(np.abs(t_last - o_last).max()))
                max_ref = max(max_ref, float(np.abs(t_last).max()))
            identical = identical and bool((t_next == o_next).all())
            if step == steps:
                break
            ids = torch.from_numpy(t_next)[:, None].long()
            mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype)], dim=1)
            pos = pos[:, -1:] + 1
            feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": pos.numpy()}
            for i in range(cfg.n_layer):
                feed[f"past_key_values.{i}.key"] = outs[1 + 2 * i]
                feed[f"past_key_values.{i}.value"] = outs[2 + 2 * i]
    return {"max_abs_diff": max_abs, "relative_error": max_abs / max(max_ref, 1e-30), "greedy_identical": identical,
            "steps": steps, "rows": B}


def engine_tokens(bundle_dir: Path, device: str, prompts: list[list[int]], new_tokens: int,
                  **engine_options: Any) -> tuple[str, list[list[int]]]:
    """Greedy tokens of every prompt through the engine (all added at once); and its KV layout."""
    from bundle.format import load_bundle
    from service.engine.config import EngineConfig
    from service.engine.engine import Engine
    from service.engine.types import SamplingParams

    engine = Engine(load_bundle(bundle_dir, verify_hashes=False), EngineConfig(provider=device, max_running=len(prompts),
                    speculative_tokens=0, **engine_options))
    out: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True))
    while engine.has_unfinished():
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
    return engine.kv_layout, [out[str(i)] for i in range(len(prompts))]


def parity(bundle: Path, fp16_bundle: Path, checkpoint: Path, device: str, steps: int = 16,
           fp32_tol: float = 1e-3, fp16_rel_tol: float = 1e-2) -> dict[str, Any]:
    """Every parity check of step 2; ``ok`` is their conjunction."""
    from bundle.format import load_bundle
    from model.train import load_model

    model, _ = load_model(checkpoint)
    prompts = prompt_ids(bundle)
    pad = load_bundle(bundle, verify_hashes=False).pad_id
    res: dict[str, Any] = {}
    fp32 = torch_vs_onnx(model, ort_session(load_bundle(bundle, verify_hashes=False).onnx_path, device),
                         prompts, pad, steps, device)
    fp32["ok"] = fp32["max_abs_diff"] <= fp32_tol and fp32["greedy_identical"]
    fp32["limit"] = f"max |logit diff| <= {fp32_tol:g}, greedy identical"
    res["fp32_model_onnx_vs_torch"] = fp32
    fb = load_bundle(fp16_bundle, verify_hashes=False)
    fp16 = torch_vs_onnx(model, ort_session(fb.onnx_path, device), prompts, pad, steps, device)
    fp16["ok"] = fp16["relative_error"] <= fp16_rel_tol and fp16["greedy_identical"]
    fp16["limit"] = f"relative error <= {fp16_rel_tol:g}, greedy identical"
    res["fp16_model_onnx_vs_torch"] = fp16
    if fb.kv_inplace_path is not None:
        _, generic = engine_tokens(fp16_bundle, device, prompts, steps, static_decode="off")
        layout, static = engine_tokens(fp16_bundle, device, prompts, steps, static_decode="on")
        same = sum(a == b for a, b in zip(generic, static, strict=True))
        res["fp16_static_path_vs_generic"] = {"layout": layout, "rows_identical": same, "rows": len(prompts),
                                              "ok": same == len(prompts), "limit": "greedy tokens identical"}
    res["ok"] = all(v["ok"] for v in res.values())
    return res
