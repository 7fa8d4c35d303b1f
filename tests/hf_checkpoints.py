"""Small random-weight Hugging Face checkpoints for the import tests, built offline.

``make_checkpoint(family, out)`` saves, with ``save_pretrained``: a ``transformers`` model of the
family (2 layers, small widths, seeded random weights), a byte-level BPE tokenizer trained here
with the ``tokenizers`` library on a few lines of text (no network), its tokenizer_config.json
with a chat template, and a generation_config.json with sampling defaults and two end ids.
"""

from __future__ import annotations

from pathlib import Path

TEXT = [
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer",
    "The slings and arrows of outrageous fortune, or to take arms against a sea of troubles.",
    "Shall I compare thee to a summer's day? Thou art more lovely and more temperate.",
    "Rough winds do shake the darling buds of May, and summer's lease hath all too short a date.",
    "Café, naïve, 東京, 🙂 — a few characters outside ASCII, for byte-level merges.",
    "def main():\n    print('hello, world')\n    return 0\n",
] * 20

SPECIALS = ["<|begin|>", "<|end|>", "<|eot|>", "<|pad|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|eot|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# Widths: head_dim 16 (GroupQueryAttention on the CPU needs a multiple of 8); 4 query heads over
# 2 key/value heads where the family has grouped-query attention.
FAMILIES = {
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=128),
    "llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128,
                  rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 32}),
    "qwen2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True),
    "mistral": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=256, sliding_window=96),
    "gemma": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=1, head_dim=16, max_position_embeddings=128),
}


def train_tokenizer(vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXT, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<|begin|> $A", pair="<|begin|> $A <|begin|> $B",
                                                       special_tokens=[("<|begin|>", tok.token_to_id("<|begin|>"))])
    return tok


def make_checkpoint(family: str, out: Path, seed: int = 0) -> Path:
    """Write a random-weight ``family`` checkpoint folder to ``out``; return it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast

    tok = train_tokenizer()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin|>", eos_token="<|end|>",
                                   pad_token="<|pad|>", chat_template=CHAT_TEMPLATE)
    ids = {t: tok.token_to_id(t) for t in SPECIALS}
    cfg = AutoConfig.for_model(family, vocab_size=tok.get_vocab_size(), bos_token_id=ids["<|begin|>"],
                               eos_token_id=ids["<|end|>"], pad_token_id=ids["<|pad|>"], **FAMILIES[family])
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # larger than the default init, so greedy continuations vary
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.15)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|begin|>"], eos_token_id=[ids["<|end|>"], ids["<|eot|>"]], pad_token_id=ids["<|pad|>"],
        do_sample=True, temperature=0.7, top_p=0.9)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return out
