"""service.http.jinja_template renders a bundle's chat template exactly as transformers'
apply_chat_template does (real template styles kept in tests/service/chat_templates/), and turns
every template error into a 400 naming the problem."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from hf_tokenizers import bundle_section, byte_level_bpe

from service.http.errors import ApiError
from service.http.jinja_template import JinjaChatTemplate, load_chat_template

TEMPLATES = Path(__file__).parent / "chat_templates"
SPECIAL = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}


@dataclass
class Msg:  # what service.http.protocol.ChatMessage offers the template
    role: str
    text: str
    name: str | None = None


SYSTEM = Msg("system", "You are a poet. Answer in <b>verse</b> & rhyme.")
USER = Msg("user", "Write about the sea 🌊, café, 日本語.  ")
ASSISTANT = Msg("assistant", "The sea is wide, / the sea is deep.")
USER2 = Msg("user", "Again, shorter: \"quotes\" and 'apostrophes'\nand a new line.")
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather <now> & later",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]

CONVERSATIONS = {
    "user": [USER],
    "system-user": [SYSTEM, USER],
    "multi-turn": [SYSTEM, USER, ASSISTANT, USER2],
    "no-system-multi-turn": [USER, ASSISTANT, USER2],
    "named": [Msg("user", "hi", name="ann")],
}
STYLES = ["llama3", "chatml_qwen2", "mistral_inst", "phi3", "features"]


@pytest.fixture(scope="module")
def hf_tokenizer():
    """transformers' tokenizer object, only to call its apply_chat_template."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=byte_level_bpe(), **SPECIAL)


def source(style: str) -> str:
    return (TEMPLATES / f"{style}.jinja").read_text()


def as_dicts(messages: list[Msg]) -> list[dict]:
    return [{"role": m.role, "content": m.text, **({"name": m.name} if m.name else {})} for m in messages]


def reference(hf_tokenizer, style: str, messages: list[Msg], tools=None, **kwargs) -> str:
    return hf_tokenizer.apply_chat_template(
        as_dicts(messages), chat_template=source(style), tools=tools, tokenize=False, **kwargs
    )


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("style", STYLES)
def test_rendering_equals_apply_chat_template(hf_tokenizer, style: str, conversation: str) -> None:
    messages = CONVERSATIONS[conversation]
    ours = JinjaChatTemplate(source(style), SPECIAL).render(messages)
    assert ours == reference(hf_tokenizer, style, messages, add_generation_prompt=True)
    assert "🌊" in ours or conversation == "named"


@pytest.mark.parametrize("style", ["llama3", "chatml_qwen2", "features"])
def test_tools_render_as_apply_chat_template_renders_them(hf_tokenizer, style: str) -> None:
    ours = JinjaChatTemplate(source(style), SPECIAL).render([SYSTEM, USER], TOOLS)
    assert ours == reference(hf_tokenizer, style, [SYSTEM, USER], tools=TOOLS, add_generation_prompt=True)
    assert "Weather <now> & later" in ours  # tojson does not escape HTML


@pytest.mark.parametrize("style", ["llama3", "chatml_qwen2", "mistral_inst", "phi3"])
def test_a_final_assistant_message_is_continued(hf_tokenizer, style: str) -> None:
    messages = [USER, Msg("assistant", "Once upon a")]
    ours = JinjaChatTemplate(source(style), SPECIAL).render(messages)
    assert ours == reference(hf_tokenizer, style, messages, continue_final_message=True)
    assert ours.endswith("Once upon a")


def test_developer_is_rendered_as_system(hf_tokenizer) -> None:
    ours = JinjaChatTemplate(source("chatml_qwen2"), SPECIAL).render([Msg("developer", "Be brief."), USER])
    assert ours == reference(hf_tokenizer, "chatml_qwen2", [Msg("system", "Be brief."), USER], add_generation_prompt=True)


@pytest.mark.parametrize(
    ("template", "messages", "message"),
    [
        (source("mistral_inst"), [USER, USER2], "conversation roles must alternate user/assistant"),
        (source("mistral_inst"), [ASSISTANT, USER], "conversation roles must alternate"),
        ("{{ messages[0].content.words.first }}", [USER], "has no attribute 'words'"),
        ("{{ messages | length + 'x' }}", [USER], "TypeError"),
        ("{{ ''.__class__.__mro__[1].__subclasses__() }}", [USER], "refused them"),
        ("{% set ns = namespace() %}{% set ns._x = 1 %}", [USER], "refused them"),
        ("{{ messages.append(1) }}", [USER], "refused them"),  # the sandbox is immutable
    ],
)
def test_template_errors_are_400_naming_the_problem(template: str, messages, message: str) -> None:
    with pytest.raises(ApiError) as e:
        JinjaChatTemplate(template, SPECIAL).render(messages)
    assert e.value.kind == "chat_template" and e.value.status == 400 and e.value.param == "messages"
    assert message in e.value.message


def test_undefined_values_render_empty_as_in_transformers(hf_tokenizer) -> None:
    template = "{{ messages[0].nothing }}[{{ not_a_variable }}]{{ messages[0].content }}"
    ours = JinjaChatTemplate(template, SPECIAL).render([USER])
    assert ours == hf_tokenizer.apply_chat_template(as_dicts([USER]), chat_template=template, tokenize=False)


def bundle_with(tmp_path: Path, template: str | None, eos: list[str]):
    from bundle.format import load_bundle
    from bundle.tokenizer import Tokenizer

    section = bundle_section(byte_level_bpe(specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"]), tmp_path,
                             eos=eos)
    (tmp_path / "model.onnx").write_bytes(b"-")
    config = {"format_version": 1, "architecture": {"vocab_size": section["vocab_size"], "context_length": 64,
                                                    "n_layer": 1, "n_head": 1, "head_dim": 4},
              "tokenizer": section}
    if template is not None:
        (tmp_path / "chat_template.jinja").write_text(template)
        config["chat_template"] = {"file": "chat_template.jinja"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    bundle = load_bundle(tmp_path)
    return bundle, Tokenizer.from_bundle(bundle)


def test_the_end_of_turn_token_stops_chat_when_it_is_not_an_eos_id(tmp_path: Path) -> None:
    bundle, tok = bundle_with(tmp_path, source("chatml_qwen2"), eos=["<|endoftext|>"])
    template = load_chat_template(bundle, tok)
    assert template.end_of_turn == (tok.encode("<|im_end|>")[0],)
    assert template.stop == () and not template.add_special_tokens


def test_no_extra_end_of_turn_when_eos_already_ends_it(tmp_path: Path) -> None:
    bundle, tok = bundle_with(tmp_path, source("chatml_qwen2"), eos=["<|im_end|>", "<|endoftext|>"])
    assert load_chat_template(bundle, tok).end_of_turn == ()


def test_without_a_template_the_script_template_serves(tmp_path: Path) -> None:
    from service.http.chat_template import SCRIPT

    bundle, tok = bundle_with(tmp_path, None, eos=["<|endoftext|>"])
    assert load_chat_template(bundle, tok) is SCRIPT


def test_a_template_that_does_not_compile_is_a_bundle_error(tmp_path: Path) -> None:
    from bundle.format import BundleError

    bundle, tok = bundle_with(tmp_path, "{% for m in messages %}\n{{ m.content }\n{% endfor %}", eos=["<|endoftext|>"])
    with pytest.raises(BundleError, match=r"chat_template\.jinja is not a valid Jinja chat template: line 2"):
        load_chat_template(bundle, tok)
