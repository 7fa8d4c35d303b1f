"""Imported Hugging Face checkpoints served through real HTTP: the tokens transformers would produce.

Per family: the checkpoint (tests/hf_checkpoints.py) imported with `python -m model import --hf`,
served by `python -m service` (tests/service/server_harness.py). Greedy tokens for several
prompts sent at once (token-id and text prompts) equal ``generate()`` of ``transformers`` on the
same folder; a seeded sampled request gives the same tokens alone and inside a busy batch.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from server_harness import start

FAMILIES = ["gpt2", "llama", "qwen2", "mistral", "gemma"]
TEXTS = ["To be, or not to be", "Shall I compare thee", "Café 東京 🙂", "def main():"]
MAX_NEW = 12


def _generate(server, body: dict) -> dict:
    r = httpx.post(server.url("/generate"), json={"details": True, **body}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def _hf_greedy(ckpt, prompts: list[list[int]], eos_ids: list[int]) -> list[list[int]]:
    """transformers' own generate(), one prompt at a time (no padding), stopped at any end id."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt, local_files_only=True, dtype=torch.float32).eval()
    outs = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p])
            seq = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW,
                                 do_sample=False, eos_token_id=eos_ids, pad_token_id=eos_ids[0])
            outs.append(seq[0, len(p):].tolist())
    return outs


def _strip_end(tokens: list[int], eos_ids: list[int]) -> list[int]:
    """Up to (not including) the first end id: whether a runner reports the end token itself differs."""
    for i, t in enumerate(tokens):
        if t in eos_ids:
            return tokens[:i]
    return tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_imported_model_serves_transformers_tokens(hf_import, tmp_path, family):
    import json

    from tokenizers import Tokenizer

    ckpt, bundle = hf_import(family)
    cfg = json.loads((bundle / "config.json").read_text())["tokenizer"]
    eos_ids = cfg["eos_ids"]
    tok = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    id_prompts = [[cfg["bos_id"], *tok.encode(t, add_special_tokens=False).ids] for t in TEXTS]
    text_ids = [tok.encode(t).ids for t in TEXTS]  # with the checkpoint's own special tokens
    expected = _hf_greedy(ckpt, id_prompts + text_ids, eos_ids)
    server = start(bundle, tmp_path / "server.log", fake=False, TEXTGEN_MAX_RUNNING="16")
    try:
        bodies = [{"input_ids": p} for p in id_prompts] + [{"text": t} for t in TEXTS]
        greedy = {"temperature": 0, "max_tokens": MAX_NEW}
        with ThreadPoolExecutor(len(bodies)) as pool:  # all in flight at once: one batch of different lengths
            got = list(pool.map(lambda b: _generate(server, {**b, **greedy}), bodies))
        for body, want, res in zip(bodies, expected, got, strict=True):
            assert _strip_end(res["details"]["token_ids"], eos_ids) == _strip_end(want, eos_ids), (family, body)
        assert any(len(_strip_end(w, eos_ids)) >= 4 for w in expected)  # the comparison saw real continuations

        sampled = {"input_ids": id_prompts[0], "temperature": 0.9, "top_p": 0.95, "seed": 1234,
                   "max_tokens": MAX_NEW}
        alone = _generate(server, sampled)["details"]["token_ids"]
        noise = [{"input_ids": p, "temperature": 1.0, "max_tokens": 3 * MAX_NEW} for p in id_prompts[1:]] * 2
        with ThreadPoolExecutor(len(noise) + 1) as pool:
            busy = [pool.submit(_generate, server, b) for b in noise]
            in_batch = pool.submit(_generate, server, sampled).result()["details"]["token_ids"]
            for f in busy:
                f.result()
        assert in_batch == alone, family
    finally:
        assert server.stop() == 0, server.log()[-3000:]
