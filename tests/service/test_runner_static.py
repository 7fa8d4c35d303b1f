"""The static decode path on the CPU (no CUDA graphs here): same tokens as the generic path, the
buckets it runs, what crosses to the host, and which layout each setting picks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from bundle.format import load_bundle
from model.export_inplace import KV_INPLACE_FILE
from model.export_inplace_fp16 import to_fp16
from service.engine.config import EngineConfig
from service.engine.engine import Engine
from service.engine.kv.inplace_cache import right_pad_prompts
from service.engine.kv.static_batch import StaticRunner
from service.engine.types import SamplingParams


def _staggered(engine: Engine, n: int = 14, seed: int = 0) -> dict[str, list[int]]:
    """Requests of different prompt and output lengths joining every other step, greedy."""
    rng = np.random.default_rng(seed)
    pending = [(f"r{i}", [1, *rng.integers(5, 400, size=int(rng.integers(2, 24))).tolist()], int(rng.integers(2, 28)))
               for i in range(n)]
    outs: dict[str, list[int]] = {}
    step = 0
    while pending or engine.has_unfinished():
        if step % 2 == 0:
            for _ in range(int(rng.integers(1, 4))):
                if pending:
                    rid, prompt, m = pending.pop(0)
                    engine.add_request(rid, prompt, SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True))
        for out in engine.step():
            outs.setdefault(out.request_id, []).extend(out.new_token_ids)
        step += 1
    return outs


@pytest.fixture(scope="module")
def fp16_bundle(random_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The random bundle with its in-place decoder in float16 (what ``model export --fp16`` writes)."""
    out = tmp_path_factory.mktemp("fp16-inplace") / "bundle"
    shutil.copytree(random_bundle, out)
    to_fp16(random_bundle / KV_INPLACE_FILE, out / KV_INPLACE_FILE)
    cfg = json.loads((out / "config.json").read_text())
    cfg["onnx_kv_inplace"]["kv_dtype"] = "float16"
    del cfg["files"]
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def test_static_path_gives_the_generic_paths_tokens_through_joins_and_leaves(random_bundle: Path) -> None:
    bundle = load_bundle(random_bundle)
    generic = Engine(bundle, EngineConfig(provider="cpu", intra_op_threads=1, max_running=6, kv_inplace="off"))
    static = Engine(bundle, EngineConfig(provider="cpu", intra_op_threads=1, max_running=6, static_decode="on"))
    assert (generic.kv_layout, static.kv_layout) == ("concat", "static")
    assert static.speculative_tokens == 0  # a captured graph feeds one token per row
    want, got = _staggered(generic), _staggered(static)
    assert got == want
    assert sum(len(v) for v in got.values()) > 100
    runner = static.runner
    assert runner.buckets == (1, 2, 4, 6)
    assert len(runner._buckets) >= 2 and set(runner._buckets) <= set(runner.buckets)  # steps of several sizes
    assert runner.transfers.steps > 0 and runner.transfers.device_to_host == 0  # on the CPU nothing is copied back
    static._batch.slots.check_invariants()


def test_decode_inputs_cross_to_the_runner_at_fixed_addresses(random_bundle: Path) -> None:
    runner = StaticRunner(load_bundle(random_bundle), num_slots=4, provider="cpu", intra_op_threads=1)
    prompts = [[1, 10, 20, 30], [1, 40]]
    ids, mask, pos = right_pad_prompts(prompts, pad_id=0)
    runner.run(ids, mask, pos, 0, 2)
    lengths = np.array([4, 2, 0, 0])
    step = (np.array([[5], [6], [0], [0]]), (np.arange(runner.max_len) <= lengths[:, None]).astype(np.int64),
            lengths.reshape(4, 1))
    first = runner.decode(*step).copy()
    bucket = runner._buckets[4]
    addresses = {k: v.ctypes.data for k, v in bucket.inputs.items()}
    again = runner.decode(*step)  # the same step again writes the same cache positions: same logits
    assert {k: v.ctypes.data for k, v in bucket.inputs.items()} == addresses
    np.testing.assert_allclose(again, first, atol=1e-5)
    per_step = runner.transfers.per_step()
    assert per_step["host_to_device_bytes"] == 8 * (4 + 4 * runner.max_len + 4)  # ids, mask, positions (int64)
    with pytest.raises(ValueError, match="not one of the buckets"):
        runner.decode(np.zeros((3, 1), np.int64), np.zeros((3, runner.max_len), np.int64), np.zeros((3, 1), np.int64))


def test_fp16_inplace_decoder_matches_pytorch_on_the_static_path(random_model_and_bundle, fp16_bundle: Path) -> None:
    model, _ = random_model_and_bundle
    runner = StaticRunner(load_bundle(fp16_bundle), num_slots=2, provider="cpu", intra_op_threads=1)
    assert runner.kv_dtype == np.float16
    prompts = [[1, 10, 20, 30, 40], [1, 50, 60]]
    ids, mask, pos = right_pad_prompts(prompts, pad_id=0)
    logits = runner.run(ids, mask, pos, 0, 2)
    assert logits.dtype == np.float32  # the fp16 graph casts its logits back
    with torch.inference_mode():
        for b, p in enumerate(prompts):
            want = model(torch.tensor([p]))[0][0].numpy()  # (T, V)
            err = np.abs(logits[b, : len(p)] - want).max() / np.abs(want).max()
            assert err < 1e-2, err


def test_layout_choice(random_bundle: Path, fp16_bundle: Path, tmp_path: Path) -> None:
    bundle = load_bundle(random_bundle)
    assert Engine(bundle, EngineConfig(provider="cpu", max_running=2)).kv_layout == "inplace"  # auto: no static path on CPU
    assert Engine(bundle, EngineConfig(provider="cpu", max_running=2, static_decode="off")).kv_layout == "inplace"
    # A float16 in-place decoder is for CUDA: on the CPU the engine serves model.onnx.
    assert Engine(load_bundle(fp16_bundle), EngineConfig(provider="cpu", max_running=2)).kv_layout == "concat"
    assert Engine(load_bundle(fp16_bundle), EngineConfig(provider="cpu", max_running=2, static_decode="on")).kv_layout == "static"
    bare = tmp_path / "bare"
    shutil.copytree(random_bundle, bare)
    cfg = json.loads((bare / "config.json").read_text())
    del cfg["onnx_kv_inplace"], cfg["files"]
    (bare / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="TEXTGEN_STATIC_DECODE=on needs a bundle with an in-place decoder"):
        Engine(load_bundle(bare), EngineConfig(provider="cpu", static_decode="on"))
    with pytest.raises(ValueError, match="static_decode must be"):
        Engine(bundle, EngineConfig(provider="cpu", static_decode="yes"))  # type: ignore[arg-type]
