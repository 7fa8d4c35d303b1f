"""Parity of an exported bundle against the PyTorch model: logits and greedy continuations."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
import torch

from model.gpt import GPT, left_pad_batch

PARITY_PROMPTS = ["ROMEO.\nBut soft, what light", "Thou", "To be, or not to be, that is the question:\nWhether"]


@dataclass
class ParityReport:
    max_abs_diff: float
    greedy_identical: bool
    torch_tokens: list[list[int]]
    onnx_tokens: list[list[int]]
    steps: int

    def ok(self, tol: float) -> bool:
        return self.max_abs_diff <= tol and self.greedy_identical


def check_parity(model: GPT, onnx_path, prompts: list[list[int]], pad_id: int, steps: int = 16) -> ParityReport:
    """Left-padded batch: prefill then ``steps`` greedy decode steps, in PyTorch and ONNX Runtime side by side.

    Each side decodes its own greedy tokens; logits are compared while the tokens agree.
    """
    model = model.eval().float()
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    L, H, D = model.cfg.n_layer, model.cfg.n_head, model.cfg.head_dim
    ids, mask, pos = left_pad_batch(prompts, pad_id)
    B = ids.shape[0]
    np_dtype = np.float16 if sess.get_inputs()[3].type == "tensor(float16)" else np.float32
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": pos.numpy()}
    for i in range(L):
        feed[f"past_key_values.{i}.key"] = np.zeros((B, H, 0, D), np_dtype)
        feed[f"past_key_values.{i}.value"] = np.zeros((B, H, 0, D), np_dtype)
    max_diff = 0.0
    t_tokens: list[list[int]] = [[] for _ in range(B)]
    o_tokens: list[list[int]] = [[] for _ in range(B)]
    past = None
    with torch.inference_mode():
        for step in range(steps + 1):
            t_logits, past = model(ids, mask, pos, past)
            outs = sess.run(None, feed)
            o_logits = outs[0].astype(np.float32)
            if t_tokens == o_tokens:
                max_diff = max(max_diff, float(np.abs(t_logits[:, -1].numpy() - o_logits[:, -1]).max()))
            t_next = t_logits[:, -1].argmax(-1)
            o_next = o_logits[:, -1].argmax(-1)
            if step == steps:
                break
            for b in range(B):
                t_tokens[b].append(int(t_next[b]))
                o_tokens[b].append(int(o_next[b]))
            # Both sides continue from PyTorch's tokens so the logits stay comparable.
            ids = t_next[:, None]
            mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype)], dim=1)
            pos = pos[:, -1:] + 1
            feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": pos.numpy()}
            for i in range(L):
                feed[f"past_key_values.{i}.key"] = outs[1 + 2 * i]
                feed[f"past_key_values.{i}.value"] = outs[2 + 2 * i]
    report = ParityReport(max_diff, t_tokens == o_tokens, t_tokens, o_tokens, steps)
    print(f"parity: max |logit diff| {max_diff:.2e} over prefill + {steps} steps, greedy identical: "
          f"{report.greedy_identical}", file=sys.stderr)
    return report
