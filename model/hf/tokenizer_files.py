"""The bundle's tokenizer, chat template and generation sections from a checkpoint's files (pure logic).

Inputs are the parsed JSON of tokenizer_config.json and generation_config.json and a
``tokenizers.Tokenizer`` (for token ids); outputs are the config.json sections of the bundle
contract (docs/model-bundle.md): ``tokenizer`` of type "huggingface", ``generation.defaults``.
"""

from __future__ import annotations

from typing import Any

GENERATION_KEYS = ("temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens", "do_sample")


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json stores special tokens as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def tokenizer_section(tok: Any, tok_config: dict[str, Any], gen_config: dict[str, Any]) -> dict[str, Any]:
    """The ``tokenizer`` section for a tokenizer.json bundle.

    Args:
        tok: a ``tokenizers.Tokenizer`` (token_to_id, encode, get_vocab_size).
        tok_config: tokenizer_config.json; gen_config: generation_config.json ({} when absent).
    """
    def token_id(text: str | None) -> int | None:
        return None if text is None else tok.token_to_id(text)

    bos_token, eos_token = _token_text(tok_config.get("bos_token")), _token_text(tok_config.get("eos_token"))
    pad_token, unk_token = _token_text(tok_config.get("pad_token")), _token_text(tok_config.get("unk_token"))
    bos_id = token_id(bos_token)
    if bos_id is None and gen_config.get("bos_token_id") is not None:
        bos_id = int(gen_config["bos_token_id"])
    eos_ids: list[int] = []
    for i in [token_id(eos_token), *_ids(gen_config.get("eos_token_id"))]:
        if i is not None and i not in eos_ids:
            eos_ids.append(i)
    if not eos_ids:
        raise ValueError("the checkpoint names no end-of-sequence token (tokenizer_config.json eos_token or "
                         "generation_config.json eos_token_id)")
    pad_id = token_id(pad_token)
    if pad_id is None and gen_config.get("pad_token_id") is not None:
        pad_id = _ids(gen_config["pad_token_id"])[0]
    add_bos = tok_config.get("add_bos_token")
    if not isinstance(add_bos, bool):  # what the tokenizer's post-processor does with special tokens on
        add_bos = bos_id is not None and tok.encode("a", add_special_tokens=True).ids[:1] == [bos_id]
    return {
        "type": "huggingface", "file": "tokenizer.json", "vocab_size": tok.get_vocab_size(with_added_tokens=True),
        "add_bos": bool(add_bos and bos_id is not None), "bos_id": bos_id, "eos_id": eos_ids[0], "eos_ids": eos_ids,
        "pad_id": pad_id, "unk_id": token_id(unk_token), "bos_token": bos_token, "eos_token": eos_token,
    }


def chat_template(tok_config: dict[str, Any], template_file: str | None) -> str | None:
    """The checkpoint's chat template: a chat_template.jinja file, else tokenizer_config.json's
    ``chat_template`` (a string, or a list of named templates: "default"); None if it has none."""
    if template_file is not None:
        return template_file
    t = tok_config.get("chat_template")
    if isinstance(t, list):
        named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
        t = named.get("default")
    return t if isinstance(t, str) and t.strip() else None


def generation_defaults(gen_config: dict[str, Any]) -> dict[str, Any]:
    """The sampling keys generation_config.json sets (only those), for ``generation.defaults``."""
    return {k: gen_config[k] for k in GENERATION_KEYS if gen_config.get(k) is not None}
