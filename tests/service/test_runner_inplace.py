"""The in-place runner: bound views really are the cache buffers, and moved rows keep decoding right."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch

from bundle.format import load_bundle
from service.engine.kv.inplace_batch import InplaceRunner
from service.engine.kv.inplace_cache import Move, right_pad_prompts


def test_ortvalue_from_numpy_of_a_view_shares_its_memory() -> None:
    buf = np.zeros((4, 2, 8, 3), np.float32)
    view = buf[1:3]  # a slice of the first axis of a C-contiguous array is C-contiguous
    assert view.flags.c_contiguous
    v = ort.OrtValue.ortvalue_from_numpy(view)
    assert v.data_ptr() == view.ctypes.data  # no copy: what ONNX Runtime writes lands in buf


def test_runs_write_only_their_slots_and_moved_rows_decode_like_pytorch(random_model_and_bundle) -> None:
    model, bundle_dir = random_model_and_bundle
    runner = InplaceRunner(load_bundle(bundle_dir), num_slots=4, intra_op_threads=1)
    prompts = [[1, 10, 20, 30, 40, 50], [1, 60, 70]]
    ids, mask, pos = right_pad_prompts(prompts, pad_id=0)
    logits = runner.run(ids, mask, pos, start=1, stop=3)  # prefill into slots 1 and 2
    key0 = runner.buffers[0]  # (N, H, M, D) of layer 0
    assert not key0[0].any() and not key0[3].any(), "a run wrote outside its slots"
    assert key0[1, :, :6].any() and key0[2, :, :3].any(), "the prefill did not land in the numpy buffers"
    assert not key0[1:3, :, 6:].any()
    with torch.inference_mode():
        for b, p in enumerate(prompts):
            want = model(torch.tensor([p]))[0][0].numpy()  # (T, V)
            assert np.abs(logits[b, : len(p)] - want).max() < 1e-4

    # Slot 2 (the short prompt) moves to slot 0; slots 0..1 then decode one token each, per-row lengths.
    runner.apply([Move(src=2, dst=0, length=3)])
    order, lengths = [prompts[1], prompts[0]], np.array([3, 6])
    nxt = np.array([5, 7], np.int64)
    out = runner.decode(nxt, lengths)
    assert out.shape == (2, runner.vocab_size)
    with torch.inference_mode():
        for b, p in enumerate(order):
            want = model(torch.tensor([[*p, int(nxt[b])]]))[0][0, -1].numpy()
            assert np.abs(out[b] - want).max() < 1e-4
