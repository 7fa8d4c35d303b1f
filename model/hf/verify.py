"""Parity of an imported bundle's graphs against ``transformers`` on the same checkpoint folder.

model/verify.py's checks (prefill of a padded batch + greedy decode steps, logits compared while
the tokens agree) run against ``HFReference``, which gives a ``transformers`` causal LM the call
signature of our GPT: ``(input_ids, attention_mask, position_ids, past) -> (logits, past)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

from model.hf.spec import DecoderSpec


@dataclass
class HFReference:
    hf_model: Any  # a transformers *ForCausalLM, float32, eager attention
    spec: DecoderSpec

    @property
    def cfg(self) -> SimpleNamespace:  # what model/verify.py reads; the cache has n_kv_head heads
        s = self.spec
        return SimpleNamespace(n_layer=s.n_layer, n_head=s.n_kv_head, head_dim=s.head_dim, vocab_size=s.vocab_size,
                               context_length=s.context_length)

    def eval(self) -> HFReference:
        self.hf_model.eval()
        return self

    def float(self) -> HFReference:
        return self

    @torch.inference_mode()
    def __call__(self, input_ids, attention_mask, position_ids, past=None):
        out = self.hf_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            past_key_values=past, use_cache=True)
        return out.logits.float(), out.past_key_values


def parity_prompts(tok: Any, bos_id: int | None, add_bos: bool) -> list[list[int]]:
    """model/verify.py's prompts as token ids of the checkpoint's tokenizer (different lengths: padding)."""
    from model.verify import PARITY_PROMPTS

    prefix = [bos_id] if add_bos and bos_id is not None else []
    return [prefix + tok.encode(p, add_special_tokens=False).ids for p in PARITY_PROMPTS]
