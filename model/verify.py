"""Parity of an exported bundle against the PyTorch model: logits and greedy continuations.

``check_parity`` runs model.onnx (left-padded rows, the cache concatenated every step);
``check_parity_kv_inplace`` runs model.kvinplace.onnx (right-padded rows of different lengths in
one prefill, then decode steps writing into one preallocated buffer bound as past and present).
"""

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


def _session(onnx_path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])


def check_parity(model: GPT, onnx_path, prompts: list[list[int]], pad_id: int, steps: int = 16) -> ParityReport:
    """Left-padded batch: prefill then ``steps`` greedy decode steps, in PyTorch and ONNX Runtime side by side.

    Each side decodes its own greedy tokens; logits are compared while the tokens agree.
    """
    model = model.eval().float()
    sess = _session(onnx_path)
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


def check_parity_kv_inplace(model: GPT, onnx_path, prompts: list[list[int]], pad_id: int,
                            steps: int = 16) -> ParityReport:
    """The in-place decoder against PyTorch: prefill then ``steps`` greedy decode steps.

    ONNX Runtime side: one right-padded prefill of all prompts (row b's tokens at buffer positions
    0..len_b-1), then decode steps where every row has its own length, with per layer one key and
    one value buffer (B, H, context_length, D) bound as both past and present. PyTorch side: the
    left-padded batch of ``check_parity``. Logits are compared at each row's last real token.
    """
    model = model.eval().float()
    sess = _session(onnx_path)
    cfg = model.cfg
    L, H, D, M = cfg.n_layer, cfg.n_head, cfg.head_dim, cfg.context_length
    B = len(prompts)
    lengths = np.array([len(p) for p in prompts], np.int64)
    T = int(lengths.max())
    ids = np.full((B, T), pad_id, np.int64)
    for b, p in enumerate(prompts):
        ids[b, : len(p)] = p
    o_mask = (np.arange(T) < lengths[:, None]).astype(np.int64)  # right padded
    o_pos = np.broadcast_to(np.arange(T), (B, T)).copy()
    kv_dtype = np.float16 if sess.get_inputs()[3].type == "tensor(float16)" else np.float32  # --fp16: for CUDA
    buffers = [np.zeros((B, H, M, D), kv_dtype) for _ in range(2 * L)]
    binding = sess.io_binding()
    for i in range(L):
        for j, kind in enumerate(("key", "value")):
            v = ort.OrtValue.ortvalue_from_numpy(buffers[2 * i + j])  # shares the numpy memory
            binding.bind_ortvalue_input(f"past_key_values.{i}.{kind}", v)
            binding.bind_ortvalue_output(f"present.{i}.{kind}", v)  # the same buffer: written in place

    def run(ids: np.ndarray, mask: np.ndarray, pos: np.ndarray) -> np.ndarray:
        logits = np.empty((B, ids.shape[1], cfg.vocab_size), np.float32)
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("attention_mask", mask)
        binding.bind_cpu_input("position_ids", pos)
        binding.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        sess.run_with_iobinding(binding)
        return logits

    t_ids, t_mask, t_pos = left_pad_batch(prompts, pad_id)
    max_diff = 0.0
    t_tokens: list[list[int]] = [[] for _ in range(B)]
    o_tokens: list[list[int]] = [[] for _ in range(B)]
    past = None
    o_last = run(ids, o_mask, o_pos)[np.arange(B), lengths - 1]  # (B, V) at each row's last token
    with torch.inference_mode():
        for step in range(steps + 1):
            t_logits, past = model(t_ids, t_mask, t_pos, past)
            t_last = t_logits[:, -1].numpy()
            if t_tokens == o_tokens:
                max_diff = max(max_diff, float(np.abs(t_last - o_last).max()))
            t_next, o_next = t_last.argmax(-1), o_last.argmax(-1)
            if step == steps:
                break
            for b in range(B):
                t_tokens[b].append(int(t_next[b]))
                o_tokens[b].append(int(o_next[b]))
            # Both sides continue from PyTorch's tokens so the logits stay comparable.
            nxt = torch.from_numpy(t_next)[:, None].long()
            t_ids, t_pos = nxt, t_pos[:, -1:] + 1
            t_mask = torch.cat([t_mask, torch.ones(B, 1, dtype=t_mask.dtype)], dim=1)
            o_mask = (np.arange(lengths.max() + 1) <= lengths[:, None]).astype(np.int64)  # each row: its length + 1
            o_last = run(nxt.numpy(), o_mask, lengths[:, None].copy())[:, 0]
            lengths = lengths + 1
    report = ParityReport(max_diff, t_tokens == o_tokens, t_tokens, o_tokens, steps)
    print(f"parity (in-place KV cache): max |logit diff| {max_diff:.2e} over prefill + {steps} steps, "
          f"greedy identical: {report.greedy_identical}", file=sys.stderr)
    return report
